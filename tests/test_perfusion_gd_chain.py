"""End-to-end: the `perfusion-gd` chain over the MRD server on a small simulated scan, and the
errors it sends back for bad input (no PD frames, no AIF series, inconsistent dimensions, NaN)."""

from __future__ import annotations

import dataclasses

import copy
from pathlib import Path

import ismrmrd
import ismrmrd.xsd as xsd
import numpy as np
import pytest
from scipy import ndimage

from perfline.core.gadget import ChainContext
from perfline.gadgets.mrd_images import image_array
from perfline.gadgets.perfusion_items import AifSeries, SliceSeries
from perfline.gadgets.perfusion_recon import PerfusionRecon, PerfusionReconSettings
from perfline.server.client import dataset_items, send_dataset
from perfline.server.testing import running_server
from perfline.simulator import mrd, truth
from perfline.simulator import study as st

N_FRAMES = 30


def _study() -> st.StudyParameters:
    """The small simulated scan of this module (1 slice, 8 coils, R = 3)."""
    return st.sample_study(21, n_slices=1, n_frames=N_FRAMES, n_coils=8, acceleration=3, flow_model="fermi",
                           field_strength_t=1.5)


def _aif_pool() -> np.ndarray:
    """The phantom's LV blood pool in the AIF image, eroded by one pixel (bool [rows, cols])."""
    _, aif_anatomy = st.aif_phantom(_study())
    return ndimage.binary_erosion(aif_anatomy.labels == 1)


@pytest.fixture(scope="module")
def scan(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("perfusion_gd")
    study = _study()
    phantoms = [st.slice_phantom(study, 0)]
    mrd.write_kspace(study, str(folder / "scan.h5"), phantoms=phantoms)
    truth.write_truth(study, str(folder / "truth.h5"), phantoms=phantoms)
    return folder / "scan.h5", folder / "truth.h5"


@pytest.fixture(scope="module")
def acquisitions(scan: tuple[Path, Path]) -> tuple[str, list[ismrmrd.Acquisition]]:
    header_xml, items = dataset_items(scan[0])
    return header_xml, [item for item in items if isinstance(item, ismrmrd.Acquisition)]


def test_recon_gadget_series_and_time_stamps(scan: tuple[Path, Path], acquisitions) -> None:
    header_xml, acqs = acquisitions
    gadget = PerfusionRecon(context=ChainContext(header=xsd.CreateFromDocument(header_xml), header_xml=header_xml))
    outputs = list(gadget.process(iter(acqs)))
    assert isinstance(outputs[0], AifSeries) and isinstance(outputs[1], SliceSeries)  # AIF first
    aif, myo = outputs
    reference = truth.read_truth(str(scan[1]), load_series=False)
    assert aif.data.shape == (2, N_FRAMES + 3, 48, 64) and myo.data.shape == (N_FRAMES + 3, 144, 192)
    assert myo.n_pd_frames == 3 and aif.echo_times_ms == (0.76, 1.76)
    np.testing.assert_allclose(myo.time_s, reference.slices[0].time_s, atol=0.004)
    np.testing.assert_allclose(aif.time_s, reference.aif_time_s, atol=0.004)


def test_recon_span_is_the_common_span_of_its_series(acquisitions) -> None:
    """perfusion-recon tells every series the scan's common SR time span (what temporal-resample
    would compute after collecting them all), so they can be resampled as they arrive."""
    header_xml, acqs = acquisitions
    gadget = PerfusionRecon(context=ChainContext(header=xsd.CreateFromDocument(header_xml), header_xml=header_xml))
    outputs = list(gadget.process(iter(acqs)))
    spans = {item.scan_time_span_s for item in outputs}
    assert len(spans) == 1 and None not in spans
    start = max(float(item.time_s[item.n_pd_frames]) for item in outputs)
    end = min(float(item.time_s[-1]) for item in outputs)
    assert spans.pop() == (start, end)
    # a scan cut inside the last frame: the frame is dropped in the series and in the span
    cut = list(gadget.process(iter(acqs[:-5])))
    assert cut[1].scan_time_span_s[1] == min(float(item.time_s[-1]) for item in cut) < end


def test_streamed_resampling_equals_collected(acquisitions) -> None:
    """temporal-resample with the recon's span: each series leaves as it arrives, on the grid (and
    with the data) the collecting mode gives."""
    from perfline.gadgets.perfusion_preprocessing import ResampleSettings, TemporalResample

    header_xml, acqs = acquisitions
    gadget = PerfusionRecon(context=ChainContext(header=xsd.CreateFromDocument(header_xml), header_xml=header_xml))
    series = [dataclasses.replace(item, data=np.abs(item.data[:1] if isinstance(item, AifSeries) else item.data)
                                  [..., item.n_pd_frames:, :, :].astype(np.float32),
                                  time_s=item.time_s[item.n_pd_frames:], n_pd_frames=0, units="gd_mmol_l")
              for item in gadget.process(iter(acqs))]
    collected = list(TemporalResample(settings=ResampleSettings(stream=False)).process(iter(series)))
    consumed = []

    def arriving():
        for item in series:
            consumed.append(item)
            yield item

    streaming = TemporalResample().process(arriving())
    first = next(streaming)
    assert len(consumed) == 1 and isinstance(first, AifSeries)    # out before the slice arrived
    streamed = [first, *streaming]
    assert len(streamed) == len(collected) == 2
    for a, b in zip(streamed, collected):
        assert type(a) is type(b)
        np.testing.assert_array_equal(a.time_s, b.time_s)
        np.testing.assert_array_equal(a.data, b.data)
        np.testing.assert_array_equal(a.acquired_time_s, b.acquired_time_s)


def test_recon_filter_needs_the_noise_scan(acquisitions, caplog: pytest.LogCaptureFixture) -> None:
    """The low-rank filter is on by default and takes its level from the noise scan; without a
    noise scan it is off (warning) and the slice equals the unfiltered recon."""
    header_xml, acqs = acquisitions
    context = ChainContext(header=xsd.CreateFromDocument(header_xml), header_xml=header_xml)

    def slice_images(settings: PerfusionReconSettings, items: list) -> np.ndarray:
        return list(PerfusionRecon(settings, context=context).process(iter(items)))[1].data

    filtered = slice_images(PerfusionReconSettings(), acqs)
    plain = slice_images(PerfusionReconSettings(denoise_threshold=0.0), acqs)
    body = plain.mean(axis=0) > 0.1 * plain.mean(axis=0).max()
    change = np.linalg.norm((filtered - plain)[:, body]) / np.linalg.norm(plain[:, body])
    assert 0.005 < change < 0.1  # it filters, and only the noise-sized part (measured 0.025)
    no_noise = [a for a in acqs if not a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)]
    assert len(no_noise) < len(acqs)
    with caplog.at_level("WARNING"):
        without = slice_images(PerfusionReconSettings(prewhiten=False), no_noise)
    assert "no noise scan" in caplog.text
    unwhitened = slice_images(PerfusionReconSettings(prewhiten=False, denoise_threshold=0.0), acqs)
    np.testing.assert_allclose(without, unwhitened, rtol=1e-5, atol=1e-6 * float(unwhitened.max()))


def test_recon_balanced_pd_frames_steady_the_aif_pd_frames(acquisitions) -> None:
    """3 PD frames at the AIF's R = 2 sit unequally on the two offsets; calibrated from the time
    average the PD frames of the LV pool alternate with their offset, with the surplus PD frame left out
    of the calibration they do not."""
    header_xml, acqs = acquisitions
    context = ChainContext(header=xsd.CreateFromDocument(header_xml), header_xml=header_xml)
    pool = _aif_pool()
    spread = {}
    for balanced in (False, True):
        aif = list(PerfusionRecon(PerfusionReconSettings(balance_pd_frames=balanced),
                                  context=context).process(iter(acqs)))[0]
        pd_pool = aif.data[0, :3][:, pool].mean(axis=1)
        spread[balanced] = float(np.ptp(pd_pool) / pd_pool.mean())
    # measured 0.30 -> 0.11 (the rest: noise and breathing of the 3 PD frames, and the bolus)
    assert spread[False] > 0.15 and spread[True] < 0.5 * spread[False], spread


def test_recon_fitted_coil_maps_from_the_header_field_of_view(acquisitions) -> None:
    """``coil_map_detail_mm``: band-limited coil maps whose order is the encoded field of view over the length
    (270 x 360 mm at 35 mm: 8 x 10 cycles); the slice stays the ratio maps' image within a few per cent."""
    header_xml, acqs = acquisitions
    header = xsd.CreateFromDocument(header_xml)
    context = ChainContext(header=header, header_xml=header_xml)
    fitted = PerfusionRecon(PerfusionReconSettings(coil_map_detail_mm=35.0, denoise_threshold=0.0), context=context)
    fov = header.encoding[0].encodedSpace.fieldOfView_mm
    assert (float(fov.y), float(fov.x)) == (270.0, 360.0)
    assert fitted._map_fit_order(header.encoding[0]) == (8, 10)
    assert PerfusionRecon(context=context)._map_fit_order(header.encoding[0]) is None  # default: the ratio maps
    images = list(fitted.process(iter(acqs)))[1].data
    unfitted = PerfusionRecon(PerfusionReconSettings(denoise_threshold=0.0), context=context)
    plain = list(unfitted.process(iter(acqs)))[1].data
    body = plain.mean(axis=0) > 0.1 * plain.mean(axis=0).max()
    change = np.linalg.norm((images - plain)[:, body]) / np.linalg.norm(plain[:, body])
    assert 1e-4 < change < 0.05, change  # measured 0.019 (noise and the maps)
    from_pd = PerfusionRecon(PerfusionReconSettings(coil_map_detail_mm=35.0, coil_calibration="time-average+pd",
                                                    denoise_threshold=0.0), context=context)
    pd_images = list(from_pd.process(iter(acqs)))[1].data
    change = np.linalg.norm((pd_images - images)[:, body]) / np.linalg.norm(images[:, body])
    assert 1e-4 < change < 0.08, change  # measured 0.045: the maps from three noisy PD frames, not 63


def test_chain_returns_gd_images(scan: tuple[Path, Path]) -> None:
    with running_server() as (host, port):
        results = send_dataset(scan[0], host, port, "perfusion-gd", timeout_s=120)
    assert results.ok, results.errors
    reference = truth.read_truth(str(scan[1]))
    gd_images = [im for im in results.images if im.meta["GADGETRON_DataRole"] == "Gd"]
    aif_images = [im for im in results.images if im.meta["GADGETRON_DataRole"] == "AIF"]
    assert len(gd_images) == len(aif_images) > 2 * N_FRAMES * 0.8 / 1.0 / 2
    assert all(im.meta["PERFLINE_Units"] == "mmol/L" for im in gd_images)
    times = np.array([float(im.meta["PERFLINE_Time_s"]) for im in gd_images])
    np.testing.assert_allclose(np.diff(times), 0.5, atol=1e-6)
    series = np.stack([image_array(im) for im in gd_images])
    # myocardial Gd against the truth resampled to the same grid (motion present, noisy data)
    sl = reference.slices[0]
    pd = reference.attrs["n_pd_frames"]
    truth_gd = np.stack([np.interp(times, sl.time_s[pd:], sl.gd[pd:, r, c])
                         for r, c in np.argwhere(sl.labels == 2)], axis=1)
    measured = series[:, sl.labels == 2]
    late = truth_gd.mean(axis=1) > 0.3
    assert late.sum() > 5
    ratio = np.median(measured[late], axis=1) / np.median(truth_gd[late], axis=1)
    assert np.all(np.abs(ratio - 1) < 0.25), ratio
    # the AIF series: LV blood pool peak near the truth peak (T2*-corrected, blood LUT)
    aif = np.stack([image_array(im) for im in aif_images])
    assert aif.max() <= 40.01 and np.all(aif >= 0)
    pool = _aif_pool()
    peak = np.median(aif[:, pool], axis=1).max()
    assert abs(peak / np.nanmax(reference.aif_gd) - 1) < 0.2, (peak, np.nanmax(reference.aif_gd))


def _modified_header(header_xml: str, drop: str) -> str:
    header = xsd.CreateFromDocument(header_xml)
    header.userParameters.userParameterLong = [p for p in header.userParameters.userParameterLong
                                               if p.name != drop]
    return xsd.ToXML(header)


def _with_nan(acqs: list[ismrmrd.Acquisition]) -> list[ismrmrd.Acquisition]:
    out = list(acqs)
    index = next(i for i, a in enumerate(out) if a.encoding_space_ref == 0 and a.idx.repetition == 5)
    broken = copy.deepcopy(out[index])
    data = broken.data.copy()
    data[0, 3] = np.nan
    broken.data[:] = data
    out[index] = broken
    return out


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("no-pd", "no PD frames"),
        ("no-aif", "no AIF series"),
        ("missing-lines", "inconsistent dimensions"),
        ("nan", "NaN"),
    ],
    ids=["no-pd-frames", "no-aif-series", "inconsistent-dimensions", "nan"],
)
@pytest.mark.timeout(120)
def test_bad_input_errors_reach_the_client(acquisitions, case: str, match: str) -> None:
    header_xml, acqs = acquisitions
    if case == "no-pd":
        header_xml = _modified_header(header_xml, "NumberOfPDFrames")
    elif case == "no-aif":
        acqs = [a for a in acqs if a.encoding_space_ref != 1]
    elif case == "missing-lines":
        acqs = [a for a in acqs if not (a.encoding_space_ref == 0 and a.idx.repetition == 7
                                        and a.idx.kspace_encode_step_1 < 30)]
    else:
        acqs = _with_nan(acqs)
    with running_server() as (host, port):
        results = send_dataset(iter(acqs), host, port, "perfusion-gd", header_xml=header_xml, timeout_s=60)
    assert results.closed
    assert results.errors and any(match in error for error in results.errors), results.errors
    assert not results.images


def test_recon_gadget_fully_sampled_scan(tmp_path: Path) -> None:
    """R = 1 (AIF R = 1 too): the same gadget reconstructs fully sampled frames."""
    study = st.sample_study(8, n_slices=1, n_frames=10, n_coils=4, acceleration=1, flow_model="fermi")
    mrd.write_kspace(study, str(tmp_path / "full.h5"))
    header_xml, items = dataset_items(tmp_path / "full.h5")
    gadget = PerfusionRecon(context=ChainContext(header=xsd.CreateFromDocument(header_xml), header_xml=header_xml))
    aif, myo = list(gadget.process(item for item in items if isinstance(item, ismrmrd.Acquisition)))
    assert aif.data.shape == (2, 13, 48, 64) and myo.data.shape == (13, 144, 192)
    moving, sens = mrd._coil_series(study, "myocardium", 0, None)  # noqa: SLF001 - noise-free reference
    reference = np.abs(moving[0]) * np.sqrt(np.sum(np.abs(sens) ** 2, axis=0))[None]
    body = reference.mean(axis=0) > 0.05 * reference.mean(axis=0).max()
    error = np.linalg.norm((myo.data - reference)[:, body]) / np.linalg.norm(reference[:, body])
    assert error < 0.1
