"""Block-sparse attention Pallas kernel vs the float64 oracle, in interpret mode, both lowerings.

Forward, lse and dq/dk/dv (with random cotangents on o *and* lse) for fresh random inputs and random
duplicate-free selections (counts 0..max incl. empty query blocks, junk past the count). Plus: both
lowerings (Triton for CUDA, Mosaic for TPU) must lower at realistic shapes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lizard_jax.numerics import assert_close
from lizard_jax.testing import target_gpu
from pallas_kernels.block_sparse import DESIGNS, BlockSizes, block_sparse_attention, oracle
from pallas_kernels.block_sparse.common import VARIANTS, dkv_work_items

# (batch, seq_q, seq_k, heads, kv_heads, d, block_size, max_blocks, causal)
CASES = [
    (1, 64, 64, 2, 2, 16, 16, 3, True),  # GQA 1
    (2, 70, 70, 6, 2, 16, 16, 3, True),  # GQA 3, seq not a multiple of the block, batch 2
    (1, 96, 96, 8, 1, 32, 32, 2, True),  # GQA 8
    (2, 50, 50, 4, 2, 16, 16, 4, False),  # non-causal, ragged keys masked
    (1, 20, 90, 4, 1, 16, 16, 4, True),  # decoding-like: q_offset = 70, not block aligned
    (1, 130, 130, 2, 1, 16, 64, 2, True),  # block 64
    (1, 200, 200, 1, 1, 16, 128, 2, True),  # block 128, MHA with one head
    (3, 40, 40, 3, 1, 48, 16, 2, True),  # batch 3, GQA 3, d 48 padded to 64 (Triton)
    (1, 32, 32, 2, 1, 128, 16, 2, True),  # the production head dim
]
TPU_CASES = [CASES[i] for i in (0, 1, 2, 4, 8)]
# design v2 in the default suite: GQA 1/3/8, ragged, non-causal, decoding-like, head_dim 128 (test_sweep: all)
V2_CASES = [CASES[i] for i in (0, 1, 2, 3, 4, 8)]
V2_TPU_CASES = [CASES[i] for i in (0, 1, 4, 8)]


def case_id(c, dtype="fp32"):
    b, tq, tk, h, kv, d, bs, m, causal = c
    return f"B{b}-T{tq}x{tk}-H{h}-KV{kv}-D{d}-bs{bs}-M{m}-{'causal' if causal else 'full'}-{dtype}"


def run_case(case, dtype, backend, seed, block_sizes=None, interpret=True, selection=None, variant="v1",
             segments=None):
    batch, seq_q, seq_k, heads, kv_heads, d, bs, max_blocks, causal = case
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.standard_normal(s), dtype)
               for s in ((batch, seq_q, heads, d), (batch, seq_k, kv_heads, d), (batch, seq_k, kv_heads, d)))
    idx, cnt = selection or oracle.random_selection(rng, batch, kv_heads, seq_q, seq_k, bs, max_blocks,
                                                    causal=causal)
    do = jnp.asarray(rng.standard_normal((batch, seq_q, heads, d)), dtype)
    dlse = jnp.asarray(rng.standard_normal((batch, heads, seq_q)), jnp.float32)

    seg_kw = {} if segments is None else dict(q_segment_ids=jnp.asarray(segments[0]),
                                              kv_segment_ids=jnp.asarray(segments[1]))

    @jax.jit  # forward and vjp in one program: eager dispatch of the interpret-mode kernels is slow
    def fwd_bwd(q, k, v, idx, cnt, do, dlse, seg_kw):
        f = lambda q, k, v: block_sparse_attention(q, k, v, idx, cnt, block_size=bs, causal=causal,
                                                   return_lse=True, block_sizes=block_sizes, backend=backend,
                                                   interpret=interpret, variant=variant, **seg_kw)
        (o, lse), vjp = jax.vjp(f, q, k, v)
        return o, lse, vjp((do, dlse))

    o, lse, (dq, dk, dv) = fwd_bwd(q, k, v, jnp.asarray(idx), jnp.asarray(cnt), do, dlse, seg_kw)
    up = lambda x: np.asarray(x.astype(jnp.float32), np.float64)  # the inputs the kernel saw
    o_r, lse_r, dq_r, dk_r, dv_r = oracle.attention(up(q), up(k), up(v), idx, cnt, block_size=bs, causal=causal,
                                                    do=up(do), dlse=np.asarray(dlse), **seg_kw)
    name = jnp.dtype(dtype).name
    empty = np.isinf(lse_r)
    assert np.array_equal(np.isinf(np.asarray(lse)), empty), "lse -inf rows differ"
    assert np.all(np.asarray(o.astype(jnp.float32))[np.transpose(empty, (0, 2, 1))] == 0), "empty rows not 0"
    assert_close(o.astype(jnp.float32), o_r, dtype=name, name="o")
    assert_close(np.where(empty, 0, lse), np.where(empty, 0, lse_r), dtype=name, name="lse")
    assert_close(dq.astype(jnp.float32), dq_r, dtype=name, name="dq")
    assert_close(dk.astype(jnp.float32), dk_r, dtype=name, name="dk")
    assert_close(dv.astype(jnp.float32), dv_r, dtype=name, name="dv")


def pytest_generate_tests(metafunc):
    """Each kernel test class names its own cases (interpret mode is slow: TPU runs a subset)."""
    if metafunc.cls is not None and "case" in metafunc.fixturenames:
        cases = {"test_fp32": metafunc.cls.FP32_CASES, "test_bf16": metafunc.cls.BF16_CASES}
        dtype = "bf16" if metafunc.function.__name__ == "test_bf16" else "fp32"
        metafunc.parametrize("case", cases[metafunc.function.__name__], ids=lambda c: case_id(c, dtype))


class BlockSparseKernelTest:
    BACKEND = "gpu"
    VARIANT = "v1"
    INTERPRET = True
    FP32_CASES = CASES
    BF16_CASES = [CASES[1]]

    def test_fp32(self, case):
        run_case(case, jnp.float32, self.BACKEND, seed=hash(case) % 1000, interpret=self.INTERPRET,
                 variant=self.VARIANT)

    def test_bf16(self, case):
        run_case(case, jnp.bfloat16, self.BACKEND, seed=hash(case) % 1000 + 1, interpret=self.INTERPRET,
                 variant=self.VARIANT)


class TestGpuInterpret(BlockSparseKernelTest):
    BACKEND = "gpu"

    def test_small_tiles(self):
        # sub-block rows: several programs per query block in every pass, multi-step dk/dv loops
        run_case(CASES[2], jnp.float32, "gpu", seed=7, block_sizes=BlockSizes(block_q=4, block_q_dq=2, block_q_dkv=8))

    @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
    def test_two_blocks_per_step_and_split_key_blocks(self, dtype):
        # kv_step 2 (odd counts leave a half-listed last step) in fwd and dq; dkv_split 1 splits every key block
        # selected by more than max_blocks query blocks into chunks summed afterwards
        case = (2, 150, 150, 4, 2, 16, 16, 3, True)
        bsz = BlockSizes(block_q=8, block_q_dq=16, block_q_dkv=8, kv_step=2, kv_step_dq=2, dkv_split=1)
        idx, cnt = oracle.random_selection(np.random.default_rng(5), 2, 2, 150, 150, 16, 3)
        _, _, slot_block = dkv_work_items(jnp.asarray(idx), jnp.asarray(cnt), 10, 3)
        assert np.any(np.asarray(slot_block) < 10), "no key block was split: the case tests nothing"
        run_case(case, dtype, "gpu", seed=6, block_sizes=bsz, selection=(idx, cnt))


class TestTpuInterpret(BlockSparseKernelTest):
    BACKEND = "tpu"
    FP32_CASES = TPU_CASES
    BF16_CASES = [CASES[2]]


class TestGpuInterpretV2(BlockSparseKernelTest):
    BACKEND = "gpu"
    VARIANT = "v2"
    FP32_CASES = V2_CASES

    @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
    def test_wide_key_tiles_and_split_key_blocks(self, dtype):
        # kv_step 4 in fwd and dq (counts 1..5: partly listed last tiles), small dk/dv row tiles, every key block
        # selected by more than max_blocks query blocks split into chunks
        case = (2, 150, 150, 4, 2, 16, 16, 5, True)
        bsz = BlockSizes(block_q=8, block_q_dq=16, block_q_dkv=8, kv_step=4, kv_step_dq=4, dkv_split=1)
        idx, cnt = oracle.random_selection(np.random.default_rng(8), 2, 2, 150, 150, 16, 5)
        run_case(case, dtype, "gpu", seed=9, block_sizes=bsz, selection=(idx, cnt), variant="v2")


class TestTpuInterpretV2(BlockSparseKernelTest):
    BACKEND = "tpu"
    VARIANT = "v2"
    FP32_CASES = V2_TPU_CASES
    BF16_CASES = [CASES[2]]


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_v2_backward_builds_no_work_list(backend):
    """v2 builds its key-major work list in the forward (saved as a residual): the backward has no sort (v1's
    backward sorts, which shows the check can see one)."""
    case = (1, 64, 64, 2, 1, 16, 16, 3, True)
    batch, seq, _, heads, kv_heads, d, bs, max_blocks, _ = case
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((batch, seq, heads, d)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((batch, seq, kv_heads, d)), jnp.float32)
    idx, cnt = (jnp.asarray(x) for x in oracle.random_selection(rng, batch, kv_heads, seq, seq, bs, max_blocks))
    found = {}
    for variant in DESIGNS:
        f = lambda q, k, v: block_sparse_attention(q, k, v, idx, cnt, block_size=bs, backend=backend,
                                                   interpret=True, variant=variant)
        o, vjp = jax.vjp(f, q, k, k)
        text = str(jax.make_jaxpr(vjp)(o))  # nested jaxprs included
        found[variant] = " sort[" in text or "searchsorted" in text
    assert found == {"v1": True, "v2": False}


@pytest.mark.parametrize("variant", DESIGNS)
@pytest.mark.parametrize("platform,backend", [("cuda", "gpu"), ("tpu", "tpu")])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_lowers(platform, backend, dtype, variant):
    """The real lowerings (Triton IR / Mosaic) of forward and backward at a realistic shape."""
    batch, seq, heads, kv_heads, d, bs = 1, 512, 16, 4, 128, 64
    q = jax.ShapeDtypeStruct((batch, seq, heads, d), dtype)
    k = jax.ShapeDtypeStruct((batch, seq, kv_heads, d), dtype)
    idx = jax.ShapeDtypeStruct((batch, kv_heads, seq // bs, 5), jnp.int32)
    cnt = jax.ShapeDtypeStruct((batch, kv_heads, seq // bs), jnp.int32)

    def loss(q, k, v, i, c):
        return block_sparse_attention(q, k, v, i, c, block_size=bs, backend=backend,
                                      variant=variant).astype(jnp.float32).sum()

    with target_gpu(platform):
        text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, k, idx, cnt).lower(
            lowering_platforms=(platform,)).as_text()
    assert text.count("block_sparse_") >= 3  # fwd, dq, dkv kernels are all there


def test_block_sizes_validated():
    with pytest.raises(ValueError, match="power of 2"):
        BlockSizes(block_q=3, block_q_dq=16, block_q_dkv=16)
    with pytest.raises(ValueError, match="exceeds"):
        BlockSizes(block_q=64, block_q_dq=16, block_q_dkv=16).validate(32, 1)
    with pytest.raises(ValueError, match="1, 2 or 4"):
        BlockSizes(block_q=16, block_q_dq=16, block_q_dkv=16, kv_step=3)
    assert BlockSizes.get_default(64, 4, variant="v2").kv_step_dq == 2
    assert VARIANTS["default"] == BlockSizes.get_default(64, 4)  # the tile variants still stand beside DESIGNS
    assert BlockSizes.get_default(64, 4) == BlockSizes(block_q=32, block_q_dq=32, block_q_dkv=32, kv_step=2)
    assert BlockSizes.get_default(64, 4, itemsize=4).block_q == 16


def test_dkv_work_items_cover_the_transposed_index():
    """Every (key block, query block) pair of the selection is in exactly one work item, chunks are at most
    ``chunk`` long, split key blocks own distinct slots, and each item counts its query blocks below the
    key block's ``first_unmasked``."""
    rng = np.random.default_rng(3)
    n_qb = n_kb = 12
    idx, cnt = oracle.random_selection(rng, 2, 2, n_qb * 16, n_kb * 16, 16, 4)
    first_unmasked = rng.integers(0, n_qb + 1, n_kb)
    work_items = jax.jit(dkv_work_items, static_argnums=(2, 3))  # eager dispatch of the sorts and scans is slow
    for chunk in (0, 1, 3, 100):
        items, q_blocks, slot_block = (np.asarray(x) for x in work_items(jnp.asarray(idx), jnp.asarray(cnt),
                                                                           n_kb, chunk, jnp.asarray(first_unmasked)))
        for b in range(2):
            for h in range(2):
                want = sorted((int(j), i) for i in range(n_qb) for j in idx[b, h, i, :cnt[b, h, i]])
                got, slots = [], []
                for kb, start, num, slot, masked in items[b, h]:
                    assert slot != -2 or num == 0
                    assert chunk <= 0 or num <= chunk
                    assert masked == np.sum(q_blocks[b, h, start:start + num] < first_unmasked[kb])
                    got += [(int(kb), int(i)) for i in q_blocks[b, h, start:start + num]]
                    if slot >= 0:
                        assert slot_block[b, h, slot] == kb
                        slots.append(slot)
                assert sorted(got) == want
                assert len(set(slots)) == len(slots)
                unused = np.setdiff1d(np.arange(slot_block.shape[-1]), slots)
                assert np.all(slot_block[b, h, unused] == n_kb)


def test_unknown_design_raises():
    q = jnp.zeros((1, 32, 2, 16))
    idx, cnt = jnp.zeros((1, 2, 2, 1), jnp.int32), jnp.zeros((1, 2, 2), jnp.int32)
    with pytest.raises(ValueError, match="variant"):
        block_sparse_attention(q, q, q, idx, cnt, block_size=16, interpret=True, variant="v3")


def test_bad_shapes_raise():
    q = jnp.zeros((1, 32, 4, 16))
    k = jnp.zeros((1, 32, 2, 16))
    idx = jnp.zeros((1, 2, 2, 1), jnp.int32)
    cnt = jnp.zeros((1, 2, 2), jnp.int32)
    with pytest.raises(ValueError, match="block_size"):
        block_sparse_attention(q, k, k, idx, cnt, block_size=24, interpret=True)
    with pytest.raises(ValueError, match="differ in batch"):
        block_sparse_attention(q, jnp.zeros((2, 32, 2, 16)), jnp.zeros((2, 32, 2, 16)), idx, cnt, block_size=16)
    with pytest.raises(ValueError, match="block_indices.shape"):
        block_sparse_attention(q, k, k, idx[:, :1], cnt, block_size=16)


@pytest.mark.slow
@pytest.mark.parametrize("variant", DESIGNS)
@pytest.mark.parametrize("backend", ["gpu", "tpu"])
@pytest.mark.parametrize("seed", range(3))
def test_sweep(backend, seed, variant):
    rng = np.random.default_rng(1000 + seed)
    for _ in range(4):
        kv_heads = int(rng.choice([1, 2]))
        group = int(rng.choice([1, 2, 3, 4, 8]))
        bs = int(rng.choice([16, 32, 64]))
        seq_k = int(rng.integers(bs, 5 * bs))
        seq_q = int(rng.integers(1, seq_k + 1))
        case = (int(rng.integers(1, 3)), seq_q, seq_k, kv_heads * group, kv_heads, int(rng.choice([16, 32, 48])),
                bs, int(rng.integers(1, 6)), bool(rng.random() < 0.8))
        for dtype in (jnp.float32, jnp.bfloat16):
            run_case(case, dtype, backend, seed=int(rng.integers(1 << 30)), variant=variant)


def test_under_shard_map():
    """Pallas calls cannot be partitioned automatically: the op runs per shard, batch x kv heads split over
    a 2 x 2 mesh of simulated CPU devices (indices split with them), forward and gradients."""
    from jax.sharding import Mesh, PartitionSpec as P

    case = (2, 40, 40, 4, 2, 16, 16, 3, True)
    batch, seq, _, heads, kv_heads, d, bs, max_blocks, _ = case
    rng = np.random.default_rng(11)
    q = jnp.asarray(rng.standard_normal((batch, seq, heads, d)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((batch, seq, kv_heads, d)), jnp.float32) for _ in range(2))
    idx, cnt = (jnp.asarray(x) for x in oracle.random_selection(rng, batch, kv_heads, seq, seq, bs, max_blocks))
    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "model"))
    attn = lambda q, k, v, i, c: block_sparse_attention(q, k, v, i, c, block_size=bs, interpret=True)
    sharded = jax.shard_map(attn, mesh=mesh, in_specs=(P("data", None, "model"), P("data", None, "model"),
                                                       P("data", None, "model"), P("data", "model"),
                                                       P("data", "model")),
                            out_specs=P("data", None, "model"), check_vma=False)
    loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v, idx, cnt) ** 2)
    got = jax.jit(jax.value_and_grad(loss(sharded), argnums=(0, 1, 2)))(q, k, v)
    want = jax.jit(jax.value_and_grad(loss(attn), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert_close(a, b, rtol=1e-6)


def test_cost_model():
    """cost.py: exact forward FLOPs, sparse < dense, v2 saves launches (prologue once) but not products,
    scaling in length and selection, bad arguments raise."""
    from pallas_kernels.block_sparse.cost import Cost, cost, dense_cost

    shape = dict(batch=1, heads=16, kv_heads=4, head_dim=128, dtype=jnp.bfloat16)
    sparse = lambda design, seq, frac, mode: cost(design, seq=seq, block_size=64, mode=mode,
                                                  selected_blocks_per_query_block=seq // 64 // frac, **shape)
    c = sparse("v1", 8192, 8, "fwd")
    assert isinstance(c, Cost) and c.flops == 4 * 16 * 8192 * 16 * 64 * 128  # 2 products over S blocks
    for seq in (8192, 32768):
        for mode in ("fwd", "fwd_bwd"):
            v1, v2, dense = sparse("v1", seq, 8, mode), sparse("v2", seq, 8, mode), dense_cost(seq=seq, mode=mode,
                                                                                              **shape)
            assert v2.flops == v1.flops < dense.flops and v1.hbm_bytes < dense.hbm_bytes
            assert v2.launches <= v1.launches and v2.hbm_bytes <= v1.hbm_bytes
            assert sparse("v2", seq, 16, mode).flops * 2 == pytest.approx(v2.flops, rel=1e-6)
    assert sparse("v2", 8192, 8, "fwd_bwd").launches < sparse("v1", 8192, 8, "fwd_bwd").launches
    assert dense_cost(seq=16384, mode="fwd", **shape).flops > 3.9 * dense_cost(seq=8192, mode="fwd", **shape).flops
    assert sparse("v1", 8192, 8, "fwd_bwd").flops == pytest.approx(4.5 * sparse("v1", 8192, 8, "fwd").flops)
    with pytest.raises(ValueError, match="design"):
        cost("v3", seq=8192, block_size=64, selected_blocks_per_query_block=16, **shape)
    from pallas_kernels.block_sparse.cost import segment_bytes

    seg = dict(batch=1, seq=8192, heads=16, kv_heads=4, block_size=64, selected_blocks_per_query_block=16)
    assert segment_bytes(**seg, mode="fwd", design="v2") == segment_bytes(**seg, mode="fwd") > 0
    assert segment_bytes(**seg, design="v2") < segment_bytes(**seg)  # v2: no segment-uniform test in the backward
    with pytest.raises(ValueError, match="mode"):
        cost("v1", seq=8192, block_size=64, selected_blocks_per_query_block=16, mode="bwd", **shape)


# ------------------------------------------------------------------------------------ packed documents (#19)


def packed_segments(batch, seq, lengths):
    """int32 [batch, seq]: documents of ``lengths`` (ragged, one of length 1), the rest padding (its own id);
    row b shifts the lengths by b so the rows differ."""
    out = np.zeros((batch, seq), np.int32)
    for b in range(batch):
        ids = np.concatenate([np.full(n, i, np.int32) for i, n in enumerate(lengths[b:] + lengths[:b])])
        ids = np.concatenate([ids, np.full(max(0, seq - len(ids)), len(lengths), np.int32)])[:seq]
        out[b] = ids
    return out


SEG_CASES = [CASES[i] for i in (1, 2, 3)]  # ragged GQA 3 batch 2, GQA 8 block 32, non-causal
SEG_KERNELS = [("gpu", "v1"), ("gpu", "v2"), ("tpu", "v1"), ("tpu", "v2")]  # every (backend, design)
# GPU v1: all cases, default tiles and two key blocks per step with split key blocks; the others (TPU interpret
# is slow) the ragged batch-2 case, GPU v2 with both tilings
SEG_RUNS = ([("gpu", "v1", c, t) for c in SEG_CASES for t in (None, "kv2")]
            + [("gpu", "v2", SEG_CASES[0], t) for t in (None, "kv2")]
            + [(b, "v" + v, SEG_CASES[0], None) for b, v in (("tpu", "1"), ("tpu", "2"))])


@pytest.mark.parametrize("backend,design,case,block_sizes", [
    pytest.param(*r, id=f"{r[0]}-{r[1]}-{case_id(r[2])}-{r[3] or 'default'}") for r in SEG_RUNS])
def test_segments_vs_oracle(backend, design, case, block_sizes):
    """Segment ids in every kernel (GPU and TPU interpret, v1 and v2): forward, lse and dq/dk/dv against the
    float64 oracle. Segments of 35 (whole blocks of one segment: the mask-free path), 1, 13 and 7 tokens, then
    padding (its own segment, then the padded tail of a ragged sequence)."""
    batch, seq_q, seq_k = case[:3]
    seg = packed_segments(batch, seq_q, [35, 1, 13, 7])
    tiles = None
    if block_sizes == "kv2":
        tiles = BlockSizes(block_q=case[6] // 2, block_q_dq=case[6], block_q_dkv=case[6] // 2, kv_step=2,
                           kv_step_dq=2, dkv_split=1)
    run_case(case, jnp.float32, backend, 19, block_sizes=tiles, segments=(seg, seg), variant=design)


@pytest.mark.parametrize("backend,design", SEG_KERNELS, ids=lambda x: x)
def test_segments_decoding_like(backend, design):
    """q_segment_ids / kv_segment_ids with seq_q < seq_k (q_offset 70)."""
    case = CASES[4]
    kv = packed_segments(1, 90, [30, 1, 41])
    run_case(case, jnp.float32, backend, 3, segments=(kv[:, 70:], kv), variant=design)


@pytest.mark.parametrize("backend,design", SEG_KERNELS, ids=lambda x: x)
def test_segments_none_unchanged_and_unsupported(backend, design, monkeypatch):
    q = jax.ShapeDtypeStruct((1, 64, 2, 16), jnp.float32)
    idx = jax.ShapeDtypeStruct((1, 2, 4, 2), jnp.int32)
    cnt = jax.ShapeDtypeStruct((1, 2, 4), jnp.int32)
    f = lambda **kw: lambda q, i, c: block_sparse_attention(q, q, q, i, c, block_size=16, interpret=True,
                                                           backend=backend, variant=design, **kw)
    assert jax.jit(f()).lower(q, idx, cnt).as_text() == \
        jax.jit(f(segment_ids=None)).lower(q, idx, cnt).as_text()
    from pallas_kernels.block_sparse import attention

    monkeypatch.setattr(attention, "_SEGMENT_KERNELS", ())  # every kernel takes them now: the guard still works
    seg = jnp.zeros((1, 64), jnp.int32)
    with pytest.raises(NotImplementedError, match="segment ids"):
        block_sparse_attention(jnp.zeros((1, 64, 2, 16)), jnp.zeros((1, 64, 2, 16)), jnp.zeros((1, 64, 2, 16)),
                               jnp.zeros((1, 2, 4, 2), jnp.int32), jnp.zeros((1, 2, 4), jnp.int32), block_size=16,
                               backend=backend, variant=design, interpret=True, segment_ids=seg)
