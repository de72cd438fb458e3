"""Load arrays from the file formats of offline perfusion tools; save maps by file suffix.

Inputs (``load_array``): ``.npy``, ``.npz`` and MATLAB ``.mat`` (v5 via scipy, v7.3 via
h5py) as ``PATH`` or ``PATH:VARIABLE``, Analyze 7.5 (``.hdr``/``.img``) and NIfTI
(``.nii``/``.nii.gz``) via nibabel. Nothing is unpickled. Outputs (``save_map``): ``.npy``,
``.nii``/``.nii.gz`` or a ``.png`` preview with a colour bar.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

INPUT_SUFFIXES = (".npy", ".npz", ".mat", ".hdr", ".img", ".nii", ".nii.gz")
OUTPUT_SUFFIXES = (".npy", ".nii", ".nii.gz", ".png")


class ArrayIOError(ValueError):
    """A file or variable cannot be read or written as requested."""


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def _split_spec(spec: str) -> tuple[Path, str | None]:
    path = Path(spec)
    if path.exists() or ":" not in spec:
        return path, None
    head, variable = spec.rsplit(":", 1)
    return Path(head), variable or None


def _pick(variables: dict[str, np.ndarray], variable: str | None, path: Path) -> np.ndarray:
    if variable is not None:
        if variable not in variables:
            raise ArrayIOError(f"{path} has no variable {variable!r}; it has {sorted(variables)}")
        return variables[variable]
    if len(variables) != 1:
        raise ArrayIOError(f"{path} holds {sorted(variables)}: name one as {path}:VARIABLE")
    return next(iter(variables.values()))


def _load_mat(path: Path, variable: str | None) -> np.ndarray:
    import scipy.io

    try:
        content = scipy.io.loadmat(str(path))
    except NotImplementedError:  # MATLAB v7.3 is HDF5
        import h5py

        with h5py.File(path, "r") as handle:
            names = {key: None for key in handle.keys() if isinstance(handle[key], h5py.Dataset)}
            name = variable if variable is not None else (next(iter(names)) if len(names) == 1 else None)
            if name is None or name not in names:
                raise ArrayIOError(f"{path} holds {sorted(names)}: name one as {path}:VARIABLE") from None
            # h5py sees MATLAB's column-major arrays transposed
            return np.asarray(handle[name]).T
    variables = {key: value for key, value in content.items() if not key.startswith("__")}
    return np.asarray(_pick(variables, variable, path))


def load_array(spec: str) -> np.ndarray:
    """Read ``PATH`` or ``PATH:VARIABLE`` into a numpy array (float64 for numeric data).

    Trailing singleton axes are kept as stored; callers squeeze what they need.
    """
    path, variable = _split_spec(spec)
    if not path.exists():
        raise ArrayIOError(f"input file not found: {path}")
    suffix = _suffix(path)
    if suffix == ".npy":
        array = np.load(path, allow_pickle=False)
    elif suffix == ".npz":
        with np.load(path, allow_pickle=False) as content:
            array = _pick({key: content[key] for key in content.files}, variable, path)
    elif suffix == ".mat":
        array = _load_mat(path, variable)
    elif suffix in (".hdr", ".img", ".nii", ".nii.gz"):
        import nibabel

        array = np.asanyarray(nibabel.load(str(path)).dataobj)
    else:
        raise ArrayIOError(f"unsupported input {path}: expected one of {', '.join(INPUT_SUFFIXES)}")
    array = np.asarray(array)
    if not np.issubdtype(array.dtype, np.number):
        raise ArrayIOError(f"{spec} is not a numeric array (dtype {array.dtype})")
    logger.debug("loaded %s: shape %s", spec, array.shape)
    return array.astype(np.float64)


def save_map(
    path: str | Path,
    array: np.ndarray,
    *,
    title: str = "MBF",
    units: str = "ml/min/g",
    value_range: tuple[float, float] | None = None,
    colormap: str = "jet",
) -> Path:
    """Write a map ``[rows, cols]`` (or any array for .npy/.nii) by the suffix of ``path``.

    ``.png`` draws the map with a colour bar (``value_range`` defaults to 0 and the 99th
    percentile of the finite values; NaN pixels are shown black).
    """
    path = Path(path)
    suffix = _suffix(path)
    data = np.asarray(array)
    if suffix == ".npy":
        np.save(path, data)
    elif suffix in (".nii", ".nii.gz"):
        import nibabel

        nibabel.save(nibabel.Nifti1Image(data.astype(np.float32), np.eye(4)), str(path))
    elif suffix == ".png":
        if data.ndim != 2:
            raise ArrayIOError(f"a PNG preview needs a 2-D map, got shape {data.shape}")
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        finite = data[np.isfinite(data)]
        if value_range is None:
            high = float(np.percentile(finite, 99)) if finite.size else 1.0
            value_range = (0.0, high if high > 0 else 1.0)
        figure, axes = plt.subplots(figsize=(5, 4.2))
        cmap = plt.get_cmap(colormap).with_extremes(bad="black")
        image = axes.imshow(np.ma.masked_invalid(data), cmap=cmap, vmin=value_range[0], vmax=value_range[1])
        axes.set_title(title)
        axes.axis("off")
        figure.colorbar(image, ax=axes, label=units)
        figure.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(figure)
    else:
        raise ArrayIOError(f"unsupported output {path}: expected one of {', '.join(OUTPUT_SUFFIXES)}")
    logger.info("wrote %s", path)
    return path
