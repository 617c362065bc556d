"""Static cost model of the chunked GLA kernels: HBM bytes, matrix-product FLOPs and launches per variant.

    cost(variant, *, batch, seq, heads, dk, dv, per_dim, dtype, mode="fwd"|"fwd_bwd", block_sizes=None,
         backend="gpu", segments=False) -> Cost(hbm_bytes, flops, launches)

Counted from what the kernels as written read, write and multiply (``gpu.py``, ``gpu_v2.py``, ``tpu.py``), at
the sizes ``scan.gla`` runs them (seq padded to whole chunks, head dims padded, default block sizes):
- hbm_bytes: every array a launch reads or writes, once per launch (the tiles of one head that re-read
  q, k, g are adjacent in the grid and counted as L2 hits), plus the XLA sums that are part of a design
  (v2's dv-tile shares of dq/dk/dlog_g, v1's per-head dlog_g columns). Glue common to every variant
  (padding, dtype casts, the TPU layout transposes) is left out. The TPU v2 backward's forward walk
  fetches k, v, g a second time (VMEM is no cache): counted.
- flops: 2*m*n*k of every matrix product of the per-chunk math (``common.py``), recomputations and
  per-tile repeats included (A once per dv tile); exps, selects and the GPU's scan-based prefix sums are
  not counted.
- launches: pallas_calls (plus one XLA fusion for v2's share sums on the GPU when dv has several tiles).
mode "fwd_bwd" is one forward and one backward (the backward recomputes the states: residuals are inputs).
segments=True (``segment_ids``, packed documents) costs the same here: the starts ride in log_g as -inf (no
extra kernel input or HBM byte), and the kernels' masks and reset counts are selects and masked row-sums, no
matrix product (the dlog_g suffix sum's mask is folded into the 0/1 matrix it already multiplies); the XLA
``where`` that writes the -inf into log_g is glue, left out like the padding.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp

from pallas_kernels.chunked_scan import tpu
from pallas_kernels.chunked_scan.common import BACKENDS, VARIANTS, BlockSizes
from pallas_kernels.chunked_scan.scan import _pad_dim

F32_BYTES = 4


class Cost(NamedTuple):
    hbm_bytes: int
    flops: int
    launches: int

    def __add__(self, other):  # NamedTuple's + would concatenate
        return Cost(*(a + b for a, b in zip(self, other)))


class _Chunk:
    """FLOPs of common.py's per-chunk helpers at chunk c (mm: 2*m*n*k)."""

    def __init__(self, c: int, per_dim: bool, tpu_: bool):
        self.c, self.per_dim, self.tpu = c, per_dim, tpu_

    def gates(self, width):  # chunk_gates over `width` key dims (per head: one column, no product)
        if not self.per_dim:
            return 0
        return 2 * self.c * self.c * width * (2 if self.tpu else 1)  # ">" (and "<=" on the TPU) as products

    def pair_decay(self):  # per head: seg_sum over a [C, C] matrix (a product on the TPU, a scan on the GPU)
        return 2 * self.c ** 3 if self.tpu else 0

    def scores(self, dk):  # intra_scores, fast path
        return 2 * self.c * self.c * dk + (0 if self.per_dim else self.pair_decay())

    def output(self, dk, bv):  # chunk_output
        return 2 * self.c * dk * bv + self.scores(dk) + 2 * self.c * self.c * bv

    def state(self, dk, bv):  # state_update / dstate_update
        return 2 * self.c * dk * bv

    def dv(self, dk, bv):  # chunk_dv
        return self.scores(dk) + 2 * self.c * self.c * bv + 2 * self.c * dk * bv

    def dqk(self, bk, dv):  # chunk_dqk
        c = self.c
        intra = 2 * (2 * c * c * bk) + (0 if self.per_dim else 2 * self.pair_decay())
        dg = 2 * (2 * c * c * bk) if self.per_dim else 0
        return 2 * (2 * c * c * dv) + intra + 2 * (2 * c * dv * bk) + dg


def cost(variant: str, *, batch: int, seq: int, heads: int, dk: int, dv: int, per_dim: bool, dtype,
         mode: str, block_sizes: BlockSizes | None = None, backend: str = "gpu", segments: bool = False) -> Cost:
    """Predicted cost of ``gla(..., variant=variant)`` (see the module docstring; ``segments`` changes nothing
    counted here)."""
    del segments  # same bytes, products and launches (module docstring)
    if variant not in VARIANTS:
        raise ValueError(f"{variant=} is not one of {VARIANTS}")
    if backend not in BACKENDS:
        raise ValueError(f"{backend=} is not one of {BACKENDS}")
    if mode not in ("fwd", "fwd_bwd"):
        raise ValueError(f"{mode=} must be 'fwd' or 'fwd_bwd'")
    dk, dv = _pad_dim(backend, dk), _pad_dim(backend, dv)
    bs = block_sizes or BlockSizes.get_default(dk, dv, backend=backend, variant=variant)
    c = bs.chunk
    n = max(1, -(-seq // c))
    seq = n * c
    s = jnp.dtype(dtype).itemsize
    g_w = dk if per_dim else 1
    rows = batch * seq * heads  # token rows
    bh = batch * heads
    q = k = rows * dk * s
    v = o = do = rows * dv * s
    g = rows * g_w * s
    state32 = bh * dk * dv * F32_BYTES  # h0, ht, dht, dh0
    states = bh * n * dk * dv * s  # per-chunk states, operand dtype
    dg32 = rows * g_w * F32_BYTES
    ch = _Chunk(c, per_dim, backend == "tpu")
    per_chunks = bh * n  # programs x chunks: FLOPs below are per (batch, head, chunk)

    def tile_sum(width, tile):  # (tiles, gate width of one tile)
        return width // tile, (tile if per_dim else 1)

    if backend == "gpu":
        nk, gk = tile_sum(dk, bs.block_k)
        nv = dv // bs.block_v
        states_pass = Cost(k + v + g + state32 + states + state32,
                           per_chunks * nk * nv * (ch.gates(gk) + ch.state(bs.block_k, bs.block_v)), 1)
        if variant == "v1":
            nvo = dv // bs.block_v_out
            fwd = states_pass + Cost(q + k + v + g + states + o,
                                     per_chunks * nvo * (ch.gates(g_w) + ch.output(dk, bs.block_v_out)), 1)
        else:
            fwd = Cost(q + k + v + g + state32 + o + state32,
                       per_chunks * nv * (ch.gates(g_w) + ch.output(dk, bs.block_v) + ch.state(dk, bs.block_v)), 1)
        if mode == "fwd":
            return fwd
        if variant == "v1":
            nkb, gkb = tile_sum(dk, bs.block_k_bwd)
            nvb = dv // bs.block_v_bwd
            dstates = Cost(q + do + g + state32 + states + state32,
                           per_chunks * nkb * nvb * (ch.gates(gkb) + ch.state(bs.block_k_bwd, bs.block_v_bwd)), 1)
            nkd, gkd = tile_sum(dk, bs.block_k_dv)
            nvd = dv // bs.block_v_dv
            dv_flops = nvd * (nkd * (ch.gates(gkd) + ch.scores(bs.block_k_dv) + 2 * c * bs.block_k_dv * bs.block_v_dv)
                              + 2 * c * c * bs.block_v_dv)
            dv_pass = Cost(q + k + g + do + states + v, per_chunks * dv_flops, 1)
            nkq, gkq = tile_sum(dk, bs.block_k_dqk)
            dg_cols = dg32 if per_dim else rows * nkq * F32_BYTES
            dqk = Cost(q + k + g + v + do + 2 * states + q + k + dg_cols + (0 if per_dim else dg_cols + dg32),
                       per_chunks * nkq * (ch.gates(gkq) + ch.dqk(bs.block_k_dqk, dv)), 1)
            bwd = states_pass + dstates + dv_pass + dqk
        else:
            nvb = dv // bs.block_v_bwd
            # dq, dk, dlog_g: float32 shares per dv tile summed by XLA; one tile writes them directly
            shares = nvb * (2 * rows * dk + rows * g_w) * F32_BYTES if nvb > 1 else q + k + dg32
            fused = Cost(q + k + v + g + do + states + state32 + shares + v + state32,
                         per_chunks * nvb * (ch.gates(g_w) + ch.dv(dk, bs.block_v_bwd) + ch.dqk(dk, bs.block_v_bwd)
                                             + ch.state(dk, bs.block_v_bwd)), 1)
            bwd = states_pass + fused
            if nvb > 1:
                bwd = bwd + Cost(shares + q + k + dg32, 0, 1)
        return fwd + bwd

    # TPU: whole [dk, dv] states per chunk
    fwd = Cost(q + k + v + g + state32 + o + state32,
               per_chunks * (ch.gates(g_w) + ch.output(dk, dv) + ch.state(dk, dv)), 1)
    if mode == "fwd":
        return fwd
    walk_flops = per_chunks * (ch.gates(g_w) + ch.state(dk, dv))
    back_flops = per_chunks * (ch.gates(g_w) + ch.dv(dk, dv) + ch.dqk(dk, dv) + ch.state(dk, dv))
    grads = q + k + v + dg32 + state32  # dq, dk, dv, dlog_g, dh0 written
    if variant == "v2" and n * dk * dv * F32_BYTES <= tpu.V2_STATES_VMEM:
        bwd = Cost(2 * (k + v + g) + q + do + 2 * state32 + grads, walk_flops + back_flops, 1)
    else:
        bwd = (Cost(k + v + g + state32 + states + state32, walk_flops, 1)
               + Cost(q + k + v + g + do + states + state32 + grads, back_flops, 1))
    return fwd + bwd
