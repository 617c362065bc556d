"""Static cost model of the block-sparse attention kernels (GPU / Triton lowering) and of the dense causal
baseline (cuDNN flash attention), for planning benchmarks: ``cost(design, ...)`` and ``dense_cost(...)``.

Counted from what the kernels issue, per pass (``gpu.py`` for v1, ``gpu_v2.py`` for v2):
  * HBM bytes: every tile a program loads or stores, at the padded shapes the kernels see (group and head_dim
    padded to powers of two, sequences to whole blocks); L2 reuse is *not* modelled (two programs of one
    query block both count their key tiles), so these are bytes requested, an upper bound on DRAM traffic.
    XLA glue counts one read and one write of each array it touches: the delta/lse preparation, the index
    normalisation, the work lists (the argsort of the mask-free ordering; the key-major work list, modelled
    as ``_WORKLIST_OPS`` passes over the (query block, key block) pair array), and the sum of split partials.
  * FLOPs: 2 * M * N * K for every product the kernels compute, whole tiles (masked diagonal entries and the
    unlisted part of a ``kv_step`` tile included): forward 2 products, dq 3, dk/dv 4 per tile pair.
  * launches: kernels plus XLA ops (fusions) on the path, as the design issues them.

The selection is modelled as InfLLM-V2's: ``selected_blocks_per_query_block`` listed per query block
(``max_blocks`` equal to it), the initial key block selected by every query block (split into chunks in
the dk/dv pass when ``dkv_split`` says so), the others spread evenly (not split).

v1 and v2 run the same products and tiles; they differ where the index prologue runs (v1: argsort in the
forward and again in the backward, plus the key-major work list in the backward; v2: once, in the forward
rule) and in ``kv_step_dq`` (v2's default gathers two key blocks per dq step). Masks and transposes, what v2
also removes, cost no HBM bytes or products and are not in this model.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from pallas_kernels.block_sparse.common import DESIGNS, BlockSizes, next_pow2

_WORKLIST_OPS = 10  # dkv_work_items: sort, 2 searchsorted (CSR), 2 cumsum, 4 searchsorted, gathers/stack
_MASK_FREE_OPS = 2  # _mask_free_first: argsort + take
_DENSE_TILE = 128  # cuDNN / FA2 tiles (queries and keys)


class Cost(NamedTuple):
    hbm_bytes: int
    flops: int
    launches: int

    def __add__(self, other):  # NamedTuple + would concatenate
        return Cost(self.hbm_bytes + other.hbm_bytes, self.flops + other.flops, self.launches + other.launches)


_ZERO = Cost(0, 0, 0)


def _itemsize(dtype) -> int:
    if isinstance(dtype, str) and dtype in ("bf16", "bfloat16"):
        return 2
    return int(np.dtype(dtype).itemsize)


def _check(mode: str, heads: int, kv_heads: int, seq: int, block_size: int, sel: int):
    if mode not in ("fwd", "fwd_bwd"):
        raise ValueError(f"unknown {mode=}; expected 'fwd' or 'fwd_bwd'")
    if heads % kv_heads:
        raise ValueError(f"heads {heads} is not a multiple of kv_heads {kv_heads}")
    n_kb = -(-seq // block_size)
    if not 1 <= sel <= n_kb:
        raise ValueError(f"selected_blocks_per_query_block={sel} must be in [1, {n_kb}]")


def cost(design: str, *, batch: int, seq: int, heads: int, kv_heads: int, head_dim: int, block_size: int,
         selected_blocks_per_query_block: int, dtype, mode: str = "fwd_bwd",
         block_sizes: BlockSizes | None = None) -> Cost:
    """Predicted cost of ``block_sparse_attention(..., variant=design)`` on a GPU, self-attention of ``seq``
    tokens (forward, or forward + backward of o with the lse unused)."""
    if design not in DESIGNS:
        raise ValueError(f"unknown {design=}; expected one of {DESIGNS}")
    sel = selected_blocks_per_query_block
    _check(mode, heads, kv_heads, seq, block_size, sel)
    e = _itemsize(dtype)
    group = heads // kv_heads
    gp, dp = next_pow2(group), max(16, next_pow2(head_dim))
    bs = block_size
    n_qb = n_kb = -(-seq // bs)
    t_pad = n_qb * bs
    bsz = block_sizes or BlockSizes.get_default(bs, group, e, variant=design)
    bsz.validate(bs, group)
    bk = batch * kv_heads
    pairs = bk * n_qb * sel  # (query block, key block) pairs listed
    rows_bytes = bk * t_pad * gp * dp * e  # q, o, do or dq as the kernels see them
    vec_bytes = bk * t_pad * gp * 4  # lse or delta (float32)
    kv_bytes = bk * t_pad * dp * e  # k, v, dk or dv
    idx_bytes = pairs * 4 + bk * n_qb * 4

    def kv_step(step: int) -> int:
        return min(step, next_pow2(sel)) if design == "v2" else step

    def query_major(bq: int, step: int, products: int, n_rows_in: int, n_vec_in: int, n_rows_out: int,
                    n_vec_out: int) -> Cost:
        """forward / dq: one program per bq query positions x group, over the listed key blocks."""
        programs = bk * n_qb * (bs // bq)
        keys = -(-sel // step) * step * bs
        read = n_rows_in * rows_bytes + n_vec_in * vec_bytes + programs * (keys * dp * e * 2 + (sel + 2) * 4)
        write = n_rows_out * rows_bytes + n_vec_out * vec_bytes
        return Cost(read + write, programs * products * 2 * (bq * gp) * keys * dp, 1)

    glue = lambda nbytes, ops: Cost(2 * nbytes, 0, ops)  # XLA ops: one read + one write
    pad = Cost(0, 0, 0)
    if (gp, dp) != (group, head_dim):  # zero padding of q (and do) / k, v to Triton's power-of-2 tiles
        pad = glue(rows_bytes + 2 * kv_bytes, 3)
    normalize = glue(idx_bytes, 1)
    mask_free = glue(idx_bytes, _MASK_FREE_OPS)
    fwd = normalize + pad + mask_free + query_major(bsz.block_q, kv_step(bsz.kv_step), 2, 1, 0, 1, 1)
    if mode == "fwd":
        return fwd

    chunk = bsz.dkv_split * sel
    split_chunks = -(-n_qb // chunk) if 0 < chunk < n_qb else 0  # the initial block's chunks
    worklist = glue(_WORKLIST_OPS * pairs * 4, _WORKLIST_OPS)
    # delta = rowsum(o * do) - dlse; lse in base 2; both into the kernels' row layout
    prep = Cost(2 * rows_bytes + vec_bytes + 2 * (2 * vec_bytes) + 2 * (2 * vec_bytes), 0, 3)
    dq = query_major(bsz.block_q_dq, kv_step(bsz.kv_step_dq), 3, 2, 2, 1, 0)
    if design == "v1":
        dq = dq + mask_free  # v1 rebuilds the mask-free ordering in the backward
        prologue = worklist  # and the key-major work list
    else:
        fwd = fwd + worklist  # v2 builds it once, in the forward rule (saved as a residual)
        prologue = _ZERO
    # dk/dv: per listed pair bs x (bs*gp) tiles of q, do, lse, delta; per item its key block of k, v
    items = bk * (n_kb + max(split_chunks - 1, 0))
    dkv_read = pairs * (2 * bs * gp * dp * e + 2 * bs * gp * 4 + 4) + items * (2 * bs * dp * e + 5 * 4)
    n_split = bk * split_chunks
    dkv_write = 2 * kv_bytes + n_split * 2 * bs * dp * 4  # (the split block's direct write is skipped)
    dkv = Cost(dkv_read + dkv_write, pairs * 4 * 2 * bs * (bs * gp) * dp, 1)
    if split_chunks:  # segment_sum of the partials into a full float32 array, then a select per dk, dv
        summed = bk * t_pad * dp * 4
        dkv = dkv + Cost(2 * (n_split * bs * dp * 4 + summed + kv_bytes + summed + kv_bytes), 0, 5)
    return fwd + prep + prologue + dq + dkv


def dense_cost(*, batch: int, seq: int, heads: int, kv_heads: int, head_dim: int, dtype, mode: str = "fwd_bwd",
               causal: bool = True) -> Cost:
    """The dense baseline: flash attention as cuDNN / FA2 run it, 128 x 128 tiles, one program per query
    head (GQA k/v loaded per head), whole tiles up to the diagonal. Backward: one pass per key tile over the
    query tiles below it (5 products per tile pair), dq accumulated in float32 (a read-modify-write per
    tile), then dq converted and, under GQA, dk/dv reduced over the group from per-head buffers."""
    if mode not in ("fwd", "fwd_bwd"):
        raise ValueError(f"unknown {mode=}; expected 'fwd' or 'fwd_bwd'")
    if heads % kv_heads:
        raise ValueError(f"heads {heads} is not a multiple of kv_heads {kv_heads}")
    e = _itemsize(dtype)
    tile = _DENSE_TILE
    n_t = -(-seq // tile)
    bh = batch * heads
    tile_pairs = bh * (n_t * (n_t + 1) // 2 if causal else n_t * n_t)
    rows = bh * seq * head_dim * e  # q, o, do, dq
    vec = bh * seq * 4
    tile_bytes = tile * head_dim * e
    fwd = Cost(2 * rows + vec + tile_pairs * 2 * tile_bytes, tile_pairs * 2 * 2 * tile * tile * head_dim, 1)
    if mode == "fwd":
        return fwd
    prep = Cost(2 * rows + vec, 0, 1)  # delta = rowsum(o * do)
    per_pair = 2 * tile_bytes + 2 * tile * 4 + 2 * tile * head_dim * 4  # q, do, lse, delta; dq f32 r+w
    main = Cost(bh * n_t * 2 * tile_bytes + tile_pairs * per_pair + 2 * rows,
                tile_pairs * 5 * 2 * tile * tile * head_dim, 2)  # dq accumulator zeroed: one memset
    main = main + Cost(bh * seq * head_dim * 4 + rows, 0, 1)  # dq float32 -> dtype
    if heads != kv_heads:  # dk, dv per query head, reduced over the group
        kv = batch * kv_heads * seq * head_dim * e
        main = main + Cost(2 * (rows + kv), 0, 1)
    return fwd + prep + main


def flops_ratio(design: str, **kw) -> float:
    """dense / sparse FLOPs at the same shape (a quick upper bound on the speed-up)."""
    sparse = cost(design, **kw)
    kw = {k: v for k, v in kw.items() if k not in ("block_size", "selected_blocks_per_query_block", "block_sizes")}
    return dense_cost(**kw).flops / sparse.flops if sparse.flops else math.inf


def segment_bytes(*, batch: int, seq: int, heads: int, kv_heads: int, block_size: int,
                  selected_blocks_per_query_block: int, mode: str = "fwd_bwd", design: str = "v1") -> int:
    """Extra HBM bytes requested by the GPU kernels with segment ids (packed documents; issue #19), not in
    ``cost``: the q ids int32 broadcast over the padded group ``[B, T, Gp]`` (built once per pass in XLA: one
    write, then read per row tile like lse) and the k ids ``[B, T]`` read per gathered key tile (``bs`` ids
    per listed block, per program); plus the segment-uniform test of the mask-free ordering (one read of both).
    Small next to q/k/v: ~(Gp + sel * bs / rows_per_program) * 4 bytes per query position and pass.

    v2 (``gpu_v2``) takes v1's id layouts and loads; its mask-free ordering is built once (``plan``, in the
    forward rule), so the backward has no segment-uniform test of its own, and its dk/dv one-segment test reads
    the ids the step loads anyway. (The TPU kernels lay the ids out per block, q ids over the unpadded group, and
    prefetch per-block tables in v2; they are not modelled here, as ``cost`` is not.)"""
    if design not in DESIGNS:
        raise ValueError(f"unknown {design=}; expected one of {DESIGNS}")
    bs = block_size
    t_pad = -(-seq // bs) * bs
    gp = next_pow2(heads // kv_heads)
    n_qb = t_pad // bs
    q_ids = batch * t_pad * gp * 4
    k_tiles = batch * kv_heads * n_qb * selected_blocks_per_query_block * bs * 4  # one row tile per query block
    uniform = 2 * batch * t_pad * 4
    fwd = 2 * q_ids + k_tiles + uniform
    if mode == "fwd":
        return fwd
    # dq as the forward; dk/dv: q ids of every selecting query block's rows, k ids once per key block
    dkv = 2 * q_ids + batch * kv_heads * n_qb * selected_blocks_per_query_block * bs * gp * 4 + batch * t_pad * 4
    return 2 * fwd + dkv - (uniform if design == "v2" else 0)
