"""``perfline serve``: run the MRD streaming server until SIGINT/SIGTERM.

At start a background thread loads (or builds, 10-15 s each, then cached on disk) the BTEX
residue tables of the chains' time grid, so the first scan does not wait for them
(``--no-warm-up`` to skip); connections are served from the start.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from pathlib import Path

from perfline.server.protocol import ProtocolLimits
from perfline.server.server import MRDServer, ServerSettings

logger = logging.getLogger(__name__)


class _ConnectionDefault(logging.Filter):
    """Gives every record a ``connection`` attribute ("-" outside sessions) for the format."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "connection"):
            record.connection = "-"
        return True


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("serve", help="run the MRD streaming server",
                                   description="Serve MRD/ISMRMRD clients (scanner, FIRE client, perfline send).")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback)")
    parser.add_argument("--port", type=int, default=9002, help="TCP port (default 9002)")
    parser.add_argument("--save-dir", type=Path, help="save every incoming stream as MRD HDF5 in DIR")
    parser.add_argument("--out", type=Path, help="directory for server-side outputs of gadgets")
    parser.add_argument("--max-connections", type=int, default=32, help="concurrent connections (default 32)")
    parser.add_argument("--idle-timeout", type=float, default=300.0, help="seconds without data before a "
                        "connection is closed with an error (default 300)")
    parser.add_argument("--max-message-mb", type=float, default=1024.0,
                        help="largest acquisition/image payload in MB (default 1024)")
    parser.add_argument("--max-text-mb", type=float, default=64.0,
                        help="largest header/config/text/attribute string in MB (default 64)")
    parser.add_argument("--no-warm-up", dest="warm_up", action="store_false",
                        help="do not prepare the BTEX residue tables in the background at start")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    handler_filter = _ConnectionDefault()
    for handler in logging.getLogger().handlers:
        handler.addFilter(handler_filter)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(connection)s]: %(message)s"))
    settings = ServerSettings(
        host=args.host, port=args.port, save_dir=args.save_dir, output_dir=args.out,
        max_connections=args.max_connections, warm_up=args.warm_up,
        limits=ProtocolLimits(idle_timeout_s=args.idle_timeout,
                              max_message_bytes=int(args.max_message_mb * 1e6),
                              max_text_bytes=int(args.max_text_mb * 1e6)),
    )
    server = MRDServer(settings)
    try:
        server.start()
    except OSError as error:
        logger.error("cannot listen on %s:%d: %s", args.host, args.port, error)
        return 1
    stop = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        logger.info("%s received: finishing sessions in flight", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    while not stop.wait(0.5):
        pass
    return 0 if server.stop() else 1
