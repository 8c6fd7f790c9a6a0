"""An Instance in this process (no control socket client): what the service does between
the control methods, the worker and its DMA memory."""

from __future__ import annotations

import logging
import threading

import pytest
from hosttools import wait_until

from ixyd.config import demo_config
from ixyd.control import ErrorCode, RpcError
from ixyd.errors import DeviceRemovedError
from ixyd.service import Instance


@pytest.fixture
def instance(tmp_path):
    config = demo_config(state_dir=str(tmp_path), rate=2000)
    inst = Instance(config, run_dir=str(tmp_path))
    inst.start()
    yield inst
    inst.stop()


def test_a_change_that_waits_too_long_for_another_is_answered_busy(instance):
    with instance._changes:  # a SIGHUP reload holding the instance
        with pytest.raises(RpcError) as busy:
            instance.rpc_set_forward("demo.0", "drop")
        assert busy.value.code == ErrorCode.BUSY
        with pytest.raises(RpcError) as busy:
            instance.rpc_set_promisc("demo.0", False)
        assert busy.value.code == ErrorCode.BUSY
    assert instance.rpc_get_forward("demo.0")["ports"][0]["forward"]["mode"] == "port"
    assert instance.rpc_set_forward("demo.0", "drop")["forward"] == {"mode": "drop"}


def test_switching_in_and_out_of_generate_reuses_one_pool(instance):
    nic = instance._model_nics["demo"]
    instance.rpc_set_forward("demo.0", "generate", size=64, rate=1000)
    mapped = nic.mapping_count
    for size in (60, 128, 1514, 60, 512):
        instance.rpc_set_forward("demo.0", "drop")
        instance.rpc_set_forward("demo.0", "generate", size=size, rate=1000)
        instance.rpc_set_forward("demo.0", "generate", size=size, rate=2000)
    assert nic.mapping_count == mapped
    port = instance.ports[0]
    assert len({g.pool for g in port.generators}) == 1
    assert port.generators[-1].pointer.size == 512


def test_a_port_whose_nic_is_removed_is_reported_and_the_other_carries_on(instance, caplog):
    """Surprise removal of one port's NIC (it reads all-ones): every read method still
    answers for the whole instance, the removed port says so and keeps its last NIC
    counters, the other port keeps counting, and the error is logged once, not every
    second."""

    def counting():  # read by the run loop every second; here by hand
        return all(p["counters"]["rx_good_packets"] for p in instance.rpc_stats()["ports"])

    wait_until(counting, what="both ports counting")
    with pytest.raises(RpcError) as refused:
        instance.rpc_inject_fault("remove")
    assert refused.value.code == ErrorCode.INVALID_PARAMS
    assert instance.rpc_inject_fault("remove", port="demo.1") == {
        "fault": "remove",
        "port": "demo.1",
    }
    with caplog.at_level(logging.ERROR, logger="ixyd"):
        for _ in range(3):
            instance.sample_rates()
            status = instance.status_text()
    assert status.endswith("demo.1 removed") and status.startswith("demo.0 link up")
    assert instance.rpc_status()["removed_ports"] == ["demo.1"]
    ports = {p["name"]: p for p in instance.rpc_ports()["ports"]}
    assert ports["demo.0"]["present"] and "removed" not in ports["demo.0"]
    assert ports["demo.1"]["present"] is False and "0xFFFFFFFF" in ports["demo.1"]["removed"]
    assert ports["demo.1"]["link"] == {"up": False, "speed_mbps": 0}
    link = {p["name"]: p for p in instance.rpc_link()["ports"]}
    assert link["demo.1"] == {"name": "demo.1", "up": False, "speed_mbps": 0, "present": False}

    def nic_counters(name):
        (entry,) = instance.rpc_stats(name)["ports"]
        return entry["present"], entry["counters"]["rx_good_packets"], entry["counters"]

    present, frozen, _ = nic_counters("demo.1")
    assert not present and frozen > 0  # what the NIC had counted when last read
    _, before, counters = nic_counters("demo.0")
    wait_until(lambda: nic_counters("demo.0")[1] > before, what="demo.0 counting on")
    assert nic_counters("demo.1")[1] == frozen
    with pytest.raises(DeviceRemovedError):
        instance.rpc_set_promisc("demo.1", True)
    assert instance.rpc_set_forward("demo.1", "drop")["forward"] == {"mode": "drop"}
    assert instance.rpc_reset_stats() == {"ports": ["demo.0", "demo.1"]}
    logged = [r for r in caplog.records if "keeps its last counters" in r.getMessage()]
    assert len(logged) == 1 and "demo.1" in logged[0].getMessage()


def test_a_worker_whose_loop_ends_stops_the_instance_as_a_failure(instance, caplog):
    """Only stop() ends workers; a loop that ends by itself leaves a port without polling.
    run() gives up with `failure` set (main() then exits 1, and systemd's
    RestartForceExitStatus=1 restarts the instance) instead of running on with a dead port."""
    done = threading.Event()
    runner = threading.Thread(target=lambda: (instance.run(), done.set()), daemon=True)
    runner.start()
    assert not done.wait(1.5)  # healthy: run() keeps going
    instance.workers[1].stop()
    assert done.wait(10), "run() did not notice the ended worker"
    assert instance.failure == f"worker {instance.workers[1].name} ended"
    assert any("stopping the instance, to be restarted" in r.getMessage() for r in caplog.records)
