"""Flax attention layers, one file per family; `LAYERS` maps a spec kind to its module class.

Every layer is called as `layer(x [batch, seq, d_model], positions [batch, seq] | None, cache=None)
-> (y, cache)` and provides `init_cache(cfg, spec, batch, max_len)`; see `layers/common.py`.
"""

from lizard_jax.layers.gla import GatedLinearAttention, GLASpec
from lizard_jax.layers.lightning import LightningAttention, LightningSpec
from lizard_jax.layers.linear import LinearAttention, LinearSpec
from lizard_jax.layers.lizard import LizardAttention, LizardSpec
from lizard_jax.layers.sliding_window import SlidingWindowAttention, SlidingWindowSpec
from lizard_jax.layers.softmax import SoftmaxAttention, SoftmaxSpec
from lizard_jax.layers.sparse import SparseAttention, SparseSpec

LAYERS = {
    SoftmaxSpec.kind: SoftmaxAttention,
    SlidingWindowSpec.kind: SlidingWindowAttention,
    LinearSpec.kind: LinearAttention,
    GLASpec.kind: GatedLinearAttention,
    LizardSpec.kind: LizardAttention,
    LightningSpec.kind: LightningAttention,
    SparseSpec.kind: SparseAttention,
}


def layer_class(kind: str):
    try:
        return LAYERS[kind]
    except KeyError:
        raise ValueError(f"no layer for attention kind {kind!r}; known: {sorted(LAYERS)}") from None
