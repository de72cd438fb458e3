"""Generic items that flow through chains besides the ismrmrd objects.

The MRD objects themselves (``ismrmrd.Acquisition``, ``ismrmrd.Image``, ``ismrmrd.Waveform``)
are items too; chain-specific items live next to their gadgets (e.g.
``perfline.gadgets.perfusion_items``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TextItem:
    """A text message for the client (MRD message id 5), e.g. a JSON report."""

    text: str
