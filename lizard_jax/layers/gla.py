"""Gated linear attention (GLA, arXiv 2312.06635) as a layer over a teacher's q/k/v/o projections, and the
data-dependent log-gate module that the Lizard layer shares.

    S_t = diag(alpha_t) S_{t-1} + phi(k_t)^T v_t,   o_t = phi(q_t) S_t,
    alpha_t = sigmoid(x_t W_1 W_2 + b)^(1 / tau)          (GLA: rank 16, tau = 16, one gate per key dim)
    y_t = (RMSNorm(o_t) * swish(x_t W_r)) W_o              (GLA's per-head norm and output gate)

The gate lives in log space: log alpha = log_sigmoid(z) / tau <= 0, what `lizard_jax.ops.gla` takes.

Choices not in the GLA paper (a linearised teacher is not a GLA trained from scratch):
- q, k, v, o are the teacher's projections (head_dim wide, GQA k/v repeated per query group, see `linear.py`);
  with `feature_map="identity"` (GLA's own choice) q is scaled by head_dim^-0.5 as GLA's kernel does; a
  learnable map (e.g. "hedgehog") may be put in front instead, and the gate then has one value per feature.
- `normalize="rmsnorm"` is GLA's per-head norm (RMSNorm over dv with one learnable scale [dv] shared by the
  heads, as fla's fused gated norm); `normalize="denominator"` divides by the gated normaliser
  phi(q) z_t instead (Lizard's global branch), which keeps the teacher's output scale and needs nonnegative
  features (so not "identity").
- The gate bias is initialised so every gate starts at `gate_init` (default 0.99 per token, slow decay:
  sigmoid(b)^(1/tau) = gate_init); the gate kernels start at normal(0.02), the output gate W_r too.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from lizard_jax.config import AttentionSpec, ConfigError, ModelConfig, register_attention
from lizard_jax.layers.common import (INIT_STD, RMSNorm, check_layer_inputs, dense, dtype_of, out_projection,
                                      project_qkv, resolve_segments)
from lizard_jax.layers.linear import (
    FeatureMap,
    LinearCache,
    check_impl,
    check_map_options,
    feature_out_dim,
    recurrent_attention,
    repeat_kv,
)
from lizard_jax.ops.linear import FEATURE_MAPS


def check_gate_options(where: str, gate_init: float, temperature: float, rank: int | None = None) -> None:
    if not 0.0 < gate_init < 1.0:
        raise ConfigError(f"{where}.gate_init must be in (0, 1) (the initial per-token decay), got {gate_init}")
    if not temperature > 0:
        raise ConfigError(f"{where}.gate_temperature must be > 0, got {temperature}")
    if rank is not None and rank < 1:
        raise ConfigError(f"{where}.gate_rank must be >= 1 or null (a full [d_model, heads * dims] map), got {rank}")


class LogGate(nn.Module):
    """Data-dependent log forget gate: x `[batch, seq, d_model]` -> log_g `[batch, seq, heads, dims]` float32,
    log_g = log_sigmoid(z) / temperature <= 0 with z = x W + b (rank None: W `[d_model, heads, dims]`) or
    z = x W_1 W_2 + b (W_1 `[d_model, rank]`, W_2 `[rank, heads, dims]`, GLA's low-rank form).
    The bias `[heads, dims]` starts at logit(init ** temperature), so the gate starts near `init`."""

    cfg: ModelConfig
    heads: int
    dims: int
    rank: int | None = None
    temperature: float = 1.0
    init: float = 0.99

    @nn.compact
    def __call__(self, x):
        pdt = dtype_of(self.cfg.param_dtype)
        normal = nn.initializers.normal(INIT_STD)
        p = lambda name, names, shape, init=normal: self.param(  # noqa: E731
            name, nn.with_logical_partitioning(init, names), shape, pdt).astype(jnp.float32)
        xf = x.astype(jnp.float32)
        if self.rank is None:
            z = jnp.einsum("btd,dhf->bthf", xf, p("w", ("embed", "heads", "feature"), (x.shape[-1], self.heads,
                                                                                        self.dims)))
        else:
            low = xf @ p("w1", ("embed", None), (x.shape[-1], self.rank))
            z = jnp.einsum("btr,rhf->bthf", low, p("w2", (None, "heads", "feature"), (self.rank, self.heads,
                                                                                    self.dims)))
        a = self.init ** self.temperature
        bias = p("b", ("heads", "feature"), (self.heads, self.dims), nn.initializers.constant(math.log(a / (1 - a))))
        return jax.nn.log_sigmoid(z + bias) / self.temperature


@register_attention
@dataclasses.dataclass(frozen=True)
class GLASpec(AttentionSpec):
    """Options of a gated linear attention layer (module doc for the choices).

    feature_map: "identity" (GLA) or a name in `lizard_jax.ops.linear.FEATURE_MAPS`; feature_dim: width f of a
      learnable map (None = head_dim).
    gate_rank: rank of the gate projection (GLA: 16; None = a full d_model x dims map).
    gate_temperature: tau in alpha = sigmoid(z)^(1/tau) (GLA: 16).
    gate_per: "key" (one gate per key feature, GLA) or "head" (one scalar per head and token, simple GLA).
    gate_init: the gates' initial value (sets the bias).
    normalize: "rmsnorm" (GLA) or "denominator" (normalised linear attention).
    output_gate: GLA's swish(x W_r) output gate (param `g_proj`).
    rope: apply the teacher's RoPE to q and k first (GLA has none).
    impl, chunk_size: passed to the ops (`gla` or `linear_attention`).
    """

    kind: ClassVar[str] = "gla"
    feature_map: str = "identity"
    feature_dim: int | None = None
    gate_rank: int | None = 16
    gate_temperature: float = 16.0
    gate_per: Literal["key", "head"] = "key"
    gate_init: float = 0.99
    normalize: Literal["rmsnorm", "denominator"] = "rmsnorm"
    output_gate: bool = True
    rope: bool = False
    impl: str = "auto"
    chunk_size: int = 64

    def __post_init__(self):
        check_map_options("gla", self.feature_map, self.feature_dim, ("identity", *FEATURE_MAPS))
        check_gate_options("gla", self.gate_init, self.gate_temperature, self.gate_rank)
        if self.gate_per not in ("key", "head"):
            raise ConfigError(f"gla.gate_per must be 'key' or 'head', got {self.gate_per!r}")
        if self.normalize not in ("rmsnorm", "denominator"):
            raise ConfigError(f"gla.normalize must be 'rmsnorm' or 'denominator', got {self.normalize!r}")
        if self.normalize == "denominator" and self.feature_map == "identity":
            raise ConfigError("gla.normalize='denominator' needs nonnegative features: pick a feature_map from "
                              f"{sorted(FEATURE_MAPS)}, not 'identity'")
        check_impl("gla", self.impl, self.chunk_size)


class GatedLinearAttention(nn.Module):
    """x `[batch, seq, d_model]`, positions `[batch, seq]` (or None) -> (y `[batch, seq, d_model]`, cache).

    New parameters over the teacher's q/k/v/o_proj: `gate` (LogGate), `feature_q`/`feature_k` (learnable
    maps), `o_norm` (rmsnorm), `g_proj` (output gate). `segment_ids [batch, seq]` (packed documents, no cache):
    the state restarts at each segment.
    """

    cfg: ModelConfig
    spec: GLASpec = GLASpec()

    @nn.compact
    def __call__(self, x, positions=None, cache: LinearCache | None = None, *, segment_ids=None):
        cfg, spec = self.cfg, self.spec
        check_layer_inputs("GatedLinearAttention", cfg, x, positions, cache, LinearCache)
        positions = resolve_segments("GatedLinearAttention", x, positions, segment_ids, cache)
        q, k, v = project_qkv(cfg, x, positions, rope=spec.rope)
        heads = cfg.num_heads
        if spec.feature_map == "identity":
            q = q * jnp.asarray(cfg.head_dim ** -0.5, q.dtype)
        phi_q = FeatureMap(cfg, spec.feature_map, spec.feature_dim, name="feature_q")(q)
        phi_k = FeatureMap(cfg, spec.feature_map, spec.feature_dim, name="feature_k")(repeat_kv(k, heads))
        dims = phi_q.shape[-1] if spec.gate_per == "key" else 1
        log_g = LogGate(cfg, heads, dims, spec.gate_rank, spec.gate_temperature, spec.gate_init, name="gate")(x)
        y, state = recurrent_attention(
            phi_q, phi_k, repeat_kv(v, heads), log_g, positions, None if cache is None else cache.state,
            normalised=spec.normalize == "denominator", impl=spec.impl, chunk_size=spec.chunk_size,
            segment_ids=segment_ids)
        if spec.normalize == "rmsnorm":
            y = RMSNorm(cfg.rms_eps, dtype_of(cfg.dtype), dtype_of(cfg.param_dtype), name="o_norm")(y)
        if spec.output_gate:
            g = dense((heads, cfg.head_dim), names=("embed", "heads", "head_dim"), cfg=cfg, name="g_proj")(x)
            y = y * nn.swish(g).astype(y.dtype)
        return out_projection(cfg)(y), (None if cache is None else LinearCache(state))

    @classmethod
    def init_cache(cls, cfg: ModelConfig, spec: GLASpec, batch: int, max_len: int) -> LinearCache:
        del max_len  # constant-size state
        f = feature_out_dim(spec.feature_map, cfg.head_dim, spec.feature_dim)
        dv = cfg.head_dim + (spec.normalize == "denominator")
        return LinearCache.create(batch, cfg.num_heads, f, dv)
