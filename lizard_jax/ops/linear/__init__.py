"""Linear attention with feature maps (LoLCATs arXiv 2410.10254, Lizard 2507.09025, Hedgehog 2402.04347).

    S_t = diag(exp(g_t)) S_{t-1} + phi_k_t^T v_t,   z_t = diag(exp(g_t)) z_{t-1} + phi_k_t,
    y_t = (phi_q_t S_t) / (phi_q_t z_t + eps)              (no gate: g = 0)

Forms: "quadratic" (``reference.py``, the O(T^2) masked spec) and "chunk": one ``gla`` call on v
augmented with a column of ones, so numerator (first dv columns) and denominator (last column) come out
of the same scan, in the same kernel. State: float32 ``[batch, heads, f, dv + 1]`` = [S | z].

Lizard's global branch (gated, with its own normaliser) is ``linear_attention(phi_q, phi_k, v,
log_g=log_sigmoid(x W_gamma))`` with a ``[batch, seq, heads, 1]`` gate; its anchor window and meta
tokens are a separate op. Gate values are not checked (they may be traced): ``log_g <= 0`` is the
contract (a decay); positive values are outside it (the chunked form may overflow).
"""

from __future__ import annotations

import jax.numpy as jnp

from lizard_jax.ops.gated_linear import check_segment_ids, gla, gla_step, reset_gates, resolve_impl
from lizard_jax.ops.gated_linear._checks import check_floating, check_inputs
from lizard_jax.ops.gated_linear.chunk import DEFAULT_CHUNK_SIZE
from lizard_jax.ops.linear.feature_maps import (
    FEATURE_MAPS,
    elu_plus_one,
    get_feature_map,
    hedgehog,
    hedgehog_exp,
    relu,
    t2r,
)
from lizard_jax.ops.linear.reference import DEFAULT_EPS, augment_with_ones, linear_attention_quadratic, normalise

FORMS = ("chunk", "quadratic")
_NAMES = ("phi_q", "phi_k", "v", "log_g")


def _validate(phi_q, phi_k, v, log_g, state, eps, *, layout, state_name):
    """Checks shapes/dtypes/eps; returns the gate to use (zeros ``[..., 1]`` when log_g is None)."""
    gate = jnp.zeros(phi_q.shape[:-1] + (1,), jnp.float32) if log_g is None else log_g
    check_inputs(phi_q, phi_k, v, gate, None, layout=layout, names=_NAMES)
    if state is not None:
        want = (phi_q.shape[0], phi_q.shape[-2], phi_q.shape[-1], v.shape[-1] + 1)
        if state.shape != want:
            raise ValueError(
                f"{state_name} must be [batch, heads, f, dv + 1] = {want} (S | z), got {state_name}.shape={state.shape}"
            )
        check_floating(state_name, state)
    if not (isinstance(eps, (int, float)) and eps >= 0):
        raise ValueError(f"eps must be a non-negative number, got {eps=}")
    return gate


def linear_attention(
    phi_q,
    phi_k,
    v,
    *,
    log_g=None,
    form: str = "chunk",
    initial_state=None,
    return_final_state: bool = False,
    eps: float = DEFAULT_EPS,
    impl: str = "auto",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    segment_ids=None,
):
    """Normalised linear attention over a sequence (train / prefill).

    Args:
      phi_q, phi_k: feature-mapped queries and keys ``[batch, seq, heads, f]`` (same dtype; nonnegative
        features keep ``|y| <= max|v|``).
      v: ``[batch, seq, heads, dv]``. The chunk form runs ``gla`` in ``result_type(phi_q, v)``: with
        bfloat16 features and values, numerator and denominator are rounded to bfloat16 before the
        division (about 2^-8 relative on y); float32 features keep them float32.
      log_g: None (no decay) or log forget gate ``<= 0``, ``[batch, seq, heads, f]`` or
        ``[batch, seq, heads, 1]``.
      form: "chunk" (one ``gla`` call) or "quadratic" (the O(T^2) spec).
      initial_state: None or ``[batch, heads, f, dv + 1]`` ([S | z]).
      return_final_state: also return the state after the last token.
      eps: added to the denominator.
      impl, chunk_size: passed to ``gla`` (form "chunk"); "pallas" is an error with form "quadratic".
      segment_ids: None, or int ``[batch, seq]`` equal within a document (packed documents): S and the
        normaliser z restart at each segment start (its log-gate becomes -inf, with or without log_g), in
        both forms and every impl. initial_state applies to the first segment only; the final state is the
        last segment's. None: the program is the one without segments. The decoding step has none
        (generation is unpacked).

    Returns:
      y ``[batch, seq, heads, dv]`` in v's dtype, or ``(y, state [batch, heads, f, dv + 1] float32)``.
    """
    gate = _validate(phi_q, phi_k, v, log_g, initial_state, eps, layout="bthd", state_name="initial_state")
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}; expected one of {FORMS}")
    seg = {}
    if segment_ids is not None:
        check_segment_ids(segment_ids, phi_q.shape[0], phi_q.shape[1])
        seg = {"segment_ids": segment_ids}
    impl = resolve_impl(impl)
    if form == "quadratic":
        if impl == "pallas":
            raise ValueError("impl='pallas' applies to form='chunk' only; the quadratic form is XLA")
        if segment_ids is not None:  # -inf gates at the starts: exact in the quadratic form (sums, then exp)
            log_g = reset_gates(gate, segment_ids)
        y, ht = linear_attention_quadratic(phi_q, phi_k, v, log_g, initial_state, eps=eps)
    else:
        # gla takes one operand dtype: result_type(phi, v). Numerator and denominator leave the scan in it
        # (float32 for float32 features, as the feature maps give with float32 params)
        dtype = jnp.result_type(phi_q.dtype, v.dtype)
        o_aug, ht = gla(
            phi_q.astype(dtype), phi_k.astype(dtype), augment_with_ones(v).astype(dtype), gate,
            initial_state=initial_state, return_final_state=True, impl=impl, chunk_size=chunk_size, **seg,
        )
        y = normalise(o_aug.astype(jnp.float32), eps).astype(v.dtype)
    return (y, ht) if return_final_state else y


def linear_attention_step(phi_q, phi_k, v, state, *, log_g=None, eps: float = DEFAULT_EPS):
    """One decoding step. phi_q, phi_k ``[batch, heads, f]``, v ``[batch, heads, dv]``, log_g None or
    ``[batch, heads, f | 1]``, state ``[batch, heads, f, dv + 1]``.
    Returns (y ``[batch, heads, dv]`` in v's dtype, new state float32)."""
    if state is None:
        raise ValueError("linear_attention_step needs a state [batch, heads, f, dv + 1]; start from zeros")
    gate = _validate(phi_q, phi_k, v, log_g, state, eps, layout="bhd", state_name="state")
    dtype = jnp.result_type(phi_q.dtype, v.dtype)  # as in linear_attention's chunk form
    o_aug, new_state = gla_step(
        phi_q.astype(dtype), phi_k.astype(dtype), augment_with_ones(v).astype(dtype), gate, state
    )
    return normalise(o_aug.astype(jnp.float32), eps).astype(v.dtype), new_state


__all__ = [
    "DEFAULT_EPS",
    "FEATURE_MAPS",
    "FORMS",
    "elu_plus_one",
    "get_feature_map",
    "hedgehog",
    "hedgehog_exp",
    "linear_attention",
    "linear_attention_quadratic",
    "linear_attention_step",
    "relu",
    "t2r",
]
