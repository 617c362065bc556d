import pytest

from lizard_jax.config import ConfigError, ModelConfig, apply_overrides, load_yaml
from lizard_jax.layers.softmax import SoftmaxSpec
from lizard_jax.testing import tiny_config


def test_round_trip_json(tmp_path):
    cfg = tiny_config(attention=[{"kind": "softmax", "window": 8}, "softmax"])
    assert cfg.attention == (SoftmaxSpec(window=8), SoftmaxSpec())
    cfg.to_json(tmp_path / "c.json")
    assert ModelConfig.from_json(tmp_path / "c.json") == cfg


def test_single_spec_repeats_and_lengths_checked():
    assert tiny_config(attention="softmax").kinds == ("softmax", "softmax")
    with pytest.raises(ConfigError, match="3 entries for num_layers=2"):
        tiny_config(attention=["softmax"] * 3)


def test_unknown_keys_and_kinds_rejected():
    data = tiny_config().to_dict()
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['colour'\]"):
        ModelConfig.from_dict({**data, "colour": "red"})
    with pytest.raises(ConfigError, match="unknown attention kind 'mamba'"):
        tiny_config(attention="mamba")
    with pytest.raises(ConfigError, match=r"softmax\].*unknown key\(s\) \['windw'\]"):
        tiny_config(attention={"kind": "softmax", "windw": 3})
    with pytest.raises(ConfigError, match="rope.*unknown"):
        ModelConfig.from_dict({**data, "rope": {"theta": 1.0, "kind": "x"}})


def test_bad_values_rejected():
    with pytest.raises(ConfigError, match="multiple of num_kv_heads"):
        tiny_config(num_heads=4, num_kv_heads=3)
    with pytest.raises(ConfigError, match="expected int"):
        ModelConfig.from_dict({**tiny_config().to_dict(), "d_model": "64"})
    with pytest.raises(ConfigError, match="window"):
        SoftmaxSpec(window=0)
    with pytest.raises(ConfigError, match="dtype"):
        tiny_config(dtype="float8")


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("a: 1\nb:\n  c: x\n")
    d = apply_overrides(load_yaml(p), ["b.c=y", "b.d=[1, 2]", "e=null"])
    assert d == {"a": 1, "b": {"c": "y", "d": [1, 2]}, "e": None}
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["nonsense"])
    with pytest.raises(FileNotFoundError):
        load_yaml(tmp_path / "missing.yaml")
