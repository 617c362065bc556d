"""pallas_kernels.chunked_scan: forward, final state and every gradient against a float64 numpy recurrence.

The kernels run in interpret mode here: the GPU (Triton) kernels in Pallas interpret mode and the TPU
(Mosaic) kernels in TPU interpret mode. ``python -m pallas_kernels.chunked_scan.check`` runs the same
comparisons compiled on a GPU.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lizard_jax import numerics
from pallas_kernels.chunked_scan import VARIANTS, BlockSizes, gla, gla_chunk_reference
from pallas_kernels.chunked_scan import tpu as tpu_kernels
from pallas_kernels.chunked_scan.reference import recurrence_f64 as oracle


@dataclasses.dataclass(frozen=True)
class Case:
    batch: int
    seq: int
    heads: int
    dk: int
    dv: int
    gate: str  # weak (~ -0.01), moderate (logsigmoid(randn)), strong (~ -5), mixed (dims ~0 to < -10), extreme (~ -20)
    per_head: bool = False
    dtype: str = "float32"
    h0: bool = True
    ht: bool = True
    block_sizes: BlockSizes | None = None

    @property
    def id(self) -> str:
        dt = {"float32": "fp32", "bfloat16": "bf16"}[self.dtype]
        extra = ("-h0" if self.h0 else "") + ("-ht" if self.ht else "") + (
            f"-C{self.block_sizes.chunk}" if self.block_sizes else "")
        return (f"B{self.batch}-T{self.seq}-H{self.heads}-K{self.dk}-V{self.dv}-{self.gate}-"
                f"{'head' if self.per_head else 'dim'}-{dt}{extra}")


def make_inputs(case: Case, seed: int):
    """Fresh random inputs, rounded to the case's dtype; float64 numpy copies for the oracle."""
    rng = np.random.default_rng(seed)
    b, t, h, dk, dv = case.batch, case.seq, case.heads, case.dk, case.dv
    ng = 1 if case.per_head else dk
    shape_g = (b, t, h, ng)
    if case.gate == "weak":
        g = -0.01 * rng.uniform(0.5, 1.5, shape_g)
    elif case.gate == "moderate":
        g = -np.logaddexp(0.0, -rng.standard_normal(shape_g))  # logsigmoid(randn)
    elif case.gate == "strong":
        g = -5.0 * rng.uniform(0.5, 1.5, shape_g)
    elif case.gate == "mixed":
        g = -np.logaddexp(0.0, -4.0 * rng.standard_normal(shape_g))  # per dim from ~0 to below -10
    elif case.gate == "extreme":
        g = -20.0 * rng.uniform(0.5, 1.0, shape_g)
    else:
        raise ValueError(case.gate)
    dt = jnp.dtype(case.dtype)
    q, k = (jnp.asarray(rng.standard_normal((b, t, h, dk)), dt) for _ in range(2))
    v, do = (jnp.asarray(rng.standard_normal((b, t, h, dv)), dt) for _ in range(2))
    log_g = jnp.asarray(g, dt)
    h0 = jnp.asarray(rng.standard_normal((b, h, dk, dv)), jnp.float32)
    dht = jnp.asarray(rng.standard_normal((b, h, dk, dv)), jnp.float32)
    return q, k, v, log_g, h0, do, dht


def run_case(case: Case, backend: str, seed: int = 0, variant: str = "v1"):
    """Relative errors of o, S_T and every gradient against the oracle."""
    q, k, v, log_g, h0, do, dht = make_inputs(case, seed)

    def f(q, k, v, log_g, h0):
        return gla(q, k, v, log_g, initial_state=h0 if case.h0 else None, return_final_state=True,
                   backend=backend, interpret=True, block_sizes=case.block_sizes, variant=variant)

    dht_used = dht if case.ht else jnp.zeros_like(dht)
    (o, ht), (dq, dk, dv, dg, dh0) = fwd_vjp(f, (q, k, v, log_g, h0), (do, dht_used))
    to64 = [np.asarray(x.astype(jnp.float32), np.float64) for x in (q, k, v, log_g, do)]
    h0_used = np.asarray(h0, np.float64) if case.h0 else np.zeros(h0.shape)
    ro, rht, rg = oracle(*to64[:4], h0_used, to64[4], np.asarray(dht_used, np.float64))
    # the floor of the inputs' dtype: bf16 inputs' rounding alone is measured against the global scale
    err = functools.partial(numerics.rel_err, floor=numerics.scale_floor(case.dtype, numerics.RTOL[case.dtype]))
    errs = {
        "o": err(o.astype(jnp.float32), ro),
        "ht": err(ht, rht),
        "dq": err(dq.astype(jnp.float32), rg["q"]),
        "dk": err(dk.astype(jnp.float32), rg["k"]),
        "dv": err(dv.astype(jnp.float32), rg["v"]),
        "dlog_g": err(dg.astype(jnp.float32), rg["log_g"]),
    }
    if case.h0:
        errs["dh0"] = err(dh0, rg["h0"])
    assert o.dtype == v.dtype and o.shape == v.shape
    assert ht.dtype == jnp.float32 and ht.shape == h0.shape
    for x, ref in ((dq, q), (dk, k), (dv, v), (dg, log_g)):
        assert x.dtype == ref.dtype and x.shape == ref.shape
    return errs


def fwd_vjp(f, primals, cotangents):
    """``f``'s outputs and vjp at ``cotangents``, in one jitted program (eager dispatch of interpret-mode
    kernels is slow)."""
    def run(primals, cotangents):
        out, vjp = jax.vjp(f, *primals)
        return out, vjp(cotangents)
    return jax.jit(run)(primals, cotangents)


def assert_errs(errs, dtype):
    tol = numerics.RTOL[dtype]
    bad = {name: err for name, err in errs.items() if not err <= tol}
    assert not bad, f"over {tol:.0e}: " + ", ".join(f"{n}={e:.2e}" for n, e in bad.items()) + f" (all: {errs})"


SMALL = BlockSizes(chunk=16, block_k=16, block_v=16, block_v_out=16, block_k_bwd=16, block_v_bwd=16,
                   block_v_dv=16, block_k_dv=16, block_k_dqk=16)

CASES = [
    Case(2, 37, 3, 32, 64, "moderate"),
    Case(1, 130, 1, 64, 16, "moderate", per_head=True, h0=False, block_sizes=SMALL),  # 4 dk tiles add dlog_g
    Case(2, 64, 1, 16, 32, "strong", ht=False),
    Case(1, 1, 3, 16, 16, "weak"),
    Case(2, 130, 3, 32, 32, "weak", dtype="bfloat16"),
    Case(1, 37, 1, 16, 16, "strong", per_head=True, dtype="bfloat16", h0=False, ht=False),
    Case(1, 70, 2, 32, 64, "mixed", block_sizes=SMALL),  # chunks of 16: fast and exact paths side by side
    Case(3, 20, 1, 24, 40, "weak", per_head=True),  # batch 3, head dims padded inside (24 -> 32, 40 -> 64)
    Case(1, 16, 2, 128, 128, "moderate"),  # the production tile: dk = dv = 128, default block sizes
]

SLOW_CASES = [
    Case(2, 130, 3, 64, 16, "strong"),
    Case(3, 64, 2, 16, 64, "weak", per_head=True),
    Case(2, 130, 2, 32, 32, "mixed"),
    Case(1, 130, 3, 32, 64, "moderate", dtype="bfloat16", block_sizes=SMALL),
    Case(2, 37, 3, 24, 40, "moderate"),  # head dims padded inside
    Case(1, 200, 2, 16, 16, "extreme", per_head=True),
    Case(2, 1, 1, 32, 16, "strong", dtype="bfloat16"),
]


# the TPU kernels run in the slower TPU interpret mode: by default a subset covering the fast, exact and
# per-head paths, bf16, T=1 and the 128 tile; every case under -m slow
TPU_CASES = [CASES[i] for i in (0, 2, 3, 5, 8)]


# variant v2, a few small cases each (interpret mode is slow here): ragged lengths, dk != dv, h0/ht,
# per-dimension and per-head, bf16, the exact path, the 128 tile; SMALL at dv 64 gives the GPU backward
# four dv tiles whose dq/dk/dlog_g shares add up
V2_CASES = [CASES[i] for i in (0, 1, 2, 4, 5, 6, 8)] + [Case(1, 150, 1, 16, 16, "extreme", block_sizes=SMALL)]
# TPU v2 runs a chunk of 128 by default: lengths past it (several chunks, ragged) and one at chunks of 16
V2_TPU_CASES = [
    Case(1, 300, 2, 32, 64, "mixed"),
    Case(1, 37, 1, 16, 16, "strong", per_head=True, dtype="bfloat16", h0=False, ht=False),
    Case(1, 16, 2, 128, 128, "moderate"),
    Case(1, 150, 1, 16, 16, "extreme", block_sizes=SMALL),
]


def _v2_id(case):
    return f"v2-{case.id}"


class TestGLAKernelGPU:
    BACKEND = "gpu"  # the Triton kernels, in Pallas interpret mode

    @pytest.mark.parametrize("case", V2_CASES, ids=_v2_id)
    def test_v2_against_recurrence(self, case):
        assert_errs(run_case(case, self.BACKEND, seed=zlib.crc32(case.id.encode()), variant="v2"), case.dtype)

    @pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
    def test_against_recurrence(self, case):
        assert_errs(run_case(case, self.BACKEND, seed=zlib.crc32(case.id.encode())), case.dtype)

    @pytest.mark.slow
    @pytest.mark.parametrize("case", SLOW_CASES, ids=lambda c: c.id)
    def test_against_recurrence_sweep(self, case):
        assert_errs(run_case(case, self.BACKEND, seed=zlib.crc32(case.id.encode()) + 1), case.dtype)

    @pytest.mark.parametrize("variant", VARIANTS)
    def test_long_strong_decay_is_finite_and_exact(self, variant):
        """Several thousand tokens at log_g down to -20 per token: no NaN/inf, outputs and grads agree."""
        case = Case(1, 3000, 1, 16, 16, "extreme", h0=True, ht=True)
        assert_errs(run_case(case, self.BACKEND, seed=7, variant=variant), "float32")


class TestGLAKernelTPU(TestGLAKernelGPU):
    BACKEND = "tpu"  # the Mosaic kernels, in TPU interpret mode

    @pytest.mark.parametrize("case", V2_TPU_CASES, ids=_v2_id)
    def test_v2_against_recurrence(self, case):
        super().test_v2_against_recurrence(case)

    def test_v2_long_sequence_falls_back_to_hbm_states(self, monkeypatch):
        """States over the VMEM budget: v2 takes v1's two backward kernels, same results."""
        monkeypatch.setattr(tpu_kernels, "V2_STATES_VMEM", 0)
        case = Case(1, 300, 1, 16, 32, "moderate")
        assert_errs(run_case(case, self.BACKEND, seed=4, variant="v2"), case.dtype)

    @pytest.mark.parametrize("case", TPU_CASES, ids=lambda c: c.id)
    def test_against_recurrence(self, case):
        super().test_against_recurrence(case)

    @pytest.mark.slow
    @pytest.mark.parametrize("case", [c for c in CASES if c not in TPU_CASES] + SLOW_CASES, ids=lambda c: c.id)
    def test_against_recurrence_sweep(self, case):
        super().test_against_recurrence_sweep(case)

    @pytest.mark.slow
    @pytest.mark.parametrize("variant", VARIANTS)
    def test_long_strong_decay_is_finite_and_exact(self, variant):
        super().test_long_strong_decay_is_finite_and_exact(variant)


def test_chunk_reference_against_recurrence():
    """The pure-jnp chunk oracle (reference.py) equals the float64 recurrence, per dimension and per head."""
    for per_head in (False, True):
        case = Case(2, 45, 2, 8, 12, "strong" if per_head else "moderate", per_head=per_head)
        q, k, v, log_g, h0, do, dht = make_inputs(case, seed=3)
        o, ht = gla_chunk_reference(q, k, v, log_g, initial_state=h0, chunk=16)
        ro, rht, _ = oracle(q, k, v, log_g, h0, do, dht)
        numerics.assert_close(o, ro, dtype="float32", name="o")
        numerics.assert_close(ht, rht, dtype="float32", name="ht")


@pytest.mark.slow
def test_100k_tokens_strong_decay():
    """100K tokens at log_g in [-20, -10] per token (per dimension), GPU kernels in interpret mode."""
    case = Case(1, 100_000, 1, 16, 16, "extreme", h0=True, ht=True)
    assert_errs(run_case(case, "gpu", seed=11), "float32")


def test_under_shard_map():
    """Batch-sharded over the simulated CPU devices, as the ops layer runs it."""
    from jax.sharding import Mesh, PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
    case = Case(2, 40, 2, 16, 16, "moderate")
    q, k, v, log_g, h0, do, dht = make_inputs(case, seed=5)
    spec = P("data")
    # check_vma=False: pallas_call outputs carry no varying-axes annotation (as with jax's own Pallas ops)
    fn = jax.shard_map(lambda *a: gla(*a, backend="gpu", interpret=True), mesh=mesh, in_specs=(spec,) * 4,
                       out_specs=spec, check_vma=False)
    o = jax.jit(fn)(q, k, v, log_g)
    ro, _, _ = oracle(q, k, v, log_g, np.zeros(h0.shape), do, dht)
    numerics.assert_close(o, ro, dtype="float32", name="o")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(k_shape=(1, 8, 2, 8)), "differ"),
        (dict(v_shape=(1, 7, 2, 16)), "differ in batch, seq or heads"),
        (dict(g_shape=(1, 8, 2, 4)), "per dimension"),
        (dict(h0_shape=(1, 2, 16, 8)), "initial_state"),
        (dict(backend="cuda"), "backend"),
        (dict(variant="v3"), "variant"),
        (dict(v_dtype=jnp.bfloat16), "share one dtype"),
    ],
)
def test_validation(kwargs, match):
    q = jnp.ones((1, 8, 2, 16))
    k = jnp.ones(kwargs.get("k_shape", q.shape))
    v = jnp.ones(kwargs.get("v_shape", (1, 8, 2, 16)), kwargs.get("v_dtype", jnp.float32))
    g = -jnp.ones(kwargs.get("g_shape", q.shape))
    h0 = jnp.ones(kwargs["h0_shape"]) if "h0_shape" in kwargs else None
    with pytest.raises(ValueError, match=match):
        gla(q, k, v, g, initial_state=h0, backend=kwargs.get("backend", "gpu"), interpret=True,
            variant=kwargs.get("variant", "v1"))


def test_variants_exported():
    assert VARIANTS == ("v1", "v2")
    assert BlockSizes.get_default(128, 128, backend="tpu", variant="v2").chunk == 128
    assert BlockSizes.get_default(128, 128, backend="gpu", variant="v2").chunk == 64


def test_block_sizes_validated():
    with pytest.raises(ValueError, match="power of two"):
        BlockSizes(chunk=48)
    with pytest.raises(ValueError, match="does not divide"):
        gla(jnp.ones((1, 8, 1, 16)), jnp.ones((1, 8, 1, 16)), jnp.ones((1, 8, 1, 16)), -jnp.ones((1, 8, 1, 16)),
            interpret=True, block_sizes=BlockSizes(block_k=32))


def test_cost_model():
    """cost.py: v2's GPU forward reads q, k, v, g (and h0) once and writes o and the final state once, nothing
    else; v1 adds the per-chunk states' HBM round trip; launches and FLOPs as the kernels are written."""
    from pallas_kernels.chunked_scan.cost import cost

    b, t, h, d = 2, 1000, 3, 128
    seq = 1024  # padded to whole chunks of 64
    for per_dim in (True, False):
        kw = dict(batch=b, seq=t, heads=h, dk=d, dv=d, per_dim=per_dim, dtype="bfloat16")
        v1, v2 = cost("v1", mode="fwd", **kw), cost("v2", mode="fwd", **kw)
        tokens = b * seq * h
        io = 2 * tokens * (3 * d + (d if per_dim else 1)) + 2 * tokens * d + 2 * b * h * d * d * 4
        assert v2.hbm_bytes == io and v2.launches == 1
        states = b * h * (seq // 64) * d * d * 2
        assert v1.hbm_bytes == io + 2 * states + 2 * tokens * (2 * d + (d if per_dim else 1)) and v1.launches == 2
        assert 0 < v2.flops <= v1.flops
        f1, f2 = cost("v1", mode="fwd_bwd", **kw), cost("v2", mode="fwd_bwd", **kw)
        assert (f1.launches, f2.launches) == (6, 4)  # v2: forward, states, fused backward, dv-tile share sum
        assert f2.flops < f1.flops
        # dv in two tiles, v2 writes float32 dq/dk shares (per dim: more bytes than v1); in one tile, fewest
        one_tile = dataclasses.replace(BlockSizes.get_default(d, d, variant="v2"), block_v_bwd=d)
        f2_one = cost("v2", mode="fwd_bwd", block_sizes=one_tile, **kw)
        assert f2_one.launches == 3 and f2_one.hbm_bytes < min(f1.hbm_bytes, f2.hbm_bytes)
        assert cost("v1", mode="fwd_bwd", segments=True, **kw) == f1  # the starts ride in log_g (-inf)
        t1, t2 = (cost(var, mode="fwd_bwd", backend="tpu", **kw) for var in VARIANTS)
        assert (t1.launches, t2.launches) == (3, 2) and t2.hbm_bytes < t1.hbm_bytes
    with pytest.raises(ValueError, match="mode"):
        cost("v2", batch=1, seq=8, heads=1, dk=16, dv=16, per_dim=True, dtype="float32", mode="bwd")


# ----------------------------------------------------------------------------- packed documents (issue #19)

# two rows of 45 tokens at chunks of 16 (SMALL): row 0 has ragged documents, one of length 1, a boundary
# exactly at a chunk boundary (16) and mid-chunk ones (5, 17, 33), then 3 tokens of padding (its own
# segment); row 1 ends with a real document (the final state is that document's)
SEGMENT_ROWS = ([5, 11, 1, 16, 9, 3], [16, 1, 20, 8])


def segment_ids_of(rows):
    return np.stack([np.concatenate([np.full(n, i) for i, n in enumerate(lens)]) for lens in rows]).astype(np.int32)


def documents_alone(rows, *arrays):
    """Each document of the packed rows as its own row starting at t = 0, zero-padded at the end to the longest:
    ``[documents, max_len, ...]`` per array, and the (row, start, length) of each."""
    docs = [(b, sum(lens[:i]), n) for b, lens in enumerate(rows) for i, n in enumerate(lens)]
    width = max(n for _, _, n in docs)
    out = [np.stack([np.pad(np.asarray(x[b, s:s + n], np.float32), [(0, width - n)] + [(0, 0)] * (x.ndim - 2))
                     for b, s, n in docs]) for x in arrays]
    return docs, out


def packed_vs_alone(gla_fn, rows, heads, dk, dv, per_head, gate, seed=0):
    """``gla_fn(q, k, v, log_g, h0, segment_ids) -> (o, ht)`` on the packed rows against the same function on each
    document alone (one call, the documents as rows, segment_ids None) to ``FORMS_RTOL``, and against the float64
    recurrence of each document to the float32 tolerance: outputs, final state (the last segment's) and the
    gradients of sum(o*do) + sum(ht*dht) wrt q, k, v, log_g, h0 (h0 feeds the first document of a row only, dht
    the last; a document start's log_g gradient is exactly 0)."""
    seg = segment_ids_of(rows)
    batch, seq = seg.shape
    q, k, v, log_g, h0, do, dht = make_inputs(Case(batch, seq, heads, dk, dv, gate, per_head=per_head), seed)
    (o, ht), g = fwd_vjp(lambda *a: gla_fn(*a[:5], a[5]), (q, k, v, log_g, h0, jnp.asarray(seg)), (do, dht))
    grads = dict(zip(("q", "k", "v", "log_g", "h0"), g))

    docs, (dq_, dk_, dv_, dg_, ddo) = documents_alone(rows, q, k, v, log_g, do)
    first = np.array([s == 0 for _, s, _ in docs])
    lastd = np.array([s + n == seq for _, s, n in docs])
    rows_of = np.array([b for b, _, _ in docs])
    h0_d = np.where(first[:, None, None, None], np.asarray(h0)[rows_of], 0.0).astype(np.float32)
    dht_d = np.where(lastd[:, None, None, None], np.asarray(dht)[rows_of], 0.0).astype(np.float32)
    (o_a, ht_a), g_a = fwd_vjp(lambda *a: gla_fn(*a, None), tuple(map(jnp.asarray, (dq_, dk_, dv_, dg_, h0_d))),
                               (jnp.asarray(ddo), jnp.asarray(dht_d)))
    grads_a = dict(zip(("q", "k", "v", "log_g", "h0"), g_a))

    x64 = {n: np.asarray(x, np.float64) for n, x in dict(q=q, k=k, v=v, log_g=log_g, do=do).items()}
    close = functools.partial(numerics.assert_close, dtype="float32")
    for d, (b, s, n) in enumerate(docs):
        sl = slice(s, s + n)
        what = f"row {b} document tokens {s}..{s + n - 1}"
        ro, rht, rg = oracle(*(x64[name][b:b + 1, sl] for name in ("q", "k", "v", "log_g")),
                             np.asarray(h0_d[d:d + 1], np.float64), x64["do"][b:b + 1, sl],
                             np.asarray(dht_d[d:d + 1], np.float64))
        pairs = [("o", o[b:b + 1, sl], o_a[d:d + 1, :n], ro)]
        pairs += [(f"d{name}", grads[name][b:b + 1, sl], grads_a[name][d:d + 1, :n], rg[name])
                  for name in ("q", "k", "v")]
        # the unpacked kernel's dlog_g at t = 0 with h0 = 0 is the rounding of a sum that cancels to 0; the
        # packed one is exactly 0 there (asserted below): compare the rest
        dg_alone = grads_a["log_g"][d:d + 1, :n] if first[d] else grads_a["log_g"][d:d + 1, :n].at[:, 0].set(0.0)
        pairs.append(("dlog_g", grads["log_g"][b:b + 1, sl], dg_alone, rg["log_g"]))
        if first[d]:
            pairs.append(("dh0", grads["h0"][b:b + 1], grads_a["h0"][d:d + 1], rg["h0"]))
        if lastd[d]:
            pairs.append(("final state", ht[b:b + 1], ht_a[d:d + 1], rht))
        for name, packed, alone, ref in pairs:
            close(packed, alone, rtol=numerics.FORMS_RTOL, name=f"{name}, {what}, packed vs alone")
            close(packed, ref, name=f"{name}, {what}, packed vs float64")
        if not first[d]:  # the gate of a document's first token multiplies a discarded state
            np.testing.assert_array_equal(np.asarray(grads["log_g"][b, s]), 0.0)


def _kernel_fn(backend, variant, block_sizes=SMALL):
    def fn(q, k, v, log_g, h0, seg):
        return gla(q, k, v, log_g, initial_state=h0, return_final_state=True, backend=backend, interpret=True,
                   block_sizes=block_sizes, variant=variant, segment_ids=seg)
    return fn


# (backend, variant, per_head, gate): "mixed" per dimension runs the folded fast path and the exact per-key
# path side by side; "extreme" forces the per-key path in every chunk
SEGMENT_CASES = [("gpu", "v1", False, "mixed"), ("gpu", "v2", True, "moderate"), ("tpu", "v1", True, "moderate"),
                 ("tpu", "v2", False, "extreme")]
SEGMENT_SLOW = [("gpu", "v1", True, "weak"), ("gpu", "v2", False, "extreme"), ("tpu", "v1", False, "mixed"),
                ("tpu", "v2", True, "moderate")]


def _seg_id(c):
    return f"{c[0]}-{c[1]}-{'head' if c[2] else 'dim'}-{c[3]}"


@pytest.mark.parametrize("case", SEGMENT_CASES, ids=_seg_id)
def test_segments_packed_equals_documents_alone(case):
    backend, variant, per_head, gate = case
    packed_vs_alone(_kernel_fn(backend, variant), SEGMENT_ROWS, 2, 16, 32, per_head, gate)


@pytest.mark.slow
@pytest.mark.parametrize("case", SEGMENT_SLOW, ids=_seg_id)
def test_segments_packed_equals_documents_alone_sweep(case):
    backend, variant, per_head, gate = case
    packed_vs_alone(_kernel_fn(backend, variant), SEGMENT_ROWS, 2, 16, 32, per_head, gate)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_segments_default_block_sizes_padded_dims(backend):
    """Default block sizes (chunk 64, TPU v2 128), head dims padded inside (24 -> 32 / 128): documents across
    and at the chunk boundary, the padded dims' -inf starts included."""
    rows = ([30, 34, 1, 70, 5], [64, 64, 12])
    for variant in VARIANTS:
        packed_vs_alone(_kernel_fn(backend, variant, None), rows, 1, 24, 40, False, "moderate")


def test_segments_single_segment_equals_none():
    """One segment everywhere (the mask path, no start) gives what segment_ids=None gives."""
    case = Case(1, 37, 2, 16, 16, "moderate")
    q, k, v, log_g, h0, do, dht = make_inputs(case, seed=2)
    kw = dict(initial_state=h0, return_final_state=True, interpret=True, block_sizes=SMALL)
    run = jax.jit(lambda q, k, v, log_g, h0, seg: gla(q, k, v, log_g, initial_state=h0, segment_ids=seg,
                                                      **{n: x for n, x in kw.items() if n != "initial_state"}))
    o, ht = run(q, k, v, log_g, h0, None)
    o1, ht1 = run(q, k, v, log_g, h0, jnp.full((1, 37), 7, jnp.int32))
    numerics.assert_close(o1, o, rtol=numerics.FORMS_RTOL, name="o")
    numerics.assert_close(ht1, ht, rtol=numerics.FORMS_RTOL, name="ht")
    with pytest.raises(ValueError, match="segment_ids"):
        gla(q, k, v, log_g, segment_ids=jnp.zeros((1, 36), jnp.int32), interpret=True)
    with pytest.raises(ValueError, match="segment_ids"):
        gla(q, k, v, log_g, segment_ids=jnp.zeros((1, 37), jnp.float32), interpret=True)
