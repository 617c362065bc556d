"""Frozen configuration objects, loaded from dicts / YAML / JSON with unknown keys rejected.

`ModelConfig` describes a decoder: its shape, RoPE, dtypes and the per-layer attention schedule. The schedule is
a tuple of attention *specs*, one per layer; each attention family defines its spec dataclass beside its Flax
layer (`lizard_jax/layers/<family>.py`) and registers it with `register_attention`, so adding a family never
touches the model. The registry is filled when `lizard_jax.layers` is imported, which `lizard_jax/__init__.py`
does first, so it is full whenever any `lizard_jax` module is (this module imports no layer: layers sit above
it). One `ModelConfig` travels with every checkpoint as `config.json`.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, Mapping

import yaml

from lizard_jax.cli import InputError


class ConfigError(InputError):
    """A configuration that cannot be built: unknown key, bad value, wrong type."""


def _check_keys(cls, data: Mapping[str, Any], where: str) -> None:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(names)}")


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Turn YAML/JSON values into the annotated type (lists -> tuples, nested dataclasses)."""
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} fits none of {annotation}: {errors}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(annotation)
        item = args[0] if args else Any
        return tuple(_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is typing.Literal:
        if value not in typing.get_args(annotation):
            raise ConfigError(f"{where}: {value!r} is not one of {typing.get_args(annotation)}")
        return value
    if dataclasses.is_dataclass(annotation):
        return value if isinstance(value, annotation) else from_dict(annotation, value, where)
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        hint = " (YAML reads 1e-3 as a string; write 1.0e-3)" if isinstance(value, str) and _is_float(value) else ""
        raise ConfigError(f"{where}: expected a number, got {value!r}{hint}")
    if annotation in (int, str, bool):
        if not isinstance(value, annotation) or (annotation is int and isinstance(value, bool)):
            raise ConfigError(f"{where}: expected {annotation.__name__}, got {value!r}")
        return value
    return value


def _is_float(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def from_dict(cls, data: Mapping[str, Any], where: str | None = None):
    """Build dataclass `cls` from `data`, rejecting unknown keys and coercing values to field types."""
    where = where or cls.__name__
    _check_keys(cls, data, where)
    hints = typing.get_type_hints(cls)
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # a missing required field
        raise ConfigError(f"{where}: {e}") from None
    except ConfigError as e:  # a range check: say which section it is in
        if str(e).startswith(where):
            raise
        raise ConfigError(f"{where}: {e}") from None


def to_dict(obj) -> dict[str, Any]:
    """Plain JSON-able dict of a config dataclass (tuples become lists, specs carry their kind)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        out[f.name] = _plain(getattr(obj, f.name))
    return out


def _plain(v):
    if isinstance(v, AttentionSpec):
        return {"kind": v.kind, **to_dict(v)}
    if dataclasses.is_dataclass(v):
        return to_dict(v)
    if isinstance(v, (tuple, list)):
        return [_plain(x) for x in v]
    return v


# ----------------------------------------------------------------------------------------------------------
# Attention specs: one frozen dataclass per family, registered by the family's layer file.


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """Base of every attention family's options. Subclasses set `kind` and add their own fields."""

    kind: ClassVar[str] = ""


_SPECS: dict[str, type[AttentionSpec]] = {}


def register_attention(cls: type[AttentionSpec]) -> type[AttentionSpec]:
    if not cls.kind:
        raise TypeError(f"{cls.__name__} must set a non-empty `kind`")
    if cls.kind in _SPECS and _SPECS[cls.kind] is not cls:
        raise TypeError(f"attention kind {cls.kind!r} registered twice")
    _SPECS[cls.kind] = cls
    return cls


def attention_kinds() -> tuple[str, ...]:
    return tuple(sorted(_SPECS))


def spec_from_any(value: Any, where: str = "attention") -> AttentionSpec:
    """A spec from a spec, a kind name (`"softmax"`) or a dict (`{"kind": "lizard", "window": 64}`)."""
    if isinstance(value, AttentionSpec):
        return value
    if isinstance(value, str):
        value = {"kind": value}
    if not isinstance(value, Mapping) or "kind" not in value:
        raise ConfigError(f"{where}: expected a kind name or a mapping with 'kind', got {value!r}")
    kind = value["kind"]
    if kind not in _SPECS:
        raise ConfigError(f"{where}: unknown attention kind {kind!r}; known: {sorted(_SPECS)}")
    return from_dict(_SPECS[kind], {k: v for k, v in value.items() if k != "kind"}, f"{where}[{kind}]")


# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding. `scaling`: "none", "linear" (positions / factor) or "llama3" (Llama 3.1 bands)."""

    theta: float = 10000.0
    scaling: typing.Literal["none", "linear", "llama3"] = "none"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192

    def __post_init__(self):
        if self.theta <= 0:
            raise ConfigError(f"RopeConfig.theta must be > 0, got {self.theta}")
        if self.scaling != "none" and self.factor <= 0:
            raise ConfigError(f"RopeConfig.factor must be > 0, got {self.factor}")
        if self.scaling == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            raise ConfigError("RopeConfig: llama3 scaling needs high_freq_factor > low_freq_factor")


_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A Llama-family decoder (Llama, Mistral, Qwen2, SmolLM) with a per-layer attention schedule.

    `attention` holds one spec per layer; a single spec (or kind name) in YAML is repeated for every layer.
    `dtype` is the compute dtype, `param_dtype` the storage dtype of parameters.
    """

    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_dim: int
    rms_eps: float = 1e-5
    rope: RopeConfig = RopeConfig()
    tie_embeddings: bool = False
    qkv_bias: bool = False
    max_seq_len: int = 8192
    attention: tuple[Any, ...] = ()
    dtype: str = "float32"
    param_dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0
    architecture: str = "llama"

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "ffn_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"ModelConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"ModelConfig: num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"ModelConfig.head_dim must be even for RoPE, got {self.head_dim}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ConfigError(f"ModelConfig.{name}={getattr(self, name)!r} not in {_DTYPES}")
        att = self.attention
        if isinstance(att, (str, Mapping, AttentionSpec)):
            att = (att,)
        att = tuple(spec_from_any(a, f"attention[{i}]") for i, a in enumerate(att or ("softmax",)))
        if len(att) == 1:
            att = att * self.num_layers
        if len(att) != self.num_layers:
            raise ConfigError(
                f"ModelConfig.attention has {len(att)} entries for num_layers={self.num_layers}"
            )
        object.__setattr__(self, "attention", att)

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(s.kind for s in self.attention)

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    # --- (de)serialisation
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelConfig":
        return from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"model config not found: {path}")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        return from_dict(cls, data, str(path))


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"config {path} is a folder; expected a YAML file")
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides (value parsed as YAML) to a nested dict; unknown paths are errors later."""
    data = json.loads(json.dumps(data))  # deep copy of plain data
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r}: {p!r} is not a section")
        try:
            node[parts[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not valid YAML: {e}") from None
    return data
