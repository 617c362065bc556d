"""Segment ids (packed documents) as every attention op and kernel takes them: one validation, one meaning."""

from __future__ import annotations

import jax.numpy as jnp


def resolve_segments(seq_q: int, seq_k: int, batch: int, segment_ids=None, q_segment_ids=None,
                     kv_segment_ids=None):
    """(q_seg [batch, seq_q], k_seg [batch, seq_k]) int32 or (None, None); ValueError on misuse."""
    if segment_ids is not None:
        if q_segment_ids is not None or kv_segment_ids is not None:
            raise ValueError("pass segment_ids or q_segment_ids/kv_segment_ids, not both")
        if seq_q != seq_k:
            raise ValueError(f"segment_ids is for self-attention (seq_q == seq_k); got {seq_q=}, {seq_k=}: "
                             "pass q_segment_ids and kv_segment_ids")
        q_segment_ids = kv_segment_ids = segment_ids
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("q_segment_ids and kv_segment_ids go together")
    if q_segment_ids is None:
        return None, None
    for name, x, want in (("q_segment_ids", q_segment_ids, (batch, seq_q)),
                          ("kv_segment_ids", kv_segment_ids, (batch, seq_k))):
        if tuple(x.shape) != want:
            raise ValueError(f"{name}.shape={tuple(x.shape)} must be [batch, seq] = {want}")
        if not jnp.issubdtype(x.dtype, jnp.integer):
            raise ValueError(f"{name} must be integers, got {x.dtype}")
    return jnp.asarray(q_segment_ids, jnp.int32), jnp.asarray(kv_segment_ids, jnp.int32)

