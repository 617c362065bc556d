"""Compiled check of the chunked GLA kernels on a GPU: ``python -m pallas_kernels.chunked_scan.check``.

For a few realistic shapes (fp32 and bf16, per-dimension and per-head gates, weak to extreme decay, padding)
it runs the kernels compiled (not interpreted): forward, final state and every gradient (q, k, v, log_g,
h0, with a cotangent on S_T), compares each with the float64 recurrence (``reference.recurrence_f64``)
by max|out - ref| / max|ref|, runs the same inputs twice to catch races (results must be bitwise equal),
prints a table with PASS/FAIL, and exits 1 on any failure.

    python -m pallas_kernels.chunked_scan.check            # GPU, compiled
    python -m pallas_kernels.chunked_scan.check --quick    # fewer cases
    python -m pallas_kernels.chunked_scan.check --interpret --backend tpu   # small shapes on CPU
    python -m pallas_kernels.chunked_scan.check --variant v2                 # the v2 kernels
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from lizard_jax import numerics
from pallas_kernels.chunked_scan import gla
from pallas_kernels.chunked_scan.reference import recurrence_f64

# (batch, seq, heads, dk, dv, gate, per_head, dtype)
CASES = [
    (2, 1000, 4, 64, 64, "moderate", False, "float32"),
    (2, 1000, 4, 64, 64, "moderate", False, "bfloat16"),
    (2, 1000, 4, 128, 128, "fla", False, "bfloat16"),
    (2, 1000, 4, 128, 128, "moderate", False, "float32"),
    (2, 1000, 4, 128, 128, "moderate", True, "bfloat16"),
    (2, 1000, 4, 128, 128, "fla", True, "float32"),
    (1, 1000, 2, 128, 64, "strong", False, "float32"),
    (1, 1000, 2, 64, 128, "mixed", False, "bfloat16"),
    (2, 333, 3, 100, 48, "moderate", False, "float32"),
    (1, 100_000, 1, 32, 32, "extreme", False, "float32"),
    (1, 100_000, 1, 32, 32, "extreme", True, "float32"),
]
QUICK = [0, 2, 4, 6, 9]
INTERPRET_CASES = [
    (1, 100, 2, 16, 32, "moderate", False, "float32"),
    (1, 100, 2, 32, 16, "fla", True, "bfloat16"),
    (1, 150, 1, 16, 16, "extreme", False, "float32"),
]


def _gates(rng, shape, kind):
    if kind == "fla":  # flash-linear-attention's tests: logsigmoid(randn) / 16
        return -np.logaddexp(0.0, -rng.standard_normal(shape)) / 16
    if kind == "moderate":
        return -np.logaddexp(0.0, -rng.standard_normal(shape))
    if kind == "strong":
        return -5.0 * rng.uniform(0.5, 1.5, shape)
    if kind == "mixed":
        return -np.logaddexp(0.0, -4.0 * rng.standard_normal(shape))
    if kind == "extreme":
        return -20.0 * rng.uniform(0.5, 1.0, shape)
    raise ValueError(kind)


def run_case(case, seed, backend, interpret, variant="v1"):
    batch, seq, heads, dk, dv, gate, per_head, dtype = case
    rng = np.random.default_rng(seed)
    dt = jnp.dtype(dtype)
    q, k = (jnp.asarray(rng.standard_normal((batch, seq, heads, dk)), dt) for _ in range(2))
    v, do = (jnp.asarray(rng.standard_normal((batch, seq, heads, dv)), dt) for _ in range(2))
    log_g = jnp.asarray(_gates(rng, (batch, seq, heads, 1 if per_head else dk), gate), dt)
    h0, dht = (jnp.asarray(rng.standard_normal((batch, heads, dk, dv)), jnp.float32) for _ in range(2))

    @jax.jit
    def fwd_bwd(q, k, v, log_g, h0, do, dht):
        def f(q, k, v, log_g, h0):
            return gla(q, k, v, log_g, initial_state=h0, return_final_state=True, backend=backend,
                       interpret=interpret, variant=variant)

        out, vjp = jax.vjp(f, q, k, v, log_g, h0)
        return out, vjp((do, dht))

    t0 = time.perf_counter()
    (o, ht), grads = jax.block_until_ready(fwd_bwd(q, k, v, log_g, h0, do, dht))
    seconds = time.perf_counter() - t0
    (o2, ht2), grads2 = jax.block_until_ready(fwd_bwd(q, k, v, log_g, h0, do, dht))
    deterministic = all(np.array_equal(np.asarray(a), np.asarray(b))
                        for a, b in zip((o, ht, *grads), (o2, ht2, *grads2)))
    f64 = [np.asarray(x.astype(jnp.float32), np.float64) for x in (q, k, v, log_g, h0, do, dht)]
    ro, rht, rg = recurrence_f64(*f64)
    err = functools.partial(numerics.rel_err, floor=numerics.scale_floor(dtype, numerics.RTOL[dtype]))
    errs = {"o": err(o.astype(jnp.float32), ro), "ht": err(ht, rht)}
    for name, gr in zip(("q", "k", "v", "log_g", "h0"), grads):
        errs["d" + name] = err(gr.astype(jnp.float32), rg[name])
    return errs, deterministic, seconds


def case_id(case):
    batch, seq, heads, dk, dv, gate, per_head, dtype = case
    dt = {"float32": "fp32", "bfloat16": "bf16"}[dtype]
    return f"B{batch}-T{seq}-H{heads}-K{dk}-V{dv}-{gate}-{'head' if per_head else 'dim'}-{dt}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a subset of the cases")
    parser.add_argument("--interpret", action="store_true", help="interpret mode, small shapes (CPU)")
    parser.add_argument("--backend", default="gpu", choices=("gpu", "tpu"))
    parser.add_argument("--variant", default="v1", choices=("v1", "v2"))
    args = parser.parse_args(argv)
    cases = INTERPRET_CASES if args.interpret else [CASES[i] for i in QUICK] if args.quick else CASES
    print(f"jax {jax.__version__}, devices {jax.devices()}, backend={args.backend}, variant={args.variant}, "
          f"interpret={args.interpret}", flush=True)
    names = ("o", "ht", "dq", "dk", "dv", "dlog_g", "dh0")
    rows, failed = [], 0
    for i, case in enumerate(cases):
        tol = numerics.RTOL[case[-1]]
        try:
            errs, deterministic, seconds = run_case(case, seed=1000 + i, backend=args.backend,
                                                    interpret=args.interpret, variant=args.variant)
        except Exception as e:  # a compile or runtime failure of one case must not hide the others
            traceback.print_exc()
            rows.append((case_id(case), *["-"] * len(names), "-", f"FAIL ({type(e).__name__})"))
            failed += 1
            continue
        ok = deterministic and all(errs[n] <= tol for n in names)
        failed += not ok
        verdict = "PASS" if ok else "FAIL" + ("" if deterministic else " (not deterministic)")
        rows.append((case_id(case), *[f"{errs[n]:.1e}" for n in names], f"{seconds:.1f}", verdict))
        print(" | ".join(rows[-1]), flush=True)
    header = ("case", *names, "first call s", f"result (tol fp32 {numerics.RTOL['float32']:.0e}, "
              f"bf16 {numerics.RTOL['bfloat16']:.0e})")
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\n{len(rows) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
