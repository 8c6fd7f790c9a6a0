"""82576 (igb) facts as data: the registers the driver touches, their bits, and device IDs.

Vendor facts only, no sequencing (that is igb.py). Offsets are the canonical ones of
Linux `e1000_regs.h` and QEMU `hw/net/igb_regs.h` (docs/reference/82576.md#register-map;
the 0x2800/0x3800 queue aliases for queues 0..3 are not used). Bits follow
docs/reference/82576.md#bits-that-differ-from-the-82599, Linux/DPDK `e1000_defines.h` and
`e1000_82575.h`. BAR0, 32-bit words, little-endian.

Where the 82576 differs from the 82599 in a way shared code could trip over, the constant
says so (see also the module docstring of igb.py):

* SRRCTL.DROP_EN is bit 31 (82599: bit 28).
* RX/TX descriptor-control thresholds are 5-bit fields (82599: 7 bits).
* Advanced RX write-back error bits: L4E bit 29, IPE bit 30, RXE bit 31
  (82599: RXE bit 29, L4E bit 30, IPE bit 31).
* Statistics are clear-on-read like the 82599's; the 64-bit pairs are read low, then high
  (QEMU clears both halves when the high half is read, docs/reference/82576.md#statistics).
"""

from __future__ import annotations

from .registers import INTEL_RSS_KEY, DeviceInfo, Layout, Mode, Register, device_ids

RO, RW, WO, RC, RC64 = Mode.RO, Mode.RW, Mode.WO, Mode.RC, Mode.RC64

INTEL_VENDOR_ID = 0x8086

# ---------------------------------------------------------------------------------------
# Queue layouts (docs/reference/82576.md#register-map)
# ---------------------------------------------------------------------------------------
HW_QUEUES = 16  # RX and TX queues of an 82576 port (QEMU emulates all 16)
RX_QUEUE_BASE = 0x0C000  # queue n's RX registers at 0xC000 + 0x40n ...
TX_QUEUE_BASE = 0x0E000  # ... and TX registers at 0xE000 + 0x40n
QUEUE_STRIDE = 0x40
RECEIVE_ADDRESSES = 24  # RAL/RAH 0..15 at 0x5400 + 8n, 16..23 at 0x54E0 + 8(n - 16)
MTA_ENTRIES = 128  # multicast table array, 4096 bits


def rar(register: int) -> Layout:
    """Receive address n: 0x05400 + 8n for n < 16, else 0x054E0 + 8(n - 16)
    (docs/reference/82576.md#register-map)."""
    return lambda n: (0x05400 + 8 * n if n < 16 else 0x054E0 + 8 * (n - 16)) + register


Q, QS, RA, MT = HW_QUEUES, QUEUE_STRIDE, RECEIVE_ADDRESSES, MTA_ENTRIES

# ---------------------------------------------------------------------------------------
# The register table: one line per register, as the datasheet lists them
# ---------------------------------------------------------------------------------------
# fmt: off
REGISTERS: tuple[Register, ...] = (
    #        name        offset                   mode  description                     count stride
    # --- general (82576.md#register-map, #bits-that-differ-from-the-82599)
    Register("CTRL",       0x00000,                 RW,   "Device Control"),
    Register("STATUS",     0x00008,                 RO,   "Device Status"),
    Register("EECD",       0x00010,                 RW,   "EEPROM/Flash Control"),
    Register("EERD",       0x00014,                 RW,   "EEPROM Read"),
    Register("CTRL_EXT",   0x00018,                 RW,   "Extended Device Control"),
    Register("MDIC",       0x00020,                 RW,   "MDI Control (PHY access)"),
    # --- interrupts: ixyd polls, it only masks them (legacy and extended causes)
    Register("ICR",        0x000C0,                 RW,   "Interrupt Cause, read clears"),
    Register("ICS",        0x000C8,                 WO,   "Interrupt Cause Set"),
    Register("IMS",        0x000D0,                 RW,   "Interrupt Mask Set/Read"),
    Register("IMC",        0x000D8,                 WO,   "Interrupt Mask Clear"),
    Register("IAM",        0x000E0,                 RW,   "Interrupt Acknowledge Auto Mask"),
    Register("GPIE",       0x01514,                 RW,   "General Purpose Interrupt Enable"),
    Register("EICS",       0x01520,                 WO,   "Extended Interrupt Cause Set"),
    Register("EIMS",       0x01524,                 RW,   "Extended Interrupt Mask Set/Read"),
    Register("EIMC",       0x01528,                 WO,   "Extended Interrupt Mask Clear"),
    Register("EIAC",       0x0152C,                 RW,   "Extended Interrupt Auto Clear"),
    Register("EIAM",       0x01530,                 RW,   "Extended Interrupt Auto Mask"),
    Register("EICR",       0x01580,                 RW,   "Extended Interrupt Cause, read clears"),
    # --- receive, global
    Register("RCTL",       0x00100,                 RW,   "Receive Control"),
    Register("RXPBS",      0x02404,                 RW,   "Rx Packet Buffer Size, KB"),
    Register("RXCSUM",     0x05000,                 RW,   "Receive Checksum Control"),
    Register("MTA",        0x05200,                 RW,   "Multicast Table Array",        MT, 4),
    Register("RAL",        rar(0x0),                RW,   "Receive Address Low",          RA),
    Register("RAH",        rar(0x4),                RW,   "Receive Address High",         RA),
    Register("MRQC",       0x05818,                 RW,   "Multiple Receive Queues Command"),
    Register("RETA",       0x05C00,                 RW,   "RSS Redirection Table",        32, 4),
    Register("RSSRK",      0x05C80,                 RW,   "RSS Random Key",               10, 4),
    # --- receive, per queue: 0xC000 + 0x40n
    Register("RDBAL",      0x0C000,                 RW,   "Rx Descriptor Base Low",       Q, QS),
    Register("RDBAH",      0x0C004,                 RW,   "Rx Descriptor Base High",      Q, QS),
    Register("RDLEN",      0x0C008,                 RW,   "Rx Descriptor Length, bytes",  Q, QS),
    Register("SRRCTL",     0x0C00C,                 RW,   "Split and Replication Rx Ctl", Q, QS),
    Register("RDH",        0x0C010,                 RW,   "Rx Descriptor Head",           Q, QS),
    Register("RXCTL",      0x0C014,                 RW,   "Rx DCA Control",               Q, QS),
    Register("RDT",        0x0C018,                 RW,   "Rx Descriptor Tail",           Q, QS),
    Register("RXDCTL",     0x0C028,                 RW,   "Rx Descriptor Control",        Q, QS),
    # --- transmit, global
    Register("TCTL",       0x00400,                 RW,   "Transmit Control"),
    Register("TCTL_EXT",   0x00404,                 RW,   "Transmit Control Extended"),
    Register("TIPG",       0x00410,                 RW,   "Transmit Inter-Packet Gap"),
    Register("TXPBS",      0x03404,                 RW,   "Tx Packet Buffer Size, KB"),
    # --- transmit, per queue: 0xE000 + 0x40n
    Register("TDBAL",      0x0E000,                 RW,   "Tx Descriptor Base Low",       Q, QS),
    Register("TDBAH",      0x0E004,                 RW,   "Tx Descriptor Base High",      Q, QS),
    Register("TDLEN",      0x0E008,                 RW,   "Tx Descriptor Length, bytes",  Q, QS),
    Register("TDH",        0x0E010,                 RW,   "Tx Descriptor Head",           Q, QS),
    Register("TXCTL",      0x0E014,                 RW,   "Tx DCA Control",               Q, QS),
    Register("TDT",        0x0E018,                 RW,   "Tx Descriptor Tail",           Q, QS),
    Register("TXDCTL",     0x0E028,                 RW,   "Tx Descriptor Control",        Q, QS),
    Register("TDWBAL",     0x0E038,                 RW,   "Tx Head Write-back Addr Low",  Q, QS),
    Register("TDWBAH",     0x0E03C,                 RW,   "Tx Head Write-back Addr High", Q, QS),
    # --- statistics, clear on read (82576.md#statistics); RC64: low register, then high register.
    # QEMU implements CRCERRS..MPC, RLEC and RNBC as plain registers it never increments;
    # on hardware every one of them clears on read, which is what the driver assumes.
    Register("CRCERRS",    0x04000,                 RC,   "CRC Errors"),
    Register("ALGNERRC",   0x04004,                 RC,   "Alignment Errors"),
    Register("SYMERRS",    0x04008,                 RC,   "Symbol Errors (SerDes)"),
    Register("RXERRC",     0x0400C,                 RC,   "Rx Errors"),
    Register("MPC",        0x04010,                 RC,   "Missed Packets (one counter)"),
    Register("RLEC",       0x04040,                 RC,   "Receive Length Errors"),
    Register("GPRC",       0x04074,                 RC,   "Good Packets Rx"),
    Register("BPRC",       0x04078,                 RC,   "Broadcast Packets Rx"),
    Register("MPRC",       0x0407C,                 RC,   "Multicast Packets Rx"),
    Register("GPTC",       0x04080,                 RC,   "Good Packets Tx"),
    Register("GORC",       0x04088,                 RC64, "Good Octets Rx, with FCS"),
    Register("GOTC",       0x04090,                 RC64, "Good Octets Tx, with FCS"),
    Register("RNBC",       0x040A0,                 RC,   "Rx No Buffers"),
    Register("RUC",        0x040A4,                 RC,   "Receive Undersize"),
    Register("RFC",        0x040A8,                 RC,   "Receive Fragments"),
    Register("ROC",        0x040AC,                 RC,   "Receive Oversize"),
    Register("RJC",        0x040B0,                 RC,   "Receive Jabber"),
    Register("TOR",        0x040C0,                 RC64, "Total Octets Rx, with FCS"),
    Register("TOT",        0x040C8,                 RC64, "Total Octets Tx, with FCS"),
    Register("TPR",        0x040D0,                 RC,   "Total Packets Rx"),
    Register("TPT",        0x040D4,                 RC,   "Total Packets Tx"),
    Register("MPTC",       0x040F0,                 RC,   "Multicast Packets Tx"),
    Register("BPTC",       0x040F4,                 RC,   "Broadcast Packets Tx"),
    Register("RQDPC",      0x0C030,                 RC,   "Rx Queue Drops, no descriptor", Q, QS),
)
# fmt: on

# ---------------------------------------------------------------------------------------
# Bits (docs/reference/82576.md#bits-that-differ-from-the-82599; Linux/DPDK e1000_defines.h,
# e1000_82575.h)
# ---------------------------------------------------------------------------------------
CTRL_GIO_DIS = 1 << 2  # PCIe master disable
CTRL_LRST = 1 << 3  # link reset: set at reset, must be cleared for the link to work
CTRL_SLU = 1 << 6  # set link up (QEMU stores it and ignores it)
CTRL_FRCSPD = 1 << 11  # force speed
CTRL_FRCDPX = 1 << 12  # force duplex
CTRL_RST = 1 << 26  # device reset, self-clearing

STATUS_LU = 1 << 1  # link up
STATUS_SPEED_SHIFT = 6  # bits 7:6
STATUS_SPEED_MASK = 0x3 << STATUS_SPEED_SHIFT
STATUS_SPEED_MBPS = {0: 10, 1: 100, 2: 1000, 3: 1000}
STATUS_GIO = 1 << 19  # GIO master enable: master requests may still be pending

EECD_PRES = 1 << 8  # EEPROM present
EECD_AUTO_RD = 1 << 9  # auto-read of the EEPROM done; QEMU never sets it

# MDIC: one PHY register access per write; the device sets READY when it is done.
MDIC_DATA_MASK = 0xFFFF
MDIC_REG_SHIFT = 16  # bits 20:16
MDIC_PHY_SHIFT = 21  # bits 25:21
MDIC_OP_WRITE = 1 << 26
MDIC_OP_READ = 2 << 26
MDIC_READY = 1 << 28
MDIC_ERROR = 1 << 30
PHY_ADDRESS = 1  # the 82576's internal copper PHY; QEMU answers only address 1

# PHY registers (IEEE 802.3 clause 22)
MII_BMCR = 0  # basic mode control
BMCR_ANRESTART = 1 << 9  # restart autonegotiation, self-clearing
BMCR_PDOWN = 1 << 11  # power down (Linux igb sets it when it lets go of the port)
BMCR_AUTOEN = 1 << 12  # autonegotiation enable

# Interrupt masks: every cause, legacy and extended (82576 EIMC bit 31 is "other cause",
# not reserved as on the 82599).
IMC_ALL = 0xFFFFFFFF
EIMC_ALL = 0xFFFFFFFF

RCTL_EN = 1 << 1
RCTL_UPE = 1 << 3  # unicast promiscuous
RCTL_MPE = 1 << 4  # multicast promiscuous
RCTL_BAM = 1 << 15  # accept broadcast
RCTL_SECRC = 1 << 26  # strip the Ethernet CRC (QEMU otherwise appends 4 zero bytes)

RXCSUM_IPOFL = 1 << 8  # IP checksum offload: sets IPE (bit 30) on a bad header checksum
RXCSUM_TUOFL = 1 << 9  # TCP/UDP checksum offload: sets L4E (bit 29) on a bad checksum
RXCSUM_CRCOFL = 1 << 11  # CRC offload
RXCSUM_PCSD = 1 << 13  # descriptor dword 1 carries the RSS hash; RSS needs it on QEMU
RXCSUM_OFFLOADS = RXCSUM_IPOFL | RXCSUM_TUOFL | RXCSUM_CRCOFL  # reset value has IPOFL|TUOFL

MRQC_ENABLE_RSS = 0x2  # bits 2:0 = 010b: RSS only (0x3 VMDq, 0x5 VMDq + RSS)
MRQC_ENABLE_MASK = 0x7
MRQC_IPV4_TCP = 1 << 16
MRQC_IPV4 = 1 << 17
MRQC_IPV6 = 1 << 20
MRQC_IPV6_TCP = 1 << 21
MRQC_IPV4_UDP = 1 << 22
MRQC_IPV6_UDP = 1 << 23
# RETA: 32 registers of four 1-byte entries, entry e in byte e & 3 of register e >> 2; on
# the 82576 the queue number sits in the low bits of the byte (the 82575 used bits 7:6;
# Linux igb_setup_mrqc). QEMU picks RETA byte[hash & 0x7F] & 0xF.
RETA_ENTRIES = 128
RETA_QUEUE_MASK = 0xF
RSS_MAX_QUEUES = 16
# Intel's default RSS key (DPDK's rss_intel_key, used by its e1000 and ixgbe drivers).
RSS_DEFAULT_KEY = INTEL_RSS_KEY

RAH_AV = 1 << 31  # address valid
RAH_ADDRESS_MASK = 0xFFFF  # MAC bytes 4..5; RAL holds bytes 0..3, byte 0 in bits 7:0

SRRCTL_BSIZEPACKET_MASK = 0x7F  # packet buffer size, 1 KB units
SRRCTL_BSIZEPACKET_2K = 2
SRRCTL_DESCTYPE_MASK = 0x7 << 25
SRRCTL_DESCTYPE_ADV_ONEBUF = 0x1 << 25  # advanced descriptors, one buffer
SRRCTL_DROP_EN = 1 << 31  # 82576 position! (82599: bit 28) Drop, counted in RQDPC

# RXDCTL/TXDCTL thresholds: 5-bit fields at 4:0, 12:8, 20:16 (82599: 7-bit fields).
DCTL_PTHRESH_SHIFT, DCTL_HTHRESH_SHIFT, DCTL_WTHRESH_SHIFT = 0, 8, 16
DCTL_THRESH_MASK = 0x1F
DCTL_THRESH_FIELDS = (
    DCTL_THRESH_MASK << DCTL_PTHRESH_SHIFT
    | DCTL_THRESH_MASK << DCTL_HTHRESH_SHIFT
    | DCTL_THRESH_MASK << DCTL_WTHRESH_SHIFT
)
RXDCTL_ENABLE = 1 << 25  # queue 0 is enabled after reset (RXDCTL0 and TXDCTL0)
TXDCTL_ENABLE = 1 << 25

TCTL_EN = 1 << 1
TCTL_PSP = 1 << 3  # pad short packets
TCTL_CT_SHIFT = 4  # collision threshold, bits 11:4
TCTL_CT = 0xF << TCTL_CT_SHIFT  # Intel's E1000_COLLISION_THRESHOLD
TCTL_COLD_SHIFT = 12  # collision distance, bits 21:12
TCTL_COLD_FULL_DUPLEX = 0x3F << TCTL_COLD_SHIFT
TCTL_EXT_COLD_SHIFT = 10  # collision distance, bits 19:10: where Linux sets it on 82575-class
TCTL_EXT_COLD_MASK = 0x3FF << TCTL_EXT_COLD_SHIFT
COLLISION_DISTANCE = 0x3F  # E1000_COLLISION_DISTANCE, 63 byte times (full duplex)

# Inter-packet gap for copper: IPGT 8, IPGR1 8, IPGR2 7 (Intel's DEFAULT_825XX_TIPG_IPGT_COPPER,
# DEFAULT_82575_TIPG_IPGR1/IPGR2); a guest run verified it with QEMU's igb
# (docs/reference/82576.md#tx-set-up).
TIPG_COPPER = 8 | 8 << 10 | 7 << 20  # 0x00702008

# Advanced RX write-back error bits of the 82576 (docs/reference/82576.md#descriptors); the
# 82599 has RXE at 29.
RXD_ERR_L4E = 1 << 29  # TCP/UDP checksum error, reported only with RXCSUM.TUOFL
RXD_ERR_IPE = 1 << 30  # IPv4 header checksum error, reported only with RXCSUM.IPOFL
RXD_ERR_RXE = 1 << 31  # any MAC error


# ---------------------------------------------------------------------------------------
# Device IDs (Linux e1000_hw.h)
# ---------------------------------------------------------------------------------------
FAMILY_82576 = "82576"  # copper: link through the internal PHY, set up over MDIC
FAMILY_82576_SERDES = "82576 SerDes/fiber"
FAMILY_I350 = "I350"

#: The families whose init sequence this driver implements (82576 datasheet section 4.5).
SUPPORTED_FAMILIES = frozenset({FAMILY_82576})

#: Why a known family is refused, in words a user can act on.
UNSUPPORTED_FAMILY_REASONS = {
    FAMILY_82576_SERDES: (
        "its link runs through the SerDes PCS (PCS_LCTL, CTRL_EXT.LINK_MODE), which this "
        "driver does not program; it brings the link up only through the copper PHY (MDIC)"
    ),
    FAMILY_I350: (
        "the I350 is reset and configured by the 82580 path in Intel's drivers (device reset, "
        "MDICNFG, a different packet-buffer layout, EEE and DMA coalescing, 8 queues instead "
        "of 16); nothing of that is implemented or has been tried on an I350"
    ),
}


def _ids(family: str, entries: dict[int, str]) -> dict[int, DeviceInfo]:
    return device_ids(family, entries, supported=family in SUPPORTED_FAMILIES)


DEVICES: dict[int, DeviceInfo] = {
    **_ids(
        FAMILY_82576,
        {
            0x10C9: "82576 copper (QEMU igb)",
            0x10E8: "82576 quad copper",
            0x1526: "82576 quad copper ET2",
            0x150A: "82576NS copper",
        },
    ),
    **_ids(
        FAMILY_82576_SERDES,
        {
            0x10E6: "82576 fiber",
            0x10E7: "82576 SerDes",
            0x150D: "82576 SerDes quad",
            0x1518: "82576NS SerDes",
        },
    ),
    **_ids(
        FAMILY_I350,
        {
            0x1521: "I350 copper",
            0x1522: "I350 fiber",
            0x1523: "I350 backplane",
            0x1524: "I350 SGMII",
        },
    ),
}

#: SR-IOV virtual functions of the same chips: a different register map (igbvf).
VIRTUAL_FUNCTIONS: dict[int, str] = {
    0x10CA: "82576 VF",
    0x152D: "82576 VF (Hyper-V)",
    0x1520: "I350 VF",
    0x152F: "I350 VF (Hyper-V)",
}
