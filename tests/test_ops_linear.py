"""Linear attention with feature maps: float64 loop -> quadratic spec -> chunked (one gla call) -> step."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lizard_jax.numerics import FORMS_RTOL, assert_close
from lizard_jax.ops.linear import (
    FEATURE_MAPS,
    get_feature_map,
    hedgehog,
    hedgehog_exp,
    linear_attention,
    linear_attention_step,
    t2r,
)

attend = jax.jit(
    functools.partial(linear_attention, return_final_state=True, impl="xla"), static_argnames=("form", "chunk_size")
)
step = jax.jit(linear_attention_step)


def make_qkv(seed, batch, seq, heads, d, dv, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q, k = (jnp.asarray(rng.standard_normal((batch, seq, heads, d)), dtype) for _ in range(2))
    v = jnp.asarray(rng.standard_normal((batch, seq, heads, dv)), dtype)
    return q, k, v, rng


def map_params(name, rng, heads, d, f):
    """Explicit params for each registered map (small weights keep hedgehog_exp well inside float32)."""
    w = jnp.asarray(rng.standard_normal((heads, d, f)) / np.sqrt(d), jnp.float32)
    b = jnp.asarray(0.1 * rng.standard_normal((heads, f)), jnp.float32)
    return {"t2r": dict(w=w, b=b), "hedgehog": dict(w=w), "hedgehog_exp": dict(w=w)}.get(name, {})


def gate(rng, shape, kind):
    if kind == "none":
        return None
    dims = shape if kind == "dim" else shape[:-1] + (1,)
    return jnp.asarray(-np.exp(rng.uniform(np.log(1e-3), np.log(3.0), dims)), jnp.float32)


def oracle_f64(fq, fk, v, log_g, h0, eps):
    """The recurrence with separate S and z, float64 numpy."""
    fq, fk, v = (np.asarray(x, np.float64) for x in (fq, fk, v))
    batch, seq, heads, f = fq.shape
    g = np.zeros((batch, seq, heads, 1)) if log_g is None else np.asarray(log_g, np.float64)
    h0 = np.zeros((batch, heads, f, v.shape[-1] + 1)) if h0 is None else np.asarray(h0, np.float64)
    s, z = h0[..., :-1], h0[..., -1]
    y = np.zeros(v.shape)
    for t in range(seq):
        a = np.exp(g[:, t])
        s = a[..., None] * s + fk[:, t, :, :, None] * v[:, t, :, None, :]
        z = a * z + fk[:, t]
        y[:, t] = np.einsum("bhf,bhfv->bhv", fq[:, t], s) / (np.einsum("bhf,bhf->bh", fq[:, t], z)[..., None] + eps)
    return y, np.concatenate([s, z[..., None]], axis=-1)


CASES = [(name, g) for name in FEATURE_MAPS for g in ("none", "head", "dim")]


@pytest.mark.parametrize("name,gate_kind", CASES, ids=[f"B2-T70-H2-D8-V5-{n}-gate_{g}" for n, g in CASES])
def test_quadratic_chunk_step_agree(name, gate_kind):
    batch, seq, heads, d, dv, f = 2, 70, 2, 8, 5, 6
    q, k, v, rng = make_qkv(0, batch, seq, heads, d, dv)
    fmap, params = get_feature_map(name), map_params(name, rng, heads, d, f)
    fq, fk = fmap(q, **params), fmap(k, **params)
    log_g = gate(rng, fq.shape, gate_kind)
    f_dim = fq.shape[-1]
    h0 = jnp.asarray(np.abs(rng.standard_normal((batch, heads, f_dim, dv + 1))), jnp.float32)

    y_quad, h_quad = attend(fq, fk, v, log_g=log_g, initial_state=h0, form="quadratic")
    y64, h64 = oracle_f64(fq, fk, v, log_g, h0, 1e-12)
    assert_close(y_quad, y64, dtype="float32", name="quadratic vs float64")
    assert_close(h_quad, h64, dtype="float32", name="quadratic state vs float64")

    y_chunk, h_chunk = attend(fq, fk, v, log_g=log_g, initial_state=h0, form="chunk", chunk_size=32)
    assert y_chunk.shape == v.shape and h_chunk.shape == (batch, heads, f_dim, dv + 1)
    assert_close(y_chunk, y_quad, rtol=FORMS_RTOL, name="chunk vs quadratic")
    assert_close(h_chunk, h_quad, rtol=FORMS_RTOL, name="chunk state vs quadratic")

    h, ys = h0, []
    for t in range(seq):
        y_t, h = step(fq[:, t], fk[:, t], v[:, t], h, log_g=None if log_g is None else log_g[:, t])
        ys.append(y_t)
    assert_close(jnp.stack(ys, axis=1), y_quad, rtol=FORMS_RTOL, name="steps vs quadratic")
    assert_close(h, h_quad, rtol=FORMS_RTOL, name="step state vs quadratic")


@pytest.mark.parametrize("gate_kind", ["none", "head"])
def test_gradients_chunk_match_quadratic(gate_kind):
    batch, seq, heads, d, dv, f = 1, 45, 2, 8, 4, 4
    q, k, v, rng = make_qkv(1, batch, seq, heads, d, dv)
    w = map_params("hedgehog", rng, heads, d, f)["w"]
    log_g = gate(rng, (batch, seq, heads, 2 * f), gate_kind)
    w_y = jnp.asarray(rng.standard_normal(v.shape), jnp.float32)
    w_s = jnp.asarray(rng.standard_normal((batch, heads, 2 * f, dv + 1)), jnp.float32)

    def loss(w, q, k, v, log_g, form):
        y, ht = attend(hedgehog(q, w), hedgehog(k, w), v, log_g=log_g, form=form)
        return jnp.sum(y * w_y) + jnp.sum(ht * w_s)

    argnums = (0, 1, 2, 3) if log_g is None else (0, 1, 2, 3, 4)
    grad = jax.jit(jax.grad(loss, argnums=argnums), static_argnums=5)
    grads = grad(w, q, k, v, log_g, "chunk")
    grads_ref = grad(w, q, k, v, log_g, "quadratic")
    for name, got, want in zip(("dw", "dq", "dk", "dv", "dlog_g"), grads, grads_ref):
        assert_close(got, want, rtol=FORMS_RTOL, name=name)


def test_bf16_within_bf16_tolerance():
    q, k, v, rng = make_qkv(2, 2, 90, 2, 8, 8, dtype=jnp.bfloat16)
    w = map_params("hedgehog", rng, 2, 8, 8)["w"]
    fq, fk = hedgehog(q, w), hedgehog(k, w)  # bf16 x, float32 w -> float32 features
    assert fq.dtype == jnp.float32
    fq, fk = fq.astype(jnp.bfloat16), fk.astype(jnp.bfloat16)
    log_g = gate(rng, fq.shape, "head")
    y, ht = attend(fq, fk, v, log_g=log_g, form="chunk")
    assert y.dtype == jnp.bfloat16 and ht.dtype == jnp.float32
    # the spec on the same bf16-rounded values, in float32
    up = lambda x: x.astype(jnp.float32)  # noqa: E731
    y_ref, ht_ref = attend(up(fq), up(fk), up(v), log_g=log_g, form="quadratic")
    assert_close(y, y_ref, dtype="bfloat16", name="y")
    assert_close(ht, ht_ref, dtype="bfloat16", name="state")


def test_feature_map_shapes_and_formulas():
    q, _, _, rng = make_qkv(3, 2, 5, 3, 4, 4)
    w = jnp.asarray(rng.standard_normal((3, 4, 6)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((3, 6)), jnp.float32)
    xw = np.einsum("bthd,hdf->bthf", np.asarray(q, np.float64), np.asarray(w, np.float64))
    softmax = lambda a: np.exp(a - a.max(-1, keepdims=True)) / np.exp(a - a.max(-1, keepdims=True)).sum(-1, keepdims=True)  # noqa: E731
    assert_close(hedgehog(q, w), np.concatenate([softmax(xw), softmax(-xw)], -1), dtype="float32")
    assert_close(hedgehog_exp(q, w), np.concatenate([np.exp(xw), np.exp(-xw)], -1), dtype="float32")
    assert_close(t2r(q, w, b), np.maximum(xw + np.asarray(b)[None, None], 0), dtype="float32")
    qn = np.asarray(q, np.float64)
    assert_close(FEATURE_MAPS["elu_plus_one"](q), np.where(qn > 0, qn + 1, np.exp(qn)), dtype="float32")
    assert_close(FEATURE_MAPS["relu"](q), np.maximum(qn, 0), dtype="float32")
    assert hedgehog(q, w).shape == (2, 5, 3, 12) and t2r(q, w, b).shape == (2, 5, 3, 6)


def test_prefill_in_two_pieces_then_decode():
    q, k, v, rng = make_qkv(4, 1, 80, 2, 6, 3)
    fq, fk = FEATURE_MAPS["elu_plus_one"](q), FEATURE_MAPS["elu_plus_one"](k)
    log_g = gate(rng, fq.shape, "dim")
    y_all, h_all = attend(fq, fk, v, log_g=log_g, form="chunk")
    y1, h1 = attend(fq[:, :33], fk[:, :33], v[:, :33], log_g=log_g[:, :33], form="chunk")
    y2, h2 = attend(fq[:, 33:79], fk[:, 33:79], v[:, 33:79], log_g=log_g[:, 33:79], initial_state=h1, form="chunk")
    y3, h3 = step(fq[:, 79], fk[:, 79], v[:, 79], h2, log_g=log_g[:, 79])
    assert_close(jnp.concatenate([y1, y2, y3[:, None]], axis=1), y_all, rtol=FORMS_RTOL)
    assert_close(h3, h_all, rtol=FORMS_RTOL)


# ----------------------------------------------------------------------------- errors


def test_unknown_names_raise():
    q, k, v, _ = make_qkv(5, 1, 4, 2, 3, 3)
    with pytest.raises(ValueError, match="unknown feature map 'cosformer'; known: \\['elu_plus_one'"):
        get_feature_map("cosformer")
    with pytest.raises(ValueError, match="unknown form 'recurrent'"):
        linear_attention(q, k, v, form="recurrent")
    with pytest.raises(ValueError, match="unknown impl 'cuda'"):
        linear_attention(q, k, v, impl="cuda")
    with pytest.raises(ValueError, match="applies to form='chunk' only"):
        linear_attention(q, k, v, form="quadratic", impl="pallas")


BAD = [
    ("phi_q and phi_k must have the same shape", lambda q, k, v, g, s: dict(phi_k=k[..., :2])),
    ("v.shape=.* and phi_q.shape=.* differ in batch, seq, heads", lambda q, k, v, g, s: dict(v=v[:, :3])),
    ("log_g must be", lambda q, k, v, g, s: dict(log_g=g[..., :2])),
    ("initial_state must be \\[batch, heads, f, dv \\+ 1\\]", lambda q, k, v, g, s: dict(initial_state=s[..., :-1])),
    ("phi_q must be", lambda q, k, v, g, s: dict(phi_q=q[0])),
    ("eps must be a non-negative number", lambda q, k, v, g, s: dict(eps=-1.0)),
]


@pytest.mark.parametrize("match,bad", BAD, ids=[m.split(" ")[0] + str(i) for i, (m, _) in enumerate(BAD)])
def test_bad_shapes_raise_clear_errors(match, bad):
    q, k, v, rng = make_qkv(6, 2, 5, 2, 4, 3)
    g = gate(rng, q.shape, "dim")
    s = jnp.zeros((2, 2, 4, 4))
    kwargs = dict(phi_q=q, phi_k=k, v=v, log_g=g, initial_state=s)
    kwargs.update(bad(q, k, v, g, s))
    args = [kwargs.pop(n) for n in ("phi_q", "phi_k", "v")]
    with pytest.raises(ValueError, match=match):
        linear_attention(*args, **kwargs)


def test_step_and_feature_maps_validate():
    q, k, v, rng = make_qkv(7, 2, 1, 2, 4, 3)
    with pytest.raises(ValueError, match="state must be \\[batch, heads, f, dv \\+ 1\\]"):
        linear_attention_step(q[:, 0], k[:, 0], v[:, 0], jnp.zeros((2, 2, 4, 3)))
    with pytest.raises(ValueError, match="needs a state"):
        linear_attention_step(q[:, 0], k[:, 0], v[:, 0], None)
    with pytest.raises(ValueError, match="w must be \\[heads, d, f\\]"):
        hedgehog(q, jnp.zeros((3, 4, 5)))
    with pytest.raises(ValueError, match="b must be \\[heads, f\\]"):
        t2r(q, jnp.zeros((2, 4, 5)), jnp.zeros((5,)))
    with pytest.raises(ValueError, match="x must be a float array"):
        hedgehog(q[0], jnp.zeros((2, 4, 5)))


# ----------------------------------------------------------------------------- packed documents (issue #19)

SEG_CASES = [("chunk", "xla", "none"), ("quadratic", "xla", "head"), ("chunk", "pallas", "dim")]
SEG_SLOW = [("chunk", "xla", "dim"), ("quadratic", "xla", "none"), ("chunk", "pallas", "head")]


def _packed_linear(form, impl, gate_kind):
    from test_ops_gla import SEG_CHUNK, SEG_ROWS, packed_vs_alone

    batch, seq, heads, d, dv, f = len(SEG_ROWS), sum(SEG_ROWS[0]), 2, 8, 5, 4
    q, k, v, rng = make_qkv(3, batch, seq, heads, d, dv)
    w = map_params("hedgehog", rng, heads, d, f)["w"]
    # features as the token inputs: the alone run's zero padding must add nothing (hedgehog(0) != 0)
    fq, fk = hedgehog(q, w), hedgehog(k, w)
    log_g = gate(rng, fq.shape, gate_kind)
    h0 = jnp.asarray(np.abs(rng.standard_normal((batch, heads, 2 * f, dv + 1))), jnp.float32)
    do = jnp.asarray(rng.standard_normal(v.shape), jnp.float32)
    dht = jnp.asarray(rng.standard_normal(h0.shape), jnp.float32)
    kw = dict(form=form, impl=impl, chunk_size=SEG_CHUNK, return_final_state=True)
    if log_g is None:
        def fn(fq, fk, v, h0, seg):
            return linear_attention(fq, fk, v, initial_state=h0, segment_ids=seg, **kw)
        tokens, gates = (fq, fk, v), ()
    else:
        def fn(fq, fk, v, log_g, h0, seg):
            return linear_attention(fq, fk, v, log_g=log_g, initial_state=h0, segment_ids=seg, **kw)
        tokens, gates = (fq, fk, v, log_g), (3,)
    packed_vs_alone(fn, SEG_ROWS, tokens, h0, do, dht, gates=gates)


@pytest.mark.parametrize("form,impl,gate_kind", SEG_CASES, ids=["-".join(c) for c in SEG_CASES])
def test_segments_packed_equals_documents_alone(form, impl, gate_kind):
    """State and normaliser restart at each document: outputs, final state, gradients wrt features, v, gates, h0."""
    _packed_linear(form, impl, gate_kind)


@pytest.mark.slow
@pytest.mark.parametrize("form,impl,gate_kind", SEG_SLOW, ids=["-".join(c) for c in SEG_SLOW])
def test_segments_packed_equals_documents_alone_more(form, impl, gate_kind):
    _packed_linear(form, impl, gate_kind)


def test_segments_validated():
    q, k, v, _ = make_qkv(4, 1, 8, 2, 4, 4)
    with pytest.raises(ValueError, match="segment_ids must be"):
        linear_attention(q, k, v, impl="xla", segment_ids=jnp.zeros((1, 7), jnp.int32))
