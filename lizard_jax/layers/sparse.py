"""InfLLM-V2 sparse attention layer (arXiv 2509.24663): the sparse layers of MiniCPM-SALA (arXiv 2602.11761),
and training-free sparse prefill/decoding for an unchanged softmax teacher.

    q, k, v = teacher projections (GQA kept), optional per-head QK RMSNorm, optional RoPE
    o       = InfLLM-V2 attention (dense below `dense_below` keys), scale 1/sqrt(head_dim)
    y       = o_proj(o * sigmoid(o_gate x))                       (output_gate)

`rope=True, qk_norm=False, output_gate=False` is the teacher's softmax layer with InfLLM-V2 above the threshold:
below it the layer makes exactly the teacher's call (same op, same arguments), so it equals the teacher bit for
bit. SALA's own sparse layers are the defaults: no RoPE (HyPE), no QK-norm (the official modeling code has none
in its sparse layers), output gate.

Paths (chosen by static shapes, except the traced switches named):
  * no cache, seq < dense_below: `ops.softmax.attention` with the positions (the teacher's call).
  * no cache, seq >= dense_below, positions None: `ops.sparse.infllm_attention` (selection per token or per
    query block of `block_size` rows, `selection`; then the block-sparse op: per block the Pallas kernel on GPU,
    per token the exact XLA form). The training path.
  * no cache, seq >= dense_below, positions given: as with a cache, on a fresh cache of `seq` slots, so
    left-padded rows select exactly as their unpadded sequence would.
  * with a cache: the new keys are written, compressed keys completed by them are added, then the batch's
    context (longest row's last position + 1) decides (`lax.cond`): below `dense_below` exactly dense attention
    over the cache (the first `dense_below` slots hold every key), else InfLLM-V2 from the cache
    (`sparse_attention_cached`, XLA). An unpadded prefill (T > 1, positions arange(T) in every row, empty cache
    before) takes `infllm_attention` instead (`lax.cond`; the kernel on GPU), which chooses the same blocks.

The cache (`SparseCache`) is addressed by position: the key at position p lives in slot p, padding is never
stored. So left-padded rows hold exactly their unpadded sequence, block J is positions [J*bs, (J+1)*bs) in every
row, and compressed key c (mean of keys [c*stride, c*stride + kernel)) is computed once, in the call that
brings its last key, from the cached keys. Contract (as in `layers/common.py`): in each row the real tokens
have consecutive positions starting at 0, padding (negative) only before them, positions < the cache size;
breaking it is not detected under jit (writes past the cache are dropped).

How the cached path selects (our generalisation of the op to traced, per-row offsets; where the paper is
silent we chose, and this is the rule):
  * `selection="token"` (the paper's): every token is its own group, in prefill and decoding alike.
  * `selection="block"`: queries are grouped by position block: a call with T > 1 tokens groups its rows into
    blocks [J*bs, (J+1)*bs) of positions (the op's query blocks); a single decoding token is its own group.
  * each group selects like `ops.sparse.selection`: per token and query head softmax of scale*q.k_cmp over the
    compressed keys complete at that token, summed over the group's heads and rows; block score = max over the
    compressed keys overlapping the block that are complete at the group's last row; the initial blocks and
    the `ceil(local_window / bs)` blocks ending at the last row's block are always kept, the best others
    fill up to `topk + n_local`; then causal softmax over the chosen blocks.
What is therefore exact (tested):
  * dense regime: full prefill == chunked prefill (any chunks) == token-by-token decode == the teacher layer
    (rope=True, no norm, no gate), up to float32 summation order.
  * sparse regime: the cached path on a fresh cache == `infllm_attention` (same choices; a block whose
    overlapping compressed keys are all incomplete at the group's last row scores -inf here but 0 in the op;
    with kernel <= block_size and stride <= kernel, as in the paper, only the last row's own block can be one,
    and it is always kept when local_window >= 1); chunked prefill
    == full prefill when every chunk starts at a multiple of `block_size` (the groups are then the same);
    each decoded token chooses exactly what `infllm_select_decode` chooses for that token alone from
    `compress_keys` of the keys so far.
  * `selection="token"`: full prefill == chunked prefill (any chunks) == token-by-token decode in the sparse
    regime too (every token chooses alone everywhere; tested).
  * `selection="block"`: prefill and decode differ in the sparse regime (an approximation): a prefill row
    shares its query block's choice (which also depends on the later rows of the block, without gradient), a
    decoded token chooses alone.
The selection has no gradient (as in the paper); gradients flow through the attention over the chosen blocks.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from lizard_jax.config import AttentionSpec, ConfigError, ModelConfig, register_attention
from lizard_jax.layers.common import (check_layer_inputs, default_positions, dtype_of, out_projection, project_qkv,
                                      resolve_segments)
from lizard_jax.layers.lightning import check_spec_common, output_gate
from lizard_jax.ops.softmax import attention
from lizard_jax.ops.sparse import InfLLMConfig, infllm_attention, num_compressed
from lizard_jax.ops.sparse.selection import overlap_windows

Array = jax.Array
_INT_MAX = jnp.iinfo(jnp.int32).max


@register_attention
@dataclasses.dataclass(frozen=True)
class SparseSpec(AttentionSpec, InfLLMConfig):
    """Options of an InfLLM-V2 sparse layer (defaults: MiniCPM-SALA's sparse layers): the InfLLM-V2 settings
    it extends (`ops.sparse.InfLLMConfig`: block_size, topk, kernel, stride, init_blocks, local_window,
    dense_below; the paper's by default) and

    rope: RoPE on q and k (SALA/HyPE: off; on for an unchanged teacher).
    qk_norm: per-head RMSNorm on q and k before RoPE (official SALA sparse layers: none).
    output_gate: multiply the attention output by sigmoid(o_gate x) before o_proj.
    gate_bias_init: initial bias of o_gate (its kernel starts at 0): the layer starts as sigmoid(4) = 0.982
      times the ungated one.
    impl: the block-sparse op's implementation on the no-cache path ("auto": Pallas on GPU/TPU, XLA on CPU);
      the dense path uses "xla" for "xla" and "auto" (cuDNN where it applies) otherwise; the cached path is XLA.
    variant, block_sizes (from `InfLLMConfig`): the Pallas kernel's design and tiles, passed down with the
      other InfLLM-V2 settings (None: the kernel's defaults); YAML: `variant: v2`,
      `block_sizes: {block_q: 32, block_q_dq: 32, block_q_dkv: 32, kv_step: 2}`.
    selection (from `InfLLMConfig`): "token" (the paper's; prefill == decode; exact XLA form on every impl) or
      "block" (default for now: one choice per query block, the Pallas kernel's granularity).
    """

    kind: ClassVar[str] = "sparse"
    rope: bool = False
    qk_norm: bool = False
    output_gate: bool = True
    gate_bias_init: float = 4.0
    impl: str = "auto"

    def __post_init__(self):
        check_spec_common(self.kind, self.impl, self.gate_bias_init)
        try:
            super().__post_init__()
        except ValueError as e:
            raise ConfigError(f"sparse: {e}") from None

    @property
    def infllm(self) -> InfLLMConfig:
        """The plain InfLLM-V2 settings, as the ops take them."""
        return InfLLMConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(InfLLMConfig)})


# ----------------------------------------------------------------------------------------------------------
# The position-addressed cache


@flax.struct.dataclass
class SparseCache:
    """k, v `[batch, size, kv_heads, head_dim]` with the key of position p in slot p; k_cmp
    `[batch, num_compressed(size), kv_heads, head_dim]` float32, compressed key c = mean of keys
    [c*stride, c*stride + kernel) once all are stored; length `[batch]` int32: positions 0..length-1 are stored."""

    k: Array
    v: Array
    k_cmp: Array
    length: Array

    @classmethod
    def create(cls, batch: int, size: int, kv_heads: int, head_dim: int, dtype, *, kernel: int, stride: int):
        return cls(
            k=jnp.zeros((batch, size, kv_heads, head_dim), dtype),
            v=jnp.zeros((batch, size, kv_heads, head_dim), dtype),
            k_cmp=jnp.zeros((batch, num_compressed(size, kernel, stride), kv_heads, head_dim), jnp.float32),
            length=jnp.zeros((batch,), jnp.int32),
        )

    @property
    def batch(self) -> int:
        return self.k.shape[0]

    @property
    def size(self) -> int:
        return self.k.shape[1]

    def slot_positions(self) -> Array:
        """`[batch, size]` int32: the position held by each slot, -1 where empty."""
        slots = jnp.arange(self.size, dtype=jnp.int32)
        return jnp.where(slots < self.length[:, None], slots, -1)

    def append(self, k_new, v_new, positions, *, kernel: int, stride: int) -> "SparseCache":
        """Store k_new/v_new `[batch, T, kv_heads, head_dim]` at `positions [batch, T]` (negative: padding,
        dropped) and add the compressed keys whose last key arrives now (at most (T-1)//stride + 1 per row)."""
        batch, size = self.k.shape[:2]
        t = positions.shape[1]
        n_cmp = self.k_cmp.shape[1]
        b = jnp.arange(batch)[:, None]
        real = positions >= 0
        slot = jnp.where(real, positions, size)
        k = self.k.at[b, slot].set(k_new.astype(self.k.dtype), mode="drop")
        v = self.v.at[b, slot].set(v_new.astype(self.v.dtype), mode="drop")
        any_real = real.any(axis=1)
        last = jnp.max(jnp.where(real, positions, -1), axis=1).astype(jnp.int32)
        k_cmp = self.k_cmp
        if n_cmp:
            first = jnp.where(any_real, jnp.min(jnp.where(real, positions, _INT_MAX), axis=1), 0)
            c0 = jnp.maximum(0, -((kernel - 1 - first) // stride))  # first window ending at or after `first`
            c = c0[:, None] + jnp.arange((t - 1) // stride + 1)  # [B, n_upd]
            done = (c * stride + kernel - 1 <= last[:, None]) & (c < n_cmp) & any_real[:, None]
            src = jnp.clip(c[..., None] * stride + jnp.arange(kernel), 0, size - 1)  # [B, n_upd, kernel]
            kw = jnp.take_along_axis(k, src.reshape(batch, -1)[:, :, None, None], axis=1)
            kw = kw.reshape(batch, c.shape[1], kernel, *k.shape[2:]).astype(jnp.float32)
            k_cmp = k_cmp.at[b, jnp.where(done, c, n_cmp)].set(kw.mean(axis=2), mode="drop")
        return self.replace(k=k, v=v, k_cmp=k_cmp, length=jnp.maximum(self.length, last + 1))


# ----------------------------------------------------------------------------------------------------------
# InfLLM-V2 over a position-addressed cache (traced per-row positions)


def _group_queries(q, q_pos, group_rows: int):
    """Scatter the real rows of q `[B, T, H, d]` into consecutive position blocks of `group_rows` rows: the row
    at position p goes to buffer row p - base_b, base_b = the group start of the row's first real position.
    Returns q_buf `[B, R, H, d]`, pos_buf `[B, R]` (-1: empty row), slot `[B, T]` (R for padding rows)."""
    batch, t = q_pos.shape
    g = group_rows
    n_grp = t if g == 1 else (t + g - 2) // g + 1  # T consecutive positions touch at most this many blocks
    rows = n_grp * g
    real = q_pos >= 0
    first = jnp.min(jnp.where(real, q_pos, _INT_MAX), axis=1)
    base = jnp.where(real.any(axis=1), first // g * g, 0)
    slot = jnp.where(real, q_pos - base[:, None], rows)
    b = jnp.arange(batch)[:, None]
    q_buf = jnp.zeros((batch, rows, *q.shape[2:]), q.dtype).at[b, slot].set(q, mode="drop")
    pos_buf = jnp.full((batch, rows), -1, jnp.int32).at[b, slot].set(q_pos.astype(jnp.int32), mode="drop")
    return q_buf, pos_buf, slot


def _max_blocks(spec: SparseSpec, n_kb: int) -> int:
    return max(1, min(n_kb, spec.topk + -(-spec.local_window // spec.block_size)))


def _select_groups(q_grp, pos_grp, k_cmp, *, n_kb: int, spec: SparseSpec, scale: float):
    """Block choice of query groups. q_grp `[B, n, g, KV, G, d]`, pos_grp `[B, n, g]` (-1: empty row), k_cmp
    `[B, NC, KV, d]` -> (block indices `[B, n, KV, M]` int32, chosen ones first and ascending; counts
    `[B, n, KV]` int32)."""
    n_cmp = k_cmp.shape[1]
    bs = spec.block_size
    cmp_end = jnp.arange(n_cmp) * spec.stride + spec.kernel - 1  # last key of each window
    s = jnp.einsum("bnrkhd,bckd->bnkhrc", q_grp.astype(jnp.float32), k_cmp.astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST) * scale
    seen = cmp_end <= pos_grp[:, :, None, None, :, None]  # windows complete at each row
    s = jnp.where(seen, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
    l = jnp.sum(p, axis=-1, keepdims=True)
    agg = (p / jnp.where(l > 0, l, 1.0)).sum(axis=(3, 4))  # [B, n, KV, NC]

    last = jnp.max(pos_grp, axis=-1)  # [B, n], -1 for an empty group
    win_idx, win_valid = overlap_windows(n_kb, n_cmp, bs, spec.kernel, spec.stride)  # [nKB, w]
    complete = win_valid & (cmp_end[win_idx] <= last[:, :, None, None, None])  # [B, n, 1, nKB, w]
    pooled = jnp.where(complete, agg[..., win_idx], -jnp.inf).max(axis=-1)  # [B, n, KV, nKB]

    n_local = -(-spec.local_window // bs)
    last_blk = (last // bs)[:, :, None, None]
    j = jnp.arange(n_kb)
    valid = j <= last_blk
    forced = ((j < spec.init_blocks) | (j > last_blk - n_local)) & valid
    sc = jnp.where(forced, jnp.inf, jnp.where(valid, pooled, -jnp.inf))
    sc = jnp.where(valid & (sc == -jnp.inf), -jnp.finfo(jnp.float32).max, sc)  # valid beats invalid
    vals, idx = jax.lax.top_k(sc, _max_blocks(spec, n_kb))
    chosen = vals > -jnp.inf
    counts = chosen.sum(axis=-1).astype(jnp.int32)
    idx = jnp.sort(jnp.where(chosen, idx, n_kb), axis=-1)
    return jnp.where(jnp.arange(idx.shape[-1]) < counts[..., None], idx, 0).astype(jnp.int32), counts


def _attend_groups(q_grp, pos_grp, k, v, idx, counts, *, block_size: int, scale: float):
    """Causal softmax of each query group over its chosen key blocks: q_grp `[B, n, g, KV, G, d]`, k, v
    `[B, S, KV, d]` (position-addressed), idx `[B, n, KV, M]` -> o `[B, n, g, KV, G, d]` float32."""
    batch, size, kv_heads, d = k.shape
    n, m = idx.shape[1], idx.shape[-1]
    bs = block_size
    n_kb = -(-size // bs)
    pad = ((0, 0), (0, n_kb * bs - size), (0, 0), (0, 0))
    blocks = lambda x: jnp.pad(x, pad).reshape(batch, n_kb, bs, kv_heads, d).transpose(0, 3, 1, 2, 4)
    flat = idx.transpose(0, 2, 1, 3).reshape(batch, kv_heads, n * m)[..., None, None]
    kg = jnp.take_along_axis(blocks(k), flat, axis=2).reshape(batch, kv_heads, n, m, bs, d)
    vg = jnp.take_along_axis(blocks(v), flat, axis=2).reshape(batch, kv_heads, n, m, bs, d)
    s = jnp.einsum("bnrkhd,bknmjd->bnkhrmj", q_grp.astype(jnp.float32), kg.astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST) * scale
    listed = jnp.arange(m) < counts[..., None]  # [B, n, KV, M]
    key_pos = idx[..., None] * bs + jnp.arange(bs)  # [B, n, KV, M, bs]
    mask = listed[:, :, :, None, :, None] & (key_pos[:, :, :, None] <= pos_grp[:, :, None, :, None, None])
    s = jnp.where(mask[:, :, :, None], s, -jnp.inf)  # mask [B, n, KV, g, M, bs]
    mx = jax.lax.stop_gradient(jnp.max(s, axis=(-2, -1), keepdims=True))
    p = jnp.exp(s - jnp.where(jnp.isfinite(mx), mx, 0.0))
    l = jnp.sum(p, axis=(-2, -1), keepdims=True)
    return jnp.einsum("bnkhrmj,bknmjd->bnrkhd", p / jnp.where(l > 0, l, 1.0), vg.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST)


def _grouped(q, q_pos, kv_heads: int, spec: SparseSpec):
    """q `[B, T, H, d]` -> (q_grp `[B, n, g, KV, G, d]`, pos_grp `[B, n, g]`, slot `[B, T]`, rows R)."""
    batch, t, heads, d = q.shape
    g = 1 if t == 1 or spec.selection == "token" else spec.block_size
    q_buf, pos_buf, slot = _group_queries(q, q_pos, g)
    n = pos_buf.shape[1] // g
    return (q_buf.reshape(batch, n, g, kv_heads, heads // kv_heads, d), pos_buf.reshape(batch, n, g), slot,
            n * g)


def select_cached(q, q_pos, k_cmp, *, size: int, spec: SparseSpec, scale: float | None = None):
    """The cached path's block choice, exposed for tests: q `[B, T, H, d]` at q_pos `[B, T]`, compressed keys
    `[B, NC, KV, d]` of a cache of `size` slots -> (idx `[B, n, KV, M]`, counts `[B, n, KV]`, pos_grp
    `[B, n, g]`): group i holds the rows whose positions are pos_grp[:, i] (-1: empty)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    q_grp, pos_grp, _, _ = _grouped(q, q_pos, k_cmp.shape[2], spec)
    idx, counts = _select_groups(q_grp, pos_grp, k_cmp, n_kb=-(-size // spec.block_size), spec=spec, scale=scale)
    return idx, counts, pos_grp


def sparse_attention_cached(q, q_pos, k, v, k_cmp, *, spec: SparseSpec, scale: float,
                            chunk_elems: int = 1 << 26):
    """InfLLM-V2 attention of q `[B, T, H, d]` at positions q_pos `[B, T]` (negative: padding, output 0) over a
    position-addressed cache k, v `[B, S, KV, d]` with compressed keys k_cmp `[B, NC, KV, d]` (the rule is in
    the module docstring). Query groups are processed in chunks (`lax.map`) of about `chunk_elems` scores.
    Returns o `[B, T, H, d]` in q.dtype; no gradient through the selection."""
    batch, t, heads, d = q.shape
    kv_heads = k.shape[2]
    q_grp, pos_grp, slot, rows = _grouped(q, q_pos, kv_heads, spec)
    n, g = pos_grp.shape[1:]
    n_kb = -(-k.shape[1] // spec.block_size)
    per_group = batch * g * heads * max(k_cmp.shape[1], _max_blocks(spec, n_kb) * spec.block_size, 1)
    chunk = max(1, min(n, chunk_elems // per_group))
    n_chunks = -(-n // chunk)
    extra = n_chunks * chunk - n
    q_grp = jnp.pad(q_grp, ((0, 0), (0, extra)) + ((0, 0),) * 4)
    pos_grp = jnp.pad(pos_grp, ((0, 0), (0, extra), (0, 0)), constant_values=-1)
    split = lambda x: jnp.moveaxis(x.reshape(batch, n_chunks, chunk, *x.shape[2:]), 1, 0)
    k_cmp = jax.lax.stop_gradient(k_cmp)

    def one_chunk(args):
        qc, pc = args
        idx, counts = _select_groups(jax.lax.stop_gradient(qc), pc, k_cmp, n_kb=n_kb, spec=spec, scale=scale)
        return _attend_groups(qc, pc, k, v, idx, counts, block_size=spec.block_size, scale=scale)

    o = jax.lax.map(one_chunk, (split(q_grp), split(pos_grp)))  # [n_chunks, B, chunk, g, KV, G, d]
    o = jnp.moveaxis(o, 0, 1).reshape(batch, n_chunks * chunk * g, heads, d)[:, :rows]
    o = jnp.take_along_axis(o, jnp.clip(slot, 0, rows - 1)[:, :, None, None], axis=1)
    return jnp.where((slot < rows)[:, :, None, None], o, 0.0).astype(q.dtype)


# ----------------------------------------------------------------------------------------------------------


class SparseAttention(nn.Module):
    """x `[batch, seq, d_model]`, positions `[batch, seq]` (or None) -> (y `[batch, seq, d_model]`, cache).

    `segment_ids [batch, seq]` (packed documents, no cache): the op's segment-aware paths, below `dense_below`
    (the row's length, static) dense softmax inside each segment, else InfLLM-V2 whose compressed keys, blocks,
    initial block and local window are each segment's own; positions (per document) only feed RoPE."""

    cfg: ModelConfig
    spec: SparseSpec = SparseSpec()

    @nn.compact
    def __call__(self, x, positions=None, cache: SparseCache | None = None, *, segment_ids=None):
        cfg, spec = self.cfg, self.spec
        check_layer_inputs("SparseAttention", cfg, x, positions, cache, SparseCache)
        positions = resolve_segments("SparseAttention", x, positions, segment_ids, cache)
        q, k, v = project_qkv(cfg, x, positions, qk_norm=spec.qk_norm, rope=spec.rope)
        scale = 1.0 / math.sqrt(cfg.head_dim)
        batch, t = x.shape[:2]
        kw = dict(kernel=spec.kernel, stride=spec.stride)
        if segment_ids is not None:  # packed documents (no cache): the ops mask by segment and index
            if t < spec.dense_below:
                o = attention(q, k, v, impl="xla" if spec.impl == "xla" else "auto", segment_ids=segment_ids)
            else:
                o = infllm_attention(q, k, v, config=spec.infllm, scale=scale, impl=spec.impl,
                                     segment_ids=segment_ids)
        elif cache is None:
            if t < spec.dense_below:
                o = attention(q, k, v, q_positions=positions, k_positions=positions,
                              impl="xla" if spec.impl == "xla" else "auto")
            elif positions is None:
                o = infllm_attention(q, k, v, config=spec.infllm, scale=scale, impl=spec.impl)
            else:
                fresh = SparseCache.create(batch, t, cfg.num_kv_heads, cfg.head_dim, k.dtype, **kw)
                o = _infllm_from_cache(q, positions, fresh.append(k, v, positions, **kw), spec, scale, True)
        else:
            if positions is None:  # an unpadded first prefill: positions 0..t-1
                positions = default_positions(batch, t)
            empty = jnp.all(cache.length == 0)
            cache = cache.append(k, v, positions, **kw)
            o = _attend_cache(q, positions, cache, spec, scale, empty)
        if spec.output_gate:
            o = o * output_gate(cfg, x, spec.gate_bias_init, "o_gate")
        return out_projection(cfg)(o.astype(dtype_of(cfg.dtype))), cache

    @classmethod
    def init_cache(cls, cfg: ModelConfig, spec: SparseSpec, batch: int, max_len: int) -> SparseCache:
        """`max_len` slots of keys and values plus num_compressed(max_len) compressed keys (float32)."""
        return SparseCache.create(batch, max_len, cfg.num_kv_heads, cfg.head_dim, dtype_of(cfg.dtype),
                                  kernel=spec.kernel, stride=spec.stride)


def _infllm_from_cache(q, positions, cache: SparseCache, spec: SparseSpec, scale: float, empty):
    """InfLLM-V2 from the cache (after the append). A call of T > 1 tokens into a cache that was `empty`, with
    positions arange(T) in every row (an unpadded prefill), takes the op instead (`infllm_attention`: the
    Pallas kernel on GPU), which chooses the same blocks (tested); a traced switch (`lax.cond`)."""
    t = q.shape[1]

    def cached():
        return sparse_attention_cached(q, positions, cache.k, cache.v, cache.k_cmp, spec=spec, scale=scale)

    if t == 1 or t > cache.size:
        return cached()

    def op():
        config = dataclasses.replace(spec.infllm, dense_below=0)
        return infllm_attention(q, cache.k[:, :t], cache.v[:, :t], config=config, scale=scale, q_offset=0,
                                impl=spec.impl).astype(q.dtype)

    return jax.lax.cond(empty & jnp.all(positions == jnp.arange(t)), op, cached)


def _attend_cache(q, positions, cache: SparseCache, spec: SparseSpec, scale: float, empty):
    """Dense over the cache while the batch's context is below `dense_below` (its keys all lie in the first
    `dense_below` slots), else InfLLM-V2 from the cache; a traced switch (`lax.cond`) unless static."""
    dense_slots = min(spec.dense_below, cache.size)

    def dense():
        return attention(q, cache.k[:, :dense_slots], cache.v[:, :dense_slots], q_positions=positions,
                         k_positions=cache.slot_positions()[:, :dense_slots], scale=scale, impl="xla").astype(q.dtype)

    def sparse():
        return _infllm_from_cache(q, positions, cache, spec, scale, empty)

    if cache.size < spec.dense_below:  # the context never reaches the threshold
        return dense()
    if spec.dense_below == 0:
        return sparse()
    return jax.lax.cond(jnp.max(cache.length) < spec.dense_below, dense, sparse)
