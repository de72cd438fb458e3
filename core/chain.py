"""Chain files: a declarative TOML list of gadgets, validated completely when loaded.

Format (``chains/<name>.toml``; docs/server.md has the full description)::

    name = "cartesian-recon"
    description = "multi-coil Cartesian k-space -> magnitude images"
    input = ["acquisition"]          # MRD message types the chain takes: acquisition, image, waveform
    queue_size = 64                  # optional, items per queue between gadgets

    [[gadgets]]
    gadget = "cartesian-recon"       # a registered gadget name
    [gadgets.settings]               # optional; checked against the gadget's pydantic Settings
    coil_combination = "rss"

Validation (before any data is accepted): known top-level keys, every gadget name in the
registry, every setting valid for its gadget, and the item-type flow: every gadget must be
able to receive at least one of the types it accepts from the chain input or an earlier
gadget. Types that reach the end of the chain but cannot be sent to a client are reported as
warnings (the server drops them).
"""

from __future__ import annotations

import logging
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ismrmrd
import pydantic

from perfline.core.gadget import ChainContext, Gadget, GadgetSettings
from perfline.core.items import TextItem
from perfline.core.registry import import_errors, load_gadgets
from perfline.core.runtime import DEFAULT_QUEUE_SIZE, RunningChain, start_chain

logger = logging.getLogger(__name__)

MESSAGE_TYPES: dict[str, type] = {
    "acquisition": ismrmrd.Acquisition,
    "image": ismrmrd.Image,
    "waveform": ismrmrd.Waveform,
}
SENDABLE_TYPES: tuple[type, ...] = (ismrmrd.Image, ismrmrd.Acquisition, ismrmrd.Waveform, TextItem)
CHAIN_SUFFIXES = (".toml", ".xml")
_CHAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_TOP_LEVEL_KEYS = {"name", "description", "input", "queue_size", "gadgets"}
_GADGET_KEYS = {"gadget", "settings"}


class ChainError(ValueError):
    """A chain file is invalid; the message says what was expected and what was found."""


class UnknownChainError(ChainError):
    """No chain of that name exists in the chain directory."""


@dataclass(frozen=True)
class GadgetSpec:
    """One validated step of a chain: the gadget class and its validated settings."""

    gadget: type[Gadget]
    settings: GadgetSettings

    def create(self, context: ChainContext) -> Gadget:
        return self.gadget(self.settings, context)


@dataclass(frozen=True)
class ChainSpec:
    """A validated chain, ready to be instantiated once per connection."""

    name: str
    description: str
    input: tuple[str, ...]
    gadgets: tuple[GadgetSpec, ...]
    queue_size: int = DEFAULT_QUEUE_SIZE
    source: str = "<text>"
    output_types: tuple[type, ...] = ()
    warnings: tuple[str, ...] = ()

    @property
    def input_types(self) -> tuple[type, ...]:
        return tuple(MESSAGE_TYPES[name] for name in self.input)

    def accepts_message(self, item: Any) -> bool:
        return isinstance(item, self.input_types)

    def instantiate(self, context: ChainContext) -> list[Gadget]:
        """New gadget objects (own state) for one connection."""
        return [spec.create(context) for spec in self.gadgets]

    def start(self, context: ChainContext) -> RunningChain:
        """Instantiate the gadgets and start their threads."""
        return start_chain(self.instantiate(context), queue_size=self.queue_size,
                           connection_id=context.connection_id)


def _type_names(types: tuple[type, ...] | list[type] | set[type]) -> str:
    return ", ".join(sorted(t.__name__ for t in types)) or "nothing"


def _describe_settings(settings_model: type[GadgetSettings]) -> str:
    fields = settings_model.model_fields
    if not fields:
        return "none"
    parts = []
    for name, info in fields.items():
        annotation = getattr(info.annotation, "__name__", None) or str(info.annotation)
        parts.append(f"{name} ({annotation}, default {info.default!r})")
    return "; ".join(parts)


def _check_type_flow(input_types: tuple[type, ...], gadgets: list[GadgetSpec],
                     source: str) -> tuple[tuple[type, ...], tuple[str, ...]]:
    flowing: set[type] = set(input_types)
    for position, spec in enumerate(gadgets, start=1):
        accepted = tuple(spec.gadget.accepts)
        consumed = {t for t in flowing if issubclass(t, accepted)}
        if not consumed:
            raise ChainError(
                f"{source}: gadget {position} {spec.gadget.name!r} accepts {_type_names(accepted)} "
                f"but receives only {_type_names(flowing)} from the chain input and earlier gadgets")
        flowing = (flowing - consumed) | set(spec.gadget.output_types(spec.settings))
    unsendable = {t for t in flowing if not issubclass(t, SENDABLE_TYPES)}
    warnings = ()
    if unsendable:
        warnings = (f"{source}: items of type {_type_names(unsendable)} may reach the end of the "
                    f"chain; they cannot be sent to a client and will be dropped",)
    return tuple(sorted(flowing, key=lambda t: t.__name__)), warnings


def parse_chain(text: str, source: str = "<text>") -> ChainSpec:
    """Parse and fully validate a TOML chain.

    Raises:
        ChainError: invalid TOML, unknown key, unknown gadget, invalid setting or type flow.
    """
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        hint = " (this looks like XML; perfline chains are TOML)" if text.lstrip().startswith("<") else ""
        raise ChainError(f"{source}: not a valid TOML chain{hint}: {error}") from error
    unknown = set(document) - _TOP_LEVEL_KEYS
    if unknown:
        raise ChainError(f"{source}: unknown key(s) {sorted(unknown)}; valid keys: {sorted(_TOP_LEVEL_KEYS)}")
    name = document.get("name")
    if not isinstance(name, str) or not name:
        raise ChainError(f"{source}: expected a non-empty string `name`, found {name!r}")
    description = document.get("description", "")
    if not isinstance(description, str):
        raise ChainError(f"{source}: `description` must be a string, found {description!r}")
    inputs = document.get("input")
    if (not isinstance(inputs, list) or not inputs
            or not all(isinstance(i, str) and i in MESSAGE_TYPES for i in inputs)):
        raise ChainError(f"{source}: `input` must be a non-empty list of message types from "
                         f"{sorted(MESSAGE_TYPES)}, found {inputs!r}")
    queue_size = document.get("queue_size", DEFAULT_QUEUE_SIZE)
    if not isinstance(queue_size, int) or isinstance(queue_size, bool) or not 1 <= queue_size <= 100_000:
        raise ChainError(f"{source}: `queue_size` must be an integer in [1, 100000], found {queue_size!r}")
    entries = document.get("gadgets")
    if not isinstance(entries, list) or not entries:
        raise ChainError(f"{source}: expected at least one [[gadgets]] table, found {entries!r}")

    registry = load_gadgets()
    specs: list[GadgetSpec] = []
    for position, entry in enumerate(entries, start=1):
        if not isinstance(entry, dict):
            raise ChainError(f"{source}: gadget {position} must be a table, found {entry!r}")
        unknown = set(entry) - _GADGET_KEYS
        if unknown:
            raise ChainError(f"{source}: gadget {position}: unknown key(s) {sorted(unknown)}; "
                             f"valid keys: {sorted(_GADGET_KEYS)}")
        gadget_name = entry.get("gadget")
        if gadget_name not in registry:
            broken = "".join(f"; module {m!r} failed to import ({e})" for m, e in import_errors.items())
            raise ChainError(f"{source}: gadget {position}: unknown gadget {gadget_name!r}; "
                             f"valid gadgets: {sorted(registry)}{broken}")
        gadget = registry[gadget_name]
        raw_settings = entry.get("settings", {})
        if not isinstance(raw_settings, dict):
            raise ChainError(f"{source}: gadget {gadget_name!r}: `settings` must be a table, "
                             f"found {raw_settings!r}")
        try:
            settings = gadget.Settings.model_validate(raw_settings)
        except pydantic.ValidationError as error:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '<settings>'}: {e['msg']}"
                                 for e in error.errors())
            raise ChainError(f"{source}: gadget {gadget_name!r}: invalid settings ({problems}); "
                             f"valid settings: {_describe_settings(gadget.Settings)}") from error
        specs.append(GadgetSpec(gadget=gadget, settings=settings))

    input_types = tuple(MESSAGE_TYPES[i] for i in inputs)
    output_types, warnings = _check_type_flow(input_types, specs, source)
    for warning in warnings:
        logger.debug(warning)
    return ChainSpec(name=name, description=description, input=tuple(inputs), gadgets=tuple(specs),
                     queue_size=queue_size, source=source, output_types=output_types,
                     warnings=warnings)


def load_chain_file(path: str | Path) -> ChainSpec:
    """Read and validate a chain file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ChainError(f"cannot read chain file {path}: {error}") from error
    return parse_chain(text, source=str(path))


def chain_directory() -> Path:
    """The directory of the shipped chain files (``chains/`` = ``perfline.chains``)."""
    import perfline.chains

    return Path(perfline.chains.__file__).parent


def available_chains(directory: Path | None = None) -> dict[str, Path]:
    """Chain name (file stem) -> path, for every ``*.toml`` file of the chain directory."""
    directory = directory or chain_directory()
    return {path.stem: path for path in sorted(directory.glob("*.toml"))}


def chain_name_from_config(config: str) -> str:
    """The chain name a CONFIG_FILE message asks for: strip NULs, blanks and a .xml/.toml suffix."""
    name = config.strip("\x00").strip()
    for suffix in CHAIN_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name


def resolve_chain(config: str, directory: Path | None = None) -> ChainSpec:
    """Look a chain up by the name a client sent (only names present in the chain directory).

    Raises:
        UnknownChainError: no such chain (the message lists the available ones).
    """
    name = chain_name_from_config(config)
    chains = available_chains(directory)
    if not _CHAIN_NAME.match(name) or name not in chains:
        raise UnknownChainError(f"unknown chain {config.strip(chr(0))!r}; available chains: {sorted(chains)}")
    return load_chain_file(chains[name])
