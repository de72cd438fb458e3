"""Chain files: full validation on load, name resolution only through the chain directory."""

from __future__ import annotations

from pathlib import Path

import ismrmrd
import pytest
from pydantic import Field

from perfline.core.chain import (
    ChainError,
    UnknownChainError,
    available_chains,
    chain_name_from_config,
    load_chain_file,
    parse_chain,
    resolve_chain,
)
from perfline.core.gadget import GadgetSettings, PureGadget, register_gadget
from perfline.core.registry import load_gadgets
from perfline.gadgets.perfusion_items import SliceSeries


class _ToSeriesSettings(GadgetSettings):
    factor: float = Field(1.0, gt=0)


@register_gadget
class _ImageToSeries(PureGadget):
    name = "test-image-to-series"
    Settings = _ToSeriesSettings
    accepts = (ismrmrd.Image,)
    produces = (SliceSeries,)


@register_gadget
class _NeedsSeries(PureGadget):
    name = "test-needs-series"
    accepts = (SliceSeries,)
    produces = (ismrmrd.Image,)


def chain_text(*gadgets: str, input: str = '["image"]') -> str:
    return f'name = "t"\ninput = {input}\n' + "".join(f"[[gadgets]]\n{g}\n" for g in gadgets)


def test_shipped_chains_are_valid() -> None:
    chains = available_chains()
    assert {"passthrough", "cartesian-recon"} <= set(chains)
    for path in chains.values():
        spec = load_chain_file(path)
        assert spec.gadgets and spec.input


PREPROCESSING = ("perfusion-recon", "perfusion-moco", "aif-t2star", "surface-coil-correction", "gd-conversion",
                 "temporal-resample")


@pytest.mark.parametrize("other", ["perfusion-map", "perfusion-gd"])
def test_perfusion_chains_share_their_preprocessing_settings(other: str) -> None:
    """The three perfusion chains are edited by hand and each decision run changes `perfusion`: the Gd
    series, the AIF and hence the maps of `perfusion-map` / `perfusion-gd` must come from the same
    preprocessing (settings compared after validation, so a default written out equals one left out)."""
    def steps(name: str) -> dict[str, dict]:
        return {g.gadget.name: g.settings.model_dump() for g in resolve_chain(name).gadgets}

    shipped, variant = steps("perfusion"), steps(other)
    for gadget in PREPROCESSING:
        assert gadget in shipped and gadget in variant, f"{gadget} missing from perfusion or {other}"
        assert variant[gadget] == shipped[gadget], f"{other}: {gadget} settings differ from perfusion's"


def test_valid_chain_with_settings_and_type_flow() -> None:
    spec = parse_chain(chain_text('gadget = "test-image-to-series"\nsettings = { factor = 2.5 }',
                                  'gadget = "test-needs-series"'))
    assert [g.gadget.name for g in spec.gadgets] == ["test-image-to-series", "test-needs-series"]
    assert spec.gadgets[0].settings.factor == 2.5
    assert spec.output_types == (ismrmrd.Image,)
    assert spec.warnings == ()


def test_unknown_gadget_lists_the_valid_ones() -> None:
    with pytest.raises(ChainError, match=r"unknown gadget 'no-such'; valid gadgets: \[.*'passthrough'"):
        parse_chain(chain_text('gadget = "no-such"'))


def test_unknown_setting_lists_the_valid_settings() -> None:
    with pytest.raises(ChainError, match=r"invalid settings \(colour: Extra inputs.*valid settings: factor"):
        parse_chain(chain_text('gadget = "test-image-to-series"\nsettings = { colour = "red" }'))


def test_invalid_setting_value_is_reported() -> None:
    with pytest.raises(ChainError, match="factor: Input should be greater than 0"):
        parse_chain(chain_text('gadget = "test-image-to-series"\nsettings = { factor = -1 }'))


def test_type_flow_gap_is_an_error() -> None:
    with pytest.raises(ChainError, match="'test-needs-series' accepts SliceSeries but receives only Image"):
        parse_chain(chain_text('gadget = "test-needs-series"'))


def test_kspace_chain_fed_images_fails_type_flow() -> None:
    with pytest.raises(ChainError, match="'cartesian-recon' accepts Acquisition but receives only Image"):
        parse_chain(chain_text('gadget = "cartesian-recon"'))


def test_unsendable_output_is_a_warning() -> None:
    spec = parse_chain(chain_text('gadget = "test-image-to-series"'))
    assert spec.warnings and "SliceSeries" in spec.warnings[0]


@pytest.mark.parametrize("text, message", [
    ('name = "t"\ninput = ["image"]\n[[gadgets]]\ngadget = "passthrough"\ncolour = 1\n', r"unknown key\(s\) \['colour'\]"),
    ('name = "t"\ninput = ["kspace"]\n[[gadgets]]\ngadget = "passthrough"\n', "`input` must be a non-empty list"),
    ('name = "t"\ninput = ["image"]\n', "at least one \\[\\[gadgets\\]\\]"),
    ('name = "t"\ninput = ["image"]\nextra = 1\n', r"unknown key\(s\) \['extra'\]"),
    ("<stream><gadget/></stream>", "looks like XML"),
], ids=["gadget-key", "input-type", "no-gadgets", "top-key", "xml"])
def test_structural_errors(text: str, message: str) -> None:
    with pytest.raises(ChainError, match=message):
        parse_chain(text)


@pytest.mark.parametrize("config", ["cartesian-recon", "cartesian-recon.xml", "cartesian-recon.toml",
                                    "cartesian-recon\x00\x00"])
def test_config_names_resolve_with_or_without_suffix(config: str) -> None:
    assert resolve_chain(config).name == "cartesian-recon"


@pytest.mark.parametrize("config", ["../pyproject", "/etc/passwd", "os.system", "no-such-chain"])
def test_only_chain_directory_names_resolve(config: str) -> None:
    with pytest.raises(UnknownChainError, match="available chains: .*passthrough"):
        resolve_chain(config)


def test_chain_name_from_config() -> None:
    assert chain_name_from_config(" passthrough.XML\x00") == "passthrough"


def test_registry_has_the_runtime_gadgets(tmp_path: Path) -> None:
    registry = load_gadgets()
    assert {"passthrough", "cartesian-recon"} <= set(registry)
    file = tmp_path / "mine.toml"
    file.write_text(chain_text('gadget = "passthrough"'))
    assert load_chain_file(file).name == "t"
    with pytest.raises(ChainError, match="cannot read chain file"):
        load_chain_file(tmp_path / "missing.toml")


def test_chains_command_lists_and_validates(tmp_path: Path, capsys) -> None:
    from perfline.cli import main

    main(["chains"])
    listing = capsys.readouterr().out
    assert "cartesian-recon  [acquisition]  cartesian-recon" in listing
    assert "passthrough  (Image -> Image)" in listing
    good = tmp_path / "good.toml"
    good.write_text(chain_text('gadget = "test-image-to-series"'))
    assert main(["chains", "validate", str(good)]) == 0
    output = capsys.readouterr().out
    assert "valid: chain 't'" in output and "warning:" in output
    bad = tmp_path / "bad.toml"
    bad.write_text(chain_text('gadget = "passthrough"\nsettings = { a = 1 }'))
    assert main(["chains", "validate", str(bad)]) == 1
    assert "valid settings: none" in capsys.readouterr().err


def test_settings_can_change_a_gadgets_outputs():
    """perfusion-series-images forwards its series only when asked; the type flow follows."""
    import ismrmrd

    from perfline.core.chain import parse_chain
    from perfline.gadgets.perfusion_items import SliceSeries

    base = 'name = "t"\ninput = ["acquisition"]\n[[gadgets]]\ngadget = "perfusion-recon"\n' \
           '[[gadgets]]\ngadget = "perfusion-series-images"\n'
    plain = parse_chain(base)
    forwarding = parse_chain(base + "[gadgets.settings]\nforward = true\n")
    assert set(plain.output_types) == {ismrmrd.Image}
    assert SliceSeries in forwarding.output_types and forwarding.warnings
