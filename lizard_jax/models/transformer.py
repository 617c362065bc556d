"""The Llama-family decoder (Llama, Mistral, Qwen2, SmolLM) with a per-layer attention schedule.

Each layer's attention module is chosen from `cfg.attention[i].kind` through `lizard_jax.layers.LAYERS`, so
Lizard, Lightning, sparse and other families plug in without touching this file. Intermediates sown under
"intermediates" (`attn_in`, `attn_out` per layer) feed attention-transfer distillation.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lizard_jax.config import ModelConfig
from lizard_jax.layers import layer_class
from lizard_jax.layers.common import INIT_STD, RMSNorm, dense, document_positions, dtype_of


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        gate = dense(c.ffn_dim, names=("embed", "mlp"), cfg=c, name="gate_proj")(x)
        up = dense(c.ffn_dim, names=("embed", "mlp"), cfg=c, name="up_proj")(x)
        return dense(c.d_model, names=("mlp", "embed"), cfg=c, name="down_proj")(nn.silu(gate) * up)


class DecoderLayer(nn.Module):
    cfg: ModelConfig
    index: int

    @nn.compact
    def __call__(self, x, positions, cache, segment_ids=None):
        c = self.cfg
        spec = c.attention[self.index]
        norm = lambda name: RMSNorm(c.rms_eps, dtype_of(c.dtype), dtype_of(c.param_dtype), name=name)
        h = norm("attn_norm")(x)
        self.sow("intermediates", "attn_in", h)
        seg = {} if segment_ids is None else {"segment_ids": segment_ids}  # None: the call as before
        a, cache = layer_class(spec.kind)(c, spec, name="attn")(h, positions, cache, **seg)
        self.sow("intermediates", "attn_out", a)
        x = x + a
        x = x + MLP(c, name="mlp")(norm("mlp_norm")(x))
        return x, cache


class Transformer(nn.Module):
    """tokens `[batch, seq]` int32, positions `[batch, seq]` (None = arange; negative = padding) ->
    logits `[batch, seq, vocab]` float32, and the updated per-layer caches when `caches` is given.

    `segment_ids [batch, seq]` int (None = one document per row): packed documents, each attending only to
    itself (every layer, `layers/common.py`); positions None then means per-document positions
    (`document_positions`). Not with caches (decoding takes unpacked rows).

    `remat` recomputes each layer in the backward pass (training memory); `return_hidden` returns the final
    hidden states `[batch, seq, d_model]` instead of logits. Submodules are attributes (`embed`, `layers[i]`,
    `final_norm`, `head`), so serving strategies (Star Attention, LazyLLM) can drive the layers themselves on
    a bound model: `m = model.bind({"params": params}); x = m.embed(tokens); x, c = m.layers[0](x, pos, c)`.
    """

    cfg: ModelConfig
    remat: bool = False

    def setup(self):
        c = self.cfg
        self.embed = nn.Embed(
            c.vocab_size, c.d_model, dtype=dtype_of(c.dtype), param_dtype=dtype_of(c.param_dtype),
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(INIT_STD), ("vocab", "embed")),
        )
        layer_cls = nn.remat(DecoderLayer) if self.remat else DecoderLayer
        self.layers = [layer_cls(c, i) for i in range(c.num_layers)]
        self.final_norm = RMSNorm(c.rms_eps, dtype_of(c.dtype), dtype_of(c.param_dtype))
        if not c.tie_embeddings:
            self.lm_head = dense(c.vocab_size, names=("embed", "vocab"), cfg=c)

    def head(self, x):
        """Final norm and logits (float32) of hidden states `[..., d_model]`."""
        x = self.final_norm(x)
        if self.cfg.tie_embeddings:
            return self.embed.attend(x).astype(jnp.float32)
        return self.lm_head(x).astype(jnp.float32)

    def __call__(self, tokens, positions=None, caches=None, *, segment_ids=None, return_hidden: bool = False):
        c = self.cfg
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, seq], got {tokens.shape=}")
        if positions is not None and positions.shape != tokens.shape:
            raise ValueError(f"{positions.shape=} must equal {tokens.shape=}")
        if caches is not None and len(caches) != c.num_layers:
            raise ValueError(f"got {len(caches)} caches for {c.num_layers} layers")
        if segment_ids is not None:
            if segment_ids.shape != tokens.shape or not jnp.issubdtype(segment_ids.dtype, jnp.integer):
                raise ValueError(f"segment_ids must be integers of {tokens.shape=}, got {segment_ids.shape=} "
                                 f"{segment_ids.dtype=}")
            if caches is not None:
                raise ValueError("segment_ids (packed documents) cannot be used with caches: decoding and generation "
                                 "take one unpacked sequence per row")
            if positions is None:
                positions = document_positions(segment_ids)
        x = self.embed(tokens)
        new_caches = []
        for i, layer in enumerate(self.layers):
            args = () if segment_ids is None else (segment_ids,)  # positional: nn.remat passes it through
            x, cache = layer(x, positions, None if caches is None else caches[i], *args)
            new_caches.append(cache)
        out = self.final_norm(x) if return_hidden else self.head(x)
        return out if caches is None else (out, tuple(new_caches))


def init_caches(cfg: ModelConfig, batch: int, max_len: int) -> tuple[Any, ...]:
    """One fixed-size cache per layer, built by each layer's family."""
    return tuple(
        layer_class(s.kind).init_cache(cfg, s, batch, max_len) for s in cfg.attention
    )


def init_params(cfg: ModelConfig, key, seq: int = 8):
    """Random parameters (unboxed arrays) for `cfg`."""
    model = Transformer(cfg)
    variables = model.init(key, jnp.zeros((1, seq), jnp.int32))
    return nn.unbox(variables["params"])


def abstract_params(cfg: ModelConfig):
    """Shapes/dtypes of the parameters with their logical axis names (boxed), without allocating."""
    model = Transformer(cfg)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))["params"]
