"""GLA: float64 loop -> reference scan -> chunked XLA form -> decode step, and Lightning on top."""

from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lizard_jax.numerics import FORMS_RTOL, assert_close
from lizard_jax.ops.gated_linear import gla, gla_reference, gla_step, resolve_impl
from lizard_jax.ops.lightning import lightning_attention, lightning_slopes, lightning_step

# jitted once per shape: eager op-by-op dispatch would dominate the test time
gla_xla = jax.jit(functools.partial(gla, impl="xla"), static_argnames=("return_final_state", "chunk_size"))
reference = jax.jit(gla_reference)

# log-gate ranges: strong, weak, and a log-uniform mix spanning both
DECAYS = {"strong": (-5.0, -1.0), "weak": (-1e-2, -1e-3), "mixed": None}


def make_inputs(seed, batch, seq, heads, dk, dv, gate="dim", decay="mixed", dtype=jnp.float32):
    """q, k, v, log_g, h0 as float32 numpy (then cast q, k, v to dtype); gate "dim" or "head"."""
    rng = np.random.default_rng(seed)
    q, k = (rng.standard_normal((batch, seq, heads, dk)).astype(np.float32) for _ in range(2))
    v = rng.standard_normal((batch, seq, heads, dv)).astype(np.float32)
    shape = (batch, seq, heads, dk if gate == "dim" else 1)
    if DECAYS[decay] is None:
        log_g = -np.exp(rng.uniform(np.log(1e-3), np.log(5.0), shape))
    else:
        log_g = rng.uniform(*DECAYS[decay], shape)
    h0 = rng.standard_normal((batch, heads, dk, dv)).astype(np.float32)
    cast = lambda x: jnp.asarray(x, dtype)  # noqa: E731
    return cast(q), cast(k), cast(v), jnp.asarray(log_g, jnp.float32), jnp.asarray(h0)


def oracle_f64(q, k, v, log_g, h0=None):
    """The recurrence as a plain float64 numpy loop."""
    q, k, v, log_g = (np.asarray(x, np.float64) for x in (q, k, v, log_g))
    batch, seq, heads, dk = q.shape
    h = np.zeros((batch, heads, dk, v.shape[-1])) if h0 is None else np.asarray(h0, np.float64)
    o = np.zeros(v.shape)
    for t in range(seq):
        h = np.exp(log_g[:, t])[..., None] * h + k[:, t, :, :, None] * v[:, t, :, None, :]
        o[:, t] = np.einsum("bhk,bhkv->bhv", q[:, t], h)
    return o, h


def case_id(batch, seq, heads, dk, dv, *rest):
    return "-".join([f"B{batch}-T{seq}-H{heads}-K{dk}-V{dv}", *map(str, rest)])


# ----------------------------------------------------------------------------- reference = the spec


@pytest.mark.parametrize(
    "shape,gate,decay",
    [((2, 37, 3, 8, 5), "dim", "mixed"), ((1, 50, 2, 4, 6), "head", "weak"), ((2, 20, 2, 6, 6), "dim", "strong")],
    ids=lambda x: case_id(*x) if isinstance(x, tuple) else x,
)
def test_reference_matches_float64_loop(shape, gate, decay):
    q, k, v, g, h0 = make_inputs(0, *shape, gate=gate, decay=decay)
    o, ht = reference(q, k, v, g, h0)
    o64, h64 = oracle_f64(q, k, v, g, h0)
    assert o.dtype == jnp.float32 and ht.dtype == jnp.float32
    assert_close(o, o64, dtype="float32", name="o")
    assert_close(ht, h64, dtype="float32", name="final state")


# ----------------------------------------------------------------------------- chunked == reference

CHUNK_CASES = [
    (2, seq, 3, 8, 5, gate, decay, h0)
    for seq, decay in zip((1, 7, 63, 64, 65, 200), ("mixed", "strong", "weak", "mixed", "strong", "weak"))
    for gate, h0 in (("dim", seq % 2 == 0), ("head", seq % 2 == 1))
]


@pytest.mark.parametrize(
    "batch,seq,heads,dk,dv,gate,decay,with_h0",
    CHUNK_CASES,
    ids=[case_id(*c[:-1], "h0" if c[-1] else "zero-h0") for c in CHUNK_CASES],
)
def test_chunk_matches_reference(batch, seq, heads, dk, dv, gate, decay, with_h0):
    q, k, v, g, h0 = make_inputs(seq, batch, seq, heads, dk, dv, gate=gate, decay=decay)
    h0 = h0 if with_h0 else None
    o, ht = gla_xla(q, k, v, g, initial_state=h0, return_final_state=True)
    o_ref, ht_ref = reference(q, k, v, g, h0)
    assert o.shape == v.shape and o.dtype == v.dtype
    assert ht.shape == (batch, heads, dk, dv) and ht.dtype == jnp.float32
    assert_close(o, o_ref, rtol=FORMS_RTOL, name="o")
    assert_close(ht, ht_ref, rtol=FORMS_RTOL, name="final state")


@pytest.mark.parametrize("chunk_size", [1, 16, 20, 32, 128])
def test_chunk_size_does_not_change_the_result(chunk_size):
    # 20 -> sub-chunks of gcd(20, 16) = 4 tokens; 128 -> 8 sub-chunks of 16
    q, k, v, g, h0 = make_inputs(1, 2, 150, 2, 8, 4, gate="dim")
    o, ht = gla_xla(q, k, v, g, initial_state=h0, return_final_state=True, chunk_size=chunk_size)
    o_ref, ht_ref = reference(q, k, v, g, h0)
    assert_close(o, o_ref, rtol=FORMS_RTOL, name="o")
    assert_close(ht, ht_ref, rtol=FORMS_RTOL, name="final state")


def test_return_final_state_false_returns_only_o_and_jit_agrees():
    q, k, v, g, _ = make_inputs(2, 1, 30, 2, 4, 4)
    o = gla(q, k, v, g, impl="xla")
    assert isinstance(o, jax.Array) and o.shape == v.shape
    assert_close(gla_xla(q, k, v, g), o, rtol=FORMS_RTOL)


def test_hard_reset_gate_minus_inf():
    """log_g = -inf (gate exactly 0) wipes the state: exact forward, finite gradients."""
    q, k, v, g, h0 = make_inputs(3, 1, 100, 2, 4, 3, gate="dim")
    g = g.at[:, 40].set(-jnp.inf).at[:, 70, :, :2].set(-jnp.inf)
    o, ht = gla_xla(q, k, v, g, initial_state=h0, return_final_state=True)
    o_ref, ht_ref = reference(q, k, v, g, h0)
    assert_close(o, o_ref, rtol=FORMS_RTOL, name="o")
    assert_close(ht, ht_ref, rtol=FORMS_RTOL, name="final state")
    # after the full reset at t=40 the initial state no longer matters
    o2 = gla_xla(q, k, v, g, initial_state=2 * h0)
    np.testing.assert_array_equal(np.asarray(o2[:, 40:]), np.asarray(o[:, 40:]))
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(gla_xla(*a[:4], initial_state=a[4]) ** 2), argnums=range(5)))(
        q, k, v, g, h0
    )
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in grads)


# ----------------------------------------------------------------------------- state continuity


@pytest.mark.parametrize("gate", ["dim", "head"])
def test_decode_steps_match_full_sequence(gate):
    q, k, v, g, h0 = make_inputs(4, 2, 37, 3, 8, 5, gate=gate)
    o_full, ht_full = gla_xla(q, k, v, g, initial_state=h0, return_final_state=True)
    step = jax.jit(gla_step)
    h, outs = h0, []
    for t in range(q.shape[1]):
        o_t, h = step(q[:, t], k[:, t], v[:, t], g[:, t], h)
        outs.append(o_t)
    assert h.dtype == jnp.float32
    assert_close(jnp.stack(outs, axis=1), o_full, rtol=FORMS_RTOL, name="o")
    assert_close(h, ht_full, rtol=FORMS_RTOL, name="final state")


@pytest.mark.parametrize("split", [1, 50, 64, 99])
def test_prefill_in_two_pieces_matches_one(split):
    q, k, v, g, h0 = make_inputs(5, 2, 100, 2, 8, 6, gate="dim")
    o_all, ht_all = gla_xla(q, k, v, g, initial_state=h0, return_final_state=True)
    first, h_mid = gla_xla(q[:, :split], k[:, :split], v[:, :split], g[:, :split], initial_state=h0,
                           return_final_state=True)
    second, ht = gla_xla(q[:, split:], k[:, split:], v[:, split:], g[:, split:], initial_state=h_mid,
                         return_final_state=True)
    assert_close(jnp.concatenate([first, second], axis=1), o_all, rtol=FORMS_RTOL, name="o")
    assert_close(ht, ht_all, rtol=FORMS_RTOL, name="final state")


# ----------------------------------------------------------------------------- gradients


def _loss(fn, seed, out_shape, state_shape):
    rng = np.random.default_rng(seed)
    w_o = jnp.asarray(rng.standard_normal(out_shape), jnp.float32)
    w_s = jnp.asarray(rng.standard_normal(state_shape), jnp.float32)

    def loss(q, k, v, g, h0):
        o, ht = fn(q, k, v, g, h0)
        return jnp.sum(o * w_o) + jnp.sum(ht * w_s)

    return loss


GRAD_CASES = [(2, 65, 2, 8, 5, "dim", "mixed"), (1, 100, 3, 4, 6, "head", "weak"), (2, 40, 2, 6, 6, "dim", "strong")]


@pytest.mark.parametrize("batch,seq,heads,dk,dv,gate,decay", GRAD_CASES, ids=[case_id(*c) for c in GRAD_CASES])
def test_gradients_chunk_match_reference(batch, seq, heads, dk, dv, gate, decay):
    q, k, v, g, h0 = make_inputs(6, batch, seq, heads, dk, dv, gate=gate, decay=decay)
    args = (q, k, v, g, h0)
    chunk = lambda q, k, v, g, h0: gla_xla(q, k, v, g, initial_state=h0, return_final_state=True)  # noqa: E731
    grads = jax.jit(jax.grad(_loss(chunk, 0, v.shape, h0.shape), argnums=range(5)))(*args)
    grads_ref = jax.jit(jax.grad(_loss(gla_reference, 0, v.shape, h0.shape), argnums=range(5)))(*args)
    for name, got, want in zip(("dq", "dk", "dv", "dlog_g", "dh0"), grads, grads_ref):
        assert got.shape == want.shape
        assert_close(got, want, rtol=FORMS_RTOL, name=name)


# ----------------------------------------------------------------------------- bf16


@pytest.mark.parametrize("gate", ["dim", "head"])
def test_bf16_inputs_within_bf16_tolerance(gate):
    q, k, v, g, h0 = make_inputs(7, 2, 130, 2, 16, 8, gate=gate, dtype=jnp.bfloat16)
    o, ht = gla_xla(q, k, v, g, initial_state=h0, return_final_state=True)
    assert o.dtype == jnp.bfloat16 and ht.dtype == jnp.float32
    # the reference on the same (bf16-rounded) values, computed in float32
    up = lambda x: x.astype(jnp.float32)  # noqa: E731
    o_ref, ht_ref = reference(up(q), up(k), up(v), g, h0)
    assert_close(o, o_ref, dtype="bfloat16", name="o")
    assert_close(ht, ht_ref, dtype="bfloat16", name="final state")


# ----------------------------------------------------------------------------- long, strong decay


def test_long_sequence_strong_decay_is_finite_and_exact():
    """16384 tokens (256 chunks; the chunked form has no length-dependent path, and 65536 cost 4x the time)
    with log-gates mixed over [-5, -1e-3]: no inf/NaN anywhere (outputs, state, all gradients), and a 2K slice
    equals the float64 recurrence started from the chunked state there."""
    batch, seq, heads, dk, dv = 1, 16384, 2, 8, 8
    q, k, v, g, h0 = make_inputs(8, batch, seq, heads, dk, dv, gate="dim", decay="mixed")
    run = jax.jit(lambda *a: gla_xla(*a[:4], initial_state=a[4], return_final_state=True))
    o, ht = run(q, k, v, g, h0)
    assert bool(jnp.all(jnp.isfinite(o))) and bool(jnp.all(jnp.isfinite(ht)))

    start, stop = 8000, 10048  # multiples of the chunk (64), not of 128, as 40000 and 42048 were
    _, h_start = run(q[:, :start], k[:, :start], v[:, :start], g[:, :start], h0)
    o64, h64 = oracle_f64(q[:, start:stop], k[:, start:stop], v[:, start:stop], g[:, start:stop], h_start)
    assert_close(o[:, start:stop], o64, dtype="float32", name="o on the slice")
    _, h_stop = run(q[:, :stop], k[:, :stop], v[:, :stop], g[:, :stop], h0)
    assert_close(h_stop, h64, dtype="float32", name="state at the slice end")

    loss = _loss(lambda *a: run(*a), 1, v.shape, h0.shape)
    grads = jax.jit(jax.grad(loss, argnums=range(5)))(q, k, v, g, h0)
    for name, x in zip(("dq", "dk", "dv", "dlog_g", "dh0"), grads):
        assert bool(jnp.all(jnp.isfinite(x))), f"{name} has inf/NaN"


# ----------------------------------------------------------------------------- validation & dispatch


def test_auto_is_xla_on_cpu_and_unknown_impl_fails():
    assert jax.default_backend() == "cpu" and resolve_impl("auto") == "xla"
    q, k, v, g, _ = make_inputs(9, 1, 8, 2, 4, 4)
    with pytest.raises(ValueError, match="unknown impl 'triton'"):
        gla(q, k, v, g, impl="triton")


@pytest.mark.parametrize("gate", ["dim", "head"])
def test_pallas_variant_v2_and_block_sizes_reach_the_kernel(gate):
    """variant and block_sizes pass down to pallas_kernels.chunked_scan (interpret mode on the CPU)."""
    from pallas_kernels.chunked_scan import VARIANTS, BlockSizes

    from lizard_jax.ops.gated_linear import KERNEL_VARIANTS

    assert KERNEL_VARIANTS == VARIANTS
    q, k, v, g, h0 = make_inputs(10, 1, 40, 2, 16, 32, gate=gate)
    small = BlockSizes(chunk=16, block_k=16, block_v=16, block_v_out=16, block_k_bwd=16, block_v_bwd=16,
                       block_v_dv=16, block_k_dv=16, block_k_dqk=16)
    o, ht = jax.jit(lambda *a: gla(*a[:4], initial_state=a[4], return_final_state=True, impl="pallas",
                                   variant="v2", block_sizes=small))(q, k, v, g, h0)
    ro, rht = gla_xla(q, k, v, g, initial_state=h0, return_final_state=True)
    assert_close(o, ro, dtype="float32", name="o")
    assert_close(ht, rht, dtype="float32", name="ht")
    with pytest.raises(ValueError, match="does not divide"):
        gla(q, k, v, g, impl="pallas", variant="v2", block_sizes=BlockSizes(block_k=32))
    with pytest.raises(ValueError, match="variant"):
        gla(q, k, v, g, impl="xla", variant="v3")


def test_pallas_without_kernel_module_raises_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "pallas_kernels.chunked_scan", None)
    q, k, v, g, _ = make_inputs(9, 1, 8, 2, 4, 4)
    with pytest.raises(ImportError, match="impl='pallas' needs the kernel module pallas_kernels.chunked_scan"):
        gla(q, k, v, g, impl="pallas")


def _bad_inputs():
    q, k, v, g, h0 = make_inputs(10, 2, 8, 3, 4, 5)
    return [
        ("q must be", dict(q=q[0])),
        ("q and k must have the same shape", dict(k=k[:, :, :, :3])),
        ("q, k and v must share one dtype", dict(k=k.astype(jnp.bfloat16))),
        ("q, k and v must share one dtype", dict(v=v.astype(jnp.bfloat16))),
        ("differ in batch, seq, heads", dict(v=v[:, :7])),
        ("log_g must be", dict(log_g=g[..., :2])),
        ("log_g must be", dict(log_g=g[:, :, :1])),
        ("initial_state must be", dict(initial_state=h0[..., :4])),
        ("must be a floating array", dict(log_g=g.astype(jnp.int32))),
        ("chunk_size must be a positive int", dict(chunk_size=0)),
    ], dict(q=q, k=k, v=v, log_g=g)


@pytest.mark.parametrize("i", range(10))
def test_bad_arguments_raise_clear_errors(i):
    cases, good = _bad_inputs()
    match, bad = cases[i]
    kwargs = {**good, **bad}
    args = [kwargs.pop(n) for n in ("q", "k", "v", "log_g")]
    with pytest.raises((ValueError, TypeError), match=match):
        gla(*args, impl="xla", **kwargs)


def test_gla_step_validates():
    q, k, v, g, h0 = make_inputs(11, 2, 1, 3, 4, 5)
    q, k, v, g = q[:, 0], k[:, 0], v[:, 0], g[:, 0]
    with pytest.raises(ValueError, match="initial_state must be"):
        gla_step(q, k, v, g, h0[:1])
    with pytest.raises(ValueError, match="log_g must be"):
        gla_step(q, k, v, g[..., :2], h0)
    with pytest.raises(ValueError, match="needs a state"):
        gla_step(q, k, v, g, None)


# ----------------------------------------------------------------------------- Lightning = GLA, one decay per head


def test_lightning_slopes_alibi_form():
    s = np.asarray(lightning_slopes(32))
    np.testing.assert_allclose(s, 2.0 ** (-8.0 * np.arange(1, 33) / 32), rtol=1e-7)
    assert s.shape == (32,) and s.dtype == np.float32
    np.testing.assert_allclose(np.asarray(lightning_slopes(4)), [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8], rtol=1e-7)
    with pytest.raises(ValueError, match="num_heads"):
        lightning_slopes(0)


@pytest.mark.parametrize("seq", [1, 70, 130])
def test_lightning_matches_float64_and_steps(seq):
    batch, heads, dk, dv = 2, 4, 8, 6
    q, k, v, _, h0 = make_inputs(12, batch, seq, heads, dk, dv)
    slopes = lightning_slopes(heads)
    o, ht = lightning_attention(q, k, v, slopes, initial_state=h0, return_final_state=True)
    log_g = np.broadcast_to(-np.asarray(slopes)[None, None, :, None], (batch, seq, heads, dk))
    o64, h64 = oracle_f64(q, k, v, log_g, h0)
    assert_close(o, o64, dtype="float32", name="o")
    assert_close(ht, h64, dtype="float32", name="final state")
    h, outs = h0, []
    step = jax.jit(lightning_step)
    for t in range(min(seq, 20)):
        o_t, h = step(q[:, t], k[:, t], v[:, t], slopes, h)
        outs.append(o_t)
    assert_close(jnp.stack(outs, axis=1), o[:, : len(outs)], rtol=FORMS_RTOL, name="steps")


def test_lightning_validates_slopes():
    q, k, v, _, _ = make_inputs(13, 1, 8, 4, 4, 4)
    with pytest.raises(ValueError, match="slopes must be"):
        lightning_attention(q, k, v, lightning_slopes(3))
    with pytest.raises(ValueError, match="slopes must be"):
        lightning_step(q[:, 0], k[:, 0], v[:, 0], lightning_slopes(3), jnp.zeros((1, 4, 4, 4)))


# ----------------------------------------------------------------------------- packed documents (issue #19)

# two rows of 45 tokens, chunk_size 16: row 0 has ragged documents, one of length 1, a boundary exactly at a
# chunk boundary (16) and mid-chunk ones (5, 17, 33), then 3 tokens of padding (its own segment); row 1 ends
# with a real document (the final state is that document's)
SEG_ROWS = ([5, 11, 1, 16, 9, 3], [16, 1, 20, 8])
SEG_CHUNK = 16


def segment_ids_of(rows):
    return jnp.asarray(np.stack([np.concatenate([np.full(n, i) for i, n in enumerate(lens)]) for lens in rows]),
                       jnp.int32)


def packed_vs_alone(fn, rows, tokens, h0, do, dht, params=(), gates=(), rtol=FORMS_RTOL, final_state=True):
    """``fn(*tokens, h0, *params, segment_ids) -> (o, final state)`` on packed rows equals ``fn`` on each document
    alone (the documents as the rows of one call, zero-padded at the end, ``segment_ids=None``): outputs, the
    final state of each row's last segment, and the gradients of sum(o*do) + sum(ht*dht) wrt every token input
    ``[batch, seq, ...]``, h0 (which feeds the first document of a row only; dht the last) and ``params`` (summed
    over documents either way). ``gates``: indices of token inputs that are log-gates; their gradient at a
    document's first token (after the first) is exactly 0 packed, and left out of the comparison.
    final_state=False: for ops whose gate cannot be zero on the padding of the alone run (Lightning's fixed decay
    keeps decaying the state there), dht is 0 and the final state is not compared."""
    if not final_state:
        dht = jnp.zeros_like(dht)
    seg = segment_ids_of(rows)
    seq = seg.shape[1]
    n_tok = len(tokens)

    @jax.jit
    def run(args, cts, seg):
        out, vjp = jax.vjp(lambda *a: fn(*a, seg), *args)
        return out, vjp(cts)

    (o, ht), grads = run((*tokens, h0, *params), (do, dht), seg)
    docs = [(b, sum(lens[:i]), n) for b, lens in enumerate(rows) for i, n in enumerate(lens)]
    width = max(n for *_, n in docs)

    def alone(x):
        x = np.asarray(x)
        return jnp.asarray(np.stack([np.pad(x[b, s:s + n], [(0, width - n)] + [(0, 0)] * (x.ndim - 2))
                                     for b, s, n in docs]), x.dtype)

    first = np.array([s == 0 for _, s, _ in docs])
    last = np.array([s + n == seq for _, s, n in docs])
    row = np.array([b for b, _, _ in docs])
    h0_a = jnp.where(first[:, None, None, None], h0[row], 0.0)
    dht_a = jnp.where(last[:, None, None, None], dht[row], 0.0)
    (o_a, ht_a), grads_a = run((*map(alone, tokens), h0_a, *params), (alone(do), dht_a), None)

    def packed(x_alone):  # the alone results back at their packed positions
        out = np.zeros((len(rows), seq) + x_alone.shape[2:], np.float32)
        for d, (b, s, n) in enumerate(docs):
            out[b, s:s + n] = np.asarray(x_alone[d, :n], np.float32)
        return out

    # one comparison per quantity: each position's row against its own scale (floored at the global one, so a
    # gradient that is 0 up to rounding, as dphi_q of a one-token document, is not compared noise to noise)
    assert_close(o, packed(o_a), rtol=rtol, name="o, packed vs alone")
    starts = [(b, s) for (b, s, _), f in zip(docs, first) if not f]
    for i in range(n_tok):
        want = packed(grads_a[i])
        if i in gates:  # a start's gate multiplies a discarded state
            got = np.asarray(grads[i])
            for b, s in starts:
                np.testing.assert_array_equal(got[b, s], 0.0, err_msg=f"gate gradient at the start ({b}, {s})")
                want[b, s] = 0.0
        assert_close(grads[i], want, rtol=rtol, name=f"gradient of token input {i}, packed vs alone")
    rows_first = [d for d in range(len(docs)) if first[d]]
    assert_close(grads[n_tok], np.asarray(grads_a[n_tok])[rows_first], rtol=rtol, name="dh0, packed vs alone")
    if final_state:
        assert_close(ht, np.asarray(ht_a)[[d for d in range(len(docs)) if last[d]]], rtol=rtol,
                     name="final state, packed vs alone")
    for i in range(len(params)):
        assert_close(grads[n_tok + 1 + i], grads_a[n_tok + 1 + i], rtol=rtol, name=f"gradient of param {i}")


def _seg_inputs(seed, gate, heads=2, dk=8, dv=6, decay="mixed"):
    seq = sum(SEG_ROWS[0])
    q, k, v, g, h0 = make_inputs(seed, len(SEG_ROWS), seq, heads, dk, dv, gate=gate, decay=decay)
    rng = np.random.default_rng(seed + 100)
    do = jnp.asarray(rng.standard_normal(v.shape), jnp.float32)
    dht = jnp.asarray(rng.standard_normal(h0.shape), jnp.float32)
    return q, k, v, g, h0, do, dht


def _gla_fn(impl, **kw):
    def fn(q, k, v, g, h0, seg):
        return gla(q, k, v, g, initial_state=h0, return_final_state=True, impl=impl, chunk_size=SEG_CHUNK,
                   segment_ids=seg, **kw)
    return fn


SEG_GLA_CASES = [("xla", "dim", "mixed"), ("xla", "head", "strong"), ("pallas", "dim", "mixed"),
                 ("pallas", "head", "weak")]


@pytest.mark.parametrize("impl,gate,decay", SEG_GLA_CASES, ids=["-".join(c) for c in SEG_GLA_CASES])
def test_gla_segments_packed_equals_documents_alone(impl, gate, decay):
    q, k, v, g, h0, do, dht = _seg_inputs(21, gate, decay=decay)
    if impl == "pallas":  # the kernel's tiles: chunk 16 like the XLA form here
        from pallas_kernels.chunked_scan import BlockSizes
        fn = _gla_fn(impl, block_sizes=BlockSizes(chunk=16, block_k=16, block_v=16, block_v_out=16, block_k_bwd=16,
                                                  block_v_bwd=16, block_v_dv=16, block_k_dv=16, block_k_dqk=16))
    else:
        fn = _gla_fn(impl)
    packed_vs_alone(fn, SEG_ROWS, (q, k, v, g), h0, do, dht, gates=(3,))


def test_gla_reference_segments_and_errors():
    """The reference scan with segment ids equals the chunked form with them; bad ids raise."""
    q, k, v, g, h0, *_ = _seg_inputs(22, "dim")
    seg = segment_ids_of(SEG_ROWS)
    o, ht = jax.jit(functools.partial(gla_reference, segment_ids=seg))(q, k, v, g, h0)
    o_c, ht_c = gla_xla(q, k, v, g, initial_state=h0, return_final_state=True, segment_ids=seg)
    assert_close(o_c, o, rtol=FORMS_RTOL, name="o")
    assert_close(ht_c, ht, rtol=FORMS_RTOL, name="final state")
    # the first document sees h0, the others do not
    o2 = gla_xla(q, k, v, g, initial_state=2 * h0, segment_ids=seg)
    np.testing.assert_array_equal(np.asarray(o2[0, 5:]), np.asarray(o_c[0, 5:]))
    assert not np.allclose(np.asarray(o2[0, :5]), np.asarray(o_c[0, :5]))
    for bad in (seg[:, :-1], seg.astype(jnp.float32), seg[0]):
        with pytest.raises(ValueError, match="segment_ids must be"):
            gla(q, k, v, g, impl="xla", segment_ids=bad)


def test_lightning_segments_packed_equals_documents_alone():
    """Lightning packed == documents alone (outputs, dq, dk, dv, dh0, dslopes; its fixed decay would keep decaying
    the alone run's end padding, so the final state is checked as GLA's with the explicit per-head gate, which
    test_gla_segments_packed_equals_documents_alone holds to the documents alone)."""
    q, k, v, _, h0, do, dht = _seg_inputs(23, "head", heads=4)
    slopes = lightning_slopes(4)
    seg = segment_ids_of(SEG_ROWS)

    def fn(q, k, v, h0, slopes, seg, impl):
        return lightning_attention(q, k, v, slopes, initial_state=h0, return_final_state=True, impl=impl,
                                   chunk_size=SEG_CHUNK, segment_ids=seg)

    for impl in ("xla", "pallas"):
        packed_vs_alone(functools.partial(fn, impl=impl), SEG_ROWS, (q, k, v), h0, do, dht, params=(slopes,),
                        final_state=False)
    _, ht = fn(q, k, v, h0, slopes, seg, "xla")
    log_g = jnp.broadcast_to(-slopes[:, None], q.shape[:3] + (1,))
    _, ht_gla = gla_xla(q, k, v, log_g, initial_state=h0, return_final_state=True, chunk_size=SEG_CHUNK,
                        segment_ids=seg)
    assert_close(ht, ht_gla, rtol=FORMS_RTOL, name="final state")
