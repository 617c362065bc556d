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


@pytest.mark.parametrize("t,s,causal,window,padded,segments,sinks,blocks", [
    (37, 37, True, None, False, False, False, (8, 16)),
    (37, 37, True, 7, True, True, True, (5, 3)),
    (16, 50, True, None, True, False, False, (5, 16)),
    (16, 50, False, 7, True, False, False, (8, 16)),
    (64, 64, False, None, False, True, False, (16, 8)),
], ids=["causal", "window-padded-segments-sinks", "offset-padded", "noncausal-window-padded", "noncausal-segments"])
def test_key_blocked_form_equals_dense(t, s, causal, window, padded, segments, sinks, blocks):
    """The key-blocked xla form (online softmax, key blocks skipped from position / segment ranges) == the dense
    spec: outputs and lse against float64, gradients against the dense form, blocks that do not divide the
    lengths, padded queries and keys, GQA, dk != dv."""
    ks = jax.random.split(jax.random.key(t + s), 5)
    b, h, kvh = 2, 6, 2
    q = jax.random.normal(ks[0], (b, t, h, 8))
    k = jax.random.normal(ks[1], (b, s, kvh, 8))
    v = jax.random.normal(ks[2], (b, s, kvh, 5))
    kp = np.tile(np.arange(s), (b, 1))
    qp = kp[:, s - t:].copy()
    if padded:
        kp[0, :5], qp[0, :3] = -1, -1
    kw = dict(q_positions=jnp.asarray(qp), k_positions=jnp.asarray(kp), causal=causal, window=window,
              sinks=jax.random.normal(ks[3], (h, 2)) if sinks else None, impl="xla")
    if segments:
        ids = np.sort(np.asarray(jax.random.randint(ks[4], (b, s), 0, 3)), axis=1)
        kw.update(q_segment_ids=jnp.asarray(ids[:, s - t:]), kv_segment_ids=jnp.asarray(ids))
    dense = dict(blocks=(4096, 4096), chunk_size=4096)  # blocks >= the lengths: the query-chunked form, one chunk
    o, lse = attention(q, k, v, return_lse=True, blocks=blocks, **kw)
    o_ref, lse_ref = attention(q, k, v, return_lse=True, **dense, **kw)
    mask = np.asarray(visible(jnp.asarray(qp), jnp.asarray(kp), causal=causal, window=window,
                              q_seg=kw.get("q_segment_ids"), k_seg=kw.get("kv_segment_ids")))
    for i in range(b):  # the dense form against float64 numpy, one row at a time (the mask differs per row)
        assert_close(o_ref[i:i + 1], naive(q[i:i + 1], k[i:i + 1], v[i:i + 1], mask[i], 8**-0.5, kw["sinks"]))
    assert_close(o, o_ref, rtol=FORMS_RTOL)
    np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(lse_ref))
    assert_close(jnp.where(jnp.isfinite(lse), lse, 0), jnp.where(jnp.isfinite(lse_ref), lse_ref, 0),
                 rtol=FORMS_RTOL, name="lse")
    f = lambda extra: jax.jit(jax.grad(lambda q, k, v: jnp.sum(jnp.sin(attention(q, k, v, **extra, **kw))),
                                       argnums=(0, 1, 2)))
    for name, a, r in zip("qkv", f(dict(blocks=blocks))(q, k, v), f(dense)(q, k, v)):
        assert_close(a, r, rtol=FORMS_RTOL, name=f"d{name}")


def test_key_blocked_form_skips_invisible_blocks():
    """A key block that no query can see (the causal future) is skipped, not masked: it holds NaN values, which
    a block that ran would spread to its rows (0 * NaN = NaN). `blocks` is validated."""
    t = 32
    q = jax.random.normal(jax.random.key(0), (1, t, 2, 8))
    k = jax.random.normal(jax.random.key(1), (1, t, 2, 8))
    v = jnp.ones((1, t, 2, 8)).at[:, 24:].set(jnp.nan)  # the last key block: only the last query block sees it
    o = attention(q[:, :24], k, v, q_positions=jnp.arange(24)[None], k_positions=jnp.arange(t)[None],
                  blocks=(8, 8), impl="xla")
    assert np.all(np.isfinite(np.asarray(o)))  # a NaN block that ran would poison its rows (0 * NaN = NaN)
    with pytest.raises(ValueError, match="blocks must be"):
        attention(q, k, v, blocks=(0, 8))


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


# ------------------------------------------------------------------------------------ packed documents (#19)

DOCS = (5, 1, 11, 3)  # ragged, not multiples of the chunk (8), a document of length 1
PAD = 4  # padding at the end: its own segment, outputs ignored


def packed_segments(lengths, pad):
    """segment ids [1, T] (padding: its own id) and per-document positions [1, T] of a packed row."""
    seg = np.concatenate([np.full(n, i, np.int32) for i, n in enumerate(lengths)] +
                         [np.full(pad, len(lengths), np.int32)])
    pos = np.concatenate([np.arange(n, dtype=np.int32) for n in list(lengths) + [pad]])
    return jnp.asarray(seg)[None], jnp.asarray(pos)[None]


@pytest.mark.parametrize("window,sinks,positions,chunk", [
    (None, False, False, 8), (None, False, True, 1024), (4, True, False, 8), (4, True, True, 8),
    (6, False, False, 1024),
], ids=["causal-chunked", "causal-docpos", "window4-sinks-banded", "window4-sinks-docpos", "window6-dense"])
def test_packed_equals_documents_alone(window, sinks, positions, chunk):
    """A packed row (segment ids) equals each document run alone: outputs, lse, and grads w.r.t. q, k, v,
    sinks. Positions None (global index: same differences within a document; banded path with a window) or the
    per-document positions."""
    t = sum(DOCS) + PAD
    ks = jax.random.split(jax.random.key(19), 5)
    q = jax.random.normal(ks[0], (1, t, 4, 8))
    k = jax.random.normal(ks[1], (1, t, 2, 8))
    v = jax.random.normal(ks[2], (1, t, 2, 8))
    w = jax.random.normal(ks[3], (1, t, 4, 8))  # output cotangent, 0 on the padding
    w = w.at[:, sum(DOCS):].set(0.0)
    snk = jax.random.normal(ks[4], (4, 2)) if sinks else None
    seg, pos = packed_segments(DOCS, PAD)
    kw = dict(window=window, chunk_size=chunk, impl="xla", return_lse=True)

    def packed(q, k, v, snk):
        p = dict(q_positions=pos, k_positions=pos) if positions else {}
        o, lse = attention(q, k, v, sinks=snk, segment_ids=seg, **p, **kw)
        return jnp.sum(o * w), (o, lse)

    def alone(q, k, v, snk):
        outs, lses, at = [], [], 0
        for n in DOCS:
            o, lse = attention(q[:, at:at + n], k[:, at:at + n], v[:, at:at + n], sinks=snk, **kw)
            outs.append(o), lses.append(lse)
            at += n
        o = jnp.concatenate(outs, axis=1)
        return jnp.sum(o * w[:, :at]), (o, jnp.concatenate(lses, axis=2))

    argn = (0, 1, 2, 3) if sinks else (0, 1, 2)
    # jitted: op-by-op dispatch of the chunked form's grads took ~14 s
    (_, (o1, l1)), g1 = jax.jit(jax.value_and_grad(packed, argnums=argn, has_aux=True))(q, k, v, snk)
    (_, (o2, l2)), g2 = jax.jit(jax.value_and_grad(alone, argnums=argn, has_aux=True))(q, k, v, snk)
    n = sum(DOCS)
    assert_close(o1[:, :n], o2, rtol=FORMS_RTOL)
    assert_close(l1[:, :, :n], l2, rtol=FORMS_RTOL, name="lse")
    for name, a, b in zip("qkvs", g1, g2):
        assert_close(a, b, rtol=FORMS_RTOL, name=f"d{name}")  # padding: no gradient in either


def test_segment_ids_none_is_unchanged_and_errors():
    q = jax.random.normal(jax.random.key(0), (1, 12, 2, 8))
    f = lambda q: attention(q, q, q, window=3, chunk_size=4, impl="xla")
    g = lambda q: attention(q, q, q, window=3, chunk_size=4, impl="xla", segment_ids=None)
    assert jax.jit(f).lower(q).as_text() == jax.jit(g).lower(q).as_text()
    one = jnp.zeros((1, 12), jnp.int32)  # one segment == no segment ids
    assert_close(attention(q, q, q, segment_ids=one, impl="xla"), attention(q, q, q, impl="xla"), rtol=0)
    with pytest.raises(ValueError, match="self-attention"):
        attention(q[:, :4], q, q, segment_ids=one)
    with pytest.raises(ValueError, match="go together"):
        attention(q, q, q, q_segment_ids=one)
    with pytest.raises(ValueError, match="cudnn"):
        attention(q.astype(jnp.bfloat16), q.astype(jnp.bfloat16), q.astype(jnp.bfloat16), segment_ids=one,
                  impl="cudnn")
    with pytest.raises(ValueError, match="segment_ids.shape"):
        attention(q, q, q, segment_ids=one[:, :5])
