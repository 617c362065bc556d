"""Float64 NumPy oracle for block-sparse attention: forward, lse and the gradients, written out by hand
(no JAX), one (batch, head) at a time so it also serves the GPU check at realistic lengths."""

from __future__ import annotations

import numpy as np


def selected_blocks(block_indices, block_counts, n_kv_blocks: int):
    """bool [batch, kv_heads, n_q_blocks, n_kv_blocks]: the listed key blocks of each query block."""
    idx = np.asarray(block_indices)
    cnt = np.asarray(block_counts)
    blocks = np.zeros(idx.shape[:3] + (n_kv_blocks,), bool)
    b, h, i, m = np.nonzero(np.arange(idx.shape[-1]) < cnt[..., None])
    blocks[b, h, i, idx[b, h, i, m]] = True
    return blocks


def attention(q, k, v, block_indices, block_counts, *, block_size: int, causal: bool = True, scale=None,
              q_offset=None, do=None, dlse=None, q_segment_ids=None, kv_segment_ids=None, query_block=None):
    """Returns (o, lse) and, given cotangents ``do [B, Tq, H, d]`` and ``dlse [B, H, Tq]``, also
    (dq, dk, dv); all float64. Rows that see no key: o = 0, lse = -inf, no gradient. Segment ids
    ``q_segment_ids [B, Tq]`` and ``kv_segment_ids [B, Tk]`` (packed documents, both or neither): a row also
    sees only keys of its own segment. ``query_block`` (None: ``block_size``): query rows per block list (1:
    per-token lists, ``block_indices [B, KV, Tq, M]``)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    batch, seq_q, heads, d = q.shape
    seq_k, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    q_offset = seq_k - seq_q if q_offset is None else q_offset
    qb = block_size if query_block is None else query_block
    blocks = selected_blocks(block_indices, block_counts, -(-seq_k // block_size))
    rows, cols = np.arange(seq_q), np.arange(seq_k)
    o = np.zeros_like(q)
    lse = np.full((batch, heads, seq_q), -np.inf)
    grads = do is not None
    if grads:
        do = np.asarray(do, np.float64)
        dlse = np.zeros((batch, heads, seq_q)) if dlse is None else np.asarray(dlse, np.float64)
        dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    for b in range(batch):
        for h in range(heads):
            g = h // group
            mask = blocks[b, g][rows // qb][:, cols // block_size]
            if causal:
                mask &= cols[None, :] <= rows[:, None] + q_offset
            if q_segment_ids is not None:
                mask &= np.asarray(q_segment_ids)[b][:, None] == np.asarray(kv_segment_ids)[b][None, :]
            s = np.where(mask, scale * q[b, :, h] @ k[b, :, g].T, -np.inf)
            m = s.max(axis=1, initial=-np.inf)
            m = np.where(np.isfinite(m), m, 0.0)
            e = np.exp(s - m[:, None])
            l = e.sum(axis=1)
            p = e / np.where(l > 0, l, 1.0)[:, None]
            o[b, :, h] = p @ v[b, :, g]
            lse[b, h] = np.where(l > 0, m + np.log(np.where(l > 0, l, 1.0)), -np.inf)
            if grads:
                delta = (do[b, :, h] * o[b, :, h]).sum(axis=1) - dlse[b, h]
                ds = p * (do[b, :, h] @ v[b, :, g].T - delta[:, None])
                dq[b, :, h] = scale * ds @ k[b, :, g]
                dk[b, :, g] += scale * ds.T @ q[b, :, h]
                dv[b, :, g] += p.T @ do[b, :, h]
    return (o, lse, dq, dk, dv) if grads else (o, lse)


def random_selection(rng, batch: int, kv_heads: int, seq_q: int, seq_k: int, block_size: int, max_blocks: int,
                     *, causal: bool = True, q_offset=None, p_empty: float = 0.1, query_block=None):
    """Random duplicate-free selections: for each query block a random subset (size 0..max_blocks, size 0 with
    probability ``p_empty``) of the key blocks it may see (causal: up to its last row's block), sorted, the
    unused tail filled with random in-range junk (which no implementation may read). ``query_block`` (None:
    ``block_size``): query rows per list."""
    qb = block_size if query_block is None else query_block
    n_qb, n_kb = -(-seq_q // qb), -(-seq_k // block_size)
    q_offset = seq_k - seq_q if q_offset is None else q_offset
    idx = rng.integers(0, n_kb, (batch, kv_heads, n_qb, max_blocks)).astype(np.int32)
    cnt = np.zeros((batch, kv_heads, n_qb), np.int32)
    for b in range(batch):
        for h in range(kv_heads):
            for i in range(n_qb):
                last = min((i + 1) * qb, seq_q) - 1 + q_offset
                n_vis = min(n_kb, last // block_size + 1) if causal else n_kb
                if n_vis <= 0 or rng.random() < p_empty:
                    continue
                c = int(rng.integers(1, min(max_blocks, n_vis) + 1))
                idx[b, h, i, :c] = np.sort(rng.choice(n_vis, c, replace=False))
                cnt[b, h, i] = c
    return idx, cnt
