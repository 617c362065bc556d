"""LazyLLM on a tiny random teacher: schedule errors, keep 1.0 == plain generation, the gather path == the masked
spec, nested kept sets, the at-most-once counter, revived KV == recomputation from the Aux Cache, batch sharding;
decoding in both modes ("attend_all", "paper"); the module docstring's example runs."""

import dataclasses
import doctest

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from lizard_jax.config import ConfigError, ModelConfig
from lizard_jax.generate import SamplingConfig, _generate, left_pad
from lizard_jax.layers.common import KVCache
from lizard_jax.layers.softmax import SoftmaxSpec
import lizard_jax.lazy
from lizard_jax.lazy import LazyConfig, generate_lazy, lazy_logprobs, lazy_prefill, prefill_reference
from lizard_jax.lazy.prune import _step, _step_paper, stack_layers
from lizard_jax.models import Transformer, init_params
from lizard_jax.numerics import FORMS_RTOL, assert_close
from lizard_jax.sharding import make_mesh

GREEDY = SamplingConfig()
STEP = jax.jit(_step, static_argnums=(0, 3))  # one decode step: (model, params, stacked, lazy, tok, pos, state)


def tiny(layers=4, dtype="float32", window=None, kv=2):
    cfg = ModelConfig(vocab_size=97, d_model=32, num_layers=layers, num_heads=4, num_kv_heads=kv, head_dim=8,
                      ffn_dim=64, eos_token_ids=(1,), dtype=dtype, attention=SoftmaxSpec(window=window))
    return Transformer(cfg), init_params(cfg, jax.random.key(layers + kv))


def prompts(lengths, seed=0, bucket=16):
    rng = np.random.default_rng(seed)
    return left_pad([list(rng.integers(2, 97, n)) for n in lengths], 0, bucket=bucket)


# ----------------------------------------------------------------------------------------------------------
# schedule validation


@pytest.mark.parametrize("kw,msg", [
    (dict(layers=(1,), keep=(0.0,)), r"keep fractions must be in \(0, 1\]"),
    (dict(layers=(1,), keep=(1.5,)), r"keep fractions must be in \(0, 1\]"),
    (dict(layers=(3, 1), keep=(0.5, 0.4)), "strictly increasing"),
    (dict(layers=(1, 1), keep=(0.5, 0.4)), "strictly increasing"),
    (dict(layers=(-1,), keep=(0.5,)), ">= 0"),
    (dict(layers=(1, 2), keep=(0.5,)), "has 1 entries for 2 pruning layers"),
    (dict(layers=(1, 2), keep=(0.3, 0.5)), "non-increasing"),
    (dict(layers=(1,), keep=(0.5,), top_k=(8,)), "not both"),
    (dict(layers=(1,), keep=(), top_k=(0,)), "integers >= 1"),
    (dict(layers=(1,), keep=(0.5,), bucket=0), "bucket must be >= 1"),
    (dict(layers=(1,), keep=(0.5,), revive_buckets=(8, 4)), "revive_buckets"),
    (dict(layers=(1,), keep=(0.5,), decode="lazy"), r"decode must be one of \('attend_all', 'paper'\), got 'lazy'"),
], ids=["zero", "above-one", "unsorted", "repeated", "negative", "lengths", "growing", "both", "topk-zero",
        "bucket", "revive-buckets", "decode-mode"])
def test_bad_schedule_errors(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        LazyConfig(**kw)


@pytest.mark.parametrize("layers", [(2, 3), (4,)], ids=["last-layer", "beyond"])
def test_layer_out_of_range(layers):
    lazy = LazyConfig(layers=layers, keep=(0.5,) * len(layers))
    with pytest.raises(ConfigError, match="out of range"):
        lazy.check(4)
    model = Transformer(ModelConfig(vocab_size=16, d_model=8, num_layers=4, num_heads=1, num_kv_heads=1,
                                    head_dim=8, ffn_dim=8))
    toks, pos = prompts([20])
    with pytest.raises(ConfigError, match="out of range"):
        jax.eval_shape(lambda: lazy_prefill(model, {}, toks, pos, lazy=lazy))


def test_module_docstring_example_runs():
    res = doctest.testmod(lizard_jax.lazy, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert res.attempted >= 10 and res.failed == 0, res


def test_budgets_bucketed_and_nested():
    lazy = LazyConfig(layers=(0, 2), keep=(0.5, 0.3), bucket=64)
    assert lazy.budgets(1024) == (512, 320)
    assert lazy.budgets(192) == (128, 64)  # rounded up to the bucket
    assert LazyConfig(layers=(0, 2), keep=(), top_k=(100, 10)).budgets(64) == (64, 10)
    assert lazy.stages(4) == ((0, 0), (1, 2), (3, 3))
    assert lazy.computed_fraction(1024, 4) == pytest.approx((1024 + 2 * 512 + 320) / 4096)


# ----------------------------------------------------------------------------------------------------------
# exactness


@pytest.mark.parametrize("decode", ["attend_all", "paper"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"], ids=["B2-ragged-fp32", "B2-ragged-bf16"])
def test_keep_one_is_plain_generation(dtype, decode):
    model, params = tiny(layers=3, dtype=dtype)
    toks, pos = prompts([45, 20])
    lazy = LazyConfig(layers=(0, 1), keep=(1.0, 1.0), decode=decode)
    new = 12
    ref = _generate(model, params, toks, pos, jax.random.key(1), max_new_tokens=new, sampling=GREEDY, eos_ids=(),
                    cache_len=toks.shape[1] + new)
    out = generate_lazy(model, params, toks, pos, jax.random.key(1), lazy=lazy, max_new_tokens=new, sampling=GREEDY,
                        eos_ids=())
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
    if dtype == "float32":  # teacher-forced: the plain model's log-probs of the same continuation
        lp, state = lazy_logprobs(model, params, toks, pos, out, lazy=lazy)
        full = jnp.concatenate([toks, out], axis=1)
        fpos = jnp.concatenate([pos, jnp.max(pos, axis=1, keepdims=True) + 1 + jnp.arange(new)], axis=1)
        logits = model.apply({"params": params}, full, fpos)[:, toks.shape[1] - 1:-1]
        want = jnp.take_along_axis(jax.nn.log_softmax(logits), out[..., None], axis=-1)[..., 0]
        assert_close(lp, want, dtype="float32", name="log-probs")
        assert float(state.computed_fraction()) == 1.0


CASES = {
    "B2-ragged-L4-gqa-keep": (dict(layers=4), [61, 30], dict(layers=(0, 2), keep=(0.5, 0.25), bucket=8)),
    "B1-L4-mqa-topk": (dict(layers=4, kv=1), [50], dict(layers=(1,), keep=(), top_k=(9,))),
    "B2-L3-window8": (dict(layers=3, window=8), [40, 33], dict(layers=(0, 1), keep=(0.6, 0.3), bucket=4)),
    "B2-ragged-L3-sink-recent": (dict(layers=3), [52, 29], dict(layers=(1,), keep=(0.3,), bucket=4, sink_tokens=3,
                                                                 recent_tokens=5, pool=3)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_prefill_matches_masked_spec(name):
    mkw, lengths, lkw = CASES[name]
    model, params = tiny(**mkw)
    toks, pos = prompts(lengths, seed=1)
    lazy = LazyConfig(**lkw)
    ref = prefill_reference(model, params, toks, pos, lazy)
    logits, st = lazy_prefill(model, params, toks, pos, lazy=lazy)
    p = toks.shape[1]
    assert_close(logits, ref["logits"], rtol=FORMS_RTOL, name="last logits")
    counts = np.asarray(st.counts[:, :, :p])
    active = np.asarray(ref["active"])
    np.testing.assert_array_equal(counts, active.astype(np.int32))
    # nested with depth, the last token everywhere, and the schedule's budgets
    assert (np.diff(counts, axis=0) <= 0).all()
    assert (counts[:, :, -1] == 1).all()
    real = np.asarray(pos) >= 0
    for layer, budget in zip(lazy.layers, lazy.budgets(p)):
        np.testing.assert_array_equal(counts[layer + 1].sum(-1), np.minimum(budget, real.sum(-1)))
        rel = np.asarray(pos)  # the forced tokens: first sink_tokens positions and recent_tokens before the last
        forced = real & ((rel < lazy.sink_tokens) | (rel >= rel[:, -1:] - lazy.recent_tokens))
        assert (counts[layer + 1][forced] == 1).all()
    for i in range(model.cfg.num_layers):
        m = active[i][..., None, None]
        assert_close(np.where(m, st.kv(i)[0][:, :p], 0), ref["k"][i], rtol=FORMS_RTOL, name=f"k{i}")
        assert_close(np.where(m, st.kv(i)[1][:, :p], 0), ref["v"][i], rtol=FORMS_RTOL, name=f"v{i}")
    pruned = (np.asarray(st.depth[:, :p]) < model.cfg.num_layers) & real
    assert pruned.any()
    assert_close(np.where(pruned[..., None], st.aux, 0), np.where(pruned[..., None], ref["hidden"], 0),
                 rtol=FORMS_RTOL, name="aux cache")


# ----------------------------------------------------------------------------------------------------------
# decoding: revival, the counter, the Aux Cache


LAZY = LazyConfig(layers=(0, 2), keep=(0.4, 0.2), bucket=4, revive_buckets=(2, 8))
NEW = 16


_RUNS = {}


def _lazy_run(decode):
    """A lazy greedy generation (B4, ragged) shared by the decoding tests, once per decode mode per module."""
    if decode not in _RUNS:
        lazy = dataclasses.replace(LAZY, decode=decode)
        model, params = tiny(layers=4)
        toks, pos = prompts([70, 41, 12, 66], seed=2)
        out = generate_lazy(model, params, toks, pos, jax.random.key(0), lazy=lazy, max_new_tokens=NEW,
                            sampling=GREEDY, eos_ids=())
        _, st0 = lazy_prefill(model, params, toks, pos, lazy=lazy, cache_len=toks.shape[1] + NEW)
        _RUNS[decode] = model, params, toks, pos, out, st0, lazy
    return _RUNS[decode]


@pytest.fixture(scope="module", params=["attend_all", "paper"])
def run(request):
    """The decoding tests whose property depends on the decode mode (what a step attends to, revives, counts):
    each mode."""
    return _lazy_run(request.param)


@pytest.fixture(scope="module")
def run_default():
    """Tests of the generation loop around the step (greedy == the steps one at a time, batch sharding), which
    is the same code for both modes (`_step` only dispatches): the default mode only."""
    return _lazy_run(LazyConfig.decode)


def test_counter_at_most_once_per_layer(run):
    """Over the prefill and every decoding step (teacher-forced on the generated tokens)."""
    model, params, toks, pos, out, st0, lazy = run
    _, st = lazy_logprobs(model, params, toks, pos, out, lazy=lazy)
    counts, counts0 = np.asarray(st.counts), np.asarray(st0.counts)
    p = toks.shape[1]
    real = np.asarray(pos) >= 0
    assert counts.max() == 1, "a token was computed twice at one layer"
    assert (counts[:, :, :p][:, ~real] == 0).all(), "padding was counted"
    assert counts[:, :, :p].sum() > counts0[:, :, :p].sum(), "decoding revived nothing: the Aux Cache is untested"
    assert (counts[:, :, p:] == 1).all(), "every generated token runs every layer"
    assert (counts >= counts0).all()
    assert float(st.computed_fraction()) > float(st0.computed_fraction())


def test_logprobs_follow_decode_mode():
    """`lazy_logprobs` decodes in `lazy.decode`'s mode: "paper" equals `_step_paper` taken one step at a time and
    differs from "attend_all" on the same targets once a step has left tokens out (the prefill's first log-prob is
    shared). Keep-all "paper" log-probs == the plain model's: `test_keep_one_is_plain_generation`."""
    model, params, toks, pos, out, st, lazy = _lazy_run("paper")
    lp, _ = lazy_logprobs(model, params, toks, pos, out, lazy=lazy)
    lp_all, _ = lazy_logprobs(model, params, toks, pos, out, lazy=dataclasses.replace(lazy, decode="attend_all"))
    step = jax.jit(_step_paper, static_argnums=(0, 3))
    logits = lazy_prefill(model, params, toks, pos, lazy=lazy, cache_len=toks.shape[1] + NEW)[0]
    stacked, last, want = stack_layers(model, params, lazy), jnp.max(pos, axis=1), []
    for s in range(NEW):
        want.append(jnp.take_along_axis(jax.nn.log_softmax(logits), out[:, s:s + 1], axis=1)[:, 0])
        lg, st = step(model, params, stacked, lazy, out[:, s:s + 1], (last + 1 + s)[:, None], st)
        logits = lg[:, -1]
    assert_close(lp, jnp.stack(want, axis=1), rtol=FORMS_RTOL, name="paper log-probs")
    np.testing.assert_array_equal(np.asarray(lp[:, 0]), np.asarray(lp_all[:, 0]))
    assert np.abs(np.asarray(lp) - np.asarray(lp_all)).max() > 1e-3, "decode='paper' was ignored"


def test_generation_is_teacher_forcing(run_default):
    """Greedy generation picks each step's argmax of the same decode steps, taken one at a time here."""
    model, params, toks, pos, out, st, lazy = run_default
    logits = lazy_prefill(model, params, toks, pos, lazy=lazy, cache_len=toks.shape[1] + NEW)[0]
    last = jnp.max(pos, axis=1)
    for s in range(NEW):
        np.testing.assert_array_equal(np.asarray(jnp.argmax(logits, -1)), np.asarray(out[:, s]))
        lg, st = STEP(model, params, stack_layers(model, params, lazy), lazy, out[:, s:s + 1], (last + 1 + s)[:, None], st)
        logits = lg[:, -1]


def test_revived_kv_is_recomputation_from_aux(run):
    """A token dropped at step t (no KV in a stage: not among that stage's keys) and revived at step t + 1 >= 2 has,
    at every layer it resumed, the KV of running the layer from its Aux Cache state over that step's keys of the
    layer (its stage's `active` prompt tokens and the generated ones; "paper": fewer than all with KV there)."""
    model, params, toks, pos, out, st0, lazy = run
    cfg = model.cfg
    p = toks.shape[1]
    stacked = stack_layers(model, params, lazy)
    stage_of = {i: j for j, (a, e) in enumerate(lazy.stages(cfg.num_layers)) for i in range(a, e + 1)}
    last = jnp.max(pos, 1)[:, None]
    st, narrowed = st0, False
    for step in range(NEW - 1):
        _, nxt = STEP(model, params, stacked, lazy, out[:, step:step + 1], last + 1 + step, st)
        d0, d1 = np.asarray(st.depth), np.asarray(nxt.depth)
        revived = np.argwhere(d1[:, :p] > d0[:, :p])
        if step >= 1 and len(revived):
            break
        st = nxt
    else:
        pytest.fail("no decoding step after the first revived a token")
    st1 = nxt
    s = st1.depth.shape[1]
    pad = lambda a: jnp.concatenate([a, jnp.zeros_like(a[:, :1])], axis=1)
    for b, t in revived:
        h = st.aux[b:b + 1, t:t + 1]
        tpos = st1.slot_pos[b:b + 1, t:t + 1]
        for i in range(d0[b, t], d1[b, t]):
            stage = stage_of[i]
            assert not bool(st.active[stage, b, t]), "a token without KV in a stage was one of its keys"
            assert bool(st1.active[stage, b, t])
            keys = np.concatenate([np.asarray(st1.active[stage, b]), np.ones(s - p, bool)])
            kpos = jnp.where(keys, st1.kv(i)[2][b], -1)
            narrowed |= bool(jnp.any((kpos < 0) & (st1.kv(i)[2][b] >= 0)))
            # the step's keys of the layer without token t, plus a free slot: the plain layer appends t
            cache = KVCache(k=pad(st1.kv(i)[0][b:b + 1]), v=pad(st1.kv(i)[1][b:b + 1]),
                            pos=jnp.concatenate([kpos[None].at[:, t].set(-1), -jnp.ones((1, 1), jnp.int32)], axis=1),
                            index=jnp.int32(s))
            h, cache = model.apply({"params": params}, h, tpos, cache, method=lambda m, *a, i=i: m.layers[i](*a))
            assert_close(st1.kv(i)[0][b, t], cache.k[0, s], rtol=FORMS_RTOL, name=f"revived k layer {i}")
            assert_close(st1.kv(i)[1][b, t], cache.v[0, s], rtol=FORMS_RTOL, name=f"revived v layer {i}")
            assert int(st1.kv(i)[2][b, t]) == int(tpos[0, 0])
        if d1[b, t] < cfg.num_layers:
            assert_close(st1.aux[b, t], h[0, 0], rtol=FORMS_RTOL, name="aux after revival")
    # tokens that were not revived keep their Aux Cache entry
    same = (d1[:, :p] == d0[:, :p])[..., None]
    np.testing.assert_array_equal(np.where(same, st1.aux, 0), np.where(same, st.aux, 0))
    assert narrowed == (lazy.decode == "paper"), "paper mode must leave out some tokens with KV; attend_all none"


def test_paper_decode_keys_are_budgets_and_nested(run):
    """"paper": each stage after a pruning layer attends to exactly min(budget, candidates) prompt tokens, nested
    with depth; "attend_all": to every prompt token with KV there."""
    model, params, toks, pos, out, st0, lazy = run
    p = toks.shape[1]
    _, st = STEP(model, params, stack_layers(model, params, lazy), lazy, out[:, :1], jnp.max(pos, 1)[:, None] + 1,
                 st0)
    active = np.asarray(st.active)
    real = (np.asarray(pos) >= 0).sum(-1)
    np.testing.assert_array_equal(active[0].sum(-1), real)
    stages = lazy.stages(model.cfg.num_layers)
    for j, budget in enumerate(lazy.budgets(p)):
        has_kv = np.asarray(st.kv(stages[j + 1][0])[2][:, :p]) >= 0
        if lazy.decode == "paper":
            np.testing.assert_array_equal(active[j + 1].sum(-1), np.minimum(budget, real))
            assert (active[j + 1] <= active[j]).all(), "kept sets are not nested"
            assert (active[j + 1] <= has_kv).all()
        else:
            np.testing.assert_array_equal(active[j + 1], has_kv)


def test_batch_sharded_equals_unsharded(run_default):
    model, params, toks, pos, out, _, lazy = run_default
    mesh = make_mesh({"data": 4}, devices=jax.devices()[:4])
    shard = NamedSharding(mesh, P("data"))
    got = generate_lazy(model, params, jax.device_put(toks, shard), jax.device_put(pos, shard), jax.random.key(0),
                        lazy=lazy, max_new_tokens=NEW, sampling=GREEDY, eos_ids=())
    np.testing.assert_array_equal(np.asarray(got), np.asarray(out))
