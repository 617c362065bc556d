"""Shared pieces of the block-sparse attention kernels: block sizes, static options, the transposed index
(key block -> query blocks that selected it) for the dk/dv pass, and the in-kernel helpers."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

MIN_ROWS = 16  # Triton dots need M, N, K >= 16

# Kernel designs (``Static.variant``; not the tile variants ``VARIANTS`` below). v1 is the default until a GPU
# measurement says otherwise; see ``gpu.py`` / ``tpu.py`` for what v2 changes.
DESIGNS = ("v1", "v2")


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiles of the GPU (Triton) kernels; the TPU kernels always take a whole query block per step.

    A forward or dq program handles ``block_q`` (``block_q_dq``) query positions of one query block for all
    query heads of one kv head, stacked as ``block_q * next_pow2(group)`` rows, against ``kv_step``
    (``kv_step_dq``) selected key blocks per loop step (2 or 4: blocks gathered into one key tile, halving or
    quartering the steps; a query block with fewer listed blocks masks the unlisted part of its last tile). A dk/dv program handles one key block (or one chunk of the query blocks that selected it) and
    takes ``block_q_dkv`` query positions x group rows per step. ``block_q*`` are powers of 2 dividing
    ``block_size``.

    ``num_warps_*`` (None: chosen from the tile) and ``num_stages_*`` are Triton's per pass. ``dkv_split``: a
    key block selected by more than ``dkv_split * max_blocks`` query blocks (the initial block is selected by
    all) is split into chunks of that many, run by separate programs and summed afterwards, so one key block
    does not serialise the dk/dv pass; 0 never splits.
    """

    block_q: int
    block_q_dq: int
    block_q_dkv: int
    kv_step: int = 1
    kv_step_dq: int = 1
    num_warps: int | None = None
    num_warps_dq: int | None = None
    num_warps_dkv: int | None = None
    num_stages: int = 3
    num_stages_dq: int = 3
    num_stages_dkv: int = 3
    dkv_split: int = 2

    def __post_init__(self):
        for name in ("block_q", "block_q_dq", "block_q_dkv"):
            val = getattr(self, name)
            if not _is_pow2(val):
                raise ValueError(f"BlockSizes.{name}={val} must be a power of 2")
        for name in ("kv_step", "kv_step_dq"):
            if getattr(self, name) not in (1, 2, 4):
                raise ValueError(f"BlockSizes.{name}={getattr(self, name)} must be 1, 2 or 4")
        for name in ("num_warps", "num_warps_dq", "num_warps_dkv"):
            val = getattr(self, name)
            if val is not None and not _is_pow2(val):
                raise ValueError(f"BlockSizes.{name}={val} must be a power of 2")
        for name in ("num_stages", "num_stages_dq", "num_stages_dkv"):
            if getattr(self, name) < 1:
                raise ValueError(f"BlockSizes.{name}={getattr(self, name)} must be >= 1")
        if self.dkv_split < 0:
            raise ValueError(f"BlockSizes.dkv_split={self.dkv_split} must be >= 0")

    @classmethod
    def get_default(cls, block_size: int, group: int, itemsize: int = 2, variant: str = "v1") -> "BlockSizes":
        """128 stacked rows per program in every pass (fewer when the query block is smaller), two key blocks
        per forward step (v2: per dq step too); 4-byte inputs (no tensor cores: full-precision float32 dots)
        take 64 rows, one key block per step and 2 stages, to fit shared memory."""
        gp = next_pow2(group)
        rows = 128 if itemsize <= 2 else 64

        def fit(rows: int) -> int:
            return max(min(block_size, rows // gp), -(-MIN_ROWS // gp), 1)

        if itemsize <= 2:
            return cls(block_q=fit(rows), block_q_dq=fit(rows), block_q_dkv=fit(rows), kv_step=2,
                       kv_step_dq=2 if variant == "v2" else 1)
        return cls(block_q=fit(rows), block_q_dq=fit(rows), block_q_dkv=fit(rows), num_stages=2,
                   num_stages_dq=2, num_stages_dkv=2)

    def validate(self, block_size: int, group: int) -> None:
        gp = next_pow2(group)
        for name in ("block_q", "block_q_dq", "block_q_dkv"):
            val = getattr(self, name)
            if val > block_size:
                raise ValueError(f"BlockSizes.{name}={val} exceeds {block_size=}")
            if val * gp < MIN_ROWS:
                raise ValueError(f"BlockSizes.{name}={val} x group {gp} gives < {MIN_ROWS} rows")

    def compiler_params(self, which: str, rows: int, cols: int):
        """(num_warps, num_stages) of pass ``which`` ("fwd" | "dq" | "dkv") for a [rows, cols] score tile."""
        suffix = "" if which == "fwd" else f"_{which}"
        warps = getattr(self, "num_warps" + suffix)
        if warps is None:
            warps = 8 if rows * cols >= 128 * 64 else 4
        return warps, getattr(self, "num_stages" + suffix)


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
    variant: str = "v1"  # one of DESIGNS
    segments: bool = False  # segment ids (packed documents) are passed to the kernels


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


def same_segment(mask, q_seg, k_seg):
    """``mask & (q_seg[:, None] == k_seg[None, :])`` (``mask`` None: all visible); q_seg None: ``mask``.
    1-D ``q_seg`` [R] / ``k_seg`` [K] (the GPU kernels' gathered ids) are compared as an outer product; 2-D ones
    are already broadcastable to the mask (the TPU kernels: q ids as a [rows, 1] column, k ids a [1, bs] row,
    or transposed)."""
    if q_seg is None:
        return mask
    same = q_seg[:, None] == k_seg[None, :] if q_seg.ndim == 1 else q_seg == k_seg
    return same if mask is None else mask & same


def segment_block_uniform(seg, bs: int):
    """(lowest id int32 [batch, n_blocks], bool [batch, n_blocks]: all ids of the block equal) of ``seg [batch,
    n_blocks * bs]``."""
    batch, t = seg.shape
    sb = seg.reshape(batch, t // bs, bs)
    lo, hi = sb.min(axis=-1), sb.max(axis=-1)
    return lo, lo == hi


def segment_block_table(seg, bs: int):
    """int32 ``[batch * n_blocks * 2]``: per block of ``seg [batch, n_blocks * bs]`` its lowest id and 1 if all
    its ids are equal (``segment_block_uniform`` flattened, for scalar prefetch); a block pair of one segment
    needs no segment mask: both uniform with equal ids (``segment_uniform_pair``)."""
    lo, uni = segment_block_uniform(seg, bs)
    return jnp.stack([lo, uni.astype(jnp.int32)], axis=-1).reshape(-1)


def segment_uniform_pair(q_table, k_table, q_row, k_row):
    """Traced bool: query block row ``q_row`` (= b * n_q_blocks + i) of ``q_table`` and key block row ``k_row``
    of ``k_table`` (``segment_block_table``) lie wholly inside one and the same segment."""
    return ((q_table[2 * q_row + 1] == 1) & (k_table[2 * k_row + 1] == 1)
            & (q_table[2 * q_row] == k_table[2 * k_row]))


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


def dkv_work_items(block_indices, block_counts, n_kv_blocks: int, chunk: int, first_unmasked=None):
    """Work of the GPU dk/dv pass: one item per key block, popular key blocks split into chunks.

    A key block selected by ``count > chunk`` query blocks is split into ``ceil(count / chunk)`` chunks whose
    dk/dv partial sums go to float32 slots (summed afterwards); the others write dk/dv directly.
    ``chunk <= 0`` never splits.

    Returns ``items int32 [batch, kv_heads, n_items, 5]`` rows ``(key block, start in q_blocks, number of query
    blocks, slot, masked)`` with slot -1: write dk/dv, >= 0: write partial slot, -2: nothing to do (padding),
    and ``masked`` the number of leading query blocks of the item below ``first_unmasked[key block]`` (int
    ``[n_kv_blocks]``, default: all masked; a key block's query blocks are ascending, so these come first);
    ``q_blocks`` as ``kv_major_csr``; ``slot_block int32 [batch, kv_heads, n_slots]``: the key block of each
    slot, ``n_kv_blocks`` for unused slots. The first ``n_items - n_kv_blocks`` items are the extra chunks
    (full, so the heaviest programs start first), then one item per key block.
    """
    offsets, counts, q_blocks = kv_major_csr(block_indices, block_counts, n_kv_blocks)
    total = q_blocks.shape[-1]  # bounds the listed pairs, hence the chunks
    if chunk <= 0 or chunk >= total:
        n_extra, n_slots, chunk = 0, 1, total
    else:
        n_extra = total // chunk  # sum over split blocks of (chunks - 1) <= pairs / chunk
        n_slots = -(-2 * total // chunk)  # sum over split blocks of chunks < 2 pairs / chunk
    split = counts > chunk
    chunks = jnp.where(split, -(-counts // chunk), 1)
    extra_end = jnp.cumsum(chunks - 1, axis=-1)
    slot_end = jnp.cumsum(jnp.where(split, chunks, 0), axis=-1)
    search = jax.vmap(jax.vmap(lambda a, v: jnp.searchsorted(a, v, side="right")))
    search_left = jax.vmap(jax.vmap(lambda a, v: jnp.searchsorted(a, v, side="left")))

    kb_first = jnp.broadcast_to(jnp.arange(n_kv_blocks), counts.shape)
    kb_extra = search(extra_end, jnp.broadcast_to(jnp.arange(n_extra), counts.shape[:2] + (n_extra,)))
    used = kb_extra < n_kv_blocks
    kb_extra = jnp.minimum(kb_extra, n_kv_blocks - 1)
    take = lambda a, i: jnp.take_along_axis(a, i, axis=-1)
    # chunk number of each extra item: 1 + its rank among the key block's extra items
    c_extra = jnp.arange(n_extra) - take(extra_end - (chunks - 1), kb_extra) + 1
    kb = jnp.concatenate([kb_extra, kb_first], axis=-1)
    c = jnp.concatenate([c_extra, jnp.zeros_like(kb_first)], axis=-1)
    live = jnp.concatenate([used, jnp.ones_like(kb_first, bool)], axis=-1)
    is_split = take(split, kb)
    start = take(offsets, kb) + c * chunk
    num = jnp.where(live, jnp.clip(take(counts, kb) - c * chunk, 0, chunk), 0)
    slot = jnp.where(is_split, take(slot_end - jnp.where(split, chunks, 0), kb) + c, -1)
    slot = jnp.where(live, slot, -2)
    if first_unmasked is None:
        masked = num
    else:  # entries sorted by (key block, query block): count those below the threshold by binary search
        n_qb = block_indices.shape[2]
        entry_kb = search(offsets + counts, jnp.broadcast_to(jnp.arange(total), counts.shape[:2] + (total,)))
        key = entry_kb * n_qb + q_blocks  # ascending; past the listed entries entry_kb is n_kv_blocks
        below = search_left(key, kb * n_qb + jnp.take(jnp.asarray(first_unmasked), kb))
        masked = jnp.clip(below - start, 0, num)
    items = jnp.stack([kb, start, num, slot, masked], axis=-1).astype(jnp.int32)
    slot_block = search(slot_end, jnp.broadcast_to(jnp.arange(n_slots), counts.shape[:2] + (n_slots,)))
    return items, q_blocks, slot_block.astype(jnp.int32)


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


# Tile variants for B1 H16 KV4 D128 bf16, block 64 (group 4): timed by ``benchmarks/kernels_sparse.py --sweep``
# and compiled by ``triton_report``. "default" is ``BlockSizes.get_default(64, 4)``: 128 rows (32 positions x 4
# heads) per program in every pass, two key blocks per forward step, one per dq step, 8 warps, 3 stages.
_DEFAULT = BlockSizes.get_default(64, 4)
_KV1 = dataclasses.replace(_DEFAULT, kv_step=1)
VARIANTS = {
    "default": _DEFAULT,
    "kv1": _KV1,  # forward: one key block (64 keys) per step
    "kv1_s4": dataclasses.replace(_KV1, num_stages=4),  # (kv_step 2 with 4 stages needs > 227 KB)
    "rows256": dataclasses.replace(_KV1, block_q=64),  # forward: a whole query block x 4 heads
    "rows64": dataclasses.replace(_KV1, block_q=16, num_warps=4),  # forward: 2 programs per SM
    "dq_s4": dataclasses.replace(_DEFAULT, num_stages_dq=4),
    "no_split": dataclasses.replace(_DEFAULT, dkv_split=0),  # dk/dv: the initial block in one program
}
