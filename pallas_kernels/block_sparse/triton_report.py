"""Compile the block-sparse GPU kernels without a GPU and report their resources for sm_90, for the default
tiles and each sweep variant (``common.VARIANTS``); steps and columns: ``pallas_kernels/triton_report``.

Step 1 lowers forward+backward at B1 H16 KV4 D128, block 64, seq 1024, bf16 (and fp32 with its own default
tiles); a kernel a variant leaves as an earlier one had it is written once.

    python -m pallas_kernels.block_sparse.triton_report --dump /tmp/bs_ttir [--variants default,rows256]
    /path/to/venv/bin/python -m pallas_kernels.block_sparse.triton_report --compile /tmp/bs_ttir [--sass]
"""

from __future__ import annotations

import sys

from pallas_kernels import triton_report


def dump(out: str, variants: list[str], seq: int = 1024) -> None:
    import jax
    import jax.numpy as jnp

    from pallas_kernels.block_sparse import block_sparse_attention
    from pallas_kernels.block_sparse.common import VARIANTS

    bs, heads, kv_heads, d, max_blocks = 64, 16, 4, 128, 8
    kernels, seen = {}, set()
    jobs = [(name, jnp.bfloat16) for name in variants] + [("default", jnp.float32)]  # fp32: its own default
    for name, dtype in jobs:
        q = jax.ShapeDtypeStruct((1, seq, heads, d), dtype)
        k = jax.ShapeDtypeStruct((1, seq, kv_heads, d), dtype)
        idx = jax.ShapeDtypeStruct((1, kv_heads, seq // bs, max_blocks), jnp.int32)
        cnt = jax.ShapeDtypeStruct((1, kv_heads, seq // bs), jnp.int32)

        def fwd_bwd(q, k, v, i, c, do, bsz=VARIANTS[name] if dtype == jnp.bfloat16 else None):
            attn = lambda q, k, v: block_sparse_attention(q, k, v, i, c, block_size=bs, backend="gpu",
                                                          block_sizes=bsz)
            o, vjp = jax.vjp(attn, q, k, v)
            return o, vjp(do)

        for kernel, lowered in triton_report.lower_for_cuda(fwd_bwd, q, k, k, idx, cnt, q).items():
            if lowered not in seen:  # else as an earlier variant's (this variant changes another pass)
                seen.add(lowered)
                kernels[f"{kernel}_{name}_{jnp.dtype(dtype).name}.ttir"] = lowered
    triton_report.write_kernels(out, kernels)


def _dump(args) -> None:
    from pallas_kernels.block_sparse.common import VARIANTS

    dump(args.dump, args.variants.split(",") if args.variants else list(VARIANTS))


def _options(parser) -> None:
    parser.add_argument("--variants", default=None, help="comma-separated names from common.VARIANTS (all)")


def main(argv=None) -> int:
    return triton_report.main(argv, __doc__, _dump, _options)


if __name__ == "__main__":
    sys.exit(main())
