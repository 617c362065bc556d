"""Feature maps for linear attention, as pure functions with explicit (per-head) parameters.

x ``[batch, seq, heads, d]``; projection w ``[heads, d, f]``; bias b ``[heads, f]``. Computed in float32;
the result has ``jnp.result_type(x, w)`` (bf16 activations with float32 params give float32 features).

  elu_plus_one(x)     ELU(x) + 1                                   (Katharopoulos et al. 2020)   -> d
  relu(x)             max(x, 0)                                                                  -> d
  t2r(x, w, b)        ReLU(x W + b)                                (T2R, Kasai et al. 2021)      -> f
  hedgehog(x, w)      [softmax(x W) ++ softmax(-x W)] over f       (LoLCATs, arXiv 2410.10254)   -> 2f
  hedgehog_exp(x, w)  [exp(x W) ++ exp(-x W)]                      (Hedgehog 2402.04347; Lizard) -> 2f

Sources: LoLCATs' code (``src/model/feature_map.py``, activation ``softmax_dim``) is the softmax form,
with no bias (its per-head scalar bias cancels inside the softmax); it also clamps features at 1e-12,
which we do not: softmax features are positive and the normaliser's eps guards a zero denominator.
The Lizard paper (arXiv 2507.09025) writes its map as ``exp(xW) ++ exp(-xW)`` (dimension 128, separate
maps for q and k) while calling the activation "softmax"; both forms are here, pick by name.
``hedgehog_exp`` is unnormalised and overflows float32 once ``|x W| > 88``: that is the paper's map
(subtracting a per-token max, as LoLCATs' ``exp_dim`` does, rescales each key and changes the kernel).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lizard_jax.ops.gated_linear.reference import PRECISION


def _check_x(x):
    if x.ndim != 4 or not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x must be a float array [batch, seq, heads, d], got {x.shape=} {x.dtype=}")


def _project(x, w, b=None):
    """x W (+ b) per head in float32: ``[batch, seq, heads, f]``."""
    _check_x(x)
    heads, d = x.shape[2], x.shape[3]
    if w.ndim != 3 or w.shape[:2] != (heads, d):
        raise ValueError(f"w must be [heads, d, f] with (heads, d) = {(heads, d)}, got {w.shape=}")
    y = jnp.einsum("bthd,hdf->bthf", x.astype(jnp.float32), w.astype(jnp.float32), precision=PRECISION)
    if b is not None:
        if b.shape != (heads, w.shape[2]):
            raise ValueError(f"b must be [heads, f] = {(heads, w.shape[2])}, got {b.shape=}")
        y = y + b.astype(jnp.float32)
    return y


def elu_plus_one(x):
    """ELU(x) + 1, positive: ``[batch, seq, heads, d]``."""
    _check_x(x)
    return (jax.nn.elu(x.astype(jnp.float32)) + 1.0).astype(x.dtype)


def relu(x):
    """max(x, 0): ``[batch, seq, heads, d]``."""
    _check_x(x)
    return jax.nn.relu(x)


def t2r(x, w, b):
    """ReLU(x W + b): ``[batch, seq, heads, f]``."""
    return jax.nn.relu(_project(x, w, b)).astype(jnp.result_type(x, w))


def hedgehog(x, w):
    """LoLCATs' Hedgehog map, softmax over the feature dim of +xW and -xW: ``[batch, seq, heads, 2f]``."""
    y = _project(x, w)
    out = jnp.concatenate([jax.nn.softmax(y, axis=-1), jax.nn.softmax(-y, axis=-1)], axis=-1)
    return out.astype(jnp.result_type(x, w))


def hedgehog_exp(x, w):
    """Hedgehog / Lizard exponential map ``exp(xW) ++ exp(-xW)``: ``[batch, seq, heads, 2f]``."""
    y = _project(x, w)
    return jnp.concatenate([jnp.exp(y), jnp.exp(-y)], axis=-1).astype(jnp.result_type(x, w))


FEATURE_MAPS = {
    "elu_plus_one": elu_plus_one,
    "relu": relu,
    "t2r": t2r,
    "hedgehog": hedgehog,
    "hedgehog_exp": hedgehog_exp,
}


def get_feature_map(name: str):
    """The feature map registered under ``name`` (see ``FEATURE_MAPS``)."""
    try:
        return FEATURE_MAPS[name]
    except KeyError:
        raise ValueError(f"unknown feature map {name!r}; known: {sorted(FEATURE_MAPS)}") from None


__all__ = ["FEATURE_MAPS", "elu_plus_one", "get_feature_map", "hedgehog", "hedgehog_exp", "relu", "t2r"]
