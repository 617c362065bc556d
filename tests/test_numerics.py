"""lizard_jax.numerics: errors against a local (per-row) scale, so a wrong weak head cannot hide behind a strong
one; NaN, inf, shapes, zero rows and the per-dtype defaults."""

import jax.numpy as jnp
import numpy as np
import pytest

from lizard_jax.numerics import FLOAT32_FLOOR, FORMS_RTOL, RTOL, assert_close, rel_err, scale_floor


def heads_BxTxHxD(weak_head: int = 2, weak_scale: float = 1e-2):
    """Attention-like outputs [2, 16, 4, 8], head `weak_head` ~100x smaller (a fast-forgetting, weakly
    contributing head)."""
    x = np.random.default_rng(0).standard_normal((2, 16, 4, 8))
    x[:, :, weak_head] *= weak_scale
    return x


def test_error_in_a_weak_head_fails_though_the_global_scale_hid_it():
    ref = heads_BxTxHxD(weak_head=2)
    out = ref.copy()
    out[:, :, 2] *= 1.001  # a 0.1% error, in the weak head only
    global_err = np.max(np.abs(out - ref)) / np.max(np.abs(ref))  # the old definition
    assert global_err < RTOL["float32"]
    assert RTOL["float32"] < 3e-4 < rel_err(out, ref) <= 1e-3
    with pytest.raises(AssertionError, match=r"relative error \S+ > 1\.0e-04 at index \(\d+, \d+, 2, \d+\)"):
        assert_close(out, ref, dtype="float32")
    with pytest.raises(AssertionError, match=r"> 1\.0e-05"):
        assert_close(out, ref, rtol=FORMS_RTOL)


def test_same_error_in_a_strong_head_is_measured_the_same():
    ref = heads_BxTxHxD(weak_head=2)
    out = ref.copy()
    out[:, :, 0] *= 1.001
    assert rel_err(out, ref) == pytest.approx(1e-3, rel=1e-6)


def test_floor_follows_dtype_and_tolerance():
    assert FLOAT32_FLOOR == scale_floor("float32", 1e-4) == pytest.approx(4.8e-3, rel=0.01)
    assert scale_floor("float32", FORMS_RTOL) == pytest.approx(4.8e-2, rel=0.01)
    assert scale_floor("bfloat16", RTOL["bfloat16"]) == 1.0  # input rounding ~ the tolerance: global scale
    # a bf16 computation whose small row carries rounding of the large ones passes as bf16, not as float32
    ref = np.array([[1.0, -1.0], [0.01, 0.02]])
    out = ref + np.array([[0.0, 0.0], [4e-3, 0.0]])
    assert_close(out, ref, dtype="bfloat16")
    with pytest.raises(AssertionError, match=r"at index \(1, 0\)"):
        assert_close(out, ref, rtol=RTOL["bfloat16"])


def test_float32_rounding_passes_in_every_row():
    ref = heads_BxTxHxD(weak_head=2)
    out = ref.astype(np.float32)  # relative rounding everywhere, weak head included
    assert rel_err(out, ref) < 1e-6
    assert_close(out, ref)


def test_zero_rows_use_the_floor():
    """Masked (exactly zero) rows: an exact zero passes, rounding noise far below the global scale passes, an
    error as large as a real row's values fails."""
    ref = heads_BxTxHxD()
    ref[0, :3] = 0.0
    assert rel_err(ref, ref) == 0.0
    out = ref.copy()
    out[0, 1, 1, 1] = 1e-3 * FLOAT32_FLOOR * np.abs(ref).max()
    assert rel_err(out, ref) == pytest.approx(1e-3)
    out[0, 1, 1, 1] = 0.1 * np.abs(ref).max()
    assert rel_err(out, ref) == pytest.approx(0.1 / FLOAT32_FLOOR)
    assert rel_err(np.zeros((3, 4)), np.zeros((3, 4))) == 0.0


def test_nan_inf_and_shape():
    ref = np.ones((2, 3))
    for bad in (np.nan, np.inf, -np.inf):
        out = ref.copy()
        out[1, 2] = bad
        assert rel_err(out, ref) == float("inf") and rel_err(ref, out) == float("inf")
        with pytest.raises(AssertionError, match="NaN or inf"):
            assert_close(out, ref, rtol=1.0)
    with pytest.raises(ValueError, match=r"shape mismatch: out.shape=\(2, 3\) vs ref.shape=\(3, 2\)"):
        rel_err(ref, ref.T)
    with pytest.raises(ValueError, match="shape mismatch"):
        assert_close(ref[None], ref, rtol=1.0)


def test_scalars_empty_arrays_and_dtype_defaults():
    assert rel_err(1.001, 1.0) == pytest.approx(1e-3)
    assert rel_err(np.zeros((0, 4)), np.zeros((0, 4))) == 0.0
    assert_close(np.zeros((0, 4)), np.zeros((0, 4)), rtol=0.0)
    ref = jnp.linspace(-3.0, 3.0, 64, dtype=jnp.float32).reshape(4, 16)
    assert_close(ref.astype(jnp.bfloat16), ref)  # bf16 tolerance from out's dtype
    with pytest.raises(AssertionError, match=r"> 1\.0e-04"):
        assert_close(ref.astype(jnp.bfloat16), ref, dtype="float32")
