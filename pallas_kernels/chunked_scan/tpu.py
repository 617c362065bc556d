"""Mosaic kernels for chunked GLA (TPU).

Mosaic tiles the last two dims of every block by (8, 128), so the arrays go to ``[batch, heads, seq, d]``
here (one transpose each way; dk, dv are padded to multiples of 128 by common.gla) and a block is one
chunk ``[C, d]``. Grid (batch, heads, chunk): batch and heads "parallel", the chunk axis "arbitrary"
(sequential), with the float32 state carried in VMEM scratch across it.

Forward: one kernel, outputs and the final state. Backward: the same kernel recomputes the state entering
each chunk (stored in the operand dtype), then one reverse-time kernel carries the state gradient and writes
dq, dk, dv, dlog_g per chunk and dh0 at the end.

Variant v2 (``cfg.variant``): the same forward at a chunk of 128 (``BlockSizes.get_default``: one MXU-wide tile
per product), and where every chunk's state fits ``V2_STATES_VMEM`` bytes of VMEM (float32) ONE backward
kernel over grid (batch, head, 2 * chunks): steps 0..N-1 walk forwards and keep the state entering each chunk
in VMEM scratch, steps N..2N-1 walk backwards as v1's reverse-time kernel, reading the states from VMEM; the
per-chunk states never go to HBM (and stay float32). Longer sequences take v1's two kernels.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.chunked_scan.common import (
    F32,
    Config,
    MatOps,
    chunk_gates,
    chunk_dqk,
    chunk_dv,
    chunk_output,
    dstate_update,
    state_update,
)

_SEMANTICS = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


def _bhtd(x):
    """[B, T, H, D] <-> [B, H, T, D]"""
    return jnp.swapaxes(x, 1, 2)


def _interpret(cfg: Config):
    return pltpu.InterpretParams() if cfg.interpret else False


def _forward_kernel(*refs, ops, n_chunks, emit_output):
    """emit_output: (q, k, v, g, h0) -> (o, ht); else (k, v, g, h0) -> (states, ht). Last ref: VMEM state."""
    if emit_output:
        q_ref, k_ref, v_ref, g_ref, h0_ref, o_ref, ht_ref, h_scr = refs
    else:
        k_ref, v_ref, g_ref, h0_ref, states_ref, ht_ref, h_scr = refs
    n = pl.program_id(2)

    @pl.when(n == 0)
    def _():
        h_scr[...] = h0_ref[...]

    h = h_scr[...]
    k, v = k_ref[...], v_ref[...]
    gates = chunk_gates(g_ref[...].astype(F32), ops)
    if emit_output:
        o_ref[...] = chunk_output(q_ref[...], k, v, gates, h, ops).astype(o_ref.dtype)
    else:
        states_ref[...] = h.astype(states_ref.dtype)
    h_scr[...] = state_update(h, k, v, gates, ops)

    @pl.when(n == n_chunks - 1)
    def _():
        ht_ref[...] = h_scr[...]


def _backward_kernel(q_ref, k_ref, v_ref, g_ref, do_ref, h_ref, dht_ref, dq_ref, dk_ref, dv_ref, dg_ref, dh0_ref,
                     dh_scr, *, ops, n_chunks):
    i = pl.program_id(2)  # chunk n_chunks - 1 - i

    @pl.when(i == 0)
    def _():
        dh_scr[...] = dht_ref[...]

    dh = dh_scr[...]  # gradient of the state leaving this chunk
    do = do_ref[...]
    gates = chunk_gates(g_ref[...].astype(F32), ops)

    q, k, v, h = q_ref[...], k_ref[...], v_ref[...], h_ref[...]
    dv_ref[...] = chunk_dv(q, k, gates, do, dh, ops).astype(dv_ref.dtype)
    dq, dk, dg = chunk_dqk(q, k, gates, v, do, h, dh, ops)
    dq_ref[...] = dq.astype(dq_ref.dtype)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dg_ref[...] = dg.astype(dg_ref.dtype)
    dh_scr[...] = dstate_update(dh, q, do, gates, ops)

    @pl.when(i == n_chunks - 1)
    def _():
        dh0_ref[...] = dh_scr[...]


def _fused_backward_kernel(q_ref, k_ref, v_ref, g_ref, do_ref, h0_ref, dht_ref, dq_ref, dk_ref, dv_ref, dg_ref,
                           dh0_ref, states_scr, carry_scr, *, ops, n_chunks):
    """v2: steps s < N carry the state forwards into ``states_scr``; steps s >= N carry its gradient back."""
    s = pl.program_id(2)
    gates = chunk_gates(g_ref[...].astype(F32), ops)
    k, v = k_ref[...], v_ref[...]

    @pl.when(s == 0)
    def _():
        carry_scr[...] = h0_ref[...]

    @pl.when(s < n_chunks)
    def _():
        h = carry_scr[...]
        states_scr[s] = h
        carry_scr[...] = state_update(h, k, v, gates, ops)

    @pl.when(s == n_chunks)
    def _():
        carry_scr[...] = dht_ref[...]

    @pl.when(s >= n_chunks)
    def _():
        dh = carry_scr[...]  # gradient of the state leaving chunk n
        q, do = q_ref[...], do_ref[...]
        h = states_scr[2 * n_chunks - 1 - s]
        dv_ref[...] = chunk_dv(q, k, gates, do, dh, ops).astype(dv_ref.dtype)
        dq, dk, dg = chunk_dqk(q, k, gates, v, do, h, dh, ops)
        dq_ref[...] = dq.astype(dq_ref.dtype)
        dk_ref[...] = dk.astype(dk_ref.dtype)
        dg_ref[...] = dg.astype(dg_ref.dtype)
        carry_scr[...] = dstate_update(dh, q, do, gates, ops)

    @pl.when(s == 2 * n_chunks - 1)
    def _():
        dh0_ref[...] = carry_scr[...]


def _specs(chunk, dk, dv, ng, n_chunks, reverse=False):
    """BlockSpecs on [B, H, T, d] arrays, chunk order forwards or backwards."""
    if reverse:
        def row(b, h, i):
            return b, h, n_chunks - 1 - i, 0
    else:
        def row(b, h, i):
            return b, h, i, 0

    def state(b, h, i):
        return b, h, 0, 0

    def chunk_state(b, h, i):
        return b, h, row(b, h, i)[2], 0, 0

    return dict(
        qk=pl.BlockSpec((None, None, chunk, dk), row),
        v=pl.BlockSpec((None, None, chunk, dv), row),
        g=pl.BlockSpec((None, None, chunk, ng), row),
        state=pl.BlockSpec((None, None, dk, dv), state),
        chunk_state=pl.BlockSpec((None, None, None, dk, dv), chunk_state),
    )


def _run_forward(cfg: Config, q, k, v, g, h0, emit_output):
    """On [B, H, T, d] arrays: (o, ht) or (states, ht)."""
    batch, heads, seq, dk = k.shape
    dv, ng, chunk = v.shape[-1], g.shape[-1], cfg.chunk
    n_chunks = seq // chunk
    ops = MatOps.for_config(cfg)
    s = _specs(chunk, dk, dv, ng, n_chunks)
    in_specs = [s["qk"], s["v"], s["g"], s["state"]]
    args = (k, v, g, h0)
    if emit_output:
        in_specs = [s["qk"], *in_specs]
        args = (q, *args)
        first = (s["v"], jax.ShapeDtypeStruct(v.shape, v.dtype))
    else:
        first = (s["chunk_state"], jax.ShapeDtypeStruct((batch, heads, n_chunks, dk, dv), ops.dtype))
    return pl.pallas_call(
        functools.partial(_forward_kernel, ops=ops, n_chunks=n_chunks, emit_output=emit_output),
        grid=(batch, heads, n_chunks),
        in_specs=in_specs,
        out_specs=[first[0], s["state"]],
        out_shape=[first[1], jax.ShapeDtypeStruct((batch, heads, dk, dv), F32)],
        scratch_shapes=[pltpu.VMEM((dk, dv), F32)],
        compiler_params=_SEMANTICS,
        interpret=_interpret(cfg),
        name="gla_forward" if emit_output else "gla_states",
    )(*args)


V2_STATES_VMEM = 8 * 1024 * 1024  # bytes of float32 states the v2 backward keeps in VMEM (T 16K at C 128, d 128)


def _fused_backward(cfg: Config, q, k, v, g, h0, do, dht):
    """v2 on [B, H, T, d] arrays: one kernel, states in VMEM (see the module docstring)."""
    batch, heads, seq, dk = q.shape
    dv, ng, chunk = v.shape[-1], g.shape[-1], cfg.chunk
    n = seq // chunk

    def read(b, h, s):  # chunk s forwards, then 2N-1-s backwards
        return b, h, jnp.where(s < n, s, 2 * n - 1 - s), 0

    def park(b, h, s):  # parked on chunk N-1 (the first one used) during the forward walk: the outputs are
        # not written back and q, do not fetched before the backward walk needs them (read once, written once)
        return b, h, jnp.where(s < n, n - 1, 2 * n - 1 - s), 0

    def blocks(width, index):
        return pl.BlockSpec((None, None, chunk, width), index)

    state = pl.BlockSpec((None, None, dk, dv), lambda b, h, s: (b, h, 0, 0))
    return pl.pallas_call(
        functools.partial(_fused_backward_kernel, ops=MatOps.for_config(cfg), n_chunks=n),
        grid=(batch, heads, 2 * n),
        in_specs=[blocks(dk, park), blocks(dk, read), blocks(dv, read), blocks(ng, read), blocks(dv, park),
                  state, state],
        out_specs=[blocks(dk, park), blocks(dk, park), blocks(dv, park), blocks(ng, park), state],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct(k.shape, k.dtype),
            jax.ShapeDtypeStruct(v.shape, v.dtype),
            jax.ShapeDtypeStruct(g.shape, F32),
            jax.ShapeDtypeStruct((batch, heads, dk, dv), F32),
        ],
        scratch_shapes=[pltpu.VMEM((n, dk, dv), F32), pltpu.VMEM((dk, dv), F32)],
        compiler_params=_SEMANTICS,
        interpret=_interpret(cfg),
        name="gla_v2_backward",
    )(q, k, v, g, do, h0, dht)


def states_fit_vmem(cfg: Config, seq: int, dk: int, dv: int) -> bool:
    """Whether the v2 backward keeps the states in VMEM (one kernel) at these padded sizes."""
    return cfg.variant == "v2" and (seq // cfg.chunk) * dk * dv * 4 <= V2_STATES_VMEM


def forward(cfg: Config, q, k, v, g, h0):
    """(o [B,T,H,dv] in v's dtype, ht [B,H,dk,dv] float32)."""
    o, ht = _run_forward(cfg, _bhtd(q), _bhtd(k), _bhtd(v), _bhtd(g), h0, emit_output=True)
    return _bhtd(o), ht


def backward(cfg: Config, q, k, v, g, h0, do, dht):
    """(dq, dk, dv, dlog_g float32, dh0 float32)."""
    q, k, v, g, do = (_bhtd(x) for x in (q, k, v, g, do.astype(v.dtype)))
    if states_fit_vmem(cfg, q.shape[2], q.shape[3], v.shape[3]):
        dq, dk_, dv_, dg, dh0 = _fused_backward(cfg, q, k, v, g, h0, do, dht)
        return _bhtd(dq), _bhtd(dk_), _bhtd(dv_), _bhtd(dg), dh0
    states, _ = _run_forward(cfg, None, k, v, g, h0, emit_output=False)
    batch, heads, seq, dk = q.shape
    dv, ng, chunk = v.shape[-1], g.shape[-1], cfg.chunk
    n_chunks = seq // chunk
    s = _specs(chunk, dk, dv, ng, n_chunks, reverse=True)
    dq, dk_, dv_, dg, dh0 = pl.pallas_call(
        functools.partial(_backward_kernel, ops=MatOps.for_config(cfg), n_chunks=n_chunks),
        grid=(batch, heads, n_chunks),
        in_specs=[s["qk"], s["qk"], s["v"], s["g"], s["v"], s["chunk_state"], s["state"]],
        out_specs=[s["qk"], s["qk"], s["v"], s["g"], s["state"]],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct(k.shape, k.dtype),
            jax.ShapeDtypeStruct(v.shape, v.dtype),
            jax.ShapeDtypeStruct(g.shape, F32),
            jax.ShapeDtypeStruct((batch, heads, dk, dv), F32),
        ],
        scratch_shapes=[pltpu.VMEM((dk, dv), F32)],
        compiler_params=_SEMANTICS,
        interpret=_interpret(cfg),
        name="gla_backward",
    )(q, k, v, g, do, states, dht)
    return _bhtd(dq), _bhtd(dk_), _bhtd(dv_), _bhtd(dg), dh0
