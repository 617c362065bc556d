"""Sliding-window softmax attention with meta-memory tokens: the Lizard anchor (arXiv 2507.09025) as a layer.

    y_i = sum_{i-w < j <= i} e^{q_i k_j / sqrt(d)} v_j / (sum_{s=1..m} e^{t_s} + sum_{i-w < j <= i} e^{q_i k_j / sqrt(d)})

The m meta tokens are learnable logits t `[heads, m]` added to the denominator only (attention sinks; the paper
calls them logits, so e^t enters the denominator). The window rule is the one of
`lizard_jax.ops.softmax.visible` (a query sees the `window` most recent positions, itself included); the
decode cache is a ring buffer of `window` slots, so decoding memory does not grow with context.

Choice not in the paper: the meta logits start at `meta_init` (default 0.0, i.e. each acts like one extra key with
score 0 and no value) for every head.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.linen as nn

from lizard_jax.config import AttentionSpec, ConfigError, ModelConfig, register_attention
from lizard_jax.layers.common import (KVCache, apply_rope, check_layer_inputs, default_positions, dtype_of,
                                      out_projection, qkv_projection, resolve_segments, segment_kwargs)
from lizard_jax.layers.softmax import SoftmaxAttention
from lizard_jax.ops.softmax import attention


def check_window_options(where: str, window: int, meta_tokens: int) -> None:
    if window < 1:
        raise ConfigError(f"{where}.window must be >= 1, got {window}")
    if meta_tokens < 0:
        raise ConfigError(f"{where}.meta_tokens must be >= 0, got {meta_tokens}")


def meta_logits(module: nn.Module, heads: int, m: int, init: float):
    """The meta-token logits `[heads, m]` (param `meta_logits` of `module`), or None when m = 0."""
    if m == 0:
        return None
    return module.param("meta_logits", nn.with_logical_partitioning(nn.initializers.constant(init), ("heads", None)),
                        (heads, m), dtype_of(module.cfg.param_dtype))


def local_attention(cfg: ModelConfig, q, k, v, positions, cache: KVCache | None, *, window: int | None, sinks=None,
                    rope: bool = True, impl: str = "auto", segment_ids=None):
    """RoPE (optional) then causal softmax attention in a window, with sink logits, over `cache` when given.

    q `[batch, seq, heads, head_dim]`, k/v `[batch, seq, kv_heads, head_dim]`, positions `[batch, seq]` or None
    (= arange; required with a cache). With a cache the new tokens are appended to it (a ring buffer keeps the
    last `window`). segment_ids `[batch, seq]` or None (no cache): attention stays inside each segment.
    Returns (o `[batch, seq, heads, head_dim]`, the new cache or None).
    """
    if rope:
        pos = positions if positions is not None else default_positions(*q.shape[:2])
        q, k = apply_rope(q, pos, cfg.rope), apply_rope(k, pos, cfg.rope)
    if cache is None:
        op_pos = positions if segment_ids is None else None  # packed: segment + index masks (common.py)
        return attention(q, k, v, q_positions=op_pos, k_positions=op_pos, window=window, sinks=sinks, impl=impl,
                         **segment_kwargs(segment_ids)), None
    return cache.attend(q, k, v, positions, window=window, sinks=sinks, impl="xla" if impl == "cudnn" else impl)


@register_attention
@dataclasses.dataclass(frozen=True)
class SlidingWindowSpec(AttentionSpec):
    """Options of a sliding-window layer with meta memory.

    window: keys a query sees, itself included (paper: 128). meta_tokens: m learnable sink logits per head
    (paper: 4; 0 = plain sliding window). meta_init: their initial value. rope: the teacher's RoPE.
    impl: the softmax op's ("cudnn" only without meta tokens, which it cannot add).
    """

    kind: ClassVar[str] = "sliding_window"
    window: int = 128
    meta_tokens: int = 4
    meta_init: float = 0.0
    rope: bool = True
    impl: str = "auto"

    def __post_init__(self):
        check_window_options("sliding_window", self.window, self.meta_tokens)
        if self.impl not in ("auto", "xla", "cudnn"):
            raise ConfigError(f"sliding_window.impl must be auto/xla/cudnn, got {self.impl!r}")
        if self.impl == "cudnn" and self.meta_tokens:
            raise ConfigError("sliding_window.impl='cudnn' cannot add meta tokens; use 'auto' or meta_tokens=0")


class SlidingWindowAttention(nn.Module):
    """x `[batch, seq, d_model]`, positions `[batch, seq]` (or None) -> (y `[batch, seq, d_model]`, cache).

    New parameters over the teacher's q/k/v/o_proj: `meta_logits [heads, meta_tokens]`. `segment_ids [batch,
    seq]` (packed documents, no cache): the window stays inside each segment; the meta tokens are every segment's.
    """

    cfg: ModelConfig
    spec: SlidingWindowSpec = SlidingWindowSpec()

    @nn.compact
    def __call__(self, x, positions=None, cache: KVCache | None = None, *, segment_ids=None):
        cfg, spec = self.cfg, self.spec
        check_layer_inputs("SlidingWindowAttention", cfg, x, positions, cache, KVCache)
        positions = resolve_segments("SlidingWindowAttention", x, positions, segment_ids, cache)
        q, k, v = qkv_projection(cfg, x)
        sinks = meta_logits(self, cfg.num_heads, spec.meta_tokens, spec.meta_init)
        o, cache = local_attention(cfg, q, k, v, positions, cache, window=spec.window, sinks=sinks, rope=spec.rope,
                                   impl=spec.impl, segment_ids=segment_ids)
        return out_projection(cfg)(o), cache

    @classmethod
    def init_cache(cls, cfg: ModelConfig, spec: SlidingWindowSpec, batch: int, max_len: int) -> KVCache:
        return SoftmaxAttention.init_cache(cfg, spec, batch, max_len)  # a ring of `window` slots (same rule)
