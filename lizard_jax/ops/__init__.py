"""Attention ops as pure functions, one folder per family (reference.py is the spec; __init__ dispatches impl)."""

from lizard_jax.ops.gla import gla, gla_step
from lizard_jax.ops.lightning import lightning_attention, lightning_slopes, lightning_step
from lizard_jax.ops.linear import FEATURE_MAPS, get_feature_map, linear_attention, linear_attention_step
