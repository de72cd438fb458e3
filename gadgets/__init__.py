"""perfline.gadgets: stream adapters around the toolbox algorithms.

``GADGET_MODULES`` is the fixed list of modules the runtime imports to fill the gadget
registry (``perfline.core.registry.load_gadgets``). Nothing a client names is ever imported:
chain files refer to registered gadget names only.
"""

GADGET_MODULES: tuple[str, ...] = (
    "passthrough",
    "cartesian_recon",
    "perfusion_recon",
    "perfusion_preprocessing",
    "mapping",
    "segmentation",
    "report",
    "gadgetron_bridge",
)
