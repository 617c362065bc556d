"""Model FLOP counts for throughput and MFU reports (matmuls only unless stated; embedding lookups are free)."""

from __future__ import annotations

from lizard_jax.config import ModelConfig


def attention_params(cfg: ModelConfig) -> int:
    """Matmul parameters of one layer's q/k/v/o projections."""
    d, h, kv, hd = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    return d * h * hd * 2 + d * kv * hd * 2


def matmul_params(cfg: ModelConfig) -> int:
    """Matmul parameters of the whole decoder: attention projections, SwiGLU MLPs and the lm_head."""
    return cfg.num_layers * (attention_params(cfg) + 3 * cfg.d_model * cfg.ffn_dim) + cfg.d_model * cfg.vocab_size


def causal_attention_flops(cfg: ModelConfig, seq: int) -> float:
    """Forward FLOPs of causal softmax attention scores and values over one sequence (QK^T and PV, causal half)."""
    return 2.0 * seq * seq * cfg.num_heads * cfg.head_dim * cfg.num_layers
