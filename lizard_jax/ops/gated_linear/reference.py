"""The GLA spec: a token-by-token ``lax.scan`` in float32. Plain and obviously right; slow.

    S_0 = h0 (or 0),   S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t,   o_t = q_t S_t

Shapes: q, k ``[batch, seq, heads, dk]``, v ``[batch, seq, heads, dv]``, g (log forget gate, <= 0)
``[batch, seq, heads, dk]`` or ``[batch, seq, heads, 1]`` (one decay per head, broadcast over dk),
state ``[batch, heads, dk, dv]`` float32. No scaling inside.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from lizard_jax.ops.gated_linear.segments import reset_gates

# every float32 contraction in the GLA family runs at full float32 precision (no TF32 / bf16 passes)
PRECISION = lax.Precision.HIGHEST


def recurrence_step(h, q, k, v, g):
    """One step of the recurrence, all float32.

    h ``[batch, heads, dk, dv]``; q, k ``[batch, heads, dk]``; v ``[batch, heads, dv]``;
    g ``[batch, heads, dk]`` or ``[batch, heads, 1]``. Returns (o ``[batch, heads, dv]``, new h).
    """
    h = jnp.exp(g)[..., None] * h + k[..., :, None] * v[..., None, :]
    o = jnp.einsum("bhk,bhkv->bhv", q, h, precision=PRECISION)
    return o, h


def gla_reference(q, k, v, g, initial_state=None, *, segment_ids=None):
    """GLA by a sequential scan over tokens. Returns (o ``[batch, seq, heads, dv]`` in v's dtype,
    final state ``[batch, heads, dk, dv]`` float32). segment_ids: None or int ``[batch, seq]``, the state
    restarts at each segment start (``segments.py``). Inputs are assumed validated (see ``gla``)."""
    if segment_ids is not None:
        g = reset_gates(g, segment_ids)
    batch, _, heads, dk = q.shape
    dv = v.shape[-1]
    h0 = (
        jnp.zeros((batch, heads, dk, dv), jnp.float32)
        if initial_state is None
        else initial_state.astype(jnp.float32)
    )
    # time-major float32 copies: [seq, batch, heads, d]
    xs = tuple(jnp.swapaxes(x.astype(jnp.float32), 0, 1) for x in (q, k, v, g))

    def body(h, x):
        o, h = recurrence_step(h, *x)
        return h, o

    ht, o = lax.scan(body, h0, xs)
    return jnp.swapaxes(o, 0, 1).astype(v.dtype), ht


__all__ = ["PRECISION", "gla_reference", "recurrence_step"]
