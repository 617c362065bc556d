"""Tiny models for tests and examples: random lizard_jax configs and random transformers teachers, and the
layer-test helpers (`randomize` parameters off their structured init, `run_chunks` through a layer's cache)."""

from __future__ import annotations

import contextlib

import re
import string

import jax
import jax.numpy as jnp
import numpy as np

from lizard_jax import checkpoint
from lizard_jax.config import ModelConfig
from lizard_jax.models import init_params


def tiny_config(**overrides) -> ModelConfig:
    """A 2-layer GQA decoder small enough for CPU tests."""
    base = dict(vocab_size=97, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, ffn_dim=128,
                max_seq_len=512, eos_token_ids=(1,))
    base.update(overrides)
    return ModelConfig(**base)


def tiny_hf_model(arch: str = "llama", *, seed: int = 0, tie: bool = False, kv_heads: int = 2, layers: int = 2,
                  **config_overrides):
    """A random transformers Llama/Mistral/Qwen2 causal LM (float32, eval mode) with non-trivial weights."""
    import torch
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)

    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
               "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
    if arch not in classes:
        raise ValueError(f"unknown arch {arch!r}; known: {sorted(classes)}")
    cfg_cls, model_cls = classes[arch]
    kw = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
              num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=512,
              tie_word_embeddings=tie, rms_norm_eps=1e-5)
    if arch == "mistral":
        kw["sliding_window"] = None
    kw.update(config_overrides)
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**kw)).eval()
    with torch.no_grad():  # random norms and biases too, so a wrong mapping cannot hide behind ones/zeros
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model


def char_tokenizer(vocab_size: int = 97):
    """An offline character-level tokenizer: [UNK], [EOS], then printable ASCII (ids < vocab_size)."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    chars = list(" \n" + string.digits + string.ascii_letters + string.punctuation)[: vocab_size - 2]
    vocab = {"[UNK]": 0, "[EOS]": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="[UNK]"))
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]")


def save_tiny_teacher(path, *, seed: int = 0, **config_overrides):
    """A random tiny teacher checkpoint with a character tokenizer (EOS id 1) at `path`; returns its config."""
    cfg = tiny_config(**config_overrides)
    params = jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(seed))  # jitted: eager init is slower
    checkpoint.save(path, cfg, params, char_tokenizer(cfg.vocab_size), overwrite=True)
    return cfg


def cli_error(capsys, main, argv, match: str) -> str:
    """Run entry point `main(argv)` in this process and check that it failed as a user error (lizard_jax.cli):
    exit status 2, no traceback, and stderr ending in its only `error: ...` line, which matches regex `match`.
    Returns that line."""
    capsys.readouterr()
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's errors exit
        rc = e.code
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2 and "Traceback" not in err, f"exit status {rc}, stderr:\n{err}"
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), f"want one final error line, stderr:\n{err}"
    assert re.search(match, errors[0]), f"{match!r} not in {errors[0]!r}"
    return errors[0]


TEACHER_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def randomize(params, key):
    """Non-trivial weights for a layer (or model) parameter tree: the teacher's projection kernels ~ 1.5 N(0,
    1/fan_in) (peaked attention); every other parameter moved off its structured init (identity feature maps,
    zero gate kernels, constant gate biases / meta logits / alpha, unit norm scales), so no bug hides behind it."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    out = []
    for (path, p), k in zip(leaves, jax.random.split(key, len(leaves))):
        parts = [str(getattr(part, "key", part)) for part in path]
        n = jax.random.normal(k, p.shape, p.dtype)
        if parts[-1] == "kernel" and len(parts) > 1 and parts[-2] in TEACHER_PROJECTIONS:
            fan = p.shape[0] * (p.shape[1] if parts[-2] == "o_proj" else 1)
            out.append(1.5 * n / np.sqrt(fan))
        elif parts[-1] == "w" and parts[0].startswith("feature"):  # feature-map projections [heads, d, f]
            out.append(p + 0.3 * n / np.sqrt(p.shape[1]))
        elif p.ndim >= 2 and parts[-1] != "meta_logits":  # gate kernels
            out.append(p + n / np.sqrt(p.shape[0]))
        else:  # biases, norm scales, meta logits, alpha
            out.append(p + 0.5 * n)
    return jax.tree_util.tree_unflatten(treedef, out)


def run_chunks(layer, params, x, sizes, max_len: int, positions=None):
    """Feed x `[batch, seq, d_model]` through a fresh cache of `max_len` slots in chunks of `sizes` (one jitted
    step; positions default to arange(seq)); returns (outputs `[batch, seq, d_model]` concatenated, final cache)."""
    b, t, _ = x.shape
    if sum(sizes) != t:
        raise ValueError(f"chunk sizes {sizes} do not add up to the {t} tokens of x")
    cache = type(layer).init_cache(layer.cfg, layer.spec, b, max_len)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)) if positions is None else positions
    step = jax.jit(lambda p, xs, ps, c: layer.apply({"params": p}, xs, ps, c))
    outs, a = [], 0
    for n in sizes:
        y, cache = step(params, x[:, a:a + n], pos[:, a:a + n], cache)
        outs.append(y)
        a += n
    return jnp.concatenate(outs, axis=1), cache


TARGET_GPU = "NVIDIA H200"  # sm_90, the production GPU


@contextlib.contextmanager
def target_gpu(platform: str, device_kind: str = TARGET_GPU):
    """Lower Pallas Triton kernels for ``device_kind`` on a machine without a GPU: jax >= 0.11 takes the target
    from the abstract mesh's ``AbstractDevice`` (else from the default device, a CPU here, which fails); jax 0.10
    ignores it and falls back to sm_90 itself. Other platforms: no-op. Why: tests/test_lowering.py's docstring."""
    if platform != "cuda":
        yield
        return
    dev = jax.sharding.AbstractDevice(device_kind=device_kind, num_cores=None, platform="gpu")
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=dev)):
        yield
