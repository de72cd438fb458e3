"""Shipped network files: safetensors weights, ONNX graph and a JSON sidecar with SHA-256.

A model ``STEM`` is ``STEM.json`` (architecture, training metadata, checksums) plus
``STEM.safetensors`` and/or ``STEM.onnx``. Every load recomputes the SHA-256 of the file and
refuses it when it differs from the sidecar. Neither format can execute code on load.
torch is imported only by the functions that need it (saving, export, torch loading).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

MODELS_DIR = Path(__file__).resolve().parent
# the paper's input, Gd (mmol/L): the model of the inline chain
DEFAULT_MODEL = MODELS_DIR / "resunet_perfusion"
# the same network fine-tuned with wider scale and field-of-view augmentation; better on
# signal-intensity series of the phantom (docs/segmentation.md)
SIGNAL_MODEL = MODELS_DIR / "resunet_perfusion_signal"
UNITS = ("gd", "signal")


def default_model(units: str = "gd") -> Path:
    """Shipped model stem for series in ``units`` ("gd" or "signal")."""
    if units not in UNITS:
        raise ValueError(f"units must be one of {UNITS}, got {units!r}")
    return DEFAULT_MODEL if units == "gd" else SIGNAL_MODEL


class ChecksumError(RuntimeError):
    """A weights file does not match the SHA-256 recorded in its sidecar."""


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_sidecar(stem: Path) -> dict[str, Any]:
    """The JSON sidecar of model ``stem`` (``stem.json``)."""
    path = Path(stem).with_suffix(".json")
    if not path.exists():
        raise FileNotFoundError(f"model sidecar {path} not found")
    return json.loads(path.read_text())


def verified_path(stem: Path, suffix: str) -> Path:
    """Path of ``stem + suffix`` after checking its SHA-256 against the sidecar."""
    stem = Path(stem)
    path = stem.with_suffix(suffix)
    expected = read_sidecar(stem).get("sha256", {}).get(suffix.lstrip("."))
    if expected is None:
        raise ChecksumError(f"{stem.with_suffix('.json')} records no SHA-256 for {path.name}")
    found = sha256_of(path)
    if found != expected:
        raise ChecksumError(f"{path} has SHA-256 {found}, expected {expected}")
    return path


def _write_sidecar(stem: Path, updates: dict[str, Any]) -> None:
    path = Path(stem).with_suffix(".json")
    sidecar = json.loads(path.read_text()) if path.exists() else {}
    checksums = {**sidecar.get("sha256", {}), **updates.pop("sha256", {})}
    sidecar.update(updates)
    sidecar["sha256"] = checksums
    path.write_text(json.dumps(sidecar, indent=2, sort_keys=True) + "\n")


def save_weights(model, stem: Path, *, metadata: dict[str, Any] | None = None) -> Path:
    """Write ``stem.safetensors`` (fp32 state dict) and its sidecar (network config)."""
    from safetensors.torch import save_file

    stem = Path(stem)
    path = stem.with_suffix(".safetensors")
    tensors = {name: tensor.detach().float().contiguous().cpu()
               for name, tensor in model.state_dict().items() if tensor.is_floating_point()}
    save_file(tensors, str(path))
    _write_sidecar(stem, {"network": model.config.model_dump(mode="json"),
                          **(metadata or {}), "sha256": {"safetensors": sha256_of(path)}})
    return path


def load_torch_model(stem: Path = DEFAULT_MODEL):
    """ResUNet in eval mode from verified ``stem.safetensors`` (CPU)."""
    import torch
    from safetensors.torch import load_file

    from perfline.models.resunet import ResUNet, ResUNetConfig

    config = ResUNetConfig(**read_sidecar(stem)["network"])
    model = ResUNet(config)
    tensors = load_file(str(verified_path(stem, ".safetensors")))
    state = model.state_dict()
    missing = [name for name in state if state[name].is_floating_point() and name not in tensors]
    if missing:
        raise KeyError(f"weights {stem} lack {len(missing)} tensors, e.g. {missing[:3]}")
    with torch.no_grad():
        for name, tensor in tensors.items():
            state[name].copy_(tensor)
    return model.eval()


def export_onnx(model, stem: Path, *, opset: int = 17) -> Path:
    """Export ``model`` (eval mode, batch dimension dynamic) to ``stem.onnx``; add its SHA-256
    to the sidecar. Input "series" float32 [batch, frames, 176, 176], output "logits"."""
    import torch

    stem = Path(stem)
    path = stem.with_suffix(".onnx")
    model = model.eval().cpu()
    example = torch.zeros(1, model.config.in_channels, 176, 176)
    torch.onnx.export(model, example, str(path), input_names=["series"],
                      output_names=["logits"], opset_version=opset, dynamo=False,
                      dynamic_axes={"series": {0: "batch"}, "logits": {0: "batch"}})
    _write_sidecar(stem, {"network": model.config.model_dump(mode="json"),
                          "sha256": {"onnx": sha256_of(path)}})
    logger.info("exported %s", path)
    return path
