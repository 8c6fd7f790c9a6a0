"""Reference Toeplitz hash for Receive-Side Scaling (RSS), as the 82599 computes it.

Pure Python and slow on purpose: it is the oracle that the 82599 model and the tests check
against, not something for the packet path. Everything here follows 82599 datasheet
section 7.1.2.8 (Receive-Side Scaling), which in turn follows Microsoft's RSS spec.
"""

import ipaddress

# The key Intel's drivers program by default, and the one the datasheet's verification
# suite is computed with (82599 datasheet 7.1.2.8).
INTEL_DEFAULT_KEY = bytes.fromhex(
    "6d5a56da255b0ec24167253d43a38fb0d0ca2bcbae7b30b477cb2da38030f20c6a42b73bbeac01fa"
)

RSS_KEY_BYTES = 40  # RSSRK[0..9]: ten 32-bit registers (82599 datasheet 7.1.2.8)
RSSRK_REGISTERS = 10
RETA_ENTRIES = 128  # the redirection table is indexed by the hash's 7 LSBs (7.1.2.8)
RETA_INDEX_MASK = RETA_ENTRIES - 1
HASH_BITS = 32
PORT_MAX = 0xFFFF


def toeplitz_hash(key: bytes, data: bytes) -> int:
    """Return the 32-bit Toeplitz hash of `data` under `key` (82599 datasheet 7.1.2.8).

    For every bit of `data` that is 1, taken most significant bit of the first byte first,
    the 32-bit window of the key that starts at the same bit position is XORed into the
    result. The key must therefore be at least 31 bits longer than the data: a 40-byte
    key covers up to 36 bytes of input, enough for IPv6 with ports.

    Raises ValueError if the key is too short for the data.
    """
    key_bits = len(key) * 8
    data_bits = len(data) * 8
    if data_bits and data_bits + HASH_BITS - 1 > key_bits:
        raise ValueError(
            f"a {len(key)}-byte key hashes at most {(key_bits - HASH_BITS + 1) // 8} bytes "
            f"of input, got {len(data)}"
        )
    key_int = int.from_bytes(key, "big")
    data_int = int.from_bytes(data, "big")
    result = 0
    for bit in range(data_bits):
        if data_int >> (data_bits - 1 - bit) & 1:
            # The window covers key bits [bit, bit + 32), counted from the key's MSB.
            result ^= (key_int >> (key_bits - HASH_BITS - bit)) & 0xFFFFFFFF
    return result


def rss_input_ipv4(
    src_ip: str, dst_ip: str, src_port: int | None = None, dst_port: int | None = None
) -> bytes:
    """Build the RSS hash input for an IPv4 packet (82599 datasheet 7.1.2.8).

    Without ports it is the 8-byte L3 input: source address then destination address.
    With ports it is the 12-byte L3+L4 input: both addresses, then source port, then
    destination port. All fields are in network byte order, as they appear on the wire.

    Raises ValueError for a malformed address, a port outside 0..65535, or only one port.
    """
    data = ipaddress.IPv4Address(src_ip).packed + ipaddress.IPv4Address(dst_ip).packed
    if src_port is None and dst_port is None:
        return data
    if src_port is None or dst_port is None:
        raise ValueError("give both ports for an L3+L4 hash input, or neither for L3 only")
    for port in (src_port, dst_port):
        if not 0 <= port <= PORT_MAX:
            raise ValueError(f"port {port} is outside 0..{PORT_MAX}")
    return data + src_port.to_bytes(2, "big") + dst_port.to_bytes(2, "big")


def key_to_rssrk(key: bytes) -> list[int]:
    """Split a 40-byte RSS key into the ten 32-bit RSSRK register values.

    Key byte 4*i + k goes to bits 8k+7:8k of RSSRK[i] (82599 datasheet 7.1.2.8), so each
    register holds four key bytes in little-endian order.

    Raises ValueError if the key is not exactly 40 bytes.
    """
    if len(key) != RSS_KEY_BYTES:
        raise ValueError(f"an RSS key is {RSS_KEY_BYTES} bytes, got {len(key)}")
    return [int.from_bytes(key[4 * i : 4 * i + 4], "little") for i in range(RSSRK_REGISTERS)]


def reta_queue(hash: int, reta_entries: list[int]) -> int:
    """Return the queue the redirection table assigns to an RSS hash.

    The 7 least significant bits of the hash index the 128-entry redirection table
    (82599 datasheet 7.1.2.8); the entry found there is the queue.

    Raises ValueError if the table does not have exactly 128 entries.
    """
    if len(reta_entries) != RETA_ENTRIES:
        raise ValueError(
            f"the redirection table has {RETA_ENTRIES} entries, got {len(reta_entries)}"
        )
    return reta_entries[hash & RETA_INDEX_MASK]
