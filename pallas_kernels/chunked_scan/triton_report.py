"""Compile the chunked-scan GPU kernels without a GPU and report their resources for sm_90, to catch Triton
compile failures and local-memory spills before a device run (steps and columns: ``pallas_kernels/triton_report``).

Step 1 lowers forward+backward of every variant (v1: gla_states, gla_output, gla_dstates, gla_dv, gla_dqk;
v2: gla_v2_forward, gla_states, gla_v2_backward) for per-dimension and per-head gates, bf16 and fp32, at B2 H2,
seq 1024 (``--variant`` picks one).

    python -m pallas_kernels.chunked_scan.triton_report --dump /tmp/ttir [--dk 128 --dv 128]
    /path/to/venv/bin/python -m pallas_kernels.chunked_scan.triton_report --compile /tmp/ttir [--sass]
"""

from __future__ import annotations

import sys

from pallas_kernels import triton_report


def dump(out: str, dk: int, dv: int, seq: int = 1024, variants=None) -> None:
    import jax
    import jax.numpy as jnp

    from pallas_kernels.chunked_scan import VARIANTS, gla

    kernels = {}
    for variant, per_head in ((var, ph) for var in (variants or VARIANTS) for ph in (False, True)):
        def fwd_bwd(q, k, v, g, do, variant=variant):
            o, vjp = jax.vjp(lambda *a: gla(*a, backend="gpu", variant=variant), q, k, v, g)
            return o, vjp(do)

        for dtype in (jnp.bfloat16, jnp.float32):
            q = jax.ShapeDtypeStruct((2, seq, 2, dk), dtype)
            v = jax.ShapeDtypeStruct((2, seq, 2, dv), dtype)
            g = jax.ShapeDtypeStruct((2, seq, 2, 1 if per_head else dk), dtype)
            tag = f"{'head' if per_head else 'dim'}_{jnp.dtype(dtype).name}"
            for name, lowered in triton_report.lower_for_cuda(fwd_bwd, q, q, v, g, v).items():
                kernels[f"{name}_{tag}.ttir"] = lowered
    triton_report.write_kernels(out, kernels)


def _options(parser) -> None:
    parser.add_argument("--dk", type=int, default=128)
    parser.add_argument("--dv", type=int, default=128)
    parser.add_argument("--variant", choices=("v1", "v2"), default=None,
                        help="one variant (default: both)")


def main(argv=None) -> int:
    def dump_args(a):
        dump(a.dump, a.dk, a.dv, variants=(a.variant,) if a.variant else None)

    return triton_report.main(argv, __doc__, dump_args, _options)


if __name__ == "__main__":
    sys.exit(main())
