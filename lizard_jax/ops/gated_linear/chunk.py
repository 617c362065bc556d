"""GLA in chunked form (the XLA path): parallel inside a chunk, a ``lax.scan`` over chunks.

Same semantics as ``reference.gla_reference``. The sequence is cut into chunks of ``C`` tokens; the state
is carried across chunks in float32 by a ``lax.scan`` and everything inside a chunk is batched matmuls.

Numerics (why it is stable at any length and any decay):
  * Every decay factor is ``exp(x)`` of a sum of log-gates ``x <= 0``, so nothing can overflow. Small
    factors underflow to 0 only where the exact factor is below float32's range anyway.
  * No exponent is a *difference* of two cumulative sums. ``exp(b_i - b_j)`` with ``b = cumsum(g)``
    would lose ``ulp(|b|)`` absolute accuracy (3e-5 at ``|b| = 300``, i.e. a 3e-5 relative error in a
    decay that matters) and overflows when formed for ``j > i``. Instead each exponent is built by
    summing the gates it spans directly: prefix sums inside a sub-chunk, suffix sums inside a
    sub-chunk, whole-sub-chunk totals between them, and for the diagonal blocks the pairwise sum
    ``P[i, j] = sum_{j < t <= i} g_t`` as a cumulative sum of the masked gates.
  * Masked entries are removed with ``where`` *after* an ``exp`` of a finite, non-positive argument, so
    neither the forward nor the backward pass ever sees inf * 0. A gate of exactly 0 (``g = -inf``,
    a hard reset) stays exact in the forward pass.

Per-dimension gates (``g`` last dim dk) make the intra-chunk score a sum over dk of
``q_i k_j exp(P_ij)``, which does not factor into one matmul. Chunks are split into sub-chunks of
``c = gcd(C, 16)`` tokens:
  * diagonal sub-blocks (i, j in the same sub-chunk): the pairwise ``[c, c, dk]`` decay tensor
    (16x the size of q at c = 16, against 64x for a pairwise tensor over a whole 64-token chunk);
  * off-diagonal sub-blocks (j in an earlier sub-chunk than i): factor through the start of i's
    sub-chunk, ``q_i exp(sum of gates from there to i)`` times ``k_j exp(sum of gates from j to
    there)``, both factors <= 1, one matmul per query sub-chunk.
With one decay per head (``g`` last dim 1) the pairwise tensor is ``[C, C, 1]``, so the whole chunk is
one diagonal block (c = C) and the intra-chunk part is a single masked matmul (Lightning / simple GLA).

Ragged lengths are padded at the end to a multiple of C with q = k = v = 0 and g = 0. That is exact:
a padded step multiplies the state by exp(0) = 1 and adds k^T v = 0, so the final state is the state
after the last real token, and causality keeps padded tokens out of every real output.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from jax import lax

from lizard_jax.ops.gated_linear.reference import PRECISION
from lizard_jax.ops.gated_linear.segments import reset_gates

DEFAULT_CHUNK_SIZE = 64
# sub-chunk length for per-dimension gates (the diagonal blocks hold a [c, c, dk] decay tensor)
SUB_CHUNK = 16


def _exclusive_cumsum(x, axis, reverse=False):
    """Sum of the elements strictly before (after, if reverse) each position along ``axis``."""
    axis = axis % x.ndim
    inclusive = lax.cumsum(x, axis=axis, reverse=reverse)
    zero = jnp.zeros_like(lax.slice_in_dim(x, 0, 1, axis=axis))
    n = x.shape[axis]
    if reverse:
        return jnp.concatenate([lax.slice_in_dim(inclusive, 1, n, axis=axis), zero], axis=axis)
    return jnp.concatenate([zero, lax.slice_in_dim(inclusive, 0, n - 1, axis=axis)], axis=axis)


def _intra_chunk_scores(q, k, g):
    """Causal decayed scores inside each chunk.

    q, k ``[..., S, c, dk]`` and g ``[..., S, c, dg]`` (S sub-chunks of c tokens; dg is dk or 1).
    Returns ``A [..., S*c, S*c]`` with ``A[i, j] = sum_d q_id k_jd exp(sum_{j<t<=i} g_td)`` for j <= i,
    else 0.
    """
    n_sub, c, dg = g.shape[-3:]
    # diagonal sub-blocks: P[i, j] = sum_{j < t <= i} g_t, a cumsum over i of the gates masked to t > j
    t_gt_j = np.arange(c)[:, None] > np.arange(c)[None, :]  # [t, j]
    pair = jnp.cumsum(jnp.where(t_gt_j[:, :, None], g[..., :, None, :], 0.0), axis=-3)
    causal = (np.arange(c)[:, None] >= np.arange(c)[None, :])[:, :, None]
    decay = jnp.where(causal, jnp.exp(pair), 0.0)  # [..., S, c(i), c(j), dg]
    if dg == 1:
        diag = jnp.einsum("...id,...jd->...ij", q, k, precision=PRECISION) * decay[..., 0]
    else:
        diag = jnp.einsum("...id,...jd,...ijd->...ij", q, k, decay, precision=PRECISION)
    eye = np.eye(n_sub, dtype=np.float32)[:, None, :, None]  # [a, i, b, j]
    scores = diag[..., :, :, None, :] * eye  # [..., a, i, b, j]
    if n_sub > 1:
        # off-diagonal sub-blocks (b < a), factored through the start of query sub-chunk a
        prefix = jnp.cumsum(g, axis=-2)  # sum_{start_a <= t <= i} g_t
        suffix = _exclusive_cumsum(g, axis=-2, reverse=True)  # sum_{j < t <= end_b} g_t
        total = prefix[..., -1, :]  # [..., S, dg]
        a_idx, b_idx, m_idx = np.meshgrid(*(np.arange(n_sub),) * 3, indexing="ij")
        between = ((b_idx < m_idx) & (m_idx < a_idx))[..., None]  # [a, b, m, 1]
        gap = jnp.sum(jnp.where(between, total[..., None, None, :, :], 0.0), axis=-2)  # [..., a, b, dg]
        later = (np.arange(n_sub)[:, None] > np.arange(n_sub)[None, :])[:, :, None, None]  # [a, b, 1, 1]
        k_decay = jnp.where(later, jnp.exp(suffix[..., None, :, :, :] + gap[..., :, :, None, :]), 0.0)
        k_scaled = k[..., None, :, :, :] * k_decay  # [..., a, b, c, dk]
        q_scaled = q * jnp.exp(prefix)  # [..., a, c, dk]
        scores = scores + jnp.einsum(
            "...aid,...abjd->...aibj", q_scaled, k_scaled, precision=PRECISION
        )
    return scores.reshape(*scores.shape[:-4], n_sub * c, n_sub * c)


def gla_chunk(q, k, v, g, initial_state=None, *, chunk_size: int = DEFAULT_CHUNK_SIZE, segment_ids=None):
    """GLA in chunked form. Same contract and return as ``reference.gla_reference``:
    (o ``[batch, seq, heads, dv]`` in v's dtype, final state ``[batch, heads, dk, dv]`` float32).
    segment_ids: None or int ``[batch, seq]``: -inf gates at segment starts (``segments.py``), exact here since
    every exponent is a sum of gates (no inf - inf) and masks are selects after the exp (no 0 * inf), in the
    backward pass too. Inputs are assumed validated (see ``gla``)."""
    if segment_ids is not None:
        g = reset_gates(g, segment_ids)
    batch, seq, heads, dk = q.shape
    dv, dg = v.shape[-1], g.shape[-1]
    size = chunk_size
    sub = size if dg == 1 else math.gcd(size, SUB_CHUNK)
    n_sub = size // sub
    pad = (-seq) % size
    n_chunks = (seq + pad) // size

    def to_blocks(x):  # [batch, seq, heads, d] -> float32 [batch, heads, n_chunks, n_sub, sub, d]
        x = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, pad), (0, 0), (0, 0)))
        x = x.reshape(batch, n_chunks, n_sub, sub, heads, x.shape[-1])
        return x.transpose(0, 4, 1, 2, 3, 5)

    qb, kb, vb, gb = (to_blocks(x) for x in (q, k, v, g))
    v_chunk = vb.reshape(batch, heads, n_chunks, size, dv)

    # intra-chunk part
    scores = _intra_chunk_scores(qb, kb, gb)  # [batch, heads, n_chunks, size, size]
    o = jnp.einsum("...ij,...jv->...iv", scores, v_chunk, precision=PRECISION)

    # inter-chunk part: decays to/from the chunk boundaries, again only sums of gates
    prefix = jnp.cumsum(gb, axis=-2)  # from sub-chunk start to t (inclusive)
    suffix = _exclusive_cumsum(gb, axis=-2, reverse=True)  # from t (exclusive) to sub-chunk end
    total = prefix[..., -1, :]  # [batch, heads, n_chunks, n_sub, dg]
    from_start = prefix + _exclusive_cumsum(total, axis=-2)[..., None, :]  # chunk start .. t
    to_end = suffix + _exclusive_cumsum(total, axis=-2, reverse=True)[..., None, :]  # t .. chunk end
    q_in = (qb * jnp.exp(from_start)).reshape(batch, heads, n_chunks, size, dk)
    k_out = (kb * jnp.exp(to_end)).reshape(batch, heads, n_chunks, size, dk)
    chunk_states = jnp.einsum("...jk,...jv->...kv", k_out, v_chunk, precision=PRECISION)
    chunk_decay = jnp.exp(jnp.sum(total, axis=-2))  # [batch, heads, n_chunks, dg]

    h0 = (
        jnp.zeros((batch, heads, dk, dv), jnp.float32)
        if initial_state is None
        else initial_state.astype(jnp.float32)
    )

    def body(h, x):  # h: state at the chunk's start
        decay, added = x
        return decay[..., None] * h + added, h

    ht, h_starts = lax.scan(
        body, h0, (jnp.moveaxis(chunk_decay, 2, 0), jnp.moveaxis(chunk_states, 2, 0))
    )
    h_starts = jnp.moveaxis(h_starts, 0, 2)  # [batch, heads, n_chunks, dk, dv]
    o = o + jnp.einsum("...ik,...kv->...iv", q_in, h_starts, precision=PRECISION)

    o = o.reshape(batch, heads, n_chunks * size, dv).transpose(0, 2, 1, 3)[:, :seq]
    return o.astype(v.dtype), ht


__all__ = ["DEFAULT_CHUNK_SIZE", "SUB_CHUNK", "gla_chunk"]
