"""InfLLM-V2 block-sparse attention: the public ops and their dispatch.

Files: ``reference.py`` (the spec as a dense mask, the gather form ``impl="xla"``, a tiny dense attention),
``selection.py`` (InfLLM-V2 block selection, prefill and decode). The Pallas kernel (forward + backward,
Triton and Mosaic lowerings) lives in ``pallas_kernels.block_sparse``.
"""

from __future__ import annotations

import math

import jax

from lizard_jax.ops.impl import IMPLS, pallas_kernel, resolve_impl
from lizard_jax.ops.sparse.reference import (
    block_sparse_attention_reference,
    block_sparse_attention_xla,
    check_block_indices,
    check_shapes,
    dense_attention,
    masked_attention,
    num_blocks,
    resolve_q_offset,
    resolve_segments,
    visible_mask,
)
from lizard_jax.ops.sparse.selection import (
    block_scores,
    compress_keys,
    infllm_select,
    infllm_select_decode,
    num_compressed,
    select_blocks,
)
from lizard_jax.ops.sparse.settings import PAPER, SELECTIONS, InfLLMConfig


def _is_concrete(*xs) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in xs)


def block_sparse_attention(q, k, v, block_indices, block_counts, *, block_size: int = PAPER.block_size,
                           causal: bool = True, scale: float | None = None, q_offset: int | None = None,
                           return_lse: bool = False, impl: str = "auto", variant: str | None = None,
                           block_sizes=None, segment_ids=None, q_segment_ids=None, kv_segment_ids=None,
                           query_block: int | None = None):
    """Attention of each query block over its listed key blocks (see ``reference.py`` for the exact rule).

    q ``[batch, seq_q, heads, d]``; k, v ``[batch, seq_k, kv_heads, d]``; block_indices int32
    ``[batch, kv_heads, ceil(seq_q/block_size), max_blocks]``; block_counts int32
    ``[batch, kv_heads, ceil(seq_q/block_size)]``. Returns o ``[batch, seq_q, heads, d]`` (q.dtype) and, with
    ``return_lse``, lse float32 ``[batch, heads, seq_q]``. ``q_offset`` (default ``seq_k - seq_q``) is the
    absolute position of query row 0. impl: "xla" (gather form, autodiff), "pallas" (the kernel; interpret
    mode on CPU), "auto" (pallas on GPU/TPU, xla on CPU). ``variant`` (a kernel design of
    ``pallas_kernels.block_sparse.DESIGNS``, None: its default) and ``block_sizes`` (the kernel's
    ``BlockSizes``, None: its default) are static and reach the kernel only; impl "xla" ignores them.

    Concrete (eager) index arrays are validated (range, counts, no duplicates); under jit they are clipped
    into range and not checked.

    Packed documents: ``segment_ids`` int ``[batch, seq]`` (self-attention, seq_q == seq_k) or
    ``q_segment_ids [batch, seq_q]`` with ``kv_segment_ids [batch, seq_k]``: a row sees only keys of its own
    segment among its listed blocks (both impls; None: the unsegmented program, unchanged).

    ``query_block`` (None: ``block_size``): query rows per list; ``1`` gives per-token lists
    ``block_indices [batch, kv_heads, seq_q, max_blocks]`` (InfLLM-V2's per-token selection). Only impl "xla"
    takes a ``query_block`` other than ``block_size`` (exact, O(seq_q * seq_k) work); "pallas" raises
    NotImplementedError and "auto" resolves to "xla" for it (the kernels take one list per ``block_size`` rows).
    """
    check_shapes(q, k, v, block_indices, block_counts, block_size, query_block)
    per_row = query_block is not None and query_block != block_size
    q_seg, k_seg = resolve_segments(q.shape[1], k.shape[1], q.shape[0], segment_ids, q_segment_ids,
                                    kv_segment_ids)
    if per_row and impl == "pallas":
        raise NotImplementedError(f"block_sparse_attention: the Pallas kernels take one list per block_size="
                                  f"{block_size} query rows, not {query_block=}; use impl='xla' (or 'auto')")
    impl = "xla" if per_row else resolve_impl(impl)
    if _is_concrete(block_indices, block_counts):
        check_block_indices(block_indices, block_counts, num_blocks(k.shape[1], block_size))
    kw = dict(block_size=block_size, causal=causal, scale=scale, q_offset=q_offset, return_lse=return_lse)
    if q_seg is not None:
        kw.update(q_segment_ids=q_seg, kv_segment_ids=k_seg)
    if impl == "xla":
        return block_sparse_attention_xla(q, k, v, block_indices, block_counts, query_block=query_block, **kw)
    block_sparse, backend = pallas_kernel("pallas_kernels.block_sparse", "use impl='xla' for the gather form")
    return block_sparse.block_sparse_attention(q, k, v, block_indices, block_counts, **kw, **backend,
                                               variant=variant, block_sizes=block_sizes)


def infllm_attention(q, k, v, *, config: InfLLMConfig = PAPER, causal: bool = True,
                     scale: float | None = None, q_offset: int | None = None, return_lse: bool = False,
                     impl: str = "auto", segment_ids=None):
    """InfLLM-V2 attention: exactly dense attention when ``seq_k < config.dense_below``, else InfLLM-V2
    selection (no gradient) followed by ``block_sparse_attention`` (with the config's kernel ``variant`` and
    ``block_sizes``). Shapes as ``block_sparse_attention``.

    ``config.selection``: "block" selects once per query block of ``block_size`` rows (the kernel's lists);
    "token" (the paper's) per query token, then runs the exact per-token XLA form whatever ``impl`` says (the
    Pallas kernels take per-block lists only; ``InfLLMConfig`` docstring).

    ``segment_ids`` int ``[batch, seq]`` (packed documents; causal self-attention only, seq_q == seq_k and
    q_offset 0: decoding from a cache is unpacked and raises): selection and attention stay inside each
    query's segment (``selection`` module docstring: exact for documents shorter than ``dense_below`` or
    starting at a multiple of ``block_size``)."""
    impl = resolve_impl(impl)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    seg = {}
    if segment_ids is not None:
        if q.shape[1] != k.shape[1] or (q_offset or 0) != 0 or not causal:
            raise ValueError("infllm_attention: segment_ids need causal self-attention (seq_q == seq_k, q_offset "
                             "0); decoding from a cache is unpacked, pass no segment_ids")
        resolve_segments(q.shape[1], k.shape[1], q.shape[0], segment_ids)
        seg = dict(segment_ids=segment_ids)
    if k.shape[1] < config.dense_below:
        return dense_attention(q, k, v, causal=causal, scale=scale, q_offset=q_offset, return_lse=return_lse,
                               **seg)
    query_block = 1 if config.selection == "token" else config.block_size
    block_indices, block_counts = infllm_select(
        jax.lax.stop_gradient(q), jax.lax.stop_gradient(k), block_size=config.block_size, topk=config.topk,
        kernel=config.kernel, stride=config.stride, init_blocks=config.init_blocks,
        local_window=config.local_window, causal=causal, q_offset=q_offset, scale=scale, query_block=query_block,
        **(dict(seg, dense_below=config.dense_below) if seg else {}),
    )
    if query_block != config.block_size:
        impl = "xla"  # per-token lists: the exact XLA form (the kernels take per-block lists only)
    return block_sparse_attention(q, k, v, block_indices, block_counts, block_size=config.block_size,
                                  causal=causal, scale=scale, q_offset=q_offset, return_lse=return_lse, impl=impl,
                                  variant=config.variant, block_sizes=config.block_sizes, query_block=query_block,
                                  **seg)


__all__ = [
    "IMPLS",
    "InfLLMConfig",
    "PAPER",
    "SELECTIONS",
    "block_scores",
    "block_sparse_attention",
    "block_sparse_attention_reference",
    "block_sparse_attention_xla",
    "check_block_indices",
    "compress_keys",
    "dense_attention",
    "infllm_attention",
    "infllm_select",
    "infllm_select_decode",
    "masked_attention",
    "num_compressed",
    "resolve_impl",
    "resolve_q_offset",
    "select_blocks",
    "visible_mask",
]
