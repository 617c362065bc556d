"""lizard_jax.ops.sparse: the block-sparse spec, its gather form, InfLLM-V2 selection and the dispatch."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lizard_jax.numerics import FORMS_RTOL, assert_close
from lizard_jax.ops.sparse import (
    InfLLMConfig,
    block_scores,
    block_sparse_attention,
    block_sparse_attention_reference,
    block_sparse_attention_xla,
    check_block_indices,
    compress_keys,
    dense_attention,
    infllm_attention,
    infllm_select,
    infllm_select_decode,
    num_compressed,
    visible_mask,
)
from pallas_kernels.block_sparse import oracle

# (batch, seq_q, seq_k, heads, kv_heads, d, block_size, max_blocks, causal)
SHAPES = [
    (1, 48, 48, 2, 2, 16, 16, 2, True),  # GQA 1
    (2, 50, 50, 6, 2, 16, 16, 3, True),  # GQA 3, ragged, batch 2
    (1, 40, 40, 8, 1, 8, 8, 3, True),  # GQA 8
    (2, 30, 30, 4, 2, 8, 8, 3, False),  # non-causal
    (1, 9, 37, 4, 2, 8, 8, 3, True),  # decoding-like, q_offset 28
]


def sid(s):
    b, tq, tk, h, kv, d, bs, m, c = s
    return f"B{b}-T{tq}x{tk}-H{h}-KV{kv}-D{d}-bs{bs}-{'causal' if c else 'full'}-fp32"


def inputs(shape, seed):
    batch, seq_q, seq_k, heads, kv_heads, d, bs, max_blocks, causal = shape
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((batch, seq_q, heads, d)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((batch, seq_k, kv_heads, d)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((batch, seq_k, kv_heads, d)), jnp.float32)
    idx, cnt = oracle.random_selection(rng, batch, kv_heads, seq_q, seq_k, bs, max_blocks, causal=causal)
    return q, k, v, jnp.asarray(idx), jnp.asarray(cnt)


# ------------------------------------------------------------------------------- spec and gather form


def test_visible_mask_matches_definition():
    rng = np.random.default_rng(0)
    seq_q, seq_k, bs, q_offset = 11, 29, 4, 18
    idx, cnt = oracle.random_selection(rng, 1, 1, seq_q, seq_k, bs, 4, causal=False, p_empty=0.2)
    mask = np.asarray(visible_mask(jnp.asarray(idx), jnp.asarray(cnt), seq_q=seq_q, seq_k=seq_k, block_size=bs,
                                   causal=True, q_offset=q_offset))[0, 0]
    for i in range(seq_q):
        listed = set(idx[0, 0, i // bs, : cnt[0, 0, i // bs]].tolist())
        for j in range(seq_k):
            assert mask[i, j] == ((j // bs in listed) and j <= i + q_offset), (i, j)


@pytest.mark.parametrize("shape", SHAPES, ids=sid)
def test_reference_vs_oracle(shape):
    """The spec itself against the independent float64 oracle (forward, lse)."""
    q, k, v, idx, cnt = inputs(shape, 1)
    bs, causal = shape[6], shape[8]
    o, lse = block_sparse_attention_reference(q, k, v, idx, cnt, block_size=bs, causal=causal, return_lse=True)
    o_r, lse_r = oracle.attention(q, k, v, idx, cnt, block_size=bs, causal=causal)
    assert np.array_equal(np.isinf(lse), np.isinf(lse_r))
    assert_close(o, o_r, dtype="float32", name="o")
    assert_close(np.where(np.isinf(lse_r), 0, lse), np.where(np.isinf(lse_r), 0, lse_r), dtype="float32")


@pytest.mark.parametrize("shape", SHAPES, ids=sid)
def test_gather_form_equals_mask_form(shape):
    q, k, v, idx, cnt = inputs(shape, 2)
    bs, causal = shape[6], shape[8]
    kw = dict(block_size=bs, causal=causal, return_lse=True)
    o_m, lse_m = block_sparse_attention_reference(q, k, v, idx, cnt, **kw)
    o_g, lse_g = block_sparse_attention_xla(q, k, v, idx, cnt, **kw)
    empty = np.isinf(lse_m)
    assert np.array_equal(empty, np.isinf(lse_g))
    assert_close(o_g, o_m, rtol=FORMS_RTOL, name="o")
    assert_close(np.where(empty, 0, lse_g), np.where(empty, 0, lse_m), rtol=FORMS_RTOL, name="lse")

    rng = np.random.default_rng(3)
    do = jnp.asarray(rng.standard_normal(o_m.shape), jnp.float32)
    dlse = jnp.asarray(np.where(empty, 0, rng.standard_normal(lse_m.shape)), jnp.float32)

    def loss(fn):
        def f(q, k, v):
            o, lse = fn(q, k, v, idx, cnt, **kw)
            return jnp.sum(o * do) + jnp.sum(jnp.where(empty, 0.0, lse) * dlse)
        return jax.grad(f, argnums=(0, 1, 2))(q, k, v)

    for name, g_g, g_m in zip(("dq", "dk", "dv"), loss(block_sparse_attention_xla),
                              loss(block_sparse_attention_reference)):
        assert_close(g_g, g_m, rtol=FORMS_RTOL, name=name)


@pytest.mark.parametrize("form", [block_sparse_attention_reference, block_sparse_attention_xla])
def test_zero_counts_give_zero(form):
    q, k, v, idx, _ = inputs(SHAPES[1], 4)
    cnt = jnp.zeros(idx.shape[:3], jnp.int32)
    o, lse = form(q, k, v, idx, cnt, block_size=16, return_lse=True)
    assert np.all(np.asarray(o) == 0) and np.all(np.asarray(lse) == -np.inf)
    g = jax.grad(lambda q: form(q, k, v, idx, cnt, block_size=16).sum())(q)
    assert np.all(np.asarray(g) == 0)


def test_partially_visible_diagonal_block():
    """Only the diagonal block selected: row i of a block sees keys blockstart..i exactly."""
    batch, seq, heads, d, bs = 1, 24, 2, 8, 8
    rng = np.random.default_rng(5)
    q, k, v = (jnp.asarray(rng.standard_normal((batch, seq, heads, d)), jnp.float32) for _ in range(3))
    idx = jnp.arange(seq // bs, dtype=jnp.int32).reshape(1, 1, -1, 1).repeat(heads, axis=1)
    cnt = jnp.ones((batch, heads, seq // bs), jnp.int32)
    o = block_sparse_attention_xla(q, k, v, idx, cnt, block_size=bs)
    for i in range(seq):
        lo = (i // bs) * bs
        s = np.einsum("hd,khd->hk", q[0, i], k[0, lo : i + 1]) / np.sqrt(d)
        p = np.exp(s - s.max(-1, keepdims=True))
        want = np.einsum("hk,khd->hd", p / p.sum(-1, keepdims=True), v[0, lo : i + 1])
        assert_close(o[0, i], want, dtype="float32", name=f"row {i}")


def test_causality_through_gradients():
    """A loss on position t has zero gradient w.r.t. keys and values after t, whatever is selected."""
    batch, seq, heads, d, bs = 1, 32, 2, 8, 8
    rng = np.random.default_rng(6)
    q, k, v = (jnp.asarray(rng.standard_normal((batch, seq, heads, d)), jnp.float32) for _ in range(3))
    n = seq // bs
    idx = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (batch, heads, n, n))
    cnt = jnp.full((batch, heads, n), n, jnp.int32)  # every block listed, even future ones
    for t in (0, 9, 17, 31):
        gk, gv = jax.grad(lambda k, v: block_sparse_attention_xla(q, k, v, idx, cnt, block_size=bs)[:, t].sum(),
                          argnums=(0, 1))(k, v)
        assert np.all(np.asarray(gk)[:, t + 1 :] == 0) and np.all(np.asarray(gv)[:, t + 1 :] == 0)


def test_check_block_indices():
    check_block_indices(np.array([[[[0, 2, 2]]]]), np.array([[[2]]]), 3)  # past the count: ignored
    with pytest.raises(ValueError, match="twice"):
        check_block_indices(np.array([[[[1, 1]]]]), np.array([[[2]]]), 3)
    with pytest.raises(ValueError, match="lie in"):
        check_block_indices(np.array([[[[3]]]]), np.array([[[1]]]), 3)
    with pytest.raises(ValueError, match="block_counts"):
        check_block_indices(np.array([[[[0]]]]), np.array([[[2]]]), 3)


# ------------------------------------------------------------------------------------------ dispatch


def test_dispatch():
    q, k, v, idx, cnt = inputs(SHAPES[1], 7)
    with pytest.raises(ValueError, match="unknown impl"):
        block_sparse_attention(q, k, v, idx, cnt, block_size=16, impl="cuda")
    with pytest.raises(ValueError, match="twice"):
        block_sparse_attention(q, k, v, idx.at[0, 0, 3, :2].set(0), cnt.at[0, 0, 3].set(2), block_size=16)
    ref = block_sparse_attention_xla(q, k, v, idx, cnt, block_size=16)
    auto = block_sparse_attention(q, k, v, idx, cnt, block_size=16)  # CPU: the gather form
    assert np.array_equal(auto, ref)
    pallas = block_sparse_attention(q, k, v, idx, cnt, block_size=16, impl="pallas")  # interpret mode
    assert_close(pallas, ref, dtype="float32")
    jitted = jax.jit(lambda *a: block_sparse_attention(*a, block_size=16, impl="xla"))(q, k, v, idx, cnt)
    assert_close(jitted, ref, rtol=FORMS_RTOL)


# ----------------------------------------------------------------------------------------- selection


def test_compress_keys():
    rng = np.random.default_rng(8)
    k = rng.standard_normal((2, 77, 3, 4)).astype(np.float32)
    for kernel, stride in ((32, 16), (8, 4), (6, 4)):
        out = np.asarray(compress_keys(jnp.asarray(k), kernel, stride))
        n = num_compressed(77, kernel, stride)
        want = np.stack([k[:, c * stride : c * stride + kernel].mean(1) for c in range(n)], axis=1)
        assert out.shape == (2, n, 3, 4)
        assert_close(out, want, dtype="float32")
    assert compress_keys(jnp.asarray(k[:, :5]), 8, 4).shape == (2, 0, 3, 4)


SEL = dict(block_size=16, topk=3, kernel=8, stride=4, init_blocks=1, local_window=32)


def _select_inputs(seed, seq=200, heads=4, kv_heads=2, d=8):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((2, seq, heads, d)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((2, seq, kv_heads, d)), jnp.float32)
    return q, k


def test_selection_invariants():
    q, k = _select_inputs(9)
    idx, cnt = infllm_select(q, k, **SEL)
    idx, cnt = np.asarray(idx), np.asarray(cnt)
    n_qb, n_local = idx.shape[2], SEL["local_window"] // SEL["block_size"]
    assert idx.shape == (2, 2, n_qb, SEL["topk"] + n_local) and idx.dtype == np.int32
    check_block_indices(idx, cnt, n_qb)  # in range, no duplicates
    for b in range(2):
        for h in range(2):
            for i in range(n_qb):
                chosen = set(idx[b, h, i, : cnt[b, h, i]].tolist())
                assert max(chosen) <= i, "future block chosen"
                assert 0 in chosen, "initial block missing"
                assert set(range(max(0, i - n_local + 1), i + 1)) <= chosen, "local block missing"
                assert cnt[b, h, i] == min(i + 1, SEL["topk"] + n_local)
                assert list(idx[b, h, i, : cnt[b, h, i]]) == sorted(chosen)


def test_selection_deterministic_and_shared_in_group():
    q, k = _select_inputs(10)
    a = infllm_select(q, k, **SEL)
    b = infllm_select(q, k, **SEL)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    # the choice belongs to the kv head: permuting the query heads within each group changes nothing
    perm = jnp.array([1, 0, 3, 2])
    c = infllm_select(q[:, :, perm], k, **SEL)
    assert all(np.array_equal(x, y) for x, y in zip(a, c))
    # ties (constant keys: every block scores the same) go to the lower index
    idx, cnt = infllm_select(q, jnp.ones_like(k), **SEL)
    i = idx.shape[2] - 1
    n_local = SEL["local_window"] // SEL["block_size"]
    assert list(np.asarray(idx)[0, 0, i]) == [0, 1, 2] + list(range(i - n_local + 1, i + 1))


def test_selection_prefers_high_scores():
    """A key block made to match the queries is chosen everywhere it is in the past."""
    q, k = _select_inputs(11)
    target = 5  # block 5 = keys 80..95
    k = k.at[:, 80:96].set(jnp.mean(q, axis=(1,)).reshape(2, 1, 2, 2, 8).mean(3) * 30)
    idx, cnt = infllm_select(q, k, **SEL)
    for i in range(target + 1, idx.shape[2]):
        assert target in set(np.asarray(idx)[0, 0, i, : np.asarray(cnt)[0, 0, i]].tolist())


def test_block_scores_are_softmax_mass():
    """Summed over key blocks (windows not double counted when kernel == stride == block), the scores of a
    query block are its rows' total softmax mass x heads in the group."""
    q, k = _select_inputs(12, seq=64)
    k_cmp = compress_keys(k, 16, 16)
    s = block_scores(q, k_cmp, seq_k=64, block_size=16, kernel=16, stride=16, causal=False)
    assert_close(s.sum(-1), np.full(s.shape[:3], 16 * 2.0), dtype="float32")


def test_decode_selection_matches_prefill():
    q, k = _select_inputs(13, seq=150)
    full_idx, full_cnt = infllm_select(q, k, **SEL)
    for n_new in (1, 3):
        idx, cnt = infllm_select_decode(q[:, -n_new:], compress_keys(k, SEL["kernel"], SEL["stride"]),
                                        seq_k=150, **SEL)
        # one query block covering the last n_new rows; prefill's last block covers more rows (different
        # aggregate), so compare with prefill on exactly those rows
        ref_idx, ref_cnt = infllm_select(q[:, -n_new:], k, q_offset=150 - n_new, **SEL)
        assert np.array_equal(idx, ref_idx) and np.array_equal(cnt, ref_cnt)
        assert int(cnt[0, 0, 0]) == min(150 // 16 + 1, SEL["topk"] + 2)
        assert set(np.asarray(idx)[0, 0, 0, : cnt[0, 0, 0]].tolist()) >= {0, 8, 9}
    assert full_idx.shape[2] == 10


def test_topk_covering_all_blocks_is_dense():
    q, k = _select_inputs(14, seq=90)
    v = jnp.asarray(np.random.default_rng(15).standard_normal(k.shape), jnp.float32)
    idx, cnt = infllm_select(q, k, block_size=16, topk=6, kernel=8, stride=4, local_window=0)
    o = block_sparse_attention_xla(q, k, v, idx, cnt, block_size=16)
    assert_close(o, dense_attention(q, k, v, causal=True), rtol=FORMS_RTOL)


def test_infllm_attention_dense_below_threshold_and_sparse_above():
    q, k = _select_inputs(16, seq=96)
    v = jnp.asarray(np.random.default_rng(17).standard_normal(k.shape), jnp.float32)
    cfg = InfLLMConfig(block_size=16, topk=2, kernel=8, stride=4, local_window=16, dense_below=97)
    assert np.array_equal(infllm_attention(q, k, v, config=cfg), dense_attention(q, k, v, causal=True))
    cfg = InfLLMConfig(block_size=16, topk=2, kernel=8, stride=4, local_window=16, dense_below=96)
    o = infllm_attention(q, k, v, config=cfg)
    idx, cnt = infllm_select(q, k, block_size=16, topk=2, kernel=8, stride=4, local_window=16)
    assert np.array_equal(o, block_sparse_attention_xla(q, k, v, idx, cnt, block_size=16))
    g = jax.grad(lambda q: infllm_attention(q, k, v, config=cfg).sum())(q)  # selection carries no gradient
    assert np.all(np.isfinite(g))
    with pytest.raises(ValueError, match="topk"):
        InfLLMConfig(topk=0)


def test_dense_attention_bf16_close():
    q, k = _select_inputs(18, seq=40)
    o32 = dense_attention(q, k, k)
    o16 = dense_attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), k.astype(jnp.bfloat16))
    assert o16.dtype == jnp.bfloat16
    assert_close(o16.astype(jnp.float32), o32, dtype="bfloat16")  # a bf16 computation: its floor


# ------------------------------------------------------------------ kernel design and tiles from the spec


def test_op_passes_variant_and_block_sizes():
    """``variant`` / ``block_sizes`` reach the Pallas kernel (a bad design is the kernel's error; v2 with
    explicit tiles equals the gather form, gradients included) and are ignored by impl "xla"."""
    from pallas_kernels.block_sparse import BlockSizes

    q, k, v, idx, cnt = inputs(SHAPES[1], 8)
    with pytest.raises(ValueError, match="variant"):
        block_sparse_attention(q, k, v, idx, cnt, block_size=16, impl="pallas", variant="v9")
    bsz = BlockSizes(block_q=8, block_q_dq=16, block_q_dkv=8, kv_step=2, kv_step_dq=2)
    loss = lambda impl, **kw: lambda q, k, v: jnp.sum(
        block_sparse_attention(q, k, v, idx, cnt, block_size=16, impl=impl, **kw) ** 2)
    got = jax.value_and_grad(loss("pallas", variant="v2", block_sizes=bsz), argnums=(0, 1, 2))(q, k, v)
    want = jax.value_and_grad(loss("xla", variant="v2", block_sizes=bsz), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert_close(a, b, dtype="float32")


def test_sparse_layer_reaches_the_kernel_design(monkeypatch):
    """A SparseSpec with variant "v2" and its own tiles, loaded from a YAML-like dict, runs through the SALA
    sparse layer with impl "pallas" (interpret mode), reaches the kernel with them, and equals impl "xla"."""
    import dataclasses

    import flax.linen as nn

    from lizard_jax.config import ConfigError, spec_from_any
    from lizard_jax.layers.sparse import SparseAttention
    from lizard_jax.testing import randomize, tiny_config
    from pallas_kernels.block_sparse import BlockSizes, attention

    tiles = dict(block_q=8, block_q_dq=8, block_q_dkv=8)
    spec = spec_from_any(dict(kind="sparse", block_size=16, topk=2, kernel=8, stride=4, local_window=16,
                              dense_below=0, impl="pallas", variant="v2", block_sizes=tiles))
    assert spec.variant == "v2" and spec.block_sizes == BlockSizes(**tiles)
    assert spec.infllm.variant == "v2" and spec.infllm.block_sizes == BlockSizes(**tiles)
    with pytest.raises(ConfigError, match="block_q_dk"):  # unknown keys inside block_sizes are rejected too
        spec_from_any(dict(kind="sparse", block_sizes=dict(tiles, block_q_dk=8)))
    with pytest.raises(ConfigError, match="variant"):
        spec_from_any(dict(kind="sparse", variant="v3"))

    seen = []
    kernel = attention.block_sparse_attention
    monkeypatch.setattr(attention, "block_sparse_attention",
                        lambda *a, **kw: seen.append((kw["variant"], kw["block_sizes"])) or kernel(*a, **kw))
    cfg = tiny_config()
    x = jax.random.normal(jax.random.key(3), (1, 40, cfg.d_model), jnp.float32)
    outs = []
    for s in (spec, dataclasses.replace(spec, impl="xla")):
        layer = SparseAttention(cfg, s)
        params = randomize(nn.unbox(layer.init(jax.random.key(0), x[:, :4])["params"]), jax.random.key(1))
        outs.append(jax.jit(layer.apply)({"params": params}, x)[0])  # jitted: eager dispatch cost ~10 s
    assert seen and all(s == ("v2", BlockSizes(**tiles)) for s in seen)
    assert_close(outs[0], outs[1], dtype="float32")


# ------------------------------------------------------------------------------------ packed documents (#19)

PACK_CFG = InfLLMConfig(block_size=16, topk=2, kernel=8, stride=4, local_window=16, dense_below=40)
# 70 and 75: long (>= dense_below: sparse alone), starting at multiples of 16; 1, 9, 9: short (dense alone),
# ragged; a document of length 1; 4 tokens of padding (its own segment) at the end
PACK_DOCS = (70, 1, 9, 75, 9)
PACK_PAD = 4


def packed_ids(lengths, pad):
    seg = np.concatenate([np.full(n, i, np.int32) for i, n in enumerate(lengths)] +
                         [np.full(pad, len(lengths), np.int32)])
    return jnp.asarray(seg)[None]


def _pack_inputs(seed, heads=4, kv_heads=2, d=8):
    t = sum(PACK_DOCS) + PACK_PAD
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (1, t, heads, d))
    k = jax.random.normal(ks[1], (1, t, kv_heads, d))
    v = jax.random.normal(ks[2], (1, t, kv_heads, d))
    w = jax.random.normal(ks[3], (1, t, heads, d)).at[:, sum(PACK_DOCS):].set(0.0)  # padding outputs ignored
    return q, k, v, w


def _packed_vs_alone(fn_packed, fn_alone, q, k, v, w):
    """Jitted (op-by-op dispatch of the grads cost ~20 s a call); the documents alone one jitted call each (a
    document's loss term depends on its own q, k, v only), so each distinct length compiles once."""
    def loss(fn):
        def f(q, k, v, w):
            o = fn(q, k, v)
            return jnp.sum(o * w), o
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))

    (_, o1), g1 = loss(fn_packed)(q, k, v, w)
    alone = loss(fn_alone)
    outs, grads, at = [], [], 0
    for n in PACK_DOCS:
        (_, o), g = alone(q[:, at:at + n], k[:, at:at + n], v[:, at:at + n], w[:, at:at + n])
        outs.append(o), grads.append(g)
        at += n
    o2 = jnp.concatenate(outs, axis=1)
    pad = lambda x: jnp.zeros_like(x[:, at:])  # the padding's inputs reach no document
    g2 = [jnp.concatenate([g[i] for g in grads] + [pad(x)], axis=1) for i, x in enumerate((q, k, v))]
    assert_close(o1[:, :sum(PACK_DOCS)], o2, rtol=FORMS_RTOL)
    for name, a, b in zip("qkv", g1, g2):
        assert_close(a, b, rtol=FORMS_RTOL, name=f"d{name}")


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_infllm_packed_equals_documents_alone(impl):
    """infllm_attention with segment ids == each document alone (outputs and grads): long block-aligned
    documents take the sparse path alone, short ragged ones the dense path."""
    q, k, v, w = _pack_inputs(19)
    seg = packed_ids(PACK_DOCS, PACK_PAD)
    _packed_vs_alone(lambda q, k, v: infllm_attention(q, k, v, config=PACK_CFG, impl=impl, segment_ids=seg),
                     lambda q, k, v: infllm_attention(q, k, v, config=PACK_CFG, impl=impl), q, k, v, w)


def test_infllm_packed_selection_stays_in_segment():
    """The selected blocks of a query block lie between its primary segment's initial block and itself; a
    long aligned document gets exactly its selection alone (shifted by its first block)."""
    q, k, _, _ = _pack_inputs(5)
    seg = packed_ids(PACK_DOCS, PACK_PAD)
    sel = dict(block_size=16, topk=2, kernel=8, stride=4, local_window=16, init_blocks=1)
    idx, cnt = infllm_select(q, k, segment_ids=seg, dense_below=40, **sel)
    idx, cnt = np.asarray(idx), np.asarray(cnt)
    n_blocks = -(-seg.shape[1] // 16)
    starts = np.asarray(seg[0])
    for i in range(n_blocks):
        first_seg = starts[i * 16]
        sb = np.flatnonzero(starts == first_seg)[0] // 16
        listed = idx[0, :, i, :cnt[0, 0, i]]
        assert listed.min() >= sb and listed.max() <= i
    at = 80  # the document of 75 tokens
    idx2, cnt2 = infllm_select(q[:, at:at + 75], k[:, at:at + 75], **sel)
    for i in range(5):
        for h in range(2):
            a = set(idx[0, h, at // 16 + i, :cnt[0, h, at // 16 + i]].tolist())
            b = {x + at // 16 for x in idx2[0, h, i, :cnt2[0, h, i]].tolist()}
            assert a == b, (i, h, a, b)


def test_block_sparse_segments_vs_oracle():
    """Both impls' masks with segment ids (random selection, ragged segments) against the float64 oracle."""
    shape = (2, 50, 50, 6, 2, 16, 16, 3, True)
    q, k, v, idx, cnt = inputs(shape, 7)
    rng = np.random.default_rng(3)
    seg = jnp.asarray(np.sort(rng.integers(0, 5, (2, 50)), axis=1).astype(np.int32))
    ref_o, ref_lse = oracle.attention(q, k, v, idx, cnt, block_size=16, q_segment_ids=seg, kv_segment_ids=seg)
    for impl in ("xla", "pallas"):
        o, lse = block_sparse_attention(q, k, v, idx, cnt, block_size=16, impl=impl, return_lse=True,
                                        segment_ids=seg)
        assert_close(o, ref_o, name=f"{impl} o")
        fin = np.isfinite(ref_lse)
        assert np.array_equal(np.isfinite(np.asarray(lse)), fin)
        assert_close(np.where(fin, lse, 0), np.where(fin, ref_lse, 0), name=f"{impl} lse")
    o = block_sparse_attention_reference(q, k, v, idx, cnt, block_size=16, segment_ids=seg)
    assert_close(o, ref_o, name="reference")


def test_segment_errors():
    q = jnp.zeros((1, 64, 2, 8))
    seg = jnp.zeros((1, 64), jnp.int32)
    with pytest.raises(ValueError, match="unpacked"):
        infllm_attention(q[:, :8], q, q, config=PACK_CFG, segment_ids=seg)
    with pytest.raises(ValueError, match="go together"):
        block_sparse_attention(q, q, q, jnp.zeros((1, 2, 4, 1), jnp.int32), jnp.zeros((1, 2, 4), jnp.int32),
                               block_size=16, q_segment_ids=seg, impl="xla")


# ------------------------------------------------------------------ per-token selection (issue #16 item 1)

TOKEN_SEL = dict(block_size=16, topk=2, kernel=8, stride=4, init_blocks=1, local_window=16)


def token_selection_oracle(q, k, *, block_size, topk, kernel, stride, init_blocks, local_window):
    """The paper's per-token selection in float64 NumPy, token by token (causal, q_offset seq_k - seq_q):
    sets of chosen key blocks ``[batch][kv_head][row]``."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    batch, seq_q, heads, d = q.shape
    seq_k, kv_heads = k.shape[1], k.shape[2]
    group, off, bs = heads // kv_heads, seq_k - seq_q, block_size
    n_cmp = max(0, (seq_k - kernel) // stride + 1)
    k_cmp = np.stack([k[:, c * stride:c * stride + kernel].mean(axis=1) for c in range(n_cmp)], axis=1)
    n_kb, n_local = -(-seq_k // bs), -(-local_window // bs)
    out = [[[None] * seq_q for _ in range(kv_heads)] for _ in range(batch)]
    for b in range(batch):
        for g in range(kv_heads):
            for i in range(seq_q):
                p = i + off
                seen = [c for c in range(n_cmp) if c * stride + kernel - 1 <= p]
                agg = np.zeros(n_cmp)
                for h in range(g * group, (g + 1) * group):
                    if seen:
                        s = np.array([q[b, i, h] @ k_cmp[b, c, g] / np.sqrt(d) for c in seen])
                        e = np.exp(s - s.max())
                        agg[seen] += e / e.sum()
                last = p // bs
                score = {}
                for j in range(min(last, n_kb - 1) + 1):
                    win = [c for c in range(n_cmp) if c * stride < (j + 1) * bs and c * stride + kernel > j * bs]
                    score[j] = np.inf if (j < init_blocks or j > last - n_local) else max(
                        [agg[c] for c in win], default=-np.inf)
                ranked = sorted(score, key=lambda j: (-score[j], j))
                out[b][g][i] = set(ranked[:topk + n_local])
    return out


def _lists(idx, cnt):
    idx, cnt = np.asarray(idx), np.asarray(cnt)
    return [[[set(idx[b, h, i, :cnt[b, h, i]].tolist()) for i in range(idx.shape[2])] for h in range(idx.shape[1])]
            for b in range(idx.shape[0])]


@pytest.mark.parametrize("heads,kv_heads,seq_q,seq_k", [(2, 2, 75, 75), (6, 2, 53, 53), (6, 2, 9, 61)])
def test_token_selection_vs_float64_oracle(heads, kv_heads, seq_q, seq_k):
    """infllm_select(query_block=1): every token's blocks == the float64 per-token oracle (GQA 1 and 3, ragged,
    prefill and a few rows at an offset)."""
    rng = np.random.default_rng(seq_q)
    q = jnp.asarray(2 * rng.standard_normal((2, seq_q, heads, 16)), jnp.float32)
    k = jnp.asarray(2 * rng.standard_normal((2, seq_k, kv_heads, 16)), jnp.float32)
    idx, cnt = infllm_select(q, k, query_block=1, **TOKEN_SEL)
    assert idx.shape[:3] == (2, kv_heads, seq_q)
    assert _lists(idx, cnt) == token_selection_oracle(q, k, **TOKEN_SEL)


@pytest.mark.parametrize("heads,kv_heads,seq", [(2, 2, 75), (6, 2, 53)])
def test_infllm_token_attention_vs_float64_oracle(heads, kv_heads, seq):
    """infllm_attention with selection="token": above dense_below it is the float64 oracle's block-sparse
    attention over the oracle's per-token choice (outputs and dq, dk, dv; every impl runs the exact XLA form);
    below it exactly dense attention."""
    rng = np.random.default_rng(seq + heads)
    q, k, v = (jnp.asarray(rng.standard_normal((2, seq, h, 16)), jnp.float32) for h in (heads, kv_heads, kv_heads))
    do = rng.standard_normal(q.shape)
    chosen = token_selection_oracle(q, k, **TOKEN_SEL)
    m = max(len(s) for row in chosen for h in row for s in h)
    idx = np.zeros((2, kv_heads, seq, m), np.int32)
    cnt = np.zeros((2, kv_heads, seq), np.int32)
    for b in range(2):
        for h in range(kv_heads):
            for i in range(seq):
                c = sorted(chosen[b][h][i])
                idx[b, h, i, :len(c)], cnt[b, h, i] = c, len(c)
    want = oracle.attention(q, k, v, idx, cnt, block_size=16, query_block=1, do=do)
    cfg = InfLLMConfig(**TOKEN_SEL, dense_below=seq, selection="token")
    for impl in ("xla", "pallas"):
        f = lambda q, k, v: infllm_attention(q, k, v, config=cfg, impl=impl)
        o, vjp = jax.vjp(f, q, k, v)
        assert_close(o, want[0], name=f"{impl} o")
        for name, a, b in zip(("dq", "dk", "dv"), vjp(jnp.asarray(do, jnp.float32)), want[2:]):
            assert_close(a, b, name=f"{impl} {name}")
    below = dataclasses.replace(cfg, dense_below=seq + 1)
    assert np.array_equal(infllm_attention(q, k, v, config=below), dense_attention(q, k, v, causal=True))
    block = infllm_attention(q, k, v, config=dataclasses.replace(cfg, selection="block"))
    assert float(jnp.max(jnp.abs(block - want[0]))) > 1e-3  # the per-block approximation chooses otherwise here


def _assert_matches_oracle(f, qkv, ro, rlse, rgrads, do, dlse):
    """f(q, k, v) -> (o, lse) == the oracle's o, lse (the same rows see nothing) and dq, dk, dv for (do, dlse)."""
    fin = np.isfinite(rlse)
    (o, lse), vjp = jax.vjp(f, *qkv)
    assert_close(o, ro, name="o")
    assert np.array_equal(np.isfinite(np.asarray(lse)), fin)
    assert_close(np.where(fin, lse, 0), np.where(fin, rlse, 0), name="lse")
    grads = vjp((jnp.asarray(do, jnp.float32), jnp.asarray(np.where(fin, dlse, 0), jnp.float32)))
    for name, a, b in zip(("dq", "dk", "dv"), grads, rgrads):
        assert_close(a, b, name=name)


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[1], SHAPES[4]], ids=sid)
def test_per_token_lists_vs_oracle(shape):
    """block_sparse_attention(query_block=1) (random per-token lists) == the float64 oracle: o, lse, grads;
    the mask form too; impl "pallas" refuses per-token lists, "auto" runs the XLA form."""
    batch, seq_q, seq_k, heads, kv_heads, d, bs, max_blocks, causal = shape
    rng = np.random.default_rng(11)
    q, k, v, _, _ = inputs(shape, 12)
    idx, cnt = oracle.random_selection(rng, batch, kv_heads, seq_q, seq_k, bs, max_blocks, causal=causal,
                                       query_block=1)
    do = rng.standard_normal(q.shape)
    dlse = rng.standard_normal((batch, heads, seq_q))
    ro, rlse, *rgrads = oracle.attention(q, k, v, idx, cnt, block_size=bs, causal=causal, query_block=1, do=do,
                                         dlse=dlse)
    f = lambda q, k, v: block_sparse_attention(q, k, v, jnp.asarray(idx), jnp.asarray(cnt), block_size=bs,
                                               causal=causal, return_lse=True, query_block=1, impl="auto")
    _assert_matches_oracle(f, (q, k, v), ro, rlse, rgrads, do, dlse)
    ref = block_sparse_attention_reference(q, k, v, jnp.asarray(idx), jnp.asarray(cnt), block_size=bs,
                                           causal=causal, query_block=1)
    assert_close(ref, ro, name="reference")
    with pytest.raises(NotImplementedError, match="query_block"):
        block_sparse_attention(q, k, v, jnp.asarray(idx), jnp.asarray(cnt), block_size=bs, query_block=1,
                               impl="pallas")


@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[3], SHAPES[4]], ids=sid)
def test_per_token_lists_key_blocked_form(shape):
    """The per-token lists through the key-blocked form (what a CPU runs past 256 queries; here small tiles,
    their key width not a multiple of the block size): == the float64 oracle (o, lse, grads), and == the
    row-chunk form with segment ids."""
    batch, seq_q, seq_k, heads, kv_heads, d, bs, max_blocks, causal = shape
    rng = np.random.default_rng(13)
    q, k, v, _, _ = inputs(shape, 14)
    idx, cnt = oracle.random_selection(rng, batch, kv_heads, seq_q, seq_k, bs, max_blocks, causal=causal,
                                       query_block=1)
    idx, cnt = jnp.asarray(idx), jnp.asarray(cnt)
    do = rng.standard_normal(q.shape)
    dlse = rng.standard_normal((batch, heads, seq_q))
    ro, rlse, *rgrads = oracle.attention(q, k, v, idx, cnt, block_size=bs, causal=causal, query_block=1, do=do,
                                         dlse=dlse)
    tiles = (4, 12)
    f = lambda q, k, v, **kw: block_sparse_attention_xla(q, k, v, idx, cnt, block_size=bs, causal=causal,
                                                         return_lse=True, query_block=1, **kw)
    _assert_matches_oracle(lambda q, k, v: f(q, k, v, tiles=tiles), (q, k, v), ro, rlse, rgrads, do, dlse)
    if seq_q == seq_k:
        seg = jnp.asarray(np.sort(rng.integers(0, 3, (batch, seq_q)), axis=1))
        want = f(q, k, v, segment_ids=seg, tiles=(seq_q, seq_k))  # one tile: the row-chunk form
        got = f(q, k, v, segment_ids=seg, tiles=tiles)
        assert_close(got[0], want[0], rtol=FORMS_RTOL, name="o, segments")
        fin = np.isfinite(np.asarray(want[1]))  # a row whose lists hold no key of its document sees nothing
        assert np.array_equal(np.isfinite(np.asarray(got[1])), fin) and not fin.all()
        assert_close(np.where(fin, got[1], 0), np.where(fin, want[1], 0), rtol=FORMS_RTOL, name="lse, segments")


def test_per_token_key_blocked_form_skips_unlisted_tiles():
    """Key tiles no row lists never run: NaN keys and values there leave every output finite (a tile that ran
    would poison its rows: 0 * NaN)."""
    rng = np.random.default_rng(3)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 64, 2, 8)), jnp.float32) for _ in range(3))
    k, v = k.at[:, 8:].set(jnp.nan), v.at[:, 8:].set(jnp.nan)
    idx, cnt = jnp.zeros((1, 2, 64, 1), jnp.int32), jnp.ones((1, 2, 64), jnp.int32)  # every row: block 0
    o = block_sparse_attention_xla(q, k, v, idx, cnt, block_size=8, query_block=1, tiles=(16, 8))
    want = dense_attention(q[:, :8], k[:, :8], v[:, :8], causal=True)
    assert np.isfinite(np.asarray(o)).all()
    assert_close(o[:, :8], want, rtol=FORMS_RTOL, name="rows of block 0")


@pytest.mark.slow  # 70 decode shapes, ~25 s; the default suite has it at the layer level:
# tests/test_layers_sala.py::test_sparse_token_selection_prefill_equals_decode (full prefill == chunked == decode)
def test_token_selection_prefill_equals_decode():
    """Per-token selection of a prefill == each token's decode selection from the compressed keys so far."""
    q, k = _select_inputs(21, seq=70)
    cfg = dict(block_size=16, topk=1, kernel=8, stride=4, local_window=16)
    idx, cnt = infllm_select(q, k, query_block=1, **cfg)
    for t in range(70):
        i2, c2 = infllm_select_decode(q[:, t:t + 1], compress_keys(k[:, :t + 1], 8, 4), seq_k=t + 1,
                                      query_block=1, **cfg)
        assert _lists(i2, c2) == [[[row[t]] for row in b] for b in _lists(idx, cnt)]


def test_infllm_token_packed_equals_documents_alone():
    """selection="token" with segment ids == each document alone (outputs and grads), pallas impl included
    (it runs the exact XLA form)."""
    q, k, v, w = _pack_inputs(23)
    seg = packed_ids(PACK_DOCS, PACK_PAD)
    cfg = dataclasses.replace(PACK_CFG, selection="token")
    for impl in ("xla", "pallas"):
        _packed_vs_alone(lambda q, k, v: infllm_attention(q, k, v, config=cfg, impl=impl, segment_ids=seg),
                         lambda q, k, v: infllm_attention(q, k, v, config=cfg, impl=impl), q, k, v, w)


def test_selection_option():
    assert InfLLMConfig().selection == "block"  # the default until issue #16 item 3 measures
    with pytest.raises(ValueError, match="selection"):
        InfLLMConfig(selection="query")
