"""MBF comparison statistics against hand-computed values and scipy."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
from scipy import stats

from perfline.toolbox.mbf_evaluation import (
    EvaluationError, StudyMbf, agreement, angle_difference_deg, bland_altman_plot, compare_mbf, global_from_sectors,
    per_scan_rows, report_from_results, study_mbf_from_report, write_evaluation,
)


def test_agreement_hand_values():
    auto = np.array([1.0, 2.0, 3.0, 4.5])
    truth = np.array([1.1, 1.9, 3.0, 4.0])
    result = agreement(auto, truth)
    diff = auto - truth
    assert result.bias == pytest.approx(diff.mean())
    assert result.sd_difference == pytest.approx(diff.std(ddof=1))
    assert result.limits_of_agreement[1] - result.limits_of_agreement[0] == pytest.approx(2 * 1.96 * diff.std(ddof=1))
    assert result.p_value == pytest.approx(stats.ttest_rel(auto, truth).pvalue)
    assert result.max_abs_relative_error_pct == pytest.approx(12.5)


def test_agreement_detects_bias():
    rng = np.random.default_rng(3)
    truth = rng.uniform(0.5, 3.5, 200)
    unbiased = agreement(truth + rng.normal(0, 0.05, 200), truth)
    biased = agreement(truth * 1.1, truth)
    assert unbiased.p_value > 0.01
    assert biased.p_value < 1e-6 and biased.bias > 0.1
    assert agreement(truth, truth).p_value is None  # identical: the t-test is undefined


def test_agreement_errors():
    with pytest.raises(EvaluationError, match="pair up"):
        agreement(np.ones(3), np.ones(4))
    with pytest.raises(EvaluationError, match="finite"):
        agreement(np.array([1.0, np.nan]), np.ones(2))


def test_angle_difference_wraps():
    np.testing.assert_allclose(angle_difference_deg([359.0, 10.0, 90.0], [1.0, 350.0, 270.0]), [2.0, 20.0, 180.0])


def make_study(rng, scale: float = 1.0, drop: int | None = None) -> tuple[StudyMbf, StudyMbf]:
    truth_segments = rng.uniform(0.6, 3.2, 16)
    auto_segments = truth_segments * scale + rng.normal(0, 0.02, 16)
    if drop is not None:
        auto_segments[drop] = np.nan
    truth = StudyMbf(float(truth_segments.mean()), truth_segments, rv_insertion_deg=(120.0, 118.0, 121.0))
    auto = StudyMbf(float(np.nanmean(auto_segments)), auto_segments, rv_insertion_deg=(122.0, 117.0, 121.5))
    return auto, truth


def test_compare_mbf_pairs_and_missing():
    rng = np.random.default_rng(7)
    pairs = [make_study(rng, drop=15 if i == 0 else None) for i in range(12)]
    result = compare_mbf([a for a, _ in pairs], [t for _, t in pairs])
    assert result.n_studies == 12 and result.n_missing_sectors == 1
    assert result.sector_mbf.n == 12 * 16 - 1
    assert result.global_mbf.n == 12
    assert result.sector_mbf.mean_abs_relative_error_pct < 3.0
    assert result.rv_insertion_abs_error_deg_max == pytest.approx(2.0)
    assert result.rv_insertion_within_5_deg_fraction == pytest.approx(1.0) and result.n_rv_insertion_slices == 36
    with pytest.raises(EvaluationError, match="12 automated and 11"):
        compare_mbf([a for a, _ in pairs], [t for _, t in pairs][:11])


def test_rv_insertion_within_5_deg_counts_missing_slices_as_outside():
    segments = np.full(16, 2.0)
    truth = [StudyMbf(2.0, segments, rv_insertion_deg=(120.0, 120.0, 140.0, 100.0)),
             StudyMbf(2.0, segments, rv_insertion_deg=(10.0, math.nan))]
    auto = [StudyMbf(2.0, segments, rv_insertion_deg=(124.0, 126.0, math.nan, 100.0)),
            StudyMbf(2.0, segments, rv_insertion_deg=(356.0, 30.0))]
    result = compare_mbf(auto, truth)
    # within: 124 vs 120, 100 vs 100; outside: 126 vs 120 (6), missing vs 140, 356 vs 10 (14); no truth: left out
    assert result.n_rv_insertion_slices == 5
    assert result.rv_insertion_within_5_deg_fraction == pytest.approx(2 / 5)
    assert result.rv_insertion_abs_error_deg_max == pytest.approx(14.0)


def test_outputs_written(tmp_path):
    rng = np.random.default_rng(8)
    pairs = [make_study(rng, scale=1.02) for _ in range(6)]
    auto, truth = [a for a, _ in pairs], [t for _, t in pairs]
    paths = write_evaluation(compare_mbf(auto, truth), auto, truth, tmp_path)
    assert [p.name for p in paths] == ["mbf_comparison.json", "mbf_per_scan.json", "bland_altman_global.png",
                                       "bland_altman_sectors.png"]
    rows = json.loads(paths[1].read_text())
    assert len(rows) == 6 and rows[0]["global_error_pct"] == pytest.approx(
        100 * (auto[0].global_mbf / truth[0].global_mbf - 1), abs=0.01)
    assert rows[0]["sectors"] == 16 and rows[0]["flags"] == []
    assert rows[0]["segments_auto"] == pytest.approx(auto[0].segment_mbf, abs=1e-4)
    assert len(rows[0]["segments_true"]) == 16
    failed = StudyMbf(float("nan"), np.full(16, np.nan), label="failed scan")
    row = per_scan_rows([failed], [truth[0]])[0]
    assert row["global_auto"] is None and row["global_error_pct"] is None and row["sectors"] == 0
    for png in paths[2:]:
        assert png.read_bytes()[:4] == b"\x89PNG"
    assert bland_altman_plot(np.ones(3), np.ones(3) * 1.1, tmp_path / "x.png", title="t").exists()


def test_report_json_to_study():
    from perfline.toolbox.aha_report import SliceAnalysis, StudyInfo, build_report

    shape = (64, 64)
    rows, cols = np.indices(shape)
    radius = np.hypot(rows - 32, cols - 32)
    labels = np.where((radius >= 8) & (radius < 14), 2, np.where(radius < 8, 1, 0)).astype(np.uint8)
    slices = [SliceAnalysis(slice_index=i, mbf_ml_min_g=np.full(shape, 2.0 + i, np.float32), labels=labels,
                            lv_center_rc=(32.0, 32.0), rv_insertion_deg=120.0, slice_position_mm=float(i))
              for i in range(2)]  # basal and apical: mid missing
    report = build_report(slices, study=StudyInfo(patient_id="p", scan="stress"))
    texts = ["hello", report.model_dump_json()]
    study = study_mbf_from_report(report_from_results(texts))
    assert study.segment_mbf[0] == pytest.approx(2.0) and study.segment_mbf[13] == pytest.approx(3.0)
    assert np.all(np.isnan(study.segment_mbf[6:12]))
    assert study.rv_insertion_deg == (120.0, 120.0)
    assert all(math.isnan(v) for v in study.rv_insertion_own_deg)  # no placement ran: no own insertion
    assert any("missing levels: mid" in flag for flag in study.flags)
    with pytest.raises(EvaluationError, match="no report JSON"):
        report_from_results(["ERROR something", "{}"])


def test_global_is_the_pixel_weighted_mean_of_sector_medians():
    # a defect in 2 of the 6 mid sectors: the median over all pixels is the normal value, the
    # target (mean MBF of the myocardium) lies between; the sectors are homogeneous
    from perfline.toolbox.aha import aha_segment_map
    from perfline.toolbox.aha_report import SliceAnalysis, build_report

    shape = (64, 64)
    rows, cols = np.indices(shape)
    radius = np.hypot(rows - 32, cols - 32)
    labels = np.where((radius >= 8) & (radius < 14), 2, np.where(radius < 8, 1, 0)).astype(np.uint8)
    segments = aha_segment_map(labels == 2, (32.0, 32.0), 120.0, "mid")
    mbf = np.where(np.isin(segments, (7, 8)), 1.0, 3.0).astype(np.float32)
    report = build_report([SliceAnalysis(slice_index=0, mbf_ml_min_g=mbf, labels=labels, lv_center_rc=(32.0, 32.0),
                                         rv_insertion_deg=120.0)], levels=["mid"])
    study = study_mbf_from_report(report.model_dump_json())
    counts = np.array([s.n_pixels for s in report.segments[6:12]], dtype=np.float64)
    expected = (counts[:2].sum() * 1.0 + counts[2:].sum() * 3.0) / counts.sum()
    assert report.global_values.mbf_median_ml_min_g == pytest.approx(3.0)
    assert study.global_mbf == pytest.approx(expected)
    assert study.global_mbf == pytest.approx(report.global_values.mbf_ml_min_g)
    older = json.loads(report.model_dump_json())
    older["global_values"]["mbf_ml_min_g"] = None  # a schema-1.0 report: computed from its sectors
    assert study_mbf_from_report(older).global_mbf == pytest.approx(expected)
    assert 1.5 < study.global_mbf < 2.7
    assert study_mbf_from_report(report.model_dump_json(), statistic="mean").global_mbf == pytest.approx(
        report.global_values.mbf_mean_ml_min_g)
    assert np.isnan(global_from_sectors(np.full(16, np.nan), np.ones(16)))
    assert global_from_sectors(np.r_[2.0, np.nan, 4.0], np.r_[1, 5, 3]) == pytest.approx(3.5)


def test_truth_from_simulator():
    study_module = pytest.importorskip("perfline.simulator.study")
    from perfline.toolbox.mbf_evaluation import truth_from_simulator

    study = study_module.sample_study(123, kind="rest", n_frames=10, n_coils=2)
    truth = truth_from_simulator(study)
    assert truth.segment_mbf.shape == (16,) and np.all(np.isfinite(truth.segment_mbf))
    assert truth.segment_mbf.min() <= truth.global_mbf <= truth.segment_mbf.max()
    assert 0.2 < truth.global_mbf < 2.5  # rest MBF
    assert len(truth.rv_insertion_deg) == 3


def test_truth_carries_the_report_statistic_of_the_true_map():
    """The report's statistic on the TRUE map equals the mean where the MBF is uniform within sectors, and not
    where a defect covers part of a sector: that gap is the statistic's, not the chain's."""
    study_module = pytest.importorskip("perfline.simulator.study")
    from perfline.toolbox.mbf_evaluation import truth_from_simulator

    plain = study_module.sample_study(101, kind="stress", n_frames=10, n_coils=2)
    with_defect = study_module.sample_study(105, kind="stress", n_frames=10, n_coils=2)
    assert not plain.perfusion.defects and [d.transmural_extent for d in with_defect.perfusion.defects] == [1.0]
    for study, small in ((plain, True), (with_defect, False)):
        truth = truth_from_simulator(study)
        global_gap = abs(truth.statistic_global_mbf / truth.global_mbf - 1.0) * 100.0
        sector_gap = np.nanmax(np.abs(truth.statistic_segment_mbf / truth.segment_mbf - 1.0)) * 100.0
        if small:
            assert global_gap < 0.3 and sector_gap < 1.0
        else:
            assert global_gap > 2.0 and sector_gap > 10.0


def test_compare_mbf_reports_the_statistic_floor_only_when_the_truth_has_it():
    rng = np.random.default_rng(11)
    pairs = [make_study(rng) for _ in range(4)]
    autos, truths = [a for a, _ in pairs], [t for _, t in pairs]
    assert compare_mbf(autos, truths).statistic_floor_global_mean_abs_pct is None
    scaled = [replace(t, statistic_global_mbf=t.global_mbf * (1.1 if i % 2 else 0.98),
                      statistic_segment_mbf=np.asarray(t.segment_mbf) * 1.05) for i, t in enumerate(truths)]
    result = compare_mbf(autos, scaled)
    assert result.statistic_floor_global_mean_abs_pct == pytest.approx(6.0)
    assert result.statistic_floor_sector_mean_abs_pct == pytest.approx(5.0)
    rows = per_scan_rows(autos, scaled)
    assert [r["statistic_floor_global_error_pct"] for r in rows] == [-2.0, 10.0, -2.0, 10.0]


# ------------------------------------------------- the end-to-end loop with a stand-in chain
import ismrmrd  # noqa: E402

from perfline.core.gadget import Gadget, GadgetSettings, register_gadget  # noqa: E402
from perfline.gadgets.perfusion_items import FlowMaps, ImageGeometry, SliceSegmentation  # noqa: E402
from perfline.toolbox.mbf_evaluation import SimulatedStudy, evaluate_studies  # noqa: E402

SHAPE = (64, 64)
SEEN_PARAMETERS: list[dict] = []  # the JSON parameters each stand-in chain received


def ring_labels() -> np.ndarray:
    rows, cols = np.indices(SHAPE)
    radius = np.hypot(rows - 32, cols - 32)
    return np.where((radius >= 9) & (radius < 15), 2, np.where(radius < 9, 1, 0)).astype(np.uint8)


class _StandInSettings(GadgetSettings):
    pass


@register_gadget
class _StandInMapping(Gadget):
    """Test-only: each image (slice k) is already an MBF map; adds the true segmentation."""

    name = "test-mbf-evaluation-stand-in"
    Settings = _StandInSettings
    accepts = (ismrmrd.Image,)
    produces = (FlowMaps, SliceSegmentation)

    def process(self, stream):
        SEEN_PARAMETERS.append(dict(self.context.parameters))
        for image in stream:
            index = int(image.slice)
            geometry = ImageGeometry(field_of_view_mm=(64.0, 64.0, 8.0), position=(0.0, 0.0, 10.0 * index))
            yield FlowMaps(slice_index=index, model="fermi", geometry=geometry,
                           mbf_ml_min_g=np.asarray(image.data[0, 0], dtype=np.float32))
            yield SliceSegmentation(slice_index=index, labels=ring_labels(), rv_insertion_deg=120.0,
                                    lv_center_rc=(32.0, 32.0))


def test_evaluate_studies_end_to_end(tmp_path):
    chain_dir = tmp_path / "chains"
    chain_dir.mkdir()
    (chain_dir / "perfusion.toml").write_text(
        'name = "perfusion"\ninput = ["image"]\n[[gadgets]]\ngadget = "test-mbf-evaluation-stand-in"\n'
        '[[gadgets]]\ngadget = "aha-report"\n')

    def simulate(index: int, scan: str, directory):
        level_mbf = (3.0 + 0.1 * index, 2.5, 2.0) if scan == "stress" else (0.8, 0.7, 0.6)
        images = []
        for slice_index, value in enumerate(level_mbf):
            noise = np.random.default_rng([index, slice_index]).normal(0, 0.02, SHAPE)
            image = ismrmrd.Image.from_array((value + noise).astype(np.float32)[None, None])
            image.slice = slice_index
            images.append(image)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{scan}.h5"
        dataset = ismrmrd.Dataset(str(path), "dataset", create_if_needed=True)
        for image in images:
            dataset.append_image("images_0", image)
        dataset.close()
        segments = np.array([level_mbf[0]] * 6 + [level_mbf[1]] * 6 + [level_mbf[2]] * 4)
        labels = ring_labels() == 2
        truth_global = float(np.mean([v for v in level_mbf for _ in range(int(labels.sum()))]))
        truth = StudyMbf(truth_global, segments, rv_insertion_deg=(121.0, 121.0, 121.0))
        return SimulatedStudy(mrd_path=path, truth=truth, scan=scan, patient_id=f"sim-{index}",
                              hematocrit=0.38 + 0.01 * index)

    from perfline.gadgets.report import REPORT_STORE

    REPORT_STORE.clear()
    SEEN_PARAMETERS.clear()
    automated, truth = evaluate_studies(3, simulate, tmp_path / "studies", chain_dir=chain_dir, timeout_s=60)
    assert not list((tmp_path / "studies").rglob("*.h5"))  # each scan's file removed once analysed
    kept = json.loads((tmp_path / "studies" / "study_002" / "stress_report.json").read_text())
    assert kept["global_values"]["mbf_ml_min_g"] == pytest.approx(automated[4].global_mbf)  # the report, kept
    # the simulated hematocrit reaches the chain as the JSON parameter ("lab value known")
    assert [p.get("hematocrit") for p in SEEN_PARAMETERS] == pytest.approx([0.38, 0.38, 0.39, 0.39, 0.40, 0.40])
    SEEN_PARAMETERS.clear()
    evaluate_studies(1, simulate, tmp_path / "studies_default", chain_dir=chain_dir, timeout_s=60,
                     scans=("rest",), lab_hematocrit=False, keep_kspace=True)
    assert (tmp_path / "studies_default" / "study_000" / "rest.h5").is_file()
    assert len(SEEN_PARAMETERS) == 1 and "hematocrit" not in SEEN_PARAMETERS[0]
    REPORT_STORE.clear()
    assert len(automated) == len(truth) == 6
    assert automated[1].label == truth[1].label == "study 0 rest sim-0"
    result = compare_mbf(automated, truth)
    assert result.global_mbf.mean_abs_relative_error_pct < 1.0
    assert result.sector_mbf.max_abs_relative_error_pct < 2.0
    assert result.n_missing_sectors == 0
    assert result.rv_insertion_abs_error_deg_max == pytest.approx(1.0)


def test_evaluate_mbf_rejects_a_chain_directory_without_the_perfusion_chain(tmp_path):
    import argparse

    from perfline.toolbox.mbf_evaluation import run

    (tmp_path / "other.toml").write_text('name = "other"\n')
    args = argparse.Namespace(studies=2, first_seed=None, out=tmp_path / "out", json=None, lab_hematocrit=True,
                              chains=tmp_path)
    with pytest.raises(EvaluationError, match="perfusion.toml"):
        run(args)
    assert not (tmp_path / "out").exists()
