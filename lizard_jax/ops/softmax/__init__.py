"""Softmax attention: causal, sliding window, GQA, attention sinks, log-sum-exp on request.

`attention(q, k, v, ...)`: q `[batch, seq_q, heads, head_dim]`, k/v `[batch, seq_k, kv_heads, head_dim]`.
Visibility is by absolute position (`reference.visible`): `q_positions [batch, seq_q]` and
`k_positions [batch, seq_k]` (negative = padding / empty slot). Default positions align the last query with the
last key (`q_pos = arange(seq_q) + seq_k - seq_q`), which is plain causal attention when seq_q == seq_k.

impl: "xla" (query-chunked masked softmax, memory O(chunk * seq_k)), "cudnn" (jax.nn.dot_product_attention's
cuDNN flash kernel; only for default positions, no sinks, no lse, 16-bit inputs), "auto" (cudnn on a GPU when it
applies, else xla).

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
    segment_ids=None,
    q_segment_ids=None,
    kv_segment_ids=None,
):
    """Softmax attention. Returns o `[batch, seq_q, heads, head_dim_v]` (dtype of v) and, with `return_lse`,
    the float32 log-sum-exp `[batch, heads, seq_q]` (including sinks; -inf for a query that sees nothing, whose
    output is 0). Segment ids: see the module docstring."""
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
    pad = n * chunk_size - t
    qp = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    pp = jnp.pad(q_pos, ((0, 0), (0, pad)), constant_values=-1)
    qc = jnp.moveaxis(qp.reshape(b, n, chunk_size, h, d), 1, 0)
    pc = jnp.moveaxis(pp.reshape(b, n, chunk_size), 1, 0)
    # padded query rows: position -1 (they see nothing; cropped below), segment -1
    sc = jnp.moveaxis(jnp.pad(q_seg, ((0, 0), (0, pad)), constant_values=-1).reshape(b, n, chunk_size), 1, 0) \
        if seg else None
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
