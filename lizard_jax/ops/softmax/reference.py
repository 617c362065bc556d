"""Softmax attention, the spec: a dense masked softmax in float32.

Visibility is defined once, here, by absolute positions (see `visible`), so the same rule serves training,
left-padded batches, KV caches, ring buffers, Star Attention's global position ids and pruned (LazyLLM) caches.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def visible(q_pos, k_pos, *, causal: bool, window: int | None, q_seg=None, k_seg=None):
    """Which keys a query sees. `q_pos [..., T]`, `k_pos [..., S]` -> bool `[..., T, S]`.

    A key at a negative position is padding or an empty cache slot and is never visible. With `causal`, a query
    at position i sees keys j <= i; with a `window` of w it sees only the w most recent positions
    i - w < j <= i (itself included). With segment ids `q_seg [..., T]`, `k_seg [..., S]` (packed documents;
    both or neither) a query also sees only keys of its own segment.
    """
    qp = q_pos[..., :, None]
    kp = k_pos[..., None, :]
    ok = kp >= 0
    if causal:
        ok &= kp <= qp
    if window is not None:
        ok &= kp > qp - window
    if q_seg is not None:
        ok &= q_seg[..., :, None] == k_seg[..., None, :]
    return ok


def merge_sinks(o, lse, sinks):
    """Add attention-sink logits `sinks [heads, m]` to the softmax denominator only.

    o `[B, T, H, D]` and lse `[B, H, T]` are the normalised output and log-sum-exp over real keys.
    """
    sink_lse = jax.nn.logsumexp(sinks.astype(jnp.float32), axis=-1)[None, :, None]  # [1, H, 1]
    total = jnp.logaddexp(lse, sink_lse)
    w = jnp.exp(lse - total)  # exp(-inf - x) = 0 for queries with no visible key
    return o * jnp.swapaxes(w, 1, 2)[..., None].astype(o.dtype), total


def attention_dense(q, k, v, q_pos, k_pos, *, causal, window, scale, q_seg=None, k_seg=None):
    """Masked softmax attention in fp32. q `[B,T,H,D]`, k/v `[B,S,KVH,D]` -> (o `[B,T,H,Dv]`, lse `[B,H,T]`).
    Optional segment ids `q_seg [B,T]`, `k_seg [B,S]` (see `visible`)."""
    b, t, h, d = q.shape
    kvh = k.shape[2]
    qg = q.reshape(b, t, kvh, h // kvh, d)
    s = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    mask = visible(q_pos, k_pos, causal=causal, window=window, q_seg=q_seg, k_seg=k_seg)[:, None, None]  # [B,1,1,T,S]
    s = jnp.where(mask, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)  # rows with no visible key
    p = jnp.exp(s - m)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    o = jnp.einsum("bkgts,bskd->btkgd", p / jnp.where(denom > 0, denom, 1.0), v.astype(jnp.float32))
    lse = jnp.where(denom[..., 0] > 0, jnp.log(denom[..., 0]) + m[..., 0], -jnp.inf)  # [B,KVH,G,T]
    return o.reshape(b, t, h, v.shape[-1]).astype(v.dtype), lse.reshape(b, h, t)
