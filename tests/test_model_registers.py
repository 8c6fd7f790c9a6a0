"""The 82599 model's register file, reset and link behaviour, judged by the datasheet facts."""

import time

import pytest
from ringdriver import AUTOC, CTRL, EEC, EICR, LINKS, LRST, RDRXCTL, RST, RingPort, reset, wait_for

from ixyd.model import ModelNic

GPRC, GPTC, GORCL, GORCH, GOTCL, GOTCH, MPC0 = (
    0x4074,
    0x4080,
    0x4088,
    0x408C,
    0x4090,
    0x4094,
    0x3FA0,
)
EIMS, EIMC, EICS = 0x880, 0x888, 0x808


@pytest.fixture
def nic():
    card = ModelNic(2, mode="step", reset_delay=0.005, eeprom_delay=0.005, link_delay=0.02)
    yield card
    card.close()


def test_reset_values_match_the_datasheet_facts(nic):
    a, b = nic.ports
    assert a.read32(0x2100) & 0x1F == 2  # SRRCTL(0).BSIZEPACKET = 2 KB
    assert a.read32(0x1014) == a.read32(0x2100)  # ... also at its 0x1014 address
    assert a.read32(0x2200) & (1 << 12)  # DCA_RXCTRL bit 12 resets to 1
    assert a.read32(0x5404) & (1 << 31)  # RAH0.AV: the EEPROM MAC is preloaded
    mac = a.read32(0x5400).to_bytes(4, "little") + (a.read32(0x5404) & 0xFFFF).to_bytes(2, "little")
    assert mac == a.mac and a.mac != b.mac
    assert a.read32(0xA200) == a.read32(0x5400)  # RAL(0..15) alias the 128-entry block
    assert a.read32(0x8) >> 2 & 3 == 0 and b.read32(0x8) >> 2 & 3 == 1  # STATUS.LAN_ID


def test_ctrl_rst_self_clears_after_the_reset_delay(nic):
    a = nic.ports[0]
    a.write32(0x5080, 0x700)
    a.write32(CTRL, RST | LRST)
    started = time.monotonic()
    assert a.read32(CTRL) & RST
    assert not a.read32(EEC) & 0x200  # EEPROM auto-read is not done during reset
    assert not a.read32(RDRXCTL) & 0x8
    wait_for(lambda: not a.read32(CTRL) & RST, what="RST to clear")
    assert time.monotonic() - started >= 0.004
    wait_for(lambda: a.read32(EEC) & 0x200, what="ARD")
    assert a.read32(RDRXCTL) & 0x8
    assert a.read32(0x5080) == 0  # FCTRL back to its reset value


def test_writes_during_reset_are_ignored_and_reported(nic):
    a = nic.ports[0]
    a.write32(CTRL, RST)
    a.write32(0x5080, 0x400)
    assert a.violations and "in reset" in a.violations[0]
    wait_for(lambda: not a.read32(CTRL) & RST)
    assert a.read32(0x5080) == 0


def test_an_restart_brings_links_up_at_10g_only_with_a_wire(nic):
    a, b = nic.ports
    for port in (a, b):
        reset(port)
        port.write32(AUTOC, (3 << 13) | 0x1000)
    assert not a.read32(AUTOC) & 0x1000  # AN_RESTART is a trigger bit
    time.sleep(0.05)
    assert a.read32(LINKS) & (1 << 30) == 0, "no cable: no link"
    nic.connect(a, b)
    assert a.read32(LINKS) == 0xF0000000 and b.read32(LINKS) == 0xF0000000  # UP | 10G | AN done
    nic.unplug(a)
    assert a.read32(LINKS) & (1 << 30) == 0 and b.read32(LINKS) & (1 << 30) == 0


def test_link_waits_for_the_delay_and_sets_lsc(nic):
    a, b = nic.ports
    nic.connect(a, b)
    for port in (a, b):
        reset(port)
        port.read32(EICR)
        port.write32(AUTOC, 0x1000)
    assert not a.read32(LINKS) & (1 << 30)
    wait_for(lambda: a.read32(LINKS) & (1 << 30), what="link up")
    assert a.read32(EICR) & (1 << 20)  # LSC
    assert a.read32(EICR) == 0  # EICR clears on read


def test_reset_takes_the_link_down_until_autonegotiation_restarts(nic):
    a, b = nic.ports
    nic.connect(a, b)
    RingPort(a), RingPort(b)
    wait_for(lambda: a.read32(LINKS) & (1 << 30), what="link up")
    reset(a)
    assert not a.read32(LINKS) & (1 << 30) and not b.read32(LINKS) & (1 << 30)


def test_link_fault_hook_takes_the_link_down_and_up_now(nic):
    a, b = nic.ports
    nic.connect(a, b)
    RingPort(a), RingPort(b)
    wait_for(lambda: a.read32(LINKS) & (1 << 30), what="link up")
    a.set_link(False)
    assert not a.read32(LINKS) & (1 << 30) and not b.read32(LINKS) & (1 << 30)
    a.set_link(True)
    assert a.read32(LINKS) & (1 << 30)


def test_interrupt_mask_set_and_clear_semantics(nic):
    a = nic.ports[0]
    a.write32(EIMS, 0x00000005)
    a.write32(EIMS, 0x00000100)
    assert a.read32(EIMS) == 0x105  # EIMS writes set bits
    a.write32(EIMS, 0)  # writing 0 changes nothing (ixy's no-op)
    assert a.read32(EIMS) == 0x105
    a.write32(EIMC, 0x00000004)
    assert a.read32(EIMS) == 0x101  # EIMC clears the bits written as 1
    assert a.read32(EIMC) == 0  # write-only
    a.write32(EICS, 0x3)  # software-set causes
    a.write32(EICR, 0x1)  # write 1 to clear
    assert a.read32(EICR) == 0x2


def test_statistics_clear_on_read_and_count_what_moved(nic):
    a, b = nic.ports
    nic.connect(a, b)
    A, _ = RingPort(a), RingPort(b)
    wait_for(lambda: a.link_up and b.link_up, what="link up")
    for reg in (GPRC, GPTC, GORCL, GORCH, GOTCL, GOTCH):
        a.read32(reg), b.read32(reg)
    frame = b.mac + bytes(6) + b"\x88\xb5" + bytes(100)  # 114 bytes without FCS
    for _ in range(5):
        A.send(frame)
    nic.step()
    assert a.read32(GPTC) == 5 and a.read32(GPTC) == 0
    assert (a.read32(GOTCL), a.read32(GOTCH)) == (5 * 118, 0)  # octets include the FCS
    assert b.read32(GPRC) == 5 and b.read32(GPRC) == 0
    assert b.read32(GORCL) == 5 * 118 and b.read32(GORCH) == 0
    assert b.read32(0x1030) == 5  # QPRC(0)
    assert (
        a.read32(0x6030) == 5 and a.read32(0x8680) == 0
    )  # QPTC(0), read once through either address
    a.write32(GPTC, 1234)  # statistics are read-only
    assert a.read32(GPTC) == 0


def test_surprise_removal_reads_all_ones_everywhere(nic):
    a, b = nic.ports
    nic.connect(a, b)
    RingPort(a), RingPort(b)
    a.surprise_remove()
    for offset in (CTRL, 0x8, LINKS, GPRC, 0x10010, 0x1FFFC):
        assert a.read32(offset) == 0xFFFFFFFF
    assert a.regs[0x42A4 // 4] == 0xFFFFFFFF  # also through the raw mapping native code uses
    a.write32(0x5080, 0)
    assert a.read32(0x5080) == 0xFFFFFFFF
    assert not b.link_up


def test_bad_register_access_is_a_clear_error_not_a_crash(nic):
    a = nic.ports[0]
    for offset in (2, 0x20000, -4):
        with pytest.raises(ValueError, match="aligned 32-bit"):
            a.read32(offset)
    with pytest.raises(ValueError, match="32-bit"):
        a.write32(0, 1 << 32)


def test_filter_change_while_rx_enabled_is_reported(nic):
    a = nic.ports[0]
    RingPort(a)
    assert a.violations == []
    a.write32(0x5080, 0x400)
    assert any("FCTRL" in v for v in a.violations)


def test_tx_queue_enabled_before_te_is_reported(nic):
    a = nic.ports[0]
    reset(a)
    ring = a.dma.alloc(1024)
    a.write32(0x6000, ring.iova & 0xFFFFFFFF)
    a.write32(0x6008, 1024)
    a.write32(0x6028, 1 << 25)
    assert any("DMATXCTL.TE" in v for v in a.violations)
