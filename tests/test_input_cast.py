"""The input casting rule of compiled functions (graphc/input_cast.py): safe casts
are silent, lossy same-kind casts warn once per input, others are errors."""
import warnings

import numpy as np
import pytest

import graphc as gc
from graphc.input_cast import InputCastWarning


def _compiled():
    x = gc.input("x", (3,), "float32")
    n = gc.input("n", (3,), "int64")
    return gc.compile([x, n], [x * 2.0, n + 1])


def test_lossy_cast_warns_once_per_input_naming_it_and_the_callers_line():
    f = _compiled()
    with pytest.warns(InputCastWarning) as rec:
        out, _ = f(np.array([0.1, 1e-3, 3.0]), np.arange(3))        # float64 into float32
    assert len(rec) == 1
    msg = str(rec[0].message)
    assert "'x'" in msg and "float32" in msg and "float64" in msg
    assert rec[0].filename == __file__                               # the user's line
    np.testing.assert_array_equal(out, np.array([0.1, 1e-3, 3.0], np.float32) * 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                              # no second warning
        f(np.array([0.5, 1.0, 2.0]), np.arange(3))
    with pytest.warns(InputCastWarning, match="'x'"):                # a new Function warns anew
        _compiled()(np.arange(3, dtype=np.int64), np.arange(3))      # int64 -> float32 rounds


def test_int64_into_int32_warns_and_safe_casts_are_silent():
    k = gc.input("k", (2,), "int32")
    g = gc.compile([k], k * 1)
    with pytest.warns(InputCastWarning, match="'k'.*int32.*int64") as rec:
        assert g(np.array([5, -7], np.int64)).tolist() == [5, -7]
    # an integer narrowing changes no value (out-of-range ones are refused): the
    # warning says so rather than that it "may round"
    msg = str(rec[0].message)
    assert "round" not in msg and "refused" in msg, msg
    with pytest.raises(ValueError, match="'k'"):
        g(np.array([2 ** 40, 0], np.int64))
    f = _compiled()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, m = f(np.array([1, 2, 250], np.uint8), np.array([1, 2, 3], np.int32))
    assert out.tolist() == [2.0, 4.0, 500.0] and m.tolist() == [2, 3, 4]


def test_cross_kind_is_an_error_with_advice():
    f = _compiled()
    with pytest.raises(TypeError, match=r"'n' expects dtype int64, got float64.*astype"):
        f(np.zeros(3, np.float32), np.array([1.0, 2.0, 3.0]))


def test_warning_points_at_the_callers_line_for_a_step_with_updates():
    x = gc.input("x", (None, 2))
    w = gc.Parameter(np.ones(2, np.float32), name="w")
    step = gc.compile([x], gc.sum(x * w), updates={w: w * 0.5})
    with pytest.warns(InputCastWarning) as rec:
        step(np.ones((3, 2)))
    assert rec[0].filename == __file__


def test_float64_beyond_float32_range_is_refused_not_warned():
    f = _compiled()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="'x'"):
            f(np.array([1.0, 1e39, 2.0]), np.arange(3))
