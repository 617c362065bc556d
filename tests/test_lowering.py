"""Every variant of both Pallas kernels, forward + backward, lowers for the GPU (Triton, sm_90) and for the TPU
(Mosaic) at the production shapes, from a CPU-only machine: nothing is compiled or run (``trace().lower()``).

Shapes: GLA B8 H16 T4096 D128 bf16 with per-dimension and per-head gates; block-sparse B1 H16 KV4 D128 T32768
bf16 with 1/8 of the key blocks selected (64 of 512 per query block). One lowering per case of a function that
returns the output and all input gradients (the custom_vjp's forward rule and backward), so every kernel
launch of the variant is in the module. Test ids name kernel, variant, gate and platform, e.g.
``gla-v2-perdim-cuda``; a failure says which kernel, variant and shape.

Lowering for CUDA without a GPU (jax >= 0.11). jax 0.10's Pallas Triton lowering took the compute capability
from ``jax.local_devices(backend="gpu")`` and fell back to sm_90 when there was no GPU
(``jax/_src/pallas/triton/pallas_call_registration.py``, ``except RuntimeError: arch_name = "9.0"``). jax
0.11 replaced that with ``gpu_info.get_gpu_info()`` (``jax/_src/pallas/triton/gpu_info.py``, new in 0.11): it
maps a *device kind* ("NVIDIA H200" -> arch 9.0, cc 90) read from the abstract mesh's ``abstract_device`` if
one is set, else from ``pxla.get_default_device()`` -- here the CPU, device kind "cpu", so ``ValueError:
Unsupported GPU device kind`` is re-raised by ``pallas_call_registration.pallas_call_lowering`` as
``RuntimeError: No supported GPU devices found, please specify an abstract GPU device using AbstractDevice``:
``test_lowers[cuda-*]`` failed on jax 0.11.2 without a GPU for that reason (reproduced on a CPU machine with
jax 0.11.2). The fix is the one that error asks for: lower inside ``jax.sharding.use_abstract_mesh`` of an
empty ``AbstractMesh`` whose ``AbstractDevice`` is an H200 (``lizard_jax.testing.target_gpu``). The target is explicit
(sm_90, as the production GPU) whatever machine runs the test, and on jax 0.10 the context is harmless (its
lowering never reads it; it still falls back to sm_90). The TPU lowering (Mosaic) never needed a device.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import pytest

from lizard_jax.testing import TARGET_GPU, target_gpu
import pallas_kernels.block_sparse as bsp
import pallas_kernels.chunked_scan as cs
from pallas_kernels.block_sparse import block_sparse_attention
from pallas_kernels.chunked_scan import gla

GLA_VARIANTS = cs.VARIANTS
SPARSE_DESIGNS = bsp.DESIGNS
PLATFORMS = {"cuda": "gpu", "tpu": "tpu"}  # lowering platform -> the kernels' backend argument

GLA_SHAPE = dict(batch=8, seq=4096, heads=16, dk=128, dv=128, dtype="bfloat16")
SPARSE_SHAPE = dict(batch=1, seq=32768, heads=16, kv_heads=4, head_dim=128, block_size=64, frac=8,
                    dtype="bfloat16")
def _lower(fn, args, platform: str, what: str) -> str:
    t0 = time.perf_counter()
    try:
        with target_gpu(platform):
            text = jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()
    except Exception as e:
        raise AssertionError(f"{what}: lowering for {platform} failed: {type(e).__name__}: {e}") from e
    print(f"{what} -> {platform}: lowered in {time.perf_counter() - t0:.1f} s")
    return text


def _kernels(text: str, platform: str) -> int:
    """Pallas kernel calls in a lowered module."""
    return text.count("__gpu$xla.gpu.triton") + text.count("triton_kernel_call") if platform == "cuda" \
        else text.count("tpu_custom_call")


def _gla_case(variant, gate, platform):
    s = GLA_SHAPE
    dt = jnp.dtype(s["dtype"])
    x = jax.ShapeDtypeStruct((s["batch"], s["seq"], s["heads"], s["dk"]), dt)
    g = jax.ShapeDtypeStruct((s["batch"], s["seq"], s["heads"], s["dk"] if gate == "perdim" else 1), dt)
    kw = dict(variant=variant) if len(GLA_VARIANTS) > 1 else {}

    def fwd_bwd(q, k, v, g, do):
        o, vjp = jax.vjp(lambda *a: gla(*a, backend=PLATFORMS[platform], **kw), q, k, v, g)
        return o, vjp(do)

    return fwd_bwd, (x, x, x, g, x)


GLA_CASES = [pytest.param(v, g, p, id=f"gla-{v}-{g}-{p}") for v in GLA_VARIANTS for g in ("perdim", "perhead")
             for p in PLATFORMS]


@pytest.mark.parametrize("variant,gate,platform", GLA_CASES)
def test_gla_lowers(variant, gate, platform):
    fn, args = _gla_case(variant, gate, platform)
    what = f"gla variant={variant} gate={gate} shape={GLA_SHAPE}"
    text = _lower(fn, args, platform, what)
    # v1: forward 2 launches + backward 4; v2: fewer, but always a forward and a backward kernel
    assert _kernels(text, platform) >= 2, f"{what}: no Pallas kernels in the {platform} module"


def _sparse_case(design, platform):
    s = SPARSE_SHAPE
    dt = jnp.dtype(s["dtype"])
    b, t, h, kvh, d, bs = s["batch"], s["seq"], s["heads"], s["kv_heads"], s["head_dim"], s["block_size"]
    n = t // bs
    q = jax.ShapeDtypeStruct((b, t, h, d), dt)
    k = jax.ShapeDtypeStruct((b, t, kvh, d), dt)
    idx = jax.ShapeDtypeStruct((b, kvh, n, n // s["frac"]), jnp.int32)
    cnt = jax.ShapeDtypeStruct((b, kvh, n), jnp.int32)
    kw = dict(variant=design) if len(SPARSE_DESIGNS) > 1 else {}

    def fwd_bwd(q, k, v, i, c, do):
        f = lambda q, k, v: block_sparse_attention(q, k, v, i, c, block_size=bs, backend=PLATFORMS[platform], **kw)
        o, vjp = jax.vjp(f, q, k, v)
        return o, vjp(do)

    return fwd_bwd, (q, k, k, idx, cnt, q)


SPARSE_CASES = [pytest.param(d, p, id=f"sparse-{d}-{p}") for d in SPARSE_DESIGNS for p in PLATFORMS]


@pytest.mark.parametrize("design,platform", SPARSE_CASES)
def test_block_sparse_lowers(design, platform):
    fn, args = _sparse_case(design, platform)
    what = f"block_sparse design={design} shape={SPARSE_SHAPE}"
    text = _lower(fn, args, platform, what)
    assert _kernels(text, platform) >= 2, f"{what}: no Pallas kernels in the {platform} module"


def test_cuda_target_is_explicit_sm90():
    """The CUDA lowering's target comes from ``target_gpu`` (jax >= 0.11 reads it; jax 0.10 falls back to the
    same sm_90 without a GPU)."""
    try:
        from jax._src.pallas.triton import gpu_info
    except ImportError:
        pytest.skip(f"jax {jax.__version__} has no pallas.triton.gpu_info (its lowering falls back to sm_90)")
    with target_gpu("cuda"):
        info = gpu_info.get_gpu_info()
    assert (info.arch_name, info.compute_capability) == ("9.0", 90)


# (design, platform) whose kernels take segment ids (issue #19): every design, both platforms
SEGMENT_KERNELS = tuple((d, p) for d in SPARSE_DESIGNS for p in PLATFORMS)


@pytest.mark.parametrize("design,platform", [pytest.param(d, p, id=f"sparse-seg-{d}-{p}")
                                             for d, p in SEGMENT_KERNELS])
def test_block_sparse_segments_lower(design, platform):
    """The block-sparse kernels with segment ids (packed documents) at the production shape, forward +
    backward: the two int32 id vectors reach the kernels."""
    fn, args = _sparse_case(design, platform)
    s = SPARSE_SHAPE
    seg = jax.ShapeDtypeStruct((s["batch"], s["seq"]), jnp.int32)

    def fwd_bwd(q, k, v, i, c, do, seg):
        f = lambda q, k, v: block_sparse_attention(q, k, v, i, c, block_size=s["block_size"],
                                                   backend=PLATFORMS[platform], variant=design, segment_ids=seg)
        o, vjp = jax.vjp(f, q, k, v)
        return o, vjp(do)

    what = f"block_sparse segments design={design} shape={SPARSE_SHAPE}"
    text = _lower(fwd_bwd, (*args, seg), platform, what)
    assert _kernels(text, platform) >= 2, f"{what}: no Pallas kernels in the {platform} module"


@pytest.mark.parametrize("variant,gate,platform", [pytest.param(v, g, p, id=f"gla-seg-{v}-{g}-{p}")
                                                   for v in GLA_VARIANTS for g in ("perdim", "perhead")
                                                   for p in PLATFORMS])
def test_gla_segments_lower(variant, gate, platform):
    """The chunked GLA kernels with segment ids (packed documents, issue #19) at the production shape, forward +
    backward, per-dimension (the folded path) and per-head gates: the starts ride in log_g as -inf, so the
    kernels take the same inputs and compile their masked form (``Config.resets``)."""
    fn, args = _gla_case(variant, gate, platform)
    s = GLA_SHAPE
    seg = jax.ShapeDtypeStruct((s["batch"], s["seq"]), jnp.int32)

    def fwd_bwd(q, k, v, g, do, seg):
        o, vjp = jax.vjp(lambda *a: gla(*a, backend=PLATFORMS[platform], variant=variant, segment_ids=seg), q, k, v, g)
        return o, vjp(do)

    what = f"gla segments variant={variant} gate={gate} shape={GLA_SHAPE}"
    text = _lower(fwd_bwd, (*args, seg), platform, what)
    assert _kernels(text, platform) >= 2, f"{what}: no Pallas kernels in the {platform} module"
