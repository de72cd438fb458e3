"""The gadget contract: typed settings, accepted item types and a ``process`` generator.

A gadget is conceptually a coroutine (Gadgetron's Node): it consumes an iterator of the items it
accepts and yields outputs. The runtime (``perfline.core.runtime``) runs each gadget in its own
thread, linked by bounded queues; items whose type a gadget does not accept bypass it unchanged.

Two forms:

- :class:`Gadget` - stateful: implement ``process(items) -> Iterator``; grouping/accumulation
  lives here (e.g. collect all frames of a slice, emit at the end of the scan).
- :class:`PureGadget` - stateless: implement ``process_item(item)`` returning one output,
  ``None`` (drop), or a list/tuple of outputs.

Gadgets are registered by name with :func:`register_gadget`; chain files refer to those
names only. Nothing a client sends is ever imported.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

logger = logging.getLogger(__name__)


class GadgetSettings(BaseModel):
    """Base class of every gadget's settings: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class GadgetError(RuntimeError):
    """A gadget could not process its input; the message says what was expected and found."""


@dataclass(frozen=True)
class ChainContext:
    """What every gadget of one connection may read (never modified by gadgets).

    Attributes:
        header: the parsed MRD XML header (``ismrmrd.xsd.ismrmrdHeader``), or None when the
            client sent none (image-only chains).
        header_xml: the header text as received ("" if none).
        parameters: the JSON object of the optional text message sent right after the header.
        connection_id: short id used in log lines.
        output_dir: server-side directory for files a gadget writes (reports, DICOM), or None.
    """

    header: Any = None
    header_xml: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)
    connection_id: str = "-"
    output_dir: Path | None = None


class Gadget:
    """Base class of stream gadgets.

    Class attributes a subclass sets:
        name: registry name used in chain files (kebab-case, e.g. ``"coil-combine"``).
        Settings: pydantic model (subclass of :class:`GadgetSettings`) of its settings.
        accepts: item types consumed by ``process``; other items pass through untouched.
        produces: item types ``process`` may yield (used to check the chain's type flow).
    """

    name: ClassVar[str] = ""
    Settings: ClassVar[type[GadgetSettings]] = GadgetSettings
    accepts: ClassVar[tuple[type, ...]] = ()
    produces: ClassVar[tuple[type, ...]] = ()

    def __init__(self, settings: GadgetSettings | None = None,
                 context: ChainContext | None = None) -> None:
        self.settings = settings if settings is not None else self.Settings()
        self.context = context if context is not None else ChainContext()
        self.log = logging.LoggerAdapter(
            logging.getLogger(f"perfline.gadget.{self.name}"),
            {"connection": self.context.connection_id},
        )

    @classmethod
    def output_types(cls, settings: GadgetSettings) -> tuple[type, ...]:
        """Item types this gadget yields with ``settings`` (default: ``produces``).

        Override when a setting changes the outputs (e.g. forwarding its input as well).
        """
        return tuple(cls.produces)

    def process(self, items: Iterator[Any]) -> Iterator[Any]:
        """Consume accepted items, yield outputs. Runs in the gadget's own thread."""
        raise NotImplementedError(f"gadget {self.name!r} does not implement process()")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, settings={self.settings!r})"


class PureGadget(Gadget):
    """A stateless gadget: a plain function of one item."""

    def process_item(self, item: Any) -> Any:
        """Return one output, None to drop the item, or a list/tuple of outputs."""
        raise NotImplementedError(f"gadget {self.name!r} does not implement process_item()")

    def process(self, items: Iterator[Any]) -> Iterator[Any]:
        for item in items:
            yield from as_outputs(self.process_item(item))


GADGET_REGISTRY: dict[str, type[Gadget]] = {}


def register_gadget(cls: type[Gadget]) -> type[Gadget]:
    """Class decorator adding a gadget to the registry under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no `name`")
    if not cls.accepts:
        raise ValueError(f"gadget {cls.name!r} declares no accepted item types")
    if not issubclass(cls.Settings, GadgetSettings):
        raise TypeError(f"gadget {cls.name!r}: Settings must subclass GadgetSettings")
    existing = GADGET_REGISTRY.get(cls.name)
    if existing is not None and existing is not cls:
        raise ValueError(f"gadget name {cls.name!r} registered twice ({existing.__name__}, {cls.__name__})")
    GADGET_REGISTRY[cls.name] = cls
    return cls


def accepts_item(gadget: type[Gadget] | Gadget, item: Any) -> bool:
    """True if ``item`` is one of the types ``gadget`` consumes."""
    return isinstance(item, tuple(gadget.accepts))


def as_outputs(result: Any) -> Iterable[Any]:
    """Normalise a ``process_item`` result to an iterable of outputs."""
    if result is None:
        return ()
    if isinstance(result, (list, tuple)):
        return result
    return (result,)
