"""Design v2 of the Pallas Mosaic (TPU) kernels (``Static.variant == "v2"``); v1 (``tpu.py``) stays the default.

The v2 changes that apply to the TPU grid (see ``gpu_v2.py`` for the full list):

1. The key-major dk/dv schedule (``common.kv_major_schedule``: a sort) is built once by ``plan`` in the
   custom_vjp's forward rule and saved as a residual; the backward builds nothing.
2. A step masks only when its key block needs it (causal diagonal, keys past ``seq_k``): the test is on
   prefetched scalars, and the mask-free body is a separate ``pl.when`` branch without iota/compare/select.
3. dk/dv take ``s^T = k q^T`` and ``dp^T = v do^T`` directly ([bs, rows], lse and delta as [1, rows] row
   vectors): no transposes of p and ds.

Segment ids (``Static.segments``): v1's id layouts (``tpu._seg_layout``; dk/dv takes q ids as a [1, rows] row and
k ids as a [bs, 1] column, free reshapes); ``plan`` also builds per-block tables (lowest id, uniform) of both
(``common.segment_block_table``), scalar-prefetched, so a step stays on the mask-free branch only when its query
block and key block lie wholly inside one segment (and need no causal / length mask).

Products computed twice (q k^T and do v^T, in dq and in dk/dv) are kept: the dk/dv pass visits a query block
once per key block it selected, so a fused dq would need one float32 partial per (query block, key block)
pair in HBM, more traffic than the two recomputed products.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.block_sparse import tpu
from pallas_kernels.block_sparse.common import (Static, dot, kv_major_schedule, same_segment, segment_block_table,
                                                segment_uniform_pair, visible)

_NEG_INF = -jnp.inf


def _needs_mask(st: Static, q_start, k_start, seg_rows=None):
    """Traced bool: does the key block at ``k_start`` need a mask for the query block at ``q_start``? With
    segment ids ``seg_rows = (q table ref, k table ref, q block row, k block row)`` also unless both blocks lie
    in one segment."""
    bs = st.block_size
    need = jnp.bool_(False)
    if st.causal:
        need = k_start + bs - 1 > st.q_offset + q_start
    if st.key_mask_needed():
        need = need | (k_start + bs > st.seq_k)
    if seg_rows is not None:
        need = need | jnp.logical_not(segment_uniform_pair(*seg_rows))
    return need


def _seg_refs(st: Static, refs, n_in: int):
    """Kernel refs after the two (three) schedule refs: (q table, k table) or None, the ``n_in`` inputs, the
    (q ids, k ids) refs or (None, None), and the rest (outputs, scratch)."""
    if not st.segments:
        return None, refs[:n_in], (None, None), refs[n_in:]
    return refs[:2], refs[2:2 + n_in], refs[2 + n_in:4 + n_in], refs[4 + n_in:]


def _branches(st: Static, need, body):
    """Run ``body(masked)`` once: the masked variant where ``need`` holds, the mask-free one elsewhere."""
    if not (st.causal or st.key_mask_needed() or st.segments):
        body(False)
        return
    pl.when(need)(lambda: body(True))
    pl.when(jnp.logical_not(need))(lambda: body(False))


def _fwd_kernel(idx_ref, cnt_ref, *refs, st: Static, n_kb: int = 0):
    tables, (q_ref, k_ref, v_ref), (qs_ref, ks_ref), (o_ref, lse_ref, m_sc, l_sc, acc_sc) = _seg_refs(st, refs, 3)
    i, t, max_blocks, flat = tpu._query_block_step()
    group, bs, d = q_ref.shape

    @pl.when(t == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, _NEG_INF, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    k_start = idx_ref[flat * max_blocks + t] * bs

    def body(masked: bool):
        q = q_ref[...].reshape(group * bs, d)
        if masked:
            s = tpu._logits(st, q, k_ref[...], i * bs, k_start, group, tpu._ids(qs_ref), tpu._ids(ks_ref))
        else:
            s = dot(q, k_ref[...], trans_b=True) * st.scale
        m_prev = m_sc[...]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        m_use = jnp.where(m_new == _NEG_INF, 0.0, m_new)
        alpha = jnp.exp(m_prev - m_use)
        p = jnp.exp(s - m_use)
        l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1, keepdims=True)
        acc_sc[...] = alpha * acc_sc[...] + dot(p.astype(v_ref.dtype), v_ref[...])
        m_sc[...] = m_new

    @pl.when(t < cnt_ref[flat])
    def _step():
        _branches(st, _needs_mask(st, i * bs, k_start, _seg_rows(tables, i, lax.div(k_start, bs), n_kb)), body)

    @pl.when(t == max_blocks - 1)
    def _finish():
        l = l_sc[...]
        m = m_sc[...]
        empty = l == 0.0
        l_safe = jnp.where(empty, 1.0, l)
        o_ref[...] = (acc_sc[...] / l_safe).astype(o_ref.dtype).reshape(group, bs, d)
        lse_ref[...] = jnp.where(empty, _NEG_INF, jnp.where(m == _NEG_INF, 0.0, m) + jnp.log(l_safe))


def _seg_rows(tables, qblk, kblk, n_kb: int, n_qb=None):
    """``_needs_mask``'s segment argument for query block ``qblk`` / key block ``kblk`` of batch row
    ``program_id(0)`` (None without segment ids); ``n_qb`` None: the forward / dq grid's query-block axis."""
    if tables is None:
        return None
    b = pl.program_id(0)
    n_qb = pl.num_programs(2) if n_qb is None else n_qb
    return (*tables, b * n_qb + qblk, b * n_kb + kblk)


def _dq_kernel(idx_ref, cnt_ref, *refs, st: Static, n_kb: int = 0):
    tables, (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), (qs_ref, ks_ref), (dq_ref, dq_sc) = \
        _seg_refs(st, refs, 6)
    i, t, max_blocks, flat = tpu._query_block_step()
    group, bs, d = q_ref.shape

    @pl.when(t == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    k_start = idx_ref[flat * max_blocks + t] * bs

    def body(masked: bool):
        q = q_ref[...].reshape(group * bs, d)
        do = do_ref[...].reshape(group * bs, d)
        lse = lse_ref[...]
        lse = jnp.where(lse == _NEG_INF, 0.0, lse)
        k = k_ref[...]
        if masked:
            s = tpu._logits(st, q, k, i * bs, k_start, group, tpu._ids(qs_ref), tpu._ids(ks_ref))
        else:
            s = dot(q, k, trans_b=True) * st.scale
        p = jnp.exp(s - lse)
        ds = p * (dot(do, v_ref[...], trans_b=True) - delta_ref[...])
        dq_sc[...] += dot(ds.astype(k.dtype), k)

    @pl.when(t < cnt_ref[flat])
    def _step():
        _branches(st, _needs_mask(st, i * bs, k_start, _seg_rows(tables, i, lax.div(k_start, bs), n_kb)), body)

    @pl.when(t == max_blocks - 1)
    def _finish():
        dq_ref[...] = (dq_sc[...] * st.scale).astype(dq_ref.dtype).reshape(group, bs, d)


def _dkv_kernel(qb_ref, kb_ref, last_ref, *refs, st: Static, n_qb: int = 0, n_kb: int = 0):
    tables, (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), (qs_ref, ks_ref), (dk_ref, dv_ref, dk_sc, dv_sc) = \
        _seg_refs(st, refs, 6)
    b, h, t = (pl.program_id(a) for a in range(3))
    kv_heads, steps = pl.num_programs(1), pl.num_programs(2)
    group, bs, d = q_ref.shape
    rows = group * bs
    flat = (b * kv_heads + h) * steps + t
    qblk = qb_ref[flat]
    k_start = kb_ref[flat] * bs

    @pl.when(qblk == -1)
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    def body(masked: bool):
        q = q_ref[...].reshape(rows, d)
        do = do_ref[...].reshape(rows, d)
        lse = lse_ref[...]  # [1, rows]
        lse = jnp.where(lse == _NEG_INF, 0.0, lse)
        s_t = dot(k_ref[...], q, trans_b=True) * st.scale  # [bs, rows]
        if masked:  # row r of the stacked block is query r % bs of head r // bs
            key_pos = k_start + lax.broadcasted_iota(jnp.int32, (bs, rows), 0)
            row_pos = st.q_offset + qblk * bs + lax.rem(lax.broadcasted_iota(jnp.int32, (bs, rows), 1), bs)
            # segment ids: q a [1, rows] row, k a [bs, 1] column
            mask = same_segment(visible(st, row_pos, key_pos), tpu._ids(qs_ref), tpu._ids(ks_ref))
            s_t = s_t if mask is None else jnp.where(mask, s_t, _NEG_INF)
        p_t = jnp.exp(s_t - lse)
        dv_sc[...] += dot(p_t.astype(do.dtype), do)
        ds_t = p_t * (dot(v_ref[...], do, trans_b=True) - delta_ref[...])
        dk_sc[...] += dot(ds_t.astype(q.dtype), q)

    @pl.when(qblk >= 0)
    def _step():
        _branches(st, _needs_mask(st, qblk * bs, k_start, _seg_rows(tables, qblk, kb_ref[flat], n_kb, n_qb)), body)

    @pl.when(last_ref[flat] == 1)
    def _finish():
        dk_ref[...] = (dk_sc[...] * st.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


# ----------------------------------------------------------------------------------------- plan + calls


def plan(st: Static, idx, cnt, *, backward: bool, seg=None):
    """(idx, cnt) and, with ``backward``, the dk/dv schedule (q_block, k_block, last): built once; with segment
    ids ``seg`` then the per-block tables (q table, k table) of ``common.segment_block_table``."""
    tables = () if seg is None else tuple(segment_block_table(x, st.block_size) for x in seg)
    if not backward:
        return idx, cnt, *tables
    return (idx, cnt, *kv_major_schedule(idx, cnt, -(-st.seq_k // st.block_size)), *tables)


def _seg_work(st: Static, work):
    """(schedule arrays, segment tables ()) of a ``plan``."""
    return (work[:-2], work[-2:]) if st.segments else (work, ())


def forward(st: Static, q, k, v, work, seg=None):
    """As ``tpu.forward``; ``work`` from ``plan``, ``seg`` None or (q ids [B, Tq], k ids [B, Tk]) int32."""
    batch, seq_q, heads, d = q.shape
    kv_heads = k.shape[2]
    work, tables = _seg_work(st, work)
    idx, cnt = work[:2]
    group, bs = heads // kv_heads, st.block_size
    n_qb, max_blocks = seq_q // bs, idx.shape[-1]
    rows = group * bs

    def kv_map(b, h, i, t, idx_ref, *_):
        return b, h, idx_ref[((b * kv_heads + h) * n_qb + i) * max_blocks + t], 0

    q_spec = pl.BlockSpec((None, None, group, bs, d), lambda b, h, i, t, *_: (b, h, 0, i, 0))
    seg_specs = tpu._seg_specs(st, rows, lambda b, h, i, t, *_: (b, i), lambda *a: (a[0], kv_map(*a)[2]))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2 + len(tables),
        grid=(batch, kv_heads, n_qb, max_blocks),
        in_specs=[q_spec, pl.BlockSpec((None, None, bs, d), kv_map), pl.BlockSpec((None, None, bs, d), kv_map),
                  *seg_specs],
        out_specs=[q_spec, pl.BlockSpec((None, None, None, rows, 1), lambda b, h, i, t, *_: (b, h, i, 0, 0))],
        scratch_shapes=[pltpu.VMEM((rows, 1), jnp.float32), pltpu.VMEM((rows, 1), jnp.float32),
                        pltpu.VMEM((rows, d), jnp.float32)],
    )
    qt = tpu._q_layout(q, kv_heads)
    o, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, st=st, **_n_kb(st, k)),
        grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct(qt.shape, q.dtype),
                   jax.ShapeDtypeStruct((batch, kv_heads, n_qb, rows, 1), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=tpu._interpret(st),
        debug=st.debug,
        name="block_sparse_v2_fwd",
    )(idx.reshape(-1), cnt.reshape(-1), *tables, qt, tpu._kv_layout(k), tpu._kv_layout(v),
      *(() if seg is None else tpu._seg_layout(seg, group, bs)))
    return tpu._q_layout_back(o), tpu._vec_layout_back(lse, heads)


def _n_kb(st: Static, k):
    """The static key-block count the kernels index the segment tables by ({} without segment ids)."""
    return {"n_kb": k.shape[1] // st.block_size} if st.segments else {}


def backward(st: Static, q, k, v, work, o, lse, do, dlse, seg=None):
    """As ``tpu.backward``; ``work`` is ``plan(..., backward=True)`` saved by the forward (``seg`` as ``forward``)."""
    work, tables = _seg_work(st, work)
    idx, cnt, q_block, k_block, last = work
    batch, seq_q, heads, d = q.shape
    kv_heads = k.shape[2]
    group, bs = heads // kv_heads, st.block_size
    n_qb, max_blocks = seq_q // bs, idx.shape[-1]
    rows = group * bs
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1).transpose(0, 2, 1) - dlse
    qt, dot_ = tpu._q_layout(q, kv_heads), tpu._q_layout(do, kv_heads)
    kt, vt = tpu._kv_layout(k), tpu._kv_layout(v)
    lse5, delta5 = tpu._vec_layout(lse, kv_heads, bs), tpu._vec_layout(delta, kv_heads, bs)

    def kv_map(b, h, i, t, idx_ref, *_):
        return b, h, idx_ref[((b * kv_heads + h) * n_qb + i) * max_blocks + t], 0

    q_spec = pl.BlockSpec((None, None, group, bs, d), lambda b, h, i, t, *_: (b, h, 0, i, 0))
    vec_spec = pl.BlockSpec((None, None, None, rows, 1), lambda b, h, i, t, *_: (b, h, i, 0, 0))
    kv_spec = pl.BlockSpec((None, None, bs, d), kv_map)
    seg_in = () if seg is None else tpu._seg_layout(seg, group, bs)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, st=st, **_n_kb(st, k)),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2 + len(tables),
            grid=(batch, kv_heads, n_qb, max_blocks),
            in_specs=[q_spec, kv_spec, kv_spec, q_spec, vec_spec, vec_spec,
                      *tpu._seg_specs(st, rows, lambda b, h, i, t, *_: (b, i), lambda *a: (a[0], kv_map(*a)[2]))],
            out_specs=q_spec,
            scratch_shapes=[pltpu.VMEM((rows, d), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct(qt.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=tpu._interpret(st),
        debug=st.debug,
        name="block_sparse_v2_dq",
    )(idx.reshape(-1), cnt.reshape(-1), *tables, qt, kt, vt, dot_, lse5, delta5, *seg_in)

    steps = q_block.shape[-1]

    def flat(b, h, t):
        return (b * kv_heads + h) * steps + t

    def q_map(b, h, t, qb_ref, *_):
        return b, h, 0, jnp.maximum(qb_ref[flat(b, h, t)], 0), 0

    def vec_map(b, h, t, qb_ref, *_):
        return b, h, jnp.maximum(qb_ref[flat(b, h, t)], 0), 0, 0

    def k_map(b, h, t, qb_ref, kb_ref, *_):
        return b, h, kb_ref[flat(b, h, t)], 0

    kblk = pl.BlockSpec((None, None, bs, d), k_map)
    qblk = pl.BlockSpec((None, None, group, bs, d), q_map)
    row_vec = pl.BlockSpec((None, None, None, 1, rows), vec_map)  # lse / delta as [1, rows] rows
    as_row = lambda x: x.reshape(batch, kv_heads, n_qb, 1, rows)  # free: the trailing axis is 1
    seg_specs, seg_t = [], ()
    if seg is not None:  # transposed ids: q a [1, rows] row, k a [bs, 1] column (free reshapes)
        seg_specs = [pl.BlockSpec((None, None, 1, rows), lambda *a: (a[0], q_map(*a)[3], 0, 0)),
                     pl.BlockSpec((None, None, bs, 1), lambda *a: (a[0], k_map(*a)[2], 0, 0))]
        seg_t = (seg_in[0].reshape(batch, n_qb, 1, rows), seg_in[1].reshape(batch, -1, bs, 1))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, st=st, **({"n_qb": n_qb, **_n_kb(st, k)} if st.segments else {})),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3 + len(tables),
            grid=(batch, kv_heads, steps),
            in_specs=[qblk, kblk, kblk, qblk, row_vec, row_vec, *seg_specs],
            out_specs=[kblk, kblk],
            scratch_shapes=[pltpu.VMEM((bs, d), jnp.float32), pltpu.VMEM((bs, d), jnp.float32)],
        ),
        out_shape=[jax.ShapeDtypeStruct(kt.shape, k.dtype), jax.ShapeDtypeStruct(vt.shape, v.dtype)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=tpu._interpret(st),
        debug=st.debug,
        name="block_sparse_v2_dkv",
    )(q_block.reshape(-1), k_block.reshape(-1), last.reshape(-1), *tables, qt, kt, vt, dot_, as_row(lse5),
      as_row(delta5), *seg_t)
    return tpu._q_layout_back(dq), tpu._kv_layout(dk), tpu._kv_layout(dv)
