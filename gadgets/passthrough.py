"""``passthrough``: echo MRD images unchanged (proves the runtime and the protocol)."""

from __future__ import annotations

import ismrmrd

from perfline.core.gadget import GadgetSettings, PureGadget, register_gadget


class PassthroughSettings(GadgetSettings):
    """No settings."""


@register_gadget
class Passthrough(PureGadget):
    """Return each image as received."""

    name = "passthrough"
    Settings = PassthroughSettings
    accepts = (ismrmrd.Image,)
    produces = (ismrmrd.Image,)

    def process_item(self, item: ismrmrd.Image) -> ismrmrd.Image:
        return item
