"""Attention ops as pure functions, one folder per family (reference.py is the spec; __init__ dispatches impl).

    softmax/        attention (causal, window, GQA, sinks, lse)
    gated_linear/   gla, gla_step: gated linear attention (the chunked scan's oracle)
    lightning/      lightning_attention: GLA with one fixed decay per head
    linear/         linear_attention with feature maps (elu+1, relu, T2R, Hedgehog)
    sparse/         InfLLM-V2 block selection and block_sparse_attention (settings.py: the paper's settings)
    impl.py         resolve_impl and the Pallas kernel import, shared by the folders with a kernel
"""

from lizard_jax.ops.gated_linear import gla, gla_step
from lizard_jax.ops.lightning import lightning_attention, lightning_slopes, lightning_step
from lizard_jax.ops.linear import FEATURE_MAPS, get_feature_map, linear_attention, linear_attention_step
from lizard_jax.ops.softmax import attention
from lizard_jax.ops.sparse import InfLLMConfig, block_sparse_attention, infllm_attention, infllm_select

__all__ = [
    "attention", "gla", "gla_step", "lightning_attention", "lightning_slopes", "lightning_step",
    "linear_attention", "linear_attention_step", "FEATURE_MAPS", "get_feature_map",
    "block_sparse_attention", "infllm_attention", "infllm_select", "InfLLMConfig",
]
