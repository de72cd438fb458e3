"""numba, when it is installed and enabled: the one place the compiled loops' modules ask.

numba is an optional dependency of the toolbox's compiled loops (``grid_refine``, ``image_warp``,
``box_filter``, ``sense_kernels``); each keeps a numpy / scipy version for when it is missing or
``NUMBA_DISABLE_JIT=1`` is set (the loops would then run as plain Python, far slower than the array
versions).
"""

from __future__ import annotations

from types import ModuleType


def numba_or_none() -> ModuleType | None:
    """The ``numba`` module, or None when it is not installed or its JIT is disabled."""
    try:
        import numba
    except ImportError:  # pragma: no cover - the array versions are used instead
        return None
    return None if numba.config.DISABLE_JIT else numba
