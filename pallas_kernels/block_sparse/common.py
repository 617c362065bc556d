"""Shared pieces of the block-sparse attention kernels: block sizes, static options, the transposed index
(key block -> query blocks that selected it) for the dk/dv pass, and the in-kernel helpers."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

MIN_ROWS = 16  # Triton dots need M, N, K >= 16


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiles of the GPU (Triton) kernels; the TPU kernels always take a whole query block per step.

    A program handles ``block_*`` query positions of one query block for all query heads of one kv head,
    stacked as ``block_* * next_pow2(group)`` rows, against one selected key block (``block_size`` keys) at
    a time. ``block_q``: forward; ``block_q_dq``: the dq pass; ``block_q_dkv``: the rows a dk/dv program takes
    per step. Each must be a power of 2 dividing ``block_size``.
    """

    block_q: int
    block_q_dq: int
    block_q_dkv: int
    num_warps: int | None = None  # None: 4, or 8 for tiles of >= 128 x 128 elements
    num_stages: int = 2

    def __post_init__(self):
        for name in ("block_q", "block_q_dq", "block_q_dkv"):
            val = getattr(self, name)
            if not _is_pow2(val):
                raise ValueError(f"BlockSizes.{name}={val} must be a power of 2")
        if self.num_warps is not None and not _is_pow2(self.num_warps):
            raise ValueError(f"BlockSizes.num_warps={self.num_warps} must be a power of 2")
        if self.num_stages < 1:
            raise ValueError(f"BlockSizes.num_stages={self.num_stages} must be >= 1")

    @classmethod
    def get_default(cls, block_size: int, group: int) -> "BlockSizes":
        """128 stacked rows forward, 64 backward (fewer when the query block is smaller)."""
        gp = next_pow2(group)

        def fit(rows: int) -> int:
            return max(min(block_size, rows // gp), -(-MIN_ROWS // gp), 1)

        return cls(block_q=fit(128), block_q_dq=fit(64), block_q_dkv=fit(64))

    def validate(self, block_size: int, group: int) -> None:
        gp = next_pow2(group)
        for name in ("block_q", "block_q_dq", "block_q_dkv"):
            val = getattr(self, name)
            if val > block_size:
                raise ValueError(f"BlockSizes.{name}={val} exceeds {block_size=}")
            if val * gp < MIN_ROWS:
                raise ValueError(f"BlockSizes.{name}={val} x group {gp} gives < {MIN_ROWS} rows")

    def warps(self, rows: int, head_dim: int) -> int:
        if self.num_warps is not None:
            return self.num_warps
        return 8 if rows * head_dim >= 128 * 128 else 4


@dataclasses.dataclass(frozen=True)
class Static:
    """Everything static about one call, as one hashable object (the custom_vjp's nondiff argument).

    ``seq_q``/``seq_k`` are the true lengths; the arrays the kernels see are padded to whole blocks.
    """

    block_size: int
    causal: bool
    scale: float
    q_offset: int
    seq_q: int
    seq_k: int
    backend: str  # "gpu" | "tpu"
    interpret: bool
    block_sizes: BlockSizes
    debug: bool = False

    def key_mask_needed(self) -> bool:
        return self.seq_k % self.block_size != 0


def visible(st: Static, row_pos, key_pos):
    """bool mask (or None: all visible) from absolute row positions [R, 1] / [R, K] and key positions."""
    mask = None
    if st.causal:
        mask = key_pos <= row_pos
    if st.key_mask_needed():
        inside = key_pos < st.seq_k
        mask = inside if mask is None else mask & inside
    return mask


def dot(a, b, *, trans_a: bool = False, trans_b: bool = False):
    """a @ b (optionally transposed) with float32 accumulation; float32 operands at full precision (never
    tf32), bf16 operands straight to the tensor cores."""
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


# ---------------------------------------------------------------- indices (built in XLA, outside kernels)


def normalize_indices(block_indices, block_counts, n_kv_blocks: int):
    """Clip into range; entries past the count repeat the last listed one (0 if none), so no kernel
    ever reads outside the keys and a TPU pipeline sees no new block on skipped steps."""
    max_blocks = block_indices.shape[-1]
    cnt = jnp.clip(block_counts.astype(jnp.int32), 0, max_blocks)
    idx = jnp.clip(block_indices.astype(jnp.int32), 0, n_kv_blocks - 1)
    last = jnp.take_along_axis(idx, jnp.maximum(cnt - 1, 0)[..., None], axis=-1)
    last = jnp.where(cnt[..., None] > 0, last, 0)
    idx = jnp.where(jnp.arange(max_blocks) < cnt[..., None], idx, last)
    return idx, cnt


def kv_major_csr(block_indices, block_counts, n_kv_blocks: int):
    """Transposed index as CSR, for the GPU dk/dv pass (one program per key block, no atomics).

    Returns ``offsets, counts int32 [batch, kv_heads, n_kv_blocks]`` and ``q_blocks int32 [batch, kv_heads,
    n_q_blocks * max_blocks]``: key block J was selected by query blocks
    ``q_blocks[..., offsets[J] : offsets[J] + counts[J]]`` (ascending; a duplicate listing appears twice).
    """
    batch, kv_heads, n_qb, max_blocks = block_indices.shape
    listed = jnp.arange(max_blocks) < block_counts[..., None]
    qb = jnp.broadcast_to(jnp.arange(n_qb)[:, None], block_indices.shape)
    key = jnp.where(listed, block_indices * n_qb + qb, n_kv_blocks * n_qb)
    key = jnp.sort(key.reshape(batch, kv_heads, n_qb * max_blocks), axis=-1)
    kb = key // n_qb
    search = jax.vmap(jax.vmap(lambda a, side: jnp.searchsorted(a, jnp.arange(n_kv_blocks), side=side),
                               in_axes=(0, None)), in_axes=(0, None))
    starts = search(kb, "left").astype(jnp.int32)
    ends = search(kb, "right").astype(jnp.int32)
    return starts, ends - starts, (key % n_qb).astype(jnp.int32)


def kv_major_schedule(block_indices, block_counts, n_kv_blocks: int):
    """Transposed index as a flat schedule, for the TPU dk/dv pass (one grid step per entry).

    Returns ``q_block, k_block, last`` int32 ``[batch, kv_heads, n_kv_blocks + n_q_blocks * max_blocks]``:
    for each key block J in order, a header step (q_block -1: zero the accumulators), then one step per
    query block that selected J (ascending); ``last`` marks J's final step (write dk/dv). Unused tail steps
    have q_block -2 and stay on the final key block, so they neither compute nor move the output block.
    """
    batch, kv_heads, n_qb, max_blocks = block_indices.shape
    stride = n_qb + 1
    listed = jnp.arange(max_blocks) < block_counts[..., None]
    qb = jnp.broadcast_to(jnp.arange(n_qb)[:, None], block_indices.shape)
    pair = jnp.where(listed, block_indices * stride + qb + 1, n_kv_blocks * stride)
    head = jnp.broadcast_to(jnp.arange(n_kv_blocks) * stride, (batch, kv_heads, n_kv_blocks))
    key = jnp.sort(jnp.concatenate([head, pair.reshape(batch, kv_heads, -1)], axis=-1), axis=-1)
    kb = key // stride
    pad = kb >= n_kv_blocks
    next_kb = jnp.concatenate([kb[..., 1:], jnp.full_like(kb[..., :1], n_kv_blocks)], axis=-1)
    last = (kb != next_kb) & ~pad
    q_block = jnp.where(pad, -2, key % stride - 1)
    k_block = jnp.where(pad, n_kv_blocks - 1, kb)
    return q_block.astype(jnp.int32), k_block.astype(jnp.int32), last.astype(jnp.int32)
