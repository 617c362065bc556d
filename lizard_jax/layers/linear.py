"""Linear attention with feature maps (LoLCATs arXiv 2410.10254 style), and the pieces that the gated and Lizard
layers share with it: learnable feature maps, GQA head repetition, padding masks and the prefill/decode driver
over `lizard_jax.ops.linear` / `lizard_jax.ops.gla`.

    y_t = phi_q(q_t) S_t / (phi_q(q_t) z_t + eps),   S_t = S_{t-1} + phi_k(k_t)^T v_t,   z_t = z_{t-1} + phi_k(k_t)

Choices not fixed by the papers (stated here once, used by linear.py, gla.py and lizard.py):
- GQA: the teacher's k/v heads are repeated per query group (as LoLCATs' `repeat_kv`), so every query head has
  its own key feature map and its own state `[f, dv + 1]`. The state is `num_heads / num_kv_heads` times larger
  than one per kv head would be, but each head keeps its own key map (and, in GLA/Lizard, its own gate).
- Learnable maps (`t2r`, `hedgehog`, `hedgehog_exp`) have one projection `w [heads, head_dim, feature_dim]` per
  head, separate for q and k (params `feature_q`, `feature_k`), initialised to a (truncated) identity
  `eye(head_dim, feature_dim)`: Hedgehog's identity start, LoLCATs' `zero_init` option. `t2r`'s bias starts at 0.
- Padding (negative positions) is removed from the recurrence exactly: a padded token's key features are zeroed
  and its log-gate set to 0, so it neither writes to nor decays the state.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from lizard_jax.config import AttentionSpec, ConfigError, ModelConfig, register_attention
from lizard_jax.layers.common import (check_layer_inputs, dtype_of, out_projection, project_qkv, resolve_segments,
                                      segment_kwargs)
from lizard_jax.ops.gated_linear import gla, gla_step
from lizard_jax.ops.impl import IMPLS
from lizard_jax.ops.linear import FEATURE_MAPS, get_feature_map, linear_attention, linear_attention_step

Array = jax.Array

LEARNABLE_MAPS = ("t2r", "hedgehog", "hedgehog_exp")  # maps with a projection w (and t2r's bias b)
FIXED_MAPS = ("elu_plus_one", "relu")  # parameter-free, feature dim = head_dim
FORMS = ("chunk", "quadratic")


# ----------------------------------------------------------------------------------------------------------
# shared checks


def check_map_options(where: str, feature_map: str, feature_dim: int | None, allowed) -> None:
    """ConfigError unless `feature_map` is one of `allowed` and `feature_dim` fits it."""
    if feature_map not in allowed:
        raise ConfigError(f"{where}.feature_map must be one of {sorted(allowed)}, got {feature_map!r}")
    if feature_dim is not None:
        if feature_map not in LEARNABLE_MAPS:
            raise ConfigError(f"{where}.feature_dim applies to the learnable maps {LEARNABLE_MAPS} only, "
                              f"not to {feature_map!r}; leave it null")
        if feature_dim < 1:
            raise ConfigError(f"{where}.feature_dim must be >= 1 or null (= head_dim), got {feature_dim}")


def check_impl(where: str, impl: str, chunk_size: int, form: str = "chunk") -> None:
    if impl not in IMPLS:
        raise ConfigError(f"{where}.impl must be one of {IMPLS}, got {impl!r}")
    if form not in FORMS:
        raise ConfigError(f"{where}.form must be one of {FORMS}, got {form!r}")
    if form == "quadratic" and impl == "pallas":
        raise ConfigError(f"{where}: impl='pallas' applies to form='chunk' only")
    if chunk_size < 1:
        raise ConfigError(f"{where}.chunk_size must be >= 1, got {chunk_size}")


# ----------------------------------------------------------------------------------------------------------
# feature maps, heads, the recurrence driver


def feature_out_dim(feature_map: str, head_dim: int, feature_dim: int | None) -> int:
    """Width of phi(x) for x of width head_dim: 2f for the Hedgehog maps, f for T2R, head_dim otherwise."""
    f = feature_dim or head_dim
    if feature_map in ("hedgehog", "hedgehog_exp"):
        return 2 * f
    if feature_map == "t2r":
        return f
    return head_dim


def _eye_init(key, shape, dtype):
    """[heads, d, f]: eye(d, f) for every head (the truncated identity)."""
    del key
    return jnp.broadcast_to(jnp.eye(shape[1], shape[2], dtype=dtype), shape)


class FeatureMap(nn.Module):
    """phi(x) for x `[batch, seq, heads, head_dim]`; per-head parameters for the learnable maps (module doc).

    kind: a name in `lizard_jax.ops.linear.FEATURE_MAPS`, or "identity" (phi(x) = x, GLA's plain q/k).
    feature_dim: projection width f of the learnable maps (None = head_dim).
    Returns `[batch, seq, heads, feature_out_dim(...)]`, float32 with float32 params.
    """

    cfg: ModelConfig
    kind: str
    feature_dim: int | None = None

    @nn.compact
    def __call__(self, x):
        if self.kind == "identity":
            return x
        fn = get_feature_map(self.kind)
        if self.kind not in LEARNABLE_MAPS:
            return fn(x)
        heads, d = x.shape[2], x.shape[3]
        f = self.feature_dim or d
        pdt = dtype_of(self.cfg.param_dtype)
        w = self.param("w", nn.with_logical_partitioning(_eye_init, ("heads", "head_dim", "feature")),
                       (heads, d, f), pdt)
        if self.kind == "t2r":
            b = self.param("b", nn.with_logical_partitioning(nn.initializers.zeros, ("heads", "feature")),
                           (heads, f), pdt)
            return fn(x, w, b)
        return fn(x, w)


def repeat_kv(x, heads: int):
    """`[batch, seq, kv_heads, d] -> [batch, seq, heads, d]`: query head h uses kv head h // (heads // kv_heads),
    the grouping of `lizard_jax.ops.softmax.attention`."""
    return jnp.repeat(x, heads // x.shape[2], axis=2)


def recurrent_attention(phi_q, phi_k, v, log_g, positions, state, *, normalised: bool, form: str = "chunk",
                        impl: str = "auto", chunk_size: int = 64, segment_ids=None):
    """(Gated) linear attention over new tokens, continuing from `state` when given.

    phi_q, phi_k `[batch, seq, heads, f]`, v `[batch, seq, heads, dv]`, log_g None or `[batch, seq, heads, f|1]`
    (<= 0), positions None or `[batch, seq]` (negative = padding, removed exactly: zero key, zero log-gate).
    normalised: `linear_attention` (state `[b, h, f, dv + 1]` = S | z) or plain `gla` (state `[b, h, f, dv]`;
    needs log_g). q/k features are cast to v's dtype (the ops take one operand dtype); the state stays float32.
    A single new token with a state takes the one-step recurrent form. segment_ids None or `[batch, seq]` (no
    state): the ops restart the state (and normaliser) at each segment's first token.
    Returns (y `[batch, seq, heads, dv]` in v's dtype, new state or None when `state` is None).
    """
    phi_q, phi_k = phi_q.astype(v.dtype), phi_k.astype(v.dtype)
    if positions is not None:
        valid = (positions >= 0)[:, :, None, None]
        phi_k = jnp.where(valid, phi_k, 0)
        log_g = None if log_g is None else jnp.where(valid, log_g, 0.0)
    if normalised:
        if state is not None and phi_q.shape[1] == 1:
            y, state = linear_attention_step(phi_q[:, 0], phi_k[:, 0], v[:, 0], state,
                                             log_g=None if log_g is None else log_g[:, 0])
            return y[:, None], state
        # the quadratic form is XLA only ("auto" would pick pallas on a GPU)
        impl = "xla" if form == "quadratic" else impl
        out = linear_attention(phi_q, phi_k, v, log_g=log_g, form=form, initial_state=state,
                               return_final_state=state is not None, impl=impl, chunk_size=chunk_size,
                               **segment_kwargs(segment_ids))
        return out if state is not None else (out, None)
    if log_g is None:
        raise ValueError("the unnormalised (GLA) form needs a log-gate")
    if state is not None and phi_q.shape[1] == 1:
        y, state = gla_step(phi_q[:, 0], phi_k[:, 0], v[:, 0], log_g[:, 0], state)
        return y[:, None], state
    out = gla(phi_q, phi_k, v, log_g, initial_state=state, return_final_state=state is not None, impl=impl,
              chunk_size=chunk_size, **segment_kwargs(segment_ids))
    return out if state is not None else (out, None)


@flax.struct.dataclass
class LinearCache:
    """Decoding state of a (gated) linear attention layer: float32 `[batch, heads, f, dv (+ 1)]`; its size does
    not depend on the context length."""

    state: Array

    @classmethod
    def create(cls, batch: int, heads: int, f: int, dv: int):
        return cls(state=jnp.zeros((batch, heads, f, dv), jnp.float32))


# ----------------------------------------------------------------------------------------------------------
# the layer


@register_attention
@dataclasses.dataclass(frozen=True)
class LinearSpec(AttentionSpec):
    """Options of a normalised linear attention layer (no decay).

    feature_map: one of `lizard_jax.ops.linear.FEATURE_MAPS` (all give nonnegative features, as the normaliser
      needs); default "hedgehog" = LoLCATs' [softmax(xW), softmax(-xW)].
    feature_dim: projection width f of the learnable maps (None = head_dim); the features are 2f wide for the
      Hedgehog maps.
    rope: apply the teacher's RoPE to q and k before the feature maps (LoLCATs does; default off).
    form: "chunk" (one `gla` scan) or "quadratic" (the O(T^2) masked spec, XLA, for tests / short sequences).
    impl, chunk_size: passed to `lizard_jax.ops.linear.linear_attention`.
    """

    kind: ClassVar[str] = "linear"
    feature_map: str = "hedgehog"
    feature_dim: int | None = None
    rope: bool = False
    form: Literal["chunk", "quadratic"] = "chunk"
    impl: str = "auto"
    chunk_size: int = 64

    def __post_init__(self):
        check_map_options("linear", self.feature_map, self.feature_dim, FEATURE_MAPS)
        check_impl("linear", self.impl, self.chunk_size, self.form)


class LinearAttention(nn.Module):
    """x `[batch, seq, d_model]`, positions `[batch, seq]` (or None) -> (y `[batch, seq, d_model]`, cache).

    New parameters over the teacher's q/k/v/o_proj: `feature_q`, `feature_k` (learnable maps only).
    `segment_ids [batch, seq]` (packed documents, no cache): state and normaliser restart at each segment.
    """

    cfg: ModelConfig
    spec: LinearSpec = LinearSpec()

    @nn.compact
    def __call__(self, x, positions=None, cache: LinearCache | None = None, *, segment_ids=None):
        cfg, spec = self.cfg, self.spec
        check_layer_inputs("LinearAttention", cfg, x, positions, cache, LinearCache)
        positions = resolve_segments("LinearAttention", x, positions, segment_ids, cache)
        q, k, v = project_qkv(cfg, x, positions, rope=spec.rope)
        heads = cfg.num_heads
        phi_q = FeatureMap(cfg, spec.feature_map, spec.feature_dim, name="feature_q")(q)
        phi_k = FeatureMap(cfg, spec.feature_map, spec.feature_dim, name="feature_k")(repeat_kv(k, heads))
        y, state = recurrent_attention(
            phi_q, phi_k, repeat_kv(v, heads), None, positions, None if cache is None else cache.state,
            normalised=True, form=spec.form, impl=spec.impl, chunk_size=spec.chunk_size, segment_ids=segment_ids)
        return out_projection(cfg)(y), (None if cache is None else LinearCache(state))

    @classmethod
    def init_cache(cls, cfg: ModelConfig, spec: LinearSpec, batch: int, max_len: int) -> LinearCache:
        del max_len  # constant-size state
        f = feature_out_dim(spec.feature_map, cfg.head_dim, spec.feature_dim)
        return LinearCache.create(batch, cfg.num_heads, f, cfg.head_dim + 1)
