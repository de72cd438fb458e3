"""Run a perfline chain as a Gadgetron external Python node.

Gadgetron (>= 4) starts external Python steps of a chain XML with the ``gadgetron`` package::

    python -m gadgetron PORT perfline.gadgets.gadgetron_bridge perfusion

The package connects back to Gadgetron on PORT, reads the step's ``<configuration>`` (CONFIG
message) and the MRD header, and calls the target with its :class:`gadgetron.external.Connection`.
The targets here (:func:`perfusion`, :func:`passthrough`, :func:`chain`) run one perfline chain
from ``chains/`` on the items of that connection and send every output back to Gadgetron:
images, acquisitions and waveforms with the package's writers, text items (the report JSON,
errors) as MRD text messages (id 5, uint32 length, UTF-8).

The chain name is fixed by the target, or for :func:`chain` read from the configuration property
``chain``; it is looked up only among the chain files shipped in ``chains/`` (never imported).
Other properties: ``text_messages`` ("send", the default, or "drop": a Gadgetron whose chain
has no reader for text coming back from an external step should drop them; the report JSON also
travels in the report image's meta ``PERFLINE_Report``), ``parameters`` (a JSON object, like the client parameters after the header) and
``output_dir`` (server-side output folder of the report gadget; only when the environment
variable ``PERFLINE_GADGETRON_OUTPUT_ROOT`` is set, and then only inside that folder).

Errors (unknown chain, a failing gadget, an item the chain does not take) are sent as a text
message ``[perfline gadgetron_bridge] ERROR: ...``; the bridge then reads the remaining input
until Gadgetron closes the stream, so Gadgetron is never left waiting.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import threading
from pathlib import Path
from typing import Any

import ismrmrd

from perfline.core.gadget import ChainContext
from perfline.core.items import TextItem

logger = logging.getLogger(__name__)

MESSAGE_TEXT = 5
OUTPUT_ROOT_ENV = "PERFLINE_GADGETRON_OUTPUT_ROOT"
ERROR_PREFIX = "[perfline gadgetron_bridge] ERROR: "


class BridgeError(RuntimeError):
    """The Gadgetron connection or its configuration cannot be served."""


def config_properties(config: Any) -> dict[str, str]:
    """``{name: value}`` of the ``<property name=".." value=".."/>`` elements of the step's configuration.

    ``config`` is the parsed XML element the ``gadgetron`` package gives (None if it did not parse).
    """
    if config is None:
        return {}
    properties = {}
    for element in config.iter("property"):
        name = element.get("name")
        if name:
            properties[name] = element.get("value", element.text or "")
    return properties


def write_text(destination: Any, item: TextItem) -> None:
    """Serialise a text item as an MRD text message onto the package's socket wrapper."""
    data = item.text.encode("utf-8")
    destination.write(struct.pack("<HI", MESSAGE_TEXT, len(data)) + data)


def _output_dir(properties: dict[str, str]) -> Path | None:
    requested = properties.get("output_dir")
    root = os.environ.get(OUTPUT_ROOT_ENV)
    if not requested or not root:
        return None
    root_path = Path(root).resolve()
    path = (root_path / requested).resolve()
    if path != root_path and root_path not in path.parents:
        raise BridgeError(f"output_dir must lie inside {root_path}, got {requested!r}")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _parameters(properties: dict[str, str]) -> dict[str, Any]:
    text = properties.get("parameters", "")
    if not text.strip():
        return {}
    try:
        parameters = json.loads(text)
    except json.JSONDecodeError as error:
        raise BridgeError(f"property 'parameters' must be a JSON object: {error}") from error
    if not isinstance(parameters, dict):
        raise BridgeError(f"property 'parameters' must be a JSON object, got {type(parameters).__name__}")
    return parameters


def _drain(connection: Any) -> None:
    """Read and drop the rest of the input so that Gadgetron can finish its side."""
    for _ in connection:
        pass


def run_chain(connection: Any, chain_name: str | None = None) -> None:
    """Serve one Gadgetron connection with a perfline chain (see the module docstring)."""
    from perfline.core.chain import resolve_chain

    text_mode = config_properties(connection.config).get("text_messages", "send")
    if text_mode not in ("send", "drop"):
        text_mode = "send"
        logger.warning("gadgetron bridge: property text_messages must be 'send' or 'drop'; sending")
    # gadgetron 1.4.1's Connection.add_writer wraps the writer in a one-argument lambda while
    # send() calls writers with (socket, item): register on the writer list directly instead
    if text_mode == "send":
        connection.writers.insert(0, (lambda item: isinstance(item, TextItem), write_text))
    else:
        connection.writers.insert(0, (lambda item: isinstance(item, TextItem),
                                      lambda _destination, item: logger.info("text dropped: %.200s", item.text)))
    sender: threading.Thread | None = None
    failure: list[BaseException] = []
    lock = threading.Lock()

    def report_error(error: BaseException) -> None:
        """Send the first failure only (a stopped chain raises again in the other thread)."""
        with lock:
            if failure:
                return
            failure.append(error)
            logger.error("gadgetron bridge: %s", error)
            connection.send(TextItem(ERROR_PREFIX + f"{type(error).__name__}: {error}"))

    try:
        properties = config_properties(connection.config)
        name = chain_name or properties.get("chain")
        if not name:
            raise BridgeError("no chain named: give the target a chain or the configuration property 'chain'")
        spec = resolve_chain(name)
        header_xml = connection.raw_bytes.header
        header_xml = header_xml.decode("utf-8", "replace") if isinstance(header_xml, bytes) else str(header_xml or "")
        context = ChainContext(header=connection.header, header_xml=header_xml.rstrip("\x00"),
                               parameters=_parameters(properties), connection_id="gadgetron",
                               output_dir=_output_dir(properties))
        running = spec.start(context)
    except Exception as error:  # noqa: BLE001 - every failure must reach Gadgetron as a message
        report_error(error)
        _drain(connection)
        return
    logger.info("gadgetron bridge: chain %r started", spec.name)

    def send_outputs() -> None:
        try:
            for output in running.outputs():
                if isinstance(output, (ismrmrd.Image, ismrmrd.Acquisition, ismrmrd.Waveform, TextItem)):
                    with lock:
                        connection.send(output)
                else:
                    logger.warning("gadgetron bridge: dropped an output of type %s", type(output).__name__)
        except Exception as error:  # noqa: BLE001 - reported to Gadgetron, then the input is drained
            report_error(error)

    sender = threading.Thread(target=send_outputs, name="gadgetron-bridge-sender", daemon=True)
    sender.start()
    try:
        for item in connection:
            if failure:
                continue  # keep reading until Gadgetron closes
            if not spec.accepts_message(item):
                raise BridgeError(f"chain {spec.name!r} takes {', '.join(spec.input)} messages, "
                                  f"got {type(item).__name__}")
            running.put(item)
        running.close()
    except Exception as error:  # noqa: BLE001
        report_error(error)
        running.abort(str(error))
        _drain(connection)
    sender.join()


def chain(connection: Any) -> None:
    """Target running the chain named by the configuration property ``chain``."""
    run_chain(connection)


def perfusion(connection: Any) -> None:
    """Target running the ``perfusion`` chain."""
    run_chain(connection, "perfusion")


def passthrough(connection: Any) -> None:
    """Target running the ``passthrough`` chain (images echoed back)."""
    run_chain(connection, "passthrough")
