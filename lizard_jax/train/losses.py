"""Losses of the two distillation stages, and how a packer batch becomes inputs, targets and what is scored."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def split_batch(batch):
    """A packer batch (`train.data.PackedData.next_batch`) -> (tokens, targets, positions, segment_ids, mask),
    each `[batch, seq]` (the window minus one token).

    batch: `[batch, seq + 1]` int tokens (one stream per row: positions, segment_ids and mask None, every target
    scored, as before segment ids existed), or a dict {"tokens", "segment_ids", "positions"} of such arrays
    (packed documents; segment 0 is padding). The mask (float32) then scores a target only when it is in the
    same segment as its input and that segment is not padding: a document's first token is never scored from
    the previous document, and padding never."""
    if not isinstance(batch, dict):
        return batch[:, :-1], batch[:, 1:], None, None, None
    tokens, seg = batch["tokens"], batch["segment_ids"]
    seg_in = seg[:, :-1]
    mask = (seg[:, 1:] == seg_in) & (seg_in != 0)
    return tokens[:, :-1], tokens[:, 1:], batch["positions"][:, :-1], seg_in, mask.astype(jnp.float32)


def attention_transfer(student_out, teacher_out, kind: str = "mse", mask=None):
    """Per-layer distance between a student attention layer's output and the teacher's (both [B, T, D]): the
    mean over every element, or with `mask [B, T]` over the masked-in tokens only."""
    d = student_out.astype(jnp.float32) - teacher_out.astype(jnp.float32)
    e = d * d if kind == "mse" else optax.huber_loss(d, delta=1.0)
    if mask is None:
        return jnp.mean(e)
    return jnp.sum(jnp.mean(e, axis=-1) * mask) / jnp.maximum(jnp.sum(mask), 1)


def next_token_ce(logits, targets, mask=None):
    """Mean cross-entropy of logits [B, T, V] against targets [B, T] (over `mask [B, T]` when given)."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    if mask is None:
        return jnp.mean(ce)
    return jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1)


def distill_kl(student_logits, teacher_logits, temperature: float = 1.0, mask=None):
    """Mean KL(teacher || student) over positions (over `mask [B, T]` when given), at a softmax temperature
    (scaled by T^2 as usual)."""
    t = temperature
    p = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / t, axis=-1)
    q = jax.nn.log_softmax(student_logits.astype(jnp.float32) / t, axis=-1)
    kl = jnp.sum(jnp.exp(p) * (p - q), axis=-1)
    if mask is None:
        return jnp.mean(kl) * t * t
    return jnp.sum(kl * mask) / jnp.maximum(jnp.sum(mask), 1) * t * t
