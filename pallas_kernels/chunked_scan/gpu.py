"""Pallas Triton kernels for chunked GLA (GPU). Arrays stay ``[batch, seq, heads, d]``; seq is a multiple of
the chunk and dk, dv are powers of two >= 16 (common.gla pads).

Forward, two launches (the structure of flash-linear-attention's chunk kernels):
  1. ``gla_states``: one program per (batch, head, dk tile, dv tile) walks the chunks in order, stores the
     state entering each chunk ``states[b, h, n]`` (operand dtype) and the final state (float32).
  2. ``gla_output``: one program per (dv tile, chunk, batch*head), all chunks in parallel, from ``states``.
Backward, four launches: ``gla_states`` again (recomputed, not saved), ``gla_dstates`` (the reverse-time
pass: the gradient of the state leaving each chunk, and dh0), then all chunks in parallel: ``gla_dv``
(whole dk, dv tiles) and ``gla_dqk`` (dq, dk, dlog_g; dk tiles, whole dv). Splitting dv from dq/dk keeps
each program's live tiles within the register file at dk = dv = 128 (fused, it spilled ~3.5 KB a thread).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.chunked_scan.common import (
    F32,
    Config,
    MatOps,
    chunk_gates,
    chunk_dqk,
    dv_parts,
    chunk_output,
    dstate_update,
    state_update,
)


def _states_kernel(k_ref, v_ref, g_ref, h0_ref, states_ref, ht_ref, *, ops, chunk, n_chunks):
    # k_ref [T, bk], v_ref [T, bv], g_ref [T, bk or 1], h0_ref [bk, bv]; states_ref [NT, bk, bv]
    def body(n, h):
        states_ref[n] = h.astype(states_ref.dtype)
        rows = pl.ds(n * chunk, chunk)
        gates = chunk_gates(g_ref[rows, :].astype(F32), ops)
        return state_update(h, k_ref[rows, :], v_ref[rows, :], gates, ops)

    ht_ref[...] = lax.fori_loop(0, n_chunks, body, h0_ref[...].astype(F32))


def _dstates_kernel(q_ref, do_ref, g_ref, dht_ref, dstates_ref, dh0_ref, *, ops, chunk, n_chunks):
    # dstates_ref[n]: gradient of the state leaving chunk n; the loop runs the chunks backwards
    def body(i, dh):
        n = n_chunks - 1 - i
        dstates_ref[n] = dh.astype(dstates_ref.dtype)
        rows = pl.ds(n * chunk, chunk)
        gates = chunk_gates(g_ref[rows, :].astype(F32), ops)
        return dstate_update(dh, q_ref[rows, :], do_ref[rows, :], gates, ops)

    dh0_ref[...] = lax.fori_loop(0, n_chunks, body, dht_ref[...].astype(F32))


def _output_kernel(q_ref, k_ref, v_ref, g_ref, h_ref, o_ref, *, ops):
    gates = chunk_gates(g_ref[...].astype(F32), ops)
    o = chunk_output(q_ref[...], k_ref[...], v_ref[...], gates, h_ref[...], ops)
    o_ref[...] = o.astype(o_ref.dtype)


def _dv_kernel(q_ref, k_ref, g_ref, do_ref, dh_ref, dv_ref, *, ops, block_k):
    # q, k, g [C, dk] whole (g [C, 1] per head); do [C, bv], dh [dk, bv]; A^T and the state term summed
    # over dk tiles of block_k, which keeps the live tiles small
    a_t, state_part = 0.0, 0.0
    for t in range(q_ref.shape[1] // block_k):
        cols = pl.ds(t * block_k, block_k)
        g = g_ref[:, cols] if g_ref.shape[1] > 1 else g_ref[...]
        a_t_part, state_t = dv_parts(q_ref[:, cols], k_ref[:, cols], chunk_gates(g.astype(F32), ops),
                                     dh_ref[cols, :], ops)
        a_t, state_part = a_t + a_t_part, state_part + state_t
    dv_ref[...] = (ops.mm(a_t, do_ref[...]) + state_part).astype(dv_ref.dtype)


def _dqk_kernel(q_ref, k_ref, g_ref, v_ref, do_ref, h_ref, dh_ref, dq_ref, dk_ref, dg_ref, *, ops):
    # q, k, g [C, bk] (g [C, 1] per head); v, do [C, dv] whole; h, dh [bk, dv]
    gates = chunk_gates(g_ref[...].astype(F32), ops)
    dq, dk, dg = chunk_dqk(q_ref[...], k_ref[...], gates, v_ref[...], do_ref[...], h_ref[...], dh_ref[...], ops)
    dq_ref[...] = dq.astype(dq_ref.dtype)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dg_ref[...] = dg.astype(dg_ref.dtype)


def _sequential_pass(kernel, name, cfg, a, bb, g, s0, block_k, block_v, num_warps):
    """One program per (batch, head, dk tile, dv tile) over all chunks: a [B,T,H,dk] and bb [B,T,H,dv] are
    (k, v) or (q, do); s0 [B,H,dk,dv] the carried state's start. Returns per-chunk states and the last."""
    batch, seq, heads, dk = a.shape
    dv = bb.shape[-1]
    chunk, n_chunks = cfg.chunk, seq // cfg.chunk
    nv = dv // block_v
    per_dim = g.shape[-1] > 1
    ops = MatOps.for_config(cfg)

    # grid (dk tile * dv tile, batch, head): the tiles of one head, which re-read the same k (or q), g
    # and v (or do), are adjacent (grid axis 0 is CUDA's fastest) so the re-reads come from L2
    def kv_map(i, b, h):
        return b, h, i // nv, i % nv

    in_specs = [
        pl.BlockSpec((None, seq, None, block_k), lambda i, b, h: (b, 0, h, i // nv)),
        pl.BlockSpec((None, seq, None, block_v), lambda i, b, h: (b, 0, h, i % nv)),
        pl.BlockSpec((None, seq, None, block_k if per_dim else 1),
                     lambda i, b, h: (b, 0, h, i // nv if per_dim else 0)),
        pl.BlockSpec((None, None, block_k, block_v), kv_map),
    ]
    out_specs = [
        pl.BlockSpec((None, None, n_chunks, block_k, block_v), lambda i, b, h: (b, h, 0, i // nv, i % nv)),
        pl.BlockSpec((None, None, block_k, block_v), kv_map),
    ]
    out_shape = [
        jax.ShapeDtypeStruct((batch, heads, n_chunks, dk, dv), ops.dtype),
        jax.ShapeDtypeStruct((batch, heads, dk, dv), F32),
    ]
    return pl.pallas_call(
        functools.partial(kernel, ops=ops, chunk=chunk, n_chunks=n_chunks),
        grid=((dk // block_k) * nv, batch, heads),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=cfg.block_sizes.num_stages),
        interpret=cfg.interpret,
        name=name,
    )(a, bb, g, s0)


def _states(cfg: Config, k, v, g, h0):
    bs = cfg.block_sizes
    return _sequential_pass(_states_kernel, "gla_states", cfg, k, v, g, h0, bs.block_k, bs.block_v,
                            bs.num_warps_states)


def _outputs(cfg: Config, q, k, v, g, states):
    batch, seq, heads, dk = q.shape
    dv, ng = v.shape[-1], g.shape[-1]
    chunk, bv = cfg.chunk, cfg.block_sizes.block_v_out
    ops = MatOps.for_config(cfg)

    # grid (dv tile, chunk, batch*head): the dv tiles of one chunk, which read the same q, k, g, run together
    def qk_map(j, n, bh):
        return bh // heads, n, bh % heads, 0

    def v_map(j, n, bh):
        return bh // heads, n, bh % heads, j

    return pl.pallas_call(
        functools.partial(_output_kernel, ops=ops),
        grid=(dv // bv, seq // chunk, batch * heads),
        in_specs=[
            pl.BlockSpec((None, chunk, None, dk), qk_map),
            pl.BlockSpec((None, chunk, None, dk), qk_map),
            pl.BlockSpec((None, chunk, None, bv), v_map),
            pl.BlockSpec((None, chunk, None, ng), qk_map),
            pl.BlockSpec((None, None, None, dk, bv), lambda j, n, bh: (bh // heads, bh % heads, n, 0, j)),
        ],
        out_specs=pl.BlockSpec((None, chunk, None, bv), v_map),
        out_shape=jax.ShapeDtypeStruct(v.shape, v.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=cfg.block_sizes.num_warps, num_stages=1),
        interpret=cfg.interpret,
        name="gla_output",
    )(q, k, v, g, states)


def forward(cfg: Config, q, k, v, g, h0):
    """(o [B,T,H,dv] in v's dtype, ht [B,H,dk,dv] float32)."""
    states, ht = _states(cfg, k, v, g, h0)
    return _outputs(cfg, q, k, v, g, states), ht


def backward(cfg: Config, q, k, v, g, h0, do, dht):
    """(dq, dk, dv, dlog_g float32, dh0 float32)."""
    bs = cfg.block_sizes
    ops = MatOps.for_config(cfg)
    do = do.astype(v.dtype)
    states, _ = _states(cfg, k, v, g, h0)
    dstates, dh0 = _sequential_pass(_dstates_kernel, "gla_dstates", cfg, q, do, g, dht, bs.block_k_bwd,
                                    bs.block_v_bwd, bs.num_warps_states)
    batch, seq, heads, dk = q.shape
    dv, ng, chunk = v.shape[-1], g.shape[-1], cfg.chunk
    per_dim = ng > 1
    params = plgpu.CompilerParams(num_warps=bs.num_warps_bwd, num_stages=1)

    # both passes: grid (tile, chunk, batch*head), the tiles of one chunk (which share reads) adjacent
    def rows(width, tiled):
        return pl.BlockSpec((None, chunk, None, width),
                            lambda j, n, bh: (bh // heads, n, bh % heads, j if tiled else 0))

    def state_rows(bk, bv, k_tiled):
        return pl.BlockSpec((None, None, None, bk, bv),
                            lambda j, n, bh: (bh // heads, bh % heads, n, j if k_tiled else 0, 0 if k_tiled else j))

    bv = bs.block_v_dv
    dv_ = pl.pallas_call(
        functools.partial(_dv_kernel, ops=ops, block_k=bs.block_k_dv),
        grid=(dv // bv, seq // chunk, batch * heads),
        in_specs=[rows(dk, False), rows(dk, False), rows(ng, False), rows(bv, True), state_rows(dk, bv, False)],
        out_specs=rows(bv, True),
        out_shape=jax.ShapeDtypeStruct(v.shape, v.dtype),
        compiler_params=params,
        interpret=cfg.interpret,
        name="gla_dv",
    )(q, k, g, do, dstates)

    bk = bs.block_k_dqk
    nk = dk // bk
    # per head, each dk tile writes its share of dlog_g into its own column; the columns are summed below
    dg_width, dg_cols = (bk, dk) if per_dim else (1, nk)
    dq, dk_, dg = pl.pallas_call(
        functools.partial(_dqk_kernel, ops=ops),
        grid=(nk, seq // chunk, batch * heads),
        in_specs=[rows(bk, True), rows(bk, True), rows(bk, True) if per_dim else rows(1, False),
                  rows(dv, False), rows(dv, False), state_rows(bk, dv, True), state_rows(bk, dv, True)],
        out_specs=[rows(bk, True), rows(bk, True), rows(dg_width, True)],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct(k.shape, k.dtype),
            jax.ShapeDtypeStruct((batch, seq, heads, dg_cols), F32),
        ],
        compiler_params=params,
        interpret=cfg.interpret,
        name="gla_dqk",
    )(q, k, g, v, do, states, dstates)
    if not per_dim:
        dg = jnp.sum(dg, axis=-1, keepdims=True)
    return dq, dk_, dv_, dg, dh0
