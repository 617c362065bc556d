"""Packed documents for the GLA family: segment ids -> a hard reset (log-gate -inf) at each segment start.

``segment_ids`` int ``[batch, seq]``, equal within a document. A segment starts at t >= 1 where
``segment_ids[t] != segment_ids[t-1]``; there the log-gate becomes -inf, so the state (and, for the normalised
linear attention, the normaliser) is multiplied by exactly 0 before the token's own key is added. Position 0
never starts one: an initial state applies to the first segment only, and the final state is the last
segment's (padding at the end is one more segment). The gradient wrt a start's log-gate is 0 (the ``where``
that sets it), and every form here handles -inf exactly: the reference scan multiplies by exp(-inf) = 0, the
chunked XLA form only ever sums gates (never subtracts them) before one ``exp``, and the Pallas kernel splits
the -inf into a finite gate and masks (``pallas_kernels.chunked_scan.common.chunk_gates``).
"""

from __future__ import annotations

import jax.numpy as jnp


def check_segment_ids(segment_ids, batch: int, seq: int) -> None:
    """ValueError unless ``segment_ids`` is an integer array ``[batch, seq]``."""
    shape, dtype = getattr(segment_ids, "shape", None), getattr(segment_ids, "dtype", None)
    if shape != (batch, seq) or dtype is None or not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"segment_ids must be an int array [batch, seq] = {(batch, seq)}, got shape {shape} and "
                         f"dtype {dtype}")


def segment_starts(segment_ids):
    """bool ``[batch, seq]``: True where a segment starts after position 0."""
    changed = segment_ids[:, 1:] != segment_ids[:, :-1]
    return jnp.concatenate([jnp.zeros_like(changed[:, :1]), changed], axis=1)


def reset_gates(log_g, segment_ids):
    """``log_g [batch, seq, heads, dk | 1]`` with -inf at every segment start (every dim)."""
    return jnp.where(segment_starts(segment_ids)[:, :, None, None], -jnp.inf, log_g)


__all__ = ["check_segment_ids", "reset_gates", "segment_starts"]
