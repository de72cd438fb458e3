"""Saturation-recovery physics and the SR/PD <-> Gd look-up table."""

from __future__ import annotations

import math

import numpy as np
import pytest

from perfline.toolbox.bloch import (GdLookupTable, LookupTableError, SequenceParameters,
                                    saturation_time_ms, sr_and_pd_signal, sr_over_pd,
                                    tissue_relaxation)

FIELDS = pytest.mark.parametrize("field", [1.5, 3.0], ids=["1.5T", "3T"])


def test_saturation_time_follows_the_reference_formula():
    seq = SequenceParameters.myocardial(1.5, acceleration=3)
    # TD 40 + TR 2.5 * ceil(floor(144 / 3) / 2) = 40 + 2.5 * 24
    assert saturation_time_ms(seq) == pytest.approx(100.0)
    seq1 = SequenceParameters.myocardial(1.5, acceleration=1)
    assert saturation_time_ms(seq1) == pytest.approx(40.0 + 2.5 * 72)
    odd = SequenceParameters(field_strength_t=3.0, n_phase_encodes=111, acceleration=3, tr_ms=2.0,
                             saturation_delay_ms=10.0)
    assert saturation_time_ms(odd) == pytest.approx(10.0 + 2.0 * math.ceil(37 / 2))


def test_relaxation_values_and_errors():
    blood = tissue_relaxation(1.5, "blood")
    assert (blood.t1_s, blood.r1_l_mmol_s) == (1.7, 5.565)
    assert tissue_relaxation(3.0, "myocardium").t1_s == 1.3
    with pytest.raises(ValueError, match="1.5 or 3.0"):
        tissue_relaxation(7.0, "blood")
    with pytest.raises(ValueError, match="tissue must be one of"):
        tissue_relaxation(1.5, "bone")


def test_flash_matches_closed_form_recursion():
    """Spoiled FLASH: Mz after n pulses has the closed form of a geometric recursion."""
    seq = SequenceParameters.aif(1.5)
    relax = tissue_relaxation(1.5, "blood")
    gd = 2.0
    r1 = 1 / relax.t1_s + relax.r1_l_mmol_s * gd
    e1 = math.exp(-seq.tr_ms / 1000 * r1)
    cos_a = math.cos(math.radians(seq.flip_angle_deg))
    mz = 1 - math.exp(-seq.saturation_delay_ms / 1000 * r1)
    n = math.ceil((seq.n_phase_encodes // seq.acceleration) / 2)
    steady = (1 - e1) / (1 - cos_a * e1)
    expected_mz = steady + (mz - steady) * (cos_a * e1) ** n
    sr, pd = sr_and_pd_signal(gd, seq, "blood")
    assert sr == pytest.approx(expected_mz * math.sin(math.radians(seq.flip_angle_deg)), rel=1e-10)


def test_ssfp_tends_to_the_balanced_steady_state():
    """With many pulses the SSFP signal approaches M0 sin(a) / (1 + cos(a) + (1 - cos(a)) T1/T2)."""
    seq = SequenceParameters(field_strength_t=1.5, n_phase_encodes=8000, acceleration=1, te_ms=0.0,
                             saturation_delay_ms=0.0)
    relax = tissue_relaxation(1.5, "myocardium")
    a = math.radians(seq.flip_angle_deg)
    t1_over_t2 = relax.t1_s / relax.t2_s
    # steady state (short TR limit) times the exp(-TR/2 R2) free decay to TE = 0 is not applied
    expected = math.sin(a) / (1 + math.cos(a) + (1 - math.cos(a)) * t1_over_t2)
    sr, _ = sr_and_pd_signal(0.0, seq, "myocardium")
    assert float(sr) == pytest.approx(expected, rel=0.03)


@FIELDS
@pytest.mark.parametrize("series", ["myocardial", "aif"])
def test_lut_round_trip_within_one_percent(field, series):
    seq = getattr(SequenceParameters, series)(field)
    tissue, gd_max = ("myocardium", 10.0) if series == "myocardial" else ("blood", 40.0)
    lut = GdLookupTable(seq, tissue, gd_max_mmol_l=gd_max)
    gd = np.linspace(0.0, 8.0, 161)
    sr, _ = sr_and_pd_signal(gd, seq, tissue)
    _, pd0 = sr_and_pd_signal(0.0, seq, tissue)
    recovered = lut.to_gd(sr / pd0)
    assert np.all(np.abs(recovered - gd) <= 0.01 * np.maximum(gd, 0.05))


def test_ratio_increases_with_gd_and_matches_lut():
    seq = SequenceParameters.myocardial(3.0)
    ratio = sr_over_pd(np.array([0.0, 0.5, 1.0, 2.0]), seq)
    assert np.all(np.diff(ratio) > 0)
    lut = GdLookupTable(seq)
    assert lut.to_ratio(0.0) == pytest.approx(ratio[0], rel=1e-9)


def test_lut_inverse_clips_and_keeps_dtype_and_nan():
    lut = GdLookupTable(SequenceParameters.myocardial(1.5))
    values = np.array([-1.0, np.nan, 1e6], dtype=np.float32)
    out = lut.to_gd(values)
    assert out.dtype == np.float32
    assert out[0] == 0.0 and np.isnan(out[1]) and out[2] == pytest.approx(lut.gd_max_mmol_l)


def test_non_monotonic_lut_is_refused_with_a_clear_message():
    # T2 shortening makes the SSFP blood signal fall again at high Gd
    with pytest.raises(LookupTableError, match="stops increasing"):
        GdLookupTable(SequenceParameters.myocardial(1.5), "blood", gd_max_mmol_l=40.0)


def test_sequence_parameters_are_validated():
    with pytest.raises(ValueError):
        SequenceParameters(field_strength_t=1.5, readout="epi")
    with pytest.raises(ValueError):
        SequenceParameters(field_strength_t=1.5, unknown=1)
