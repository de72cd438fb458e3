"""aha-report gadget: outputs, files, partial input, perfusion reserve across two scans."""

from __future__ import annotations

import json
import types
from dataclasses import replace

import ismrmrd
import numpy as np
import pydicom
import pytest

from perfline.core.gadget import ChainContext, GadgetError
from perfline.core.items import TextItem
from perfline.core.runtime import GadgetFailed, run_gadgets
from perfline.gadgets.perfusion_items import AifCurve, FlowMaps, ImageGeometry, SliceSegmentation
from perfline.gadgets.report import REPORT_STORE, AhaReportGadget, aif_lv_distance_mm, study_info_from_context
from perfline.toolbox.aha_report import PerfusionReport
from perfline.toolbox.sector_contours import parse_roi_meta

SHAPE = (72, 80)
CENTER = (36.0, 40.0)


def labels() -> np.ndarray:
    rows, cols = np.indices(SHAPE)
    radius = np.hypot(rows - CENTER[0], cols - CENTER[1])
    out = np.zeros(SHAPE, np.uint8)
    out[radius < 9] = 1
    out[(radius >= 9) & (radius < 14)] = 2
    return out


def geometry(index: int) -> ImageGeometry:
    return ImageGeometry(field_of_view_mm=(150.0, 135.0, 8.0), position=(0.0, 0.0, -10.0 + 10.0 * index),
                         pixel_spacing_mm=(1.875, 1.875))


def items(mbf: float, *, slices=(0, 1, 2), segmented=(0, 1, 2), aif: bool = True) -> list:
    out = []
    for index in slices:
        value = np.full(SHAPE, mbf, np.float32)
        out.append(FlowMaps(slice_index=index, model="btex", mbf_ml_min_g=value, geometry=geometry(index),
                            ps_ml_min_g=np.full(SHAPE, 1.3, np.float32), vp=np.full(SHAPE, 0.08, np.float32)))
    for index in segmented:
        out.append(SliceSegmentation(slice_index=index, labels=labels(), rv_insertion_deg=120.0, lv_center_rc=CENTER))
    if aif:
        t = np.arange(60) * 0.5
        out.append(AifCurve(time_s=t, blood_gd_mmol_l=np.exp(-0.5 * ((t - 12) / 2) ** 2) * 4.0, hematocrit=0.42,
                            foot_index=18, peak_index=24, mask=np.ones((4, 4), bool), geometry=geometry(0)))
    return out


def header(patient: str, protocol: str = "perfline_perfusion"):
    return types.SimpleNamespace(subjectInformation=types.SimpleNamespace(patientID=patient),
                                 studyInformation=types.SimpleNamespace(studyInstanceUID="1.2.3", studyID="7"),
                                 measurementInformation=types.SimpleNamespace(protocolName=protocol,
                                                                              seriesDescription="", sequenceName=""),
                                 acquisitionSystemInformation=types.SimpleNamespace(systemFieldStrength_T=1.5))


def run(item_list, *, patient="P1", scan="stress", output_dir=None, **settings):
    context = ChainContext(header=header(patient), parameters={"scan": scan}, output_dir=output_dir)
    gadget = AhaReportGadget(AhaReportGadget.Settings(**settings), context)
    return list(gadget.process(iter(item_list)))


@pytest.fixture(autouse=True)
def empty_store():
    REPORT_STORE.clear()
    yield
    REPORT_STORE.clear()


def split(outputs):
    images = [o for o in outputs if isinstance(o, ismrmrd.Image)]
    texts = [o for o in outputs if isinstance(o, TextItem)]
    return images, texts


def test_outputs_and_meta():
    images, texts = split(run(items(2.5)))
    roles = [ismrmrd.Meta.deserialize(i.attribute_string)["GADGETRON_DataRole"] for i in images]
    assert roles.count("Flow_Map") == 3 and roles.count("PS_Map") == 3 and roles.count("Vascular_Volume_Map") == 3
    assert roles[-1] == "AHA"
    report_image = images[-1]
    assert report_image.image_type == ismrmrd.IMTYPE_RGB and report_image.data.shape[0] == 3
    meta = ismrmrd.Meta.deserialize(images[0].attribute_string)
    sector_keys = sorted(k for k in meta.keys() if k.startswith("ROI_segment"))
    assert sector_keys == [f"ROI_segment_{n:02d}" for n in range(1, 7)]  # slice 0 is basal
    rgb, _, points = parse_roi_meta(list(meta["GT_ROI_segment_04"]), fire=False)
    assert rgb == (0.0, 1.0, 0.0) and points.shape[1] == 2  # RCA green
    assert "GT_ROI_endo" in meta.keys() and "ROI_epi" in meta.keys()
    assert len(texts) == 1
    report = PerfusionReport.model_validate_json(texts[0].text)
    assert report.global_values.mbf_mean_ml_min_g == pytest.approx(2.5)
    assert report.study.patient_id == "P1" and report.study.scan == "stress"
    assert report.aif is not None and report.aif.peak_gd_mmol_l == pytest.approx(4.0, abs=0.01)
    assert [s.level for s in report.slices] == ["basal", "mid", "apical"]
    assert not report.partial


def test_partial_input_is_flagged():
    outputs = run(items(2.0, slices=(0, 1), segmented=(0,), aif=False))
    report = PerfusionReport.model_validate_json(split(outputs)[1][0].text)
    assert report.partial
    assert any("no AIF curve reached the report" in f for f in report.flags)
    assert any("slice 1" in f and "segmentation" in f for f in report.flags)
    assert report.slices[1].failed


def test_aif_from_few_pixels_is_flagged():
    # the fixture's AIF mask has 16 pixels: fine at the default, flagged above that
    fine = PerfusionReport.model_validate_json(split(run(items(2.0)))[1][0].text)
    assert fine.aif.n_pixels == 16 and not any("AIF from only" in f for f in fine.flags)
    REPORT_STORE.clear()
    few = PerfusionReport.model_validate_json(split(run(items(2.0), min_aif_pixels=20))[1][0].text)
    assert any("AIF from only 16 LV blood-pool pixels (fewer than 20)" in f for f in few.flags)


def test_aif_that_does_not_look_like_blood_is_flagged():
    # a first pass over no recirculation (the fixture) is blood; a curve that rises and stays up is the
    # myocardium taken for the LV (simulated rest 2**30+788 before the guard in toolbox.aif)
    fine = PerfusionReport.model_validate_json(split(run(items(2.0)))[1][0].text)
    assert not any("late level" in f for f in fine.flags)
    REPORT_STORE.clear()
    tissue_items = items(2.0)
    aif = tissue_items[-1]
    t = aif.time_s
    rise = np.clip(t - 9.0, 0.0, None)
    tissue = 1.0 - np.exp(-rise / 3.0) + 0.3 * np.exp(-((rise - 4.0) / 2.0) ** 2)  # rises, stays up
    tissue_items[-1] = replace(aif, blood_gd_mmol_l=tissue)
    flagged = PerfusionReport.model_validate_json(split(run(tissue_items))[1][0].text)
    message = [f for f in flagged.flags if "late level" in f]
    assert len(message) == 1 and "AIF peaks only 1." in message[0] and "may hold myocardium" in message[0]


def test_noisy_aif_is_reported_and_flagged():
    # without sample noise (the fixture) the summary has none and no flag; with 0.05 mmol/L per acquired
    # sample (0.9 s apart) of a 4 mmol/L Gaussian bolus the first-pass area's SD is about 1 %, with 0.4 about 8 %
    plain = PerfusionReport.model_validate_json(split(run(items(2.0)))[1][0].text)
    assert plain.aif.first_pass_frame_noise_pct is None and not any("noisy AIF" in f for f in plain.flags)
    for sd, flagged in ((0.05, False), (0.4, True)):
        REPORT_STORE.clear()
        noisy_items = items(2.0)
        aif = noisy_items[-1]
        samples = np.arange(2.0, 29.0, 0.9)
        noisy_items[-1] = replace(aif, sample_time_s=samples,
                                  sample_blood_gd_mmol_l=np.exp(-0.5 * ((samples - 12) / 2) ** 2) * 4.0,
                                  sample_noise_sd_mmol_l=np.full(samples.size, sd), foot_time_s=8.0)
        report = PerfusionReport.model_validate_json(split(run(noisy_items))[1][0].text)
        inside = (samples >= 8.0) & (samples <= samples[np.argmin(np.abs(samples - 12))] + 8.0)  # arrival .. peak + 8 s
        area = np.sum(np.exp(-0.5 * ((samples[inside] - 12) / 2) ** 2) * 4.0 * 0.9)
        expected = 100 * sd * 0.9 * np.sqrt(inside.sum()) / area
        assert report.aif.first_pass_frame_noise_pct == pytest.approx(expected, rel=0.02)
        message = [f for f in report.flags if "noisy AIF" in f]
        assert bool(message) == flagged, report.flags
        if flagged:
            assert f"{expected:.1f} %" in message[0] and "more than 3 %" in message[0]


def test_fit_limit_failures_with_a_small_aif_pool_name_the_aif():
    # held-out stress 2**30+2306 (session 25): an 8-pixel AIF pool about 10 % low at the first pass, every
    # slice with two thirds of its myocardium at the top of the flow grid, no global value
    def report_of(mbf: float, pool: tuple[int, int]):
        REPORT_STORE.clear()
        scan = items(mbf)
        scan[-1] = replace(scan[-1], mask=np.ones(pool, bool))
        return PerfusionReport.model_validate_json(split(run(scan))[1][0].text)

    small_at_limit = report_of(6.0, (2, 4))
    message = [f for f in small_at_limit.flags if "fit limit and the AIF from 8 LV pool pixels" in f]
    assert len(message) == 1 and message[0].startswith("3 of 3 slice(s)") and "check the AIF" in message[0]
    assert small_at_limit.global_values.mbf_ml_min_g is None
    assert not any("fit limit and the AIF" in f for f in report_of(6.0, (4, 4)).flags)  # 16 pixels
    assert not any("fit limit and the AIF" in f for f in report_of(2.0, (2, 4)).flags)  # no slice at the limit
    # a slice that failed for its segmentation (no LV centre) is not counted as a fit-limit failure
    REPORT_STORE.clear()
    scan = items(6.0)
    scan[-1] = replace(scan[-1], mask=np.ones((2, 4), bool))
    scan[3] = replace(scan[3], lv_center_rc=(float("nan"), float("nan")))
    flags = PerfusionReport.model_validate_json(split(run(scan))[1][0].text).flags
    message = [f for f in flags if "fit limit and the AIF from 8 LV pool pixels" in f]
    assert len(message) == 1 and message[0].startswith("2 of 3 slice(s)")


def test_aif_away_from_the_lv_is_flagged():
    # the fixture's AIF (4 x 4 pixels on the image centre) lies 1.3 mm from the CNN's LV centre
    near = PerfusionReport.model_validate_json(split(run(items(2.0)))[1][0].text)
    assert not any("AIF pool centre" in f for f in near.flags)
    REPORT_STORE.clear()
    # a pool on the coarse AIF grid (5.625 mm) 8 pixels up and 8 right of the centre: 64 mm away
    mask = np.zeros((48, 64), bool)
    mask[15:17, 39:41] = True
    aif_geometry = ImageGeometry(field_of_view_mm=(360.0, 270.0, 10.0), position=(0.0, 0.0, -30.0),
                                 pixel_spacing_mm=(5.625, 5.625))
    item_list = [replace(i, mask=mask, geometry=aif_geometry) if isinstance(i, AifCurve) else i
                 for i in items(2.0)]
    far = PerfusionReport.model_validate_json(split(run(item_list))[1][0].text)
    flag = next(f for f in far.flags if "AIF pool centre" in f)
    assert "64 mm from the LV centre" in flag
    assert aif_lv_distance_mm(item_list[-1], {}, {}) is None


def test_no_maps_is_a_clear_error():
    with pytest.raises(GadgetError, match="expected flow maps"):
        run(items(2.0, slices=(), segmented=(0,)))


def test_runs_in_the_runtime():
    context = ChainContext(header=header("P9"), parameters={"scan": "rest"})
    outputs = run_gadgets([AhaReportGadget(context=context)], items(0.8) + ["unrelated item"])
    assert "unrelated item" in outputs
    assert sum(isinstance(o, TextItem) for o in outputs) == 1
    with pytest.raises(GadgetFailed, match="aha-report"):
        run_gadgets([AhaReportGadget(context=context)], ["only other items"])


def test_reserve_from_stress_then_rest(tmp_path):
    run(items(3.0), patient="P1", scan="stress")
    run(items(1.0), patient="OTHER", scan="rest")
    texts = split(run(items(0.75), patient="P1", scan="rest", output_dir=tmp_path))[1]
    report = PerfusionReport.model_validate_json(texts[0].text)
    assert report.reserve is not None
    assert report.reserve.global_mpr == pytest.approx(4.0)
    assert all(s.mpr == pytest.approx(4.0) for s in report.reserve.segments)
    folder = next(tmp_path.iterdir())
    assert json.loads((folder / "report.json").read_text())["reserve"]["global_mpr"] == pytest.approx(4.0)
    assert (folder / "report.png").read_bytes()[:4] == b"\x89PNG"
    mbf = pydicom.dcmread(folder / "dicom" / "mbf_slice1.dcm")
    assert mbf.PatientID == "P1"
    values = mbf.pixel_array * float(mbf.RescaleSlope)
    assert values[int(CENTER[0]), int(CENTER[1])] == pytest.approx(0.75, abs=0.001)
    assert pydicom.dcmread(folder / "dicom" / "report.dcm").PhotometricInterpretation == "RGB"
    assert sorted(p.name for p in (folder / "dicom").iterdir()) == sorted(
        ["report.dcm"] + [f"{m}_slice{i}.dcm" for m in ("mbf", "ps", "vp") for i in range(3)])


def test_scan_kind_from_protocol():
    info = study_info_from_context(header("X", protocol="perf_stress_dual"), {})
    assert info.scan == "stress" and info.field_strength_t == 1.5 and info.study_id == "1.2.3"
    assert study_info_from_context(header("X", protocol="perfusion"), {}).scan == "unknown"
    assert study_info_from_context(None, {"scan": "REST"}).scan == "rest"


# ---------------------------------------------------------------- through a real server session
from perfline.core.gadget import Gadget, GadgetSettings, register_gadget  # noqa: E402


class _ImagesToMapsSettings(GadgetSettings):
    pass


@register_gadget
class _ImagesToMaps(Gadget):
    """Test-only stand-in for recon..segmentation: image k -> FlowMaps + SliceSegmentation of slice k."""

    name = "test-images-to-report-inputs"
    Settings = _ImagesToMapsSettings
    accepts = (ismrmrd.Image,)
    produces = (FlowMaps, SliceSegmentation, AifCurve)

    def process(self, stream):
        for image in stream:
            index = int(image.slice)
            mbf = np.asarray(image.data[0, 0], dtype=np.float32)
            yield FlowMaps(slice_index=index, model="fermi", mbf_ml_min_g=mbf, geometry=geometry(index))
            yield SliceSegmentation(slice_index=index, labels=labels(), rv_insertion_deg=120.0, lv_center_rc=CENTER)
        t = np.arange(40) * 0.5
        yield AifCurve(time_s=t, blood_gd_mmol_l=np.exp(-0.5 * ((t - 10) / 2) ** 2) * 3.5, hematocrit=0.42,
                       foot_index=14, peak_index=20, mask=np.ones((4, 4), bool), geometry=geometry(0))


CHAIN = """
name = "report-test"
input = ["image"]
[[gadgets]]
gadget = "test-images-to-report-inputs"
[[gadgets]]
gadget = "aha-report"
"""


@pytest.mark.parametrize("nul_terminate", [False, True], ids=["mrd-client", "fire-client"])
def test_through_server(tmp_path, nul_terminate):
    from perfline.server.client import send_dataset
    from perfline.server.testing import running_server

    sent = []
    for index in range(3):
        image = ismrmrd.Image.from_array(np.full((1, 1, *SHAPE), 2.0 + index, np.float32))
        image.slice = index
        sent.append(image)
    with running_server(output_dir=tmp_path) as (host, port):
        results = send_dataset(sent, host, port, config_text=CHAIN, nul_terminate=nul_terminate,
                               parameters={"scan": "stress", "patient_id": "SRV"}, timeout_s=60)
    assert results.ok, results.errors
    roles = [ismrmrd.Meta.deserialize(i.attribute_string)["GADGETRON_DataRole"] for i in results.images]
    assert roles == ["Flow_Map"] * 3 + ["AHA"]
    report_image = results.images[-1]
    assert report_image.image_type == ismrmrd.IMTYPE_RGB and report_image.data.shape[:2] == (3, 1)
    meta_report = ismrmrd.Meta.deserialize(report_image.attribute_string)["PERFLINE_Report"]
    report = PerfusionReport.model_validate_json(results.texts[-1].rstrip("\x00"))
    assert PerfusionReport.model_validate_json(meta_report).global_values == report.global_values
    assert report.study.patient_id == "SRV" and report.flow_model == "fermi"
    assert [s.mbf_mean_ml_min_g for s in report.slices] == pytest.approx([2.0, 3.0, 4.0])
    assert report.segment(1).mbf_mean_ml_min_g == pytest.approx(2.0)
    assert report.segment(16).mbf_mean_ml_min_g == pytest.approx(4.0)
    folders = list(tmp_path.iterdir())
    assert len(folders) == 1 and (folders[0] / "dicom" / "mbf_slice2.dcm").exists()


def test_unwritable_output_dir_still_reports(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the output folder should be")
    texts = split(run(items(2.0), output_dir=blocker))[1]
    assert PerfusionReport.model_validate_json(texts[0].text).global_values.mbf_mean_ml_min_g == pytest.approx(2.0)
    assert texts[1].text.startswith("WARNING aha-report: could not write")


def test_client_outputs_leave_before_the_files_are_written(tmp_path):
    """The scanner's maps, report image and JSON are yielded before the server-side files are
    written (latency); the files are complete once the gadget finishes."""
    context = ChainContext(header=header("P1"), parameters={"scan": "stress"}, output_dir=tmp_path)
    outputs = AhaReportGadget(AhaReportGadget.Settings(), context).process(iter(items(2.0)))
    received = []
    for output in outputs:
        received.append(output)
        if isinstance(output, TextItem):
            break
    assert any(isinstance(o, ismrmrd.Image) for o in received)
    assert not list(tmp_path.iterdir())            # nothing written yet: the JSON went first
    assert list(outputs) == []                     # the rest: the files, no more items
    folders = list(tmp_path.iterdir())
    assert len(folders) == 1 and (folders[0] / "report.json").exists() and (folders[0] / "report.png").exists()


def test_nan_centre_gives_no_contours_but_a_report():
    broken = [SliceSegmentation(slice_index=0, labels=labels(), rv_insertion_deg=120.0,
                                lv_center_rc=(float("nan"), float("nan")))]
    outputs = run([i for i in items(2.0, segmented=()) if not isinstance(i, SliceSegmentation)] + broken)
    images, texts = split(outputs)
    meta = ismrmrd.Meta.deserialize(images[0].attribute_string)
    assert not any(k.startswith("ROI_") for k in meta.keys())
    report = PerfusionReport.model_validate_json(texts[0].text)
    assert report.slices[0].failed and report.partial
    assert "no LV centre found" in report.slices[0].flags


def labels_with_rv(anterior_deg: float, inferior_deg: float) -> np.ndarray:
    """The ring of ``labels()`` with an RV blood pool over anterior..inferior (counter-clockwise)."""
    rows, cols = np.indices(SHAPE)
    radius = np.hypot(rows - CENTER[0], cols - CENTER[1])
    angle = np.degrees(np.arctan2(-(rows - CENTER[0]), cols - CENTER[1])) % 360
    out = labels()
    inside = (angle - anterior_deg) % 360 <= (inferior_deg - anterior_deg) % 360
    out[inside & (radius >= 15) & (radius < 22)] = 3
    return out


def test_rv_insertion_placed_across_slices_and_used_for_the_contours():
    # mid's RV reaches 30 degrees further anterior than basal's and the apical's prediction:
    # mid takes basal's insertion (flagged); the segmentation's own value (40 deg) is ignored
    arcs = {0: (120.0, 240.0), 1: (90.0, 240.0), 2: (140.0, 215.0)}
    item_list = [i for i in items(2.5) if not isinstance(i, SliceSegmentation)]
    item_list += [SliceSegmentation(slice_index=k, labels=labels_with_rv(*arc), rv_insertion_deg=40.0,
                                    lv_center_rc=CENTER) for k, arc in arcs.items()]
    images, texts = split(run(item_list))
    report = PerfusionReport.model_validate_json(texts[0].text)
    basal, mid, apical = report.slices
    assert basal.rv_insertion_source == "own" and apical.rv_insertion_source == "own"
    assert abs(basal.rv_insertion_deg - (basal.rv_insertion_own_deg or 0.0)) < 1e-9
    assert abs(((basal.rv_insertion_own_deg or 0.0) + 2.0 - 120.0 + 180) % 360 - 180) < 3.0  # arc end - 2 deg
    assert mid.rv_insertion_source == "other slices" and mid.rv_insertion_deg == pytest.approx(basal.rv_insertion_deg)
    assert abs(((mid.rv_insertion_own_deg or 0.0) + 2.0 - 90.0 + 180) % 360 - 180) < 3.0
    assert any("disagrees" in flag for flag in mid.flags)
    # the mid slice's sector outlines start from the placed insertion, not from its own arc
    meta = ismrmrd.Meta.deserialize(images[3].attribute_string)  # slice 1's Flow_Map (3 maps per slice)
    _, _, points = parse_roi_meta(list(meta["GT_ROI_segment_08"]), fire=False)  # mid anteroseptal: a in [0, 60)
    angles = np.degrees(np.arctan2(-(points[:, 1] - CENTER[0]), points[:, 0] - CENTER[1])) % 360
    relative = (angles - mid.rv_insertion_deg) % 360
    assert np.all((relative < 62.0) | (relative > 358.0))


def test_aif_from_the_lv_hint_region_is_flagged():
    # aif-extract found no enhancing pool at the CNN's LV and took the disc's most enhancing pixels
    from perfline.toolbox.aif import AIF_SOURCE_HINT_REGION, AIF_SOURCE_POOL_AT_HINT

    pooled = [replace(i, source=AIF_SOURCE_POOL_AT_HINT) if isinstance(i, AifCurve) else i for i in items(2.0)]
    report = PerfusionReport.model_validate_json(split(run(pooled))[1][0].text)
    assert not any("LV region of the AIF image" in f for f in report.flags)
    REPORT_STORE.clear()
    hinted = [replace(i, source=AIF_SOURCE_HINT_REGION) if isinstance(i, AifCurve) else i for i in items(2.0)]
    report = PerfusionReport.model_validate_json(split(run(hinted))[1][0].text)
    assert any("AIF from the CNN's LV region of the AIF image" in f for f in report.flags)


def test_small_lv_for_the_aif_resolution_is_flagged():
    # the fixture's LV blood pool: radius 9 px of 1.875 mm (16.9 mm); an AIF grid of 5 mm pixels sees a
    # radius of 3.4 pixels (fine), one of 7.5 mm pixels 2.25 pixels (flagged: mostly partial volume)
    def with_aif_spacing(spacing_mm: float) -> list:
        aif_geometry = ImageGeometry(field_of_view_mm=(360.0, 270.0, 10.0), position=(0.0, 0.0, -10.0),
                                     pixel_spacing_mm=(spacing_mm, spacing_mm))
        return [replace(i, geometry=aif_geometry) if isinstance(i, AifCurve) else i for i in items(2.0)]

    fine = PerfusionReport.model_validate_json(split(run(with_aif_spacing(5.0), min_aif_lv_radius_px=3.0))[1][0].text)
    assert not any("small LV" in f for f in fine.flags)
    REPORT_STORE.clear()
    off = PerfusionReport.model_validate_json(split(run(with_aif_spacing(7.5)))[1][0].text)
    assert not any("small LV" in f for f in off.flags)  # off by default
    REPORT_STORE.clear()
    small = PerfusionReport.model_validate_json(split(run(with_aif_spacing(7.5), min_aif_lv_radius_px=3.0))[1][0].text)
    flag = next(f for f in small.flags if "small LV" in f)
    assert "radius 2.2 AIF pixels" in flag or "radius 2.3 AIF pixels" in flag
