"""LoRA as a parameter transformation: W' = W + (alpha / rank) * A @ B on chosen projection kernels.

Kernels keep their DenseGeneral layout (q/k/v: [d_model, heads, head_dim]; o_proj: [heads, head_dim, d_model];
MLP: [in, out]); A is [in, rank] over the flattened input axes, B [rank, out] over the flattened output axes.
B starts at zero, so the adapted model starts exactly at the base model.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

# number of leading (input) axes of each target's kernel
IN_AXES = {"q_proj": 1, "k_proj": 1, "v_proj": 1, "o_proj": 2, "gate_proj": 1, "up_proj": 1, "down_proj": 1}


def _targets(params, targets, layer_filter):
    """Yield (layer name, module path tuple, kernel) for every targeted kernel."""
    for lname, layer in params.items():
        if not lname.startswith("layers_") or not layer_filter(int(lname.split("_")[1])):
            continue
        for group in ("attn", "mlp"):
            for t in targets:
                mod = layer.get(group, {}).get(t)
                if mod is not None and "kernel" in mod:
                    yield lname, (group, t), mod["kernel"]


def init_lora(params, targets, rank: int, key, layer_filter=lambda i: True):
    """LoRA factors {layer: {group: {target: {"a", "b"}}}} for the targeted kernels of `params` (fp32)."""
    lora: dict = {}
    for n, (lname, (group, t), w) in enumerate(_targets(params, targets, layer_filter)):
        k = IN_AXES[t]
        d_in, d_out = math.prod(w.shape[:k]), math.prod(w.shape[k:])
        a = jax.random.normal(jax.random.fold_in(key, n), (d_in, rank), jnp.float32) / math.sqrt(d_in)
        lora.setdefault(lname, {}).setdefault(group, {})[t] = {"a": a, "b": jnp.zeros((rank, d_out), jnp.float32)}
    if not lora:
        raise ValueError(f"no LoRA targets {list(targets)} found in the parameters")
    return lora


def merge_lora(params, lora, alpha: float | None):
    """Parameters with every LoRA delta (alpha / rank) * A @ B added to its kernel (a new tree; `params` is not
    modified). `alpha=None`: the factors carry their scale (delta = A @ B), as in student adapters."""
    out = dict(params)
    for lname, groups in lora.items():
        layer = dict(out[lname])
        for group, mods in groups.items():
            g = dict(layer[group])
            for t, f in mods.items():
                w = g[t]["kernel"]
                delta = f["a"] @ f["b"]
                if alpha is not None:
                    delta = delta * (alpha / f["a"].shape[1])
                g[t] = {**g[t], "kernel": (w.astype(jnp.float32) + delta.reshape(w.shape)).astype(w.dtype)}
            layer[group] = g
        out[lname] = layer
    return out
