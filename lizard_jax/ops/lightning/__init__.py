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
  * Slopes (``lightning_slopes``): by default the rule of the official MiniCPM-SALA modeling code, which is
    ALiBi's ``get_slopes`` (Press et al.; the Lightning Attention repo's ``_build_slope_tensor``): for a
    power-of-two head count ``H``, ``s_h = 2**(-8 (h+1) / H)``; otherwise the ``c = 2**floor(log2 H)`` slopes
    of ``c`` heads followed by the first ``H - c`` of the even-indexed slopes of ``2c`` heads (H = 9:
    ``2**-1 .. 2**-8`` then ``2**-0.5``). Source: ``_build_slope_tensor(nheads)`` in the HF repo
    openbmb/MiniCPM-SALA ``modeling_minicpm_sala.py``, used as ``g_gamma = -slopes`` of fla's
    ``chunk_simple_gla`` with the layer's query-head count (read in a copy of that file with the OpenBMB header;
    the vLLM port ``vllm/model_executor/layers/mamba/sala_simple_gla.py`` and the MLX port
    OminiX-ai/OminiX-MLX ``minicpm-sala-mlx/src/attention/lightning.rs`` build the same). The same slopes in
    every layer, no per-layer rescaling (TransNormerLLM / MiniMax rescale by depth; pass your own ``slopes``
    for that). ``rule="geometric"`` is the plain ``2**(-8 (h+1) / H)`` for every H (our earlier default; equal
    to the ALiBi rule when H is a power of two).
  * State and accumulation in float32, like every op here.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from lizard_jax.ops.gated_linear import gla, gla_step
from lizard_jax.ops.gated_linear.chunk import DEFAULT_CHUNK_SIZE


SLOPE_RULES = ("alibi", "geometric")


def _alibi_slopes(n: int) -> list[float]:
    """ALiBi's get_slopes (float64): power of two -> 2**(-8 (h+1) / n); else the closest lower power's slopes
    and every other slope of twice that power, as many as are missing."""
    if n & (n - 1) == 0:
        return [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]
    c = 1 << (n.bit_length() - 1)
    return _alibi_slopes(c) + _alibi_slopes(2 * c)[0::2][: n - c]


def lightning_slopes(num_heads: int, rule: str = "alibi"):
    """Per-head decay rates ``s_h`` (h = 0..num_heads-1): ``[heads]`` float32. ``rule="alibi"`` (default, the
    official MiniCPM-SALA code) or ``"geometric"`` (``2**(-8 (h+1) / num_heads)``); see the module docstring."""
    if not (isinstance(num_heads, int) and num_heads > 0):
        raise ValueError(f"num_heads must be a positive int, got {num_heads=}")
    if rule == "alibi":
        s = np.asarray(_alibi_slopes(num_heads))
    elif rule == "geometric":
        s = 2.0 ** (-8.0 * np.arange(1, num_heads + 1) / num_heads)
    else:
        raise ValueError(f"rule must be one of {SLOPE_RULES}, got {rule!r}")
    return jnp.asarray(s, jnp.float32)


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
    segment_ids=None,
):
    """Lightning attention over a sequence.

    Args:
      q, k: ``[batch, seq, heads, dk]``; v: ``[batch, seq, heads, dv]``.
      slopes: ``[heads]`` decay rates s_h >= 0 (e.g. ``lightning_slopes(heads)``).
      initial_state, return_final_state, impl, chunk_size: as in ``gla``.
      segment_ids: None or int ``[batch, seq]`` (packed documents), as in ``gla``: the state restarts at each
        segment start (the per-head decay there becomes 0); initial_state applies to the first segment only.

    Returns:
      o ``[batch, seq, heads, dv]`` (v's dtype), or ``(o, final_state [batch, heads, dk, dv] float32)``.
    """
    if q.ndim != 4:
        raise ValueError(f"q must be [batch, seq, heads, dk], got {q.shape=}")
    log_g = _log_gate(slopes, q.shape[2], q.shape[:2])
    seg = {} if segment_ids is None else {"segment_ids": segment_ids}  # None: the call without segments
    return gla(
        q, k, v, log_g,
        initial_state=initial_state, return_final_state=return_final_state, impl=impl, chunk_size=chunk_size,
        **seg,
    )


def lightning_step(q, k, v, slopes, state):
    """One decoding step. q, k ``[batch, heads, dk]``, v ``[batch, heads, dv]``, slopes ``[heads]``,
    state ``[batch, heads, dk, dv]``. Returns (o ``[batch, heads, dv]``, new state float32)."""
    if q.ndim != 3:
        raise ValueError(f"q must be [batch, heads, dk], got {q.shape=}")
    log_g = _log_gate(slopes, q.shape[1], q.shape[:1])
    return gla_step(q, k, v, log_g, state)


__all__ = ["SLOPE_RULES", "lightning_attention", "lightning_slopes", "lightning_step"]
