"""The model's wires: the sequence-numbered traffic generator/checker and the TAP wire."""

import fcntl
import os
import struct
import subprocess
import sys
import time
import uuid

import pytest
from ringdriver import TX_CMD, RingPort, tx, wait_for

from ixyd.model import ModelNic


@pytest.fixture
def nic():
    card = ModelNic(1, mode="step", reset_delay=0.0005, eeprom_delay=0.0005, link_delay=0.002)
    yield card
    card.close()


def reflector(nic, **kwargs):
    """Port 0 faces a traffic endpoint; the ring driver sends back what it receives."""
    port = nic.ports[0]
    endpoint = nic.attach_traffic(port)
    ring = RingPort(port, rx_size=256, tx_size=256, **kwargs)
    wait_for(lambda: port.link_up, what="link up")
    endpoint.pair(endpoint)
    return endpoint, ring


def pump(nic, ring, steps=50, mangle=None):
    """Run the engine and reflect every received frame, letting `mangle` edit the list."""
    for _ in range(steps):
        nic.step()
        frames = [got[0] for got in iter(ring.poll, None)]
        if mangle:
            frames = mangle(frames)
        for frame in frames:
            ring.send(frame, tail=False)
        ring.dev.write32(tx(0, 0x18), ring.tx_tail)
    nic.step()


def test_generator_sends_the_announced_sequence_numbered_frames(nic):
    endpoint, ring = reflector(nic)
    endpoint.configure(size=128, flows=3, count=9)
    endpoint.start()
    nic.step()
    received = [got[0] for got in iter(ring.poll, None)]
    assert received == [endpoint.frame(i % 3, i // 3) for i in range(9)]
    assert len(received[0]) == 128 and endpoint.stats["sent"] == 9
    nic.step()
    assert endpoint.stats["sent"] == 9  # count reached: the generator stops


def test_checker_sees_a_clean_reflection(nic):
    endpoint, ring = reflector(nic)
    endpoint.configure(size=60, flows=8, count=2000, burst=32)
    endpoint.start()
    pump(nic, ring, steps=100)
    stats = endpoint.stats
    assert stats["sent"] == stats["unique"] == stats["valid"] == 2000
    assert (
        stats["duplicates"]
        == stats["reordered"]
        == stats["corrupt"]
        == stats["foreign"]
        == stats["gaps"]
        == 0
    )


def test_checker_reports_loss_duplicates_reordering_and_corruption(nic):
    endpoint, ring = reflector(nic)
    endpoint.configure(size=100, flows=1, count=20, burst=20)
    endpoint.start()

    def mangle(frames):
        if len(frames) < 20:
            return frames
        frames = list(frames)
        del frames[3]  # lose seq 3
        frames.insert(5, frames[5])  # duplicate seq 6
        frames[8], frames[9] = frames[9], frames[8]  # swap seq 9 and 10
        bad = bytearray(frames[12])
        bad[80] ^= 0x40  # corrupt one payload bit of seq 13
        frames[12] = bytes(bad)
        mac_edit = bytearray(frames[13])
        mac_edit[1] += 1  # a forwarder touching the MAC is not corruption
        frames[13] = bytes(mac_edit)
        return frames + [b"\xff" * 6 + bytes(54)]  # and one foreign frame

    pump(nic, ring, steps=3, mangle=mangle)
    stats = endpoint.stats
    assert stats["duplicates"] == 1 and stats["corrupt"] == 1 and stats["foreign"] == 1
    assert stats["reordered"] == 1
    assert stats["unique"] == 18  # 20 - lost - corrupt
    assert stats["sent"] - stats["unique"] == 2


def test_window_limits_frames_in_flight(nic):
    endpoint, ring = reflector(nic)
    endpoint.configure(size=60, count=0, burst=64, window=10)
    endpoint.start()
    for _ in range(5):
        nic.step()
    assert endpoint.stats["sent"] == 10  # nothing comes back, so no more than the window
    pump(nic, ring, steps=3)
    assert endpoint.stats["sent"] > 10


def test_generator_rate_is_paced_in_thread_mode():
    with ModelNic(
        1, mode="thread", reset_delay=0.0005, eeprom_delay=0.0005, link_delay=0.002
    ) as card:
        port = card.ports[0]
        endpoint = card.attach_traffic(port)
        RingPort(port, rx_size=64)
        wait_for(lambda: port.link_up, what="link up")
        rate, burst = 20_000, 32
        endpoint.configure(rate=rate, burst=burst)
        started = time.monotonic()
        endpoint.start()
        # the engine thread may be starved on a loaded machine, so wait for progress
        # rather than sleeping a fixed time; pacing means never faster than the rate
        wait_for(lambda: endpoint.stats["sent"] >= 4000, timeout=30, what="4000 frames")
        endpoint.stop()
        elapsed = time.monotonic() - started
        sent = endpoint.stats["sent"]
        assert sent <= rate * elapsed + burst + 1, (sent, elapsed)
        assert elapsed >= 4000 / rate * 0.9  # 0.2 s at the least
        assert port.counters["rx_no_descriptor"] > 0  # nobody drains the ring: DROP_EN drops


def test_unplugging_a_traffic_wire_invalidates_its_endpoint(nic):
    endpoint, ring = reflector(nic)
    nic.unplug(nic.ports[0])
    assert not nic.ports[0].link_up
    with pytest.raises(RuntimeError, match="unplugged"):
        endpoint.start()


# ---------------------------------------------------------------- TAP

TUNSETIFF, IFF_TAP, IFF_NO_PI = 0x400454CA, 0x0002, 0x1000


@pytest.fixture
def tap_in_netns():
    if not os.path.exists("/dev/net/tun") or os.geteuid() != 0:
        pytest.skip("needs root and /dev/net/tun")
    netns = f"ixydt-{uuid.uuid4().hex[:6]}"
    name = f"ixt{uuid.uuid4().hex[:8]}"
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
    subprocess.run(["ip", "netns", "add", netns], check=True)
    try:
        subprocess.run(["ip", "link", "set", name, "netns", netns], check=True)
        run = ["ip", "netns", "exec", netns]
        subprocess.run(
            run + ["ip", "link", "set", name, "address", "02:00:00:00:aa:01", "up"], check=True
        )
        subprocess.run(run + ["ip", "addr", "add", "10.213.0.1/24", "dev", name], check=True)
        yield fd, netns, name
    finally:
        os.close(fd)
        subprocess.run(["ip", "netns", "del", netns], check=False)


def test_tap_wire_carries_real_kernel_traffic_both_ways(nic, tap_in_netns):
    fd, netns, name = tap_in_netns
    port = nic.ports[0]
    nic.attach_tap(port, fd)
    ring = RingPort(port)
    wait_for(lambda: port.link_up, what="link up")
    # kernel -> model: an ARP request for a neighbour on the tap's subnet
    send_udp = (
        "import socket; "
        "socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('10.213.0.2', 9))"
    )
    subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", send_udp], check=True)
    arp = None
    for _ in range(200):
        nic.step()
        for frame, _wb in iter(ring.poll, None):
            if frame[12:14] == b"\x08\x06" and frame[38:42] == bytes([10, 213, 0, 2]):
                arp = frame
        if arp:
            break
        time.sleep(0.005)
    assert arp is not None, "no ARP request from the kernel reached the RX ring"
    # model -> kernel: answer it; the kernel must learn the neighbour from the reply
    mac = b"\x02\x00\x00\x00\xbb\x02"
    reply = (
        arp[6:12]
        + mac
        + b"\x08\x06"
        + bytes([0, 1, 8, 0, 6, 4, 0, 2])
        + mac
        + bytes([10, 213, 0, 2])
        + arp[6:12]
        + bytes([10, 213, 0, 1])
    )
    ring.send(reply + bytes(60 - len(reply)), cmd=TX_CMD)
    nic.step()
    neigh = ""
    for _ in range(100):
        neigh = subprocess.run(
            ["ip", "netns", "exec", netns, "ip", "neigh", "show", "10.213.0.2"],
            capture_output=True,
            text=True,
        ).stdout
        if "02:00:00:00:bb:02" in neigh:
            break
        time.sleep(0.01)
    assert "02:00:00:00:bb:02" in neigh
