"""lizard_jax checkpoints -> Hugging Face transformers folders (the way back of `lizard_jax.convert`).

    python -m lizard_jax.export CKPT_DIR --out HF_DIR [--dtype bfloat16] [--teacher DIR (CKPT_DIR an adapter)]

Writes config.json (LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM with the checkpoint's RoPE scaling
and sliding windows), model.safetensors (split with an index above `max_shard_bytes`) and the tokenizer files
when the checkpoint has a tokenizer, so `AutoModelForCausalLM.from_pretrained(HF_DIR)` gives the same logits.
Tensor names and layouts come from the table conversion reads too (`convert.hf.tensor_table`).

Only teacher-type checkpoints export: every layer softmax attention with RoPE, windows only where the
architecture has them (Mistral, Qwen2). A student with linear / Lizard / sparse layers has no transformers
equivalent; it is refused with the layers that block it (share it as an adapter instead: lizard_jax.adapter).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from lizard_jax import checkpoint, cli
from lizard_jax.config import ModelConfig
from lizard_jax.convert.hf import SUPPORTED, config_from_hf, tensor_table

ARCH_CLASS = {v: k for k, v in SUPPORTED.items()}  # "llama" -> "LlamaForCausalLM"
DTYPES = ("float32", "bfloat16", "float16")


class ExportError(cli.InputError):
    """A checkpoint transformers cannot represent (non-softmax layers, windows the architecture lacks...)."""


def check_exportable(cfg: ModelConfig) -> None:
    """Raise ExportError saying why `cfg` has no transformers equivalent."""
    if cfg.architecture not in ARCH_CLASS:
        raise ExportError(f"architecture {cfg.architecture!r} has no transformers class; exportable: "
                          f"{sorted(ARCH_CLASS)}")
    other = {i: k for i, k in enumerate(cfg.kinds) if k != "softmax"}
    if other:
        kinds = sorted(set(other.values()))
        raise ExportError(
            f"not a teacher-type checkpoint: layer(s) {sorted(other)[:8]}{' ...' if len(other) > 8 else ''} use "
            f"{kinds} attention, which transformers' {ARCH_CLASS[cfg.architecture]} does not have (it has softmax "
            "attention only), so the exported model could not compute these layers. Share a student as an adapter "
            "(python -m lizard_jax.adapter extract STUDENT --teacher TEACHER --out ADAPTER) instead.")
    if not all(s.rope for s in cfg.attention):
        raise ExportError("layers without RoPE (softmax rope: false) have no transformers equivalent")
    windows = {s.window for s in cfg.attention}
    if windows != {None} and cfg.architecture == "llama":
        raise ExportError(f"sliding-window layers (windows {sorted(w for w in windows if w)}) do not exist in "
                          "transformers' Llama; a Mistral or Qwen2 checkpoint can have them")
    if len(windows - {None}) > 1:
        raise ExportError(f"several window sizes {sorted(w for w in windows if w)}: transformers has one per model")
    if cfg.architecture == "mistral" and len(windows) > 1:
        raise ExportError("Mistral windows every layer or none; this checkpoint mixes windowed and full layers")
    if cfg.qkv_bias and cfg.architecture == "mistral":
        raise ExportError("q/k/v biases do not exist in transformers' Mistral")


def hf_config(cfg: ModelConfig, dtype: str):
    """The transformers config object of a teacher-type `cfg` (its reading back is checked against `cfg`)."""
    import transformers

    check_exportable(cfg)
    rope = cfg.rope
    scaling = {
        "none": None,
        "linear": {"rope_type": "linear", "factor": rope.factor},
        "llama3": {"rope_type": "llama3", "factor": rope.factor, "low_freq_factor": rope.low_freq_factor,
                   "high_freq_factor": rope.high_freq_factor,
                   "original_max_position_embeddings": rope.original_max_position},
    }[rope.scaling]
    eos = list(cfg.eos_token_ids)
    kw = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_eps, max_position_embeddings=cfg.max_seq_len,
        tie_word_embeddings=cfg.tie_embeddings, rope_theta=rope.theta, rope_scaling=scaling,
        bos_token_id=cfg.bos_token_id, eos_token_id=(eos[0] if len(eos) == 1 else eos) if eos else None,
        pad_token_id=cfg.pad_token_id, architectures=[ARCH_CLASS[cfg.architecture]],
    )
    # transformers 5 names the stored dtype `dtype`, 4.x `torch_dtype`
    kw["dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"] = dtype
    window = next((s.window for s in cfg.attention if s.window), None)
    if cfg.architecture == "llama":
        kw["attention_bias"] = cfg.qkv_bias
        cls = transformers.LlamaConfig
    elif cfg.architecture == "mistral":
        kw["sliding_window"] = window
        cls = transformers.MistralConfig
    else:
        kw.update(use_sliding_window=window is not None, sliding_window=window,
                  layer_types=["sliding_attention" if s.window else "full_attention" for s in cfg.attention])
        cls = transformers.Qwen2Config
    hf = cls(**kw)
    back = config_from_hf(hf, ARCH_CLASS[cfg.architecture])
    fields = ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "ffn_dim", "rms_eps",
              "rope", "tie_embeddings", "max_seq_len", "attention")
    diff = [f for f in fields if getattr(back, f) != getattr(cfg, f)]
    if cfg.architecture != "qwen2" and back.qkv_bias != cfg.qkv_bias:  # Qwen2 always has (possibly zero) biases
        diff.append("qkv_bias")
    if diff:  # e.g. a transformers version without per-layer `layer_types`
        raise ExportError(f"transformers {transformers.__version__} cannot express this config: {diff} differ "
                          "when the exported config.json is read back")
    return hf


def state_dict(cfg: ModelConfig, params, dtype: str) -> dict[str, np.ndarray]:
    """{HF tensor name: array in `dtype`} of lizard_jax `params` (zeros for the tensors lizard_jax has not)."""
    import jax
    import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)

    out = {}
    for t in tensor_table(cfg):
        if t.layout == "zero":
            out[t.hf_name] = np.zeros(t.shape, np.dtype(dtype))
            continue
        x = params
        for k in t.path:
            x = x[k]
        out[t.hf_name] = t.to_hf(cfg, np.asarray(jax.device_get(x)).astype(np.dtype(dtype)))
    return out


def _write_safetensors(folder: Path, tensors: dict[str, np.ndarray], max_shard_bytes: int) -> None:
    from safetensors.numpy import save_file

    shards, size = [{}], 0
    for name, a in tensors.items():
        if shards[-1] and size + a.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = a
        size += a.nbytes
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
    index = {"metadata": {"total_size": sum(a.nbytes for a in tensors.values())}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def export(ckpt_dir: str | Path, out_dir: str | Path, *, dtype: str | None = None, teacher: str | Path | None = None,
           overwrite: bool = False, max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write checkpoint (or adapter + `teacher`) `ckpt_dir` as a transformers folder `out_dir` (atomically).
    `dtype`: tensor dtype (default: the checkpoint's parameter dtype)."""
    import lizard_jax
    from lizard_jax import adapter

    ckpt_dir = Path(ckpt_dir)
    is_adapter = checkpoint.read_format(ckpt_dir)["format"] == checkpoint.ADAPTER_FORMAT
    cfg = adapter.read_info(ckpt_dir)[0] if is_adapter else checkpoint.read_config(ckpt_dir)
    dtype = dtype or cfg.param_dtype
    if dtype not in DTYPES:
        raise cli.InputError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    hf_cfg = hf_config(cfg, dtype)  # refuses a student before any weight is read
    _, params, tok = lizard_jax.load(ckpt_dir, teacher=teacher)
    tensors = state_dict(cfg, params, dtype)

    def fill(tmp: Path):
        hf_cfg.save_pretrained(str(tmp))
        _write_safetensors(tmp, tensors, max_shard_bytes)
        if tok is not None:
            tok.save_pretrained(str(tmp))

    return checkpoint.write_folder(out_dir, fill, None, overwrite=overwrite)


@cli.command
def main(argv=None) -> int:
    ap = cli.ArgumentParser(prog="python -m lizard_jax.export",
                            description="Write a teacher-type lizard_jax checkpoint as a transformers folder.")
    ap.add_argument("checkpoint", help="lizard_jax checkpoint folder (or a student adapter, with --teacher)")
    ap.add_argument("--out", required=True, help="output transformers folder")
    ap.add_argument("--dtype", default=None, choices=DTYPES, help="tensor dtype (default: the checkpoint's)")
    ap.add_argument("--teacher", default=None, help="teacher checkpoint of an adapter")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    a = ap.parse_args(argv)
    checkpoint.check_writable(a.out, a.overwrite)
    out = export(a.checkpoint, a.out, dtype=a.dtype, teacher=a.teacher, overwrite=a.overwrite)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
