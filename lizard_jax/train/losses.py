"""Losses of the two distillation stages."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def attention_transfer(student_out, teacher_out, kind: str = "mse"):
    """Per-layer distance between a student attention layer's output and the teacher's (both [B, T, D])."""
    d = student_out.astype(jnp.float32) - teacher_out.astype(jnp.float32)
    if kind == "mse":
        return jnp.mean(d * d)
    return jnp.mean(optax.huber_loss(d, delta=1.0))


def next_token_ce(logits, targets, mask=None):
    """Mean cross-entropy of logits [B, T, V] against targets [B, T]."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    if mask is None:
        return jnp.mean(ce)
    return jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1)


def distill_kl(student_logits, teacher_logits, temperature: float = 1.0):
    """Mean KL(teacher || student) over positions, at a softmax temperature (scaled by T^2 as usual)."""
    t = temperature
    p = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / t, axis=-1)
    q = jax.nn.log_softmax(student_logits.astype(jnp.float32) / t, axis=-1)
    return jnp.mean(jnp.sum(jnp.exp(p) * (p - q), axis=-1)) * t * t
