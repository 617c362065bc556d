"""Gated linear attention (GLA): the public op and its dispatch.

    S_0 = initial_state (or 0),   S_t = diag(exp(log_g_t)) S_{t-1} + k_t^T v_t,   o_t = q_t S_t

Files: ``reference.py`` (the spec, a token-by-token scan), ``chunk.py`` (the XLA chunked form),
``recurrent.py`` (``gla_step`` for decoding), ``segments.py`` (packed documents: segment ids -> hard resets).
The Pallas kernel lives in ``pallas_kernels.chunked_scan``.
"""

from __future__ import annotations

from lizard_jax.ops.gated_linear._checks import check_inputs
from lizard_jax.ops.gated_linear.chunk import DEFAULT_CHUNK_SIZE, gla_chunk
from lizard_jax.ops.gated_linear.recurrent import gla_step
from lizard_jax.ops.gated_linear.reference import gla_reference
from lizard_jax.ops.gated_linear.segments import check_segment_ids, reset_gates, segment_starts
from lizard_jax.ops.impl import IMPLS, pallas_kernel, resolve_impl

# pallas_kernels.chunked_scan.VARIANTS, spelled here so impl="xla" validates without importing the kernels
# (tests/test_ops_gla.py checks that the two agree)
KERNEL_VARIANTS = ("v1", "v2")

def gla(
    q,
    k,
    v,
    log_g,
    *,
    initial_state=None,
    return_final_state: bool = False,
    impl: str = "auto",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    variant: str = "v1",
    block_sizes=None,
    segment_ids=None,
):
    """Gated linear attention over a whole sequence (train / prefill). No scaling inside.

    Args:
      q, k: ``[batch, seq, heads, dk]``.
      v: ``[batch, seq, heads, dv]``. q, k and v share one float dtype (float32, bfloat16, ...).
      log_g: log forget gate, ``<= 0``: ``[batch, seq, heads, dk]`` (per key dim) or
        ``[batch, seq, heads, 1]`` (one decay per head and token, broadcast over dk). Values are not
        checked (they may be traced); ``-inf`` (gate exactly 0, a hard reset) is allowed, positive
        values are outside the contract.
      initial_state: ``[batch, heads, dk, dv]``, used in float32; None means zeros.
      return_final_state: also return the state after the last token.
      impl: "xla" (``chunk.py``), "pallas" (``pallas_kernels.chunked_scan``, imported lazily;
        interpret mode on CPU), or "auto" (pallas on GPU/TPU, xla on CPU).
      chunk_size: chunk length of the XLA form (the Pallas kernel has its own block sizes). Any seq
        length works: the tail is padded to a whole chunk, exactly (see ``chunk.py``).
      variant, block_sizes: static options of the Pallas kernel (``pallas_kernels.chunked_scan.VARIANTS``,
        ``BlockSizes``), passed down unchanged on every backend; unused by impl="xla". A layer or config
        picks them once; no model code branches on the backend.
      segment_ids: None, or int ``[batch, seq]`` equal within a document (packed documents; ``segments.py``):
        the state restarts at each segment start (its log-gate becomes -inf: the state is multiplied by 0),
        exactly in every impl. ``initial_state`` applies to the first segment only; the final state is the
        last segment's; the gradient wrt a start's log_g is 0. None: the program is the one without segments.
        Decoding (``gla_step``) has no segment ids: generation is unpacked (start a new document from zeros).

    Returns:
      o ``[batch, seq, heads, dv]`` in v's dtype, or ``(o, final_state)`` with final_state
      ``[batch, heads, dk, dv]`` float32. State and accumulation are float32 for any input dtype.
    """
    check_inputs(q, k, v, log_g, initial_state, layout="bthd")
    if not (isinstance(chunk_size, int) and chunk_size > 0):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size=}")
    if variant not in KERNEL_VARIANTS:
        raise ValueError(f"{variant=} is not one of {KERNEL_VARIANTS}")
    if segment_ids is not None:
        check_segment_ids(segment_ids, q.shape[0], q.shape[1])
    impl = resolve_impl(impl)
    if impl == "pallas":
        chunked_scan, backend = pallas_kernel("pallas_kernels.chunked_scan", "use impl='xla' for the chunked XLA form")
        # the kernel takes the ids itself (it puts -inf in its padded gate dims too)
        seg = {} if segment_ids is None else {"segment_ids": segment_ids}
        return chunked_scan.gla(q, k, v, log_g, initial_state=initial_state, return_final_state=return_final_state,
                                variant=variant, block_sizes=block_sizes, **seg, **backend)
    o, ht = gla_chunk(q, k, v, log_g, initial_state, chunk_size=chunk_size, segment_ids=segment_ids)
    return (o, ht) if return_final_state else o


__all__ = ["IMPLS", "KERNEL_VARIANTS", "check_segment_ids", "gla", "gla_chunk", "gla_reference", "gla_step",
           "reset_gates", "resolve_impl", "segment_starts"]
