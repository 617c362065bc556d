"""Block-sparse attention (our Pallas kernel) vs dense causal cuDNN attention, side by side in one run.

    python -m benchmarks.kernels_sparse [--quick]

Shape: B1 H16 KV4 D128 bf16, block 64, T in 8K/32K/64K. Baseline: ``jax.nn.dot_product_attention(q, k, v,
is_causal=True, implementation="cudnn")``.

"1/F selected" means: ``K = n_blocks / F`` key blocks per query block (n_blocks = T / 64), chosen by
InfLLM-V2 selection (``infllm_select``) with ``topk = K/2`` scored blocks (the initial block among them) and a
local window of ``K/2`` blocks, clamped by causality (query block I gets min(I+1, K) blocks). The work is
counted from the indices actually built: visible (query, key) pairs, i.e. inside selected blocks and causal.
FLOPs: forward 4*d per visible pair per query head; forward+backward 3.5x that (the usual 2 + 5 matmuls;
our backward recomputes QK^T and dO V^T in both passes, 7 matmuls, which is not counted). Dense: T(T+1)/2
pairs per head. TFLOP/s are against the bf16 matmul ceiling measured in the same run.
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import measure_ceilings, report, time_jax

BATCH, HEADS, KV_HEADS, D, BLOCK = 1, 16, 4, 128, 64


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


# forward tile variants timed at the longest length, 1/8 selected (default: 32 positions x 4 heads = 128 rows)
FWD_VARIANTS = {
    "rows256_w8": dict(block_q=64, block_q_dq=16, block_q_dkv=16, num_warps=8),
    "rows128_s3": dict(block_q=32, block_q_dq=16, block_q_dkv=16, num_stages=3),
}


def run(quick: bool = False, lengths: tuple[int, ...] | None = None) -> list[dict]:
    from lizard_jax.ops.sparse import infllm_select
    from pallas_kernels.block_sparse import BlockSizes, block_sparse_attention

    ceiling = measure_ceilings()["matmul_tflops"]
    dense = functools.partial(jax.nn.dot_product_attention, is_causal=True, implementation="cudnn")
    dense_fwd, dense_fb = _fwd_and_fwdbwd(dense)
    rows = []
    lengths = lengths or ((8192,) if quick else (8192, 32768, 65536))
    for seq in lengths:
        q, k, v, do = _inputs(seq)
        dense_pairs = seq * (seq + 1) // 2
        t_dense = time_jax(dense_fwd, q, k, v)
        t_dense_fb = time_jax(dense_fb, q, k, v, do)
        for frac in (8,) if quick else (8, 16):
            n_blocks = seq // BLOCK
            total = max(2, n_blocks // frac)
            select = jax.jit(functools.partial(infllm_select, block_size=BLOCK, topk=total - total // 2,
                                               local_window=(total // 2) * BLOCK))
            idx, cnt = jax.block_until_ready(select(q, k))
            t_select = time_jax(select, q, k, reps=5)
            # per query head: visible_pairs sums over batch and kv heads
            pairs = visible_pairs(idx, cnt, seq, BLOCK) / (BATCH * KV_HEADS)
            sparse = functools.partial(block_sparse_attention, block_indices=idx, block_counts=cnt, block_size=BLOCK)
            sparse_fwd, sparse_fb = _fwd_and_fwdbwd(lambda q, k, v: sparse(q, k, v))
            t_fwd = time_jax(sparse_fwd, q, k, v)
            t_fb = time_jax(sparse_fb, q, k, v, do)
            flop = 4 * D * HEADS * BATCH
            rows.append(dict(
                T=seq, selected=f"1/{frac}", variant="default", blocks_per_qblock=total, pairs_vs_dense=pairs / dense_pairs,
                dense_fwd_ms=t_dense, sparse_fwd_ms=t_fwd, fwd_speedup=t_dense / t_fwd,
                sparse_fwd_tflops=flop * pairs / t_fwd / 1e9, dense_fwd_tflops=flop * dense_pairs / t_dense / 1e9,
                dense_fwdbwd_ms=t_dense_fb, sparse_fwdbwd_ms=t_fb, fwdbwd_speedup=t_dense_fb / t_fb,
                sparse_fwdbwd_tflops=3.5 * flop * pairs / t_fb / 1e9, select_ms=t_select,
                ceiling_tflops=ceiling,
            ))
            if frac == 8 and seq == max(lengths):
                for name, kw in FWD_VARIANTS.items():
                    fwd = jax.jit(lambda q, k, v, bsz=BlockSizes(**kw): sparse(q, k, v, block_sizes=bsz))
                    t = time_jax(fwd, q, k, v)
                    rows.append({**{key: float("nan") for key in rows[-1]}, **dict(
                        T=seq, selected=f"1/{frac}", variant=name, blocks_per_qblock=total,
                        pairs_vs_dense=pairs / dense_pairs, dense_fwd_ms=t_dense, sparse_fwd_ms=t,
                        fwd_speedup=t_dense / t, sparse_fwd_tflops=flop * pairs / t / 1e9,
                        ceiling_tflops=ceiling)})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    rows = run(quick=ap.parse_args(argv).quick)
    headers = list(rows[0])
    report("Block-sparse attention (Pallas) vs dense causal cuDNN, B1 H16 KV4 D128 bf16, block 64", headers,
           [[r[h] for h in headers] for r in rows],
           notes="1/F selected = n_blocks/F blocks per query block (InfLLM-V2 selection: half scored top-k incl. "
                 "the initial block, half local window), clamped by causality; TFLOP/s count visible pairs only "
                 "(fwd 4d/pair, fwd+bwd 14d/pair); select_ms is infllm_select alone")


if __name__ == "__main__":
    main()
