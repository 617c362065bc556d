"""The numerics contract, in one place.

Every op, layer and kernel is tested against its float32/float64 reference with these tolerances, and they
fail: there is no switch that turns a failure into a warning.

Errors are measured against a local scale, so a wrong low-magnitude head or row cannot hide behind a large
one. A row is a vector over the last axis (one head at one position of ``[batch, seq, heads, head_dim]``, one
position's logits, one row of a weight gradient; trailing axes of size 1 are skipped, so the row of a per-head
gate ``[batch, seq, heads, 1]`` is its heads); each element's error is divided by its row's scale::

    scale_row = max(max|ref_row|, floor * max|ref|)        floor = min(1, ROUNDINGS * eps(dtype) / rtol)
    rel_err   = max over elements of |out - ref| / scale_row

The floor is where the tolerance meets rounding noise: a row whose values come from cancelling much larger
ones (a gradient through a softmax, a sum of gates) carries the rounding of those larger values, a few ulps
of the global scale, and must not fail on it; an exact-zero row must not divide by zero. For float32 at 1e-4
the floor is 4.8e-3 (a head 100x weaker than the strongest is measured against its own scale), for two
float32 forms at 1e-5 it is 4.8e-2. For bfloat16 and float16 the rounding of the inputs alone is as large as
the tolerance, so their floor is (nearly) the global scale: the local property is checked in float32, where
every kernel and op has its own cases.
"""

from __future__ import annotations

import numpy as np

# dtype name -> relative tolerance
RTOL = {
    "float64": 1e-10,
    "float32": 1e-4,
    "bfloat16": 2e-2,
    "float16": 5e-3,
}
# the tighter bound for two float32 forms of the same algorithm (quadratic == chunked == recurrent)
FORMS_RTOL = 1e-5
# dtype name -> machine epsilon (the spacing of floats at 1.0)
EPS = {
    "float64": 2.0 ** -52,
    "float32": 2.0 ** -23,
    "bfloat16": 2.0 ** -7,
    "float16": 2.0 ** -10,
}
# rounding noise allowed at the global scale, in units of the dtype's eps
ROUNDINGS = 4


def scale_floor(dtype, rtol: float) -> float:
    """The fraction of the global max|ref| under which a row is not measured against itself (module doc); 1
    for an exact comparison (rtol 0), where any difference fails whatever the scale."""
    if rtol <= 0:
        return 1.0
    return min(1.0, ROUNDINGS * EPS[np.dtype(dtype).name] / rtol)


# the floor of a float32 comparison at RTOL["float32"]: rel_err's default
FLOAT32_FLOOR = scale_floor("float32", RTOL["float32"])


def _local_errors(out, ref, floor: float) -> np.ndarray | None:
    """|out - ref| / scale_row (float64, the shape of ``ref``, at least 1-D); None if anything is NaN or inf."""
    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if out.shape != ref.shape:
        raise ValueError(f"shape mismatch: {out.shape=} vs {ref.shape=}")
    if not (np.all(np.isfinite(out)) and np.all(np.isfinite(ref))):
        return None
    out, ref = np.atleast_1d(out), np.atleast_1d(ref)
    # trailing size-1 axes (a per-head gate [..., heads, 1]) hold no row: the row is the last longer axis
    axis = max((i for i, n in enumerate(ref.shape) if n > 1), default=-1)
    row = np.max(np.abs(ref), axis=axis, keepdims=True, initial=0.0)
    scale = np.maximum(row, max(floor * float(np.max(row, initial=0.0)), 1e-30))
    return np.abs(out - ref) / scale


def rel_err(out, ref, *, floor: float = FLOAT32_FLOOR) -> float:
    """The largest error of ``out`` against ``ref`` relative to its row's scale (module doc; the default floor
    is float32's at 1e-4, `scale_floor` gives others), in float64. NaN or inf anywhere gives inf; different
    shapes raise ValueError."""
    err = _local_errors(out, ref, floor)
    return float("inf") if err is None else float(np.max(err, initial=0.0))


def assert_close(out, ref, *, dtype=None, rtol=None, name: str = "output") -> None:
    """Assert ``rel_err(out, ref) <= rtol`` with the floor of ``dtype`` (default: ``out``'s dtype) at ``rtol``
    (default: the tolerance of that dtype). The message names the worst element, its values and its scale."""
    key = np.dtype(dtype if dtype is not None else np.asarray(out).dtype).name
    rtol = RTOL[key] if rtol is None else rtol
    err = _local_errors(out, ref, scale_floor(key, rtol))
    if err is None:
        raise AssertionError(f"{name}: NaN or inf in out or ref (shape {np.shape(ref)})")
    worst = np.unravel_index(np.argmax(err), err.shape) if err.size else ()
    if err.size and not err[worst] <= rtol:
        o, r = np.atleast_1d(np.asarray(out, np.float64)), np.atleast_1d(np.asarray(ref, np.float64))
        raise AssertionError(f"{name}: relative error {err[worst]:.3e} > {rtol:.1e} at index "
                             f"{tuple(int(i) for i in worst)} (out {o[worst]:.6g}, ref {r[worst]:.6g}, row scale "
                             f"{abs(o[worst] - r[worst]) / err[worst]:.3g})")
