"""Lizard attention (arXiv 2507.09025): gated linear attention for the global context plus a sliding-window
softmax anchor with meta memory, over a softmax teacher's q/k/v/o projections.

    Y = Y_gate + alpha * Y_anchor                                                        (per head, then o_proj)
    Y_gate:   y_i = phi_q(q_i) S_i / (phi_q(q_i) z_i + eps),
              S_i = Gamma_i S_{i-1} + phi_k(k_i)^T v_i,   z_i = Gamma_i z_{i-1} + phi_k(k_i),
              Gamma_i = sigmoid(x_i W_gamma + b)^(1/tau)              no RoPE, its own normaliser
    Y_anchor: softmax over the last `window` positions (with RoPE) plus `meta_tokens` learnable sink logits in
              the denominator only (`sliding_window.py`)

What the paper fixes: the structure above, Hedgehog maps [exp(xW), exp(-xW)] separate for q and k ("dimension
128", a "softmax" activation), Gamma_i = sigmoid(W_gamma x_i) with W_gamma in R^{d x 1} (one scalar per token),
window 128 and 4 meta tokens. Our choices, where it does not say:
- Gate: one scalar per token *per head* (W_gamma `[d_model, heads, 1]` + bias `[heads, 1]`, param `gate`), so each
  head keeps its own memory span; `gate_temperature` tau (paper: none, tau = 1). The bias starts at
  logit(gate_init^tau) and W_gamma at normal(0.02): every gate starts near `gate_init` = 0.999 (slow decay,
  ~1/(1 - 0.999) = 1000 tokens of memory, close to the teacher's no-decay softmax).
- Feature map: default "hedgehog" = [softmax(xW), softmax(-xW)] (LoLCATs' code, bounded, safe in bf16);
  "hedgehog_exp" is the paper's formula. W starts at the identity eye(head_dim, f) per head; f = `feature_dim`
  (None = head_dim), so the features are 2f wide: 128 for SmolLM2's head_dim 64 (the paper's "dimension 128";
  for head_dim-128 teachers set feature_dim=64 to keep 128 features, or None for 256).
- alpha: learnable per head (param `alpha [heads]`), starting at `alpha_init` = 1.0.
- A learnable per-head scale beta on the gated part (param `gate_scale [heads]`, Y = beta * Y_gate +
  alpha * Y_anchor), starting at `gate_scale_init` = 0.0: the untrained student is then exactly the window +
  meta-memory model, next-token loss 3.62 on SmolLM2 against the teacher's 3.37, instead of 11.0 with the
  gated part added at full weight (it is a normalised average of values and cannot start at zero otherwise).
  Stage 1 grows beta as the maps and gates learn. `gate_scale_init=1.0` is the paper's formula at init.
- Meta tokens: logits start at `meta_init` = 0.0 (`sliding_window.py`).
- GQA: k/v repeated per query group for the gated part (`linear.py`); the anchor uses grouped attention.

Untrained, the layer is not close to its teacher: Y_gate, a normalised (weights sum to 1) average of values, is
added on top of an anchor that already carries the teacher's local attention, and no choice of these inits can
zero it. Measured on SmolLM2-135M with every layer Lizard (384 wikitext-2 tokens): next-token NLL 11.0 over the
first 127 tokens (teacher 3.37; the sliding window with meta tokens alone 3.62). Stage 1 (attention transfer) is
what makes the two branches complementary.

Decoding state (`LizardCache`): the gated state `[batch, heads, f_out, head_dim + 1]` float32 and a ring buffer of
`window` keys/values; both are independent of the context length. The hardware-aware trick of the paper (folding
the log-decays into the features) is the kernel's business: this layer calls `linear_attention(..., log_g)`.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from lizard_jax.config import AttentionSpec, ModelConfig, register_attention
from lizard_jax.layers.common import (KVCache, check_layer_inputs, dtype_of, out_projection, qkv_projection,
                                      resolve_segments)
from lizard_jax.layers.gla import LogGate, check_gate_options
from lizard_jax.layers.linear import (
    FeatureMap,
    check_impl,
    check_map_options,
    feature_out_dim,
    recurrent_attention,
    repeat_kv,
)
from lizard_jax.layers.sliding_window import check_window_options, local_attention, meta_logits
from lizard_jax.layers.softmax import SoftmaxAttention
from lizard_jax.ops.linear import FEATURE_MAPS

Array = jax.Array


@flax.struct.dataclass
class LizardCache:
    """state: float32 `[batch, heads, f_out, head_dim + 1]` (S | z of the gated part); kv: the anchor's ring
    buffer of `window` slots (a full buffer when max_len <= window)."""

    state: Array
    kv: KVCache


@register_attention
@dataclasses.dataclass(frozen=True)
class LizardSpec(AttentionSpec):
    """Options of a Lizard layer (module doc for what is the paper's and what is ours).

    window, meta_tokens, meta_init: the anchor (paper: 128, 4).
    feature_map: a map in `lizard_jax.ops.linear.FEATURE_MAPS` ("hedgehog" default, "hedgehog_exp" = paper's).
    feature_dim: projection width f of the map (None = head_dim); the gated part sees 2f features.
    gate_init, gate_temperature: initial per-token decay and tau.
    alpha_init: initial anchor weight (learnable per head).
    gate_scale_init: initial weight of the gated part (learnable per head; 1.0 = the paper's plain sum).
    form: "chunk" or "quadratic" (the gated part's O(T^2) spec, for tests / short sequences).
    impl, chunk_size: passed to `linear_attention` (the anchor's softmax always uses impl "auto"/"xla").
    """

    kind: ClassVar[str] = "lizard"
    window: int = 128
    meta_tokens: int = 4
    meta_init: float = 0.0
    feature_map: str = "hedgehog"
    feature_dim: int | None = None
    gate_init: float = 0.999
    gate_temperature: float = 1.0
    alpha_init: float = 1.0
    gate_scale_init: float = 0.0
    form: Literal["chunk", "quadratic"] = "chunk"
    impl: str = "auto"
    chunk_size: int = 64

    def __post_init__(self):
        check_window_options("lizard", self.window, self.meta_tokens)
        check_map_options("lizard", self.feature_map, self.feature_dim, FEATURE_MAPS)
        check_gate_options("lizard", self.gate_init, self.gate_temperature)
        check_impl("lizard", self.impl, self.chunk_size, self.form)


class LizardAttention(nn.Module):
    """x `[batch, seq, d_model]`, positions `[batch, seq]` (or None) -> (y `[batch, seq, d_model]`, cache).

    Parameters: the teacher's q_proj/k_proj/v_proj/o_proj (unchanged names and shapes) plus `feature_q`,
    `feature_k` (maps), `gate` (W_gamma, b), `meta_logits [heads, m]`, `alpha [heads]`, `gate_scale [heads]`.
    `segment_ids [batch, seq]` (packed documents, no cache): the gated state restarts and the window stays
    inside each segment.
    """

    cfg: ModelConfig
    spec: LizardSpec = LizardSpec()

    @nn.compact
    def __call__(self, x, positions=None, cache: LizardCache | None = None, *, segment_ids=None):
        cfg, spec = self.cfg, self.spec
        check_layer_inputs("LizardAttention", cfg, x, positions, cache, LizardCache)
        positions = resolve_segments("LizardAttention", x, positions, segment_ids, cache)
        q, k, v = qkv_projection(cfg, x)
        heads = cfg.num_heads

        # global: gated linear attention, no RoPE
        phi_q = FeatureMap(cfg, spec.feature_map, spec.feature_dim, name="feature_q")(q)
        phi_k = FeatureMap(cfg, spec.feature_map, spec.feature_dim, name="feature_k")(repeat_kv(k, heads))
        log_g = LogGate(cfg, heads, 1, None, spec.gate_temperature, spec.gate_init, name="gate")(x)
        y_gate, state = recurrent_attention(
            phi_q, phi_k, repeat_kv(v, heads), log_g, positions, None if cache is None else cache.state,
            normalised=True, form=spec.form, impl=spec.impl, chunk_size=spec.chunk_size, segment_ids=segment_ids)

        # local anchor: sliding-window softmax with RoPE and meta tokens
        sinks = meta_logits(self, heads, spec.meta_tokens, spec.meta_init)
        y_anchor, kv = local_attention(cfg, q, k, v, positions, None if cache is None else cache.kv,
                                       window=spec.window, sinks=sinks, rope=True, impl="auto",
                                       segment_ids=segment_ids)

        alpha = self.param("alpha", nn.with_logical_partitioning(nn.initializers.constant(spec.alpha_init),
                                                                 ("heads",)), (heads,), dtype_of(cfg.param_dtype))
        beta = self.param("gate_scale", nn.with_logical_partitioning(
            nn.initializers.constant(spec.gate_scale_init), ("heads",)), (heads,), dtype_of(cfg.param_dtype))
        y = beta.astype(y_gate.dtype)[:, None] * y_gate + alpha.astype(y_anchor.dtype)[:, None] * y_anchor
        return out_projection(cfg)(y), (None if cache is None else LizardCache(state=state, kv=kv))

    @classmethod
    def init_cache(cls, cfg: ModelConfig, spec: LizardSpec, batch: int, max_len: int) -> LizardCache:
        f = feature_out_dim(spec.feature_map, cfg.head_dim, spec.feature_dim)
        return LizardCache(
            state=jnp.zeros((batch, cfg.num_heads, f, cfg.head_dim + 1), jnp.float32),
            kv=SoftmaxAttention.init_cache(cfg, spec, batch, max_len),  # ring of `window` slots, same rule
        )
