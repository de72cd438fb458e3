"""perfline: an inline analysis server for quantitative myocardial perfusion MRI.

Subpackages (each a top-level folder of the repository):

- ``perfline.core``      gadget contract, chain loader and threaded runtime
- ``perfline.server``    MRD/ISMRMRD TCP framing, server and client
- ``perfline.gadgets``   thin stream adapters over the toolbox
- ``perfline.toolbox``   algorithms on plain numpy arrays (no streams)
- ``perfline.simulator`` numerical perfusion phantom and MRD stream simulator
- ``perfline.models``    segmentation network, shipped weights and inference
- ``perfline.chains``    declarative chain files (TOML)
"""

__version__ = "0.1.0"
