"""Start-up warm-up: BTEX residue tables prepared before the first scan, never blocking serving."""

from __future__ import annotations

import threading
import time

import ismrmrd
import numpy as np
import pytest

from perfline.core.chain import chain_directory, load_chain_file
from perfline.core.gadget import Gadget, GadgetSettings, register_gadget
from perfline.gadgets import mapping
from perfline.gadgets.mapping import FlowMap, FlowMapSettings
from perfline.server.client import send_dataset
from perfline.server.testing import running_server
from perfline.toolbox import btex, flow_models

SMALL = btex.BtexSettings(fp_steps=3, ps_steps=3, vp_steps=3, visf_steps=3)


def test_warm_residue_tables_stores_the_power_of_two_table_the_fit_then_reuses(tmp_path, monkeypatch):
    monkeypatch.setenv(btex.CACHE_DIR_ENV, str(tmp_path))
    spent = btex.warm_residue_tables(0.5, SMALL, lengths=(20,))
    assert list(spent) == [32] and spent[32] >= 0.0
    assert len(list(tmp_path.glob("btex_residues_32_*.npy"))) == 1
    hits = btex._padded_residue_table.cache_info().hits
    table = btex.residue_table(20, 0.5, SMALL)  # a 20-sample scan: the warmed 32 table, from memory
    assert btex._padded_residue_table.cache_info().hits == hits + 1
    fp, ps, vp, visf = (a.ravel() for a in np.meshgrid(*SMALL.axes(), indexing="ij"))
    direct = flow_models.hat_weights_btex(32, 0.5, fp, ps, vp, visf).reshape(*table.shape[:-1], 32)
    np.testing.assert_allclose(table, direct[..., :20], rtol=1e-12, atol=1e-15)
    stop = threading.Event()
    stop.set()
    assert btex.warm_residue_tables(0.5, SMALL, lengths=(40,), stop=stop) == {}


def test_flow_map_warms_the_chain_grid_with_its_own_btex_settings(monkeypatch):
    calls = []
    monkeypatch.setattr(mapping, "warm_residue_tables",
                        lambda dt_s, settings, stop=None, lengths=None: calls.append((dt_s, settings, lengths))
                        or {128: 0.1})
    chain = load_chain_file(chain_directory() / "perfusion.toml")
    (flow_spec,) = [spec for spec in chain.gadgets if spec.gadget is FlowMap]
    line = FlowMap.warm_up(flow_spec.settings, chain)
    # the shipped chain's sampled AIF table (aif_upsample = 4): the 0.5 s grid's tables 4x finer and longer
    upsample = flow_spec.settings.aif_upsample
    assert upsample == 4
    assert calls == [(0.5 / upsample, btex.BtexSettings(vp_range=(0.02, 0.32), vp_steps=21, prior_vp_sd=0.1),
                      tuple(upsample * n for n in mapping.WARM_LENGTHS))]
    assert "128 samples" in line
    calls.clear()
    FlowMap.warm_up(flow_spec.settings.model_copy(update={"aif_upsample": 1}), chain)
    assert calls == [(0.5, btex.BtexSettings(vp_range=(0.02, 0.32), vp_steps=21, prior_vp_sd=0.1), None)]
    calls.clear()
    # Fermi needs no residue table; a chain without temporal-resample has no known grid
    assert FlowMap.warm_up(FlowMapSettings(model="fermi"), chain) is None
    assert FlowMap.warm_up(flow_spec.settings, object()) is None
    assert calls == []


def test_motion_correction_warms_its_warp_loops_unless_off(monkeypatch):
    from perfline.gadgets.perfusion_preprocessing import MotionCorrectionSettings, PerfusionMotionCorrection
    from perfline.toolbox import image_warp

    calls = []
    monkeypatch.setattr(image_warp, "warm_compiled_warp", lambda: calls.append(1) or 0.25)
    chain = load_chain_file(chain_directory() / "perfusion.toml")
    (moco_spec,) = [spec for spec in chain.gadgets if spec.gadget is PerfusionMotionCorrection]
    assert PerfusionMotionCorrection.warm_up(moco_spec.settings, chain) == "motion-correction warp loops: 0.25 s"
    assert PerfusionMotionCorrection.warm_up(MotionCorrectionSettings(enabled=False), chain) is None
    assert calls == [1]


def test_recon_warms_its_unfolding_loops(monkeypatch):
    from perfline.gadgets.perfusion_recon import PerfusionRecon, PerfusionReconSettings
    from perfline.toolbox import sense_kernels

    calls = []
    monkeypatch.setattr(sense_kernels, "warm_compiled_unfolding", lambda: calls.append(1))
    line = PerfusionRecon.warm_up(PerfusionReconSettings(), object())
    assert line.startswith("SENSE unfolding loops: ") and calls == [1]


WARM_CALLS: list[tuple[str, str]] = []
RELEASE = threading.Event()


class _SlowWarmSettings(GadgetSettings):
    label: str = "x"


@register_gadget
class _SlowWarm(Gadget):
    """Test-only passthrough whose warm-up blocks until the test releases it."""

    name = "test-slow-warm-up"
    Settings = _SlowWarmSettings
    accepts = (ismrmrd.Image,)
    produces = (ismrmrd.Image,)

    def process(self, items):
        yield from items

    @classmethod
    def warm_up(cls, settings, chain, stop=None):
        WARM_CALLS.append((settings.label, chain.name))
        RELEASE.wait(30.0)
        return "done"


@pytest.mark.timeout(60)
def test_server_serves_while_warming_up_and_warms_every_chain(tmp_path):
    chain_dir = tmp_path / "chains"
    chain_dir.mkdir()
    (chain_dir / "slow.toml").write_text('name = "slow"\ninput = ["image"]\n[[gadgets]]\n'
                                         'gadget = "test-slow-warm-up"\n[gadgets.settings]\nlabel = "a"\n')
    image = ismrmrd.Image.from_array(np.ones((1, 1, 4, 4), dtype=np.float32))
    path = tmp_path / "in.h5"
    dataset = ismrmrd.Dataset(str(path), "dataset", create_if_needed=True)
    dataset.append_image("images_0", image)
    dataset.close()
    RELEASE.clear()
    WARM_CALLS.clear()
    with running_server(chain_dir=chain_dir, warm_up=True) as (host, port):
        for _ in range(200):  # the warm-up thread reaches the gadget and blocks there
            if WARM_CALLS:
                break
            time.sleep(0.05)
        assert WARM_CALLS == [("a", "slow")]
        results = send_dataset(path, host, port, "slow", timeout_s=30)  # served while the warm-up blocks
        assert results.ok, results.errors
        assert len(results.images) == 1
        RELEASE.set()
    RELEASE.set()


@pytest.mark.timeout(60)
def test_running_server_can_wait_for_the_warm_up(tmp_path):
    """``wait_for_warm_up`` (perfline demo, evaluate --mbf): the context opens only after the
    warm-up thread has finished."""
    chain_dir = tmp_path / "chains"
    chain_dir.mkdir()
    (chain_dir / "slow.toml").write_text('name = "slow"\ninput = ["image"]\n[[gadgets]]\n'
                                         'gadget = "test-slow-warm-up"\n[gadgets.settings]\nlabel = "b"\n')
    WARM_CALLS.clear()
    RELEASE.clear()
    releaser = threading.Timer(0.5, RELEASE.set)
    releaser.start()
    started = time.perf_counter()
    with running_server(chain_dir=chain_dir, warm_up=True, wait_for_warm_up=True):
        waited = time.perf_counter() - started
        assert WARM_CALLS == [("b", "slow")]
        assert RELEASE.is_set() and waited >= 0.4
    releaser.cancel()
    RELEASE.set()


def test_warm_up_is_on_for_serve_and_off_for_test_servers(tmp_path):
    from perfline.cli import build_parser
    from perfline.server.server import MRDServer, ServerSettings

    assert ServerSettings().warm_up
    assert not build_parser().parse_args(["serve", "--no-warm-up"]).warm_up
    server = MRDServer(ServerSettings(port=0, chain_dir=tmp_path, warm_up=False))
    server.start()
    try:
        assert server.warm_up_thread is None
    finally:
        server.stop(timeout=5.0)


def test_report_warm_up_renders_once_and_keeps_nothing():
    """aha-report's warm-up builds and renders a synthetic report (matplotlib loaded before the first scan)
    without storing it for a perfusion reserve or writing files."""
    import sys

    from perfline.gadgets.report import REPORT_STORE, AhaReportGadget

    REPORT_STORE.clear()
    line = AhaReportGadget.warm_up(AhaReportGadget.Settings(), object())
    assert line is not None and "rendered" in line
    assert "matplotlib.backends.backend_agg" in sys.modules
    assert not REPORT_STORE._reports
    stop = threading.Event()
    stop.set()
    assert AhaReportGadget.warm_up(AhaReportGadget.Settings(), object(), stop) is None
