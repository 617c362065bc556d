"""Lightning attention layer: the linear layers of MiniCPM-SALA (arXiv 2602.11761; Lightning Attention-2,
arXiv 2401.04658), built so a softmax teacher layer's q/k/v/o projections load unchanged.

    q, k, v = teacher projections of x            (q [B,T,H,d], k/v [B,T,KVH,d])
    q, k    = RMSNorm_head(q), RMSNorm_head(k)     (qk_norm, per head over head_dim, before RoPE)
    q, k    = RoPE(q), RoPE(k)                     (rope; HyPE keeps RoPE in the linear layers)
    S_t     = exp(-s_h) S_{t-1} + k_t^T v_t,  o_t = (q_t / sqrt(d)) S_t      (no softmax, no denominator)
    y       = o_proj(RMSNorm_all(o) * sigmoid(z_proj x))                     (output_norm, output_gate)

Following the official modeling code (HF repo openbmb/MiniCPM-SALA, `modeling_minicpm_sala.py`, class
`LightningAttention` and `_build_slope_tensor`; the hub is not reachable from here, so it was read in a copy of
that file carrying the OpenBMB header and some debug hooks added by its copier, and checked against two ports that
agree with it: vLLM `vllm/model_executor/models/minicpm_sala.py` + `vllm/model_executor/layers/mamba/
sala_simple_gla.py` (vllm-project/vllm) and OminiX-ai/OminiX-MLX `minicpm-sala-mlx/src/attention/lightning.rs`):
  * output norm: `o_norm = MiniCPMRMSNorm(num_attention_heads * head_dim)`, ONE RMSNorm over heads x head_dim
    (one mean square per token, a `[heads * head_dim]` scale), applied to the attention output before the gate
    `o * sigmoid(z_proj x)` and o_proj. Ours: `RMSNorm_all`, scale `[heads, head_dim]` (the same numbers in the
    layout of o_proj's input). `output_norm_per_head=True` keeps our earlier per-head norm (one `[head_dim]`
    scale shared by the heads, like the q/k norms).
  * QK-norm: `q_norm`/`k_norm = MiniCPMRMSNorm(head_dim)` per head with one `[head_dim]` scale shared by the
    heads, applied BEFORE RoPE, in the Lightning layers only (`qk_norm` in the config). The sparse (`minicpm4`)
    layers have no q/k norm and, in the released config (`attn_use_rope: false`), no RoPE: only q/k/v/o_proj and
    the output gate `o_gate`.
  * decay: `g_gamma = -_build_slope_tensor(num_attention_heads)`, ALiBi's slope rule, the same in every layer
    (`ops/lightning`: `lightning_slopes(heads, "alibi")`; differs from `2**(-8 (h+1) / H)` when H is not a power
    of two, e.g. SmolLM2's 9 heads). `slopes="geometric"` keeps our earlier rule.

Choices where the paper is silent (SALA's Lightning layers are MHA with 32 heads; ours follow the teacher):
  * GQA teachers (SmolLM2: 9 query / 3 kv heads): k and v keep the teacher's k_proj/v_proj shapes and each kv
    head is repeated for the `heads // kv_heads` query heads of its group (the GQA convention: kv head
    `h // group` serves query head h). Every query head then has its own state `[d, d]` and its own decay, so
    the decode state is `[batch, heads, d, d]` float32 (SmolLM2-135M: 9 x 64 x 64 x 4 B = 147 KiB per layer
    and sequence).
  * Decay: the slopes of the layer's own query-head count (as the official code: `num_attention_heads`), so
    they span about the same range (2**-8 ... 2**-1, or 2**-0.5 when H is not a power of two) for any H,
    whereas the first H of SALA's 32 slopes would give every head of a small model a short memory.
  * Scale 1/sqrt(head_dim) on q (papers.md: "Lightning layers ... scale 1/sqrt(d)").
  * eps of every norm = the model's rms_eps (the official code: config.rms_norm_eps).
  * z_proj has a bias (the official z_proj has none: attention_bias is false) so that it can start at the
    near-identity gate described next; it loads an official z_proj with bias 0.
  * Initialisation, so the converted layer starts close to the teacher: teacher q/k/v/o copied unchanged (the
    recipe copies them); norm scales 1 (q/k keep the teacher's directions); z_proj kernel 0 and bias
    `gate_bias_init` (default 4: sigmoid = 0.982 for every input), so the gate starts as a near-identity
    that still receives gradient. No parameter can make a linear layer equal a softmax layer at init: the
    remaining gap (attention pattern and per-head output scale) is what stage-1 attention transfer trains.
  * Padding (negative positions, left-padded prompts): padding tokens get k = v = 0, so they add nothing to
    the state; since they precede every real token the decay they apply acts on a zero state and real tokens
    see exactly what the unpadded sequence gives. (Padding after real tokens would decay the state: the
    convention of `layers/common.py` has none.) Padding rows output 0.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import ClassVar

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from lizard_jax.config import AttentionSpec, ConfigError, ModelConfig, register_attention
from lizard_jax.layers.common import (RMSNorm, check_layer_inputs, dtype_of, out_projection, project_qkv,
                                      resolve_segments, segment_kwargs)
from lizard_jax.ops.impl import IMPLS
from lizard_jax.ops.lightning import SLOPE_RULES, lightning_attention, lightning_slopes, lightning_step


class HeadsRMSNorm(nn.Module):
    """RMSNorm over the last TWO axes of `x [..., heads, head_dim]` (one mean square per token over all heads),
    scale `[heads, head_dim]`, computed in float32: the official MiniCPM-SALA `o_norm` (an RMSNorm over the
    flattened `heads * head_dim` output) in the layout of o_proj's input."""

    eps: float = 1e-5
    dtype: typing.Any = jnp.float32
    param_dtype: typing.Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("heads", "head_dim")),
                           x.shape[-2:], self.param_dtype)
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=(-2, -1), keepdims=True) + self.eps)
        return (y * scale.astype(jnp.float32)).astype(self.dtype)


def output_gate(cfg: ModelConfig, x, bias_init: float, name: str):
    """sigmoid(x W + b) `[batch, seq, heads, head_dim]` in cfg.dtype; W starts at 0 and b at `bias_init`, so
    the gate starts as the constant sigmoid(bias_init) (create inside a compact method)."""
    proj = nn.DenseGeneral(
        features=(cfg.num_heads, cfg.head_dim),
        use_bias=True,
        dtype=dtype_of(cfg.dtype),
        param_dtype=dtype_of(cfg.param_dtype),
        kernel_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed", "heads", "head_dim")),
        bias_init=nn.with_logical_partitioning(nn.initializers.constant(bias_init), ("heads", "head_dim")),
        name=name,
    )
    return jax.nn.sigmoid(proj(x).astype(jnp.float32)).astype(dtype_of(cfg.dtype))


def check_spec_common(kind: str, impl: str, gate_bias_init: float) -> None:
    if impl not in IMPLS:
        raise ConfigError(f"{kind}.impl must be one of {IMPLS}, got {impl!r}")
    if not math.isfinite(gate_bias_init):
        raise ConfigError(f"{kind}.gate_bias_init must be finite, got {gate_bias_init}")


@register_attention
@dataclasses.dataclass(frozen=True)
class LightningSpec(AttentionSpec):
    """Options of a Lightning layer (defaults: MiniCPM-SALA's linear layers).

    rope: RoPE on q and k (HyPE: linear layers keep it).
    qk_norm: per-head RMSNorm on q and k before RoPE (official: on, before RoPE).
    output_norm: RMSNorm on the attention output (the op has no denominator; this fixes its scale).
    output_norm_per_head: False (official): one RMSNorm over heads x head_dim; True: per head over head_dim.
    slopes: decay rule, "alibi" (official: ALiBi's get_slopes) or "geometric" (2**(-8 (h+1) / H) for any H).
    output_gate: multiply by sigmoid(z_proj x) before o_proj.
    gate_bias_init: initial bias of z_proj (its kernel starts at 0), sigmoid(4) = 0.982.
    impl: the op's implementation, "auto" (Pallas on GPU/TPU, XLA on CPU), "xla" or "pallas".
    chunk_size: chunk length of the XLA chunked form.
    """

    kind: ClassVar[str] = "lightning"
    rope: bool = True
    qk_norm: bool = True
    output_norm: bool = True
    output_norm_per_head: bool = False
    output_gate: bool = True
    gate_bias_init: float = 4.0
    slopes: typing.Literal["alibi", "geometric"] = "alibi"
    impl: str = "auto"
    chunk_size: int = 64

    def __post_init__(self):
        check_spec_common(self.kind, self.impl, self.gate_bias_init)
        if self.slopes not in SLOPE_RULES:
            raise ConfigError(f"lightning.slopes must be one of {SLOPE_RULES}, got {self.slopes!r}")
        if self.chunk_size < 1:
            raise ConfigError(f"lightning.chunk_size must be >= 1, got {self.chunk_size}")


@flax.struct.dataclass
class LightningCache:
    """The O(1) decode state of a Lightning layer: `state [batch, heads, head_dim, head_dim]` float32."""

    state: jax.Array

    @property
    def batch(self) -> int:
        return self.state.shape[0]


class LightningAttention(nn.Module):
    """x `[batch, seq, d_model]`, positions `[batch, seq]` (or None) -> (y `[batch, seq, d_model]`, cache);
    `segment_ids [batch, seq]` (packed documents, no cache): the state restarts at each segment."""

    cfg: ModelConfig
    spec: LightningSpec = LightningSpec()

    @nn.compact
    def __call__(self, x, positions=None, cache: LightningCache | None = None, *, segment_ids=None):
        cfg, spec = self.cfg, self.spec
        check_layer_inputs("LightningAttention", cfg, x, positions, cache, LightningCache)
        positions = resolve_segments("LightningAttention", x, positions, segment_ids, cache)
        q, k, v = project_qkv(cfg, x, positions, qk_norm=spec.qk_norm, rope=spec.rope)
        group = cfg.num_heads // cfg.num_kv_heads
        k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)  # kv head h // group -> query head h
        q = q * jnp.asarray(1.0 / math.sqrt(cfg.head_dim), q.dtype)
        if positions is not None:  # padding adds nothing to the state
            real = (positions >= 0)[:, :, None, None]
            k, v = jnp.where(real, k, 0), jnp.where(real, v, 0)
        slopes = lightning_slopes(cfg.num_heads, spec.slopes)
        if cache is None:
            o = lightning_attention(q, k, v, slopes, impl=spec.impl, chunk_size=spec.chunk_size,
                                    **segment_kwargs(segment_ids))
        elif x.shape[1] == 1:
            o, state = lightning_step(q[:, 0], k[:, 0], v[:, 0], slopes, cache.state)
            o, cache = o[:, None], cache.replace(state=state)
        else:
            o, state = lightning_attention(q, k, v, slopes, initial_state=cache.state, return_final_state=True,
                                           impl=spec.impl, chunk_size=spec.chunk_size)
            cache = cache.replace(state=state)
        if spec.output_norm:
            norm = RMSNorm if spec.output_norm_per_head else HeadsRMSNorm
            o = norm(cfg.rms_eps, dtype_of(cfg.dtype), dtype_of(cfg.param_dtype), name="o_norm")(o)
        if spec.output_gate:
            o = o * output_gate(cfg, x, spec.gate_bias_init, "z_proj")
        return out_projection(cfg)(o.astype(dtype_of(cfg.dtype))), cache

    @classmethod
    def init_cache(cls, cfg: ModelConfig, spec: LightningSpec, batch: int, max_len: int) -> LightningCache:
        """A zero state; its size does not depend on `max_len`."""
        del spec, max_len
        return LightningCache(jnp.zeros((batch, cfg.num_heads, cfg.head_dim, cfg.head_dim), jnp.float32))
