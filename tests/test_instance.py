"""An Instance in this process (no control socket client): what the service does between
the control methods, the worker and its DMA memory."""

from __future__ import annotations

import pytest

from ixyd.config import demo_config
from ixyd.control import ErrorCode, RpcError
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
