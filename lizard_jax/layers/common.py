"""Building blocks shared by every attention family: norms, RoPE, projections, KV caches.

Conventions (every layer follows them):
- activations `x [batch, seq, d_model]`; `positions [batch, seq]` int32 absolute positions, negative for padding
  (left-padded prompts); `positions=None` means `arange(seq)` with no padding (training / plain prefill).
- a layer is called as `layer(x, positions, cache=None) -> (y, cache)`; with a cache it appends the new tokens
  to it, so full prefill, chunked prefill and token-by-token decoding are the same call. `positions=None` with a
  cache means an unpadded prefill into an empty cache (positions 0..T-1): softmax layers then run the chunk
  through the fast self-attention path (cuDNN on a GPU) before storing it. Each family provides
  `init_cache(cfg, spec, batch, max_len)` (a classmethod) building its cache of fixed size.
- packed documents: every layer also takes keyword `segment_ids [batch, seq]` int32 (None: one segment per row),
  equal within a document (a contiguous run); a token attends only to, and carries recurrent state only from,
  tokens of its own segment. `positions` are then per document (`document_positions(segment_ids)` when None), so
  RoPE restarts with each document; they must count up by one within a document (the softmax ops then mask by
  segment and index, which keeps their banded sliding-window path). Padding is one more segment (the trainer's
  packer gives it id 0); its outputs are not meaningful. No cache (training / scoring only): with a cache it is
  an error. With `segment_ids=None` the layer makes exactly the calls it made before segment ids existed (Python branch).
- projections are named q_proj/k_proj/v_proj/o_proj in every family, so a softmax teacher's weights load
  unchanged into a student layer and only the new parameters are added.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from lizard_jax.config import ModelConfig, RopeConfig
from lizard_jax.ops.softmax import attention

Array = jax.Array
INIT_STD = 0.02


def dtype_of(name: str):
    return jnp.dtype(name)


def default_positions(batch: int, seq: int) -> Array:
    return jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))


def document_positions(segment_ids) -> Array:
    """Per-document positions `[batch, seq]` int32 of `segment_ids [batch, seq]`: 0 at the first token of each
    run of equal ids (a document), counting up within it."""
    seg = jnp.asarray(segment_ids)
    t = seg.shape[1]
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), seg.shape)
    start = jnp.concatenate([jnp.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    return idx - jax.lax.cummax(jnp.where(start, idx, 0), axis=1)


def segment_kwargs(segment_ids) -> dict:
    """`{"segment_ids": segment_ids}` for an op call, `{}` when None: without segment ids the ops are called
    exactly as before (no extra argument, so no extra input or mask in the compiled program)."""
    return {} if segment_ids is None else {"segment_ids": segment_ids}


def resolve_segments(layer: str, x, positions, segment_ids, cache):
    """Check `segment_ids` at a layer's boundary and return the positions to use: `positions` unchanged when
    there are no segment ids; with them, per-document positions when `positions` is None. Errors: not
    `[batch, seq]` integers, or given together with a cache (packed documents are for training / scoring;
    decoding and generation take unpacked rows)."""
    if segment_ids is None:
        return positions
    if segment_ids.shape != x.shape[:2]:
        raise ValueError(f"{layer}: segment_ids must be [batch, seq] = {x.shape[:2]}, got {segment_ids.shape=}")
    if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
        raise TypeError(f"{layer}: segment_ids must be integers, got {segment_ids.dtype=}")
    if cache is not None:
        raise ValueError(f"{layer}: segment_ids (packed documents) cannot be used with a cache: decoding and "
                         "generation take one unpacked sequence per row; call without a cache, or unpack the rows")
    return document_positions(segment_ids) if positions is None else positions


def dense(features, *, axis=-1, names: Sequence[str | None], cfg: ModelConfig, bias: bool = False,
          name: str | None = None, kernel_init=None) -> nn.DenseGeneral:
    """A DenseGeneral whose kernel carries logical axis names (one sharding rules table maps them to a mesh)."""
    init = kernel_init or nn.initializers.normal(INIT_STD)
    n_out = len(features) if isinstance(features, tuple) else 1
    return nn.DenseGeneral(
        features=features,
        axis=axis,
        use_bias=bias,
        dtype=dtype_of(cfg.dtype),
        param_dtype=dtype_of(cfg.param_dtype),
        kernel_init=nn.with_logical_partitioning(init, tuple(names)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, tuple(names[-n_out:])),
        name=name,
    )


class RMSNorm(nn.Module):
    """RMSNorm over the last axis, computed in float32 (Llama convention: scale * x / rms(x))."""

    eps: float = 1e-5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    axis_name: str = "norm"

    @nn.compact
    def __call__(self, x):
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
            (x.shape[-1],), self.param_dtype,
        )
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (y * scale.astype(jnp.float32)).astype(self.dtype)


def rope_inv_freq(head_dim: int, rope: RopeConfig) -> Array:
    """Inverse frequencies [head_dim // 2], with linear or Llama-3.1 scaling."""
    inv = 1.0 / (rope.theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if rope.scaling == "linear":
        inv = inv / rope.factor
    elif rope.scaling == "llama3":
        low_wl = rope.original_max_position / rope.low_freq_factor
        high_wl = rope.original_max_position / rope.high_freq_factor
        wl = 2 * math.pi / inv
        scaled = jnp.where(wl > low_wl, inv / rope.factor, inv)
        smooth = (rope.original_max_position / wl - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wl >= high_wl) & (wl <= low_wl)
        inv = jnp.where(medium, smoothed, scaled)
    return inv


def apply_rope(x, positions, rope: RopeConfig):
    """Rotate `x [batch, seq, heads, head_dim]` by `positions [batch, seq]` (HF's rotate-half layout)."""
    d = x.shape[-1]
    inv = rope_inv_freq(d, rope)
    ang = jnp.maximum(positions, 0).astype(jnp.float32)[..., None] * inv  # [B, T, d/2]
    cos = jnp.cos(ang)[:, :, None, :]
    sin = jnp.sin(ang)[:, :, None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., : d // 2], xf[..., d // 2:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def qkv_projection(cfg: ModelConfig, x):
    """q/k/v projections of a Llama-family layer, created inside the calling module's compact method:
    x [B,T,D] -> q [B,T,H,Dh], k/v [B,T,KVH,Dh]."""
    q = dense((cfg.num_heads, cfg.head_dim), names=("embed", "heads", "head_dim"), cfg=cfg, bias=cfg.qkv_bias,
              name="q_proj")(x)
    k = dense((cfg.num_kv_heads, cfg.head_dim), names=("embed", "kv_heads", "head_dim"), cfg=cfg,
              bias=cfg.qkv_bias, name="k_proj")(x)
    v = dense((cfg.num_kv_heads, cfg.head_dim), names=("embed", "kv_heads", "head_dim"), cfg=cfg,
              bias=cfg.qkv_bias, name="v_proj")(x)
    return q, k, v


def project_qkv(cfg: ModelConfig, x, positions, *, rope: bool, qk_norm: bool = False):
    """The teacher's q/k/v projections, optional per-head QK RMSNorm (before RoPE), optional RoPE (positions None:
    arange). Creates q_proj/k_proj/v_proj (and q_norm/k_norm) inside the calling compact method."""
    q, k, v = qkv_projection(cfg, x)
    if qk_norm:
        norm = lambda name: RMSNorm(cfg.rms_eps, dtype_of(cfg.dtype), dtype_of(cfg.param_dtype), name=name)
        q, k = norm("q_norm")(q), norm("k_norm")(k)
    if rope:
        pos = positions if positions is not None else default_positions(*x.shape[:2])
        q, k = apply_rope(q, pos, cfg.rope), apply_rope(k, pos, cfg.rope)
    return q, k, v


def out_projection(cfg: ModelConfig, name: str = "o_proj") -> nn.DenseGeneral:
    """o_proj: [B,T,H,Dh] -> [B,T,D] (create inside a compact method)."""
    return dense(cfg.d_model, axis=(-2, -1), names=("heads", "head_dim", "embed"), cfg=cfg, name=name)


def check_layer_inputs(layer: str, cfg: ModelConfig, x, positions, cache, cache_type: type | None) -> None:
    """Clear errors at every layer's boundary (`layer` names it): x `[batch, seq, d_model]` floating, positions
    `[batch, seq]` integer or None, a cache of `cache_type` (None: any cache with `attend`, e.g. Star Attention's
    sharded one) holding the batch of x. Shapes and dtypes are static, so this costs nothing under jit."""
    if x.ndim != 3 or x.shape[-1] != cfg.d_model:
        raise ValueError(f"{layer}: x must be [batch, seq, d_model={cfg.d_model}], got {x.shape=}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{layer}: x must be floating, got {x.dtype=}")
    if positions is not None:
        if positions.shape != x.shape[:2]:
            raise ValueError(f"{layer}: positions must be [batch, seq] = {x.shape[:2]}, got {positions.shape=}")
        if not jnp.issubdtype(positions.dtype, jnp.integer):
            raise TypeError(f"{layer}: positions must be integers, got {positions.dtype=}")
    if cache is None:
        return
    if cache_type is None and not callable(getattr(cache, "attend", None)):
        raise TypeError(f"{layer}: cache must be a KVCache (from init_cache) or another cache with an `attend` "
                        f"method, got {type(cache).__name__}")
    if cache_type is not None and not isinstance(cache, cache_type):
        raise TypeError(f"{layer}: cache must be a {cache_type.__name__} (from init_cache), got {type(cache).__name__}")
    if cache_type is None and not isinstance(cache, KVCache):
        return  # a foreign cache (Star's sharded, LazyLLM's) lays its batch out its own way and checks it itself
    batch = jax.tree_util.tree_leaves(cache)[0].shape[0]  # our caches' arrays lead with the batch
    if batch != x.shape[0]:
        raise ValueError(f"{layer}: cache batch mismatch: the cache was built for batch {batch}, x has batch "
                         f"{x.shape[0]}")


# ----------------------------------------------------------------------------------------------------------
# KV caches


@flax.struct.dataclass
class KVCache:
    """Keys/values of past tokens; `attend` is how a softmax-type layer attends over them (other cache types,
    e.g. Star Attention's sharded one, provide the same method). k, v `[batch, size, kv_heads, head_dim]`; pos
    `[batch, size]` int32 position of each slot (-1 = empty or padding); index: int32 scalar, tokens written so
    far. `ring` caches keep the last `size` tokens (sliding windows) at slot `index % size`; full caches hold up
    to `size` tokens."""

    k: Array
    v: Array
    pos: Array
    index: Array
    ring: bool = flax.struct.field(pytree_node=False, default=False)
    empty: bool = flax.struct.field(pytree_node=False, default=False)  # nothing written yet (statically known)

    @classmethod
    def create(cls, batch: int, size: int, kv_heads: int, head_dim: int, dtype, ring: bool = False):
        return cls(
            k=jnp.zeros((batch, size, kv_heads, head_dim), dtype),
            v=jnp.zeros((batch, size, kv_heads, head_dim), dtype),
            pos=jnp.full((batch, size), -1, jnp.int32),
            index=jnp.zeros((), jnp.int32),
            ring=ring,
            empty=True,
        )

    def update(self, k_new, v_new, pos_new):
        """Append `T` new tokens. Returns (new cache, k, v, pos) to attend over: for a full cache the whole
        cache after the write; for a ring cache the old ring followed by the new tokens (so a chunk longer
        than the ring still sees its own window)."""
        t = k_new.shape[1]
        size = self.k.shape[1]
        k_new = k_new.astype(self.k.dtype)
        v_new = v_new.astype(self.v.dtype)
        if not self.ring:
            at = (0, self.index, 0, 0)
            k = jax.lax.dynamic_update_slice(self.k, k_new, at)
            v = jax.lax.dynamic_update_slice(self.v, v_new, at)
            pos = jax.lax.dynamic_update_slice(self.pos, pos_new.astype(jnp.int32), at[:2])
            new = self.replace(k=k, v=v, pos=pos, index=self.index + t, empty=False)
            return new, k, v, pos
        keep = min(t, size)
        slots = (self.index + (t - keep) + jnp.arange(keep)) % size  # distinct slots: no scatter collisions
        new = self.replace(
            k=self.k.at[:, slots].set(k_new[:, t - keep:]),
            v=self.v.at[:, slots].set(v_new[:, t - keep:]),
            pos=self.pos.at[:, slots].set(pos_new[:, t - keep:].astype(jnp.int32)),
            index=self.index + t,
            empty=False,
        )
        cat = lambda a, b: jnp.concatenate([a, b], axis=1)
        return new, cat(self.k, k_new), cat(self.v, v_new), cat(self.pos, pos_new.astype(jnp.int32))

    def attend(self, q, k_new, v_new, positions, *, window=None, sinks=None, scale=None, impl="xla"):
        """Append k_new/v_new `[B,T,KVH,D]` at `positions [B,T]` and attend with q `[B,T,H,D]` over the
        cache. Returns (o `[B,T,H,D]`, new cache). `positions=None`: an unpadded prefill of an empty cache, whose
        attention is the chunk's own causal self-attention (the op's fast path, cuDNN on a GPU)."""
        if positions is None:
            if not self.empty:
                raise ValueError("positions=None with a cache is only for the first (unpadded) prefill of an empty "
                                 "cache; pass explicit positions")
            o = attention(q, k_new, v_new, window=window, sinks=sinks, scale=scale, impl=impl)
            return o, self.update(k_new, v_new, default_positions(*k_new.shape[:2]))[0]
        cache, k, v, pos = self.update(k_new, v_new, positions)
        o = attention(q, k, v, q_positions=positions, k_positions=pos, window=window, sinks=sinks, scale=scale,
                      impl=impl)
        return o, cache
