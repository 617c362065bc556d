"""GLA, one token at a time (decoding from a cached state)."""

from __future__ import annotations

import jax.numpy as jnp

from lizard_jax.ops.gated_linear._checks import check_inputs
from lizard_jax.ops.gated_linear.reference import recurrence_step


def gla_step(q, k, v, log_g, state):
    """One GLA decoding step: ``S = diag(exp(log_g)) state + k^T v``, ``o = q S``.

    Args:
      q, k: ``[batch, heads, dk]``.
      v: ``[batch, heads, dv]``.
      log_g: ``[batch, heads, dk]`` or ``[batch, heads, 1]``, <= 0.
      state: ``[batch, heads, dk, dv]`` (any float dtype; used in float32).

    Returns:
      (o ``[batch, heads, dv]`` in v's dtype, new state ``[batch, heads, dk, dv]`` float32).

    No segment ids: generation is unpacked. To start a new document, start from a zero state (or pass
    ``log_g = -inf``: the state is multiplied by exactly 0).
    """
    if state is None:
        raise ValueError("gla_step needs a state [batch, heads, dk, dv]; start from zeros")
    check_inputs(q, k, v, log_g, state, layout="bhd")
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    o, h = recurrence_step(f32(state), f32(q), f32(k), f32(v), f32(log_g))
    return o.astype(v.dtype), h


__all__ = ["gla_step"]
