"""The spec of LazyLLM's pruned prefill, written with masks over the full prompt (slow: every layer runs on every
token; the fast path in `prune.py` gathers the kept tokens instead and must give the same result).

A pruned token stops being a key from the next layer on and its hidden state stops changing, so its final hidden
state is exactly what the Aux Cache must hold. Scores come from the layer's own q/k projections, computed here
from the parameters, independently of the fast path's attention hook.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lizard_jax.layers.common import KVCache, apply_rope
from lizard_jax.lazy.config import LazyConfig
from lizard_jax.models import Transformer
from lizard_jax.ops.softmax import visible


def last_token_scores(model: Transformer, params, i: int, h, positions, k, k_pos):
    """Mean over heads of the last token's attention probabilities at layer i, from the layer's normed input
    h `[B, P, D]` and its keys k `[B, P, KVH, Dh]` (k_pos -1 where not a key)."""
    cfg = model.cfg
    attn = params[f"layers_{i}"]["attn"]
    q = jnp.einsum("bd,dhk->bhk", h[:, -1].astype(jnp.float32), attn["q_proj"]["kernel"].astype(jnp.float32))
    if "bias" in attn["q_proj"]:
        q = q + attn["q_proj"]["bias"]
    if cfg.attention[i].rope:
        q = apply_rope(q[:, None], positions[:, -1:], cfg.rope)[:, 0]
    g = cfg.num_heads // cfg.num_kv_heads
    kk = jnp.repeat(k.astype(jnp.float32), g, axis=2)  # [B, P, H, Dh]
    s = jnp.einsum("bhd,bphd->bhp", q, kk) * cfg.head_dim**-0.5
    ok = visible(positions[:, -1:], k_pos, causal=True, window=cfg.attention[i].window)  # [B, 1, P]
    s = jnp.where(ok, s, -jnp.inf)
    return jnp.mean(jax.nn.softmax(s, axis=-1), axis=1)


def prefill_reference(model: Transformer, params, tokens, positions, lazy: LazyConfig):
    """-> dict with `logits` `[B, V]` of the last token, `active` `[L, B, P]` bool (token computed at layer l),
    `k`, `v` per layer `[B, P, KVH, Dh]` (zero where not computed), `hidden` `[B, P, D]` (each token's hidden state
    after its last computed layer)."""
    cfg = model.cfg
    bsz, p = tokens.shape
    budgets = dict(zip(lazy.layers, lazy.budgets(p)))
    x = model.apply({"params": params}, tokens, method=lambda m, t: m.embed(t))
    active = positions >= 0
    out = {"active": [], "k": [], "v": []}
    for i in range(cfg.num_layers):
        lpos = jnp.where(active, positions, -1)
        cache = KVCache.create(bsz, p, cfg.num_kv_heads, cfg.head_dim, x.dtype)
        (y, cache), inter = model.apply({"params": params}, x, lpos, cache, mutable=["intermediates"],
                                        method=lambda m, *a, i=i: m.layers[i](*a))
        out["active"].append(active)
        out["k"].append(jnp.where(active[..., None, None], cache.k, 0))
        out["v"].append(jnp.where(active[..., None, None], cache.v, 0))
        x = jnp.where(active[..., None], y, x)
        if i in budgets:  # padding never competes: it is invisible and never counted
            h = inter["intermediates"][f"layers_{i}"]["attn_in"][0]
            score = last_token_scores(model, params, i, h, positions, cache.k, cache.pos)
            if lazy.pool > 1:
                score = jax.lax.reduce_window(jnp.where(active, score, 0.0), -jnp.inf, jax.lax.max, (1, lazy.pool),
                                              (1, 1), "SAME")
            last = positions[:, -1:]
            always = (positions < lazy.sink_tokens) | (positions >= last - lazy.recent_tokens)
            score = jnp.where(active, jnp.where(always, jnp.inf, score), -jnp.inf)
            keep = jax.lax.top_k(score, budgets[i])[1]
            active &= jnp.zeros((bsz, p), bool).at[jnp.arange(bsz)[:, None], keep].set(True)
    out["logits"] = model.apply({"params": params}, x[:, -1], method=lambda m, h: m.head(h))
    out["hidden"] = x
    out["active"] = jnp.stack(out["active"])
    return out
