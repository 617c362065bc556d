"""Softmax attention: causal, sliding window, GQA, attention sinks, log-sum-exp on request.

`attention(q, k, v, ...)`: q `[batch, seq_q, heads, head_dim]`, k/v `[batch, seq_k, kv_heads, head_dim]`.
Visibility is by absolute position (`reference.visible`): `q_positions [batch, seq_q]` and
`k_positions [batch, seq_k]` (negative = padding / empty slot). Default positions align the last query with the
last key (`q_pos = arange(seq_q) + seq_k - seq_q`), which is plain causal attention when seq_q == seq_k.

impl: "xla" (masked softmax in plain XLA ops), "cudnn" (jax.nn.dot_product_attention's cuDNN flash kernel; only
for default positions, no sinks, no lse, 16-bit inputs), "auto" (cudnn on a GPU when it applies, else xla).
"xla" takes one of two forms (`blocks`). On a CPU, past 256 queries: blocks of (256 query rows, 512 keys) with an
online softmax that skips every key block no query of the row block can see (causal future, outside the
window, padding, another segment; decided at run time from each block's position and segment ranges, so any
positions work): 5x faster than dense rows for a 4K-token SmolLM2 prefill. Elsewhere, and for few queries
(decoding): query chunks against all keys (few large ops, memory O(chunk * seq_k)), which accelerators run
better. Both are rematerialised in the backward pass.

Packed documents: `segment_ids [batch, seq]` (int, self-attention: seq_q == seq_k; equal within a document) or
`q_segment_ids [batch, seq_q]` with `kv_segment_ids [batch, seq_k]`: a query sees only keys of its own segment
(on top of the position rule); padding is just another segment. Sinks stay per query (denominator only). With
none of them the program is exactly the unsegmented one. For packed self-attention the positions may be left
None: within a document index differences equal per-document position differences, so causal and window masks
are the same, and the banded windowed path (O(seq * (chunk + window))) is kept; per-document positions then
only matter for RoPE, outside this op. cudnn: jax.nn.dot_product_attention has no segment ids on every jax
version, so "auto" routes segment ids to xla and impl="cudnn" with segment ids is an error.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp

from lizard_jax.ops.softmax.reference import attention_dense, merge_sinks, visible
from pallas_kernels.segments import resolve_segments

__all__ = ["attention", "visible", "merge_sinks", "attention_dense"]

_IMPLS = ("auto", "xla", "cudnn")
CPU_BLOCKS = (256, 512)  # (query rows, keys) of the key-blocked form: measured fastest at 4K on a 2-core CPU


def key_blocks_for(blocks: tuple[int, int] | None, seq_q: int) -> tuple[int, int] | None:
    """The (query rows, keys) tiles `key_blocked` runs with, or None for a query-chunked form: `blocks`, or
    `CPU_BLOCKS` on a CPU when None; None also when the `seq_q` queries fit one row block (few queries, as in
    decoding, run faster as one dense chunk)."""
    if blocks is None and jax.default_backend() == "cpu":
        blocks = CPU_BLOCKS
    if blocks is not None and (len(blocks) != 2 or min(blocks) < 1):
        raise ValueError(f"blocks must be (query rows, keys), both >= 1, got {blocks!r}")
    return blocks if blocks is not None and seq_q > blocks[0] else None
_FAR = 2**30  # beyond any position or segment id


def _check(q, k, v, q_positions, k_positions, sinks):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"expected 4-D [batch, seq, heads, head_dim]: {q.shape=} {k.shape=} {v.shape=}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"{k.shape=} and {v.shape=} differ in batch/seq/heads")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"{q.shape=} and {k.shape=} differ in batch")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"{q.shape=} and {k.shape=} differ in head_dim")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads {q.shape[2]} not a multiple of kv heads {k.shape[2]}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must be floating point, got {x.dtype}")
    if q_positions is not None and q_positions.shape != q.shape[:2]:
        raise ValueError(f"{q_positions.shape=} must be [batch, seq_q] = {q.shape[:2]}")
    if k_positions is not None and k_positions.shape != k.shape[:2]:
        raise ValueError(f"{k_positions.shape=} must be [batch, seq_k] = {k.shape[:2]}")
    if sinks is not None and (sinks.ndim != 2 or sinks.shape[0] != q.shape[2]):
        raise ValueError(f"{sinks.shape=} must be [heads={q.shape[2]}, num_sinks]")


def attention(
    q,
    k,
    v,
    *,
    q_positions=None,
    k_positions=None,
    causal: bool = True,
    window: int | None = None,
    sinks=None,
    scale: float | None = None,
    return_lse: bool = False,
    impl: str = "auto",
    chunk_size: int = 1024,
    blocks: tuple[int, int] | None = None,
    segment_ids=None,
    q_segment_ids=None,
    kv_segment_ids=None,
):
    """Softmax attention. Returns o `[batch, seq_q, heads, head_dim_v]` (dtype of v) and, with `return_lse`,
    the float32 log-sum-exp `[batch, heads, seq_q]` (including sinks; -inf for a query that sees nothing, whose
    output is 0). Segment ids: see the module docstring. `blocks` (query rows, keys): the key-blocked xla form
    with these blocks (when seq_q is longer than a row block; else query chunks of `chunk_size` against all keys);
    None: `CPU_BLOCKS` on a CPU, else the query-chunked form."""
    _check(q, k, v, q_positions, k_positions, sinks)
    q_seg, k_seg = resolve_segments(q.shape[1], k.shape[1], q.shape[0], segment_ids, q_segment_ids,
                                    kv_segment_ids)
    if impl not in _IMPLS:
        raise ValueError(f"unknown impl {impl!r}; expected one of {_IMPLS}")
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    b, t, h, d = q.shape
    s_len = k.shape[1]
    scale = d**-0.5 if scale is None else scale
    default_pos = q_positions is None and k_positions is None
    cudnn_ok = (
        q_seg is None
        and default_pos
        and causal
        and t == s_len
        and sinks is None
        and not return_lse
        and q.dtype in (jnp.bfloat16, jnp.float16)
        and q.dtype == k.dtype == v.dtype
    )
    if impl == "cudnn" and not cudnn_ok:
        raise ValueError(
            "impl='cudnn' needs default positions, causal self-attention (seq_q == seq_k), no sinks, no lse, "
            "no segment ids and 16-bit inputs; use impl='xla' or 'auto'"
        )
    if impl == "cudnn" or (impl == "auto" and cudnn_ok and jax.default_backend() == "gpu"):
        local = None if window is None else (window - 1, 0)
        return jax.nn.dot_product_attention(
            q, k, v, scale=scale, is_causal=True, local_window_size=local, implementation="cudnn"
        )
    banded = default_pos and causal and window is not None and t == s_len and window + chunk_size < s_len
    if q_positions is None:
        q_positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32) + (s_len - t), (b, t))
    if k_positions is None:
        k_positions = jnp.broadcast_to(jnp.arange(s_len, dtype=jnp.int32), (b, s_len))
    blocks = key_blocks_for(blocks, t)
    if blocks is not None:
        o, lse = key_blocked(q, k, v, q_positions, k_positions, causal=causal, window=window, scale=scale,
                             blocks=blocks, q_seg=q_seg, k_seg=k_seg)
    else:
        o, lse = _chunked(q, k, v, q_positions, k_positions, causal=causal, window=window, scale=scale,
                          chunk_size=chunk_size, banded=banded, q_seg=q_seg, k_seg=k_seg)
    if sinks is not None:
        o, lse = merge_sinks(o, lse, sinks)
    return (o, lse) if return_lse else o


def _chunked(q, k, v, q_pos, k_pos, *, causal, window, scale, chunk_size, banded=False, q_seg=None, k_seg=None):
    """Dense masked softmax over query chunks, rematerialised in the backward pass (memory O(chunk * seq_k)).

    `banded` (aligned causal self-attention with a window): each query chunk scores only the
    `chunk + window - 1` keys it can see, so the cost is O(seq * (chunk + window)) instead of O(seq^2).
    `q_seg`/`k_seg` (both or neither): segment ids, chunked and sliced along with the positions.
    """
    b, t, h, d = q.shape
    seg = q_seg is not None

    def dense(q, k, v, qp, kp, qs=None, ks=None):
        return attention_dense(q, k, v, qp, kp, causal=causal, window=window, scale=scale, q_seg=qs, k_seg=ks)

    if t <= chunk_size:
        return dense(q, k, v, q_pos, k_pos, q_seg, k_seg)
    n = -(-t // chunk_size)
    qp = _pad_rows(q, n * chunk_size, 0)
    pp = _pad_rows(q_pos, n * chunk_size, -1)
    qc = jnp.moveaxis(qp.reshape(b, n, chunk_size, h, d), 1, 0)
    pc = jnp.moveaxis(pp.reshape(b, n, chunk_size), 1, 0)
    # padded query rows: position -1 (they see nothing; cropped below), segment -1
    sc = jnp.moveaxis(_pad_rows(q_seg, n * chunk_size, -1).reshape(b, n, chunk_size), 1, 0) if seg else None
    if banded:
        # keys padded in front by window - 1 invisible slots: chunk i's keys are rows [i*C, i*C + C + w - 1)
        span = chunk_size + window - 1
        front, back = window - 1, n * chunk_size - t
        kb = jnp.pad(k, ((0, 0), (front, back), (0, 0), (0, 0)))
        vb = jnp.pad(v, ((0, 0), (front, back), (0, 0), (0, 0)))
        kpb = jnp.pad(k_pos, ((0, 0), (front, back)), constant_values=-1)
        ksb = jnp.pad(k_seg, ((0, 0), (front, back)), constant_values=-1) if seg else None

        def band(args):
            qi, pi, i, *si = args
            at = i * chunk_size
            ks = jax.lax.dynamic_slice_in_dim(kb, at, span, axis=1)
            vs = jax.lax.dynamic_slice_in_dim(vb, at, span, axis=1)
            ps = jax.lax.dynamic_slice_in_dim(kpb, at, span, axis=1)
            if not seg:
                return dense(qi, ks, vs, pi, ps)
            return dense(qi, ks, vs, pi, ps, si[0], jax.lax.dynamic_slice_in_dim(ksb, at, span, axis=1))

        o, lse = jax.lax.map(jax.checkpoint(band), (qc, pc, jnp.arange(n)) + ((sc,) if seg else ()))
    elif seg:
        body = jax.checkpoint(lambda args: dense(args[0], k, v, args[1], k_pos, args[2], k_seg))
        o, lse = jax.lax.map(body, (qc, pc, sc))
    else:
        body = jax.checkpoint(lambda args: dense(args[0], k, v, args[1], k_pos))
        o, lse = jax.lax.map(body, (qc, pc))
    o = jnp.moveaxis(o, 0, 1).reshape(b, n * chunk_size, h, -1)[:, :t]
    lse = jnp.moveaxis(lse, 0, 2).reshape(b, h, n * chunk_size)[:, :, :t]
    return o, lse


def _pad_rows(x, n: int, value):
    """x `[b, s, ...]` padded along s to n rows with `value`."""
    return jnp.pad(x, ((0, 0), (0, n - x.shape[1])) + ((0, 0),) * (x.ndim - 2), constant_values=value)


def _ranges(pos, seg, n_blocks: int, keys: bool):
    """Per block of rows `[n, b]`: min and max position and, with segment ids, min and max segment. pos/seg
    `[b, n * rows]`. Keys count only where pos >= 0 (a negative key is never visible; none: FAR / -FAR); every
    query row counts (`visible` gives a query at a negative position keys too, when not causal)."""
    b = pos.shape[0]
    pos = pos.reshape(b, n_blocks, -1)
    ok = pos >= 0 if keys else jnp.ones(pos.shape, bool)
    lo = lambda x: jnp.min(jnp.where(ok, x, _FAR), axis=-1).T
    hi = lambda x: jnp.max(jnp.where(ok, x, -_FAR), axis=-1).T
    if seg is None:
        return lo(pos), hi(pos), None, None
    seg = seg.reshape(b, n_blocks, -1)
    return lo(pos), hi(pos), lo(seg), hi(seg)


def key_blocked(q, k, v, q_pos, k_pos, *, causal, window, scale, blocks, q_seg=None, k_seg=None, allow=None):
    """Masked softmax over blocks of (rq query rows, rk keys) with an online softmax (float32 running max, sum
    and output); a key block runs only if some query of the row block may see some key of it, judged from the
    blocks' position and segment ranges (a conservative test: the mask inside the block stays exact).
    `allow` = (mask `[B, KVH, T, n]` bool, size): also, query row t of kv head h sees key s only where
    mask[.., h, t, s // size] (block-sparse lists per row; rk is rounded up to a multiple of size), and a key
    block no row of the row block allows is skipped too.
    Returns (o `[B,T,H,Dv]`, lse `[B,H,T]`) as `attention_dense` does."""
    b, t, h, d = q.shape
    s_len, kvh, dv = k.shape[1], k.shape[2], v.shape[-1]
    g = h // kvh
    rq, rk = min(blocks[0], t), min(blocks[1], s_len)
    if allow is not None:
        rk = -(-rk // allow[1]) * allow[1]
    nq, nk = -(-t // rq), -(-s_len // rk)
    seg = q_seg is not None
    qp, kp = _pad_rows(q_pos, nq * rq, -1), _pad_rows(k_pos, nk * rk, -1)
    qs = _pad_rows(q_seg, nq * rq, -1) if seg else None
    ks = _pad_rows(k_seg, nk * rk, -1) if seg else None
    q_lo, q_hi, qs_lo, qs_hi = _ranges(qp, qs, nq, keys=False)  # [nq, b]
    k_lo, k_hi, ks_lo, ks_hi = _ranges(kp, ks, nk, keys=True)  # [nk, b]
    rows = lambda x, n, r: jnp.moveaxis(x.reshape(b, n, r, *x.shape[2:]), 1, 0)  # [n, b, r, ...]
    qb = rows(_pad_rows(q, nq * rq, 0).reshape(b, nq * rq, kvh, g, d), nq, rq)
    kb = rows(_pad_rows(k, nk * rk, 0), nk, rk)
    vb = rows(_pad_rows(v, nk * rk, 0), nk, rk).astype(jnp.float32)
    kpb, ksb = rows(kp, nk, rk), (rows(ks, nk, rk) if seg else None)
    if allow is not None:  # [nq, b, kvh, rq, nk, rk // size]
        allowed, size = allow
        per = rk // size
        allowed = jnp.pad(allowed, ((0, 0), (0, 0), (0, nq * rq - t), (0, nk * per - allowed.shape[-1])))
        ab = jnp.moveaxis(allowed.reshape(b, kvh, nq, rq, nk, per), 2, 0)

    def row_block(args):
        qi, pi, lo, hi, *rest = args  # qi [b, rq, kvh, g, d]; pi [b, rq]; lo/hi [b]
        ai = rest.pop() if allow is not None else None  # [b, kvh, rq, nk, per]
        si = rest
        slo, shi = (si[1], si[2]) if seg else (None, None)

        def step(carry, j):
            def run(carry):
                m, l, acc = carry  # [b, kvh, g, rq] (acc [..., dv])
                sc = jnp.einsum("btkgd,bskd->bkgts", qi, kb[j], preferred_element_type=jnp.float32) * scale
                mask = visible(pi, kpb[j], causal=causal, window=window, q_seg=si[0] if seg else None,
                               k_seg=ksb[j] if seg else None)[:, None, None]
                if ai is not None:
                    mask = mask & jnp.repeat(ai[:, :, :, j], size, axis=-1)[:, :, None]
                sc = jnp.where(mask, sc, -jnp.inf)
                m_new = jnp.maximum(m, jnp.max(sc, axis=-1))
                base = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # rows that saw nothing yet
                p = jnp.exp(sc - base[..., None])
                keep = jnp.exp(m - base)  # exp(-inf) = 0 for the first visible block
                l = l * keep + jnp.sum(p, axis=-1)
                acc = acc * keep[..., None] + jnp.einsum("bkgts,bskd->bkgtd", p, vb[j])
                return m_new, l, acc

            may_see = k_lo[j] <= k_hi[j]  # a valid key
            if causal:
                may_see &= k_lo[j] <= hi
            if window is not None:
                may_see &= k_hi[j] > lo - window
            if seg:
                may_see &= (ks_lo[j] <= shi) & (slo <= ks_hi[j])
            if ai is not None:
                may_see &= jnp.any(ai[:, :, :, j], axis=(1, 2, 3))
            return jax.lax.cond(jnp.any(may_see), run, lambda c: c, carry), None

        init = (jnp.full((b, kvh, g, rq), -jnp.inf, jnp.float32), jnp.zeros((b, kvh, g, rq), jnp.float32),
                jnp.zeros((b, kvh, g, rq, dv), jnp.float32))
        (m, l, acc), _ = jax.lax.scan(step, init, jnp.arange(nk))
        o = acc / jnp.where(l > 0, l, 1.0)[..., None]
        lse = jnp.where(l > 0, jnp.log(jnp.where(l > 0, l, 1.0)) + m, -jnp.inf)
        return jnp.moveaxis(o, 3, 1).reshape(b, rq, h, dv), lse.reshape(b, h, rq)

    xs = (qb, rows(qp, nq, rq), q_lo, q_hi) + ((rows(qs, nq, rq), qs_lo, qs_hi) if seg else ()) + (
        (ab,) if allow is not None else ())
    o, lse = jax.lax.map(jax.checkpoint(row_block), xs)
    o = jnp.moveaxis(o, 0, 1).reshape(b, nq * rq, h, dv)[:, :t].astype(v.dtype)
    lse = jnp.moveaxis(lse, 0, 2).reshape(b, h, nq * rq)[:, :, :t]
    return o, lse
