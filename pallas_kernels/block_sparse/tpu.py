"""Pallas Mosaic (TPU) kernels: forward, dq, and dk/dv, driven by scalar prefetch.

The selection drives the pipeline: ``block_indices`` / ``block_counts`` are scalar-prefetched and the k/v
BlockSpec index_map reads the selected key block, so only selected blocks are DMA'd. Forward and dq: grid
``(batch, kv_heads, n_q_blocks, max_blocks)`` with the last axis "arbitrary" (the accumulators live in VMEM
scratch across it); steps past the count are skipped with ``pl.when`` (their index repeats the last
selected block, so no new DMA is issued). dk/dv: grid ``(batch, kv_heads, steps)`` over the transposed
schedule (``common.kv_major_schedule``): per key block a header step that zeroes the accumulators, one step
per selecting query block, and a write on its last step; no atomics.

A step takes a whole query block for all query heads of the kv head: q is laid out ``[B, KV, G, T, d]`` and a
``[G, block_size, d]`` tile is stacked as ``G * block_size`` rows (row r: head r // bs, query r % bs).
Row statistics (m, l, lse, delta) are ``[rows, 1]`` columns.

Segment ids (packed documents; ``Static.segments``): q ids laid out like the row statistics, a ``[rows, 1]``
column per query block (broadcast over the group), k ids a ``[1, bs]`` row per key block fetched by the same
index map as k/v; ``q_ids == k_ids`` joins the visibility mask of every step (v1 masks every step anyway).
With None the kernels, their inputs and grids are exactly the unsegmented ones.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.block_sparse.common import Static, dot, kv_major_schedule, same_segment, visible

_NEG_INF = -jnp.inf


def _positions(st: Static, q_start, k_start, group: int):
    """Absolute row and key positions, both [rows, bs]."""
    bs = st.block_size
    row = lax.broadcasted_iota(jnp.int32, (group, bs, bs), 1).reshape(group * bs, bs)
    key = lax.broadcasted_iota(jnp.int32, (group * bs, bs), 1)
    return st.q_offset + q_start + row, k_start + key


def _logits(st: Static, q, k, q_start, k_start, group: int, q_ids=None, k_ids=None):
    """Masked logits [rows, bs]; with segment ids ``q_ids`` [rows, 1] / ``k_ids`` [1, bs] also the segment mask."""
    s = dot(q, k, trans_b=True) * st.scale
    row_pos, key_pos = _positions(st, q_start, k_start, group)
    mask = same_segment(visible(st, row_pos, key_pos), q_ids, k_ids)
    return s if mask is None else jnp.where(mask, s, _NEG_INF)


def _seg_refs(st: Static, refs):
    """Split the refs after the q/k/v-like inputs into (q ids ref, k ids ref) or (None, None), and the rest."""
    if st.segments:
        return refs[0], refs[1], refs[2:]
    return None, None, refs


def _ids(ref):
    return None if ref is None else ref[...]


def _interpret(st: Static):
    return pltpu.InterpretParams() if st.interpret else False


# ------------------------------------------------------------------------------------------------ kernels


def _query_block_step():
    """In the forward / dq grid (batch b, kv head h, query block i, step t): (i, t, max_blocks, flat), flat the
    row of (b, h, i) in the flattened block schedule."""
    b, h, i, t = (pl.program_id(a) for a in range(4))
    kv_heads, n_qb, max_blocks = pl.num_programs(1), pl.num_programs(2), pl.num_programs(3)
    return i, t, max_blocks, (b * kv_heads + h) * n_qb + i


def _fwd_kernel(idx_ref, cnt_ref, q_ref, k_ref, v_ref, *refs, st: Static):
    qs_ref, ks_ref, (o_ref, lse_ref, m_sc, l_sc, acc_sc) = _seg_refs(st, refs)
    i, t, max_blocks, flat = _query_block_step()
    group, bs, d = q_ref.shape

    @pl.when(t == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, _NEG_INF, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(t < cnt_ref[flat])
    def _step():
        q = q_ref[...].reshape(group * bs, d)
        k_start = idx_ref[flat * max_blocks + t] * bs
        s = _logits(st, q, k_ref[...], i * bs, k_start, group, _ids(qs_ref), _ids(ks_ref))
        m_prev = m_sc[...]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        m_use = jnp.where(m_new == _NEG_INF, 0.0, m_new)
        alpha = jnp.exp(m_prev - m_use)
        p = jnp.exp(s - m_use)
        l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1, keepdims=True)
        acc_sc[...] = alpha * acc_sc[...] + dot(p.astype(v_ref.dtype), v_ref[...])
        m_sc[...] = m_new

    @pl.when(t == max_blocks - 1)
    def _finish():
        l = l_sc[...]
        m = m_sc[...]
        empty = l == 0.0
        l_safe = jnp.where(empty, 1.0, l)
        o_ref[...] = (acc_sc[...] / l_safe).astype(o_ref.dtype).reshape(group, bs, d)
        lse_ref[...] = jnp.where(empty, _NEG_INF, jnp.where(m == _NEG_INF, 0.0, m) + jnp.log(l_safe))


def _dq_kernel(idx_ref, cnt_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, st: Static):
    qs_ref, ks_ref, (dq_ref, dq_sc) = _seg_refs(st, refs)
    i, t, max_blocks, flat = _query_block_step()
    group, bs, d = q_ref.shape

    @pl.when(t == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    @pl.when(t < cnt_ref[flat])
    def _step():
        q = q_ref[...].reshape(group * bs, d)
        do = do_ref[...].reshape(group * bs, d)
        lse = lse_ref[...]
        lse = jnp.where(lse == _NEG_INF, 0.0, lse)  # such rows see no key: every logit is -inf, p = 0
        k = k_ref[...]
        k_start = idx_ref[flat * max_blocks + t] * bs
        p = jnp.exp(_logits(st, q, k, i * bs, k_start, group, _ids(qs_ref), _ids(ks_ref)) - lse)
        ds = p * (dot(do, v_ref[...], trans_b=True) - delta_ref[...])
        dq_sc[...] += dot(ds.astype(k.dtype), k)

    @pl.when(t == max_blocks - 1)
    def _finish():
        dq_ref[...] = (dq_sc[...] * st.scale).astype(dq_ref.dtype).reshape(group, bs, d)


def _dkv_kernel(qb_ref, kb_ref, last_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, st: Static):
    qs_ref, ks_ref, (dk_ref, dv_ref, dk_sc, dv_sc) = _seg_refs(st, refs)
    b, h, t = (pl.program_id(a) for a in range(3))
    kv_heads, steps = pl.num_programs(1), pl.num_programs(2)
    group, bs, d = q_ref.shape
    flat = (b * kv_heads + h) * steps + t
    qblk = qb_ref[flat]

    @pl.when(qblk == -1)
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    @pl.when(qblk >= 0)
    def _step():
        q = q_ref[...].reshape(group * bs, d)
        do = do_ref[...].reshape(group * bs, d)
        lse = lse_ref[...]
        lse = jnp.where(lse == _NEG_INF, 0.0, lse)
        p = jnp.exp(_logits(st, q, k_ref[...], qblk * bs, kb_ref[flat] * bs, group, _ids(qs_ref), _ids(ks_ref))
                    - lse)
        dv_sc[...] += dot(p.T.astype(do.dtype), do)
        ds = p * (dot(do, v_ref[...], trans_b=True) - delta_ref[...])
        dk_sc[...] += dot(ds.T.astype(q.dtype), q)

    @pl.when(last_ref[flat] == 1)
    def _finish():
        dk_ref[...] = (dk_sc[...] * st.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


# ----------------------------------------------------------------------------------------- pallas_calls


def _q_layout(x, kv_heads: int):
    """[B, T, H, d] -> [B, KV, G, T, d]."""
    batch, seq, heads, d = x.shape
    return x.reshape(batch, seq, kv_heads, heads // kv_heads, d).transpose(0, 2, 3, 1, 4)


def _q_layout_back(x):
    batch, kv_heads, group, seq, d = x.shape
    return x.transpose(0, 3, 1, 2, 4).reshape(batch, seq, kv_heads * group, d)


def _vec_layout(x, kv_heads: int, bs: int):
    """[B, H, T] -> [B, KV, nQB, G*bs, 1] (rows of one query block, head-major)."""
    batch, heads, seq = x.shape
    x = x.reshape(batch, kv_heads, heads // kv_heads, seq // bs, bs).transpose(0, 1, 3, 2, 4)
    return x.reshape(batch, kv_heads, seq // bs, heads // kv_heads * bs, 1).astype(jnp.float32)


def _vec_layout_back(x, heads: int):
    batch, kv_heads, n_qb, rows, _ = x.shape
    bs = rows // (heads // kv_heads)
    x = x.reshape(batch, kv_heads, n_qb, heads // kv_heads, bs).transpose(0, 1, 3, 2, 4)
    return x.reshape(batch, heads, n_qb * bs)


def _kv_layout(x):
    return x.transpose(0, 2, 1, 3)  # [B, T, KV, d] -> [B, KV, T, d]


def _seg_layout(seg, group: int, bs: int):
    """Segment ids (q [B, Tq], k [B, Tk]) -> q ids [B, nQB, G*bs, 1] (a column per query block, rows head-major
    as the stacked q: row r is query r % bs) and k ids [B, nKB, 1, bs] (a row per key block)."""
    q_seg, k_seg = seg
    batch, seq_q = q_seg.shape
    qs = jnp.tile(q_seg.reshape(batch, seq_q // bs, 1, bs), (1, 1, group, 1))
    return qs.reshape(batch, seq_q // bs, group * bs, 1), k_seg.reshape(batch, -1, 1, bs)


def _seg_specs(st: Static, rows: int, q_block, k_block):
    """BlockSpecs of ``_seg_layout``'s ids ([] without segment ids): ``q_block`` / ``k_block`` map the grid
    indices and prefetched refs to (batch, query block) / (batch, key block)."""
    if not st.segments:
        return []
    bs = st.block_size
    return [pl.BlockSpec((None, None, rows, 1), lambda *a: (*q_block(*a), 0, 0)),
            pl.BlockSpec((None, None, 1, bs), lambda *a: (*k_block(*a), 0, 0))]


def forward(st: Static, q, k, v, idx, cnt, seg=None):
    """q [B, Tq, H, d], k/v [B, Tk, KV, d] (seq padded to whole blocks) -> o [B, Tq, H, d], lse [B, H, Tq].
    ``seg``: None or (q segment ids [B, Tq], k segment ids [B, Tk]) int32."""
    batch, seq_q, heads, d = q.shape
    kv_heads = k.shape[2]
    group, bs = heads // kv_heads, st.block_size
    n_qb, max_blocks = seq_q // bs, idx.shape[-1]
    rows = group * bs

    def kv_map(b, h, i, t, idx_ref, cnt_ref):
        return b, h, idx_ref[((b * kv_heads + h) * n_qb + i) * max_blocks + t], 0

    q_spec = pl.BlockSpec((None, None, group, bs, d), lambda b, h, i, t, *_: (b, h, 0, i, 0))
    seg_specs = _seg_specs(st, rows, lambda b, h, i, t, *_: (b, i), lambda *a: (a[0], kv_map(*a)[2]))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(batch, kv_heads, n_qb, max_blocks),
        in_specs=[q_spec, pl.BlockSpec((None, None, bs, d), kv_map), pl.BlockSpec((None, None, bs, d), kv_map),
                  *seg_specs],
        out_specs=[q_spec, pl.BlockSpec((None, None, None, rows, 1), lambda b, h, i, t, *_: (b, h, i, 0, 0))],
        scratch_shapes=[pltpu.VMEM((rows, 1), jnp.float32), pltpu.VMEM((rows, 1), jnp.float32),
                        pltpu.VMEM((rows, d), jnp.float32)],
    )
    qt = _q_layout(q, kv_heads)
    o, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, st=st),
        grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct(qt.shape, q.dtype),
                   jax.ShapeDtypeStruct((batch, kv_heads, n_qb, rows, 1), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=_interpret(st),
        debug=st.debug,
        name="block_sparse_fwd",
    )(idx.reshape(-1), cnt.reshape(-1), qt, _kv_layout(k), _kv_layout(v),
      *(() if seg is None else _seg_layout(seg, group, bs)))
    return _q_layout_back(o), _vec_layout_back(lse, heads)


def backward(st: Static, q, k, v, idx, cnt, o, lse, do, dlse, seg=None):
    """Cotangents (dq, dk, dv) for cotangents do [B, Tq, H, d] of o and dlse [B, H, Tq] of lse (``seg`` as
    ``forward``)."""
    batch, seq_q, heads, d = q.shape
    seq_k, kv_heads = k.shape[1], k.shape[2]
    group, bs = heads // kv_heads, st.block_size
    n_qb, n_kb, max_blocks = seq_q // bs, seq_k // bs, idx.shape[-1]
    rows = group * bs
    # d lse_i / d s_ij = p_ij, so an lse cotangent folds into delta: ds = p * (dp - (delta - dlse))
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1).transpose(0, 2, 1) - dlse
    qt, dot_ = _q_layout(q, kv_heads), _q_layout(do, kv_heads)
    kt, vt = _kv_layout(k), _kv_layout(v)
    lse5, delta5 = _vec_layout(lse, kv_heads, bs), _vec_layout(delta, kv_heads, bs)

    def kv_map(b, h, i, t, idx_ref, cnt_ref):
        return b, h, idx_ref[((b * kv_heads + h) * n_qb + i) * max_blocks + t], 0

    q_spec = pl.BlockSpec((None, None, group, bs, d), lambda b, h, i, t, *_: (b, h, 0, i, 0))
    vec_spec = pl.BlockSpec((None, None, None, rows, 1), lambda b, h, i, t, *_: (b, h, i, 0, 0))
    kv_spec = pl.BlockSpec((None, None, bs, d), kv_map)
    seg_in = () if seg is None else _seg_layout(seg, group, bs)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, st=st),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(batch, kv_heads, n_qb, max_blocks),
            in_specs=[q_spec, kv_spec, kv_spec, q_spec, vec_spec, vec_spec,
                      *_seg_specs(st, rows, lambda b, h, i, t, *_: (b, i), lambda *a: (a[0], kv_map(*a)[2]))],
            out_specs=q_spec,
            scratch_shapes=[pltpu.VMEM((rows, d), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct(qt.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=_interpret(st),
        debug=st.debug,
        name="block_sparse_dq",
    )(idx.reshape(-1), cnt.reshape(-1), qt, kt, vt, dot_, lse5, delta5, *seg_in)

    q_block, k_block, last = kv_major_schedule(idx, cnt, n_kb)
    steps = q_block.shape[-1]

    def flat(b, h, t):
        return (b * kv_heads + h) * steps + t

    def q_map(b, h, t, qb_ref, kb_ref, last_ref):
        return b, h, 0, jnp.maximum(qb_ref[flat(b, h, t)], 0), 0

    def vec_map(b, h, t, qb_ref, kb_ref, last_ref):
        return b, h, jnp.maximum(qb_ref[flat(b, h, t)], 0), 0, 0

    def k_map(b, h, t, qb_ref, kb_ref, last_ref):
        return b, h, kb_ref[flat(b, h, t)], 0

    kblk = pl.BlockSpec((None, None, bs, d), k_map)
    qblk = pl.BlockSpec((None, None, group, bs, d), q_map)
    vblk = pl.BlockSpec((None, None, None, rows, 1), vec_map)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, st=st),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(batch, kv_heads, steps),
            in_specs=[qblk, kblk, kblk, qblk, vblk, vblk,
                      *_seg_specs(st, rows, lambda *a: (a[0], q_map(*a)[3]), lambda *a: (a[0], k_map(*a)[2]))],
            out_specs=[kblk, kblk],
            scratch_shapes=[pltpu.VMEM((bs, d), jnp.float32), pltpu.VMEM((bs, d), jnp.float32)],
        ),
        out_shape=[jax.ShapeDtypeStruct(kt.shape, k.dtype), jax.ShapeDtypeStruct(vt.shape, v.dtype)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=_interpret(st),
        debug=st.debug,
        name="block_sparse_dkv",
    )(q_block.reshape(-1), k_block.reshape(-1), last.reshape(-1), qt, kt, vt, dot_, lse5, delta5, *seg_in)
    return _q_layout_back(dq), _kv_layout(dk), _kv_layout(dv)
