"""The 82599 register file as the model sees it: offsets, reset values, aliases, semantics.

These are the model's own declarations, taken from docs/reference/82599.md (which cites
Intel's shared code, DPDK and Linux); marks such as (#general-registers) name headings of
that page. They are deliberately not imported from the driver: a wrong offset in one would
otherwise be confirmed by the other. Values marked
UNVERIFIED in docs/model.md come from sources other than the datasheet.
"""

from __future__ import annotations

BAR0_SIZE = 0x20000  # decodes everything Intel's code touches (EEC 0x10010, EITR 0x12300, ...)

# --- general (#general-registers) ---
CTRL = 0x00000
CTRL_GIO_DIS = 1 << 2
CTRL_LRST = 1 << 3
CTRL_RST = 1 << 26
STATUS = 0x00008
STATUS_LAN_ID_SHIFT = 2
STATUS_GIO = 1 << 19
CTRL_EXT = 0x00018
EEC = 0x10010
EEC_PRES = 1 << 8
EEC_ARD = 1 << 9
RDRXCTL = 0x02F00
RDRXCTL_DMAIDONE = 1 << 3
RDRXCTL_RSCFRSTSIZE_RESET = 0x8 << 17
RXCTRL = 0x03000
RXCTRL_RXEN = 1 << 0
RXPBSIZE0 = 0x03C00
TXPBSIZE0 = 0x0CC00
HLREG0 = 0x04240
MAXFRS = 0x04268
FCTRL = 0x05080
DMATXCTL = 0x04A80
DMATXCTL_TE = 1 << 0

# --- interrupts (#interrupts) ---
EICR = 0x00800
EICS = 0x00808
EIMS = 0x00880
EIMC = 0x00888

# --- link (#link) ---
AUTOC = 0x042A0
AUTOC_AN_RESTART = 1 << 12
LINKS = 0x042A4
LINKS_UP = 1 << 30
LINKS_SPEED_10G = 0x3 << 28
LINKS_KX_AN_COMP = 1 << 31

# --- MAC address (#mac-address): canonical block at 0xA200, entries 0..15 aliased at 0x5400 ---
RAL_CANONICAL = 0x0A200
RAL_ALIAS = 0x05400
RAH_AV = 1 << 31
RAR_ENTRIES = 128

# --- per-queue blocks (#rx-queue-registers, #tx-queue-registers) ---
QUEUES = 128
STAT_COUNTERS = 16


def rx_block(queue: int) -> int:
    return 0x01000 + 0x40 * queue if queue < 64 else 0x0D000 + 0x40 * (queue - 64)


def tx_block(queue: int) -> int:
    return 0x06000 + 0x40 * queue


RDBAL, RDBAH, RDLEN, DCA_RXCTRL, RDH, SRRCTL, RDT, RXDCTL = (
    0x00,
    0x04,
    0x08,
    0x0C,
    0x10,
    0x14,
    0x18,
    0x28,
)
TDBAL, TDBAH, TDLEN, TDH, TDT, TXDCTL, TDWBAL, TDWBAH = (
    0x00,
    0x04,
    0x08,
    0x10,
    0x18,
    0x28,
    0x38,
    0x3C,
)
QUEUE_ENABLE = 1 << 25
QUEUE_SWFLSH = 1 << 26
SRRCTL_RESET = 0x00000402  # BSIZEPACKET 2 KB, BSIZEHEADER 256 B (UNVERIFIED, #srrctl)
DCA_RXCTRL_RESET = 1 << 12  # reserved bit that resets to 1 (ixy, datasheet 4.6.7)
SRRCTL_LEGACY = 0x02100  # SRRCTL(0..15) alias
DCA_RXCTRL_LEGACY = 0x02200  # DCA_RXCTRL(0..15) alias

# --- statistics (#statistics): clear on read ---
RC32 = {
    "CRCERRS": 0x04000,
    "ILLERRC": 0x04004,
    "ERRBC": 0x04008,
    "MSPDC": 0x04010,
    "MLFC": 0x04034,
    "MRFC": 0x04038,
    "RLEC": 0x04040,
    "GPRC": 0x04074,
    "BPRC": 0x04078,
    "MPRC": 0x0407C,
    "GPTC": 0x04080,
    "RUC": 0x040A4,
    "RFC": 0x040A8,
    "ROC": 0x040AC,
    "RJC": 0x040B0,
    "TPR": 0x040D0,
    "TPT": 0x040D4,
    "MPTC": 0x040F0,
    "BPTC": 0x040F4,
}
for _n in range(8):
    RC32[f"MPC{_n}"] = 0x03FA0 + 4 * _n
for _n in range(STAT_COUNTERS):
    RC32[f"QPRC{_n}"] = 0x01030 + 0x40 * _n
    RC32[f"QPRDC{_n}"] = 0x01430 + 0x40 * _n
    RC32[f"QPTC{_n}"] = 0x06030 + 0x40 * _n
QPTC_ALIAS = 0x08680  # 82599 address of QPTC(n) (UNVERIFIED): decoded as an alias

# 64-bit counters as (low, high) register pairs and the engine's stat64 index
# (engine.h MODEL_STAT64_*). Reading the low half snapshots and clears the whole counter;
# the high half then returns the snapshot's upper bits (read low first, #statistics).
RC64 = {"GORC": (0x04088, 0x0408C, 0), "GOTC": (0x04090, 0x04094, 1), "TOR": (0x040C0, 0x040C4, 2)}
for _n in range(STAT_COUNTERS):
    RC64[f"QBRC{_n}"] = (0x01034 + 0x40 * _n, 0x01038 + 0x40 * _n, 3 + _n)
    RC64[f"QBTC{_n}"] = (0x08700 + 8 * _n, 0x08704 + 8 * _n, 19 + _n)


def canonical(offset: int) -> int:
    """Map an aliased register address to the one address the model stores it at."""
    if SRRCTL_LEGACY <= offset < SRRCTL_LEGACY + 4 * 16:
        return rx_block((offset - SRRCTL_LEGACY) // 4) + SRRCTL
    if DCA_RXCTRL_LEGACY <= offset < DCA_RXCTRL_LEGACY + 4 * 16:
        return rx_block((offset - DCA_RXCTRL_LEGACY) // 4) + DCA_RXCTRL
    if RAL_ALIAS <= offset < RAL_ALIAS + 8 * 16:
        return RAL_CANONICAL + (offset - RAL_ALIAS)
    if QPTC_ALIAS <= offset < QPTC_ALIAS + 4 * STAT_COUNTERS:
        return RC32[f"QPTC{(offset - QPTC_ALIAS) // 4}"]
    return offset


def mac_to_rar(mac: bytes) -> tuple[int, int]:
    """RAL/RAH values for a MAC: byte 0 in RAL bits 7:0, bytes 4..5 in RAH 15:0 (#mac-address)."""
    return int.from_bytes(mac[:4], "little"), int.from_bytes(mac[4:6], "little") | RAH_AV


def reset_image(mac: bytes) -> list[int]:
    """Register values after a software reset (CTRL.RST), as 32-bit words."""
    words = [0] * (BAR0_SIZE // 4)

    def put(offset: int, value: int) -> None:
        words[offset // 4] = value

    put(EEC, EEC_PRES)
    put(RDRXCTL, RDRXCTL_RSCFRSTSIZE_RESET)
    put(RXPBSIZE0, 0x80000)  # 512 KB (UNVERIFIED)
    put(TXPBSIZE0, 0x28000)  # 160 KB (UNVERIFIED)
    put(MAXFRS, 1518 << 16)
    ral, rah = mac_to_rar(mac)
    put(RAL_CANONICAL, ral)
    put(RAL_CANONICAL + 4, rah)
    for queue in range(QUEUES):
        put(rx_block(queue) + SRRCTL, SRRCTL_RESET)
        put(rx_block(queue) + DCA_RXCTRL, DCA_RXCTRL_RESET)
    return words
