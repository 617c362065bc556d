"""The numerics contract, in one place.

Every op, layer and kernel is tested against its float32/float64 reference with these tolerances.
They are relative to the reference's scale (``max|out - ref| / max|ref|``) and they fail: there is no
switch that turns a failure into a warning.
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


def rel_err(out, ref) -> float:
    """max |out - ref| / max |ref| in float64; NaN or inf anywhere gives inf."""
    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if out.shape != ref.shape:
        raise ValueError(f"shape mismatch: {out.shape=} vs {ref.shape=}")
    if not (np.all(np.isfinite(out)) and np.all(np.isfinite(ref))):
        return float("inf")
    scale = max(float(np.max(np.abs(ref), initial=0.0)), 1e-30)
    return float(np.max(np.abs(out - ref), initial=0.0)) / scale


def assert_close(out, ref, *, dtype=None, rtol=None, name: str = "output") -> None:
    """Assert ``rel_err(out, ref) <= rtol`` (default: the tolerance of ``dtype``, else of ``out``)."""
    if rtol is None:
        key = np.dtype(dtype if dtype is not None else np.asarray(out).dtype).name
        rtol = RTOL[key]
    err = rel_err(out, ref)
    if not err <= rtol:
        raise AssertionError(f"{name}: relative error {err:.3e} > {rtol:.1e}")
