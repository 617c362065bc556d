"""Block-sparse attention (our Pallas kernel) vs dense causal cuDNN attention, side by side in one run.

    python -m benchmarks.kernels_sparse [--quick | --sweep]

Shape: B1 H16 KV4 D128 bf16, block 64, T in 8K/32K/64K. Baseline: ``jax.nn.dot_product_attention(q, k, v,
is_causal=True, implementation="cudnn")``.

"1/F selected" means: ``K = n_blocks / F`` key blocks per query block (n_blocks = T / 64), chosen by
InfLLM-V2 selection (``infllm_select``) with ``topk = K/2`` scored blocks (the initial block among them) and a
local window of ``K/2`` blocks, clamped by causality (query block I gets min(I+1, K) blocks). The work is
counted from the indices actually built: visible (query, key) pairs, i.e. inside selected blocks and causal.
FLOPs: forward 4*d per visible pair per query head; forward+backward 3.5x that (the usual 2 + 5 matmuls;
our backward recomputes QK^T and dO V^T in both passes, 7 matmuls, which is not counted). Dense: T(T+1)/2
pairs per head. TFLOP/s are against the bf16 matmul ceiling measured in the same run.

Timing: JAX dispatches asynchronously, so ``reps`` calls are queued back to back (alternating two input
sets) and synchronised once; the median over 3 such loops, per call.

``--sweep`` (one GPU call, ~2-3 minutes): at T=8K and 32K, 1/8 selected, times the tile variants of
``pallas_kernels.block_sparse.common.VARIANTS``: forward variants forward-only, backward variants forward +
backward, beside dense cuDNN and the predicted ms (``.notes/sparse_kernel.md``), with each variant's
relative difference from the default's outputs and gradients (same inputs; bf16, expect ~1e-3).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import measure_ceilings, report

BATCH, HEADS, KV_HEADS, D, BLOCK = 1, 16, 4, 128, 64

# --sweep: forward-only variants, forward+backward variants (forward at the default tiles), and the
# predicted ms (T, variant, "fwd" | "fwd+bwd") written before the first run (see .notes/sparse_kernel.md)
FWD_SWEEP = ("default", "kv1", "kv1_s4", "rows256", "rows64")
BWD_SWEEP = ("default", "dq_s4", "no_split")
PREDICTED_MS = {
    (8192, "default", "fwd"): 0.17, (32768, "default", "fwd"): 2.70,
    (8192, "kv1", "fwd"): 0.18, (32768, "kv1", "fwd"): 2.95,
    (8192, "kv1_s4", "fwd"): 0.18, (32768, "kv1_s4", "fwd"): 2.90,
    (8192, "rows256", "fwd"): 0.17, (32768, "rows256", "fwd"): 2.75,
    (8192, "rows64", "fwd"): 0.19, (32768, "rows64", "fwd"): 2.95,
    (8192, "default", "fwd+bwd"): 0.80, (32768, "default", "fwd+bwd"): 11.3,
    (8192, "dq_s4", "fwd+bwd"): 0.79, (32768, "dq_s4", "fwd+bwd"): 11.1,
    (8192, "no_split", "fwd+bwd"): 1.10, (32768, "no_split", "fwd+bwd"): 12.3,
}


def visible_pairs(block_indices, block_counts, seq: int, block_size: int) -> int:
    """Causal (query, key) pairs inside the listed blocks, summed over batch and kv heads (per query head)."""
    idx = np.asarray(block_indices)
    cnt = np.asarray(block_counts)
    listed = np.arange(idx.shape[-1]) < cnt[..., None]
    qb = np.broadcast_to(np.arange(idx.shape[2])[:, None], idx.shape)
    i_blk, j_blk = qb[listed], idx[listed]
    # pairs of block (I, J): all bs^2 if J < I, bs(bs+1)/2 on the diagonal (blocks are whole: seq % bs == 0)
    assert seq % block_size == 0 and np.all(j_blk <= i_blk)
    full = np.count_nonzero(j_blk < i_blk)
    diag = np.count_nonzero(j_blk == i_blk)
    return int(full * block_size**2 + diag * block_size * (block_size + 1) // 2)


def _inputs(seq: int, seed: int = 0):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (BATCH, seq, HEADS, D), jnp.bfloat16)
    k = jax.random.normal(ks[1], (BATCH, seq, KV_HEADS, D), jnp.bfloat16)
    v = jax.random.normal(ks[2], (BATCH, seq, KV_HEADS, D), jnp.bfloat16)
    do = jax.random.normal(ks[3], (BATCH, seq, HEADS, D), jnp.bfloat16)
    return q, k, v, do


def _fwd_and_fwdbwd(attn):
    fwd = jax.jit(attn)

    @jax.jit
    def fwd_bwd(q, k, v, do):
        _, vjp = jax.vjp(attn, q, k, v)
        return vjp(do)

    return fwd, fwd_bwd


def time_ms(fn, arg_sets, reps: int = 10, loops: int = 3) -> float:
    """Median over ``loops`` of the mean ms per call of ``reps`` queued calls, alternating ``arg_sets``."""
    for args in arg_sets:  # compile, warm up
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(loops):
        t0 = time.perf_counter()
        for r in range(reps):
            out = fn(*arg_sets[r % len(arg_sets)])
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) * 1e3 / reps)
    return statistics.median(times)


def _selection(q, k, seq: int, frac: int):
    from lizard_jax.ops.sparse import infllm_select

    total = max(2, seq // BLOCK // frac)
    select = jax.jit(functools.partial(infllm_select, block_size=BLOCK, topk=total - total // 2,
                                       local_window=(total // 2) * BLOCK))
    idx, cnt = jax.block_until_ready(select(q, k))
    return select, idx, cnt, total


def _sparse(idx, cnt, block_sizes=None):
    from pallas_kernels.block_sparse import block_sparse_attention

    return lambda q, k, v: block_sparse_attention(q, k, v, idx, cnt, block_size=BLOCK, block_sizes=block_sizes)


def run(quick: bool = False, lengths: tuple[int, ...] | None = None) -> list[dict]:
    ceiling = measure_ceilings()["matmul_tflops"]
    dense = functools.partial(jax.nn.dot_product_attention, is_causal=True, implementation="cudnn")
    dense_fwd, dense_fb = _fwd_and_fwdbwd(dense)
    rows = []
    lengths = lengths or ((8192,) if quick else (8192, 32768, 65536))
    for seq in lengths:
        sets = [_inputs(seq, seed) for seed in (0, 1)]
        q, k, v, do = sets[0]
        dense_pairs = seq * (seq + 1) // 2
        t_dense = time_ms(dense_fwd, [s[:3] for s in sets])
        t_dense_fb = time_ms(dense_fb, sets)
        for frac in (8,) if quick else (8, 16):
            select, idx, cnt, total = _selection(q, k, seq, frac)
            t_select = time_ms(select, [(q, k)], reps=3)
            # per query head: visible_pairs sums over batch and kv heads
            pairs = visible_pairs(idx, cnt, seq, BLOCK) / (BATCH * KV_HEADS)
            sparse_fwd, sparse_fb = _fwd_and_fwdbwd(_sparse(idx, cnt))
            t_fwd = time_ms(sparse_fwd, [s[:3] for s in sets])
            t_fb = time_ms(sparse_fb, sets)
            flop = 4 * D * HEADS * BATCH
            rows.append(dict(
                T=seq, selected=f"1/{frac}", blocks_per_qblock=total, pairs_vs_dense=pairs / dense_pairs,
                dense_fwd_ms=t_dense, sparse_fwd_ms=t_fwd, fwd_speedup=t_dense / t_fwd,
                sparse_fwd_tflops=flop * pairs / t_fwd / 1e9, dense_fwd_tflops=flop * dense_pairs / t_dense / 1e9,
                dense_fwdbwd_ms=t_dense_fb, sparse_fwdbwd_ms=t_fb, fwdbwd_speedup=t_dense_fb / t_fb,
                sparse_fwdbwd_tflops=3.5 * flop * pairs / t_fb / 1e9, select_ms=t_select,
                ceiling_tflops=ceiling,
            ))
    return rows


def _rel(a, b) -> float:
    a, b = (np.asarray(x.astype(jnp.float32), np.float64) for x in (a, b))
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def sweep(lengths: tuple[int, ...] = (8192, 32768)) -> list[dict]:
    """Tile variants, 1/8 selected: forward variants timed forward-only, backward variants forward+backward."""
    from pallas_kernels.block_sparse.common import VARIANTS

    dense = functools.partial(jax.nn.dot_product_attention, is_causal=True, implementation="cudnn")
    dense_fwd, dense_fb = _fwd_and_fwdbwd(dense)
    rows = []
    for seq in lengths:
        sets = [_inputs(seq, seed) for seed in (0, 1)]
        q, k, v, do = sets[0]
        _, idx, cnt, _ = _selection(q, k, seq, 8)
        fwd_flop = 4 * D * HEADS * BATCH * visible_pairs(idx, cnt, seq, BLOCK) / (BATCH * KV_HEADS)
        dense_ms = {"fwd": time_ms(dense_fwd, [s[:3] for s in sets]), "fwd+bwd": time_ms(dense_fb, sets)}
        reference = {}
        for kind, names in (("fwd", FWD_SWEEP), ("fwd+bwd", BWD_SWEEP)):
            for name in names:
                fwd, fwd_bwd = _fwd_and_fwdbwd(_sparse(idx, cnt, VARIANTS[name]))
                fn, args = (fwd, [s[:3] for s in sets]) if kind == "fwd" else (fwd_bwd, sets)
                try:
                    ms = time_ms(fn, args)
                    out = jax.tree.leaves(fn(*args[0]))
                except Exception as e:  # a variant that fails to compile or run is reported, not fatal
                    rows.append(dict(T=seq, variant=name, kind=kind, ms=float("nan"), predicted_ms=float("nan"),
                                     tflops=float("nan"), vs_dense=float("nan"), err_vs_default=float("nan"),
                                     note=f"{type(e).__name__}: {str(e)[:80]}"))
                    continue
                reference.setdefault(kind, out)
                err = max(_rel(a, b) for a, b in zip(out, reference[kind]))
                flop = fwd_flop * (1.0 if kind == "fwd" else 3.5)
                rows.append(dict(T=seq, variant=name, kind=kind, ms=ms,
                                 predicted_ms=PREDICTED_MS.get((seq, name, kind), float("nan")),
                                 tflops=flop / ms / 1e9, vs_dense=dense_ms[kind] / ms, err_vs_default=err,
                                 note=f"dense {dense_ms[kind]:.3g} ms"))
                print(rows[-1], flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="T=8K, 1/8 only")
    ap.add_argument("--sweep", action="store_true", help="tile variants at T=8K and 32K, 1/8 selected")
    args = ap.parse_args(argv)
    if args.sweep:
        t0 = time.perf_counter()
        rows = sweep()
        headers = list(rows[0])
        report("Block-sparse attention tile sweep, B1 H16 KV4 D128 bf16, block 64, 1/8 selected", headers,
               [[r[h] for h in headers] for r in rows],
               notes=f"fwd rows: forward only; fwd+bwd rows: forward at default tiles + backward variant; tflops "
                     f"on visible pairs (fwd 4d/pair, fwd+bwd 14d/pair); err_vs_default = max rel. difference "
                     f"of outputs/gradients from the default tiles; sweep took {time.perf_counter() - t0:.0f} s")
        return
    rows = run(quick=args.quick)
    headers = list(rows[0])
    report("Block-sparse attention (Pallas) vs dense causal cuDNN, B1 H16 KV4 D128 bf16, block 64", headers,
           [[r[h] for h in headers] for r in rows],
           notes="1/F selected = n_blocks/F blocks per query block (InfLLM-V2 selection: half scored top-k incl. "
                 "the initial block, half local window), clamped by causality; TFLOP/s count visible pairs only "
                 "(fwd 4d/pair, fwd+bwd 14d/pair); select_ms is infllm_select alone")


if __name__ == "__main__":
    main()
