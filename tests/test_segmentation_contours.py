"""Endo/epi/RV contours of the CNN segmentation as ROI meta on the Gd images.

Three levels: the contour function on a synthetic label map; the ``cnn-segmentation`` gadget
in process on a simulated slice (contours checked against the labels it produced); and end to
end through the MRD server with the ``perfusion`` chain (the Gd images a client receives carry
the same endo/epi borders as the MBF maps, which the report draws from the CNN labels, and they
lie on the phantom's myocardium).
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from perfline.toolbox.sector_contours import parse_roi_meta
from perfline.toolbox.segmentation_post import (ENDO_RGB, EPI_RGB, RV_RGB, mask_outline_xy,
                                                segmentation_contours)

SEED = 2**30 + 11  # outside the CNN's training seeds


def ring_labels(shape=(80, 90), center=(40.0, 45.0)):
    rows, cols = np.indices(shape)
    distance = np.hypot(rows - center[0], cols - center[1])
    labels = np.zeros(shape, np.uint8)
    labels[distance < 10] = 1
    labels[(distance >= 10) & (distance < 16)] = 2
    labels[(np.hypot(rows - center[0], cols - center[1] + 22) < 8) & (labels == 0)] = 3
    return labels


def pixel_of(points_xy: np.ndarray, shape) -> tuple[np.ndarray, np.ndarray]:
    rows = np.clip(np.rint(points_xy[:, 1]).astype(int), 0, shape[0] - 1)
    cols = np.clip(np.rint(points_xy[:, 0]).astype(int), 0, shape[1] - 1)
    return rows, cols


def polygon_area(points_xy: np.ndarray) -> float:
    x, y = points_xy[:, 0], points_xy[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def assert_contours_on_labels(meta, labels: np.ndarray, *, fire: bool) -> None:
    """Closed endo/epi borders on the myocardium of ``labels``, endo inside epi, RV outline
    on the RV border."""
    prefix = "ROI_" if fire else "GT_ROI_"
    parsed = {name: parse_roi_meta(list(meta[prefix + name]), fire=fire)
              for name in ("endo", "epi", "rv")}
    for name, (_, _, points) in parsed.items():
        assert points.shape[0] >= 20, f"{name}: only {points.shape[0]} points"
    myocardium = labels == 2
    for name in ("endo", "epi"):
        points = parsed[name][2]
        assert myocardium[pixel_of(points, labels.shape)].mean() >= 0.95, name
        # one point per 3 degree ray all round: a closed ring
        assert points.shape[0] == 120, f"{name}: {points.shape[0]} rays met the myocardium"
    assert polygon_area(parsed["endo"][2]) < polygon_area(parsed["epi"][2])
    ring_area = polygon_area(parsed["epi"][2]) - polygon_area(parsed["endo"][2])
    assert abs(ring_area - myocardium.sum()) < 0.35 * myocardium.sum()
    rv = parsed["rv"][2]
    assert np.allclose(rv[0], rv[-1])  # closed
    # marching squares: every vertex is half-way between an RV and a non-RV pixel centre
    rv_mask = labels == 3
    floor = pixel_of(np.floor(rv), labels.shape)
    ceil = pixel_of(np.ceil(rv), labels.shape)
    assert np.all(rv_mask[floor] | rv_mask[ceil])
    assert (parsed["endo"][0], parsed["epi"][0], parsed["rv"][0]) == (ENDO_RGB, EPI_RGB, RV_RGB)


def test_contours_of_a_ring_are_closed_and_on_the_labels():
    from perfline.toolbox.sector_contours import fire_roi_meta, gadgetron_roi_meta

    labels = ring_labels()
    contours = segmentation_contours(labels, (40.0, 45.0))
    assert [c.label for c in contours] == ["endo", "epi", "rv"]
    endo, epi = contours[0].points_xy, contours[1].points_xy
    assert np.allclose(np.hypot(endo[:, 0] - 45, endo[:, 1] - 40), 10.0, atol=1.0)
    assert np.allclose(np.hypot(epi[:, 0] - 45, epi[:, 1] - 40), 15.5, atol=1.0)
    for fire, meta in ((True, fire_roi_meta(contours)), (False, gadgetron_roi_meta(contours))):
        assert_contours_on_labels(meta, labels, fire=fire)
    # no RV: endo and epi only
    assert [c.label for c in segmentation_contours(np.where(labels == 3, 0, labels),
                                                   (40.0, 45.0))] == ["endo", "epi"]


def test_mask_outline_closes_at_the_image_edge_and_rejects_empty_masks():
    mask = np.zeros((10, 12), bool)
    mask[:4, :5] = True  # touches two edges
    outline = mask_outline_xy(mask)
    assert np.allclose(outline[0], outline[-1])
    assert outline[:, 0].min() == pytest.approx(-0.5) and outline[:, 1].max() == pytest.approx(3.5)
    assert polygon_area(outline) == pytest.approx(20.0 - 4 / 8)  # 4 x 5 px, corners cut
    with pytest.raises(ValueError, match="non-empty mask"):
        mask_outline_xy(np.zeros((5, 5), bool))


@pytest.fixture(scope="module")
def simulated_slice():
    from perfline.simulator import simulate_image_study

    return simulate_image_study(SEED, n_slices=3, n_frames=48)[1]


def slice_items(slice_):
    """A Gd SliceSeries of the simulated slice and its Gd + AIF-role MRD images."""
    from perfline.gadgets.mrd_images import make_image
    from perfline.gadgets.perfusion_items import ImageGeometry, SliceSeries

    rows, cols = slice_.gd.shape[1:]
    spacing = slice_.pixel_spacing_mm
    geometry = ImageGeometry(field_of_view_mm=(cols * spacing, rows * spacing, 8.0),
                             pixel_spacing_mm=(spacing, spacing))
    times = slice_.time_s[slice_.n_pd_frames:]
    series = SliceSeries(slice_index=2, data=slice_.gd, time_s=times, units="gd_mmol_l",
                         n_pd_frames=0, geometry=geometry)
    images = [make_image(slice_.gd[t], geometry, series_index=10, image_index=t, slice=2,
                         data_role="Gd") for t in range(3)]
    aif = make_image(slice_.gd[0], geometry, series_index=11, image_index=0, slice=0,
                     data_role="AIF")
    return series, images, aif


def test_gadget_puts_contours_of_its_own_labels_on_the_gd_images(simulated_slice):
    from perfline.gadgets.perfusion_items import SliceSegmentation
    from perfline.gadgets.segmentation import CnnSegmentation, SegmentationSettings

    series, images, aif = slice_items(simulated_slice)
    gadget = CnnSegmentation(SegmentationSettings())
    # the images of a slice come before its series (perfusion-series-images, forward=true)
    out = list(gadget.process(iter([images[0], aif, images[1], series, images[2]])))
    assert out[0] is aif  # other roles pass straight through, not held
    assert out[1] is series and isinstance(out[2], SliceSegmentation)
    assert out[3:] == images  # held images follow the segmentation, in order
    labels = out[2].labels
    assert (labels == 2).sum() > 100 and not out[2].flags
    for image in images:
        assert_contours_on_labels(image.meta, labels, fire=True)
        assert_contours_on_labels(image.meta, labels, fire=False)
    assert not any(key.startswith(("ROI_", "GT_ROI_")) for key in aif.meta.keys())
    # the CNN's myocardium is the phantom's (the contours are on the heart, not just on labels)
    truth = simulated_slice.labels == 2
    dice = 2 * (truth & (labels == 2)).sum() / (truth.sum() + (labels == 2).sum())
    assert dice > 0.85


def test_gadget_leaves_images_alone_when_contours_are_off(simulated_slice):
    from perfline.gadgets.segmentation import CnnSegmentation, SegmentationSettings

    series, images, _ = slice_items(simulated_slice)
    before = [dict(image.meta) for image in images]
    gadget = CnnSegmentation(SegmentationSettings(image_contours=False))
    out = list(gadget.process(iter([images[0], series, images[1]])))
    assert out[0] is images[0] and out[1] is series and out[3] is images[1]
    assert [dict(image.meta) for image in images[:2]] == before[:2]


def test_images_of_a_slice_never_segmented_are_sent_without_contours(simulated_slice):
    from perfline.gadgets.segmentation import CnnSegmentation, SegmentationSettings

    _, images, _ = slice_items(simulated_slice)
    out = list(CnnSegmentation(SegmentationSettings()).process(iter(images)))
    assert out == images and "ROI_endo" not in images[0].meta.keys()


@pytest.fixture(scope="module")
def scan(tmp_path_factory: pytest.TempPathFactory):
    from perfline.simulator import mrd, truth
    from perfline.simulator import study as st

    folder = tmp_path_factory.mktemp("contours_chain")
    study = st.sample_study(SEED, kind="stress", n_slices=1, n_frames=30, n_coils=8,
                            acceleration=3, field_strength_t=1.5)
    phantoms = [st.slice_phantom(study, 0)]
    mrd.write_kspace(study, str(folder / "scan.h5"), phantoms=phantoms)
    truth.write_truth(study, str(folder / "truth.h5"), phantoms=phantoms)
    return study, folder / "scan.h5", truth.read_truth(str(folder / "truth.h5"),
                                                        load_series=False)


@pytest.mark.timeout(150)
def test_client_receives_gd_images_with_the_cnn_contours(scan) -> None:
    from perfline.server.client import send_dataset
    from perfline.server.testing import running_server

    _, path, reference = scan
    with running_server() as (host, port):
        results = send_dataset(path, host, port, "perfusion", timeout_s=140,
                               parameters={"scan": "stress"})
    assert results.ok, results.errors
    by_role: dict[str, list] = {}
    for image in results.images:
        by_role.setdefault(image.meta.get("GADGETRON_DataRole"), []).append(image)
    gd, flow = by_role.get("Gd", []), by_role.get("Flow_Map", [])
    assert len(gd) >= 30 and len(flow) == 1  # every frame of the resampled Gd series
    assert not any("ROI_endo" in image.meta.keys() for image in by_role["AIF"])
    # the MBF map's white endo/epi come from the CNN labels (aha-report): the Gd images carry
    # the same borders, so they lie on the CNN myocardium
    myocardium = reference.slices[0].labels == 2
    for image in gd:
        assert image.getHead().slice == 0 and "PERFLINE_SegmentationFlags" not in image.meta.keys()
        for name in ("endo", "epi"):
            _, _, on_gd = parse_roi_meta(list(image.meta[f"GT_ROI_{name}"]), fire=False)
            _, _, on_map = parse_roi_meta(list(flow[0].meta[f"GT_ROI_{name}"]), fire=False)
            assert on_gd.shape == on_map.shape == (120, 2)  # closed: every ray met the ring
            assert np.allclose(on_gd, on_map, atol=0.01)
            # and on the phantom's myocardium (up to the motion-correction reference shift)
            rows, cols = pixel_of(on_gd, myocardium.shape)
            assert ndimage.binary_dilation(myocardium)[rows, cols].mean() > 0.9
        _, _, fire_rv = parse_roi_meta(list(image.meta["ROI_rv"]), fire=True)
        assert np.allclose(fire_rv[0], fire_rv[-1]) and fire_rv.shape[0] > 20


def test_server_warm_up_loads_the_segmentation_model():
    from perfline.gadgets.segmentation import CnnSegmentation, SegmentationSettings

    line = CnnSegmentation.warm_up(SegmentationSettings(runtime="onnxruntime"), chain=None)
    assert line is not None and line.startswith("segmentation model: onnxruntime fp32")
