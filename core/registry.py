"""Fill the gadget registry from the fixed module list in ``perfline.gadgets``.

Only the modules named in ``perfline.gadgets.GADGET_MODULES`` are imported, never a name a
client or a chain file gives. A module that is not written yet is skipped; a module that fails
to import is recorded (``import_errors``) so that chains using its gadgets fail with the cause.
"""

from __future__ import annotations

import importlib
import logging
import threading

from perfline.core.gadget import GADGET_REGISTRY, Gadget

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_loaded = False
import_errors: dict[str, str] = {}


def load_gadgets() -> dict[str, type[Gadget]]:
    """Import every gadget module once and return the registry (name -> class)."""
    global _loaded
    with _lock:
        if not _loaded:
            from perfline.gadgets import GADGET_MODULES

            for module in GADGET_MODULES:
                full_name = f"perfline.gadgets.{module}"
                try:
                    importlib.import_module(full_name)
                except ModuleNotFoundError as error:
                    if error.name == full_name:
                        logger.debug("gadget module %s not present, skipped", full_name)
                        continue
                    import_errors[module] = f"{type(error).__name__}: {error}"
                    logger.warning("gadget module %s failed to import: %s", full_name, error)
                except Exception as error:  # noqa: BLE001 - one broken module must not stop the server
                    import_errors[module] = f"{type(error).__name__}: {error}"
                    logger.warning("gadget module %s failed to import: %s", full_name, error)
            _loaded = True
    return dict(GADGET_REGISTRY)
