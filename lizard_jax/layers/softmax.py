"""Softmax attention, the teacher's layer: causal (optionally sliding-window) GQA attention with RoPE."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.linen as nn

from lizard_jax.config import AttentionSpec, ConfigError, ModelConfig, register_attention
from lizard_jax.layers.common import (KVCache, check_layer_inputs, dtype_of, out_projection, project_qkv,
                                      resolve_segments, segment_kwargs)
from lizard_jax.ops.softmax import attention


@register_attention
@dataclasses.dataclass(frozen=True)
class SoftmaxSpec(AttentionSpec):
    """Options of a softmax layer.

    window: None for full causal attention, else each query sees the `window` most recent positions
      (itself included); the decode cache is then a ring buffer of `window` slots.
    rope: apply rotary embeddings to q and k.
    impl: the op's implementation ("auto" picks cuDNN on a GPU where it applies).
    """

    kind: ClassVar[str] = "softmax"
    window: int | None = None
    rope: bool = True
    impl: str = "auto"

    def __post_init__(self):
        if self.window is not None and self.window < 1:
            raise ConfigError(f"softmax.window must be >= 1 or null, got {self.window}")
        if self.impl not in ("auto", "xla", "cudnn"):
            raise ConfigError(f"softmax.impl must be auto/xla/cudnn, got {self.impl!r}")


def cache_size(spec: SoftmaxSpec, max_len: int) -> tuple[int, bool]:
    """(slots, ring): a window shorter than the cache needs only a ring of `window` slots."""
    if spec.window is not None and spec.window < max_len:
        return spec.window, True
    return max_len, False


class SoftmaxAttention(nn.Module):
    """x `[batch, seq, d_model]`, positions `[batch, seq]` (or None) -> (y `[batch, seq, d_model]`, cache);
    `segment_ids [batch, seq]` (packed documents, no cache): attention stays inside each segment."""

    cfg: ModelConfig
    spec: SoftmaxSpec = SoftmaxSpec()

    @nn.compact
    def __call__(self, x, positions=None, cache: KVCache | None = None, *, segment_ids=None):
        cfg, spec = self.cfg, self.spec
        check_layer_inputs("SoftmaxAttention", cfg, x, positions, cache, None)
        positions = resolve_segments("SoftmaxAttention", x, positions, segment_ids, cache)
        q, k, v = project_qkv(cfg, x, positions, rope=spec.rope)
        if cache is None:
            op_pos = positions if segment_ids is None else None  # packed: segment + index masks (common.py)
            o = attention(q, k, v, q_positions=op_pos, k_positions=op_pos, window=spec.window, impl=spec.impl,
                          **segment_kwargs(segment_ids))
        else:
            o, cache = cache.attend(q, k, v, positions, window=spec.window,
                                    impl="xla" if spec.impl == "cudnn" else spec.impl)
        return out_projection(cfg)(o), cache

    @classmethod
    def init_cache(cls, cfg: ModelConfig, spec: SoftmaxSpec, batch: int, max_len: int) -> KVCache:
        size, ring = cache_size(spec, max_len)
        return KVCache.create(batch, size, cfg.num_kv_heads, cfg.head_dim, dtype_of(cfg.dtype), ring=ring)

