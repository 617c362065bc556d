"""Shape and dtype checks shared by the GLA-family ops (full sequences and single decoding steps)."""

from __future__ import annotations

import jax.numpy as jnp

_AXES = {"bthd": ("batch", "seq", "heads"), "bhd": ("batch", "heads")}


def check_floating(name, x):
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating array, got {name}.dtype={x.dtype}")


def check_inputs(q, k, v, log_g, initial_state, *, layout: str, names=("q", "k", "v", "log_g")) -> None:
    """Raise ValueError/TypeError unless the arguments fit the GLA contract.

    layout "bthd": q, k, log_g ``[batch, seq, heads, dk]`` (log_g may end in 1), v ``[batch, seq, heads, dv]``;
    layout "bhd": the same without the seq axis (one decoding step). initial_state: ``[batch, heads, dk, dv]``
    or None. ``names`` are the caller's argument names, used in the messages.
    """
    axes = _AXES[layout]
    nq, nk, nv, ng = names
    for name, x in zip(names, (q, k, v, log_g)):
        if x.ndim != len(axes) + 1:
            raise ValueError(f"{name} must be [{', '.join(axes)}, dim], got {name}.shape={x.shape}")
        check_floating(name, x)
    if q.shape != k.shape:
        raise ValueError(f"{nq} and {nk} must have the same shape, got {nq}.shape={q.shape} and {nk}.shape={k.shape}")
    if not q.dtype == k.dtype == v.dtype:  # one operand dtype, as the Pallas kernel requires
        raise TypeError(
            f"{nq}, {nk} and {nv} must share one dtype, got {nq}.dtype={q.dtype}, {nk}.dtype={k.dtype}, "
            f"{nv}.dtype={v.dtype}"
        )
    if v.shape[:-1] != q.shape[:-1]:
        raise ValueError(f"{nv}.shape={v.shape} and {nq}.shape={q.shape} differ in {', '.join(axes)}")
    dk = q.shape[-1]
    if log_g.shape[:-1] != q.shape[:-1] or log_g.shape[-1] not in (dk, 1):
        raise ValueError(
            f"{ng} must be {q.shape} (one decay per key dim) or {q.shape[:-1] + (1,)} (one per head), "
            f"got {ng}.shape={log_g.shape}"
        )
    if initial_state is not None:
        want = (q.shape[0], q.shape[-2], dk, v.shape[-1])
        if initial_state.shape != want:
            raise ValueError(f"initial_state must be [batch, heads, dk, dv] = {want}, got {initial_state.shape=}")
        check_floating("initial_state", initial_state)
