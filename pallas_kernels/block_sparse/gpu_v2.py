"""Design v2 of the Pallas Triton (GPU) kernels (``Static.variant == "v2"``); v1 (``gpu.py``) stays the default.

What v2 changes, and why (layouts, base-2 softmax, -inf masks and the GQA row stacking are v1's):

1. **Work lists as residuals.** ``plan`` builds everything the three passes index by, once, in the custom_vjp's
   forward rule: the query-major lists with mask-free blocks first (``gpu._mask_free_first``, an argsort) and
   the key-major dk/dv work list (``common.dkv_work_items``: sort + searchsorted). They are saved as residuals,
   so the backward runs no sort / searchsorted / scatter prologue of its own. (A forward without gradient
   builds only the query-major list.)
2. **One loop, the mask only where needed.** Each pass runs a single software-pipelined loop over its steps;
   a step that needs a mask (causal diagonal, a partly listed ``kv_step`` tile, keys past ``seq_k``) takes the
   masked branch of a ``lax.cond`` (``scf.if``) on the score tile, every other step is mask-free. v1 ran two
   loops (two pipelines, the second usually one step long).
3. **dk/dv computed transposed.** ``s^T = k q^T`` and ``dp^T = v do^T`` are products of loaded operands, so
   ``p^T`` and ``ds^T`` feed ``dv += p^T do`` and ``dk += ds^T q`` directly: no product result is transposed
   into another product (Triton's Hopper miscompile, fla issue 640), and no [rows, keys] tile is transposed.
4. **Larger key tiles where the selection allows.** ``kv_step`` / ``kv_step_dq`` may be 4 (256 keys of block
   64 per step); the wrapper caps them at ``next_pow2(max_blocks)`` so a short selection does not pay for
   unlisted blocks; v2's default gathers two key blocks per step in the dq pass too.
5. **Products computed twice: kept, on purpose.** dq (one program per query rows) and dk/dv (one per key
   block) both recompute ``q k^T`` and ``do v^T`` (7 products per tile pair instead of 5). Fusing dq into the
   dk/dv pass would need ``ds^T`` transposed into the ``ds k`` product (the miscompile above) and float32
   atomics on dq (non-deterministic sums), so v2 keeps two passes and saves the prologues instead.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.block_sparse import gpu
from pallas_kernels.block_sparse.common import Static, dkv_work_items, dot, next_pow2, same_segment, visible

_NEG_INF = -jnp.inf
_LOG2E = math.log2(math.e)


def _kv_steps(st: Static, max_blocks: int):
    """(forward, dq) key blocks per step, capped by the selection's width."""
    cap = next_pow2(max_blocks)
    return min(st.block_sizes.kv_step, cap), min(st.block_sizes.kv_step_dq, cap)


def _over_listed_blocks(st: Static, idx_ref, cnt_ref, kv_step: int, step, init):
    """``carry = step(carry, key_rows, listed, masked)`` over the listed blocks in one loop, ``masked`` a
    traced bool: true from the first step holding a block that needs a mask (they are listed last)."""
    bs = st.block_size
    count, n_free = cnt_ref[0], cnt_ref[1]
    first_masked = n_free // kv_step

    def body(t, c):
        *c, blocks = c
        key_rows, listed = gpu._key_rows(blocks, bs, t, kv_step, count)
        c = step(tuple(c), key_rows, listed, t >= first_masked)
        return (*c, gpu._step_blocks(idx_ref, t + 1, kv_step))

    n_steps = (count + kv_step - 1) // kv_step
    *carry, _ = lax.fori_loop(0, n_steps, body, (*init, gpu._step_blocks(idx_ref, 0, kv_step)))
    return tuple(carry)


def _masked(pred, keep, x, fill):
    """``where(keep, x, fill)`` only when the traced ``pred`` holds (``keep`` None: nothing to mask; a callable:
    the mask is built inside the masked branch, so its segment-id loads happen only there)."""
    if keep is None:
        return x
    if callable(keep):
        return lax.cond(pred, lambda x: jnp.where(keep(), x, fill), lambda x: x, x)
    return lax.cond(pred, lambda x: jnp.where(keep, x, fill), lambda x: x, x)


def _keep(st: Static, row_pos, key_rows, listed, q_seg, ks_ref):
    """The forward / dq mask: v1's (``gpu._keep``); with segment ids a thunk that gathers the step's k ids."""
    if ks_ref is None:
        return gpu._keep(st, row_pos, key_rows, listed)
    return lambda: gpu._keep(st, row_pos, key_rows, listed, q_seg, ks_ref[key_rows])


# ------------------------------------------------------------------------------------------------ kernels


def _fwd_kernel(idx_ref, cnt_ref, q_ref, k_ref, v_ref, *refs, st: Static, block_q: int, kv_step: int):
    qs_ref, ks_ref, (o_ref, lse_ref) = gpu._seg_refs(st, refs, 2)
    _, group, dp = q_ref.shape
    rows = block_q * group
    q = q_ref[...].reshape(rows, dp)
    q_seg = None if qs_ref is None else qs_ref[...].reshape(rows)
    row_pos = gpu._row_positions(st, pl.program_id(0) * block_q, rows, group)
    c = st.scale * _LOG2E
    prescale = c <= 0
    cs = 1.0 if prescale else c

    def step(carry, key_rows, listed, masked):
        acc, m, l = carry
        s = dot(q, k_ref[key_rows, :], trans_b=True)
        if prescale:
            s = s * c
        s = _masked(masked, _keep(st, row_pos, key_rows, listed, q_seg, ks_ref), s, _NEG_INF)
        return gpu.online_softmax_step(acc, m, l, s, v_ref[key_rows, :], cs)

    acc, m, l = _over_listed_blocks(st, idx_ref, cnt_ref, kv_step, step, gpu.online_softmax_init(rows, dp))
    gpu.store_softmax(o_ref, lse_ref, acc, m, l, cs)


def _dq_kernel(idx_ref, cnt_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, st: Static,
               block_q: int, kv_step: int):
    qs_ref, ks_ref, (dq_ref,) = gpu._seg_refs(st, refs, 1)
    _, group, dp = q_ref.shape
    rows = block_q * group
    q = q_ref[...].reshape(rows, dp)
    q_seg = None if qs_ref is None else qs_ref[...].reshape(rows)
    do = do_ref[...].reshape(rows, dp)
    lse2 = lse_ref[...].reshape(rows)
    delta = delta_ref[...].reshape(rows)
    row_pos = gpu._row_positions(st, pl.program_id(0) * block_q, rows, group)

    def step(carry, key_rows, listed, masked):
        (dq,) = carry
        k = k_ref[key_rows, :]
        p = jnp.exp2(dot(q, k, trans_b=True) * (st.scale * _LOG2E) - lse2[:, None])
        p = _masked(masked, _keep(st, row_pos, key_rows, listed, q_seg, ks_ref), p, 0.0)
        ds = p * (dot(do, v_ref[key_rows, :], trans_b=True) - delta[:, None])
        return (dq + dot(ds.astype(k.dtype), k),)

    (dq,) = _over_listed_blocks(st, idx_ref, cnt_ref, kv_step, step, (jnp.zeros((rows, dp), jnp.float32),))
    plgpu.store(dq_ref, (dq * st.scale).astype(dq_ref.dtype).reshape(block_q, group, dp))


def _dkv_kernel(item_ref, qlist_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, st: Static,
                block_q: int):
    """Keys as rows: ``s^T = k q^T`` [bs, rows]; p^T and ds^T feed dv and dk without a transpose. With segment
    ids a step also masks unless its rows and the key block lie wholly inside one segment (a test on the
    loaded ids: min == max on both sides, equal)."""
    qs_ref, ks_ref, (dk_ref, dv_ref, dk_part_ref, dv_part_ref) = gpu._seg_refs(st, refs, 4)
    bs = st.block_size
    _, group, dp = q_ref.shape
    rows = block_q * group
    steps = bs // block_q
    kblk, first, num, slot, masked = (item_ref[j] for j in range(5))
    start = pl.multiple_of(kblk * bs, bs)
    k = k_ref[pl.ds(start, bs), :]
    v = v_ref[pl.ds(start, bs), :]
    key_pos = start + lax.broadcasted_iota(jnp.int32, (bs,), 0)
    last = qlist_ref.shape[0] - 1
    n_masked = masked * steps  # the item's masked query blocks come first (ascending query blocks)
    if ks_ref is not None:
        k_seg = ks_ref[pl.ds(start, bs)]
        k_lo, k_hi = jnp.min(k_seg), jnp.max(k_seg)

    def first_row(u):
        qblk = qlist_ref[jnp.minimum(first + lax.div(u, steps), last)]
        return qblk * bs + lax.rem(u, steps) * block_q

    def body(u, carry):
        dk, dv, r0 = carry
        r0 = pl.multiple_of(r0, block_q)
        q = q_ref[pl.ds(r0, block_q), :, :].reshape(rows, dp)
        do = do_ref[pl.ds(r0, block_q), :, :].reshape(rows, dp)
        lse2 = lse_ref[pl.ds(r0, block_q), :].reshape(rows)
        delta = delta_ref[pl.ds(r0, block_q), :].reshape(rows)
        p_t = jnp.exp2(dot(k, q, trans_b=True) * (st.scale * _LOG2E) - lse2[None, :])
        row_pos = gpu._row_positions(st, r0, rows, group)
        if ks_ref is None:
            p_t = _masked(u < n_masked, visible(st, row_pos[None, :], key_pos[:, None]), p_t, 0.0)
        else:
            q_seg = qs_ref[pl.ds(r0, block_q), :].reshape(rows)
            one_segment = (jnp.min(q_seg) == k_lo) & (jnp.max(q_seg) == k_lo) & (k_hi == k_lo)
            keep = lambda: same_segment(visible(st, row_pos[None, :], key_pos[:, None]), q_seg[None, :],
                                        k_seg[:, None])
            p_t = _masked((u < n_masked) | jnp.logical_not(one_segment), keep, p_t, 0.0)
        dv = dv + dot(p_t.astype(do.dtype), do)
        ds_t = p_t * (dot(v, do, trans_b=True) - delta[None, :])
        dk = dk + dot(ds_t.astype(q.dtype), q)
        return dk, dv, first_row(u + 1)

    zeros = jnp.zeros((bs, dp), jnp.float32)
    dk, dv, _ = lax.fori_loop(0, num * steps, body, (zeros, zeros, first_row(0)))
    dk = dk * st.scale

    gpu.store_dkv(dk_ref, dv_ref, dk_part_ref, dv_part_ref, dk, dv, slot, start, bs)


# ----------------------------------------------------------------------------------------- plan + calls


def first_unmasked(st: Static, n_qb: int, n_kb: int):
    """int32 [n_kb]: the first query block from which every row sees the whole key block (past the last query
    block for the ragged last key block)."""
    bs = st.block_size
    out = jnp.zeros((n_kb,), jnp.int32)
    if st.causal:
        out = jnp.maximum(-(-(jnp.arange(n_kb) * bs + bs - 1 - st.q_offset) // bs), 0).astype(jnp.int32)
    if st.key_mask_needed():
        out = out.at[-1].set(n_qb + 1)
    return out


def plan(st: Static, idx, cnt, *, backward: bool, seg=None):
    """The work lists, built once per selection: (idx, cnt) with mask-free blocks first for the forward and
    dq (with segment ids ``seg``: mask-free also needs both blocks inside one segment), and with ``backward``
    the dk/dv work list (items, q_blocks, slot_block). All int32 arrays."""
    n_qb, max_blocks = idx.shape[2], idx.shape[3]
    n_kb = -(-st.seq_k // st.block_size)
    idx_free, cnt_free = gpu._mask_free_first(st, idx, cnt, seg)
    if not backward:
        return idx_free, cnt_free
    items = dkv_work_items(idx, cnt, n_kb, st.block_sizes.dkv_split * max_blocks, first_unmasked(st, n_qb, n_kb))
    return (idx_free, cnt_free, *items)


def forward(st: Static, q, k, v, work, seg=None):
    """q [B, Tq, H, d], k/v [B, Tk, KV, d] (padded to whole blocks), ``work`` from ``plan`` -> o, lse.
    ``seg``: None or (q segment ids [B, Tq], k segment ids [B, Tk]) int32, passed as v1 passes them."""
    idx, cnt = work[:2]
    batch, seq_q, heads, d = q.shape
    seq_k, kv_heads = k.shape[1], k.shape[2]
    q5, k4, v4 = gpu._q_to_rows(q, kv_heads), gpu._pad_d(k), gpu._pad_d(v)
    gp, dp = q5.shape[3], q5.shape[4]
    bq = st.block_sizes.block_q
    kv_step, _ = _kv_steps(st, idx.shape[-1])
    spec = gpu._query_major_specs(bq, st.block_size // bq, idx.shape[-1], seq_k, gp, dp)
    seg_in, seg_specs = gpu._seg_inputs(seg, gp, bq, seq_q, seq_k)
    o5, lse4 = pl.pallas_call(
        functools.partial(_fwd_kernel, st=st, block_q=bq, kv_step=kv_step),
        grid=(seq_q // bq, batch, kv_heads),
        in_specs=[spec["idx"], spec["cnt"], spec["rows"], spec["kv"], spec["kv"], *seg_specs],
        out_specs=[spec["rows"], spec["vec"]],
        out_shape=[jax.ShapeDtypeStruct(q5.shape, q.dtype), jax.ShapeDtypeStruct(q5.shape[:4], jnp.float32)],
        compiler_params=gpu._params(st, "fwd", bq * gp, kv_step * st.block_size),
        interpret=st.interpret,
        debug=st.debug,
        name="block_sparse_v2_fwd",
    )(idx, cnt, q5, k4, v4, *seg_in)
    return gpu._rows_to_heads(o5, heads, d), gpu._rows_to_heads(lse4, heads, None).transpose(0, 2, 1)


def backward(st: Static, q, k, v, work, o, lse, do, dlse, seg=None):
    """Cotangents (dq, dk, dv); ``work`` is ``plan(..., backward=True)`` saved by the forward (``seg`` as
    ``forward``)."""
    idx_free, cnt_free, items, qlist, slot_block = work
    batch, seq_q, heads, d = q.shape
    seq_k, kv_heads = k.shape[1], k.shape[2]
    bs = st.block_size
    n_kb = seq_k // bs
    bsz = st.block_sizes
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1) - dlse.transpose(0, 2, 1)
    lse2 = jnp.where(lse == _NEG_INF, 0.0, lse * _LOG2E)
    q5, k4, v4 = gpu._q_to_rows(q, kv_heads), gpu._pad_d(k), gpu._pad_d(v)
    do5 = gpu._q_to_rows(do, kv_heads)
    gp, dp = q5.shape[3], q5.shape[4]
    lse4 = gpu._heads_to_rows(lse2.transpose(0, 2, 1), kv_heads, 0.0)
    delta4 = gpu._heads_to_rows(delta, kv_heads, 0.0)
    max_blocks = idx_free.shape[-1]

    bq = bsz.block_q_dq
    _, kv_step = _kv_steps(st, max_blocks)
    spec = gpu._query_major_specs(bq, bs // bq, max_blocks, seq_k, gp, dp)
    seg_in, seg_specs = gpu._seg_inputs(seg, gp, bq, seq_q, seq_k)
    dq5 = pl.pallas_call(
        functools.partial(_dq_kernel, st=st, block_q=bq, kv_step=kv_step),
        grid=(seq_q // bq, batch, kv_heads),
        in_specs=[spec["idx"], spec["cnt"], spec["rows"], spec["kv"], spec["kv"], spec["rows"], spec["vec"],
                  spec["vec"], *seg_specs],
        out_specs=spec["rows"],
        out_shape=jax.ShapeDtypeStruct(q5.shape, q.dtype),
        compiler_params=gpu._params(st, "dq", bq * gp, kv_step * bs),
        interpret=st.interpret,
        debug=st.debug,
        name="block_sparse_v2_dq",
    )(idx_free, cnt_free, q5, k4, v4, do5, lse4, delta4, *seg_in)

    seg_in, seg_specs = gpu._seg_inputs(seg, gp, None, seq_q, seq_k)
    n_items, n_slots = items.shape[2], slot_block.shape[2]
    bq = bsz.block_q_dkv
    full_rows = pl.BlockSpec((None, seq_q, None, gp, dp), lambda j, b, h: (b, 0, h, 0, 0))
    full_vec = pl.BlockSpec((None, seq_q, None, gp), lambda j, b, h: (b, 0, h, 0))
    full_kv = pl.BlockSpec((None, seq_k, None, dp), lambda j, b, h: (b, 0, h, 0))
    part = pl.BlockSpec((None, None, n_slots, bs, dp), lambda j, b, h: (b, h, 0, 0, 0))
    dk4, dv4, dk_part, dv_part = pl.pallas_call(
        functools.partial(_dkv_kernel, st=st, block_q=bq),
        grid=(n_items, batch, kv_heads),
        in_specs=[
            pl.BlockSpec((None, None, None, 5), lambda j, b, h: (b, h, j, 0)),
            pl.BlockSpec((None, None, qlist.shape[-1]), lambda j, b, h: (b, h, 0)),
            full_rows, full_kv, full_kv, full_rows, full_vec, full_vec, *seg_specs,
        ],
        out_specs=[full_kv, full_kv, part, part],
        out_shape=[jax.ShapeDtypeStruct(k4.shape, k.dtype), jax.ShapeDtypeStruct(v4.shape, v.dtype),
                   jax.ShapeDtypeStruct((batch, kv_heads, n_slots, bs, dp), jnp.float32),
                   jax.ShapeDtypeStruct((batch, kv_heads, n_slots, bs, dp), jnp.float32)],
        compiler_params=gpu._params(st, "dkv", bs, bq * gp),
        interpret=st.interpret,
        debug=st.debug,
        name="block_sparse_v2_dkv",
    )(items, qlist, q5, k4, v4, do5, lse4, delta4, *seg_in)
    dk4 = gpu._sum_partials(dk4, dk_part, slot_block, n_kb, bs)
    dv4 = gpu._sum_partials(dv4, dv_part, slot_block, n_kb, bs)
    return gpu._rows_to_heads(dq5, heads, d), dk4[..., :d], dv4[..., :d]
