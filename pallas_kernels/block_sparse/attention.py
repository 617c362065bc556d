"""Block-sparse attention kernel: custom_vjp over the per-backend forward/backward, and the public function.

Layering (as jax ``pallas/ops/tpu/flash_attention.py``): ``gpu.py`` / ``tpu.py`` hold ``_kernel(refs)`` and the
``forward`` / ``backward`` pallas_calls; here one ``custom_vjp`` binds them with a single static ``Static``
object, and ``block_sparse_attention`` validates shapes, pads sequences to whole blocks and crops.

Semantics (identical to ``lizard_jax.ops.sparse.reference``): query row i (absolute position i + q_offset)
in query block i // bs sees the keys of the first ``block_counts`` listed key blocks, and if causal only
keys j <= i + q_offset. A row that sees nothing outputs 0 with lse -inf. Listed indices are clipped into
range; entries past the count are never read. A block listed twice is counted twice (undefined input).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from pallas_kernels.block_sparse import gpu, gpu_v2, tpu, tpu_v2
from pallas_kernels.block_sparse.common import DESIGNS, BlockSizes, Static, normalize_indices
from pallas_kernels.segments import resolve_segments

_BACKENDS = {"gpu": gpu, "tpu": tpu}
_V2 = {"gpu": gpu_v2, "tpu": tpu_v2}
BLOCK_SIZES = (16, 32, 64, 128)
# (backend, variant) whose kernels take segment ids: all of them
_SEGMENT_KERNELS = (("gpu", "v1"), ("gpu", "v2"), ("tpu", "v1"), ("tpu", "v2"))


# v1 passes (idx, cnt) to every pass, which derives its own lists; v2 builds its work lists once (``plan``) in
# the forward rule and saves them as residuals, so the backward has no sort / searchsorted prologue.
# Segment ids (``seg``: None, or (q ids [B, Tq], k ids [B, Tk]) int32, padded) reach the kernels only when
# given (``st.segments``); with None the kernels, their inputs and this rule are exactly the unsegmented ones.
def _seg_kw(st: Static, seg):
    return {"seg": seg} if st.segments else {}


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(st: Static, q, k, v, idx, cnt, seg):
    if st.variant == "v2":
        mod = _V2[st.backend]
        return mod.forward(st, q, k, v, mod.plan(st, idx, cnt, backward=False, **_seg_kw(st, seg)),
                           **_seg_kw(st, seg))
    return _BACKENDS[st.backend].forward(st, q, k, v, idx, cnt, **_seg_kw(st, seg))


def _attention_fwd(st: Static, q, k, v, idx, cnt, seg):
    if st.variant == "v2":
        mod = _V2[st.backend]
        work = mod.plan(st, idx, cnt, backward=True, **_seg_kw(st, seg))
        o, lse = mod.forward(st, q, k, v, work, **_seg_kw(st, seg))
        return (o, lse), (q, k, v, work, o, lse, seg)
    o, lse = _BACKENDS[st.backend].forward(st, q, k, v, idx, cnt, **_seg_kw(st, seg))
    return (o, lse), (q, k, v, (idx, cnt), o, lse, seg)


def _attention_bwd(st: Static, res, cotangents):
    q, k, v, work, o, lse, seg = res
    do, dlse = cotangents
    if st.variant == "v2":
        dq, dk, dv = _V2[st.backend].backward(st, q, k, v, work, o, lse, do, dlse, **_seg_kw(st, seg))
    else:
        dq, dk, dv = _BACKENDS[st.backend].backward(st, q, k, v, *work, o, lse, do, dlse, **_seg_kw(st, seg))
    return dq, dk, dv, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def _check(q, k, v, block_indices, block_counts, block_size: int, backend: str, variant: str) -> None:
    if variant not in DESIGNS:
        raise ValueError(f"unknown {variant=}; expected one of {DESIGNS}")
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        raise ValueError(f"q, k, v must be [batch, seq, heads, d] with k == v in shape; got {q.shape=}, "
                         f"{k.shape=}, {v.shape=}")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"{q.shape=} and {k.shape=} differ in batch")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"{q.shape=} and {k.shape=} differ in head_dim")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"heads {q.shape[2]} is not a multiple of kv_heads {k.shape[2]}")
    if q.dtype != k.dtype or k.dtype != v.dtype:
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"{block_size=} must be one of {BLOCK_SIZES}")
    if backend not in _BACKENDS:
        raise ValueError(f"unknown {backend=}; expected one of {tuple(_BACKENDS)}")
    n_qb = -(-q.shape[1] // block_size)
    want = (q.shape[0], k.shape[2], n_qb)
    if block_indices.ndim != 4 or block_indices.shape[:3] != want:
        raise ValueError(f"{block_indices.shape=} must be [batch, kv_heads, ceil(seq_q/block_size), max_blocks]"
                         f" = [{want[0]}, {want[1]}, {want[2]}, max_blocks]")
    if block_counts.shape != want:
        raise ValueError(f"{block_counts.shape=} must be {want}")


def block_sparse_attention(q, k, v, block_indices, block_counts, *, block_size: int = 64, causal: bool = True,
                           scale: float | None = None, q_offset: int | None = None, return_lse: bool = False,
                           block_sizes: BlockSizes | None = None, backend: str | None = None,
                           interpret: bool = False, debug: bool = False, variant: str | None = None,
                           segment_ids=None, q_segment_ids=None, kv_segment_ids=None):
    """Block-sparse attention over selected key blocks (forward and backward in Pallas).

    Args:
      q: ``[batch, seq_q, heads, d]``; k, v: ``[batch, seq_k, kv_heads, d]`` (heads a multiple of kv_heads).
      block_indices: int32 ``[batch, kv_heads, ceil(seq_q / block_size), max_blocks]`` key-block indices.
      block_counts: int32 ``[batch, kv_heads, ceil(seq_q / block_size)]``; entries used per query block.
      block_size: 16, 32, 64 or 128 (query and key blocks alike).
      causal: also mask keys after each query's absolute position.
      scale: softmax scale, default ``1 / sqrt(d)``.
      q_offset: absolute position of query row 0, default ``seq_k - seq_q``.
      return_lse: also return lse float32 ``[batch, heads, seq_q]`` (differentiable too).
      block_sizes: GPU tiles (``BlockSizes.get_default`` if None); the TPU kernels take whole blocks.
      backend: "gpu" (Pallas Triton) or "tpu" (Pallas Mosaic); default from ``jax.default_backend()``.
      interpret: run in interpret mode (CPU tests; TPU uses ``pltpu.InterpretParams``).
      variant: kernel design, one of ``DESIGNS`` ("v1" default; "v2": work lists built once and saved for the
        backward, one loop masking only the steps that need it, dk/dv from ``s^T = k q^T``; see ``gpu_v2.py``).

      segment_ids: int ``[batch, seq]`` (self-attention, seq_q == seq_k), or ``q_segment_ids [batch, seq_q]``
        with ``kv_segment_ids [batch, seq_k]``: packed documents; a row sees only keys of its own segment. Passed
        to the kernels as two int32 vectors loaded per tile and combined into the mask, forward and backward;
        None (default): kernels and inputs exactly the unsegmented ones.

    Returns o ``[batch, seq_q, heads, d]`` in q.dtype, and lse if asked.
    """
    if backend is None:
        backend = "tpu" if jax.default_backend() == "tpu" else "gpu"
    variant = "v1" if variant is None else variant
    _check(q, k, v, block_indices, block_counts, block_size, backend, variant)
    q_seg, k_seg = resolve_segments(q.shape[1], k.shape[1], q.shape[0], segment_ids, q_segment_ids,
                                    kv_segment_ids)
    if q_seg is not None and (backend, variant) not in _SEGMENT_KERNELS:
        raise NotImplementedError(f"segment ids: the {backend} {variant} kernel does not take them yet; "
                                  f"kernels that do: {_SEGMENT_KERNELS} (or impl='xla')")
    batch, seq_q, heads, d = q.shape
    seq_k, kv_heads = k.shape[1], k.shape[2]
    bs = block_size
    n_qb, n_kb = -(-seq_q // bs), -(-seq_k // bs)
    if block_sizes is None:
        block_sizes = BlockSizes.get_default(bs, heads // kv_heads, jnp.dtype(q.dtype).itemsize, variant=variant)
    block_sizes.validate(bs, heads // kv_heads)
    st = Static(
        block_size=bs,
        causal=bool(causal),
        scale=float(1.0 / math.sqrt(d) if scale is None else scale),
        q_offset=int(seq_k - seq_q if q_offset is None else q_offset),
        seq_q=seq_q,
        seq_k=seq_k,
        backend=backend,
        interpret=bool(interpret),
        block_sizes=block_sizes,
        debug=debug,
        variant=variant,
        segments=q_seg is not None,
    )
    idx, cnt = normalize_indices(block_indices, block_counts, n_kb)
    seg = None
    if q_seg is not None:  # padded rows -1, padded keys -2 (masked by seq_k anyway; padded rows are cropped)
        seg = (jnp.pad(q_seg, ((0, 0), (0, n_qb * bs - seq_q)), constant_values=-1),
               jnp.pad(k_seg, ((0, 0), (0, n_kb * bs - seq_k)), constant_values=-2))
    pad_q, pad_k = n_qb * bs - seq_q, n_kb * bs - seq_k
    if pad_q:
        q = jnp.pad(q, ((0, 0), (0, pad_q), (0, 0), (0, 0)))
    if pad_k:
        k = jnp.pad(k, ((0, 0), (0, pad_k), (0, 0), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, pad_k), (0, 0), (0, 0)))
    o, lse = _attention(st, q, k, v, idx, cnt, seg)
    o, lse = o[:, :seq_q], lse[:, :, :seq_q]
    return (o, lse) if return_lse else o
