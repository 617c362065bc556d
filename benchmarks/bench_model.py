"""Forward throughput and MFU of the teacher in JAX (bf16) at a long sequence.

    python benchmarks/bench_model.py [--smollm2 CKPT_DIR] [--seq 4096]

Models: SmolLM2-135M (a converted checkpoint, if given) and a random Llama-3.2-1B-shaped config. FLOPs count the
matmuls (2 x matmul params per token, lm_head included, embedding lookup excluded) plus causal attention
(2 x T^2 x heads x head_dim per layer: QK^T and PV over the causal half). MFU is against the H100 SXM datasheet
dense bf16 peak (989 TFLOP/s) and, beside it, against the bf16 matmul rate measured in the same run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import measure_ceilings, report, time_jax  # noqa: E402
from lizard_jax.config import ModelConfig  # noqa: E402
from lizard_jax.models import Transformer, init_params  # noqa: E402
from lizard_jax.models.flops import causal_attention_flops, matmul_params  # noqa: E402

PEAK_BF16 = 989e12

LLAMA_1B = dict(vocab_size=128256, d_model=2048, num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64,
                ffn_dim=8192, tie_embeddings=True, rope={"theta": 500000.0}, max_seq_len=131072)


def forward_flops(cfg: ModelConfig, batch: int, seq: int) -> float:
    return batch * (2 * matmul_params(cfg) * seq + causal_attention_flops(cfg, seq))


def bench(name: str, cfg: ModelConfig, params, batch: int, seq: int, ceiling: float) -> list:
    model = Transformer(cfg)

    @jax.jit
    def fwd(params, toks):  # reduce the logits on device: time the model, not a host transfer
        return jnp.mean(jax.nn.logsumexp(model.apply({"params": params}, toks), axis=-1))

    toks = jax.random.randint(jax.random.key(1), (batch, seq), 0, cfg.vocab_size)
    try:
        ms = time_jax(fwd, params, toks, warmup=2, reps=10)
    except Exception as e:  # e.g. out of memory: report it, keep going
        return [name, batch, seq, f"failed: {type(e).__name__}", "", "", ""]
    flops = forward_flops(cfg, batch, seq)
    tflops = flops / (ms * 1e-3) / 1e12
    return [name, batch, seq, ms, batch * seq / (ms * 1e-3), tflops, 100 * tflops * 1e12 / PEAK_BF16,
            100 * tflops / ceiling]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--smollm2", default=None, help="converted SmolLM2 checkpoint folder")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--batch-small", type=int, default=8)
    ap.add_argument("--batch-1b", type=int, default=4)
    a = ap.parse_args(argv)
    ceil = measure_ceilings()
    rows = []
    if a.smollm2:
        import lizard_jax

        model, params, _ = lizard_jax.load(a.smollm2, dtype="bfloat16")
        params = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)
        rows.append(bench("SmolLM2-135M", model.cfg, params, a.batch_small, a.seq, ceil["matmul_tflops"]))
    cfg = ModelConfig.from_dict({**LLAMA_1B, "dtype": "bfloat16", "param_dtype": "bfloat16"})
    params = init_params(cfg, jax.random.key(0))
    rows.append(bench("random Llama-1B", cfg, params, a.batch_1b, a.seq, ceil["matmul_tflops"]))
    report(
        "Teacher forward throughput (bf16)",
        ["model", "batch", "seq", "ms", "tokens/s", "TFLOP/s", "MFU % (989 peak)", "% of measured matmul"],
        rows,
        notes=f"measured ceilings: bf16 matmul {ceil['matmul_tflops']:.0f} TFLOP/s, copy {ceil['copy_gbs']:.0f} GB/s; "
              "attention via impl=auto (cuDNN on GPU)",
    )


if __name__ == "__main__":
    main()
