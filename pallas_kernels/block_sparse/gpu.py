"""Pallas Triton (GPU) kernels: forward, dq, and dk/dv over the selected key blocks only.

Layout: q is viewed as ``[batch, seq_q, kv_heads, group, d]`` (a free reshape of ``[batch, seq_q, heads, d]``);
a program loads ``[block_q, group, d]`` and stacks it as ``block_q * group`` rows, so each selected key block
is loaded once per GQA group. Triton needs power-of-2 tiles: ``group`` and ``d`` are zero-padded to powers
of 2 (d >= 16) here when they are not (padded heads have zero q/do and add nothing to dk/dv). k and v are
passed whole per (batch, kv head) and sliced with ``pl.ds(index * block_size, block_size)``; the indices are
read as scalars from a ref, as jax's own GPU kernels read their block tables.

Outputs are written with ``plgpu.store``, as jax's GPU attention does. Masks use -inf; a row whose running max is still -inf uses 0 in its place, so fully masked rows give
``p = 0`` (never NaN), output 0 and lse -inf.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.block_sparse.common import Static, dot, kv_major_csr, next_pow2, visible

_NEG_INF = -jnp.inf


def _row_positions(st: Static, first_row, rows: int, group: int):
    """Absolute positions [rows, 1] of stacked rows (row r = query first_row + r // group)."""
    return st.q_offset + first_row + lax.broadcasted_iota(jnp.int32, (rows, 1), 0) // group


def _key_positions(start, block_size: int):
    return start + lax.broadcasted_iota(jnp.int32, (1, block_size), 1)


def _logits(st: Static, q, k, row_pos, key_pos):
    s = dot(q, k, trans_b=True) * st.scale
    mask = visible(st, row_pos, key_pos)
    return s if mask is None else jnp.where(mask, s, _NEG_INF)


# ------------------------------------------------------------------------------------------------ kernels


def _fwd_kernel(idx_ref, cnt_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, st: Static, block_q: int):
    bs = st.block_size
    _, group, dp = q_ref.shape
    rows = block_q * group
    q = q_ref[...].reshape(rows, dp)
    row_pos = _row_positions(st, pl.program_id(0) * block_q, rows, group)

    def body(t, carry):
        acc, m, l = carry
        start = pl.multiple_of(idx_ref[t] * bs, bs)
        k = k_ref[pl.ds(start, bs), :]
        v = v_ref[pl.ds(start, bs), :]
        s = _logits(st, q, k, row_pos, _key_positions(start, bs))
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        m_use = jnp.where(m_new == _NEG_INF, 0.0, m_new)
        alpha = jnp.exp(m - m_use)
        p = jnp.exp(s - m_use[:, None])
        l = alpha * l + jnp.sum(p, axis=1)
        acc = alpha[:, None] * acc + dot(p.astype(v.dtype), v)
        return acc, m_new, l

    init = (jnp.zeros((rows, dp), jnp.float32), jnp.full((rows,), _NEG_INF, jnp.float32),
            jnp.zeros((rows,), jnp.float32))
    acc, m, l = lax.fori_loop(0, cnt_ref[0], body, init)
    empty = l == 0.0
    l_safe = jnp.where(empty, 1.0, l)
    plgpu.store(o_ref, (acc / l_safe[:, None]).astype(o_ref.dtype).reshape(block_q, group, dp))
    lse = jnp.where(empty, _NEG_INF, jnp.where(m == _NEG_INF, 0.0, m) + jnp.log(l_safe))
    plgpu.store(lse_ref, lse.reshape(block_q, group))


def _dq_kernel(idx_ref, cnt_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, st: Static,
               block_q: int):
    bs = st.block_size
    _, group, dp = q_ref.shape
    rows = block_q * group
    q = q_ref[...].reshape(rows, dp)
    do = do_ref[...].reshape(rows, dp)
    lse = lse_ref[...].reshape(rows)
    lse = jnp.where(lse == _NEG_INF, 0.0, lse)  # such rows see no key: every logit is -inf, p = 0
    delta = delta_ref[...].reshape(rows)
    row_pos = _row_positions(st, pl.program_id(0) * block_q, rows, group)

    def body(t, dq):
        start = pl.multiple_of(idx_ref[t] * bs, bs)
        k = k_ref[pl.ds(start, bs), :]
        v = v_ref[pl.ds(start, bs), :]
        p = jnp.exp(_logits(st, q, k, row_pos, _key_positions(start, bs)) - lse[:, None])
        ds = p * (dot(do, v, trans_b=True) - delta[:, None])
        return dq + dot(ds.astype(k.dtype), k)

    dq = lax.fori_loop(0, cnt_ref[0], body, jnp.zeros((rows, dp), jnp.float32))
    plgpu.store(dq_ref, (dq * st.scale).astype(dq_ref.dtype).reshape(block_q, group, dp))


def _dkv_kernel(off_ref, num_ref, qlist_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref,
                *, st: Static, block_q: int):
    bs = st.block_size
    _, group, dp = q_ref.shape
    rows = block_q * group
    steps = bs // block_q  # row chunks per selecting query block
    k = k_ref[...]
    v = v_ref[...]
    key_pos = _key_positions(pl.program_id(0) * bs, bs)
    offset = off_ref[0]

    def body(u, carry):
        dk, dv = carry
        qblk = qlist_ref[offset + lax.div(u, steps)]
        r0 = pl.multiple_of(qblk * bs + lax.rem(u, steps) * block_q, block_q)
        q = q_ref[pl.ds(r0, block_q), :, :].reshape(rows, dp)
        do = do_ref[pl.ds(r0, block_q), :, :].reshape(rows, dp)
        lse = lse_ref[pl.ds(r0, block_q), :].reshape(rows)
        lse = jnp.where(lse == _NEG_INF, 0.0, lse)
        delta = delta_ref[pl.ds(r0, block_q), :].reshape(rows)
        p = jnp.exp(_logits(st, q, k, _row_positions(st, r0, rows, group), key_pos) - lse[:, None])
        dv = dv + dot(p.astype(do.dtype), do, trans_a=True)
        ds = p * (dot(do, v, trans_b=True) - delta[:, None])
        dk = dk + dot(ds.astype(q.dtype), q, trans_a=True)
        return dk, dv

    zeros = jnp.zeros((bs, dp), jnp.float32)
    dk, dv = lax.fori_loop(0, num_ref[0] * steps, body, (zeros, zeros))
    plgpu.store(dk_ref, (dk * st.scale).astype(dk_ref.dtype))
    plgpu.store(dv_ref, dv.astype(dv_ref.dtype))


# ----------------------------------------------------------------------------------------- pallas_calls


def _q_to_rows(x, kv_heads: int):
    """[B, T, H, d] -> [B, T, KV, Gp, dp] (zero padding only where needed)."""
    batch, seq, heads, d = x.shape
    group = heads // kv_heads
    gp, dp = next_pow2(group), max(16, next_pow2(d))
    x = x.reshape(batch, seq, kv_heads, group, d)
    if (gp, dp) != (group, d):
        x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, gp - group), (0, dp - d)))
    return x


def _pad_d(x):
    """[B, T, KV, d] -> [B, T, KV, dp]."""
    d = x.shape[-1]
    dp = max(16, next_pow2(d))
    return x if dp == d else jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, dp - d)))


def _rows_to_heads(x, heads: int, d: int | None):
    """[B, T, KV, Gp(, dp)] -> [B, T, heads(, d)], dropping padding."""
    batch, seq, kv_heads = x.shape[:3]
    group = heads // kv_heads
    x = x[:, :, :, :group] if d is None else x[:, :, :, :group, :d]
    return x.reshape(batch, seq, heads, *(() if d is None else (d,)))


def _heads_to_rows(x, kv_heads: int, fill: float):
    """[B, T, heads] -> [B, T, KV, Gp] float32 (padding heads filled with ``fill``)."""
    batch, seq, heads = x.shape
    group = heads // kv_heads
    x = x.reshape(batch, seq, kv_heads, group).astype(jnp.float32)
    return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, next_pow2(group) - group)), constant_values=fill)


def _params(st: Static, rows: int, dp: int):
    bsz = st.block_sizes
    return plgpu.CompilerParams(num_warps=bsz.warps(rows, dp), num_stages=bsz.num_stages)


def forward(st: Static, q, k, v, idx, cnt):
    """q [B, Tq, H, d], k/v [B, Tk, KV, d] (seq padded to whole blocks) -> o [B, Tq, H, d], lse [B, H, Tq]."""
    batch, seq_q, heads, d = q.shape
    seq_k, kv_heads = k.shape[1], k.shape[2]
    q5, k4, v4 = _q_to_rows(q, kv_heads), _pad_d(k), _pad_d(v)
    gp, dp = q5.shape[3], q5.shape[4]
    block_q = st.block_sizes.block_q
    per_block = st.block_size // block_q
    max_blocks = idx.shape[-1]
    grid = (seq_q // block_q, batch, kv_heads)
    o5, lse4 = pl.pallas_call(
        functools.partial(_fwd_kernel, st=st, block_q=block_q),
        grid=grid,
        in_specs=[
            pl.BlockSpec((None, None, None, max_blocks), lambda i, b, h: (b, h, lax.div(i, per_block), 0)),
            pl.BlockSpec((None, None, 1), lambda i, b, h: (b, h, lax.div(i, per_block))),
            pl.BlockSpec((None, block_q, None, gp, dp), lambda i, b, h: (b, i, h, 0, 0)),
            pl.BlockSpec((None, seq_k, None, dp), lambda i, b, h: (b, 0, h, 0)),
            pl.BlockSpec((None, seq_k, None, dp), lambda i, b, h: (b, 0, h, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, block_q, None, gp, dp), lambda i, b, h: (b, i, h, 0, 0)),
            pl.BlockSpec((None, block_q, None, gp), lambda i, b, h: (b, i, h, 0)),
        ],
        out_shape=[jax.ShapeDtypeStruct(q5.shape, q.dtype),
                   jax.ShapeDtypeStruct(q5.shape[:4], jnp.float32)],
        compiler_params=_params(st, block_q * gp, dp),
        interpret=st.interpret,
        debug=st.debug,
        name="block_sparse_fwd",
    )(idx, cnt, q5, k4, v4)
    o = _rows_to_heads(o5, heads, d)
    lse = _rows_to_heads(lse4, heads, None).transpose(0, 2, 1)
    return o, lse


def backward(st: Static, q, k, v, idx, cnt, o, lse, do, dlse):
    """Cotangents (dq, dk, dv) for cotangents do [B, Tq, H, d] of o and dlse [B, H, Tq] of lse."""
    batch, seq_q, heads, d = q.shape
    seq_k, kv_heads = k.shape[1], k.shape[2]
    n_kb = seq_k // st.block_size
    # d lse_i / d s_ij = p_ij, so an lse cotangent folds into delta: ds = p * (dp - (delta - dlse))
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1) - dlse.transpose(0, 2, 1)
    q5, k4, v4 = _q_to_rows(q, kv_heads), _pad_d(k), _pad_d(v)
    do5 = _q_to_rows(do, kv_heads)
    gp, dp = q5.shape[3], q5.shape[4]
    lse4 = _heads_to_rows(lse.transpose(0, 2, 1), kv_heads, 0.0)
    delta4 = _heads_to_rows(delta, kv_heads, 0.0)
    max_blocks = idx.shape[-1]

    bq = st.block_sizes.block_q_dq
    per_block = st.block_size // bq
    row_spec = pl.BlockSpec((None, bq, None, gp, dp), lambda i, b, h: (b, i, h, 0, 0))
    vec_spec = pl.BlockSpec((None, bq, None, gp), lambda i, b, h: (b, i, h, 0))
    kv_spec = pl.BlockSpec((None, seq_k, None, dp), lambda i, b, h: (b, 0, h, 0))
    dq5 = pl.pallas_call(
        functools.partial(_dq_kernel, st=st, block_q=bq),
        grid=(seq_q // bq, batch, kv_heads),
        in_specs=[
            pl.BlockSpec((None, None, None, max_blocks), lambda i, b, h: (b, h, lax.div(i, per_block), 0)),
            pl.BlockSpec((None, None, 1), lambda i, b, h: (b, h, lax.div(i, per_block))),
            row_spec, kv_spec, kv_spec, row_spec, vec_spec, vec_spec,
        ],
        out_specs=row_spec,
        out_shape=jax.ShapeDtypeStruct(q5.shape, q.dtype),
        compiler_params=_params(st, bq * gp, dp),
        interpret=st.interpret,
        debug=st.debug,
        name="block_sparse_dq",
    )(idx, cnt, q5, k4, v4, do5, lse4, delta4)

    offsets, nums, qlist = kv_major_csr(idx, cnt, n_kb)
    bq = st.block_sizes.block_q_dkv
    full_rows = pl.BlockSpec((None, seq_q, None, gp, dp), lambda j, b, h: (b, 0, h, 0, 0))
    full_vec = pl.BlockSpec((None, seq_q, None, gp), lambda j, b, h: (b, 0, h, 0))
    blk_spec = pl.BlockSpec((None, st.block_size, None, dp), lambda j, b, h: (b, j, h, 0))
    dk4, dv4 = pl.pallas_call(
        functools.partial(_dkv_kernel, st=st, block_q=bq),
        grid=(n_kb, batch, kv_heads),
        in_specs=[
            pl.BlockSpec((None, None, 1), lambda j, b, h: (b, h, j)),
            pl.BlockSpec((None, None, 1), lambda j, b, h: (b, h, j)),
            pl.BlockSpec((None, None, qlist.shape[-1]), lambda j, b, h: (b, h, 0)),
            full_rows, blk_spec, blk_spec, full_rows, full_vec, full_vec,
        ],
        out_specs=[blk_spec, blk_spec],
        out_shape=[jax.ShapeDtypeStruct(k4.shape, k.dtype), jax.ShapeDtypeStruct(v4.shape, v.dtype)],
        compiler_params=_params(st, max(bq * gp, 2 * st.block_size), dp),  # dk and dv accumulators
        interpret=st.interpret,
        debug=st.debug,
        name="block_sparse_dkv",
    )(offsets, nums, qlist, q5, k4, v4, do5, lse4, delta4)
    return _rows_to_heads(dq5, heads, d), dk4[..., :d], dv4[..., :d]
