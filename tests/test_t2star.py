"""AIF T2* correction from two echoes."""

from __future__ import annotations

import numpy as np
import pytest

from perfline.toolbox.t2star import EchoError, r2star_per_s, t2star_correct


def test_recovers_known_r2star_and_signal_at_te0() -> None:
    rate = np.array([0.0, 20.0, 150.0, 400.0])  # 1/s
    s0 = np.array([1.0, 2.0, 3.0, 4.0])
    te1, te2 = 1.2, 2.6
    echo1 = s0 * np.exp(-rate * te1 * 1e-3)
    echo2 = s0 * np.exp(-rate * te2 * 1e-3)
    np.testing.assert_allclose(r2star_per_s(echo1, echo2, te1, te2), rate, atol=1e-3)
    np.testing.assert_allclose(t2star_correct(echo1, echo2, te1, te2), s0, rtol=1e-5)


def test_no_decay_no_change() -> None:
    echo1 = np.array([[1.0, 0.5], [0.0, 2.0]])
    echo2 = np.array([[1.2, 0.5], [0.0, 2.5]])  # S2 >= S1 or zero: nothing to correct
    np.testing.assert_array_equal(t2star_correct(echo1, echo2, 1.0, 2.0), echo1.astype(np.float32))


def test_smoothing_reduces_noise() -> None:
    rng = np.random.default_rng(0)
    shape = (20, 32, 32)
    te1, te2, rate = 1.0, 2.5, 100.0
    echo1 = 100 * np.exp(-rate * seconds(te1)) + rng.normal(0, 3, shape)
    echo2 = 100 * np.exp(-rate * seconds(te2)) + rng.normal(0, 3, shape)
    raw = r2star_per_s(echo1, echo2, te1, te2)
    smooth = r2star_per_s(echo1, echo2, te1, te2, smoothing_px=3)
    assert np.std(smooth) < 0.5 * np.std(raw)
    assert abs(np.median(smooth) - rate) < 10


def seconds(te_ms: float) -> float:
    return te_ms * 1e-3


@pytest.mark.parametrize(
    ("te1", "te2", "match"), [(2.0, 1.0, "TE1 < TE2"), (np.nan, 1.0, "finite")], ids=["order", "nan"])
def test_bad_echo_times(te1: float, te2: float, match: str) -> None:
    with pytest.raises(EchoError, match=match):
        r2star_per_s(np.ones(3), np.ones(3), te1, te2)


def test_shape_mismatch_and_nan() -> None:
    with pytest.raises(EchoError, match="differ in shape"):
        r2star_per_s(np.ones((2, 3)), np.ones((3, 2)), 1.0, 2.0)
    with pytest.raises(EchoError, match="non-finite"):
        r2star_per_s(np.array([1.0, np.nan]), np.ones(2), 1.0, 2.0)
