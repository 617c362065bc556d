"""MiniCPM-SALA layers: Lightning (linear) and InfLLM-V2 sparse, alone and in a 1 sparse : 3 Lightning hybrid.

Lightning: a float64 oracle of the layer, prefill == chunked prefill == decoding, left padding, impl forms
(values and gradients), causality. Sparse: the dense regime is the teacher's softmax layer; top-k covering all
blocks is dense; the cached path chooses and attends exactly like the op (prefill blocks, decoded tokens);
chunked prefill at block multiples == full prefill; left padding; compressed keys of the cache. Hybrid:
causality through gradients, prefill == chunked == decode, cache bytes 1K vs 8K, recipes, errors.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lizard_jax.config import ConfigError, ModelConfig, load_yaml, spec_from_any
from lizard_jax.layers import layer_class
from lizard_jax.layers.common import KVCache
from lizard_jax.layers.lightning import LightningAttention, LightningCache, LightningSpec
from lizard_jax.layers.softmax import SoftmaxAttention, SoftmaxSpec
from lizard_jax.layers.sparse import (SparseAttention, SparseCache, SparseSpec, select_cached,
                                     sparse_attention_cached)
from lizard_jax.models import Transformer, init_caches, init_params
from lizard_jax.numerics import FORMS_RTOL, assert_close, rel_err
from lizard_jax.ops.lightning import lightning_slopes
from lizard_jax.ops.sparse import (block_sparse_attention, compress_keys, infllm_attention, infllm_select,
                                   infllm_select_decode, num_compressed)
from lizard_jax.recipes import new_param_mask, student_config, student_params
from lizard_jax.sala import recipe_attention
from lizard_jax.testing import TEACHER_PROJECTIONS, randomize, run_chunks, tiny_config
from lizard_jax.train import TrainConfig

CFG = tiny_config()  # d_model 64, 4 query heads, 2 kv heads (GQA), head_dim 16
# small InfLLM-V2 settings: blocks of 16, windows 8/4, 1 initial block + 1 local block + 1 more (topk 2)
SMALL = dict(block_size=16, topk=2, kernel=8, stride=4, init_blocks=1, local_window=16)
SPARSE = SparseSpec(**SMALL, dense_below=0)
PLAIN = dict(rope=False, qk_norm=False, output_gate=False)  # projections only: q/k/v recomputable in a test
TEACHER_SPARSE = SparseSpec(**SMALL, dense_below=64, rope=True, qk_norm=False, output_gate=False)


def path_name(path) -> str:
    return "/".join(str(getattr(p, "key", p)) for p in path)


def make_layer(spec, seed=0, cfg=CFG):
    layer = layer_class(spec.kind)(cfg, spec)
    params = nn.unbox(layer.init(jax.random.key(seed), jnp.zeros((1, 4, cfg.d_model)))["params"])
    return layer, randomize(params, jax.random.key(seed + 1))


def jit_apply(layer):
    """layer.apply, jitted (eager dispatch of the chunked forms is slow)."""
    return jax.jit(lambda p, *args: layer.apply({"params": p}, *args))


def make_x(seed, batch, seq, cfg=CFG):
    return jax.random.normal(jax.random.key(seed), (batch, seq, cfg.d_model), jnp.float32)


def arange_pos(batch, seq, start=0):
    return jnp.broadcast_to(jnp.arange(start, start + seq, dtype=jnp.int32), (batch, seq))


def left_pad(x, pad):
    """Row 1 of x gets `pad` leading padding rows (its real tokens are the last T - pad); positions to match."""
    b, t, _ = x.shape
    pos = np.broadcast_to(np.arange(t), (b, t)).copy()
    pos[1] = np.arange(t) - pad
    return jnp.asarray(pos, jnp.int32)


# ----------------------------------------------------------------------------------------------------------
# Lightning


LIGHTNING = {
    "sala": LightningSpec(chunk_size=8),
    "no-norm-no-gate": LightningSpec(qk_norm=False, output_norm=False, output_gate=False, chunk_size=8),
    "nope-gate-only": LightningSpec(rope=False, qk_norm=False, output_norm=False, chunk_size=16),
    "per-head-norm-geometric": LightningSpec(output_norm_per_head=True, slopes="geometric", chunk_size=8),
}
CFG6 = tiny_config(d_model=48, num_heads=6, num_kv_heads=2, head_dim=8)  # 6 query heads: not a power of two


def reference_slopes(rule: str, n: int) -> np.ndarray:
    """Decay slopes written out independently of ops/lightning. "alibi" (the official MiniCPM-SALA
    `_build_slope_tensor`, ALiBi's get_slopes) in closed form: c = 2**floor(log2 n) heads get 2**(-8 i / c),
    i = 1..c, then the n - c others the odd-numbered slopes of 2c heads, 2**(-8 (2j - 1) / (2c)), j = 1..n-c."""
    if rule == "geometric":
        return 2.0 ** (-8.0 * np.arange(1, n + 1) / n)
    c = 2 ** int(np.floor(np.log2(n)))
    return np.concatenate([2.0 ** (-8.0 * np.arange(1, c + 1) / c),
                           2.0 ** (-8.0 * (2 * np.arange(1, n - c + 1) - 1) / (2 * c))])


def np_rmsnorm(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def np_rope(x, pos, theta):
    d = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, d, 2) / d)
    ang = np.maximum(pos, 0)[..., None] * inv
    cos, sin = np.cos(ang)[:, :, None], np.sin(ang)[:, :, None]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def lightning_oracle(params, cfg: ModelConfig, spec: LightningSpec, x, pos, qk_norm_after_rope=False):
    """The layer in float64 numpy, token by token (qk_norm_after_rope: the wrong order, for a negative test)."""
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    x = np.asarray(x, np.float64)
    pos = np.asarray(pos)
    q = np.einsum("btd,dhe->bthe", x, p["q_proj"]["kernel"])
    k = np.einsum("btd,dhe->bthe", x, p["k_proj"]["kernel"])
    v = np.einsum("btd,dhe->bthe", x, p["v_proj"]["kernel"])
    norm_qk = lambda q, k: (np_rmsnorm(q, p["q_norm"]["scale"], cfg.rms_eps),
                            np_rmsnorm(k, p["k_norm"]["scale"], cfg.rms_eps))
    if spec.qk_norm and not qk_norm_after_rope:
        q, k = norm_qk(q, k)
    if spec.rope:
        q, k = np_rope(q, pos, cfg.rope.theta), np_rope(k, pos, cfg.rope.theta)
    if spec.qk_norm and qk_norm_after_rope:
        q, k = norm_qk(q, k)
    group = cfg.num_heads // cfg.num_kv_heads
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    real = (pos >= 0)[:, :, None, None]
    k, v = k * real, v * real
    q = q / np.sqrt(cfg.head_dim)
    decay = np.exp(-reference_slopes(spec.slopes, cfg.num_heads))[None, :, None, None]
    b, t, h, d = q.shape
    state = np.zeros((b, h, d, d))
    o = np.zeros_like(q)
    for i in range(t):
        state = decay * state + k[:, i, :, :, None] * v[:, i, :, None, :]
        o[:, i] = np.einsum("bhd,bhde->bhe", q[:, i], state)
    if spec.output_norm and spec.output_norm_per_head:
        o = np_rmsnorm(o, p["o_norm"]["scale"], cfg.rms_eps)
    elif spec.output_norm:  # official: one RMSNorm over heads x head_dim
        flat = o.reshape(b, t, h * d)
        o = np_rmsnorm(flat, p["o_norm"]["scale"].reshape(h * d), cfg.rms_eps).reshape(b, t, h, d)
    if spec.output_gate:
        z = np.einsum("btd,dhe->bthe", x, p["z_proj"]["kernel"]) + p["z_proj"]["bias"]
        o = o / (1 + np.exp(-z))
    return np.einsum("bthe,hed->btd", o, p["o_proj"]["kernel"])


@pytest.mark.parametrize("name,batch,seq,cfg", [("sala", 2, 21, CFG), ("no-norm-no-gate", 1, 40, CFG),
                                                 ("nope-gate-only", 2, 33, CFG), ("sala", 2, 19, CFG6),
                                                 ("per-head-norm-geometric", 1, 23, CFG6)])
def test_lightning_matches_float64_oracle(name, batch, seq, cfg):
    spec = LIGHTNING[name]
    layer, params = make_layer(spec, seed=seq, cfg=cfg)
    x = make_x(seq, batch, seq, cfg=cfg)
    y, cache = jit_apply(layer)(params, x)
    assert cache is None and y.shape == x.shape and y.dtype == jnp.float32
    assert_close(y, lightning_oracle(params, cfg, spec, x, arange_pos(batch, seq)), dtype="float32",
                 name=f"lightning-{name}-H{cfg.num_heads}-B{batch}-T{seq}")


def test_lightning_slopes_follow_the_official_alibi_rule():
    """The official MiniCPM-SALA code decays head h by exp(-s_h) with ALiBi's slopes (`_build_slope_tensor`).
    For 9 heads (SmolLM2) that is 2**-1 .. 2**-8 then 2**-0.5, not 2**(-8 (h+1) / 9)."""
    np.testing.assert_allclose(np.asarray(lightning_slopes(9)), [2.0 ** -e for e in (1, 2, 3, 4, 5, 6, 7, 8, 0.5)],
                               rtol=1e-7)
    for n in (1, 2, 3, 5, 6, 9, 12, 24, 32, 40):
        for rule in ("alibi", "geometric"):
            got = lightning_slopes(n, rule)
            assert got.shape == (n,) and got.dtype == jnp.float32
            np.testing.assert_allclose(np.asarray(got), reference_slopes(rule, n), rtol=1e-7, err_msg=f"{rule} {n}")
    assert LightningSpec().slopes == "alibi"
    assert not np.allclose(np.asarray(lightning_slopes(9)), np.asarray(lightning_slopes(9, "geometric")))
    np.testing.assert_array_equal(np.asarray(lightning_slopes(32)), np.asarray(lightning_slopes(32, "geometric")))
    with pytest.raises(ValueError, match="rule"):
        lightning_slopes(9, "linear")
    with pytest.raises(ConfigError, match="slopes"):
        spec_from_any({"kind": "lightning", "slopes": "linear"})


def test_lightning_output_norm_is_one_rmsnorm_over_all_heads():
    """Official `o_norm`: one RMSNorm over heads x head_dim (scale [heads * head_dim], kept as [heads, head_dim]);
    `output_norm_per_head=True` is the per-head norm with a [head_dim] scale. Even with unit scales (init) the two
    give different outputs (one mean square per token vs one per head), and each matches its oracle."""
    x = make_x(8, 1, 12)
    y = {}
    for per_head in (False, True):
        spec = LightningSpec(qk_norm=False, output_gate=False, output_norm_per_head=per_head)
        layer = LightningAttention(CFG, spec)
        params = nn.unbox(layer.init(jax.random.key(0), x)["params"])
        want = (CFG.head_dim,) if per_head else (CFG.num_heads, CFG.head_dim)
        assert params["o_norm"]["scale"].shape == want
        y[per_head] = jit_apply(layer)(params, x)[0]
        assert_close(y[per_head], lightning_oracle(params, CFG, spec, x, arange_pos(1, 12)), dtype="float32",
                     name=f"unit-scale o_norm per_head={per_head}")
    assert rel_err(y[False], y[True]) > 1e-2, rel_err(y[False], y[True])  # the choice matters
    o_spec = LightningSpec(qk_norm=False, output_gate=False)
    layer, params = make_layer(o_spec, seed=8)
    assert_close(jit_apply(layer)(params, x)[0], lightning_oracle(params, CFG, o_spec, x, arange_pos(1, 12)),
                 dtype="float32", name="o_norm over all heads")


def test_lightning_qk_norm_is_applied_before_rope():
    """Official order: q/k RMSNorm (per head, [head_dim] scale) THEN RoPE. RoPE rotates channel pairs (i, i + d/2),
    so with a non-uniform norm scale the two orders differ; the layer matches norm-then-RoPE only."""
    spec = LIGHTNING["sala"]
    layer, params = make_layer(spec, seed=11)
    scale = np.asarray(params["q_norm"]["scale"])
    assert np.abs(scale[: CFG.head_dim // 2] - scale[CFG.head_dim // 2:]).max() > 0.1  # not rotation-invariant
    x = make_x(11, 2, 17)
    pos = arange_pos(2, 17, start=5)
    y, _ = jit_apply(layer)(params, x, pos)
    assert_close(y, lightning_oracle(params, CFG, spec, x, pos), dtype="float32", name="norm then rope")
    wrong = lightning_oracle(params, CFG, spec, x, pos, qk_norm_after_rope=True)
    assert rel_err(y, wrong) > 1e-2, rel_err(y, wrong)


@pytest.mark.parametrize("name,seq", [("sala", 37), ("nope-gate-only", 30)])
def test_lightning_prefill_chunked_prefill_and_decode_agree(name, seq):
    layer, params = make_layer(LIGHTNING[name], seed=seq)
    x = make_x(seq, 2, seq)
    full, _ = jit_apply(layer)(params, x)
    for sizes in ([5, 1, 11, seq - 17], [1] * seq):
        got, cache = run_chunks(layer, params, x, sizes, max_len=64)
        assert isinstance(cache, LightningCache) and cache.state.dtype == jnp.float32
        err = rel_err(got, full)
        assert err <= FORMS_RTOL, f"lightning-{name}-T{seq} chunks {sizes[:4]}: {err:.2e}"


def test_lightning_left_padding_is_exact():
    spec = LIGHTNING["sala"]
    layer, params = make_layer(spec, seed=3)
    pad, t = 7, 30
    x = make_x(3, 2, t)
    pos = left_pad(x, pad)
    padded, _ = jit_apply(layer)(params, x, pos)
    alone, _ = jit_apply(layer)(params, x[1:, pad:])
    assert rel_err(padded[1:, pad:], alone) <= FORMS_RTOL
    assert float(jnp.max(jnp.abs(padded[1, :pad]))) == 0.0  # padding rows output 0
    full0, _ = jit_apply(layer)(params, x[:1])
    assert rel_err(padded[:1], full0) <= FORMS_RTOL
    # prefill of the padded batch through the cache, then decoding, == the unpadded row
    got, _ = run_chunks(layer, params, x, [11, 19], max_len=40, positions=pos)
    assert rel_err(got[1:, pad:], alone) <= FORMS_RTOL
    assert_close(padded[1:, pad:], lightning_oracle(params, CFG, spec, x[1:, pad:], arange_pos(1, t - pad)),
                 dtype="float32", name="padded row vs oracle")


def test_lightning_impl_forms_values_and_gradients():
    """impl="xla" (chunked XLA form) and impl="pallas" (the kernel, interpret mode on CPU): same outputs and
    same gradients for every parameter and the input."""
    x = make_x(5, 2, 19)
    outs = {}
    for impl in ("xla", "pallas"):
        layer, params = make_layer(dataclasses.replace(LIGHTNING["sala"], impl=impl), seed=5)

        def loss(p, xs):
            y, _ = layer.apply({"params": p}, xs)
            return jnp.sum(jnp.sin(y))

        outs[impl] = (jit_apply(layer)(params, x)[0], *jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x))
    (y0, gp0, gx0), (y1, gp1, gx1) = outs["xla"], outs["pallas"]
    assert_close(y1, y0, dtype="float32", name="output")
    assert_close(gx1, gx0, dtype="float32", name="dx")
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(gp0)[0], jax.tree_util.tree_leaves(gp1)):
        assert np.all(np.isfinite(np.asarray(a))), path_name(path)
        assert_close(b, a, dtype="float32", name=f"d{path_name(path)}")


def test_lightning_causal_through_gradients():
    layer, params = make_layer(LIGHTNING["sala"], seed=6)
    x = make_x(6, 1, 24)
    for t in (0, 9, 23):
        g = jax.jit(jax.grad(lambda xs: jnp.sum(layer.apply({"params": params}, xs)[0][:, t] ** 2)))(x)
        assert np.abs(np.asarray(g[:, t + 1:])).max(initial=0.0) == 0.0, t
        assert float(jnp.max(jnp.abs(g[:, t]))) > 0.0, t


def test_lightning_new_parameters_start_as_documented():
    layer = LightningAttention(CFG, LightningSpec())
    p = nn.unbox(layer.init(jax.random.key(0), jnp.zeros((1, 4, CFG.d_model)))["params"])
    assert set(p) == {"q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm", "o_norm", "z_proj"}
    assert p["k_proj"]["kernel"].shape == (CFG.d_model, CFG.num_kv_heads, CFG.head_dim)  # teacher shapes
    # official shapes: q/k norms one [head_dim] scale shared by the heads; o_norm over heads x head_dim
    assert p["q_norm"]["scale"].shape == p["k_norm"]["scale"].shape == (CFG.head_dim,)
    assert p["o_norm"]["scale"].shape == (CFG.num_heads, CFG.head_dim)
    for n in ("q_norm", "k_norm", "o_norm"):
        assert np.all(np.asarray(p[n]["scale"]) == 1.0)
    assert np.all(np.asarray(p["z_proj"]["kernel"]) == 0.0)
    assert np.all(np.asarray(p["z_proj"]["bias"]) == 4.0)


# ----------------------------------------------------------------------------------------------------------
# Sparse


def plain_qkv(params, x):
    """q, k, v of a PLAIN sparse layer (projections only)."""
    f = lambda name, n: jnp.einsum("btd,dhe->bthe", x, params[name]["kernel"], precision="highest")
    return f("q_proj", 0), f("k_proj", 0), f("v_proj", 0)


def o_proj(params, o):
    return jnp.einsum("bthe,hed->btd", o, params["o_proj"]["kernel"], precision="highest")


def test_sparse_dense_regime_is_the_teacher_layer_exactly():
    """rope=True, no norm, no gate, below dense_below: the same call as SoftmaxAttention, bit for bit, with left
    padding too; through the cache (any chunks) equal to the teacher's KV-cache path."""
    teacher = SoftmaxAttention(CFG, SoftmaxSpec())
    layer, params = make_layer(TEACHER_SPARSE, seed=7)
    assert set(params) == set(TEACHER_PROJECTIONS)
    x = make_x(7, 2, 45)
    for pos in (None, left_pad(x, 9)):
        want, _ = jit_apply(teacher)(params, x, pos)
        got, _ = jit_apply(layer)(params, x, pos)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    pos = left_pad(x, 9)
    t_cache = teacher.init_cache(CFG, SoftmaxSpec(), 2, 64)
    want, _ = jit_apply(teacher)(params, x, pos, t_cache)
    for sizes in ([19, 1, 25],):
        got, cache = run_chunks(layer, params, x, sizes, max_len=64, positions=pos)
        assert isinstance(cache, SparseCache)
        assert rel_err(got, want) <= FORMS_RTOL, sizes[:3]


@pytest.mark.parametrize("path", ["op", "cached"])
def test_sparse_topk_covering_all_blocks_is_dense(path):
    spec = dataclasses.replace(SPARSE, topk=100, **PLAIN)
    layer, params = make_layer(spec, seed=8)
    dense_layer = SparseAttention(CFG, dataclasses.replace(spec, dense_below=1000))
    x = make_x(8, 2, 70)
    pos = None if path == "op" else left_pad(x, 5)  # left padding: the cached path, not the op
    want, _ = jit_apply(dense_layer)(params, x, pos)
    got, _ = jit_apply(layer)(params, x, pos)
    assert_close(got, want, rtol=FORMS_RTOL, name=f"topk-all-{path}")
    small, _ = jit_apply(SparseAttention(CFG, dataclasses.replace(spec, topk=2)))(params, x, pos)
    assert rel_err(small, want) > 1e-3  # topk 2 is really sparse here


def random_qk(seed, batch, seq, heads=4, kv_heads=2, d=16):
    kq, kk = jax.random.split(jax.random.key(seed))
    q = 2.0 * jax.random.normal(kq, (batch, seq, heads, d))
    k = 2.0 * jax.random.normal(kk, (batch, seq, kv_heads, d))
    return q, k


def filled_cache(k, sizes, spec, size):
    """A SparseCache holding k `[B, T, KV, d]` appended in chunks of `sizes`."""
    cache = SparseCache.create(k.shape[0], size, k.shape[2], k.shape[3], k.dtype, kernel=spec.kernel,
                               stride=spec.stride)
    pos = arange_pos(k.shape[0], k.shape[1])
    a = 0
    for n in sizes:
        cache = cache.append(k[:, a:a + n], k[:, a:a + n], pos[:, a:a + n], kernel=spec.kernel, stride=spec.stride)
        a += n
    return cache


@pytest.mark.parametrize("seq,size,sizes", [(61, 64, [61]), (61, 80, [3, 17, 1, 40]), (37, 37, [1] * 37)])
def test_sparse_cache_compressed_keys(seq, size, sizes):
    """Compressed keys built window by window as tokens arrive == compress_keys of the whole sequence."""
    _, k = random_qk(seq, 2, seq)
    cache = filled_cache(k, sizes, SPARSE, size)
    n = num_compressed(seq, SPARSE.kernel, SPARSE.stride)
    assert_close(cache.k_cmp[:, :n], compress_keys(k, SPARSE.kernel, SPARSE.stride), rtol=1e-6, name="k_cmp")
    assert np.abs(np.asarray(cache.k_cmp[:, n:])).max(initial=0.0) == 0.0  # incomplete windows not written yet
    np.testing.assert_array_equal(np.asarray(cache.length), [seq, seq])


def test_sparse_cached_selection_equals_the_op():
    """Prefill: the cached path's group i is the op's query block i, with the same choice. Decode: a token at
    position p chooses what infllm_select_decode chooses for it from compress_keys(k[:p+1]), even though the
    cache already holds later compressed keys."""
    seq = 75
    q, k = random_qk(9, 2, seq)
    kw = dict(block_size=16, topk=2, kernel=8, stride=4, init_blocks=1, local_window=16)
    cache = filled_cache(k, [seq], SPARSE, 96)
    idx, counts, pos_grp = select_cached(q, arange_pos(2, seq), cache.k_cmp, size=96, spec=SPARSE)
    ref_idx, ref_counts = infllm_select(q, k, **kw)
    n_qb = ref_counts.shape[-1]
    np.testing.assert_array_equal(np.asarray(pos_grp[:, :n_qb, 0]), np.broadcast_to(np.arange(n_qb) * 16, (2, n_qb)))
    np.testing.assert_array_equal(np.asarray(counts[:, :n_qb]).transpose(0, 2, 1), np.asarray(ref_counts))
    for b in range(2):
        for h in range(2):
            for i in range(n_qb):
                c = int(ref_counts[b, h, i])
                np.testing.assert_array_equal(np.asarray(idx[b, i, h, :c]), np.asarray(ref_idx[b, h, i, :c]))
    n_sparse = 0
    select = jax.jit(lambda qp, p: select_cached(qp, jnp.full((2, 1), p, jnp.int32), cache.k_cmp, size=96,
                                                 spec=SPARSE))
    for p in (0, 16, 31, 52, 63, 74):
        idx, counts, _ = select(q[:, p:p + 1], p)
        ref_idx, ref_counts = infllm_select_decode(q[:, p:p + 1], compress_keys(k[:, :p + 1], 8, 4), seq_k=p + 1,
                                                   **kw)
        np.testing.assert_array_equal(np.asarray(counts[:, 0]), np.asarray(ref_counts[:, :, 0]))
        for b in range(2):
            for h in range(2):
                c = int(ref_counts[b, h, 0])
                np.testing.assert_array_equal(np.asarray(idx[b, 0, h, :c]), np.asarray(ref_idx[b, h, 0, :c]), f"{p}")
        n_sparse += int(p // 16 + 1 > int(ref_counts[0, 0, 0]))
    assert n_sparse >= 3  # tokens that really skip blocks


def test_sparse_prefill_op_path_equals_cached_path(seq=71):
    """Sparse regime: sparse_attention_cached on a fresh cache == infllm_attention (the op); in the layer, the
    op path (positions None) == positions given == chunked prefill through a cache whose chunks start at
    multiples of block_size (the first chunk takes the op, the later ones the cached path)."""
    q, k = random_qk(seq, 2, seq)
    v = jax.random.normal(jax.random.key(seq), k.shape)
    cache = SparseCache.create(2, 80, 2, 16, jnp.float32, kernel=8, stride=4).append(k, v, arange_pos(2, seq),
                                                                                        kernel=8, stride=4)
    got = jax.jit(lambda q, c: sparse_attention_cached(q, arange_pos(2, seq), c.k, c.v, c.k_cmp, spec=SPARSE,
                                                       scale=0.25))(q, cache)
    want = jax.jit(lambda q, k, v: infllm_attention(q, k, v, config=SPARSE.infllm, impl="xla"))(q, k, v)
    assert_close(got, want, rtol=FORMS_RTOL, name="cached vs op")
    layer, params = make_layer(SPARSE, seed=seq)
    x = make_x(seq, 2, seq)
    full, _ = jit_apply(layer)(params, x)
    fresh, _ = jit_apply(layer)(params, x, arange_pos(2, seq))
    assert rel_err(fresh, full) <= FORMS_RTOL
    got, _ = run_chunks(layer, params, x, [32, 16, seq - 48], max_len=96)
    assert rel_err(got, full) <= FORMS_RTOL


def test_sparse_decode_equals_the_op_per_token():
    """Token-by-token decoding through the cache (crossing dense_below = 30) == per token p,
    infllm_attention(q_p, k[:p+1], v[:p+1]) (dense while p + 1 < 30, else InfLLM-V2 selection + block-sparse)."""
    spec = dataclasses.replace(SPARSE, dense_below=30, **PLAIN)
    layer, params = make_layer(spec, seed=10)
    seq = 66
    x = make_x(10, 2, seq)
    got, _ = run_chunks(layer, params, x, [1] * seq, max_len=80)
    q, k, v = plain_qkv(params, x)
    check = (0, 13, 28, 29, 30, 41, 47, 58)
    want = [infllm_attention(q[:, p:p + 1], k[:, :p + 1], v[:, :p + 1], config=spec.infllm, impl="xla")
            for p in check]
    want = o_proj(params, jnp.concatenate(want, axis=1))
    assert rel_err(got[:, check, :], want) <= FORMS_RTOL
    # the block-sparse op with the decode selection, at the last token, directly
    p = seq - 1
    sel = infllm_select_decode(q[:, p:], compress_keys(k, 8, 4), seq_k=seq, **SMALL)
    o = block_sparse_attention(q[:, p:], k, v, *sel, block_size=16, q_offset=p, impl="xla")
    assert rel_err(got[:, p:], o_proj(params, o)) <= FORMS_RTOL


def test_sparse_token_selection_prefill_equals_decode():
    """selection="token" (the paper's), sparse regime: full prefill (the op) == chunked prefill (any chunks, the
    op then the cached path) == token-by-token decoding; selection="block" breaks prefill == decode here (a
    prefill row shares its query block's choice)."""
    t = 70
    x = make_x(12, 2, t)
    errs = {}
    for sel in ("token", "block"):
        layer, params = make_layer(dataclasses.replace(SPARSE, selection=sel), seed=12)
        full, _ = jit_apply(layer)(params, x)
        decoded, _ = run_chunks(layer, params, x, [1] * t, max_len=80)
        errs[sel] = rel_err(decoded, full)
        if sel == "token":
            fresh, _ = jit_apply(layer)(params, x, arange_pos(2, t))  # positions given: the cached path
            assert rel_err(fresh, full) <= FORMS_RTOL
            chunked, _ = run_chunks(layer, params, x, [5, 19, 1, 45], max_len=80)
            assert rel_err(chunked, full) <= FORMS_RTOL
    assert errs["token"] <= FORMS_RTOL, errs
    assert errs["block"] > 1e-3, errs


def test_sparse_left_padding_matches_the_unpadded_row():
    """Sparse regime, row 1 left-padded by 11: its real tokens give what the unpadded sequence gives, through
    the no-cache path (positions given), a padded prefill + chunks through the cache, and decoding."""
    layer, params = make_layer(SPARSE, seed=11)
    pad, t = 11, 70
    x = make_x(11, 2, t)
    pos = left_pad(x, pad)
    alone, _ = jit_apply(layer)(params, x[1:, pad:])  # op path, unpadded
    padded, _ = jit_apply(layer)(params, x, pos)
    assert rel_err(padded[1:, pad:], alone) <= FORMS_RTOL
    assert float(jnp.max(jnp.abs(padded[1, :pad]))) == 0.0
    # a padded prefill through the cache (row 1's second chunk starts at position 16, a block start), then
    # decoding: row 1 == row 1 alone, unpadded, prefilled then decoded the same way
    got, cache = run_chunks(layer, params, x, [27, 16] + [1] * 27, max_len=80, positions=pos)
    np.testing.assert_array_equal(np.asarray(cache.length), [t, t - pad])
    assert rel_err(got[:, :43], padded[:, :43]) <= FORMS_RTOL
    want, _ = run_chunks(layer, params, x[1:, pad:], [16, 16] + [1] * 27, max_len=80)
    assert rel_err(got[1:, pad:], want) <= FORMS_RTOL


def test_sparse_new_parameters_and_errors():
    layer = SparseAttention(CFG, SparseSpec())  # official SALA sparse layers: no QK-norm
    p = nn.unbox(layer.init(jax.random.key(0), jnp.zeros((1, 4, CFG.d_model)))["params"])
    assert set(p) == {"q_proj", "k_proj", "v_proj", "o_proj", "o_gate"}
    assert np.all(np.asarray(p["o_gate"]["kernel"]) == 0.0) and np.all(np.asarray(p["o_gate"]["bias"]) == 4.0)
    layer = SparseAttention(CFG, SparseSpec(qk_norm=True))
    p = nn.unbox(layer.init(jax.random.key(0), jnp.zeros((1, 4, CFG.d_model)))["params"])
    assert {"q_norm", "k_norm"} <= set(p)
    with pytest.raises(ConfigError, match="selection"):
        SparseSpec(selection="row")
    assert spec_from_any({"kind": "sparse", "selection": "token"}).infllm.selection == "token"
    with pytest.raises(ConfigError, match="stride"):
        SparseSpec(stride=0)
    with pytest.raises(ConfigError, match="impl"):
        SparseSpec(impl="cudnn")
    with pytest.raises(ConfigError, match="unknown key"):
        spec_from_any({"kind": "sparse", "top_k": 4})


@pytest.mark.parametrize("kind", ["lightning", "sparse"])
def test_bfloat16_prefill_and_decode(kind):
    """cfg.dtype bfloat16: prefill + decoding (the sparse layer crosses dense_below = 40) within the bfloat16
    tolerance of the float32 layer; states, accumulators and compressed keys stay float32."""
    spec = LightningSpec(chunk_size=8) if kind == "lightning" else dataclasses.replace(SPARSE, dense_below=40)
    layer, params = make_layer(spec, seed=12)
    layer16 = layer_class(kind)(CFG.replace(dtype="bfloat16"), spec)
    x = make_x(12, 2, 50)
    want, _ = run_chunks(layer, params, x, [32] + [1] * 18, max_len=64)
    got, cache = run_chunks(layer16, params, x.astype(jnp.bfloat16), [32] + [1] * 18, max_len=64)
    assert got.dtype == jnp.bfloat16
    assert_close(got, want, dtype="bfloat16", name=f"{kind}-bf16")
    if kind == "lightning":
        assert cache.state.dtype == jnp.float32
    else:
        assert cache.k.dtype == jnp.bfloat16 and cache.k_cmp.dtype == jnp.float32


# ----------------------------------------------------------------------------------------------------------
# Errors (both layers)


@pytest.mark.parametrize("kind", ["lightning", "sparse"])
def test_layer_errors(kind):
    spec = spec_from_any(kind)
    layer = layer_class(kind)(CFG, spec)
    params = layer.init(jax.random.key(0), jnp.zeros((1, 4, CFG.d_model)))["params"]
    x = make_x(0, 2, 5)
    apply = lambda *a: layer.apply({"params": params}, *a)
    with pytest.raises(ValueError, match="d_model=64"):
        apply(jnp.zeros((2, 5, 32)))
    with pytest.raises(ValueError, match="d_model"):
        apply(jnp.zeros((2, 5)))
    with pytest.raises(TypeError, match="floating"):
        apply(jnp.zeros((2, 5, 64), jnp.int32))
    with pytest.raises(ValueError, match="positions.shape"):
        apply(x, jnp.zeros((2, 4), jnp.int32))
    with pytest.raises(TypeError, match="integers"):
        apply(x, jnp.zeros((2, 5), jnp.float32))
    with pytest.raises(TypeError, match="cache must be"):
        apply(x, arange_pos(2, 5), KVCache.create(2, 16, 2, 16, jnp.float32))
    with pytest.raises(ValueError, match="cache batch"):
        apply(x, arange_pos(2, 5), type(layer).init_cache(CFG, spec, 3, 16))
    with pytest.raises(ConfigError, match="impl"):
        spec_from_any({"kind": kind, "impl": "triton"})
    with pytest.raises(ConfigError, match="gate_bias_init"):
        spec_from_any({"kind": kind, "gate_bias_init": float("nan")})
    with pytest.raises(ConfigError, match="unknown key"):
        spec_from_any({"kind": kind, "window": 4})
    with pytest.raises(ConfigError, match="expected bool"):
        spec_from_any({"kind": kind, "rope": "yes"})
    if kind == "lightning":
        with pytest.raises(ConfigError, match="chunk_size"):
            LightningSpec(chunk_size=0)


# ----------------------------------------------------------------------------------------------------------
# The hybrid: 1 sparse : 3 Lightning


def hybrid_config(sparse: SparseSpec, layers=4):
    return tiny_config(num_layers=layers, attention=([sparse] + [LightningSpec(chunk_size=8)] * 3) * (layers // 4),
                       max_seq_len=9000)


def hybrid_params(cfg, seed=0):
    return randomize(init_params(cfg, jax.random.key(seed)), jax.random.key(seed + 1))


def test_hybrid_causal_through_gradients():
    """Sparse regime (dense_below 0): a loss on position t has exactly zero gradient w.r.t. the inputs (token
    embeddings) after t, through the whole 1 sparse : 3 Lightning model."""
    cfg = hybrid_config(SparseSpec(**SMALL, dense_below=0))
    params = hybrid_params(cfg)
    model = Transformer(cfg).bind({"params": params})
    tokens = jax.random.randint(jax.random.key(2), (2, 53), 0, cfg.vocab_size)
    emb = model.embed(tokens)
    w = jax.random.normal(jax.random.key(3), (cfg.vocab_size,))

    def loss(e, t):
        x = e
        for layer in model.layers:
            x, _ = layer(x, None, None)
        return jnp.sum((model.head(x) @ w) * (jnp.arange(e.shape[1]) == t))

    grad = jax.jit(jax.grad(loss))
    for t in (3, 20, 40, 52):
        g = grad(emb, t)
        assert np.abs(np.asarray(g[:, t + 1:])).max(initial=0.0) == 0.0, t
        assert float(jnp.max(jnp.abs(g[:, t]))) > 0.0 and bool(jnp.all(jnp.isfinite(g))), t


@pytest.mark.parametrize("regime", ["dense", "sparse"])
def test_hybrid_prefill_chunked_prefill_and_decode_agree(regime):
    """Dense regime (dense_below 64): full prefill == chunked prefill (any chunks) == token-by-token decode.
    Sparse regime (dense_below 0): full prefill == chunked prefill with chunks starting at block multiples."""
    dense_below = 64 if regime == "dense" else 0
    cfg = hybrid_config(SparseSpec(**SMALL, dense_below=dense_below))
    params = hybrid_params(cfg, seed=4)
    model = Transformer(cfg)
    seq = 40
    tokens = jax.random.randint(jax.random.key(5), (2, seq), 0, cfg.vocab_size)
    full = jax.jit(model.apply)({"params": params}, tokens)
    step = jax.jit(lambda c, tok, pos: model.apply({"params": params}, tok, pos, c))
    plans = [[16, 16, 8]] + ([[1] * seq] if regime == "dense" else [])
    for sizes in plans:
        caches = init_caches(cfg, 2, 64)
        outs, a = [], 0
        for n in sizes:
            logits, caches = step(caches, tokens[:, a:a + n], arange_pos(2, n, a))
            outs.append(logits)
            a += n
        err = rel_err(jnp.concatenate(outs, axis=1), full)
        assert err <= FORMS_RTOL, f"{regime} chunks {sizes[:4]}: {err:.2e}"


def tree_bytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree))


def test_hybrid_cache_bytes_grow_only_by_sparse_kv():
    cfg = hybrid_config(SparseSpec(), layers=8)  # paper settings, sparse layers 0 and 4
    caches = {n: jax.eval_shape(lambda n=n: init_caches(cfg, 2, n)) for n in (1024, 8192)}
    sparse_layers = [i for i, s in enumerate(cfg.attention) if s.kind == "sparse"]
    assert sparse_layers == [0, 4]
    for i, s in enumerate(cfg.attention):
        small, big = tree_bytes(caches[1024][i]), tree_bytes(caches[8192][i])
        if s.kind == "lightning":
            assert small == big == 2 * CFG.num_heads * CFG.head_dim ** 2 * 4
        else:
            kv = 2 * 2 * (8192 - 1024) * CFG.num_kv_heads * CFG.head_dim * 4
            cmp = 2 * (num_compressed(8192) - num_compressed(1024)) * CFG.num_kv_heads * CFG.head_dim * 4
            assert big - small == kv + cmp
    grow = tree_bytes(caches[8192]) - tree_bytes(caches[1024])
    per_token_teacher = 2 * 2 * CFG.num_kv_heads * CFG.head_dim * 4 * cfg.num_layers
    assert grow < 0.3 * per_token_teacher * (8192 - 1024)  # 2 of 8 layers keep KV (+ 1/16 for compressed keys)


# ----------------------------------------------------------------------------------------------------------
# Recipes


SMOLLM2 = ModelConfig(vocab_size=49152, d_model=576, num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
                      ffn_dim=1536, tie_embeddings=True)


@pytest.mark.parametrize("path", ["configs/sala_smollm2.yaml", "configs/sala_generic.yaml"])
def test_sala_recipes_load(path):
    """sala_smollm2.yaml is a complete train config (its recipe under student.attention), sala_generic.yaml a
    recipe (attention only)."""
    data = load_yaml(path)
    if "student" in data:
        TrainConfig.from_dict(data)
    student = student_config(SMOLLM2, recipe_attention(data))
    kinds = student.kinds
    sparse = [i for i, k in enumerate(kinds) if k == "sparse"]
    assert set(kinds) == {"sparse", "lightning"}
    assert sparse[0] == 0 and sparse[-1] == 29 and 7 <= len(sparse) <= 9  # about 1 in 4, first and last
    s = student.attention[0]
    # the official sparse (minicpm4) layers: no RoPE (attn_use_rope false), no QK-norm, output gate o_gate
    assert (s.rope, s.qk_norm, s.output_gate) == (False, False, True)
    assert (s.block_size, s.topk, s.kernel, s.stride, s.init_blocks, s.local_window, s.dense_below) == (
        64, 64, 32, 16, 1, 2048, 8192)
    lt = student.attention[kinds.index("lightning")]
    assert (lt.rope, lt.qk_norm, lt.output_norm, lt.output_gate) == (True, True, True, True)
    assert (lt.output_norm_per_head, lt.slopes) == (False, "alibi")  # the official o_norm and decay rule
    assert ModelConfig.from_dict(student.to_dict()) == student  # travels with a checkpoint


def test_sala_student_params_copy_the_teacher():
    teacher_cfg = tiny_config(num_layers=5)
    teacher = init_params(teacher_cfg, jax.random.key(0))
    student_cfg = student_config(teacher_cfg, load_yaml("configs/sala_generic.yaml")["attention"])
    assert student_cfg.kinds == ("sparse", "lightning", "lightning", "lightning", "sparse")
    params = student_params(student_cfg, teacher, jax.random.key(1))
    mask = new_param_mask(params, teacher)
    new = {path_name(p) for p, m in jax.tree_util.tree_flatten_with_path(mask)[0] if m}
    want = set()
    for i, kind in enumerate(student_cfg.kinds):
        names = ("o_gate/kernel", "o_gate/bias") if kind == "sparse" else (
            "q_norm/scale", "k_norm/scale", "o_norm/scale", "z_proj/kernel", "z_proj/bias")
        want |= {f"layers_{i}/attn/{n}" for n in names}
    assert new == want
    for i in range(5):
        for n in TEACHER_PROJECTIONS:
            np.testing.assert_array_equal(params[f"layers_{i}"]["attn"][n]["kernel"],
                                          teacher[f"layers_{i}"]["attn"][n]["kernel"])
    tokens = jnp.arange(40, dtype=jnp.int32)[None] % teacher_cfg.vocab_size
    assert bool(jnp.all(jnp.isfinite(Transformer(student_cfg).apply({"params": params}, tokens))))
