"""Linear, GLA, sliding-window and Lizard layers: prefill == chunked prefill == decoding, padding, forms,
a float64 oracle with an explicit window mask, causality, teacher weights, constant decode state, errors."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lizard_jax.config import ConfigError, attention_kinds, spec_from_any
from lizard_jax.layers import layer_class
from lizard_jax.layers.common import KVCache
from lizard_jax.layers.gla import GLASpec
from lizard_jax.layers.linear import LinearCache, LinearSpec
from lizard_jax.layers.lizard import LizardCache, LizardSpec
from lizard_jax.layers.sliding_window import SlidingWindowSpec
from lizard_jax.models import Transformer, init_caches, init_params
from lizard_jax.numerics import FORMS_RTOL, assert_close, rel_err
from lizard_jax.recipes import new_param_mask, student_config, student_params
from lizard_jax.testing import randomize, run_chunks, tiny_config

CFG = tiny_config()  # d_model 64, 4 heads, 2 kv heads (GQA), head_dim 16

SPECS = {
    "linear-hedgehog": LinearSpec(chunk_size=8),
    "linear-elu-rope": LinearSpec(feature_map="elu_plus_one", rope=True, chunk_size=8),
    "linear-t2r-f8": LinearSpec(feature_map="t2r", feature_dim=8, chunk_size=8),
    "gla": GLASpec(chunk_size=8, gate_init=0.9),
    "gla-hedgehog-denominator-head": GLASpec(feature_map="hedgehog", feature_dim=8, normalize="denominator",
                                             gate_per="head", output_gate=False, chunk_size=8),
    "swa-w5-m3": SlidingWindowSpec(window=5, meta_tokens=3),
    "swa-w4-m0": SlidingWindowSpec(window=4, meta_tokens=0),
    "lizard-w5-m2": LizardSpec(window=5, meta_tokens=2, gate_init=0.9, chunk_size=8, gate_scale_init=0.7),
    "lizard-exp-f8-w6": LizardSpec(window=6, feature_map="hedgehog_exp", feature_dim=8, chunk_size=8,
                                   gate_scale_init=1.0),
}
# every new (non-teacher) parameter of each family
NEW_PARAMS = {
    "linear-hedgehog": {"feature_q/w", "feature_k/w"},
    "linear-elu-rope": set(),
    "linear-t2r-f8": {"feature_q/w", "feature_q/b", "feature_k/w", "feature_k/b"},
    "gla": {"gate/w1", "gate/w2", "gate/b", "o_norm/scale", "g_proj/kernel"},
    "gla-hedgehog-denominator-head": {"feature_q/w", "feature_k/w", "gate/w1", "gate/w2", "gate/b"},
    "swa-w5-m3": {"meta_logits"},
    "swa-w4-m0": set(),
    "lizard-w5-m2": {"feature_q/w", "feature_k/w", "gate/w", "gate/b", "meta_logits", "alpha", "gate_scale"},
    "lizard-exp-f8-w6": {"feature_q/w", "feature_k/w", "gate/w", "gate/b", "meta_logits", "alpha", "gate_scale"},
}


def path_name(path) -> str:
    return "/".join(str(getattr(p, "key", p)) for p in path)


@functools.lru_cache(maxsize=None)
def fresh_params(spec):
    """The layer's own initial parameters (jit-compiled init, once per spec)."""
    layer = layer_class(spec.kind)(CFG, spec)
    return jax.jit(lambda key: nn.unbox(layer.init(key, jnp.zeros((1, 4, CFG.d_model)))["params"]))(
        jax.random.key(0))


def make_layer(name, seed=0):
    """(layer, randomized params, spec) for SPECS[name]."""
    spec = SPECS[name]
    return layer_class(spec.kind)(CFG, spec), randomize(fresh_params(spec), jax.random.key(seed)), spec


def make_x(seed, batch, seq):
    return jax.random.normal(jax.random.key(seed), (batch, seq, CFG.d_model))


def forward_and_grads(layer):
    """jit: (y, dL/dparams, dL/dx) for L = a fixed smooth readout of y."""
    def loss(p, x):
        y = layer.apply({"params": p}, x)[0]
        return jnp.sum(y * jnp.sin(jnp.arange(y.size, dtype=y.dtype).reshape(y.shape))), y

    def f(p, x):
        (gp, gx), y = jax.grad(loss, argnums=(0, 1), has_aux=True)(p, x)
        return y, gp, gx

    return jax.jit(f)


def assert_trees_close(a, b, name):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)):
        assert_close(x, y, rtol=FORMS_RTOL, name=f"{name} {jax.tree_util.keystr(path)}")


# ----------------------------------------------------------------------------------------------------------
# state continuity, padding

SEQ = {name: (21, 29)[i % 2] for i, name in enumerate(SPECS)}  # ragged lengths across families


@pytest.mark.parametrize("name", list(SPECS))
def test_prefill_chunked_prefill_and_decode_agree(name):
    """Full prefill (no cache) == the same tokens through the cache as 3 single tokens, a chunk of 8, 2 single
    tokens, then chunks of 8 (longer than the window)."""
    seq = SEQ[name]
    layer, params, spec = make_layer(name, seed=seq)
    x = make_x(seq, 2, seq)
    full = jax.jit(lambda x: layer.apply({"params": params}, x)[0])(x)
    got, _ = run_chunks(layer, params, x, [1, 1, 1, 8, 1, 1] + [8] * ((seq - 13) // 8), max_len=64)
    err = rel_err(got, full)
    assert err <= FORMS_RTOL, f"{name}: rel err {err:.2e}"


def test_decoding_far_past_the_ring():
    """A ring of 5 slots over 40 tokens (prefill 9, then 31 single steps) keeps decoding exact."""
    layer, params, spec = make_layer("lizard-w5-m2")
    x = make_x(3, 1, 40)
    full = jax.jit(lambda x: layer.apply({"params": params}, x)[0])(x)
    assert_close(run_chunks(layer, params, x, [9] + [1] * 31, max_len=40)[0], full, rtol=FORMS_RTOL)


@pytest.mark.parametrize("name", ["linear-hedgehog", "linear-elu-rope", "gla", "swa-w5-m3", "lizard-w5-m2"])
def test_left_padding_does_not_change_real_tokens(name):
    """Ragged prompts, left-padded with garbage x at negative positions, equal each prompt run alone, with and
    without a cache; so does decoding after the padded prefill."""
    layer, params, spec = make_layer(name, seed=1)
    lens, total, new = (9, 14, 5), 14, 4
    x = make_x(10, len(lens), total + new)  # row i: prompt x[i, :n], then its decoded tokens x[i, n:n + new]
    garbage = make_x(99, len(lens), total)
    xb = jnp.stack([jnp.concatenate([garbage[i, : total - n], x[i, :n]]) for i, n in enumerate(lens)])
    pb = jnp.asarray(np.stack([np.concatenate([np.full(total - n, -1), np.arange(n)]) for n in lens]), jnp.int32)
    apply = jax.jit(lambda xs, ps, c: layer.apply({"params": params}, xs, ps, c))
    out, _ = apply(xb, pb, None)
    out_c, cache = apply(xb, pb, type(layer).init_cache(CFG, spec, len(lens), 32))
    dec = []
    for s in range(new):
        y, cache = apply(jnp.stack([x[i, n + s] for i, n in enumerate(lens)])[:, None],
                         jnp.asarray([[n + s] for n in lens], jnp.int32), cache)
        dec.append(y)
    dec = jnp.concatenate(dec, axis=1)
    ref, _ = apply(x, None, None)  # each row alone; causality makes its tokens after n + new irrelevant
    for i, n in enumerate(lens):
        assert_close(out[i, total - n:], ref[i, :n], rtol=FORMS_RTOL, name=f"{name} prompt {i}")
        assert_close(out_c[i, total - n:], ref[i, :n], rtol=FORMS_RTOL, name=f"{name} cached prompt {i}")
        assert_close(dec[i], ref[i, n:n + new], rtol=FORMS_RTOL, name=f"{name} decode {i}")


# ----------------------------------------------------------------------------------------------------------
# forms, chunk sizes, bf16


@pytest.mark.parametrize("name", ["linear-hedgehog", "lizard-w5-m2", "lizard-exp-f8-w6"])
def test_quadratic_and_chunk_forms_agree_with_gradients(name):
    """The chunked scan (chunk 8, 29 tokens: a ragged tail) == the O(T^2) masked form (and, for Lizard, the Pallas
    kernel), forward and every gradient."""
    layer, params, spec = make_layer(name, seed=2)
    quad = layer_class(spec.kind)(CFG, dataclasses.replace(spec, form="quadratic"))
    x = make_x(4, 2, 29)
    chunk = forward_and_grads(layer)(params, x)
    assert_trees_close(chunk, forward_and_grads(quad)(params, x), name)
    if name == "lizard-w5-m2":  # the chunked-scan Pallas kernel (interpret mode on CPU) == the XLA chunk form
        pallas = layer_class(spec.kind)(CFG, dataclasses.replace(spec, impl="pallas"))
        assert_trees_close(forward_and_grads(pallas)(params, x), chunk, f"{name} pallas")


def test_bf16_compute_close_to_fp32():
    layer, params, spec = make_layer("lizard-w5-m2", seed=5)
    x = make_x(8, 2, 21)
    ref = jax.jit(lambda x: layer.apply({"params": params}, x)[0])(x)
    lyr16 = layer_class(spec.kind)(CFG.replace(dtype="bfloat16"), spec)
    out = jax.jit(lambda x: lyr16.apply({"params": params}, x)[0])(x.astype(jnp.bfloat16))
    assert out.dtype == jnp.bfloat16
    assert_close(out.astype(jnp.float32), ref, dtype="bfloat16")


# ----------------------------------------------------------------------------------------------------------
# a float64 oracle with an explicit window mask


def _rope64(x, pos, theta):
    d = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, d, 2) / d)
    ang = np.maximum(pos, 0)[:, :, None] * inv  # [B, T, d/2]
    cos, sin = np.cos(ang)[:, :, None], np.sin(ang)[:, :, None]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _phi64(kind, x, w):
    if kind == "elu_plus_one":
        return np.where(x > 0, x + 1, np.exp(x))
    y = np.einsum("bthd,hdf->bthf", x, w)
    if kind == "hedgehog":
        e, en = np.exp(y - y.max(-1, keepdims=True)), np.exp(-y - (-y).max(-1, keepdims=True))
        return np.concatenate([e / e.sum(-1, keepdims=True), en / en.sum(-1, keepdims=True)], axis=-1)
    assert kind == "hedgehog_exp"
    return np.concatenate([np.exp(y), np.exp(-y)], axis=-1)


def oracle(spec, params, x, pos):
    """The layer in float64 numpy, written from the formulas: explicit loops, an explicit window mask."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    x = np.asarray(x, np.float64)
    b, t, _ = x.shape
    h, kvh, d = CFG.num_heads, CFG.num_kv_heads, CFG.head_dim
    q = np.einsum("btd,dhe->bthe", x, p["q_proj"]["kernel"])
    k = np.einsum("btd,dhe->bthe", x, p["k_proj"]["kernel"])
    v = np.einsum("btd,dhe->bthe", x, p["v_proj"]["kernel"])
    grp = h // kvh
    y = np.zeros((b, t, h, d))
    if spec.kind in ("sliding_window", "lizard"):
        qr, kr = _rope64(q, pos, CFG.rope.theta), _rope64(k, pos, CFG.rope.theta)
        sinks = p["meta_logits"] if spec.meta_tokens else np.zeros((h, 0))
        alpha = p["alpha"] if spec.kind == "lizard" else np.ones(h)
        for bi in range(b):
            for i in range(t):
                if pos[bi, i] < 0:
                    continue
                # query at position P sees keys at positions P - window < P' <= P (padding never)
                seen = [j for j in range(t)
                        if pos[bi, j] >= 0 and pos[bi, i] - spec.window < pos[bi, j] <= pos[bi, i]]
                for hi in range(h):
                    s = np.array([qr[bi, i, hi] @ kr[bi, j, hi // grp] for j in seen]) / np.sqrt(d)
                    e = np.exp(s)
                    num = sum(ej * v[bi, j, hi // grp] for ej, j in zip(e, seen))
                    y[bi, i, hi] += alpha[hi] * num / (e.sum() + np.exp(sinks[hi]).sum())
    if spec.kind in ("linear", "lizard"):
        kk, vv = np.repeat(k, grp, axis=2), np.repeat(v, grp, axis=2)
        wq = p.get("feature_q", {}).get("w")
        wk = p.get("feature_k", {}).get("w")
        if spec.kind == "linear" and spec.rope:
            q, kk = _rope64(q, pos, CFG.rope.theta), _rope64(kk, pos, CFG.rope.theta)
        fq, fk = _phi64(spec.feature_map, q, wq), _phi64(spec.feature_map, kk, wk)
        if spec.kind == "lizard":
            z = np.einsum("btd,dhf->bthf", x, p["gate"]["w"]) + p["gate"]["b"]
            gate = (-np.logaddexp(0, -z) / spec.gate_temperature)[..., 0]  # log sigmoid / tau, [b, t, h]
        else:
            gate = np.zeros((b, t, h))
        for bi in range(b):
            for hi in range(h):
                s_mat = np.zeros((fq.shape[-1], d))
                z_vec = np.zeros(fq.shape[-1])
                for i in range(t):
                    if pos[bi, i] < 0:
                        continue
                    a = np.exp(gate[bi, i, hi])
                    s_mat = a * s_mat + np.outer(fk[bi, i, hi], vv[bi, i, hi])
                    z_vec = a * z_vec + fk[bi, i, hi]
                    beta = p["gate_scale"][hi] if spec.kind == "lizard" else 1.0
                    y[bi, i, hi] += beta * (fq[bi, i, hi] @ s_mat / (fq[bi, i, hi] @ z_vec + 1e-12))
    return np.einsum("bthe,hed->btd", y, p["o_proj"]["kernel"])


@pytest.mark.parametrize("name", ["swa-w5-m3", "swa-w4-m0", "linear-hedgehog", "linear-elu-rope", "lizard-w5-m2",
                                  "lizard-exp-f8-w6"])
def test_layer_matches_float64_oracle_with_explicit_mask(name):
    """Row 0 plain, row 1 left-padded by 6: the layer equals the formulas in float64 (fp32 tolerance)."""
    layer, params, spec = make_layer(name, seed=6)
    b, t = 2, 17
    x = make_x(9, b, t)
    pos = np.broadcast_to(np.arange(t), (b, t)).copy()
    pos[1] = np.concatenate([np.full(6, -1), np.arange(t - 6)])
    out = jax.jit(lambda x, p: layer.apply({"params": params}, x, p)[0])(x, jnp.asarray(pos, jnp.int32))
    real = pos >= 0
    assert_close(np.asarray(out)[real], oracle(spec, params, x, pos)[real], dtype="float32", name=name)


def test_meta_tokens_only_enter_the_denominator():
    """e^-30 meta logits are no sinks (== a plain window); e^30 ones swamp every real key."""
    layer, params, spec = make_layer("swa-w5-m3", seed=7)
    plain = layer_class("sliding_window")(CFG, SlidingWindowSpec(window=5, meta_tokens=0))
    x = make_x(11, 1, 12)
    run = jax.jit(lambda p: layer.apply({"params": p}, x)[0])
    ref = jax.jit(lambda p: plain.apply({"params": p}, x)[0])({k: v for k, v in params.items() if k != "meta_logits"})
    assert_close(run({**params, "meta_logits": jnp.full((4, 3), -30.0)}), ref, rtol=FORMS_RTOL)
    hi = run({**params, "meta_logits": jnp.full((4, 3), 30.0)})
    assert np.abs(np.asarray(hi)).max() < 1e-6 * np.abs(np.asarray(ref)).max()


# ----------------------------------------------------------------------------------------------------------
# causality


@pytest.mark.parametrize("name", list(SPECS))
def test_layer_causality_and_gradients(name):
    """d(y_t . r)/dx_s is exactly 0 for s > t and non-zero for every s <= t the layer reaches; the gradients
    w.r.t. every parameter are finite and non-zero."""
    layer, params, spec = make_layer(name, seed=8)
    x = make_x(12, 1, 14)
    r = jax.random.normal(jax.random.key(13), (CFG.d_model,))
    f = lambda p, x: layer.apply({"params": p}, x)[0][0] @ r  # noqa: E731  [t]
    jac_p, jac_x = jax.jit(jax.jacrev(f, argnums=(0, 1)))(params, x)
    jac = np.abs(np.asarray(jac_x[:, 0])).max(-1)  # [t, s]
    t_idx, s_idx = np.indices(jac.shape)
    reach = s_idx <= t_idx
    if spec.kind == "sliding_window":  # a plain window sees only the last `window` positions
        reach &= t_idx - s_idx < spec.window
    assert jac[~reach].max() == 0.0
    assert (jac[reach] > 0).all()
    for path, g in jax.tree_util.tree_leaves_with_path(jac_p):
        g = np.asarray(g)
        assert np.all(np.isfinite(g)), jax.tree_util.keystr(path)
        assert np.abs(g).max() > 0, f"{jax.tree_util.keystr(path)} gets no gradient"


def randomize_model(params):
    """Every attention layer's parameters moved off their structured init (see `randomize`)."""
    out = dict(params)
    for i, key in enumerate(k for k in params if k.startswith("layers_")):
        out[key] = {**params[key], "attn": randomize(params[key]["attn"], jax.random.key(100 + i))}
    return out


def test_transformer_with_lizard_schedule_is_causal_and_decodes():
    cfg = tiny_config(attention=(LizardSpec(window=4, chunk_size=8, gate_scale_init=0.5),
                                 SlidingWindowSpec(window=3)))
    params = randomize_model(init_params(cfg, jax.random.key(0)))
    model = Transformer(cfg)

    @jax.jit
    def logits_and_grad(x, t):  # from embeddings x [1, T, D]: logits, d sum(logits[t]) / dx
        def run(x):
            m = model.bind({"params": params})
            h = x
            for layer in m.layers:
                h, _ = layer(h, None, None)
            return m.head(h)
        return run(x), jax.grad(lambda x: jnp.sum(run(x)[0, t]))(x)

    toks = jax.random.randint(jax.random.key(2), (1, 19), 0, cfg.vocab_size)
    x = params["embed"]["embedding"][toks]
    for t in (0, 8, 18):
        full, g = logits_and_grad(x, t)
        g = np.abs(np.asarray(g[0])).max(-1)
        assert g[t + 1:].max(initial=0.0) == 0.0 and (g[: t + 1] > 0).all()
    pos = jnp.broadcast_to(jnp.arange(19), (1, 19))
    step = jax.jit(lambda t, p, c: model.apply({"params": params}, t, p, c))
    caches, outs = init_caches(cfg, 1, 32), []
    for a, b in [(0, 9)] + [(i, i + 1) for i in range(9, 19)]:
        o, caches = step(toks[:, a:b], pos[:, a:b], caches)
        outs.append(o)
    assert_close(jnp.concatenate(outs, axis=1), full, rtol=FORMS_RTOL)


# ----------------------------------------------------------------------------------------------------------
# teacher weights, initialisation, decode memory


def test_teacher_weights_load_unchanged():
    """A student with one layer of each family (+ a softmax layer): every teacher parameter is copied bit for
    bit, and the new parameters are exactly each family's additions."""
    names = list(SPECS)
    teacher_cfg = tiny_config(num_layers=len(names) + 1)
    tparams = init_params(teacher_cfg, jax.random.key(0))
    scfg = student_config(teacher_cfg, {"layers": {i: SPECS[n] for i, n in enumerate(names)}})
    assert scfg.kinds == tuple(SPECS[n].kind for n in names) + ("softmax",)
    sparams = jax.jit(student_params, static_argnums=0)(scfg, tparams, jax.random.key(1))
    flat_s = {path_name(p): v for p, v in jax.tree_util.tree_leaves_with_path(sparams)}
    for path, v in jax.tree_util.tree_leaves_with_path(tparams):
        np.testing.assert_array_equal(flat_s[path_name(path)], v, err_msg=path_name(path))
    new = {path_name(p) for p, m in jax.tree_util.tree_leaves_with_path(new_param_mask(sparams, tparams)) if m}
    assert new == {f"layers_{i}/attn/{p}" for i, n in enumerate(names) for p in NEW_PARAMS[n]}


def test_new_parameters_start_structured():
    """Before training: identity feature maps, every gate's bias at logit(gate_init^tau), alpha 1, meta logits 0."""
    p = fresh_params(SPECS["lizard-w5-m2"])
    np.testing.assert_array_equal(p["feature_q"]["w"], np.broadcast_to(np.eye(CFG.head_dim), (4, 16, 16)))
    np.testing.assert_array_equal(p["feature_k"]["w"], p["feature_q"]["w"])
    np.testing.assert_array_equal(p["alpha"], np.ones(CFG.num_heads))
    np.testing.assert_array_equal(p["meta_logits"], np.zeros((CFG.num_heads, 2)))
    np.testing.assert_allclose(jax.nn.sigmoid(p["gate"]["b"]), 0.9, rtol=1e-6)
    p = fresh_params(SPECS["gla"])  # GLA: sigmoid(b)^(1/16) = gate_init
    np.testing.assert_allclose(jax.nn.sigmoid(p["gate"]["b"]) ** (1 / 16), 0.9, rtol=1e-6)
    w = fresh_params(SPECS["lizard-exp-f8-w6"])["feature_q"]["w"]  # f = 8 < head_dim: truncated identity
    np.testing.assert_array_equal(w, np.broadcast_to(np.eye(16, 8), (4, 16, 8)))


def test_smollm2_recipe_parses():
    """configs/lizard_smollm2.yaml is a TrainConfig whose recipe gives a Lizard schedule for a SmolLM2-shaped
    teacher (the full-size load is tests/test_lizard_smollm2.py, slow)."""
    from lizard_jax.config import load_yaml
    from lizard_jax.train.config import TrainConfig

    recipe = load_yaml(Path(__file__).resolve().parents[1] / "configs" / "lizard_smollm2.yaml")
    smollm2 = tiny_config(num_layers=30, d_model=576, num_heads=9, num_kv_heads=3, head_dim=64, ffn_dim=1536)
    scfg = student_config(smollm2, recipe["student"]["attention"])
    assert scfg.attention == (LizardSpec(window=128, meta_tokens=4, feature_dim=64),) * 30
    assert TrainConfig.from_dict(recipe).stage1.lr == 1e-3


def cache_bytes(cache) -> int:
    return sum(x.nbytes for x in jax.tree_util.tree_leaves(cache))


@pytest.mark.parametrize("name", list(SPECS))
def test_decode_state_does_not_grow_with_max_len(name):
    spec = SPECS[name]
    cls = layer_class(spec.kind)
    small, big = cache_bytes(cls.init_cache(CFG, spec, 2, 1024)), cache_bytes(cls.init_cache(CFG, spec, 2, 8192))
    assert small == big > 0
    full = layer_class("softmax").init_cache(CFG, spec_from_any("softmax"), 2, 1024)
    assert cache_bytes(full) > 4 * small  # what a growing KV cache would cost


# ----------------------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize("value,match", [
    ({"kind": "lizard", "windw": 4}, "unknown key"),
    ({"kind": "lizard", "window": 0}, "window must be >= 1"),
    ({"kind": "lizard", "window": "8"}, "expected int"),
    ({"kind": "lizard", "meta_tokens": -1}, "meta_tokens must be >= 0"),
    ({"kind": "lizard", "feature_map": "cosine"}, "feature_map must be one of"),
    ({"kind": "lizard", "feature_dim": 0}, "feature_dim must be >= 1"),
    ({"kind": "lizard", "gate_init": 1.0}, "gate_init must be in"),
    ({"kind": "lizard", "gate_temperature": 0}, "gate_temperature must be > 0"),
    ({"kind": "lizard", "impl": "cuda"}, "impl must be one of"),
    ({"kind": "lizard", "form": "cubic"}, "form"),
    ({"kind": "lizard", "form": "quadratic", "impl": "pallas"}, "applies to form='chunk' only"),
    ({"kind": "linear", "feature_map": "identity"}, "feature_map must be one of"),
    ({"kind": "linear", "feature_map": "elu_plus_one", "feature_dim": 8}, "learnable maps"),
    ({"kind": "linear", "chunk_size": 0}, "chunk_size must be >= 1"),
    ({"kind": "gla", "normalize": "denominator"}, "nonnegative features"),
    ({"kind": "gla", "gate_rank": 0}, "gate_rank must be >= 1"),
    ({"kind": "gla", "gate_per": "token"}, "gate_per"),
    ({"kind": "sliding_window", "impl": "cudnn"}, "cannot add meta tokens"),
    ({"kind": "sliding_window", "window": -3}, "window must be >= 1"),
], ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}={x}" for k, x in v.items()))
def test_specs_reject_bad_options(value, match):
    with pytest.raises(ConfigError, match=match):
        spec_from_any(value)


@pytest.mark.parametrize("kind", attention_kinds())
def test_every_layer_checks_its_inputs(kind):
    """Every layer calls the one input check (layers.common.check_layer_inputs) first, and its errors name the
    layer. No parameters are needed: the check runs before any is read."""
    layer = layer_class(kind)(CFG, spec_from_any(kind))
    apply = lambda *a: layer.apply({"params": {}}, *a)  # noqa: E731
    x = jnp.zeros((2, 5, CFG.d_model))
    pos = jnp.broadcast_to(jnp.arange(5, dtype=jnp.int32), (2, 5))
    name = type(layer).__name__
    with pytest.raises(ValueError, match=rf"^{name}: x must be \[batch, seq, d_model=64\], got x.shape=\(5, 64\)"):
        apply(x[0])
    with pytest.raises(TypeError, match=rf"^{name}: x must be floating"):
        apply(x.astype(jnp.int32))
    with pytest.raises(ValueError, match=rf"^{name}: positions must be \[batch, seq\] = \(2, 5\)"):
        apply(x, pos[:, :3])
    with pytest.raises(TypeError, match=rf"^{name}: positions must be integers"):
        apply(x, pos.astype(jnp.float32))
    wrong = KVCache.create(2, 8, 2, 16, jnp.float32) if kind in ("linear", "gla") else LinearCache.create(2, 4, 16, 17)
    with pytest.raises(TypeError, match=rf"^{name}: cache must be a"):
        apply(x, pos, wrong)
    with pytest.raises(ValueError, match=rf"^{name}: cache batch mismatch: the cache was built for batch 3"):
        apply(x, pos, type(layer).init_cache(CFG, layer.spec, 3, 16))


@pytest.mark.parametrize("name", ["linear-hedgehog", "gla", "swa-w5-m3", "lizard-w5-m2"])
def test_layers_reject_bad_inputs(name):
    layer, params, spec = make_layer(name)
    apply = lambda *a: layer.apply({"params": params}, *a)  # noqa: E731
    x = make_x(0, 2, 5)
    pos = jnp.broadcast_to(jnp.arange(5, dtype=jnp.int32), (2, 5))
    with pytest.raises(ValueError, match=r"x must be \[batch, seq, d_model=64\]"):
        apply(x[0])
    with pytest.raises(ValueError, match="d_model=64"):
        apply(x[..., :32])
    with pytest.raises(TypeError, match="floating"):
        apply(x.astype(jnp.int32))
    with pytest.raises(ValueError, match=r"positions must be \[batch, seq\]"):
        apply(x, pos[:, :3])
    with pytest.raises(TypeError, match="integer"):
        apply(x, pos.astype(jnp.float32))
    wrong = (KVCache.create(2, 8, 2, 16, jnp.float32) if spec.kind in ("linear", "gla")
             else LinearCache.create(2, 4, 16, 17))
    with pytest.raises(TypeError, match="cache must be a"):
        apply(x, pos, wrong)
    with pytest.raises(ValueError, match="built for batch 3"):
        apply(x, pos, type(layer).init_cache(CFG, spec, 3, 16))
    if spec.kind in ("sliding_window", "lizard"):  # positions=None: only the first, unpadded prefill
        _, cache = apply(x, None, type(layer).init_cache(CFG, spec, 2, 16))
        with pytest.raises(ValueError, match="empty cache"):
            apply(x, None, cache)
    if spec.kind == "lizard":
        assert isinstance(type(layer).init_cache(CFG, spec, 2, 16), LizardCache)
