"""Shape and dtype checks shared by ``gla`` (full sequences) and ``gla_step`` (one token)."""

from __future__ import annotations

import jax.numpy as jnp


def _floating(name, x):
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating array, got {name}.dtype={x.dtype}")


def check_inputs(q, k, v, log_g, initial_state, *, layout: str) -> None:
    """Raise ValueError/TypeError unless the arguments fit the GLA contract.

    layout "bthd": q, k, log_g ``[batch, seq, heads, dk]`` (log_g may end in 1), v ``[batch, seq, heads, dv]``;
    layout "bhd": the same without the seq axis (one decoding step). initial_state: ``[batch, heads, dk, dv]``.
    """
    ndim = len(layout)
    for name, x in (("q", q), ("k", k), ("v", v), ("log_g", log_g)):
        if x.ndim != ndim:
            raise ValueError(f"{name} must be [{', '.join(_AXES[layout])}], got {name}.shape={x.shape}")
        _floating(name, x)
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape, got {q.shape=} and {k.shape=}")
    if q.dtype != k.dtype:
        raise TypeError(f"q and k must have the same dtype, got {q.dtype=} and {k.dtype=}")
    if v.shape[:-1] != q.shape[:-1]:
        raise ValueError(
            f"{v.shape=} and {q.shape=} differ in {', '.join(_AXES[layout][:-1])} (only the last dim may differ)"
        )
    dk = q.shape[-1]
    if log_g.shape[:-1] != q.shape[:-1] or log_g.shape[-1] not in (dk, 1):
        raise ValueError(
            f"log_g must be {q.shape} (one decay per key dim) or {q.shape[:-1] + (1,)} (one per head), "
            f"got {log_g.shape=}"
        )
    if initial_state is not None:
        batch, heads = q.shape[0], q.shape[-2]
        want = (batch, heads, dk, v.shape[-1])
        if initial_state.shape != want:
            raise ValueError(
                f"initial_state must be [batch, heads, dk, dv] = {want}, got {initial_state.shape=}"
            )
        _floating("initial_state", initial_state)


_AXES = {"bthd": ("batch", "seq", "heads", "dim"), "bhd": ("batch", "heads", "dim")}
