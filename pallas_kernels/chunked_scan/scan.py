"""Chunked GLA kernel: custom_vjp over the per-backend forward/backward, and the public function.

Layering (as ``block_sparse/attention.py``): ``gpu.py`` / ``tpu.py`` hold the kernels and their ``forward`` /
``backward`` launches over ``common.py``'s per-chunk math; here one ``custom_vjp`` binds them with a single static
``Config``, and ``gla`` validates shapes, pads head dims and the sequence, and crops.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.chunked_scan import gpu, gpu_v2, tpu
from pallas_kernels.chunked_scan.common import BACKENDS, DTYPES, F32, VARIANTS, BlockSizes, Config

# (backend, variant) -> the module with forward(cfg, ...) and backward(cfg, ...); the TPU module reads the
# variant itself (v2: a chunk of 128 and, where the states fit VMEM, a backward without HBM states)
_KERNELS = {("gpu", "v1"): gpu, ("gpu", "v2"): gpu_v2, ("tpu", "v1"): tpu, ("tpu", "v2"): tpu}


def _forward(cfg, q, k, v, g, h0):
    return _KERNELS[cfg.backend, cfg.variant].forward(cfg, q, k, v, g, h0)


def _forward_res(cfg, q, k, v, g, h0):
    # the states are recomputed in the backward pass: residuals are the inputs only
    return _forward(cfg, q, k, v, g, h0), (q, k, v, g, h0)


def _backward(cfg, res, cts):
    q, k, v, g, h0 = res
    do, dht = cts
    dq, dk, dv, dg, dh0 = _KERNELS[cfg.backend, cfg.variant].backward(cfg, q, k, v, g, h0, do, dht.astype(F32))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dg.astype(g.dtype), dh0.astype(h0.dtype)


@functools.lru_cache(maxsize=None)
def _gla_vjp(cfg: Config):
    """(q, k, v, g, h0) -> (o, ht) on padded arrays, differentiable; custom_vjp sees arrays only."""
    fn = jax.custom_vjp(functools.partial(_forward, cfg))
    fn.defvjp(functools.partial(_forward_res, cfg), functools.partial(_backward, cfg))
    return fn


def _pad_dim(backend: str, d: int) -> int:
    if backend == "tpu":  # (8, 128) tiles: head dims to lane multiples
        return -(-d // 128) * 128
    return max(16, 1 << (d - 1).bit_length())  # Triton tiles: powers of two, matrix products >= 16


def _pad_to(x, shape):
    pads = [(0, s - d) for d, s in zip(x.shape, shape)]
    return jnp.pad(x, pads) if any(p for _, p in pads) else x


def segment_starts(segment_ids):
    """bool ``[batch, seq]``: True where a new segment starts after the first token (t >= 1 and
    ``segment_ids[t] != segment_ids[t-1]``); position 0 continues the initial state."""
    changed = segment_ids[:, 1:] != segment_ids[:, :-1]
    return jnp.concatenate([jnp.zeros_like(changed[:, :1]), changed], axis=1)


def gla(
    q,
    k,
    v,
    log_g,
    *,
    initial_state=None,
    return_final_state: bool = False,
    backend: str = "gpu",
    interpret: bool = False,
    block_sizes: BlockSizes | None = None,
    variant: str = "v1",
    segment_ids=None,
):
    """Chunkwise-parallel gated linear attention as Pallas kernels, differentiable.

    Args:
      q, k: ``[batch, seq, heads, dk]``; v: ``[batch, seq, heads, dv]``; one dtype (float32, bfloat16, float16).
      log_g: ``[batch, seq, heads, dk]`` (per-dimension) or ``[batch, seq, heads, 1]`` (one decay per head),
        log forget gates, <= 0.
      initial_state: ``[batch, heads, dk, dv]`` (float32), or None for zeros.
      return_final_state: also return S_T, ``[batch, heads, dk, dv]`` float32.
      backend: "gpu" (Pallas Triton) or "tpu" (Mosaic). interpret: run the kernels in interpret mode
        (the TPU backend uses TPU interpret mode).
      block_sizes: ``BlockSizes``; default ``BlockSizes.get_default`` for the padded head dims, backend and
        variant.
      variant: one of ``VARIANTS``. "v1": per-chunk states through HBM (GPU: forward 2 launches, backward 4).
        "v2": the state carried on chip (GPU, ``gpu_v2.py``: forward 1 launch, backward 2; TPU: chunk 128,
        backward without HBM states where they fit VMEM). Same results to the tolerances.
      segment_ids: None, or int ``[batch, seq]`` equal within a document (packed documents): the state
        restarts at each segment start t (``segment_ids[t] != segment_ids[t-1]``), i.e. the log-gate there is
        -inf (the state is multiplied by exactly 0), handled exactly by the kernels (``common.chunk_gates``:
        a finite gate and masks). initial_state applies to the first segment only; S_T is the last
        segment's state. The gradient wrt log_g at a segment start is 0. None: the kernels and their inputs
        are those without segments.

    Returns:
      o ``[batch, seq, heads, dv]`` in v's dtype, or ``(o, S_T)``. No scaling is applied inside.
    """
    if backend not in BACKENDS:
        raise ValueError(f"{backend=} is not one of {BACKENDS}")
    if variant not in VARIANTS:
        raise ValueError(f"{variant=} is not one of {VARIANTS}")
    if q.ndim != 4:
        raise ValueError(f"q must be [batch, seq, heads, dk]; got {q.shape=}")
    if k.shape != q.shape:
        raise ValueError(f"{q.shape=} and {k.shape=} differ")
    if v.ndim != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"{q.shape=} and {v.shape=} differ in batch, seq or heads")
    if log_g.shape not in (q.shape, q.shape[:3] + (1,)):
        raise ValueError(f"{log_g.shape=} must be {q.shape} (per dimension) or {q.shape[:3] + (1,)} (per head)")
    if not (q.dtype == k.dtype == v.dtype) or jnp.dtype(q.dtype).name not in DTYPES:
        raise ValueError(f"q, k, v must share one dtype of {DTYPES}; got {q.dtype=}, {k.dtype=}, {v.dtype=}")
    if not jnp.issubdtype(log_g.dtype, jnp.floating):
        raise ValueError(f"{log_g.dtype=} must be floating")
    batch, seq, heads, dk = q.shape
    dv = v.shape[-1]
    if initial_state is not None and initial_state.shape != (batch, heads, dk, dv):
        raise ValueError(f"{initial_state.shape=} must be {(batch, heads, dk, dv)}")
    if segment_ids is not None and (segment_ids.shape != (batch, seq)
                                    or not jnp.issubdtype(segment_ids.dtype, jnp.integer)):
        raise ValueError(f"segment_ids must be int [batch, seq] = {(batch, seq)}; got {segment_ids.shape=} "
                         f"{segment_ids.dtype=}")

    dkp, dvp = _pad_dim(backend, dk), _pad_dim(backend, dv)
    if block_sizes is None:
        block_sizes = BlockSizes.get_default(dkp, dvp, backend=backend, variant=variant)
    if backend == "gpu":
        block_sizes.check_dims(dkp, dvp)
    chunk = block_sizes.chunk
    seqp = max(chunk, -(-seq // chunk) * chunk)
    # zero padding is exact: k = v = 0 adds nothing to the state, log_g = 0 leaves it undecayed
    qp = _pad_to(q, (batch, seqp, heads, dkp))
    kp = _pad_to(k, (batch, seqp, heads, dkp))
    vp = _pad_to(v, (batch, seqp, heads, dvp))
    # a trailing 1 is the per-head fast path (for dk == 1 both readings agree: padded dims have q = k = 0)
    gp = _pad_to(log_g, (batch, seqp, heads, 1 if log_g.shape[-1] == 1 else dkp))
    if segment_ids is not None:  # -inf in every column, padded dims included (what chunk_gates looks for)
        gp = jnp.where(_pad_to(segment_starts(segment_ids), (batch, seqp))[:, :, None, None], -jnp.inf, gp)
    h0 = jnp.zeros((batch, heads, dkp, dvp), F32) if initial_state is None else _pad_to(
        initial_state.astype(F32), (batch, heads, dkp, dvp))

    cfg = Config(block_sizes=block_sizes, backend=backend, interpret=bool(interpret), dtype=jnp.dtype(q.dtype).name,
                 variant=variant, resets=segment_ids is not None)
    o, ht = _gla_vjp(cfg)(qp, kp, vp, gp, h0)
    o = o[:, :seq, :, :dv]
    if return_final_state:
        return o, ht[:, :, :dk, :dv]
    return o
