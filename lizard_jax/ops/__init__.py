"""Attention ops as pure functions, one folder per family (reference.py is the spec; __init__ dispatches impl).

The GLA op itself is ``lizard_jax.ops.gla.gla``: binding the function ``gla`` here would replace the
subpackage attribute ``lizard_jax.ops.gla`` and break ``import lizard_jax.ops.gla.chunk``.
"""

from lizard_jax.ops.gla import gla_step
from lizard_jax.ops.lightning import lightning_attention, lightning_slopes, lightning_step
from lizard_jax.ops.linear import FEATURE_MAPS, get_feature_map, linear_attention, linear_attention_step
