"""Lightning attention (Lightning Attention-2, arXiv 2401.04658; the linear layers of MiniCPM-SALA,
arXiv 2602.11761): linear attention with one fixed decay per head,

    S_t = exp(-s_h) S_{t-1} + k_t^T v_t,   o_t = q_t S_t

i.e. GLA with ``log_g = -s_h`` for every token (the paper's decay mask ``M_ij = lambda^(i-j)`` with
``lambda = exp(-s_h)``). Implemented as ``gla`` with a ``[batch, seq, heads, 1]`` gate, so the
per-head case of the chunked form (one ``[C, C]`` decay matrix per chunk) and of the Pallas kernel is
used; no ``[batch, seq, heads, dk]`` gate is ever built.

Choices where the papers are silent or differ:
  * No scaling and no normaliser inside the op: the layer applies the 1/sqrt(d) scale, QK-norm,
    output RMSNorm and gate (SALA: ``o_proj(RMSNorm(attn) * sigmoid(z_proj x))``).
  * Slopes: ``s_h = 2**(-8 (h+1) / num_heads)``, the plain ALiBi geometric form. SALA's code
    (fla ``simple_gla``) uses ``2**(-8 (h+1) / 32)`` with 32 heads, which is this formula at
    ``num_heads = 32``; the same slopes in every layer (SALA), no per-layer rescaling (TransNormerLLM
    rescales by depth; pass your own ``slopes`` for that). For a head count that is not a power of two
    we do not use ALiBi's interleaving trick, just the formula.
  * State and accumulation in float32, like every op here.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from lizard_jax.ops.gated_linear import gla, gla_step
from lizard_jax.ops.gated_linear.chunk import DEFAULT_CHUNK_SIZE


def lightning_slopes(num_heads: int):
    """Per-head decay rates ``s_h = 2**(-8 (h+1) / num_heads)``, h = 0..num_heads-1: ``[heads]`` float32."""
    if not (isinstance(num_heads, int) and num_heads > 0):
        raise ValueError(f"num_heads must be a positive int, got {num_heads=}")
    return jnp.asarray(2.0 ** (-8.0 * np.arange(1, num_heads + 1) / num_heads), jnp.float32)


def _log_gate(slopes, heads: int, lead_shape):
    """``-slopes`` broadcast to ``lead_shape + (heads, 1)`` (one log-decay per head)."""
    if slopes.shape != (heads,) or not jnp.issubdtype(slopes.dtype, jnp.floating):
        raise ValueError(f"slopes must be a float array [heads] = ({heads},), got {slopes.shape=} {slopes.dtype=}")
    return jnp.broadcast_to(-slopes.astype(jnp.float32)[:, None], (*lead_shape, heads, 1))


def lightning_attention(
    q,
    k,
    v,
    slopes,
    *,
    initial_state=None,
    return_final_state: bool = False,
    impl: str = "auto",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
):
    """Lightning attention over a sequence.

    Args:
      q, k: ``[batch, seq, heads, dk]``; v: ``[batch, seq, heads, dv]``.
      slopes: ``[heads]`` decay rates s_h >= 0 (e.g. ``lightning_slopes(heads)``).
      initial_state, return_final_state, impl, chunk_size: as in ``gla``.

    Returns:
      o ``[batch, seq, heads, dv]`` (v's dtype), or ``(o, final_state [batch, heads, dk, dv] float32)``.
    """
    if q.ndim != 4:
        raise ValueError(f"q must be [batch, seq, heads, dk], got {q.shape=}")
    log_g = _log_gate(slopes, q.shape[2], q.shape[:2])
    return gla(
        q, k, v, log_g,
        initial_state=initial_state, return_final_state=return_final_state, impl=impl, chunk_size=chunk_size,
    )


def lightning_step(q, k, v, slopes, state):
    """One decoding step. q, k ``[batch, heads, dk]``, v ``[batch, heads, dv]``, slopes ``[heads]``,
    state ``[batch, heads, dk, dv]``. Returns (o ``[batch, heads, dv]``, new state float32)."""
    if q.ndim != 3:
        raise ValueError(f"q must be [batch, heads, dk], got {q.shape=}")
    log_g = _log_gate(slopes, q.shape[1], q.shape[:1])
    return gla_step(q, k, v, log_g, state)


__all__ = ["lightning_attention", "lightning_slopes", "lightning_step"]
