"""Instance configuration: model wires (`wire`), checked before any device is touched."""

from __future__ import annotations

import pytest

from ixyd.config import ModelWire, build
from ixyd.errors import ConfigError


def config(*ports: dict):
    return build({"instance": "t", "port": list(ports)}, None)


def test_model_ports_default_to_the_traffic_generator_and_vfio_ports_have_no_wire():
    c = config({"address": "lab.0"}, {"address": "0000:03:00.0"})
    assert c.ports[0].wire == ModelWire("traffic")
    assert c.ports[1].wire is None


def test_a_cable_declared_on_one_end_joins_both():
    c = config({"address": "lab.0", "wire": "cable:lab.1"}, {"address": "lab.1"})
    assert [p.wire for p in c.ports] == [
        ModelWire("cable", to="lab.1"),
        ModelWire("cable", to="lab.0"),
    ]
    both = config(
        {"address": "lab.0", "wire": "cable:lab.1"}, {"address": "lab.1", "wire": "cable:lab.0"}
    )
    assert both.ports == c.ports


def test_tap_and_none_wires():
    c = config({"address": "lab.0", "wire": "tap:mdl0"}, {"address": "lab.1", "wire": "none"})
    assert [p.wire.to_text() for p in c.ports] == ["tap:mdl0", "none"]


@pytest.mark.parametrize(
    "ports, words",
    [
        ([{"address": "lab.0", "wire": "cable:lab.2"}], ["port[0].wire", "'lab.2'", "not a model"]),
        ([{"address": "lab.0", "wire": "cable:lab.0"}], ["two ports"]),
        (
            [{"address": "lab.0", "wire": "cable:other.1"}, {"address": "other.1"}],
            ["different model cards"],
        ),
        (
            [{"address": "lab.0", "wire": "cable:lab.1"}, {"address": "lab.1", "wire": "none"}],
            ["lab.1", "'none'", "cable:lab.0"],
        ),
        (
            [{"address": "lab.0", "wire": "tap:x"}, {"address": "lab.1", "wire": "tap:x"}],
            ["named twice"],
        ),
        ([{"address": "lab.0", "wire": "tap:" + "x" * 16}], ["tap:<interface name"]),
        ([{"address": "lab.0", "wire": "generator"}], ['"traffic"', "'generator'"]),
        ([{"address": "lab.0", "wire": 1}], ["port[0].wire must be a string"]),
        ([{"address": "0000:03:00.0", "wire": "none"}], ["only a model port"]),
    ],
)
def test_bad_wires_are_refused_naming_the_key(ports, words):
    with pytest.raises(ConfigError) as refused:
        config(*ports)
    for word in words:
        assert word in str(refused.value)


def test_the_example_file_loads_and_documents_every_key():
    from pathlib import Path

    from ixyd import config as cfg

    example = Path(__file__).parent.parent / "etc" / "ixyd" / "example.toml"
    loaded = cfg.load("example", str(example))
    assert loaded.ports[0].address == "0000:03:00.0" and loaded.ports[0].backend == "vfio"
    text = example.read_text()
    documented = {
        line.lstrip("# ").split("=")[0].strip()
        for line in text.splitlines()
        if "=" in line and not line.startswith("#   ")
    }
    keys = cfg._TOP_KEYS | cfg._PORT_KEYS | cfg._TRAFFIC_KEYS
    missing = sorted(keys - documented - {"port", "model_traffic"})
    assert not missing, f"keys not documented in {example}: {missing}"


def test_fault_injection_is_off_unless_set_to_true():
    assert config({"address": "lab.0"}).fault_injection is False
    on = build({"instance": "t", "fault_injection": True, "port": [{"address": "lab.0"}]}, None)
    assert on.fault_injection is True
    with pytest.raises(ConfigError, match="fault_injection must be true or false, got 'yes'"):
        build({"instance": "t", "fault_injection": "yes", "port": [{"address": "lab.0"}]}, None)
