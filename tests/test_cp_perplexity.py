"""Perplexity through the context-parallel prefill (`distributed.score_context_parallel`, eval.py perplexity
--context-parallel) on simulated CPU devices (tests/conftest.py): one block and ring attention == global scoring;
Star's phase-1 and phase-2 log-probs against an independent construction with the plain model (one forward per
[anchor, block], and the last block through a normal KV cache holding those blocks' KV); devices agree; errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lizard_jax import ModelConfig
from lizard_jax.distributed import score_context_parallel
from lizard_jax.eval.perplexity import token_logprobs
from lizard_jax.layers.common import KVCache
from lizard_jax.models import Transformer, init_caches, init_params
from lizard_jax.numerics import assert_close, rel_err
from lizard_jax.sharding import make_mesh

CFG = ModelConfig(vocab_size=97, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, ffn_dim=64)
T = 64
LENGTHS = (64, 45)  # row 1: a short last window (right-padded), its query block is block 2 of 4 at block 16


def mesh_of(n: int):
    return make_mesh({"context": n}, devices=jax.devices()[:n])


@pytest.fixture(scope="module")
def model_params():
    """A tiny GQA model with sharp attention (q/k scaled up), so which keys a token sees matters."""
    params = init_params(CFG, jax.random.key(0))
    sharpen = lambda path, x: x * 12.0 if any(getattr(p, "key", None) in ("q_proj", "k_proj") for p in path) else x
    return Transformer(CFG), jax.tree_util.tree_map_with_path(sharpen, params)


@pytest.fixture(scope="module")
def windows():
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, CFG.vocab_size, (len(LENGTHS), T)).astype(np.int32)
    for row, n in enumerate(LENGTHS):
        tokens[row, n:] = 0
    return tokens, np.array(LENGTHS)


def scored(lengths):
    """[B, T-1] mask of the predictions that count (targets 1..length-1)."""
    return np.arange(1, T)[None] < np.asarray(lengths)[:, None]


def test_one_block_and_ring_equal_global(model_params, windows):
    """One block per window (Star, any anchor) and ring attention (exact) score as global attention does."""
    model, params = model_params
    tokens, lengths = windows
    ref = np.asarray(token_logprobs(model, params, jnp.asarray(tokens))[0])
    m = scored(lengths)
    for kw in (dict(mode="star", mesh=mesh_of(1), block_size=T), dict(mode="star", mesh=mesh_of(1), anchor="none"),
               dict(mode="ring", mesh=mesh_of(2), block_size=16), dict(mode="ring", mesh=mesh_of(4))):
        got = np.asarray(score_context_parallel(model, params, tokens, lengths, **kw))
        assert_close(got[m], ref[m], rtol=1e-5, name=str(kw))


def plain_reference(model, params, tokens, length: int, block: int, anchor: int):
    """log p of one row `[T-1]` built from plain forwards (masks by position, the normal KV cache): positions in
    block j < the query block from the model over [anchor tokens, block j] (block 0 alone); the query block (the
    one holding prediction length-2) from the model over that block with a KVCache holding the earlier blocks'
    KV of those forwards."""
    apply = jax.jit(lambda p, t, q: model.apply({"params": p}, t, q, init_caches(CFG, 1, t.shape[1])))
    start = (length - 2) // block * block
    pos = np.arange(T, dtype=np.int32)[None]
    tok = tokens[None]
    logits, ks, vs = [], [[] for _ in range(CFG.num_layers)], [[] for _ in range(CFG.num_layers)]
    for j in range(start // block):
        pre = anchor if j and anchor else 0
        idx = np.r_[np.arange(pre), np.arange(j * block, (j + 1) * block)]
        out, caches = apply(params, jnp.asarray(tok[:, idx]), jnp.asarray(pos[:, idx]))
        logits.append(out[:, pre:])
        for i, c in enumerate(caches):
            ks[i].append(c.k[:, pre:pre + block])
            vs[i].append(c.v[:, pre:pre + block])
    caches = []
    for i in range(CFG.num_layers):
        fresh = KVCache.create(1, start + block, CFG.num_kv_heads, CFG.head_dim, jnp.float32)
        if start:
            fresh = fresh.update(jnp.concatenate(ks[i], 1), jnp.concatenate(vs[i], 1), jnp.asarray(pos[:, :start]))[0]
        caches.append(fresh)
    q = slice(start, start + block)
    out, _ = jax.jit(lambda p, t, q, c: model.apply({"params": p}, t, q, c))(
        params, jnp.asarray(tok[:, q]), jnp.asarray(pos[:, q]), tuple(caches))
    logits = jnp.concatenate(logits + [out], axis=1)[0, :T - 1]  # up to the query block's end
    logp = jax.nn.log_softmax(logits, axis=-1)
    logp = np.asarray(jnp.take_along_axis(logp, jnp.asarray(tokens[1:len(logp) + 1, None]), axis=-1)[:, 0])
    return np.pad(logp, (0, T - 1 - len(logp)))  # predictions after the query block are not scored


@pytest.mark.parametrize("n,block,anchor", [(2, 16, 8), (2, 16, 0), (1, 16, 4)], ids=lambda v: str(v))
def test_star_equals_plain_reference(model_params, windows, n, block, anchor):
    """Star scoring (several blocks per device) == the plain-model construction, row by row, on every scored
    token; and it is not global scoring (the blocks do not see each other in phase 1)."""
    model, params = model_params
    tokens, lengths = windows
    kw = dict(anchor="first", anchor_size=anchor) if anchor else dict(anchor="none")
    got = np.asarray(score_context_parallel(model, params, tokens, lengths, mode="star", mesh=mesh_of(n),
                                            block_size=block, **kw))
    m = scored(lengths)
    for row, length in enumerate(lengths):
        ref = plain_reference(model, params, tokens[row], int(length), block, anchor)
        assert_close(got[row][m[row]], ref[m[row]], rtol=1e-5, name=f"row {row}")
    glob = np.asarray(token_logprobs(model, params, jnp.asarray(tokens))[0])
    assert rel_err(got[m], glob[m]) > 1e-3


def test_devices_agree(model_params, windows):
    """The same block layout on 1, 2 and 4 devices gives the same log-probs."""
    model, params = model_params
    tokens, lengths = windows
    kw = dict(mode="star", block_size=16, anchor_size=8)
    one = np.asarray(score_context_parallel(model, params, tokens, lengths, mesh=mesh_of(1), **kw))
    for n in (2, 4):
        got = np.asarray(score_context_parallel(model, params, tokens, lengths, mesh=mesh_of(n), **kw))
        assert_close(got[scored(lengths)], one[scored(lengths)], rtol=1e-5, name=f"n={n}")


@pytest.mark.parametrize("kw,match", [
    (dict(n=2, block_size=24), r"seq_len 64 is not a multiple of block_size x devices = 24 x 2"),
    (dict(n=8, block_size=16), r"seq_len 64 is not a multiple of block_size x devices = 16 x 8"),
    (dict(n=1, block_size=16, anchor_size=17), "larger than a block"),
    (dict(n=4, anchor_size=17), "larger than a block"),  # the default block: 64 / 4
    (dict(n=1, anchor="none", anchor_size=4), "no anchor is used"),
    (dict(n=2, mode="ring", block_size=7), "divisible by 2"),
], ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}={x}" for k, x in v.items()))
def test_bad_inputs(model_params, kw, match):
    model, params = model_params
    kw = dict(mode="star") | kw
    mesh = mesh_of(kw.pop("n"))
    with pytest.raises(ValueError, match=match):
        score_context_parallel(model, params, np.ones((1, T), np.int32), mesh=mesh, **kw)


def test_eval_cli(tmp_path, capsys):
    """eval.py perplexity --context-parallel: one block and ring == the global perplexity, Star with blocks
    differs and reports its settings; bad flags are one-line errors."""
    import json

    import eval as eval_py
    from lizard_jax.testing import cli_error, save_tiny_teacher

    teacher, text = tmp_path / "teacher", tmp_path / "text.txt"
    save_tiny_teacher(teacher, num_layers=2)
    text.write_text("The quick brown fox jumps over the lazy dog. " * 8)  # 360 characters: 5 windows of 64 + 40

    def ppl(*extra):
        capsys.readouterr()
        assert eval_py.main([str(a) for a in ("perplexity", "--checkpoint", teacher, "--text", text, "--seq-len", 64,
                                              *extra)]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    base = ppl()
    one = ppl("--context-parallel", "star", "--devices", 1)
    ring = ppl("--context-parallel", "ring", "--devices", 2, "--block-size", 16)
    star = ppl("--context-parallel", "star", "--devices", 2, "--block-size", 16, "--anchor-size", 8)
    for r in (one, ring, star):
        assert r["tokens"] == base["tokens"] == 359 - 5
    assert abs(one["perplexity"] / base["perplexity"] - 1) < 1e-5
    assert abs(ring["perplexity"] / base["perplexity"] - 1) < 1e-5
    assert abs(star["perplexity"] / base["perplexity"] - 1) > 1e-4
    assert star["context_parallel"] == {"mode": "star", "devices": 2, "block_size": 16, "blocks": 4,
                                        "blocks_per_device": 2, "anchor": "first", "anchor_size": 8}
    args = ["perplexity", "--checkpoint", teacher, "--text", text, "--seq-len", 64]
    cli_error(capsys, eval_py.main, [*args, "--block-size", 16], "--block-size need.* --context-parallel")
    cli_error(capsys, eval_py.main, [*args, "--context-parallel", "star", "--devices", 1, "--block-size", 48],
              "seq_len 64 is not a multiple of block_size x devices = 48 x 1")
    cli_error(capsys, eval_py.main, [*args, "--context-parallel", "star", "--devices", 1, "--block-size", 16,
                                     "--anchor-size", 32], "larger than a block")
