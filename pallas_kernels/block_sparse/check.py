"""GPU check of the compiled block-sparse kernel against the float64 oracle at realistic shapes.

    python -m pallas_kernels.block_sparse.check [--seq 4096] [--all-kv-heads]

B1 T4096 H16 KV4 D128, block 64, fp32 and bf16, forward (o, lse) and grads (dq, dk, dv, with random
cotangents on o and lse), two selections: random subsets of the visible blocks (with empty query blocks), and
InfLLM-V2 selection. The oracle runs on the host for kv heads 0 and KV-1 (all with --all-kv-heads). Prints a
table; exit status 1 if any error exceeds RTOL of its dtype or anything is not finite.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from lizard_jax.numerics import RTOL, rel_err, scale_floor
from pallas_kernels.block_sparse import DESIGNS, block_sparse_attention, oracle


def _selections(rng, q, k, bs: int, max_blocks: int):
    from lizard_jax.ops.sparse import infllm_select

    batch, seq, _, _ = q.shape
    kv_heads = k.shape[2]
    rand = oracle.random_selection(rng, batch, kv_heads, seq, seq, bs, max_blocks)
    infllm = infllm_select(q, k, block_size=bs, topk=max_blocks // 2, local_window=bs * max_blocks // 2)
    return {"random": tuple(map(np.asarray, rand)), "infllm": tuple(map(np.asarray, infllm))}


def check(seq: int = 4096, heads: int = 16, kv_heads: int = 4, d: int = 128, bs: int = 64, max_blocks: int = 16,
          all_kv_heads: bool = False, interpret: bool = False, variant: str = "v1") -> list[dict]:
    rows = []
    group = heads // kv_heads
    for dtype in (jnp.float32, jnp.bfloat16):
        rng = np.random.default_rng(0)
        q, k, v = (jnp.asarray(rng.standard_normal(s), dtype)
                   for s in ((1, seq, heads, d), (1, seq, kv_heads, d), (1, seq, kv_heads, d)))
        do = jnp.asarray(rng.standard_normal((1, seq, heads, d)), dtype)
        dlse = jnp.asarray(rng.standard_normal((1, heads, seq)), jnp.float32)
        for sel_name, (idx, cnt) in _selections(rng, q, k, bs, max_blocks).items():
            @jax.jit
            def run(q, k, v, idx, cnt, do, dlse):
                f = lambda q, k, v: block_sparse_attention(q, k, v, idx, cnt, block_size=bs, return_lse=True,
                                                                  interpret=interpret, variant=variant)
                out, vjp = jax.vjp(f, q, k, v)
                return out, vjp((do, dlse))

            t0 = time.perf_counter()
            (o, lse), (dq, dk, dv) = jax.block_until_ready(run(q, k, v, idx, cnt, do, dlse))
            seconds = time.perf_counter() - t0
            got = {n: np.asarray(x.astype(jnp.float32), np.float64) for n, x in
                   dict(o=o, lse=lse, dq=dq, dk=dk, dv=dv).items()}
            up = lambda x: np.asarray(x.astype(jnp.float32), np.float64)
            errs = {n: 0.0 for n in got}
            floor = scale_floor(dtype, RTOL[jnp.dtype(dtype).name])
            for g in (range(kv_heads) if all_kv_heads else sorted({0, kv_heads - 1})):
                hs = slice(g * group, (g + 1) * group)
                ref = oracle.attention(up(q)[:, :, hs], up(k)[:, :, g : g + 1], up(v)[:, :, g : g + 1],
                                       idx[:, g : g + 1], cnt[:, g : g + 1], block_size=bs, do=up(do)[:, :, hs],
                                       dlse=np.asarray(dlse)[:, hs])
                mine = (got["o"][:, :, hs], got["lse"][:, hs], got["dq"][:, :, hs], got["dk"][:, :, g : g + 1],
                        got["dv"][:, :, g : g + 1])
                for n, a, r in zip(("o", "lse", "dq", "dk", "dv"), mine, ref):
                    if n == "lse":
                        if not np.array_equal(np.isinf(a), np.isinf(r)):
                            errs[n] = float("inf")
                            continue
                        a, r = np.where(np.isinf(r), 0, a), np.where(np.isinf(r), 0, r)
                    errs[n] = max(errs[n], rel_err(a, r, floor=floor))
            tol = RTOL[jnp.dtype(dtype).name]
            rows.append(dict(dtype=jnp.dtype(dtype).name, selection=sel_name, seconds_incl_compile=seconds,
                             tol=tol, ok=all(e <= tol for e in errs.values()), **errs))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--all-kv-heads", action="store_true")
    ap.add_argument("--interpret", action="store_true", help="interpret mode (a CPU smoke run)")
    ap.add_argument("--variant", default="v1", choices=DESIGNS, help="kernel design")
    args = ap.parse_args(argv)
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}; B1 T{args.seq} H16 KV4 D128 block 64, design {args.variant}")
    rows = check(seq=args.seq, all_kv_heads=args.all_kv_heads, interpret=args.interpret, variant=args.variant)
    cols = ["dtype", "selection", "o", "lse", "dq", "dk", "dv", "tol", "seconds_incl_compile", "ok"]
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(f"{r[c]:.2e}" if isinstance(r[c], float) and c != "seconds_incl_compile"
                         else f"{r[c]:.1f}" if c == "seconds_incl_compile" else str(r[c]) for c in cols))
    ok = all(r["ok"] for r in rows)
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
