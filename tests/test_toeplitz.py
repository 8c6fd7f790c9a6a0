"""The reference Toeplitz hash against Intel's RSS verification suite (82599 datasheet
7.1.2.8; the same vectors DPDK's test_thash uses)."""

import pytest

from ixyd.toeplitz import (
    INTEL_DEFAULT_KEY,
    key_to_rssrk,
    reta_queue,
    rss_input_ipv4,
    toeplitz_hash,
)

# (src ip, src port, dst ip, dst port, L3 hash, L3+L4 hash)
INTEL_VERIFICATION_VECTORS = [
    ("66.9.149.187", 2794, "161.142.100.80", 1766, 0x323E8FC2, 0x51CCC178),
    ("199.92.111.2", 14230, "65.69.140.83", 4739, 0xD718262A, 0xC626B0EA),
    ("24.19.198.95", 12898, "12.22.207.184", 38024, 0xD2D0A5DE, 0x5C2B394A),
    ("38.27.205.30", 48228, "209.142.163.6", 2217, 0x82989176, 0xAFC7327F),
    ("153.39.163.191", 44251, "202.188.127.2", 1303, 0x5D1809C5, 0x10E828A2),
]
VECTOR_IDS = [f"{v[0]}:{v[1]}->{v[2]}:{v[3]}" for v in INTEL_VERIFICATION_VECTORS]


@pytest.mark.parametrize(
    "src_ip, src_port, dst_ip, dst_port, l3_hash, l4_hash",
    INTEL_VERIFICATION_VECTORS,
    ids=VECTOR_IDS,
)
def test_ipv4_l3_hash_matches_intel_verification_suite(
    src_ip, src_port, dst_ip, dst_port, l3_hash, l4_hash
):
    data = rss_input_ipv4(src_ip, dst_ip)
    assert len(data) == 8
    assert toeplitz_hash(INTEL_DEFAULT_KEY, data) == l3_hash


@pytest.mark.parametrize(
    "src_ip, src_port, dst_ip, dst_port, l3_hash, l4_hash",
    INTEL_VERIFICATION_VECTORS,
    ids=VECTOR_IDS,
)
def test_ipv4_l4_hash_matches_intel_verification_suite(
    src_ip, src_port, dst_ip, dst_port, l3_hash, l4_hash
):
    data = rss_input_ipv4(src_ip, dst_ip, src_port, dst_port)
    assert len(data) == 12
    assert toeplitz_hash(INTEL_DEFAULT_KEY, data) == l4_hash


def test_default_key_splits_into_little_endian_rssrk_registers():
    assert key_to_rssrk(INTEL_DEFAULT_KEY) == [
        0xDA565A6D,
        0xC20E5B25,
        0x3D256741,
        0xB08FA343,
        0xCB2BCAD0,
        0xB4307BAE,
        0xA32DCB77,
        0x0CF23080,
        0x3BB7426A,
        0xFA01ACBE,
    ]


def test_hash_input_is_addresses_then_ports_in_network_order():
    data = rss_input_ipv4("1.2.3.4", "5.6.7.8", 0x1122, 0x3344)
    assert data == bytes([1, 2, 3, 4, 5, 6, 7, 8, 0x11, 0x22, 0x33, 0x44])


def test_reta_queue_indexes_table_by_seven_low_hash_bits():
    reta = [i % 16 for i in range(128)]
    assert reta_queue(0x51CCC178, reta) == reta[0x78]
    assert reta_queue(0xFFFFFF80, reta) == reta[0]


def test_reta_queue_rejects_table_that_is_not_128_entries():
    with pytest.raises(ValueError, match="128 entries"):
        reta_queue(0, [0] * 64)


def test_rss_input_rejects_a_single_port():
    with pytest.raises(ValueError, match="both ports"):
        rss_input_ipv4("1.2.3.4", "5.6.7.8", 80)


def test_rss_input_rejects_port_out_of_range():
    with pytest.raises(ValueError, match="outside"):
        rss_input_ipv4("1.2.3.4", "5.6.7.8", 80, 65536)


def test_hash_rejects_input_longer_than_key_covers():
    with pytest.raises(ValueError, match="at most 36 bytes"):
        toeplitz_hash(INTEL_DEFAULT_KEY, bytes(37))


def test_key_to_rssrk_rejects_short_key():
    with pytest.raises(ValueError, match="40 bytes"):
        key_to_rssrk(INTEL_DEFAULT_KEY[:16])
