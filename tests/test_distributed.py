"""Star Attention and ring attention on 8 simulated CPU devices (tests/conftest.py): ops against global
attention, Star's phase 1 against a per-block single-device reference, generation against `generate._generate`,
agreement across 1, 2, 4 and 8 devices, and the input errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lizard_jax import ModelConfig
from lizard_jax.distributed import (
    context_attention, encode_context, generate_context_parallel, prefill_context_parallel, ring_attention,
    validate_context_parallel,
)
from lizard_jax.generate import SamplingConfig, _generate, left_pad
from lizard_jax.models import Transformer, init_caches, init_params
from lizard_jax.numerics import FORMS_RTOL, RTOL, assert_close, rel_err
from lizard_jax.ops.softmax import attention
from lizard_jax.sharding import make_mesh

CFG = ModelConfig(vocab_size=97, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, ffn_dim=64)


def mesh_of(n: int):
    return make_mesh({"context": n}, devices=jax.devices()[:n])


@pytest.fixture(scope="module")
def model_params():
    """A tiny GQA model whose q/k projections are scaled up so attention is sharp (results depend on which
    keys a query sees, so the comparisons below are not vacuous)."""
    params = init_params(CFG, jax.random.key(0))
    sharpen = lambda path, x: x * 12.0 if any(getattr(p, "key", None) in ("q_proj", "k_proj") for p in path) else x
    return Transformer(CFG), jax.tree_util.tree_map_with_path(sharpen, params)


def ragged_prompts(seed: int, lengths):
    rng = np.random.default_rng(seed)
    return left_pad([list(rng.integers(1, CFG.vocab_size, n)) for n in lengths], CFG.pad_token_id, bucket=16)


def qkv(key, b, t, h, kvh, d, s=None):
    kq, kk, kv = jax.random.split(key, 3)
    s = t if s is None else s
    return (jax.random.normal(kq, (b, t, h, d)), jax.random.normal(kk, (b, s, kvh, d)),
            jax.random.normal(kv, (b, s, kvh, d)))


# ------------------------------------------------------------------------------------------------------ ops


@pytest.mark.parametrize("n,b,t,h,kvh,d", [(8, 2, 37, 4, 2, 16), (4, 1, 101, 4, 4, 8), (2, 2, 64, 6, 2, 16),
                                          (1, 1, 19, 2, 1, 8)],
                         ids=lambda v: str(v))
def test_ring_attention_equals_global_causal(n, b, t, h, kvh, d):
    """Ring attention (zigzag, ppermute) == single-device causal attention, T not a multiple of the shards."""
    q, k, v = qkv(jax.random.key(t), b, t, h, kvh, d)
    out = jax.jit(lambda q, k, v: ring_attention(q, k, v, mesh=mesh_of(n)))(q, k, v)
    assert_close(out, attention(q, k, v, impl="xla"), rtol=FORMS_RTOL, name=f"ring n={n} T={t}")


@pytest.mark.parametrize("n", [2, 8])
def test_context_attention_equals_global(n):
    """Phase 2: per-device attention with (o, lse) merge == global attention of the query over the same KV,
    with empty slots, padding and a device holding no visible key."""
    b, t, h, kvh, d, per = 2, 3, 4, 2, 16, 12
    q, k, v = qkv(jax.random.key(n), b, t, h, kvh, d, s=n * per)
    rng = np.random.default_rng(n)
    k_pos = np.arange(n * per)[None].repeat(b, 0)
    k_pos[rng.random(k_pos.shape) < 0.3] = -1  # holes: padding / empty slots
    k_pos[0, :per] = -1  # device 0 sees nothing for row 0
    q_pos = np.array([[n * per, n * per + 1, n * per + 2], [5, n * per - 3, -1]])  # row 1: mid-context, padding
    k_pos, q_pos = jnp.asarray(k_pos, jnp.int32), jnp.asarray(q_pos, jnp.int32)
    o, lse = jax.jit(lambda *a: context_attention(*a, mesh=mesh_of(n)))(q, k, v, q_pos, k_pos)
    o_ref, lse_ref = attention(q, k, v, q_positions=q_pos, k_positions=k_pos, return_lse=True, impl="xla")
    assert_close(o, o_ref, rtol=FORMS_RTOL, name="o")
    finite = np.isfinite(np.asarray(lse_ref))
    assert np.array_equal(np.isfinite(np.asarray(lse)), finite)
    assert_close(np.asarray(lse)[finite], np.asarray(lse_ref)[finite], rtol=FORMS_RTOL, name="lse")


# ------------------------------------------------------------------------------------------------- phase 1


def block_reference(model, params, tokens, positions, block: int, anchor: int):
    """Per-layer KV `[B, C, KVH, D]` of Star's phase 1, one block at a time on one device with the normal
    KV cache (masks by position): block j is encoded as [anchor, block j] (block 0 alone), its own KV kept."""
    c = tokens.shape[1]
    # jitted (one compile per block length): op-by-op dispatch of the model is slow on CPU
    apply = jax.jit(lambda p, t, q: model.apply({"params": p}, t, q, init_caches(CFG, t.shape[0], t.shape[1])))
    ks = [[] for _ in range(CFG.num_layers)]
    vs = [[] for _ in range(CFG.num_layers)]
    for j in range(c // block):
        sl = slice(j * block, (j + 1) * block)
        pre = anchor if j and anchor else 0
        tok = jnp.concatenate([tokens[:, :pre], tokens[:, sl]], axis=1)
        pos = jnp.concatenate([positions[:, :pre], positions[:, sl]], axis=1)
        _, caches = apply(params, tok, pos)
        for i, cache in enumerate(caches):
            ks[i].append(cache.k[:, pre:])
            vs[i].append(cache.v[:, pre:])
    return [jnp.concatenate(x, axis=1) for x in ks], [jnp.concatenate(x, axis=1) for x in vs]


@pytest.mark.parametrize("n,block,anchor", [(4, 8, 8), (2, 8, 3), (4, 8, 0), (1, 16, 16)],
                         ids=lambda v: str(v))
def test_star_phase1_equals_block_reference(model_params, n, block, anchor):
    """Star phase 1 on n devices (several blocks per device, anchor prepended, block 0 not duplicated) ==
    the single-device reference of "anchor + local block" attention, on every real token of a ragged batch."""
    model, params = model_params
    c = 64
    rng = np.random.default_rng(block + anchor)
    tokens = jnp.asarray(rng.integers(1, CFG.vocab_size, (2, c)), jnp.int32)
    positions = np.arange(c)[None].repeat(2, 0)
    positions[1, 45:] = -1  # row 1: 45 real tokens, right-padded
    positions = jnp.asarray(positions, jnp.int32)
    caches = jax.jit(lambda p, t, q: encode_context(model, p, t, q, mode="star", mesh=mesh_of(n), block_size=block,
                                                    anchor_size=anchor))(params, tokens, positions)
    k_ref, v_ref = block_reference(model, params, tokens, positions, block, anchor)
    real = np.asarray(positions) >= 0
    for i, cache in enumerate(caches):
        assert np.array_equal(np.asarray(cache.pos), np.asarray(positions))
        assert_close(np.asarray(cache.k)[real], np.asarray(k_ref[i])[real], rtol=FORMS_RTOL, name=f"k layer {i}")
        assert_close(np.asarray(cache.v)[real], np.asarray(v_ref[i])[real], rtol=FORMS_RTOL, name=f"v layer {i}")


# ------------------------------------------------------------------------------------------- generation


def test_generation_star_one_block_and_ring_equal_normal_generation(model_params):
    """Star with one block (block >= context) and ring attention == `generate._generate`, token for token."""
    model, params = model_params
    tokens, positions = ragged_prompts(0, (150, 97))
    key = jax.random.key(1)
    kw = dict(max_new_tokens=10, sampling=SamplingConfig(), eos_ids=())
    ref = np.asarray(_generate(model, params, tokens, positions, key, cache_len=tokens.shape[1] + 10, **kw))
    assert len(set(ref[0].tolist())) > 2  # a non-degenerate continuation
    star = generate_context_parallel(model, params, tokens, positions, key, mode="star", mesh=mesh_of(4),
                                     block_size=256, query_size=8, **kw)
    np.testing.assert_array_equal(np.asarray(star), ref)
    ring = generate_context_parallel(model, params, tokens, positions, key, mode="ring", mesh=mesh_of(8),
                                     block_size=8, query_size=8, **kw)
    np.testing.assert_array_equal(np.asarray(ring), ref)


def test_devices_agree(model_params):
    """Prefill logits: ring == global attention on 1, 2, 4, 8 devices; Star with a fixed block layout is the
    same on 1, 2, 4, 8 devices and differs from global (its blocks do not see each other)."""
    model, params = model_params
    tokens, positions = ragged_prompts(1, (120, 77))
    logits = jax.jit(lambda p, t, q: model.apply({"params": p}, t, q))(params, tokens, positions)[:, -1]
    star = {}
    for n in (1, 2, 4, 8):
        mesh = mesh_of(n)
        caches, ring = prefill_context_parallel(model, params, tokens, positions, mode="ring", mesh=mesh,
                                                block_size=8, query_size=4)
        assert_close(ring, logits, rtol=RTOL["float32"], name=f"ring n={n}")
        caches, star[n] = prefill_context_parallel(model, params, tokens, positions, mode="star", mesh=mesh,
                                                   block_size=16, anchor_size=8, query_size=4, local=3)
        # only the query host (last shard) holds the query's KV
        pos = np.asarray(caches[0].pos).reshape(2, n, -1)
        assert (pos[:, :-1, -7:] == -1).all() and (pos[:, -1, -7:-3] >= 0).all() and (pos[:, -1, -3:] == -1).all()
        assert_close(star[n], star[1], rtol=RTOL["float32"], name=f"star n={n} vs n=1")
    assert rel_err(star[1], logits) > 1e-3


# ------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("kwargs,match", [
    (dict(mesh="data"), "needs a mesh with a 'context' axis"),
    (dict(mesh=None), "needs a mesh with a 'context' axis"),
    (dict(mode="ulysses"), "context_parallel must be one of"),
    (dict(mode="ring", block_size=7), "block_size must be divisible by 2"),
    (dict(block_size=8, anchor_size=16), "larger than a block"),
    (dict(anchor="none", anchor_size=4), "no anchor is used"),
    (dict(anchor="middle"), "anchor must be one of"),
    (dict(block_size=0), "block_size must be a positive int"),
    (dict(query_size=0), "query_size must be a positive int"),
    (dict(cfg_window=16), "full softmax attention in every layer"),
], ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}={x}" for k, x in v.items()))
def test_bad_inputs(kwargs, match):
    kwargs = dict(kwargs)
    mesh = kwargs.pop("mesh", "context")
    mesh = None if mesh is None else make_mesh({mesh: 2}, devices=jax.devices()[:2])
    window = kwargs.pop("cfg_window", None)
    cfg = CFG if window is None else CFG.replace(attention={"kind": "softmax", "window": window})
    opts = dict(mode="star") | kwargs
    with pytest.raises(ValueError, match=match):
        validate_context_parallel(mesh, cfg, **opts)


def test_encode_context_errors(model_params):
    model, params = model_params
    tokens = jnp.ones((1, 40), jnp.int32)
    positions = jnp.arange(40, dtype=jnp.int32)[None]
    with pytest.raises(ValueError, match="not a multiple of block_size x devices"):
        encode_context(model, params, tokens, positions, mode="star", mesh=mesh_of(4), block_size=8, anchor_size=8)
    with pytest.raises(ValueError, match=r"anchor_size=9 must be in \[0, block_size=8\]"):
        encode_context(model, params, tokens, positions, mode="star", mesh=mesh_of(1), block_size=8, anchor_size=9)


# ------------------------------------------------------------------------------- the query given separately


def split_batch(seed: int, splits):
    """Rows (context, query) of the given lengths -> (full prompt ids, left-padded context tokens/positions,
    query tokens/positions continuing each context) as `generate(..., query=)` builds them."""
    from lizard_jax.generate import query_arrays

    rng = np.random.default_rng(seed)
    ctx = [list(map(int, rng.integers(1, CFG.vocab_size, c))) for c, _ in splits]
    qry = [list(map(int, rng.integers(1, CFG.vocab_size, q))) for _, q in splits]
    tokens, positions = left_pad(ctx, CFG.pad_token_id, bucket=16)
    q_tok, q_pos = query_arrays(ctx, qry, CFG.pad_token_id)
    return [c + q for c, q in zip(ctx, qry)], tokens, positions, q_tok, q_pos


@pytest.mark.parametrize("splits", [((150, 1), (97, 40)), ((30, 120), (100, 7)), ((1, 60), (64, 64))],
                         ids=["q1-q40", "q120-q7", "ctx1-q64"])
def test_star_one_block_any_split_equals_global(model_params, splits):
    """Star with one block covering the context == plain generation of context + query, wherever the split is
    (a one-token query, a query longer than query_size, a one-token context), ragged rows with different splits."""
    model, params = model_params
    full, tokens, positions, q_tok, q_pos = split_batch(sum(map(sum, splits)), splits)
    ref_tok, ref_pos = left_pad(full, CFG.pad_token_id, bucket=16)
    key = jax.random.key(1)
    kw = dict(max_new_tokens=8, sampling=SamplingConfig(), eos_ids=())
    ref = np.asarray(_generate(model, params, ref_tok, ref_pos, key, cache_len=ref_tok.shape[1] + 8, **kw))
    star = generate_context_parallel(model, params, tokens, positions, key, mode="star", mesh=mesh_of(4),
                                     block_size=256, query_size=4, query_tokens=q_tok, query_positions=q_pos, **kw)
    np.testing.assert_array_equal(np.asarray(star), ref)


def test_split_is_honoured(model_params):
    """A query longer than query_size is entirely phase 2: its KV sits on the query host only and the context
    shards hold exactly the context; with several blocks and an anchor, each row equals the default split
    (`query_size` = that row's query length) of its own prompt, and differs from the default query_size."""
    model, params = model_params
    splits = ((70, 20), (45, 9))
    full, tokens, positions, q_tok, q_pos = split_batch(3, splits)
    kw = dict(mode="star", mesh=mesh_of(2), block_size=16, anchor_size=8)
    caches, logits = prefill_context_parallel(model, params, tokens, positions, query_size=4, local=2,
                                              query_tokens=q_tok, query_positions=q_pos, **kw)
    pos = np.asarray(caches[0].pos).reshape(2, 2, -1)  # [B, device, slots]
    q = q_tok.shape[1]
    local = pos[:, :, -(q + 2):]
    for row, (c, n) in enumerate(splits):
        assert sorted(pos[row][pos[row] >= 0].tolist()) == list(range(c + n))
        assert (local[row, 0] == -1).all()
        assert sorted(local[row, 1][local[row, 1] >= 0].tolist()) == list(range(c, c + n)), "query not in phase 2"
        assert pos[row, :, :-(q + 2)].max() == c - 1, "a query token was encoded block-locally"
        one_tok, one_pos = left_pad([full[row]], CFG.pad_token_id, bucket=16)
        _, want = prefill_context_parallel(model, params, one_tok, one_pos, query_size=n, **kw)
        assert_close(logits[row], want[0], rtol=RTOL["float32"], name=f"row {row} vs default split")
        _, default = prefill_context_parallel(model, params, one_tok, one_pos, query_size=4, **kw)
        assert rel_err(default[0], want[0]) > 1e-3, "the split made no difference: the test is vacuous"


def test_query_errors(model_params):
    model, params = model_params
    _, tokens, positions, q_tok, q_pos = split_batch(0, ((20, 5), (12, 3)))
    kw = dict(mode="star", mesh=mesh_of(2), block_size=16, max_new_tokens=2)
    cases = [
        (dict(query_tokens=q_tok), "give both or neither"),
        (dict(query_tokens=q_tok.astype(jnp.float32), query_positions=q_pos), "query_tokens must hold integers"),
        (dict(query_tokens=q_tok[:1], query_positions=q_pos[:1]), r"\[batch, query\] with the prompt's batch 2"),
        (dict(query_tokens=q_tok, query_positions=q_pos[:, 1:]), r"\[batch, query\]"),
        (dict(query_tokens=q_tok, query_positions=q_pos.at[1].set(-1)), "query of row 1 is empty"),
        (dict(query_tokens=q_tok, query_positions=q_pos + 1), "continuing its context of 20 tokens"),
    ]
    for extra, match in cases:
        with pytest.raises(ValueError, match=match):
            generate_context_parallel(model, params, tokens, positions, jax.random.key(0), **kw, **extra)
