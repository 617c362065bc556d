"""InfLLM-V2 block selection (arXiv 2509.24663; MiniCPM4 / MiniCPM-SALA settings).

1. Compressed keys: mean-pooled keys, ``k_cmp[c] = mean(k[c*stride : c*stride + kernel])`` for every full
   window, ``n_cmp = (seq_k - kernel) // stride + 1`` (none when seq_k < kernel). Compressed key c depends
   only on its own window, so a decode cache appends one whenever the sequence grows past
   ``c*stride + kernel`` (``num_compressed`` tells how many exist for a length).
2. Relevance, as the paper and its CUDA code (``infllmv2_attn_stage1``) do: per query token and query head,
   ``softmax_c(scale * q . k_cmp[c])`` over the compressed keys the token may see (causal: the window is
   complete, ``c*stride + kernel - 1 <= position``), then summed over the query heads of a GQA group (the
   group shares one choice).
3. Block score: max over the compressed keys whose windows overlap the key block (block 64, kernel 32,
   stride 16: the 5 windows starting at 16*(4J-1) ... 16*(4J+3), the CUDA max-pool with kernel 5, stride 4,
   padding 1). Granularity (``query_block``, ``InfLLMConfig.selection``): with ``query_block=1`` ("token", the
   paper's) every query token chooses for itself from its own row's scores; with ``query_block=block_size``
   ("block", the kernel's granularity; the default argument) the token scores are summed over the rows of the
   query block before pooling and the block shares one choice. In general a *query group* is ``query_block``
   consecutive rows; everything below says "query group" for it.
4. Choice: key blocks in the future of the query group's last row are never chosen. The first
   ``init_blocks`` blocks and the ``ceil(local_window / block_size)`` local blocks (ending at the block of the
   query group's last row) are always chosen; the best-scoring other blocks fill up to
   ``topk + n_local`` in all. So ``topk`` counts the initial blocks but not the local window, as in the CUDA
   code, where initial blocks score +inf inside the top-k and the window is attended beside it.
   Ties go to the lower block index (``lax.top_k``); chosen indices are sorted ascending and the unused tail
   repeats the last chosen index (0 if none), so every entry is a valid block.

Packed documents (``segment_ids [batch, seq]``, self-attention only: seq_q == seq_k, q_offset 0; generation is
unpacked). Each query group has a *primary* segment, that of its first row; the rows of other segments in it
start inside the group (per token: none, every row is its own group). Below, "query block" reads "query group"
and "the query block" (as a key block) reads "the key block of the group's last row". Exactly:
- a compressed key c is usable by row r iff its window lies inside r's segment (``seg[c*stride] == seg[r]``;
  with causality its last key is <= r, and segments are contiguous); softmax over those only;
- token scores are summed over the rows of the primary segment only; a key block pools only the windows lying
  inside the primary segment (others are not in the max, as a document alone has no such windows);
- candidates are the blocks from the block of the primary segment's first token (its *initial block*) to the
  query block; ``init_blocks`` counts from that block, the local window ends at the query block and does not
  reach before it; the best ``topk + n_local`` candidates are chosen as without segments;
- a primary segment shorter than ``dense_below`` (what ``infllm_attention`` runs dense when alone) gets all
  its candidate blocks; a query block holding other segments also gets its own (diagonal) block, which is all
  those rows can see of their segments.
So ``max_blocks`` is ``min(n_kv_blocks, max(topk + n_local + 1, ceil(dense_below / bs) + 1))``, and with
the segment mask in the attention a packed row equals each document alone (``infllm_attention``) for every
document shorter than ``dense_below`` and for every document starting at a multiple of ``block_size`` (when
``stride`` divides ``block_size``): then the global block grid is the document's. A longer document starting
mid-block is selected on the global grid, inside its segment (a close, not exact, version of it alone).

Selection carries no gradient (as in the paper): callers get ``stop_gradient``-ed scores.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from lizard_jax.ops.sparse.reference import num_blocks, resolve_q_offset
from lizard_jax.ops.sparse.settings import PAPER


def num_compressed(seq_len: int, kernel: int = PAPER.kernel, stride: int = PAPER.stride) -> int:
    """How many complete compressed-key windows a sequence of ``seq_len`` keys has."""
    return max(0, (seq_len - kernel) // stride + 1)


def compress_keys(k, kernel: int = PAPER.kernel, stride: int = PAPER.stride):
    """Mean-pooled compressed keys: ``[batch, seq, kv_heads, d] -> [batch, n_cmp, kv_heads, d]`` (float32)."""
    if kernel < 1 or stride < 1:
        raise ValueError(f"{kernel=} and {stride=} must be positive")
    batch, seq, kv_heads, d = k.shape
    n_cmp = num_compressed(seq, kernel, stride)
    if n_cmp == 0:
        return jnp.zeros((batch, 0, kv_heads, d), jnp.float32)
    kf = k.astype(jnp.float32)
    if kernel % stride == 0:
        # sums of stride-long chunks, then of kernel/stride consecutive chunks: exact, no long cumsum
        r = kernel // stride
        n_chunks = n_cmp - 1 + r
        chunks = kf[:, : n_chunks * stride].reshape(batch, n_chunks, stride, kv_heads, d).sum(axis=2)
        total = sum(chunks[:, i : i + n_cmp] for i in range(r))
    else:
        pos = jnp.arange(n_cmp)[:, None] * stride + jnp.arange(kernel)  # [n_cmp, kernel]
        total = kf[:, pos].sum(axis=2)
    return total / kernel


def overlap_windows(n_kb: int, n_cmp: int, block_size: int, kernel: int, stride: int):
    """For each key block, the compressed keys whose windows overlap it: (index [nKB, w], valid [nKB, w])."""
    lo = [max(0, -(-(j * block_size - kernel + 1) // stride)) for j in range(n_kb)]
    hi = [min(n_cmp - 1, ((j + 1) * block_size - 1) // stride) for j in range(n_kb)]
    width = max([h - l + 1 for l, h in zip(lo, hi)] + [1])
    idx = jnp.asarray(lo)[:, None] + jnp.arange(width)
    valid = idx <= jnp.asarray(hi)[:, None]
    return jnp.clip(idx, 0, max(n_cmp - 1, 0)), valid


def block_scores(q, k_cmp, *, seq_k: int, block_size: int = PAPER.block_size, kernel: int = PAPER.kernel,
                 stride: int = PAPER.stride, causal: bool = True, q_offset: int | None = None,
                 scale: float | None = None, chunk_elems: int = 1 << 26, segment_ids=None,
                 query_block: int | None = None):
    """Aggregated relevance float32 ``[batch, kv_heads, n_q_groups, n_kv_blocks]`` (steps 2-3 above), one row
    per query group of ``query_block`` rows (None: ``block_size``; 1: per token).

    Processed in chunks of query blocks (``lax.map``) so memory stays ~``chunk_elems`` floats.
    Blocks no window overlaps score -inf. ``segment_ids [batch, seq]`` (seq_q == seq_k, q_offset 0): the
    packed rule of the module docstring.
    """
    batch, seq_q, heads, d = q.shape
    n_cmp, kv_heads = k_cmp.shape[1], k_cmp.shape[2]
    group = heads // kv_heads
    bs = block_size
    qg = block_size if query_block is None else query_block
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    q_offset = resolve_q_offset(seq_q, seq_k, q_offset)
    n_qb, n_kb = num_blocks(seq_q, qg), num_blocks(seq_k, bs)
    win_idx, win_valid = overlap_windows(n_kb, n_cmp, bs, kernel, stride)
    if n_cmp == 0:
        return jnp.full((batch, kv_heads, n_qb, n_kb), -jnp.inf, jnp.float32)

    per_block = batch * qg * heads * n_cmp
    chunk = max(1, min(n_qb, chunk_elems // max(per_block, 1)))
    n_chunks = -(-n_qb // chunk)
    rows = n_chunks * chunk * qg
    qf = jnp.pad(q.astype(jnp.float32), ((0, 0), (0, rows - seq_q), (0, 0), (0, 0)))
    qf = qf.reshape(batch, n_chunks, chunk * qg, kv_heads, group, d).transpose(1, 0, 3, 4, 2, 5)
    kc = k_cmp.astype(jnp.float32).transpose(0, 2, 1, 3)  # [B, KV, n_cmp, d]
    cmp_end = jnp.arange(n_cmp) * stride + kernel - 1  # last key of each window
    seg = segment_ids is not None
    xs = (qf, jnp.arange(n_chunks))
    if seg:
        if seq_q != seq_k or q_offset != 0:
            raise ValueError("segment_ids: self-attention only (seq_q == seq_k, q_offset 0)")
        segs = jnp.asarray(segment_ids, jnp.int32)
        w_seg = segs[:, cmp_end - kernel + 1]  # [B, n_cmp]: segment of each window's first key
        w_inside = w_seg == segs[:, cmp_end]
        rows_seg = jnp.pad(segs, ((0, 0), (0, rows - seq_q)), constant_values=-1)
        prim = rows_seg[:, ::qg]  # [B, n_chunks*chunk]: primary segment of each query group
        xs = xs + (rows_seg.reshape(batch, n_chunks, chunk * qg).transpose(1, 0, 2),
                   prim.reshape(batch, n_chunks, chunk).transpose(1, 0, 2))

    def one_chunk(args):
        qc, c0, *sc = args  # qc [B, KV, G, chunk*qg, d]
        s = jnp.einsum("bhgqd,bhcd->bhgqc", qc, kc, precision=jax.lax.Precision.HIGHEST) * scale
        row = c0 * chunk * qg + jnp.arange(chunk * qg)
        if causal:
            s = jnp.where(cmp_end[None, :] <= (row + q_offset)[:, None], s, -jnp.inf)
        if seg:
            rseg, pseg = sc  # [B, chunk*bs], [B, chunk]
            s = jnp.where((w_seg[:, None, :] == rseg[:, :, None])[:, None, None], s, -jnp.inf)
        m = jnp.max(s, axis=-1, keepdims=True)
        p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
        l = jnp.sum(p, axis=-1, keepdims=True)
        p = jnp.where(l > 0, p / jnp.where(l > 0, l, 1.0), 0.0)
        p = jnp.where((row < seq_q)[:, None], p, 0.0)  # padded rows add nothing
        if seg:  # only the primary segment's rows score
            p = jnp.where((rseg == jnp.repeat(pseg, qg, axis=1))[:, None, None, :, None], p, 0.0)
        agg = p.sum(axis=2).reshape(batch, kv_heads, chunk, qg, n_cmp).sum(axis=3)  # [B,KV,chunk,n_cmp]
        ok = win_valid
        if seg:  # [B, 1, chunk, nKB, w]: windows inside the primary segment
            mine = w_inside[:, None, :] & (w_seg[:, None, :] == pseg[:, :, None])  # [B, chunk, n_cmp]
            ok = (win_valid & mine[:, :, win_idx])[:, None]
        pooled = jnp.where(ok, agg[..., win_idx], -jnp.inf)  # [B,KV,chunk,nKB,w]
        return pooled.max(axis=-1)

    out = jax.lax.map(one_chunk, xs)  # [n_chunks, B, KV, chunk, nKB]
    out = out.transpose(1, 2, 0, 3, 4).reshape(batch, kv_heads, n_chunks * chunk, n_kb)[:, :, :n_qb]
    return jax.lax.stop_gradient(out)


def select_blocks(scores, *, seq_q: int, seq_k: int, block_size: int = PAPER.block_size, topk: int = PAPER.topk,
                  init_blocks: int = PAPER.init_blocks, local_window: int = PAPER.local_window, causal: bool = True,
                  q_offset: int | None = None, segment_ids=None, dense_below: int = PAPER.dense_below,
                  query_block: int | None = None):
    """Step 4: ``scores [batch, kv_heads, n_q_groups, n_kv_blocks]`` -> (block_indices, block_counts), one list
    per query group of ``query_block`` rows (None: ``block_size``; 1: per token).
    ``segment_ids``: the packed rule of the module docstring (``dense_below`` only matters with them)."""
    qg = block_size if query_block is None else query_block
    if segment_ids is not None:
        return _select_segmented(scores, segment_ids, block_size=block_size, topk=topk, init_blocks=init_blocks,
                                 local_window=local_window, causal=causal, q_offset=q_offset,
                                 dense_below=dense_below, query_block=qg)
    bs = block_size
    q_offset = resolve_q_offset(seq_q, seq_k, q_offset)
    n_qb, n_kb = num_blocks(seq_q, qg), num_blocks(seq_k, bs)
    n_local = -(-local_window // bs)
    max_blocks = max(1, min(n_kb, topk + n_local))
    last_row = jnp.minimum((jnp.arange(n_qb) + 1) * qg, seq_q) - 1 + q_offset  # abs position
    last_blk = last_row // bs  # [nQB]
    j = jnp.arange(n_kb)
    valid = (j[None, :] <= last_blk[:, None]) if causal else jnp.ones((n_qb, n_kb), bool)
    anchor = jnp.clip(last_blk, 0, n_kb - 1)[:, None]
    forced = ((j[None, :] < init_blocks) | ((j[None, :] <= anchor) & (j[None, :] > anchor - n_local))) & valid
    s = jnp.where(forced, jnp.inf, jnp.where(valid, scores.astype(jnp.float32), -jnp.inf))
    # a valid block with no overlapping window (-inf score) still ranks above invalid ones
    s = jnp.where(valid & (s == -jnp.inf), -jnp.finfo(jnp.float32).max, s)
    vals, idx = jax.lax.top_k(s, max_blocks)
    chosen = vals > -jnp.inf
    counts = chosen.sum(axis=-1).astype(jnp.int32)
    idx = jnp.sort(jnp.where(chosen, idx, n_kb), axis=-1)  # chosen first, ascending
    last = jnp.take_along_axis(idx, jnp.maximum(counts - 1, 0)[..., None], axis=-1)
    last = jnp.where(counts[..., None] > 0, last, 0)
    idx = jnp.where(jnp.arange(max_blocks) < counts[..., None], idx, last).astype(jnp.int32)
    return idx, counts


def _segment_bounds(segs):
    """First and last index of each position's segment, int32 [B, T] each (segments contiguous)."""
    t = segs.shape[1]
    i = jnp.arange(t, dtype=jnp.int32)
    change = segs[:, 1:] != segs[:, :-1]
    is_start = jnp.concatenate([jnp.ones_like(segs[:, :1], bool), change], axis=1)
    is_end = jnp.concatenate([change, jnp.ones_like(segs[:, :1], bool)], axis=1)
    start = jax.lax.cummax(jnp.where(is_start, i, 0), axis=1)
    end = jax.lax.cummin(jnp.where(is_end, i, t - 1), axis=1, reverse=True)
    return start, end


def _select_segmented(scores, segment_ids, *, block_size, topk, init_blocks, local_window, causal, q_offset,
                      dense_below, query_block):
    batch, kv_heads, n_qb, n_kb = scores.shape
    bs, qg = block_size, query_block
    segs = jnp.asarray(segment_ids, jnp.int32)
    t = segs.shape[1]
    if not causal or (q_offset or 0) != 0 or num_blocks(t, qg) != n_qb or num_blocks(t, bs) != n_kb:
        raise ValueError("segment_ids: causal self-attention only (seq_q == seq_k, q_offset 0)")
    n_local = -(-local_window // bs)
    start, end = _segment_bounds(segs)
    first = jnp.arange(n_qb) * qg
    p_start, p_end = start[:, first], end[:, first]  # [B, nQB]: the primary segment's bounds
    qb = (jnp.minimum(first + qg, t) - 1) // bs  # key block of each group's last row
    sb = p_start // bs  # the primary segment's initial block
    j = jnp.arange(n_kb)
    cand = (j >= sb[..., None]) & (j <= qb[:, None])  # [B, nQB, nKB]
    forced = cand & ((j < sb[..., None] + init_blocks) | (j > qb[:, None] - n_local))
    s = jnp.where(forced[:, None], jnp.inf, jnp.where(cand[:, None], scores.astype(jnp.float32), -jnp.inf))
    s = jnp.where(cand[:, None] & (s == -jnp.inf), -jnp.finfo(jnp.float32).max, s)
    k1 = max(1, min(n_kb, topk + n_local))
    vals, idx = jax.lax.top_k(s, k1)
    top = ((idx[..., None] == j) & (vals > -jnp.inf)[..., None]).any(axis=-2)  # [B, KV, nQB, nKB]
    short = (p_end - p_start + 1) < dense_below
    multi = p_end < jnp.minimum(first + qg, t) - 1  # other segments start inside the group
    sel = jnp.where(short[:, None, :, None], cand[:, None], top) | (multi[..., None] & (j == qb[:, None]))[:, None]
    width = max(1, min(n_kb, max(k1 + 1, -(-dense_below // bs) + 1)))
    big = jnp.int32(n_kb)
    order = jnp.where(sel, -j, -big)  # chosen blocks first, ascending
    _, out = jax.lax.top_k(order, width)
    counts = sel.sum(axis=-1).astype(jnp.int32)
    counts = jnp.minimum(counts, width)
    last = jnp.take_along_axis(out, jnp.maximum(counts - 1, 0)[..., None], axis=-1)
    last = jnp.where(counts[..., None] > 0, last, 0)
    out = jnp.where(jnp.arange(width) < counts[..., None], out, last).astype(jnp.int32)
    return out, counts


def infllm_select(q, k, *, block_size: int = PAPER.block_size, topk: int = PAPER.topk, kernel: int = PAPER.kernel,
                  stride: int = PAPER.stride, init_blocks: int = PAPER.init_blocks,
                  local_window: int = PAPER.local_window, causal: bool = True,
                  q_offset: int | None = None, scale: float | None = None, segment_ids=None,
                  dense_below: int = PAPER.dense_below, query_block: int | None = None):
    """InfLLM-V2 selection for ``q [batch, seq_q, heads, d]`` against ``k [batch, seq_k, kv_heads, d]``.

    Returns ``block_indices int32 [batch, kv_heads, ceil(seq_q/qg), min(n_kv_blocks, topk + n_local)]`` and
    ``block_counts int32 [batch, kv_heads, ceil(seq_q/qg)]`` for ``block_sparse_attention``, ``qg`` =
    ``query_block`` (None: ``block_size``, one choice per query block; 1: per token, the paper's).
    ``segment_ids [batch, seq]`` (packed documents; causal self-attention only): the module docstring's rule,
    ``dense_below`` naming the documents that get all their blocks.
    """
    k_cmp = compress_keys(k, kernel, stride)
    if segment_ids is not None:
        if q.shape[1] != k.shape[1] or (q_offset or 0) != 0 or not causal:
            raise ValueError("segment_ids: causal self-attention only (seq_q == seq_k, q_offset 0); decoding "
                             "from a cache is unpacked")
        scores = block_scores(q, k_cmp, seq_k=k.shape[1], block_size=block_size, kernel=kernel, stride=stride,
                              causal=causal, q_offset=q_offset, scale=scale, segment_ids=segment_ids,
                              query_block=query_block)
        return select_blocks(scores, seq_q=q.shape[1], seq_k=k.shape[1], block_size=block_size, topk=topk,
                             init_blocks=init_blocks, local_window=local_window, causal=causal, q_offset=q_offset,
                             segment_ids=segment_ids, dense_below=dense_below, query_block=query_block)
    return infllm_select_decode(q, k_cmp, seq_k=k.shape[1], block_size=block_size, topk=topk, kernel=kernel,
                                stride=stride, init_blocks=init_blocks, local_window=local_window,
                                causal=causal, q_offset=q_offset, scale=scale, query_block=query_block)


def infllm_select_decode(q_new, k_cmp, *, seq_k: int, block_size: int = PAPER.block_size, topk: int = PAPER.topk,
                         kernel: int = PAPER.kernel, stride: int = PAPER.stride, init_blocks: int = PAPER.init_blocks,
                         local_window: int = PAPER.local_window, causal: bool = True,
                         q_offset: int | None = None, scale: float | None = None, query_block: int | None = None):
    """Selection for a few new query rows from cached compressed keys (``query_block`` as ``infllm_select``;
    with 1, each new token's choice equals the prefill's per-token choice for that token).

    ``q_new [batch, n_new, heads, d]`` are the last ``n_new`` positions of a sequence of ``seq_k`` keys
    (``q_offset`` defaults to ``seq_k - n_new``); ``k_cmp [batch, n_cmp, kv_heads, d]`` are the compressed keys
    of that sequence (``compress_keys`` of all keys, or a cache extended window by window).
    """
    if k_cmp.shape[1] != num_compressed(seq_k, kernel, stride):
        raise ValueError(f"{k_cmp.shape=} does not hold num_compressed({seq_k}) windows of {kernel}/{stride}")
    scores = block_scores(q_new, k_cmp, seq_k=seq_k, block_size=block_size, kernel=kernel, stride=stride,
                          causal=causal, q_offset=q_offset, scale=scale, query_block=query_block)
    return select_blocks(scores, seq_q=q_new.shape[1], seq_k=seq_k, block_size=block_size, topk=topk,
                         init_blocks=init_blocks, local_window=local_window, causal=causal, q_offset=q_offset,
                         query_block=query_block)
