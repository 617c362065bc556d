"""Block-sparse attention: the spec (a dense boolean mask) and the gather form that scales.

Shapes: ``q [batch, seq_q, heads, d]``, ``k, v [batch, seq_k, kv_heads, d]`` (GQA: the ``heads // kv_heads``
query heads of one kv head share its selection), ``block_indices int32 [batch, kv_heads, n_q_blocks,
max_blocks]``, ``block_counts int32 [batch, kv_heads, n_q_blocks]`` with ``n_q_blocks = ceil(seq_q /
block_size)``.

Which keys a query sees (defined once, here):
- query row ``i`` lies in query block ``i // block_size`` and has absolute position ``i + q_offset``
  (``q_offset`` defaults to ``seq_k - seq_q``: 0 for prefill, the cache length for decoding);
- key ``j`` lies in key block ``j // block_size``; key block ``J`` holds keys ``[J*bs, min((J+1)*bs, seq_k))``;
- row ``i`` sees key ``j`` iff ``j // block_size`` is among the first ``block_counts[..., i // bs]`` entries
  of ``block_indices[..., i // bs, :]`` and, if causal, ``j <= i + q_offset``.
Softmax runs over exactly those keys; a row with none outputs 0 and has ``lse = -inf``.
``lse[b, h, i] = log sum_j exp(scale * q_i . k_j)`` in natural log, float32.

Packed documents (segment ids): ``q_segment_ids [batch, seq_q]`` and ``kv_segment_ids [batch, seq_k]`` int
(``segment_ids`` for both in self-attention, seq_q == seq_k): row ``i`` additionally sees only keys ``j`` of
its own segment. Without them the computation is exactly the unsegmented one.

Per-token lists (``query_block``, default ``block_size``): the lists may instead cover ``query_block`` query
rows each, ``block_indices [batch, kv_heads, ceil(seq_q / query_block), max_blocks]``; row ``i`` then uses list
``i // query_block`` (``query_block=1``: one list per token, InfLLM-V2's per-token selection). Key blocks stay
``block_size`` long.

Duplicate indices within the first ``count`` entries are undefined: the mask form here counts a block once,
the gather form and the Pallas kernel count it twice. ``check_block_indices`` finds them (eager only).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from lizard_jax.ops.softmax import key_blocked, key_blocks_for
from lizard_jax.ops.sparse.settings import PAPER
from pallas_kernels.segments import resolve_segments

_NEG_INF = -jnp.inf


def num_blocks(n: int, block_size: int) -> int:
    return -(-n // block_size)


def resolve_q_offset(seq_q: int, seq_k: int, q_offset: int | None) -> int:
    return seq_k - seq_q if q_offset is None else int(q_offset)


def check_shapes(q, k, v, block_indices, block_counts, block_size: int, query_block: int | None = None) -> None:
    """Clear ValueErrors for shape mismatches at the public boundary."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be [batch, seq, heads, d]; got {q.shape=}, {k.shape=}, {v.shape=}")
    if k.shape != v.shape:
        raise ValueError(f"{k.shape=} and {v.shape=} differ")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"{q.shape=} and {k.shape=} differ in batch")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"{q.shape=} and {k.shape=} differ in head_dim")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"heads {q.shape[2]} is not a multiple of kv_heads {k.shape[2]}")
    if block_size < 1:
        raise ValueError(f"{block_size=} must be positive")
    qb = block_size if query_block is None else query_block
    if qb < 1:
        raise ValueError(f"{query_block=} must be positive")
    batch, seq_q, _, _ = q.shape
    kv_heads = k.shape[2]
    n_qb = num_blocks(seq_q, qb)
    if block_indices.ndim != 4 or block_indices.shape[:3] != (batch, kv_heads, n_qb):
        raise ValueError(
            f"{block_indices.shape=} must be [batch={batch}, kv_heads={kv_heads}, "
            f"ceil(seq_q/query_block)={n_qb}, max_blocks] (query_block={qb})"
        )
    if block_counts.shape != (batch, kv_heads, n_qb):
        raise ValueError(f"{block_counts.shape=} must be {(batch, kv_heads, n_qb)}")
    if not jnp.issubdtype(block_indices.dtype, jnp.integer) or not jnp.issubdtype(block_counts.dtype, jnp.integer):
        raise ValueError(f"block indices/counts must be integers; got {block_indices.dtype}, {block_counts.dtype}")


def check_block_indices(block_indices, block_counts, n_kv_blocks: int) -> None:
    """Eager validation of concrete index arrays: counts in [0, max_blocks], listed indices in range, no
    duplicates among the listed entries. Raises ValueError; under jit there is nothing to check."""
    idx = np.asarray(block_indices)
    cnt = np.asarray(block_counts)
    max_blocks = idx.shape[-1]
    if cnt.min(initial=0) < 0 or cnt.max(initial=0) > max_blocks:
        raise ValueError(f"block_counts must lie in [0, {max_blocks}]; got [{cnt.min()}, {cnt.max()}]")
    listed = np.arange(max_blocks) < cnt[..., None]
    bad = listed & ((idx < 0) | (idx >= n_kv_blocks))
    if bad.any():
        raise ValueError(f"listed block indices must lie in [0, {n_kv_blocks}); found {idx[bad][:4]}")
    s = np.sort(np.where(listed, idx, -1 - np.arange(max_blocks)), axis=-1)  # unlisted: distinct negatives
    if (s[..., 1:] == s[..., :-1]).any():
        raise ValueError("block_indices lists a key block twice for some query block (undefined)")


def visible_mask(block_indices, block_counts, *, seq_q: int, seq_k: int, block_size: int, causal: bool,
                 q_offset: int, q_seg=None, k_seg=None, query_block: int | None = None):
    """bool [batch, kv_heads, seq_q, seq_k]: which keys each query row sees (the definition above; segment
    ids ``q_seg [batch, seq_q]``, ``k_seg [batch, seq_k]`` or None; ``query_block`` rows per list)."""
    qb = block_size if query_block is None else query_block
    n_kb = num_blocks(seq_k, block_size)
    max_blocks = block_indices.shape[-1]
    listed = jnp.arange(max_blocks) < block_counts[..., None]  # [B, KV, nQB, M]
    hit = (block_indices[..., None] == jnp.arange(n_kb)) & listed[..., None]  # [B, KV, nQB, M, nKB]
    blocks = hit.any(axis=-2)  # [B, KV, nQB, nKB]
    rows = jnp.arange(seq_q)
    cols = jnp.arange(seq_k)
    mask = blocks[:, :, rows // qb][:, :, :, cols // block_size]
    if causal:
        mask = mask & (cols[None, :] <= rows[:, None] + q_offset)
    if q_seg is not None:
        mask = mask & (q_seg[:, None, :, None] == k_seg[:, None, None, :])
    return mask


def masked_attention(q, k, v, mask, *, scale: float, return_lse: bool = False):
    """Softmax attention in float32 over ``mask`` (bool, broadcastable to [batch, heads, seq_q, seq_k]).

    GQA: kv head ``h // (heads // kv_heads)`` serves query head ``h``. Masked logits are -inf; rows with no
    visible key give 0 and lse -inf. Returns o in q.dtype (and lse float32 [batch, heads, seq_q]).
    """
    group = q.shape[2] // k.shape[2]
    qf = q.astype(jnp.float32)
    kf = jnp.repeat(k.astype(jnp.float32), group, axis=2)
    vf = jnp.repeat(v.astype(jnp.float32), group, axis=2)
    s = jnp.einsum("bqhd,bkhd->bhqk", qf, kf, precision=jax.lax.Precision.HIGHEST) * scale
    s = jnp.where(mask, s, _NEG_INF)
    m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m)
    l = jnp.sum(p, axis=-1, keepdims=True)
    l_safe = jnp.where(l > 0, l, 1.0)
    o = jnp.einsum("bhqk,bkhd->bqhd", p / l_safe, vf, precision=jax.lax.Precision.HIGHEST)
    o = o.astype(q.dtype)
    if not return_lse:
        return o
    lse = jnp.where(l > 0, m + jnp.log(l_safe), _NEG_INF)[..., 0]
    return o, lse


def dense_attention(q, k, v, *, causal: bool = True, scale: float | None = None, q_offset: int | None = None,
                    return_lse: bool = False, segment_ids=None, q_segment_ids=None, kv_segment_ids=None):
    """Plain (dense) softmax attention, the tiny masked-softmax form: O(seq_q * seq_k) memory."""
    seq_q, seq_k = q.shape[1], k.shape[1]
    q_seg, k_seg = resolve_segments(seq_q, seq_k, q.shape[0], segment_ids, q_segment_ids, kv_segment_ids)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    mask = jnp.ones((seq_q, seq_k), bool)
    if causal:
        off = resolve_q_offset(seq_q, seq_k, q_offset)
        mask = jnp.arange(seq_k)[None, :] <= jnp.arange(seq_q)[:, None] + off
    if q_seg is not None:
        mask = mask & (q_seg[:, None, :, None] == k_seg[:, None, None, :])
    return masked_attention(q, k, v, mask, scale=scale, return_lse=return_lse)


def block_sparse_attention_reference(q, k, v, block_indices, block_counts, *, block_size: int = PAPER.block_size,
                                     causal: bool = True, scale: float | None = None,
                                     q_offset: int | None = None, return_lse: bool = False, segment_ids=None,
                                     q_segment_ids=None, kv_segment_ids=None, query_block: int | None = None):
    """The spec: dense mask from indices/counts/causality (and segments), then masked softmax in float32."""
    check_shapes(q, k, v, block_indices, block_counts, block_size, query_block)
    seq_q, seq_k = q.shape[1], k.shape[1]
    q_seg, k_seg = resolve_segments(seq_q, seq_k, q.shape[0], segment_ids, q_segment_ids, kv_segment_ids)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    mask = visible_mask(block_indices, block_counts, seq_q=seq_q, seq_k=seq_k, block_size=block_size,
                        causal=causal, q_offset=resolve_q_offset(seq_q, seq_k, q_offset), q_seg=q_seg, k_seg=k_seg,
                        query_block=query_block)
    mask = jnp.repeat(mask, q.shape[2] // k.shape[2], axis=1)  # kv head -> its query heads
    return masked_attention(q, k, v, mask, scale=scale, return_lse=return_lse)


def block_sparse_attention_xla(q, k, v, block_indices, block_counts, *, block_size: int = PAPER.block_size,
                               causal: bool = True, scale: float | None = None, q_offset: int | None = None,
                               return_lse: bool = False, segment_ids=None, q_segment_ids=None, kv_segment_ids=None,
                               query_block: int | None = None, chunk_elems: int = 1 << 24, tiles=None):
    """Gather form: per query block, gather its listed key blocks and softmax over them.

    Memory O(seq_q * max_blocks * block_size) per head, not O(seq_q * seq_k); differentiable by autodiff.
    Listed indices are clipped into range; entries past the count are ignored.

    ``query_block`` other than ``block_size`` (per-token lists: 1) runs the row-list form instead
    (``_row_lists_attention``: each chunk of rows against all keys under its rows' block masks, about
    ``chunk_elems`` scores per chunk, rematerialized in the backward): exact, O(seq_q * seq_k) work. On a CPU
    (or with ``tiles`` = (query rows, keys) given) past one row block of queries, the row-list form runs as
    the softmax op's key-blocked form instead (``ops.softmax.key_blocked``: tiles no row of a row block lists
    are skipped); default tiles ``ops.softmax.CPU_BLOCKS``.
    """
    check_shapes(q, k, v, block_indices, block_counts, block_size, query_block)
    if query_block is not None and query_block != block_size:
        return _row_lists_attention(q, k, v, block_indices, block_counts, block_size=block_size, causal=causal,
                                    scale=scale, q_offset=q_offset, return_lse=return_lse, segment_ids=segment_ids,
                                    q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                                    query_block=query_block, chunk_elems=chunk_elems, tiles=tiles)
    batch, seq_q, heads, d = q.shape
    seq_k, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    bs = block_size
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    q_offset = resolve_q_offset(seq_q, seq_k, q_offset)
    n_qb, n_kb = num_blocks(seq_q, bs), num_blocks(seq_k, bs)
    max_blocks = block_indices.shape[-1]
    q_seg, k_seg = resolve_segments(seq_q, seq_k, batch, segment_ids, q_segment_ids, kv_segment_ids)

    qf = jnp.pad(q.astype(jnp.float32), ((0, 0), (0, n_qb * bs - seq_q), (0, 0), (0, 0)))
    kf = jnp.pad(k.astype(jnp.float32), ((0, 0), (0, n_kb * bs - seq_k), (0, 0), (0, 0)))
    vf = jnp.pad(v.astype(jnp.float32), ((0, 0), (0, n_kb * bs - seq_k), (0, 0), (0, 0)))
    qb = qf.reshape(batch, n_qb, bs, kv_heads, group, d).transpose(0, 3, 1, 2, 4, 5)  # [B,KV,nQB,bs,G,d]
    kb = kf.reshape(batch, n_kb, bs, kv_heads, d).transpose(0, 3, 1, 2, 4)  # [B,KV,nKB,bs,d]
    vb = vf.reshape(batch, n_kb, bs, kv_heads, d).transpose(0, 3, 1, 2, 4)

    idx = jnp.clip(block_indices.astype(jnp.int32), 0, n_kb - 1)
    flat = idx.reshape(batch, kv_heads, n_qb * max_blocks)
    kg = jnp.take_along_axis(kb, flat[..., None, None], axis=2).reshape(batch, kv_heads, n_qb, max_blocks, bs, d)
    vg = jnp.take_along_axis(vb, flat[..., None, None], axis=2).reshape(batch, kv_heads, n_qb, max_blocks, bs, d)

    s = jnp.einsum("bhnqgd,bhnmkd->bhnqgmk", qb, kg, precision=jax.lax.Precision.HIGHEST) * scale
    listed = jnp.arange(max_blocks) < block_counts[..., None]  # [B,KV,nQB,M]
    key_pos = idx[..., None] * bs + jnp.arange(bs)  # [B,KV,nQB,M,bs]
    mask = listed[..., None] & (key_pos < seq_k)
    mask = mask[:, :, :, None, None]  # [B,KV,nQB,1,1,M,bs]
    if causal:
        row_pos = jnp.arange(n_qb)[:, None] * bs + jnp.arange(bs) + q_offset  # [nQB, bs]
        mask = mask & (key_pos[:, :, :, None, None] <= row_pos[None, None, :, :, None, None, None])
    if q_seg is not None:  # padded rows/keys: segment -1 (padded keys are masked above anyway)
        qsb = jnp.pad(q_seg, ((0, 0), (0, n_qb * bs - seq_q)), constant_values=-1).reshape(batch, n_qb, bs)
        ksb = jnp.pad(k_seg, ((0, 0), (0, n_kb * bs - seq_k)), constant_values=-1).reshape(batch, 1, n_kb, bs)
        ksg = jnp.take_along_axis(ksb, flat[..., None], axis=2).reshape(batch, kv_heads, n_qb, max_blocks, bs)
        mask = mask & (qsb[:, None, :, :, None, None, None] == ksg[:, :, :, None, None])
    s = jnp.where(mask, s, _NEG_INF)
    m = jax.lax.stop_gradient(jnp.max(s, axis=(-2, -1), keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m)
    l = jnp.sum(p, axis=(-2, -1), keepdims=True)
    l_safe = jnp.where(l > 0, l, 1.0)
    o = jnp.einsum("bhnqgmk,bhnmkd->bhnqgd", p / l_safe, vg, precision=jax.lax.Precision.HIGHEST)
    o = o.transpose(0, 2, 3, 1, 4, 5).reshape(batch, n_qb * bs, heads, d)[:, :seq_q].astype(q.dtype)
    if not return_lse:
        return o
    lse = jnp.where(l > 0, m + jnp.log(l_safe), _NEG_INF)[..., 0, 0]  # [B,KV,nQB,bs,G]
    lse = lse.transpose(0, 1, 4, 2, 3).reshape(batch, heads, n_qb * bs)[:, :, :seq_q]
    return o, lse


def _row_lists_attention(q, k, v, block_indices, block_counts, *, block_size: int, causal: bool, scale, q_offset,
                         return_lse: bool, segment_ids, q_segment_ids, kv_segment_ids, query_block: int,
                         chunk_elems: int, tiles=None):
    """Block lists per ``query_block`` rows (1: per token): chunks of rows (``lax.map``, ``jax.checkpoint``)
    each build their rows' key mask from their lists and run masked softmax over all keys in float32."""
    batch, seq_q, heads, d = q.shape
    seq_k, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    bs, qb = block_size, query_block
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    q_offset = resolve_q_offset(seq_q, seq_k, q_offset)
    n_kb = num_blocks(seq_k, bs)
    q_seg, k_seg = resolve_segments(seq_q, seq_k, batch, segment_ids, q_segment_ids, kv_segment_ids)
    # per list: which key blocks it lists, then per row (its list i // qb)
    listed = jnp.arange(block_indices.shape[-1]) < block_counts[..., None]
    idx = jnp.where(listed, jnp.clip(block_indices.astype(jnp.int32), 0, n_kb - 1), n_kb)
    blocks = jnp.zeros(idx.shape[:3] + (n_kb + 1,), bool)
    blocks = jnp.put_along_axis(blocks, idx, True, axis=-1, inplace=False)[..., :n_kb]  # [B, KV, nL, nKB]
    row_blocks = jnp.repeat(blocks, qb, axis=2)[:, :, :seq_q]  # [B, KV, Tq, nKB]
    tiles = key_blocks_for(tiles, seq_q)
    if tiles is not None:
        q_pos = jnp.broadcast_to(jnp.arange(seq_q, dtype=jnp.int32) + q_offset, (batch, seq_q))
        k_pos = jnp.broadcast_to(jnp.arange(seq_k, dtype=jnp.int32), (batch, seq_k))
        f32 = lambda x: x.astype(jnp.float32)
        o, lse = key_blocked(f32(q), f32(k), f32(v), q_pos, k_pos, causal=causal, window=None, scale=scale,
                             blocks=tiles, q_seg=q_seg, k_seg=k_seg, allow=(row_blocks, bs))
        o = o.astype(q.dtype)
        return (o, lse) if return_lse else o

    chunk = max(1, min(seq_q, chunk_elems // max(1, batch * heads * seq_k)))
    n_chunks = -(-seq_q // chunk)
    rows = n_chunks * chunk
    pad = rows - seq_q
    qf = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(batch, n_chunks, chunk, kv_heads, group, d)
    rb = jnp.pad(row_blocks, ((0, 0), (0, 0), (0, pad), (0, 0))).reshape(batch, kv_heads, n_chunks, chunk, n_kb)
    xs = [jnp.moveaxis(qf, 1, 0), jnp.moveaxis(rb, 2, 0), jnp.arange(n_chunks)]
    if q_seg is not None:
        xs.append(jnp.moveaxis(jnp.pad(q_seg, ((0, 0), (0, pad)), constant_values=-1).reshape(batch, n_chunks,
                                                                                             chunk), 1, 0))
    cols = jnp.arange(seq_k)
    kf, vf = k.astype(jnp.float32), v.astype(jnp.float32)

    @jax.checkpoint
    def one_chunk(kf, vf, args):
        qc, bc, c0, *sc = args  # qc [B, chunk, KV, G, d], bc [B, KV, chunk, nKB]
        mask = bc[..., cols // bs][:, :, None]  # [B, KV, 1, chunk, Tk]
        if causal:
            row = c0 * chunk + jnp.arange(chunk) + q_offset
            mask = mask & (cols[None, :] <= row[:, None])
        if sc:
            mask = mask & (sc[0][:, None, None, :, None] == k_seg[:, None, None, None, :])
        s = jnp.einsum("bqhgd,bkhd->bhgqk", qc.astype(jnp.float32), kf,
                       precision=jax.lax.Precision.HIGHEST) * scale
        s = jnp.where(mask, s, _NEG_INF)
        m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
        m = jnp.where(jnp.isfinite(m), m, 0.0)
        p = jnp.exp(s - m)
        l = jnp.sum(p, axis=-1, keepdims=True)
        l_safe = jnp.where(l > 0, l, 1.0)
        o = jnp.einsum("bhgqk,bkhd->bqhgd", p / l_safe, vf, precision=jax.lax.Precision.HIGHEST)
        lse = jnp.where(l > 0, m + jnp.log(l_safe), _NEG_INF)[..., 0]  # [B, KV, G, chunk]
        return o, lse

    o, lse = jax.lax.map(lambda a: one_chunk(kf, vf, a), tuple(xs))  # [n, B, chunk, KV, G, d], [n, B, KV, G, chunk]
    o = jnp.moveaxis(o, 0, 1).reshape(batch, rows, heads, d)[:, :seq_q].astype(q.dtype)
    if not return_lse:
        return o
    lse = jnp.moveaxis(lse, 0, 3).reshape(batch, heads, rows)[:, :, :seq_q]
    return o, lse
