"""Pallas Triton (GPU) kernels: forward, dq, and dk/dv over the selected key blocks only.

Layout: q is viewed as ``[batch, seq_q, kv_heads, group, d]`` (a free reshape of ``[batch, seq_q, heads, d]``);
a program loads ``[block_q, group, d]`` and stacks it as ``block_q * group`` rows, so each selected key block
is loaded once per GQA group. Triton needs power-of-2 tiles: ``group`` and ``d`` are zero-padded to powers
of 2 (d >= 16) here when they are not (padded heads have zero q/do and add nothing to dk/dv). k and v are
passed whole per (batch, kv head); a step's key rows are gathered from the selected block starts (one or two
blocks per step, ``BlockSizes.kv_step``), which are read as scalars one step ahead so that the key-tile
loads do not wait on the index load and Triton's software pipeline can issue them early.

Softmax in base 2: logits are scaled by ``scale * log2(e)`` once and exponentiated with ``exp2``; lse is
stored in natural log. Masks use -inf; a row whose running max is still -inf uses 0 in its place, so fully
masked rows give ``p = 0`` (never NaN), output 0 and lse -inf.

Backward: ``delta = rowsum(o * do) - dlse`` and the base-2 lse are prepared once in XLA. dq: one program per
query rows, like the forward. dk/dv: no atomics; one program per key block over the query blocks that
selected it (``common.dkv_work_items``), computed transposed (keys as rows: ``s^T = k q^T``) so p^T and ds^T
feed the dv and dk products without a transpose; key blocks selected by many query blocks (the initial
block: all of them) are split into chunks whose float32 partials are summed in XLA.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.block_sparse.common import (Static, dkv_work_items, dot, next_pow2, same_segment,
                                                segment_block_uniform, visible)

_NEG_INF = -jnp.inf
_LOG2E = math.log2(math.e)


def _row_positions(st: Static, first_row, rows: int, group: int):
    """Absolute positions [rows] of stacked rows (row r = query first_row + r // group)."""
    return st.q_offset + first_row + lax.broadcasted_iota(jnp.int32, (rows,), 0) // group


def _step_blocks(idx_ref, step, kv_step: int):
    """The ``kv_step`` key-block indices of a step (clamped into the list; entries past the count repeat the
    last listed block, see ``normalize_indices``)."""
    last = idx_ref.shape[0] - 1
    return tuple(idx_ref[jnp.minimum(step * kv_step + j, last)] for j in range(kv_step))


def _key_rows(blocks, bs: int, step, kv_step: int, count):
    """Key rows [kv_step * bs] of a step's blocks, and (kv_step > 1) which of them belong to a listed block
    (the last step of an odd count has one)."""
    iota = lax.broadcasted_iota(jnp.int32, (kv_step * bs,), 0)
    if kv_step == 1:
        return blocks[0] * bs + iota, None
    which = iota // bs
    base = blocks[0]
    for j in range(1, kv_step):
        base = jnp.where(which == j, blocks[j], base)
    return base * bs + iota % bs, which + step * kv_step < count


def _keep(st: Static, row_pos, key_pos, listed, q_seg=None, k_seg=None):
    """bool [R, K] (or None: all): query rows ``row_pos`` [R] see keys ``key_pos`` [K] of listed blocks (and,
    with segment ids ``q_seg`` [R] / ``k_seg`` [K], of their own segment)."""
    mask = same_segment(visible(st, row_pos[:, None], key_pos[None, :]), q_seg, k_seg)
    if listed is not None:
        mask = listed[None, :] if mask is None else mask & listed[None, :]
    return mask


def _over_listed_blocks(st: Static, idx_ref, cnt_ref, kv_step: int, step, init):
    """Runs ``carry = step(carry, key_rows, listed, masked)`` over a query block's listed key blocks,
    ``kv_step`` blocks at a time: first the blocks that need no mask (``masked`` False: every key is
    visible to every row; the wrapper lists them first, ``_mask_free_first``), then the rest. Each step's
    block indices are read one step ahead, so the key-tile loads never wait on the index load."""
    bs = st.block_size
    count, n_free = cnt_ref[0], cnt_ref[1]
    free_steps = n_free // kv_step

    def loop(first, n_steps, masked, carry):
        def body(t, c):
            *c, blocks = c
            key_rows, listed = _key_rows(blocks, bs, first + t, kv_step, count)
            c = step(tuple(c), key_rows, listed, masked)
            return (*c, _step_blocks(idx_ref, first + t + 1, kv_step))

        *carry, _ = lax.fori_loop(0, n_steps, body, (*carry, _step_blocks(idx_ref, first, kv_step)))
        return tuple(carry)

    carry = loop(0, free_steps, False, init)
    return loop(free_steps, (count - free_steps * kv_step + kv_step - 1) // kv_step, True, carry)


# ------------------------------------------------------------------------------------------------ kernels


def _seg_refs(st: Static, refs, n_out: int):
    """Split trailing kernel refs into (q_seg ref, k_seg ref) or (None, None), and the ``n_out`` outputs."""
    if st.segments:
        return refs[0], refs[1], refs[2:2 + n_out]
    return None, None, refs[:n_out]


def store_dkv(dk_ref, dv_ref, dk_part_ref, dv_part_ref, dk, dv, slot, start, bs: int):
    """Write a work item's dk, dv [bs, dp]: into rows [start, start + bs) of the outputs when the item owns its
    key block (slot -1), else as float32 partials at `slot` (summed per key block afterwards)."""

    @pl.when(slot == -1)
    def _write():
        plgpu.store(dk_ref.at[pl.ds(start, bs), :], dk.astype(dk_ref.dtype))
        plgpu.store(dv_ref.at[pl.ds(start, bs), :], dv.astype(dv_ref.dtype))

    @pl.when(slot >= 0)
    def _write_partial():
        plgpu.store(dk_part_ref.at[slot], dk)
        plgpu.store(dv_part_ref.at[slot], dv)


def online_softmax_init(rows: int, dp: int):
    """(acc [rows, dp], running max [rows], denominator [rows]) before the first key step."""
    return (jnp.zeros((rows, dp), jnp.float32), jnp.full((rows,), _NEG_INF, jnp.float32),
            jnp.zeros((rows,), jnp.float32))


def online_softmax_step(acc, m, l, s, v, cs):
    """One key step of the base-2 online softmax: logits s [rows, keys] (times ``cs`` in the exponent), values v
    [keys, dp]. Rows that have seen no key keep m = -inf and contribute exp2(-inf) = 0."""
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    m_use = jnp.where(m_new == _NEG_INF, 0.0, m_new) * cs
    alpha = jnp.exp2(m * cs - m_use)
    p = jnp.exp2(s * cs - m_use[:, None])
    l = alpha * l + jnp.sum(p, axis=1)
    return alpha[:, None] * acc + dot(p.astype(v.dtype), v), m_new, l


def store_softmax(o_ref, lse_ref, acc, m, l, cs):
    """Write o = acc / l as o_ref's [block_q, group, dp] and the natural-log lse [block_q, group] (-inf where a
    row saw no key)."""
    empty = l == 0.0
    l_safe = jnp.where(empty, 1.0, l)
    plgpu.store(o_ref, (acc / l_safe[:, None]).astype(o_ref.dtype).reshape(o_ref.shape))
    m2 = jnp.where(m == _NEG_INF, 0.0, m) * cs
    lse = jnp.where(empty, _NEG_INF, (m2 + jnp.log2(l_safe)) / _LOG2E)
    plgpu.store(lse_ref, lse.reshape(lse_ref.shape))


def _fwd_kernel(idx_ref, cnt_ref, q_ref, k_ref, v_ref, *refs, st: Static, block_q: int, kv_step: int):
    qs_ref, ks_ref, (o_ref, lse_ref) = _seg_refs(st, refs, 2)
    _, group, dp = q_ref.shape
    rows = block_q * group
    q = q_ref[...].reshape(rows, dp)
    q_seg = None if qs_ref is None else qs_ref[...].reshape(rows)
    row_pos = _row_positions(st, pl.program_id(0) * block_q, rows, group)
    # base-2 softmax; with a positive scale the running max is kept on raw logits and the scale folds into
    # the exponent's multiply-add
    c = st.scale * _LOG2E
    prescale = c <= 0

    def step(carry, key_rows, listed, masked):
        acc, m, l = carry
        s = dot(q, k_ref[key_rows, :], trans_b=True)
        if prescale:
            s = s * c
        if masked:
            k_seg = None if ks_ref is None else ks_ref[key_rows]
            s = jnp.where(_keep(st, row_pos, key_rows, listed, q_seg, k_seg), s, _NEG_INF)
        return online_softmax_step(acc, m, l, s, v_ref[key_rows, :], 1.0 if prescale else c)

    acc, m, l = _over_listed_blocks(st, idx_ref, cnt_ref, kv_step, step, online_softmax_init(rows, dp))
    store_softmax(o_ref, lse_ref, acc, m, l, 1.0 if prescale else c)


def _dq_kernel(idx_ref, cnt_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, st: Static,
               block_q: int, kv_step: int):
    qs_ref, ks_ref, (dq_ref,) = _seg_refs(st, refs, 1)
    _, group, dp = q_ref.shape
    rows = block_q * group
    q = q_ref[...].reshape(rows, dp)
    q_seg = None if qs_ref is None else qs_ref[...].reshape(rows)
    do = do_ref[...].reshape(rows, dp)
    lse2 = lse_ref[...].reshape(rows)  # base 2, 0 for rows that see no key (all their p are 0)
    delta = delta_ref[...].reshape(rows)
    row_pos = _row_positions(st, pl.program_id(0) * block_q, rows, group)

    def step(carry, key_rows, listed, masked):
        (dq,) = carry
        k = k_ref[key_rows, :]
        p = jnp.exp2(dot(q, k, trans_b=True) * (st.scale * _LOG2E) - lse2[:, None])
        if masked:
            k_seg = None if ks_ref is None else ks_ref[key_rows]
            p = jnp.where(_keep(st, row_pos, key_rows, listed, q_seg, k_seg), p, 0.0)
        ds = p * (dot(do, v_ref[key_rows, :], trans_b=True) - delta[:, None])
        return (dq + dot(ds.astype(k.dtype), k),)

    (dq,) = _over_listed_blocks(st, idx_ref, cnt_ref, kv_step, step, (jnp.zeros((rows, dp), jnp.float32),))
    plgpu.store(dq_ref, (dq * st.scale).astype(dq_ref.dtype).reshape(block_q, group, dp))


def _dkv_kernel(item_ref, qlist_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, st: Static,
                block_q: int):
    qs_ref, ks_ref, (dk_ref, dv_ref, dk_part_ref, dv_part_ref) = _seg_refs(st, refs, 4)
    bs = st.block_size
    _, group, dp = q_ref.shape
    rows = block_q * group
    steps = bs // block_q  # row chunks per selecting query block
    kblk, first, num, slot, masked = (item_ref[j] for j in range(5))
    start = pl.multiple_of(kblk * bs, bs)
    k = k_ref[pl.ds(start, bs), :]
    v = v_ref[pl.ds(start, bs), :]
    key_pos = start + lax.broadcasted_iota(jnp.int32, (bs,), 0)
    k_seg = None if ks_ref is None else ks_ref[pl.ds(start, bs)]
    last = qlist_ref.shape[0] - 1

    def first_row(u):  # first query row of step u (clamped into the list for the look-ahead)
        qblk = qlist_ref[jnp.minimum(first + lax.div(u, steps), last)]
        return qblk * bs + lax.rem(u, steps) * block_q

    def loop(u0, u1, mask: bool, carry):
        """Steps [u0, u1): each a block_q-row chunk of a selecting query block; ``mask`` for those that see
        only part of the key block (causal diagonal, keys past seq_k)."""

        def body(u, carry):
            dk, dv, r0 = carry
            r0 = pl.multiple_of(r0, block_q)
            q = q_ref[pl.ds(r0, block_q), :, :].reshape(rows, dp)
            do = do_ref[pl.ds(r0, block_q), :, :].reshape(rows, dp)
            lse2 = lse_ref[pl.ds(r0, block_q), :].reshape(rows)
            delta = delta_ref[pl.ds(r0, block_q), :].reshape(rows)
            p = jnp.exp2(dot(q, k, trans_b=True) * (st.scale * _LOG2E) - lse2[:, None])
            if mask:
                q_seg = None if qs_ref is None else qs_ref[pl.ds(r0, block_q), :].reshape(rows)
                p = jnp.where(_keep(st, _row_positions(st, r0, rows, group), key_pos, None, q_seg, k_seg), p, 0.0)
            dv = dv + dot(p.astype(do.dtype), do, trans_a=True)
            ds = p * (dot(do, v, trans_b=True) - delta[:, None])
            dk = dk + dot(ds.astype(q.dtype), q, trans_a=True)
            return dk, dv, first_row(u + 1)

        dk, dv, _ = lax.fori_loop(u0, u1, body, (*carry, first_row(u0)))
        return dk, dv

    zeros = jnp.zeros((bs, dp), jnp.float32)
    carry = loop(0, masked * steps, True, (zeros, zeros))
    dk, dv = loop(masked * steps, num * steps, False, carry)
    dk = dk * st.scale

    store_dkv(dk_ref, dv_ref, dk_part_ref, dv_part_ref, dk, dv, slot, start, bs)


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


def _mask_free_first(st: Static, idx, cnt, seg=None):
    """Reorder each query block's listed key blocks so those that need no mask come first (every key visible
    to every row of the query block: before its first row causally, and inside ``seq_k``; with segment ids
    ``seg = (q_seg, k_seg)``, both blocks of one and the same segment); returns the indices and
    ``[batch, kv_heads, n_q_blocks, 2]`` (count, number of mask-free blocks)."""
    bs = st.block_size
    first_row = st.q_offset + jnp.arange(idx.shape[2])[:, None] * bs  # [n_qb, 1]
    need = (idx + 1) * bs > st.seq_k
    if st.causal:
        need |= idx * bs + bs - 1 > first_row
    if seg is not None:
        (q_id, q_uni), (k_id, k_uni) = (segment_block_uniform(x, bs) for x in seg)
        k_id, k_uni = (jnp.take_along_axis(x[:, None, None, :], idx, axis=-1) for x in (k_id, k_uni))
        need |= ~(q_uni[:, None, :, None] & k_uni & (q_id[:, None, :, None] == k_id))
    listed = jnp.arange(idx.shape[-1]) < cnt[..., None]
    order = jnp.argsort(jnp.where(listed, need.astype(jnp.int32), 2), axis=-1, stable=True)
    n_free = jnp.sum(listed & ~need, axis=-1).astype(jnp.int32)
    return jnp.take_along_axis(idx, order, axis=-1), jnp.stack([cnt, n_free], axis=-1)


def _params(st: Static, which: str, rows: int, cols: int):
    warps, stages = st.block_sizes.compiler_params(which, rows, cols)
    return plgpu.CompilerParams(num_warps=warps, num_stages=stages)


def _query_major_specs(bq: int, per_block: int, max_blocks: int, seq_k: int, gp: int, dp: int):
    """BlockSpecs shared by the forward and dq: indices and count of the program's query block, its q rows
    (and any other [bq, Gp, dp] / [bq, Gp] row block), whole k/v of the (batch, kv head)."""
    return dict(
        idx=pl.BlockSpec((None, None, None, max_blocks), lambda i, b, h: (b, h, lax.div(i, per_block), 0)),
        cnt=pl.BlockSpec((None, None, None, 2), lambda i, b, h: (b, h, lax.div(i, per_block), 0)),
        rows=pl.BlockSpec((None, bq, None, gp, dp), lambda i, b, h: (b, i, h, 0, 0)),
        vec=pl.BlockSpec((None, bq, None, gp), lambda i, b, h: (b, i, h, 0)),
        kv=pl.BlockSpec((None, seq_k, None, dp), lambda i, b, h: (b, 0, h, 0)),
    )


def _seg_inputs(seg, gp: int, bq: int | None, seq_q: int, seq_k: int):
    """Segment-id inputs and BlockSpecs ((), [] without segment ids): q ids broadcast over the (padded) group
    ``[B, Tq, Gp]`` as the rows are stacked, k ids ``[B, Tk]`` whole per batch row. ``bq`` None: whole q ids
    (the dk/dv pass)."""
    if seg is None:
        return (), []
    q_seg, k_seg = seg
    qs = jnp.broadcast_to(q_seg[:, :, None], q_seg.shape + (gp,))
    if bq is None:
        q_spec = pl.BlockSpec((None, seq_q, gp), lambda j, b, h: (b, 0, 0))
    else:
        q_spec = pl.BlockSpec((None, bq, gp), lambda i, b, h: (b, i, 0))
    return (qs, k_seg), [q_spec, pl.BlockSpec((None, seq_k), lambda i, b, h: (b, 0))]


def forward(st: Static, q, k, v, idx, cnt, seg=None):
    """q [B, Tq, H, d], k/v [B, Tk, KV, d] (seq padded to whole blocks) -> o [B, Tq, H, d], lse [B, H, Tq].
    ``seg``: None or (q segment ids [B, Tq], k segment ids [B, Tk]) int32."""
    batch, seq_q, heads, d = q.shape
    seq_k, kv_heads = k.shape[1], k.shape[2]
    q5, k4, v4 = _q_to_rows(q, kv_heads), _pad_d(k), _pad_d(v)
    gp, dp = q5.shape[3], q5.shape[4]
    bsz = st.block_sizes
    bq = bsz.block_q
    spec = _query_major_specs(bq, st.block_size // bq, idx.shape[-1], seq_k, gp, dp)
    idx, cnt = _mask_free_first(st, idx, cnt, seg)
    seg_in, seg_specs = _seg_inputs(seg, gp, bq, seq_q, seq_k)
    o5, lse4 = pl.pallas_call(
        functools.partial(_fwd_kernel, st=st, block_q=bq, kv_step=bsz.kv_step),
        grid=(seq_q // bq, batch, kv_heads),
        in_specs=[spec["idx"], spec["cnt"], spec["rows"], spec["kv"], spec["kv"], *seg_specs],
        out_specs=[spec["rows"], spec["vec"]],
        out_shape=[jax.ShapeDtypeStruct(q5.shape, q.dtype),
                   jax.ShapeDtypeStruct(q5.shape[:4], jnp.float32)],
        compiler_params=_params(st, "fwd", bq * gp, bsz.kv_step * st.block_size),
        interpret=st.interpret,
        debug=st.debug,
        name="block_sparse_fwd",
    )(idx, cnt, q5, k4, v4, *seg_in)
    o = _rows_to_heads(o5, heads, d)
    lse = _rows_to_heads(lse4, heads, None).transpose(0, 2, 1)
    return o, lse


def _sum_partials(main, part, slot_block, n_kb: int, bs: int):
    """dk (or dv) [B, Tk, KV, dp]: ``main`` where the key block was not split, else its partials summed."""
    batch, seq_k, kv_heads, dp = main.shape
    seg_sum = jax.vmap(jax.vmap(lambda x, ids: jax.ops.segment_sum(x, ids, n_kb, indices_are_sorted=True)))
    summed = seg_sum(part, slot_block)  # [B, KV, n_kb, bs, dp]; unused slots (id n_kb) are dropped
    summed = summed.transpose(0, 2, 3, 1, 4).reshape(batch, seq_k, kv_heads, dp)
    split = jnp.zeros((batch, kv_heads, n_kb + 1), bool).at[
        jnp.arange(batch)[:, None, None], jnp.arange(kv_heads)[None, :, None], slot_block].set(True)[..., :n_kb]
    split = jnp.repeat(split.transpose(0, 2, 1), bs, axis=1)[..., None]  # [B, Tk, KV, 1]
    return jnp.where(split, summed.astype(main.dtype), main)


def backward(st: Static, q, k, v, idx, cnt, o, lse, do, dlse, seg=None):
    """Cotangents (dq, dk, dv) for cotangents do [B, Tq, H, d] of o and dlse [B, H, Tq] of lse (``seg`` as
    ``forward``)."""
    batch, seq_q, heads, d = q.shape
    seq_k, kv_heads = k.shape[1], k.shape[2]
    bs = st.block_size
    n_kb = seq_k // bs
    bsz = st.block_sizes
    # d lse_i / d s_ij = p_ij, so an lse cotangent folds into delta: ds = p * (dp - (delta - dlse))
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1) - dlse.transpose(0, 2, 1)
    lse2 = jnp.where(lse == _NEG_INF, 0.0, lse * _LOG2E)  # rows that see no key: every logit is -inf, p = 0
    q5, k4, v4 = _q_to_rows(q, kv_heads), _pad_d(k), _pad_d(v)
    do5 = _q_to_rows(do, kv_heads)
    gp, dp = q5.shape[3], q5.shape[4]
    lse4 = _heads_to_rows(lse2.transpose(0, 2, 1), kv_heads, 0.0)
    delta4 = _heads_to_rows(delta, kv_heads, 0.0)
    max_blocks = idx.shape[-1]

    bq = bsz.block_q_dq
    spec = _query_major_specs(bq, bs // bq, max_blocks, seq_k, gp, dp)
    idx_free, cnt_free = _mask_free_first(st, idx, cnt, seg)
    seg_in, seg_specs = _seg_inputs(seg, gp, bq, seq_q, seq_k)
    dq5 = pl.pallas_call(
        functools.partial(_dq_kernel, st=st, block_q=bq, kv_step=bsz.kv_step_dq),
        grid=(seq_q // bq, batch, kv_heads),
        in_specs=[spec["idx"], spec["cnt"], spec["rows"], spec["kv"], spec["kv"], spec["rows"], spec["vec"],
                  spec["vec"], *seg_specs],
        out_specs=spec["rows"],
        out_shape=jax.ShapeDtypeStruct(q5.shape, q.dtype),
        compiler_params=_params(st, "dq", bq * gp, bsz.kv_step_dq * bs),
        interpret=st.interpret,
        debug=st.debug,
        name="block_sparse_dq",
    )(idx_free, cnt_free, q5, k4, v4, do5, lse4, delta4, *seg_in)

    # query blocks from which on every row sees the whole key block (all for the last, ragged key block)
    first_unmasked = jnp.full((n_kb,), 0, jnp.int32)
    if st.causal:
        first_unmasked = jnp.maximum(-(-(jnp.arange(n_kb) * bs + bs - 1 - st.q_offset) // bs), 0)
    if st.key_mask_needed():
        first_unmasked = first_unmasked.at[-1].set(seq_q // bs + 1)
    if seg is not None:  # segment ids: every step masks
        first_unmasked = None
    items, qlist, slot_block = dkv_work_items(idx, cnt, n_kb, bsz.dkv_split * max_blocks, first_unmasked)
    seg_in, seg_specs = _seg_inputs(seg, gp, None, seq_q, seq_k)
    n_items, n_slots = items.shape[2], slot_block.shape[2]
    bq = bsz.block_q_dkv
    full_rows = pl.BlockSpec((None, seq_q, None, gp, dp), lambda j, b, h: (b, 0, h, 0, 0))
    full_vec = pl.BlockSpec((None, seq_q, None, gp), lambda j, b, h: (b, 0, h, 0))
    full_kv = pl.BlockSpec((None, seq_k, None, dp), lambda j, b, h: (b, 0, h, 0))
    part = pl.BlockSpec((None, None, n_slots, bs, dp), lambda j, b, h: (b, h, 0, 0, 0))
    dk4, dv4, dk_part, dv_part = pl.pallas_call(
        functools.partial(_dkv_kernel, st=st, block_q=bq),
        grid=(n_items, batch, kv_heads),  # one head at a time: its q/do are what concurrent programs share
        in_specs=[
            pl.BlockSpec((None, None, None, 5), lambda j, b, h: (b, h, j, 0)),
            pl.BlockSpec((None, None, qlist.shape[-1]), lambda j, b, h: (b, h, 0)),
            full_rows, full_kv, full_kv, full_rows, full_vec, full_vec, *seg_specs,
        ],
        out_specs=[full_kv, full_kv, part, part],
        out_shape=[jax.ShapeDtypeStruct(k4.shape, k.dtype), jax.ShapeDtypeStruct(v4.shape, v.dtype),
                   jax.ShapeDtypeStruct((batch, kv_heads, n_slots, bs, dp), jnp.float32),
                   jax.ShapeDtypeStruct((batch, kv_heads, n_slots, bs, dp), jnp.float32)],
        compiler_params=_params(st, "dkv", bq * gp, bs),
        interpret=st.interpret,
        debug=st.debug,
        name="block_sparse_dkv",
    )(items, qlist, q5, k4, v4, do5, lse4, delta4, *seg_in)
    dk4 = _sum_partials(dk4, dk_part, slot_block, n_kb, bs)
    dv4 = _sum_partials(dv4, dv_part, slot_block, n_kb, bs)
    return _rows_to_heads(dq5, heads, d), dk4[..., :d], dv4[..., :d]
