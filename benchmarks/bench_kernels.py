"""The kernel benchmark of the Pallas kernels issue, one command on the GPU machine:

    python -m benchmarks.bench_kernels [--quick] [--only gla|sparse]

1. chunked GLA (per-dimension and per-head gates) vs flash-linear-attention's chunk_gla / chunk_simple_gla,
   fwd and fwd+bwd, B8 H16 D128 bf16, T 2K/4K/8K/16K (`benchmarks/kernels_gla.py`);
2. block-sparse attention vs dense causal cuDNN, B1 H16 KV4 D128 bf16, T 8K/32K/64K, 1/8 and 1/16 of the key
   blocks selected (`benchmarks/kernels_sparse.py`).
Each prints its table and appends it to benchmarks/RESULTS.md with the measured ceilings.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch (fla) shares the GPU with JAX

import argparse  # noqa: E402
import importlib  # noqa: E402

from benchmarks.common import measure_ceilings, report  # noqa: E402


# name -> (report title, notes); benchmarks/kernels_<name>.py runs it
BENCHMARKS = {
    "gla": ("Chunked GLA (Pallas) vs flash-linear-attention 0.6.0, B8 H16 D128 bf16",
            "; ratio = fla ms / ours ms (throughput ratio); log_g = logsigmoid(randn)/16; user's anchors at "
            "T=4096: chunk_gla 1.59/7.41 ms, chunk_simple_gla 0.50/3.02 ms"),
    "sparse": ("Block-sparse attention (Pallas) vs dense causal cuDNN, B1 H16 KV4 D128 bf16, block 64",
               "; 1/F selected = n_blocks/F blocks per query block (InfLLM-V2 selection: half scored top-k "
               "incl. the initial block, half local window), clamped by causality; TFLOP/s count visible pairs "
               "only (fwd 4d/pair, fwd+bwd 14d/pair)"),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="T=4096 (GLA) and 8K (sparse) only")
    ap.add_argument("--only", choices=list(BENCHMARKS), default=None)
    a = ap.parse_args(argv)
    ceil = measure_ceilings()
    ceil_note = f"measured ceilings: bf16 matmul {ceil['matmul_tflops']:.0f} TFLOP/s, copy {ceil['copy_gbs']:.0f} GB/s"
    for name, (title, notes) in BENCHMARKS.items():
        if a.only in (None, name):
            rows = importlib.import_module(f"benchmarks.kernels_{name}").run(quick=a.quick)
            headers = list(rows[0])
            report(title, headers, [[r[h] for h in headers] for r in rows], notes=ceil_note + notes)


if __name__ == "__main__":
    main()
