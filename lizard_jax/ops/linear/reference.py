"""Normalised (optionally gated) linear attention, the spec: the O(T^2) masked form.

    S_t = diag(exp(g_t)) S_{t-1} + phi_k_t^T v_t,    z_t = diag(exp(g_t)) z_{t-1} + phi_k_t
    y_t = (phi_q_t S_t) / (phi_q_t z_t + eps)

State: one float32 array ``[batch, heads, f, dv + 1]``, S in the first dv columns and z in the last,
i.e. the GLA state of ``v`` augmented with a column of ones. One array keeps numerator and denominator
in one scan (and one cache entry); z is ``state[..., -1]``.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from lizard_jax.ops.gated_linear.reference import PRECISION

# LoLCATs' value (its linear attention divides by ``sum + 1e-12``); only guards an all-zero denominator
DEFAULT_EPS = 1e-12


def augment_with_ones(v):
    """float32 ``[..., dv] -> [..., dv + 1]``, last column 1: the GLA value whose state carries z."""
    v = v.astype(jnp.float32)
    return jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), jnp.float32)], axis=-1)


def normalise(o_aug, eps):
    """``[..., dv + 1] -> [..., dv]``: numerator columns over the denominator column (+ eps)."""
    return o_aug[..., :-1] / (o_aug[..., -1:] + eps)


def linear_attention_quadratic(phi_q, phi_k, v, log_g=None, initial_state=None, *, eps=DEFAULT_EPS):
    """The masked quadratic form. phi_q, phi_k ``[batch, seq, heads, f]``, v ``[batch, seq, heads, dv]``,
    log_g None or ``[batch, seq, heads, f | 1]``, initial_state None or ``[batch, heads, f, dv + 1]``.
    Returns (y ``[batch, seq, heads, dv]`` in v's dtype, state ``[batch, heads, f, dv + 1]`` float32).
    Inputs are assumed validated (see ``linear_attention``)."""
    batch, seq, heads, f = phi_q.shape
    to_bhtd = lambda x: jnp.swapaxes(x.astype(jnp.float32), 1, 2)  # noqa: E731
    q, k, v_aug = to_bhtd(phi_q), to_bhtd(phi_k), to_bhtd(augment_with_ones(v))
    g = jnp.zeros((batch, heads, seq, 1), jnp.float32) if log_g is None else to_bhtd(log_g)

    # decay[i, j] = exp(sum_{j < t <= i} g_t) for j <= i, else 0 (a sum of gates, not a difference of cumsums)
    t = np.arange(seq)
    pair = jnp.cumsum(jnp.where((t[:, None] > t[None, :])[:, :, None], g[..., :, None, :], 0.0), axis=-3)
    decay = jnp.where((t[:, None] >= t[None, :])[:, :, None], jnp.exp(pair), 0.0)  # [b, h, i, j, f | 1]
    decay = jnp.broadcast_to(decay, (batch, heads, seq, seq, f))
    scores = jnp.einsum("bhif,bhjf,bhijf->bhij", q, k, decay, precision=PRECISION)
    num = jnp.einsum("bhij,bhje->bhie", scores, v_aug, precision=PRECISION)  # [..., dv + 1]

    h0 = (
        jnp.zeros((batch, heads, f, v_aug.shape[-1]), jnp.float32)
        if initial_state is None
        else initial_state.astype(jnp.float32)
    )
    from_start = jnp.cumsum(g, axis=-2)  # sum_{t <= i} g_t
    num = num + jnp.einsum("bhif,bhfe->bhie", q * jnp.exp(from_start), h0, precision=PRECISION)
    to_end = pair[:, :, -1]  # sum_{j < t <= T-1} g_t
    ht = jnp.exp(from_start[:, :, -1])[..., None] * h0 + jnp.einsum(
        "bhjf,bhje->bhfe", k * jnp.exp(to_end), v_aug, precision=PRECISION
    )
    y = jnp.swapaxes(normalise(num, eps), 1, 2)
    return y.astype(v.dtype), ht


__all__ = ["DEFAULT_EPS", "augment_with_ones", "linear_attention_quadratic", "normalise"]
