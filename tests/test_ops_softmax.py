"""Softmax op: windows and sinks against explicit masks, chunking, GQA, padding, lse."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lizard_jax.numerics import FORMS_RTOL, assert_close
from lizard_jax.ops.softmax import attention, visible


def naive(q, k, v, mask, scale, sinks=None):
    """float64 numpy attention with an explicit boolean mask [T, S] (shared over batch/heads)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    h, kvh = q.shape[2], k.shape[2]
    k = np.repeat(k, h // kvh, axis=2)
    v = np.repeat(v, h // kvh, axis=2)
    s = np.einsum("bthd,bshd->bhts", q, k) * scale
    s = np.where(mask[None, None], s, -np.inf)
    m = np.max(s, axis=-1, keepdims=True)
    if sinks is not None:
        m = np.maximum(m, np.asarray(sinks, np.float64).max(-1)[None, :, None, None])
    m = np.where(np.isfinite(m), m, 0)
    p = np.exp(s - m)
    den = p.sum(-1, keepdims=True)
    if sinks is not None:
        den = den + np.exp(np.asarray(sinks, np.float64)[None, :, None, :] - m).sum(-1, keepdims=True)
    o = np.einsum("bhts,bshd->bthd", p / np.where(den > 0, den, 1), v)
    return o


def explicit_mask(t, s, window):
    i = np.arange(t)[:, None] + (s - t)
    j = np.arange(s)[None, :]
    m = j <= i
    if window is not None:
        m &= j > i - window
    return m


@pytest.mark.parametrize("t,s,h,kvh,window,chunk", [
    (37, 37, 4, 2, None, 1024), (37, 37, 4, 1, 5, 8), (16, 50, 6, 3, 1, 7), (70, 70, 3, 3, 64, 16),
], ids=["causal", "window5-chunked", "offset-window1", "window64"])
def test_matches_explicit_mask(t, s, h, kvh, window, chunk):
    ks = jax.random.split(jax.random.key(t * s), 3)
    q = jax.random.normal(ks[0], (2, t, h, 8))
    k = jax.random.normal(ks[1], (2, s, kvh, 8))
    v = jax.random.normal(ks[2], (2, s, kvh, 8))
    o, lse = attention(q, k, v, window=window, return_lse=True, chunk_size=chunk, impl="xla")
    assert_close(o, naive(q, k, v, explicit_mask(t, s, window), 8**-0.5))
    assert lse.shape == (2, h, t) and np.all(np.isfinite(lse))


def test_window_definition():
    ok = visible(jnp.arange(6), jnp.arange(6), causal=True, window=3)
    assert np.asarray(ok[5]).tolist() == [False, False, False, True, True, True]
    assert np.asarray(visible(jnp.asarray([2]), jnp.asarray([-1, 0, 2, 3]), causal=True, window=None)[0]).tolist() \
        == [False, True, True, False]


def test_sinks_add_to_denominator_only():
    ks = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(ks[0], (1, 20, 2, 8))
    k = jax.random.normal(ks[1], (1, 20, 2, 8))
    v = jax.random.normal(ks[2], (1, 20, 2, 8))
    sinks = jax.random.normal(ks[3], (2, 4))
    o, lse = attention(q, k, v, window=4, sinks=sinks, return_lse=True, impl="xla")
    assert_close(o, naive(q, k, v, explicit_mask(20, 20, 4), 8**-0.5, sinks))
    o0, lse0 = attention(q, k, v, window=4, return_lse=True, impl="xla")
    assert np.all(np.asarray(lse) > np.asarray(lse0))
    assert np.all(np.abs(np.asarray(o)) <= np.abs(np.asarray(o0)).max() + 1e-6)


def test_padding_rows_are_zero_and_keys_invisible():
    q = jax.random.normal(jax.random.key(0), (1, 4, 2, 8))
    k = jax.random.normal(jax.random.key(1), (1, 4, 2, 8))
    v = jax.random.normal(jax.random.key(2), (1, 4, 2, 8))
    pos = jnp.asarray([[-1, -1, 0, 1]])
    o, lse = attention(q, k, v, q_positions=pos, k_positions=pos, return_lse=True)
    assert np.all(np.asarray(o[0, :2]) == 0) and np.all(np.isneginf(np.asarray(lse[0, :, :2])))
    ref = attention(q[:, 2:], k[:, 2:], v[:, 2:])
    assert_close(o[:, 2:], ref, rtol=FORMS_RTOL)


def test_grads_chunked_equal_dense():
    ks = jax.random.split(jax.random.key(3), 3)
    q = jax.random.normal(ks[0], (1, 33, 4, 8))
    k = jax.random.normal(ks[1], (1, 33, 2, 8))
    v = jax.random.normal(ks[2], (1, 33, 2, 8))
    f = lambda c: lambda q, k, v: jnp.sum(jnp.sin(attention(q, k, v, window=6, chunk_size=c, impl="xla")))
    g1 = jax.grad(f(8), argnums=(0, 1, 2))(q, k, v)
    g2 = jax.grad(f(1024), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g1, g2):
        assert_close(a, b, rtol=FORMS_RTOL)


def test_bad_inputs():
    q = jnp.zeros((1, 4, 3, 8))
    with pytest.raises(ValueError, match="not a multiple"):
        attention(q, jnp.zeros((1, 4, 2, 8)), jnp.zeros((1, 4, 2, 8)))
    with pytest.raises(ValueError, match="head_dim"):
        attention(q, jnp.zeros((1, 4, 3, 4)), jnp.zeros((1, 4, 3, 4)))
    with pytest.raises(ValueError, match="unknown impl"):
        attention(q, q, q, impl="flash")
    with pytest.raises(ValueError, match="cudnn"):
        attention(q, q, q, impl="cudnn")
    with pytest.raises(ValueError, match="floating"):
        attention(q.astype(jnp.int32), q, q)
    with pytest.raises(ValueError, match="window"):
        attention(q, q, q, window=0)
