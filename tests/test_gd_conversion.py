"""SR/PD -> Gd: sequence parameters from the MRD header, LUT inversion, end-to-end accuracy."""

from __future__ import annotations

import ismrmrd.xsd as xsd
import numpy as np
import pytest
from scipy import ndimage

from perfline.simulator import mrd
from perfline.simulator import study as st
from perfline.simulator.image_study import image_slice
from perfline.toolbox.bloch import SequenceParameters, sr_and_pd_signal
from perfline.toolbox.gd_conversion import (
    HeaderError,
    aif_gd,
    lookup_table,
    myocardial_gd,
    ratio_to_gd_continued_below_zero,
    sequence_from_header,
)
from perfline.toolbox.surface_coil import coil_map_from_pd, normalize_by_pd


def header_of(study: st.StudyParameters) -> xsd.ismrmrdHeader:
    return xsd.CreateFromDocument(mrd.build_header(study))


@pytest.mark.parametrize("field", [1.5, 3.0], ids=["1.5T", "3T"])
def test_sequence_from_simulator_header(field: float) -> None:
    study = st.sample_study(2, n_slices=1, n_frames=10, field_strength_t=field)
    header = header_of(study)
    assert sequence_from_header(header, 0) == study.myocardial_sequence
    assert sequence_from_header(header, 1) == study.aif_sequence


def test_header_errors_name_the_missing_field() -> None:
    study = st.sample_study(2, n_slices=1, n_frames=10)
    header = header_of(study)
    header.userParameters.userParameterDouble = [
        p for p in header.userParameters.userParameterDouble if p.name != "SaturationDelay_ms"]
    with pytest.raises(HeaderError, match="SaturationDelay_ms"):
        sequence_from_header(header, 0)
    header = header_of(study)
    header.encoding = header.encoding[:1]
    with pytest.raises(HeaderError, match="AIF series needs encoding space 1"):
        sequence_from_header(header, 1)
    header = header_of(study)
    header.acquisitionSystemInformation.systemFieldStrength_T = None
    with pytest.raises(HeaderError, match="systemFieldStrength_T"):
        sequence_from_header(header, 0)


@pytest.mark.parametrize("field", [1.5, 3.0], ids=["1.5T", "3T"])
def test_lut_inversion_within_0_5_percent(field: float) -> None:
    gd = np.linspace(0.2, 6.0, 59)
    myo = SequenceParameters.myocardial(field)
    sr, _ = sr_and_pd_signal(gd, myo, "myocardium")
    _, pd0 = sr_and_pd_signal(0.0, myo, "myocardium")
    np.testing.assert_allclose(myocardial_gd(sr / pd0, myo), gd, rtol=5e-3)
    aif = SequenceParameters.aif(field)
    blood = np.linspace(0.2, 20.0, 50)
    sr, _ = sr_and_pd_signal(blood, aif, "blood")
    _, pd0 = sr_and_pd_signal(0.0, aif, "blood")
    np.testing.assert_allclose(aif_gd(sr / pd0, aif), blood, rtol=5e-3)


@pytest.mark.parametrize("field", [1.5, 3.0], ids=["1.5T", "3T"])
def test_simulated_myocardium_gd_through_pd_map(field: float) -> None:
    """Noise-free simulated slice with coil shading: SR / guided PD map -> Gd vs the truth."""
    study = st.sample_study(4, n_slices=1, n_frames=60, field_strength_t=field)
    phantom = st.slice_phantom(study, 0)
    sl = image_slice(study, 0, motion=False, noise=False)
    pd = sl.n_pd_frames
    sr = sl.signal[pd:]
    coil_map = coil_map_from_pd(sl.signal[:pd].mean(axis=0), box_size_px=5, guide=sr.mean(axis=0),
                                guide_tolerance=0.05)
    gd = myocardial_gd(normalize_by_pd(sr, coil_map), study.myocardial_sequence)
    truth = phantom.gd[pd:]
    # eroded: border pixels mix blood and myocardium, which no single-tissue table converts
    core = ndimage.binary_erosion(sl.labels == 2)
    inside = core[None] & (truth >= 0.2) & (truth <= 6.0)
    relative = (gd[inside] - truth[inside]) / truth[inside]
    assert abs(np.median(relative)) < 0.03
    assert np.median(np.abs(relative)) < 0.03


def test_nan_ratio_rejected() -> None:
    with pytest.raises(ValueError, match="non-finite"):
        myocardial_gd(np.array([0.1, np.nan]), SequenceParameters.myocardial(1.5))


@pytest.mark.parametrize("field", [1.5, 3.0], ids=["1.5T", "3T"])
def test_continued_table_is_the_table_above_zero_and_keeps_baseline_noise_zero_mean(field: float) -> None:
    """Above the native ratio the continued conversion is the table; below it is linear and
    continuous at Gd = 0, so zero-mean noise around the native ratio stays zero-mean in Gd
    (the clipped table reads it as a positive pre-bolus Gd)."""
    table = lookup_table(SequenceParameters.aif(field), "blood", 40.0)
    native = float(table.ratio_grid[0])
    above = np.linspace(native, float(table.ratio_grid[-1]), 500)
    np.testing.assert_array_equal(ratio_to_gd_continued_below_zero(above, table), table.to_gd(above))
    slope = float(table.to_ratio(0.02) - native) / 0.02
    below = native - np.array([1e-6, 0.01, 0.05])
    np.testing.assert_allclose(ratio_to_gd_continued_below_zero(below, table), (below - native) / slope, rtol=0.02)
    assert abs(float(ratio_to_gd_continued_below_zero(native - 1e-9, table))) < 1e-6
    noise = np.random.default_rng(0).normal(0.0, 0.3 * slope * 0.1, 200_000)  # SD 0.03 mmol/L
    continued = ratio_to_gd_continued_below_zero(native + noise, table)
    clipped = table.to_gd(native + noise)
    assert abs(continued.mean()) < 5e-4
    assert clipped.mean() > 0.01


def test_myocardial_gd_continued_below_zero_takes_the_rectification_out_of_noisy_tissue_curves() -> None:
    """A noisy motion-free simulated slice (1.5 T, low SNR) through the chain's PD map and the
    myocardial table: the clipped table rectifies the pre-bolus noise (positive pre-bolus Gd) and,
    baseline-subtracted, reads the enhancement low (slope on the truth < 1); continued below 0 the
    pre-bolus mean is about 0 and the slope closer to 1. Air (ratio 0) stays 0 mmol/L."""
    study = st.sample_study(3, kind="rest", field_strength_t=1.5, n_slices=1, n_frames=40)
    slice_ = image_slice(study, 0, noise=True, motion=False)
    truth_phantom = st.slice_phantom(study, 0)
    n_pd = study.n_pd_frames
    sr, pd = slice_.signal[n_pd:], slice_.signal[:n_pd].mean(axis=0)
    ratio = normalize_by_pd(sr, coil_map_from_pd(pd, box_size_px=5, guide=sr.mean(axis=0), guide_tolerance=0.05))
    core = ndimage.binary_erosion(slice_.labels == 2, iterations=1)
    truth = truth_phantom.gd[n_pd:][:, core].astype(np.float64)
    pre = int(np.argmax(truth.mean(axis=1) > 1e-3))
    assert pre >= 3
    results = {}
    for continued in (False, True):
        gd = myocardial_gd(ratio, study.myocardial_sequence, continue_below_zero=continued)[:, core].astype(np.float64)
        y, x = gd - gd[:pre].mean(axis=0), truth - truth[:pre].mean(axis=0)
        results[continued] = (float(gd[:pre].mean()), float((y * x).sum() / (x * x).sum()))
    assert results[False][0] > 0.01
    assert abs(results[True][0]) < 0.5 * results[False][0]
    assert abs(results[True][1] - 1.0) < abs(results[False][1] - 1.0) - 0.01
    air = myocardial_gd(np.zeros((2, 3)), study.myocardial_sequence, continue_below_zero=True)
    np.testing.assert_array_equal(air, 0.0)
