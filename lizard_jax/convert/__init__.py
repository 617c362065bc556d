"""Teachers -> lizard_jax checkpoints: `python -m lizard_jax.convert SRC --out DIR [--dtype bfloat16]`.

SRC is a Hugging Face model folder (safetensors or torch .bin + config.json) or a `.gguf` file (dequantized by
transformers); from Python, `convert_model(hf_model, out)` takes an in-memory transformers model.
"""

from __future__ import annotations

from pathlib import Path

from lizard_jax import checkpoint
from lizard_jax.convert.hf import (
    SUPPORTED,
    ConversionError,
    config_from_hf,
    from_hf_model,
    load_hf,
    params_from_state_dict,
    shipped_smollm2,
)

__all__ = ["convert", "convert_model", "from_hf_model", "config_from_hf", "params_from_state_dict",
           "load_hf", "ConversionError", "SUPPORTED", "shipped_smollm2"]


def convert_model(model, out: str | Path, *, tokenizer=None, dtype: str = "float32", overwrite: bool = False):
    """An in-memory transformers model (+ optional tokenizer) -> checkpoint folder `out`. Returns the config.

    `dtype` is the stored parameter dtype; the config's compute dtype is set to it too (bf16 params compute in
    bf16 unless loaded with `load(..., dtype=...)`).
    """
    cfg, params = from_hf_model(model, dtype=dtype)
    checkpoint.save(out, cfg, params, tokenizer, overwrite=overwrite)
    return cfg


def convert(src: str | Path, out: str | Path, *, dtype: str = "float32", overwrite: bool = False):
    """A HF folder or .gguf file -> checkpoint folder `out`. Returns the config."""
    model, tokenizer = load_hf(src)
    return convert_model(model, out, tokenizer=tokenizer, dtype=dtype, overwrite=overwrite)
