"""82599 (ixgbe) facts as data: the registers the driver touches, their bits, and device IDs.

Vendor facts only, no sequencing (that is ixgbe.py). Offsets and bits follow
docs/reference/82599.md, which cites Intel's shared code (`ixgbe_type.h` in Linux and DPDK)
and ixy; marks such as (#general-registers) name headings of that page. Nothing the driver
relies on is among the facts it marks unverified (reset values, AN_RESTART self-clearing, ...):
every field the driver needs is written explicitly. BAR0, 32-bit words, little-endian.
"""

from __future__ import annotations

from .registers import INTEL_RSS_KEY, DeviceInfo, Layout, Mode, Register, device_ids

RO, RW, WO, RC, RC64 = Mode.RO, Mode.RW, Mode.WO, Mode.RC, Mode.RC64

INTEL_VENDOR_ID = 0x8086

# ---------------------------------------------------------------------------------------
# Queue layouts (#rx-queue-registers, #tx-queue-registers)
# ---------------------------------------------------------------------------------------
HW_QUEUES = 128  # RX and TX queues of an 82599 port
STAT_COUNTERS = 16  # QPRC/QPTC/QBRC/QBTC/QPRDC sets, selected per queue by RQSMR/TQSM


def rxq(register: int) -> Layout:
    """RX queue n's copy of a per-queue register: 0x01000 + 0x40n below 64, 0x0D000 above."""
    return lambda n: (0x01000 + 0x40 * n if n < 64 else 0x0D000 + 0x40 * (n - 64)) + register


def rxq_alias(alias: int, register: int) -> Layout:
    """SRRCTL / DCA_RXCTRL: queues 0..15 use the compact alias at `alias` + 4n
    (#rx-queue-registers)."""
    block = rxq(register)
    return lambda n: alias + 4 * n if n < 16 else block(n)


def rar(register: int) -> Layout:
    """Receive address n: 0x05400 + 8n for n <= 15 (aliases), else 0x0A200 + 8n (#mac-address)."""
    return lambda n: (0x05400 if n < 16 else 0x0A200) + 8 * n + register


Q, S = HW_QUEUES, STAT_COUNTERS

# ---------------------------------------------------------------------------------------
# The register table: one line per register, as the datasheet lists them
# ---------------------------------------------------------------------------------------
# fmt: off
REGISTERS: tuple[Register, ...] = (
    #        name        offset                   mode  description                     count stride
    # --- general (#general-registers)
    Register("CTRL",       0x00000,                 RW,   "Device Control"),
    Register("STATUS",     0x00008,                 RO,   "Device Status"),
    Register("CTRL_EXT",   0x00018,                 RW,   "Extended Device Control"),
    Register("EEC",        0x10010,                 RW,   "EEPROM/Flash Control"),
    # --- interrupts (#interrupts): ixyd polls, it only masks them
    Register("EICR",       0x00800,                 RW,   "Interrupt Cause, read clears"),
    Register("EIMC",       0x00888,                 WO,   "Interrupt Mask Clear"),
    # --- link (#link)
    Register("AUTOC",      0x042A0,                 RW,   "Auto-Negotiation Control"),
    Register("LINKS",      0x042A4,                 RO,   "Link Status"),
    Register("AUTOC2",     0x042A8,                 RW,   "Auto-Negotiation Control 2"),
    # --- receive, global (#general-registers, #mac-address, #rss)
    Register("RDRXCTL",    0x02F00,                 RW,   "Receive DMA Control"),
    Register("RXCTRL",     0x03000,                 RW,   "Receive Control"),
    Register("RXPBSIZE",   0x03C00,                 RW,   "Rx Packet Buffer Size",        8, 4),
    Register("HLREG0",     0x04240,                 RW,   "MAC Core Control 0"),
    Register("RXCSUM",     0x05000,                 RW,   "Receive Checksum Control"),
    Register("FCTRL",      0x05080,                 RW,   "Filter Control"),
    Register("MRQC",       0x05818,                 RW,   "Multiple Rx Queues Command"),
    Register("RETA",       0x05C00,                 RW,   "RSS Redirection Table",        32, 4),
    Register("RSSRK",      0x05C80,                 RW,   "RSS Random Key",               10, 4),
    Register("RAL",        rar(0x0),                RW,   "Receive Address Low",          128),
    Register("RAH",        rar(0x4),                RW,   "Receive Address High",         128),
    Register("RQSMR",      0x02300,                 RW,   "Rx Queue Statistic Mapping",   32, 4),
    # --- receive, per queue (#rx-queue-registers)
    Register("RDBAL",      rxq(0x00),               RW,   "Rx Descriptor Base Low",       Q),
    Register("RDBAH",      rxq(0x04),               RW,   "Rx Descriptor Base High",      Q),
    Register("RDLEN",      rxq(0x08),               RW,   "Rx Descriptor Length, bytes",  Q),
    Register("DCA_RXCTRL", rxq_alias(0x2200, 0xC),  RW,   "Rx DCA Control",               Q),
    Register("RDH",        rxq(0x10),               RW,   "Rx Descriptor Head",           Q),
    Register("SRRCTL",     rxq_alias(0x2100, 0x14), RW,   "Split Receive Control",        Q),
    Register("RDT",        rxq(0x18),               RW,   "Rx Descriptor Tail",           Q),
    Register("RXDCTL",     rxq(0x28),               RW,   "Rx Descriptor Control",        Q),
    # --- transmit, global (#general-registers)
    Register("RTTDCS",     0x04900,                 RW,   "Tx Descriptor Plane Control"),
    Register("DMATXCTL",   0x04A80,                 RW,   "DMA Tx Control"),
    Register("DTXMXSZRQ",  0x08100,                 RW,   "DMA Tx Max Size Requests"),
    Register("MTQC",       0x08120,                 RW,   "Multiple Tx Queues Command"),
    Register("TQSM",       0x08600,                 RW,   "Tx Queue Statistic Mapping",   32, 4),
    Register("TXPBSIZE",   0x0CC00,                 RW,   "Tx Packet Buffer Size",        8, 4),
    # --- transmit, per queue (#tx-queue-registers)
    Register("TDBAL",      0x06000,                 RW,   "Tx Descriptor Base Low",       Q, 0x40),
    Register("TDBAH",      0x06004,                 RW,   "Tx Descriptor Base High",      Q, 0x40),
    Register("TDLEN",      0x06008,                 RW,   "Tx Descriptor Length, bytes",  Q, 0x40),
    Register("TDH",        0x06010,                 RW,   "Tx Descriptor Head",           Q, 0x40),
    Register("TDT",        0x06018,                 RW,   "Tx Descriptor Tail",           Q, 0x40),
    Register("TXDCTL",     0x06028,                 RW,   "Tx Descriptor Control",        Q, 0x40),
    # --- statistics, clear on read (#statistics); RC64: low register, then high register
    Register("CRCERRS",    0x04000,                 RC,   "CRC Errors"),
    Register("ILLERRC",    0x04004,                 RC,   "Illegal Byte Errors"),
    Register("ERRBC",      0x04008,                 RC,   "Error Bytes"),
    Register("MSPDC",      0x04010,                 RC,   "MAC Short Packet Discards"),
    Register("MLFC",       0x04034,                 RC,   "MAC Local Faults"),
    Register("MRFC",       0x04038,                 RC,   "MAC Remote Faults"),
    Register("RLEC",       0x04040,                 RC,   "Receive Length Errors"),
    Register("GPRC",       0x04074,                 RC,   "Good Packets Rx (+ missed)"),
    Register("BPRC",       0x04078,                 RC,   "Broadcast Packets Rx"),
    Register("MPRC",       0x0407C,                 RC,   "Multicast Packets Rx"),
    Register("GPTC",       0x04080,                 RC,   "Good Packets Tx"),
    Register("GORC",       0x04088,                 RC64, "Good Octets Rx, with FCS"),
    Register("GOTC",       0x04090,                 RC64, "Good Octets Tx, with FCS"),
    Register("RUC",        0x040A4,                 RC,   "Receive Undersize"),
    Register("RFC",        0x040A8,                 RC,   "Receive Fragments"),
    Register("ROC",        0x040AC,                 RC,   "Receive Oversize"),
    Register("RJC",        0x040B0,                 RC,   "Receive Jabber"),
    Register("TOR",        0x040C0,                 RC64, "Total Octets Rx, with FCS"),
    Register("TPR",        0x040D0,                 RC,   "Total Packets Rx"),
    Register("TPT",        0x040D4,                 RC,   "Total Packets Tx"),
    Register("MPTC",       0x040F0,                 RC,   "Multicast Packets Tx"),
    Register("BPTC",       0x040F4,                 RC,   "Broadcast Packets Tx"),
    Register("MPC",        0x03FA0,                 RC,   "Missed Packets, per buffer",   8, 4),
    Register("QPRC",       0x01030,                 RC,   "Queue Packets Rx",             S, 0x40),
    Register("QBRC",       0x01034,                 RC64, "Queue Bytes Rx",               S, 0x40),
    Register("QPRDC",      0x01430,                 RC,   "Queue Rx Drops, no desc.",     S, 0x40),
    Register("QPTC",       0x06030,                 RC,   "Queue Packets Tx",             S, 0x40),
    Register("QBTC",       0x08700,                 RC64, "Queue Bytes Tx",               S, 8),
)
# fmt: on

# ---------------------------------------------------------------------------------------
# Bits (#general-registers .. #rss)
# ---------------------------------------------------------------------------------------
CTRL_GIO_DIS = 1 << 2  # PCIe master disable
CTRL_LRST = 1 << 3  # link reset, self-clearing
CTRL_RST = 1 << 26  # device reset, self-clearing
CTRL_RST_MASK = CTRL_LRST | CTRL_RST  # ixy's global reset writes both

STATUS_GIO = 1 << 19  # GIO master enable status: master requests may still be pending

CTRL_EXT_NS_DIS = 1 << 16  # no-snoop disable (last step of datasheet 4.6.7)

EEC_ARD = 1 << 9  # EEPROM auto-read done

EIMC_ALL = 0x7FFFFFFF  # bit 31 is reserved (ixy.rs #29)

RDRXCTL_CRCSTRIP = 1 << 1  # must agree with HLREG0.RXCRCSTRP
RDRXCTL_DMAIDONE = 1 << 3  # DMA init done after reset
RDRXCTL_RSCFRSTSIZE = 0x1F << 17  # must be written 0 (default 0x8; ixy.rs #29)
RDRXCTL_RSCACKC = 1 << 25  # must be written 1 (ixy.rs #29, Linux ixgbe_setup_rdrxctl)
RDRXCTL_FCOE_WRFIX = 1 << 26  # must be written 1 (ditto)

RXCTRL_RXEN = 1 << 0

PBSIZE_KB_SHIFT = 10  # RXPBSIZE/TXPBSIZE hold kilobytes in bits 19:10
RXPB_TOTAL_KB = 512  # the 82599 RX packet buffer: 512 KB in all
TXPB_TOTAL_KB = 160  # the 82599 TX packet buffer: 160 KB in all

HLREG0_TXCRCEN = 1 << 0  # append FCS on transmit
HLREG0_RXCRCSTRP = 1 << 1  # strip FCS on receive
HLREG0_TXPADEN = 1 << 10  # pad short frames to 64 bytes

RXCSUM_PCSD = 1 << 13  # descriptor dword 1 carries the RSS hash, not checksum/IP ID

FCTRL_MPE = 1 << 8  # accept all multicast
FCTRL_UPE = 1 << 9  # accept all unicast
FCTRL_BAM = 1 << 10  # accept broadcast

MRQC_MRQE_RSS = 0x1  # MRQE (3:0) = 0001: RSS only, no DCB or VMDq
MRQC_IPV4_TCP = 1 << 16
MRQC_IPV4 = 1 << 17
MRQC_IPV6 = 1 << 20
MRQC_IPV6_TCP = 1 << 21
MRQC_IPV4_UDP = 1 << 22
MRQC_IPV6_UDP = 1 << 23
RETA_ENTRIES = 128  # 32 registers of four 1-byte entries; queue index in bits 3:0
RETA_QUEUE_MASK = 0xF
RSS_MAX_QUEUES = 16
# Intel's default RSS key (datasheet 7.1.2.8.3; DPDK uses it when none is given).
RSS_DEFAULT_KEY = INTEL_RSS_KEY

RAH_AV = 1 << 31  # address valid
RAH_ADDRESS_MASK = 0xFFFF  # MAC bytes 4..5; RAL holds bytes 0..3, byte 0 in bits 7:0
QSM_FIELD_MASK = 0xF  # RQSMR/TQSM: stat counter of queue 4i+k in bits 8k+3:8k

SRRCTL_BSIZEPACKET_MASK = 0x1F  # packet buffer size, 1 KB units
SRRCTL_BSIZEPACKET_2K = 2
SRRCTL_DESCTYPE_MASK = 0x7 << 25
SRRCTL_DESCTYPE_ADV_ONEBUF = 0x1 << 25  # advanced descriptors, one buffer
SRRCTL_DROP_EN = 1 << 28  # drop (and count in QPRDC) when the queue has no descriptor

DCA_RXCTRL_RESERVED_12 = 1 << 12  # resets to 1, must be written 0 (datasheet 4.6.7, ixy)

RXDCTL_ENABLE = 1 << 25
RXDCTL_SWFLSH = 1 << 26

RTTDCS_ARBDIS = 1 << 6  # TX descriptor arbiter off while MTQC changes
MTQC_64Q_1PB = 0x0  # 64 TX queues, one packet buffer: no DCB, no VMDq

DTXMXSZRQ_MAX = 0xFFF  # bits 11:0; 15:12 are reserved (ixy.rs #29; ixy wrote 0xFFFF)

DMATXCTL_TE = 1 << 0

TXDCTL_PTHRESH_SHIFT, TXDCTL_HTHRESH_SHIFT, TXDCTL_WTHRESH_SHIFT = 0, 8, 16
TXDCTL_THRESH_MASK = 0x7F  # each threshold is 7 bits (ixy 0e00605 fixed a 0x3F mask)
TXDCTL_ENABLE = 1 << 25
TXDCTL_SWFLSH = 1 << 26

AUTOC_10G_PMA_PMD_MASK = 0x3 << 7
AUTOC_10G_XAUI = 0x0 << 7
AUTOC_AN_RESTART = 1 << 12
AUTOC_LMS_MASK = 0x7 << 13
AUTOC_LMS_10G_SERIAL = 0x3 << 13
AUTOC2_LINK_DISABLE_MASK = 0x7 << 28  # the NVM may disable the link; Intel clears these

LINKS_UP = 1 << 30
LINKS_SPEED_MASK = 0x3 << 28
LINKS_SPEED_MBPS = {0x1 << 28: 100, 0x2 << 28: 1000, 0x3 << 28: 10000}


# ---------------------------------------------------------------------------------------
# Device IDs (#device-basics; Intel's ixgbe_type.h)
# ---------------------------------------------------------------------------------------
FAMILY_82599 = "82599"  # includes the X520 adapters, which are 82599 boards
FAMILY_X540 = "X540"
FAMILY_X550 = "X550"
FAMILY_X550EM_X = "X550EM_x"
FAMILY_X550EM_A = "X550EM_a"

#: The families whose init sequence this driver implements (datasheet 331520 section 4.6).
SUPPORTED_FAMILIES = frozenset({FAMILY_82599})

#: Why a known family is refused, in words a user can act on.
UNSUPPORTED_FAMILY_REASONS = {
    FAMILY_X540: "its copper PHY is set up through firmware/MDIO, not the 82599 AUTOC sequence",
    FAMILY_X550: "its PHY and link setup differ from the 82599 AUTOC sequence",
    FAMILY_X550EM_X: "its PHY and link setup differ from the 82599 AUTOC sequence",
    FAMILY_X550EM_A: "its EEC and several control registers live at other offsets (EEC at 0x15FF8)",
}


def _ids(family: str, entries: dict[int, str]) -> dict[int, DeviceInfo]:
    return device_ids(family, entries, supported=family in SUPPORTED_FAMILIES)


DEVICES: dict[int, DeviceInfo] = {
    **_ids(
        FAMILY_82599,
        {
            0x10F7: "82599 KX4 backplane",
            0x10F8: "82599 combo backplane",
            0x10F9: "82599 CX4",
            0x10FB: "82599ES SFP+ (X520-DA2, X520-SR2, ...)",
            0x10FC: "82599 XAUI LOM",
            0x1507: "82599 SFP+ Express Module (X520-P2)",
            0x1514: "82599 KX4 mezzanine",
            0x1517: "82599 KR backplane",
            0x151C: "82599 10GBASE-T3 LOM",
            0x1529: "82599 SFP+ with FCoE",
            0x152A: "82599 backplane with FCoE",
            0x154A: "82599 SFP+ quad port (X520-4)",
            0x154D: "82599 SFP+ (Ethernet 10G 2P X520 Adapter)",
            0x1557: "82599EN SFP+ (X520-1)",
            0x1558: "82599 QSFP+ (X520-Q1)",
        },
    ),
    **_ids(FAMILY_X540, {0x1528: "X540-AT2", 0x1560: "X540-AT1"}),
    **_ids(FAMILY_X550, {0x1563: "X550-T2", 0x15D1: "X550-T1"}),
    **_ids(
        FAMILY_X550EM_X,
        {
            0x15AA: "X550EM_x KX4",
            0x15AB: "X550EM_x KR",
            0x15AC: "X550EM_x SFP+",
            0x15AD: "X550EM_x 10GBASE-T",
            0x15AE: "X550EM_x 1GBASE-T",
            0x15B0: "X550EM_x XFI",
        },
    ),
    **_ids(
        FAMILY_X550EM_A,
        {
            0x15C2: "X550EM_a KR",
            0x15C3: "X550EM_a KR_L",
            0x15C4: "X550EM_a SFP_N",
            0x15C6: "X550EM_a SGMII",
            0x15C7: "X550EM_a SGMII_L",
            0x15C8: "X550EM_a 10GBASE-T",
            0x15CE: "X550EM_a SFP+",
            0x15E4: "X550EM_a 1GBASE-T",
            0x15E5: "X550EM_a 1GBASE-T_L",
        },
    ),
}

#: SR-IOV virtual functions of the same chips: a different register map (ixgbevf).
VIRTUAL_FUNCTIONS: dict[int, str] = {
    0x10ED: "82599 VF",
    0x152E: "82599 VF (Hyper-V)",
    0x1515: "X540 VF",
    0x1530: "X540 VF (Hyper-V)",
    0x1565: "X550 VF",
    0x1564: "X550 VF (Hyper-V)",
    0x15A8: "X550EM_x VF",
    0x15A9: "X550EM_x VF (Hyper-V)",
    0x15C5: "X550EM_a VF",
    0x15B4: "X550EM_a VF (Hyper-V)",
}
