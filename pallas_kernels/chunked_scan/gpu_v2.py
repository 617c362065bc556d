"""Pallas Triton kernels for chunked GLA, variant v2 (GPU): the state stays in registers across chunks.

Same array contract as ``gpu.py`` (``[batch, seq, heads, d]``, seq a multiple of the chunk, dk and dv powers of
two >= 16) and the same per-chunk math (``common.py``: one helper per formula, shared with v1 and the TPU).

Forward, ONE launch ``gla_v2_forward``: one program per (dv tile, batch, head) walks the chunks in order with
the float32 state ``h [dk, bv]`` as the ``fori_loop`` carry; each iteration reads the chunk's q, k [C, dk],
v [C, bv], g, writes o [C, bv] = (q*exp(b)) h + A v and updates h. q, k, g are read once per dv tile (the
tiles of one head are adjacent in the grid, so the re-reads come from L2), v once, o written once, plus
the final state: no per-chunk states in HBM. A is recomputed per dv tile (dv/bv = 2 at 128/64): cheaper
than an [C, C] round trip through HBM.

Backward, TWO launches (v1: four):
  1. ``gla_states`` (v1's sequential states pass, ``gpu._states``): the state entering each chunk, stored in
     the operand dtype. The gradient of log_g needs h_n and dh_n of the same chunk together (the term
     exp(B) sum_v h*dh of ``common.chunk_dqk``), and neither can be walked against its own direction
     without dividing by exp(B); so one direction is stored, as fla's chunk kernels do.
  2. ``gla_v2_backward``: one program per (dv tile, batch, head) walks the chunks in reverse with the
     state gradient ``dh [dk, bv]`` as the carry and writes, per chunk, dv [C, bv] (complete: A^T and the
     state term contract over the whole dk held by the program) and this dv tile's share of dq, dk, dlog_g
     (every term of ``common.chunk_dqk`` is linear in the (v, do, h, dh) columns of one dv tile). The
     shares go to float32 ``[dv tiles, B, T, H, dk]`` arrays summed by XLA afterwards: at dv = 128, bv = 64
     that is 2 x 4 bytes written and read per dq/dk element, cheaper than a third launch recomputing the
     intra-chunk gradients with whole dv (fla's fused_chunk_gla sums dv-tile partials the same way); with
     bv = dv (``block_v_bwd``) there is one share, written in the operand dtype, and no sum.
Per-head decay (log_g ``[..., 1]``) takes common.py's per-head path: one [C, C] decay matrix exp(b_i - b_j)
on q k^T, no per-dimension folding, dlog_g summed over dk inside the program.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.chunked_scan import gpu
from pallas_kernels.chunked_scan.common import (
    F32,
    Config,
    MatOps,
    chunk_dqk,
    chunk_dv,
    chunk_gates,
    chunk_output,
    dstate_update,
    state_update,
)


def _forward_kernel(q_ref, k_ref, v_ref, g_ref, h0_ref, o_ref, ht_ref, *, ops, chunk, n_chunks):
    # q, k [T, dk], v [T, bv], g [T, dk or 1], h0 [dk, bv] -> o [T, bv], ht [dk, bv]
    def body(n, h):
        rows = pl.ds(n * chunk, chunk)
        q, k, v = q_ref[rows, :], k_ref[rows, :], v_ref[rows, :]
        gates = chunk_gates(g_ref[rows, :].astype(F32), ops)
        o_ref[rows, :] = chunk_output(q, k, v, gates, h, ops).astype(o_ref.dtype)
        return state_update(h, k, v, gates, ops)

    ht_ref[...] = lax.fori_loop(0, n_chunks, body, h0_ref[...].astype(F32))


def _backward_kernel(q_ref, k_ref, v_ref, g_ref, do_ref, states_ref, dht_ref,
                     dq_ref, dk_ref, dv_ref, dg_ref, dh0_ref, *, ops, chunk, n_chunks):
    # q, k [T, dk], v, do [T, bv], g [T, dk or 1], states [N, dk, bv], dht [dk, bv]; dq, dk, dg: this dv
    # tile's shares; the loop runs the chunks backwards with dh = gradient of the state leaving chunk n
    def body(i, dh):
        n = n_chunks - 1 - i
        rows = pl.ds(n * chunk, chunk)
        q, k, v, do = q_ref[rows, :], k_ref[rows, :], v_ref[rows, :], do_ref[rows, :]
        gates = chunk_gates(g_ref[rows, :].astype(F32), ops)
        dv_ref[rows, :] = chunk_dv(q, k, gates, do, dh, ops).astype(dv_ref.dtype)
        dq, dk, dg = chunk_dqk(q, k, gates, v, do, states_ref[n], dh, ops)
        dq_ref[rows, :] = dq.astype(dq_ref.dtype)
        dk_ref[rows, :] = dk.astype(dk_ref.dtype)
        dg_ref[rows, :] = dg
        return dstate_update(dh, q, do, gates, ops)

    dh0_ref[...] = lax.fori_loop(0, n_chunks, body, dht_ref[...].astype(F32))


def _specs(seq, dk, dv_tile, ng):
    """Grid (dv tile j, batch b, head h): whole-sequence blocks of q/k, of v/do/o (tile j), of g; the state."""
    def rows(width, tiled):
        return pl.BlockSpec((None, seq, None, width), lambda j, b, h: (b, 0, h, j if tiled else 0))

    state = pl.BlockSpec((None, None, dk, dv_tile), lambda j, b, h: (b, h, 0, j))
    return rows(dk, False), rows(dv_tile, True), rows(ng, False), state


def forward(cfg: Config, q, k, v, g, h0):
    """(o [B,T,H,dv] in v's dtype, ht [B,H,dk,dv] float32), one launch."""
    batch, seq, heads, dk = q.shape
    dv, ng = v.shape[-1], g.shape[-1]
    bs = cfg.block_sizes
    bv = bs.block_v
    qk, vt, gs, state = _specs(seq, dk, bv, ng)
    return pl.pallas_call(
        functools.partial(_forward_kernel, ops=MatOps.for_config(cfg), chunk=cfg.chunk, n_chunks=seq // cfg.chunk),
        grid=(dv // bv, batch, heads),
        in_specs=[qk, qk, vt, gs, state],
        out_specs=[vt, state],
        out_shape=[jax.ShapeDtypeStruct(v.shape, v.dtype), jax.ShapeDtypeStruct((batch, heads, dk, dv), F32)],
        compiler_params=plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
        interpret=cfg.interpret,
        name="gla_v2_forward",
    )(q, k, v, g, h0)


def backward(cfg: Config, q, k, v, g, h0, do, dht):
    """(dq, dk, dv, dlog_g float32, dh0 float32), two launches."""
    batch, seq, heads, dk = q.shape
    dv, ng, chunk = v.shape[-1], g.shape[-1], cfg.chunk
    bs = cfg.block_sizes
    bv = bs.block_v_bwd
    nv = dv // bv
    share = F32 if nv > 1 else q.dtype  # one dv tile: dq, dk written once, in the operand dtype
    do = do.astype(v.dtype)
    states, _ = gpu._states(cfg, k, v, g, h0)  # [B, H, N, dk, dv] in the operand dtype
    qk, vt, gs, state = _specs(seq, dk, bv, ng)

    def tile_share(width):  # this dv tile's share, [nv, B, T, H, width]
        return pl.BlockSpec((None, None, seq, None, width), lambda j, b, h: (j, b, 0, h, 0))

    dq, dk_, dv_, dg, dh0 = pl.pallas_call(
        functools.partial(_backward_kernel, ops=MatOps.for_config(cfg), chunk=chunk, n_chunks=seq // chunk),
        grid=(nv, batch, heads),
        in_specs=[qk, qk, vt, gs, vt,
                  pl.BlockSpec((None, None, seq // chunk, dk, bv), lambda j, b, h: (b, h, 0, 0, j)), state],
        out_specs=[tile_share(dk), tile_share(dk), vt, tile_share(ng), state],
        out_shape=[
            jax.ShapeDtypeStruct((nv, batch, seq, heads, dk), share),
            jax.ShapeDtypeStruct((nv, batch, seq, heads, dk), share),
            jax.ShapeDtypeStruct(v.shape, v.dtype),
            jax.ShapeDtypeStruct((nv, batch, seq, heads, ng), F32),
            jax.ShapeDtypeStruct((batch, heads, dk, dv), F32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=bs.num_warps_bwd, num_stages=bs.num_stages),
        interpret=cfg.interpret,
        name="gla_v2_backward",
    )(q, k, v, g, do, states, dht)
    if nv == 1:
        return dq[0], dk_[0], dv_, dg[0], dh0
    return dq.sum(0).astype(q.dtype), dk_.sum(0).astype(k.dtype), dv_, dg.sum(0), dh0
