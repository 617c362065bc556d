"""Packed documents (issue #19): `segment_ids` through every attention layer, the model and the trainer's losses.

For every attention kind and impl (xla; pallas = the kernel in interpret mode on CPU, where the layer has one), a
packed row of several documents equals each document run alone: outputs and gradients w.r.t. the input at
`FORMS_RTOL` (1e-5, local scale), gradients w.r.t. the layer's parameters (sums over every token) at float32's
1e-4; documents of ragged lengths (not multiples
of the chunk or block), one of length 1, padding (its own segment, 0) at the end. The layers return no final state
without a cache, and packed input with a cache is an error, so final states are the ops' tests' business.
Then: without segment ids a layer calls its ops exactly as before; the model and the packer; a tiny random
model's packed training losses (stage 1 and 2, the trainer's own loss functions) and gradients equal the same
documents unpacked and padded.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lizard_jax.config import ConfigError
from lizard_jax.layers import layer_class
from lizard_jax.layers.common import document_positions
from lizard_jax.layers.gla import GLASpec
from lizard_jax.layers.lightning import LightningSpec
from lizard_jax.layers.linear import LinearSpec
from lizard_jax.layers.lizard import LizardSpec
from lizard_jax.layers.sliding_window import SlidingWindowSpec
from lizard_jax.layers.softmax import SoftmaxSpec
from lizard_jax.layers.sparse import SparseSpec
from lizard_jax.models import Transformer, init_caches
from lizard_jax.numerics import FORMS_RTOL, RTOL, assert_close
from lizard_jax.testing import randomize, tiny_config
from lizard_jax.train import losses
from lizard_jax.train.config import DataConfig
from lizard_jax.train.data import document_segments
from lizard_jax.train.loop import stage1_loss, stage2_loss

CFG = tiny_config()  # d_model 64, 4 query heads, 2 kv heads (GQA), head_dim 16
SMALL_SPARSE = dict(block_size=16, topk=2, kernel=8, stride=4, init_blocks=1, local_window=16)

# (name, spec): chunk 8 / window 4 / blocks of 16, so the documents below cross chunk and block boundaries
SPECS = [
    ("softmax", SoftmaxSpec(impl="xla")),
    ("softmax-w5", SoftmaxSpec(window=5, impl="xla")),
    ("sliding_window", SlidingWindowSpec(window=4, meta_tokens=2, impl="xla")),
    ("linear", LinearSpec(chunk_size=8, impl="xla")),
    ("linear-quadratic", LinearSpec(form="quadratic", impl="xla")),
    ("linear-pallas", LinearSpec(chunk_size=8, impl="pallas")),
    ("gla", GLASpec(chunk_size=8, impl="xla")),
    ("gla-head-denominator", GLASpec(chunk_size=8, gate_per="head", feature_map="hedgehog",
                                     normalize="denominator", impl="xla")),
    ("gla-pallas", GLASpec(chunk_size=8, impl="pallas")),
    ("lightning", LightningSpec(chunk_size=8, impl="xla")),
    ("lightning-pallas", LightningSpec(chunk_size=8, impl="pallas")),
    ("lizard", LizardSpec(window=4, meta_tokens=2, chunk_size=8, impl="xla")),
    ("lizard-pallas", LizardSpec(window=4, meta_tokens=2, chunk_size=8, impl="pallas")),
    ("sparse-dense", SparseSpec(**SMALL_SPARSE, dense_below=128, rope=True, impl="xla")),  # below the threshold
    ("sparse", SparseSpec(**SMALL_SPARSE, dense_below=0, impl="xla")),
    ("sparse-pallas", SparseSpec(**SMALL_SPARSE, dense_below=0, impl="pallas")),
]

# two rows of 20 tokens: ragged documents (one of length 1), padding (segment 0) at the end of row 0; only three
# document lengths (each compiles the "alone" side once), crossing chunk (8) and block (16) boundaries
ROWS = [[11, 1, 5, ("pad", 3)], [5, 5, 5, 5]]
SEQ = 20
# InfLLM-V2 proper inside documents: blocks of 16, 3 of an 80-token document's 5 chosen; the op is exact for
# documents shorter than dense_below or starting at a multiple of block_size (ops/sparse/selection.py), as these do;
# three document lengths (80 at block 0 and at block 1, short ragged ones and a length-1 one between them)
ALIGNED_SPARSE = dict(block_size=16, topk=1, kernel=8, stride=4, init_blocks=1, local_window=16, dense_below=24)
ALIGNED_ROWS = [[80, 5, 1, ("pad", 10)], [5, 5, 5, 1, 80]]


def layout(rows=ROWS):
    """segment ids `[batch, seq]` (documents 1, 2, ... per row, padding 0) and the (row, start, length) of each
    document."""
    seg = np.zeros((len(rows), sum(n if isinstance(n, int) else n[1] for n in rows[0])), np.int32)
    docs = []
    for r, row in enumerate(rows):
        at = 0
        for j, n in enumerate(row):
            if isinstance(n, tuple):  # padding: segment 0
                at += n[1]
                continue
            seg[r, at:at + n] = j + 1
            docs.append((r, at, n))
            at += n
        assert at == sum(n if isinstance(n, int) else n[1] for n in rows[0]), row
    return jnp.asarray(seg), docs


def make_layer(spec, seed=0):
    layer = layer_class(spec.kind)(CFG, spec)
    params = nn.unbox(layer.init(jax.random.key(seed), jnp.zeros((1, 4, CFG.d_model)))["params"])
    return layer, randomize(params, jax.random.key(seed + 1))


def path_name(path) -> str:
    return "/".join(str(getattr(p, "key", p)) for p in path)


def assert_trees_close(got, want, name, rtol=FORMS_RTOL):
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(want)[0], jax.tree_util.tree_leaves(got)):
        assert np.all(np.isfinite(np.asarray(b))), f"{name} {path_name(path)} not finite"
        assert_close(b, a, dtype="float32", rtol=rtol, name=f"{name} d{path_name(path)}")


@pytest.mark.parametrize("name,spec", SPECS, ids=[n for n, _ in SPECS])
def test_packed_row_equals_documents_alone(name, spec):
    """Outputs and input gradients of a packed batch == the documents one by one (float32, 1e-5), parameter
    gradients (sums over all tokens) at float32's 1e-4; the padding's inputs reach no document's output."""
    check_packed_equals_alone(name, spec, ROWS)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_sparse_selection_inside_block_aligned_documents(impl):
    """The sparse layer above dense_below with real selection (3 of 5 blocks) in block-aligned documents,
    short documents (dense) between them, padding at the end."""
    check_packed_equals_alone(f"sparse-aligned-{impl}", SparseSpec(**ALIGNED_SPARSE, impl=impl), ALIGNED_ROWS)


def check_packed_equals_alone(name, spec, rows):
    layer, params = make_layer(spec, seed=3)
    seg, docs = layout(rows)
    x = jax.random.normal(jax.random.key(7), (seg.shape[0], seg.shape[1], CFG.d_model), jnp.float32)
    w = jax.random.normal(jax.random.key(8), x.shape, jnp.float32)  # the loss's weights
    real = (seg != 0)[..., None]

    # one jitted program (one compile) for the packed batch and every document alone, the documents of each
    # length batched as rows of one call (rows are independent: each is its own sequence, no segment ids)
    groups = {}
    for r, a, n in docs:
        groups.setdefault(n, []).append((r, a))

    @jax.jit
    def run(p, xs):
        def packed_loss(p, xs):
            y, _ = layer.apply({"params": p}, xs, document_positions(seg), segment_ids=seg)
            return jnp.sum(jnp.where(real, y * w, 0.0)), y

        def alone_loss(p, xs, ws):
            y, _ = layer.apply({"params": p}, xs)  # positions None: arange, one document per row
            return jnp.sum(y * ws), y

        (_, y), g = jax.value_and_grad(packed_loss, argnums=(0, 1), has_aux=True)(p, xs)
        alone = {}
        for n, at in groups.items():
            xd = jnp.concatenate([xs[r:r + 1, a:a + n] for r, a in at])
            wd = jnp.concatenate([w[r:r + 1, a:a + n] for r, a in at])
            (_, yd), gd = jax.value_and_grad(alone_loss, argnums=(0, 1), has_aux=True)(p, xd, wd)
            alone[n] = (yd, gd)  # parameter gradients: summed over the group's documents
        return y, g, alone

    y, (gp, gx), alone = run(params, x)
    y_ref, gx_ref = np.zeros(y.shape, np.float32), np.zeros(x.shape, np.float32)
    gp_ref = jax.tree_util.tree_map(jnp.zeros_like, params)
    for n, at in groups.items():
        yd, (gpd, gxd) = alone[n]
        for i, (r, a) in enumerate(at):
            y_ref[r, a:a + n], gx_ref[r, a:a + n] = yd[i], gxd[i]
        gp_ref = jax.tree_util.tree_map(jnp.add, gp_ref, gpd)
    m = np.asarray(real)
    assert_close(np.where(m, y, 0.0), y_ref, dtype="float32", rtol=FORMS_RTOL, name=f"{name} output")
    assert_close(gx, gx_ref, dtype="float32", rtol=FORMS_RTOL, name=f"{name} dx")  # padding's dx: 0
    # parameter gradients are sums over every token of every document, in another order: float32's 1e-4
    # (gla-pallas dq_proj: 1.08e-5 from the kernel's summation order)
    assert_trees_close(gp, gp_ref, name, rtol=RTOL["float32"])


@pytest.mark.parametrize("name,spec", [s for s in SPECS if s[1].impl != "pallas"],
                         ids=[n for n, s in SPECS if s.impl != "pallas"])
def test_no_segment_ids_calls_the_ops_as_before(name, spec, monkeypatch):
    """segment_ids=None: no op receives a segment argument and the traced program is the one of a call without
    the keyword; with segment ids the program differs (they are used)."""
    import lizard_jax.layers.gla as gla_mod
    import lizard_jax.layers.lightning as lightning_mod
    import lizard_jax.layers.linear as linear_mod
    import lizard_jax.layers.sliding_window as sw_mod
    import lizard_jax.layers.softmax as softmax_mod
    import lizard_jax.layers.sparse as sparse_mod

    seen = []

    def spy(fn):
        def wrapped(*args, **kwargs):
            seen.extend(k for k in kwargs if "segment" in k)
            return fn(*args, **kwargs)
        return wrapped

    for mod, names in ((softmax_mod, ["attention"]), (sw_mod, ["attention"]), (sparse_mod, ["attention",
                       "infllm_attention"]), (linear_mod, ["linear_attention", "gla"]),
                       (lightning_mod, ["lightning_attention"]), (gla_mod, [])):
        for n in names:
            monkeypatch.setattr(mod, n, spy(getattr(mod, n)))
    layer, params = make_layer(spec)
    x = jnp.ones((2, SEQ, CFG.d_model), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(SEQ, dtype=jnp.int32), (2, SEQ))
    plain = str(jax.make_jaxpr(lambda p, xs, ps: layer.apply({"params": p}, xs, ps))(params, x, pos))
    none = str(jax.make_jaxpr(lambda p, xs, ps: layer.apply({"params": p}, xs, ps, segment_ids=None))(params, x, pos))
    assert seen == [] and plain == none
    seg, _ = layout()
    packed = str(jax.make_jaxpr(lambda p, xs, ps: layer.apply({"params": p}, xs, ps, segment_ids=seg))(params, x, pos))
    assert seen and packed != plain


def test_layer_errors():
    layer, params = make_layer(LizardSpec(window=4, meta_tokens=2, chunk_size=8, impl="xla"))
    x = jnp.ones((2, SEQ, CFG.d_model), jnp.float32)
    seg, _ = layout()
    with pytest.raises(ValueError, match="segment_ids must be \\[batch, seq\\]"):
        layer.apply({"params": params}, x, segment_ids=seg[:, :-1])
    with pytest.raises(TypeError, match="segment_ids must be integers"):
        layer.apply({"params": params}, x, segment_ids=seg.astype(jnp.float32))
    cache = type(layer).init_cache(CFG, layer.spec, 2, 64)
    with pytest.raises(ValueError, match="cannot be used with a cache"):
        layer.apply({"params": params}, x, document_positions(seg), cache, segment_ids=seg)


def test_document_positions():
    seg = jnp.asarray([[1, 1, 1, 2, 3, 3, 0, 0], [4, 4, 4, 4, 4, 4, 4, 4]], jnp.int32)
    want = [[0, 1, 2, 0, 0, 1, 0, 1], list(range(8))]
    np.testing.assert_array_equal(document_positions(seg), want)
    s, p = document_segments(np.asarray([[5, 1, 7, 7, 1, 1, 3], [1, 2, 3, 4, 5, 6, 7]]), eos_id=1)
    np.testing.assert_array_equal(s, [[1, 1, 2, 2, 2, 3, 4], [1, 2, 2, 2, 2, 2, 2]])
    np.testing.assert_array_equal(p, [[0, 1, 0, 1, 2, 0, 0], [0, 0, 1, 2, 3, 4, 5]])


# ----------------------------------------------------------------------------------------------------------
# the model and the trainer's losses

MODEL_CFG = tiny_config(num_layers=5, attention=(
    SoftmaxSpec(impl="xla"), LizardSpec(window=4, meta_tokens=2, chunk_size=8, impl="xla"),
    LightningSpec(chunk_size=8, impl="xla"), SlidingWindowSpec(window=4, meta_tokens=2, impl="xla"),
    SparseSpec(block_size=16, topk=1, kernel=8, stride=4, local_window=16, dense_below=0, impl="xla")))
TEACHER_CFG = tiny_config(num_layers=5)
DOCS = [13, 1, 6, 11, 1]  # documents (EOS last) of a packed row of SEQ_M + 1 tokens: the documents, 1 padding
SEQ_M = 32


def _docs(seed=0):
    rng = np.random.default_rng(seed)
    eos = CFG.eos_token_ids[0]
    out = []
    for n in DOCS:
        d = rng.integers(2, CFG.vocab_size, n)
        d[-1] = eos
        out.append(d.astype(np.int32))
    return out


def packed_batch(docs):
    """One packed row (the packer's format): tokens, segment ids, per-document positions `[1, 33]`; the last
    token is padding (segment 0), so every document token is an input."""
    tokens = np.concatenate([*docs, [0]])[None].astype(np.int32)
    seg, pos = document_segments(tokens, CFG.eos_token_ids[0])
    seg[:, -1], pos[:, -1] = 0, 0
    return {"tokens": jnp.asarray(tokens), "segment_ids": jnp.asarray(seg), "positions": jnp.asarray(pos)}


def padded_batch(docs):
    """The same documents one per row, right-padded (segment 0) to the longest + 1 (all are inputs)."""
    n = max(map(len, docs)) + 1
    tokens = np.zeros((len(docs), n), np.int32)
    seg = np.zeros((len(docs), n), np.int32)
    for i, d in enumerate(docs):
        tokens[i, :len(d)], seg[i, :len(d)] = d, 1
    seg_j = jnp.asarray(seg)
    return {"tokens": jnp.asarray(tokens), "segment_ids": seg_j, "positions": document_positions(seg_j)}


@pytest.fixture(scope="module")
def tiny_models():
    student, teacher = Transformer(MODEL_CFG), Transformer(TEACHER_CFG)
    z = jnp.zeros((1, 8), jnp.int32)
    # jitted inits: op-by-op dispatch of two 5-layer models' initialisers is slow on CPU
    sp = randomize(nn.unbox(jax.jit(student.init)(jax.random.key(0), z)["params"]), jax.random.key(1))
    tp = randomize(nn.unbox(jax.jit(teacher.init)(jax.random.key(2), z)["params"]), jax.random.key(3))
    return student, teacher, sp, tp


@pytest.mark.parametrize("stage", [1, 2])
def test_packed_training_equals_unpacked_padded(tiny_models, stage):
    """The trainer's loss (stage 1 with KD, stage 2 with KD) and its gradients w.r.t. every student parameter:
    one packed row == the same documents one per row, right-padded."""
    student, teacher, sp, tp = tiny_models
    docs = _docs()
    assert sum(DOCS) == SEQ_M
    if stage == 1:
        fn = lambda p, b: stage1_loss(student, teacher, p, tp, b, kd_weight=0.5, kd_temperature=2.0)
    else:
        fn = lambda p, b: stage2_loss(student, teacher, p, tp, b, kd_weight=0.5, kd_temperature=2.0)
    step = jax.jit(jax.value_and_grad(fn))
    l_packed, g_packed = step(sp, packed_batch(docs))
    l_padded, g_padded = step(sp, padded_batch(docs))
    assert_close(l_packed, l_padded, dtype="float32", rtol=FORMS_RTOL, name=f"stage {stage} loss")
    # a whole model's parameter gradients, summed over other batch layouts: the float32 tolerance (1e-4)
    assert_trees_close(g_packed, g_padded, f"stage {stage}", rtol=RTOL["float32"])


def test_lm_mask_scores_no_document_start_nor_padding():
    batch = packed_batch(_docs())
    _, targets, pos, seg, mask = losses.split_batch(batch)
    m = np.asarray(mask[0])
    assert m.sum() == SEQ_M - len(DOCS)  # every target but the first token of documents 2..5 and the padding
    starts = np.cumsum(DOCS) - 1  # inputs whose target is a document's first token, or the padding
    assert (m[starts] == 0).all()
    _, _, _, _, mask_p = losses.split_batch(padded_batch(_docs()))
    assert float(mask_p.sum()) == m.sum()  # the same targets, none in padding
    tokens = np.asarray(batch["tokens"])
    assert losses.split_batch(tokens)[4] is None  # no segment ids: every target, as before


def test_model_errors_and_generation_unchanged(tiny_models):
    student, _, sp, _ = tiny_models
    tokens = jnp.ones((1, 8), jnp.int32)
    seg = jnp.ones((1, 8), jnp.int32)
    with pytest.raises(ValueError, match="cannot be used with caches"):
        student.apply({"params": sp}, tokens, None, init_caches(MODEL_CFG, 1, 16), segment_ids=seg)
    with pytest.raises(ValueError, match="segment_ids must be integers"):
        student.apply({"params": sp}, tokens, segment_ids=seg[:, :4])
    # one segment == no segment ids (positions default to the same arange)
    one = jax.jit(lambda p: student.apply({"params": p}, tokens, segment_ids=seg))(sp)
    assert_close(one, jax.jit(lambda p: student.apply({"params": p}, tokens))(sp), dtype="float32", rtol=FORMS_RTOL)


def test_remat_model_takes_segment_ids(tiny_models):
    _, _, sp, _ = tiny_models
    b = packed_batch(_docs())
    tokens, seg = b["tokens"][:, :-1], b["segment_ids"][:, :-1]
    # jitted: op-by-op dispatch of the 5-layer model took ~28 s
    plain = jax.jit(lambda p: Transformer(MODEL_CFG).apply({"params": p}, tokens, segment_ids=seg))(sp)
    remat = jax.jit(lambda p: Transformer(MODEL_CFG, remat=True).apply({"params": p}, tokens, segment_ids=seg))(sp)
    assert_close(remat, plain, dtype="float32", rtol=FORMS_RTOL)


def test_data_config_option():
    assert DataConfig(paths=("a",)).segment_ids is True  # on for new configs (measured: benchmarks/RESULTS.md)
    with pytest.raises(ConfigError, match="segment_ids"):
        DataConfig(paths=("a",), segment_ids="yes")
    from lizard_jax.config import from_dict
    with pytest.raises(ConfigError, match="segment_id"):
        from_dict(DataConfig, {"paths": ["a"], "segment_id": True})
    assert from_dict(DataConfig, {"paths": ["a"], "segment_ids": False}).segment_ids is False


def test_packer_segments_deterministic_resumable_one_token_cache(tmp_path):
    """data.segment_ids: the same token windows as without (same data position, same token cache file), plus
    segment ids that start after each EOS and per-document positions; a restored packer continues exactly;
    resuming with the other setting is refused."""
    from lizard_jax.testing import char_tokenizer
    from lizard_jax.train.data import DataError, PackedData

    text = tmp_path / "docs.txt"
    text.write_text("\n\n".join(f"document {i} " + "ab" * (i % 7) for i in range(60)))
    tok = char_tokenizer()
    cfg = DataConfig(paths=(str(text),), seq_len=24, batch_size=3, segment_ids=False)
    seg_cfg = dataclasses.replace(cfg, segment_ids=True)
    plain = PackedData(cfg, tok, 1, seed=1, cache_dir=tmp_path / "cache")
    packed = PackedData(seg_cfg, tok, 1, seed=1, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").iterdir())) == 1  # one token cache serves both settings
    batches = [packed.next_batch() for _ in range(3)]
    for b in batches:
        np.testing.assert_array_equal(b["tokens"], plain.next_batch())
        seg, pos = document_segments(b["tokens"], 1)
        np.testing.assert_array_equal(b["segment_ids"], seg)
        np.testing.assert_array_equal(b["positions"], pos)
        assert b["segment_ids"].dtype == b["positions"].dtype == np.int32
        assert (b["segment_ids"] >= 1).all() and (b["segment_ids"][:, 0] == 1).all()
        eos_at = np.argwhere(b["tokens"][:, :-1] == 1)
        assert all(b["positions"][r, c + 1] == 0 for r, c in eos_at)  # a document starts after each EOS
    assert packed.state()["position"] == plain.state()["position"] == 9
    again = PackedData(seg_cfg, tok, 1, seed=1, cache_dir=tmp_path / "cache")
    again.restore({**packed.state(), "position": 3})
    for want in batches[1:]:
        got = again.next_batch()
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    with pytest.raises(DataError, match="segment_ids"):
        plain.restore(packed.state())
    with pytest.raises(DataError, match="segment_ids"):
        packed.restore({"position": 0, "seq_len": 24, "batch_size": 3})  # before the option: without them
