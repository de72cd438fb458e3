"""Helpers for tests: a real MRD server on a free loopback port, in this process.

Example::

    from perfline.server.testing import running_server
    from perfline.server.client import send_dataset

    with running_server() as (host, port):
        results = send_dataset(path, host, port, "cartesian-recon")
    assert results.ok, results.errors
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from perfline.server.server import MRDServer, ServerSettings


@contextmanager
def running_server(*, wait_for_warm_up: bool = False, **settings: Any) -> Iterator[tuple[str, int]]:
    """Start an :class:`MRDServer` (``ServerSettings`` keywords; port 0 = free port), yield
    ``(host, port)``, stop it (waiting for sessions in flight) on exit.

    The start-up warm-up (BTEX residue tables, numba kernel, CNN model, see
    ``ServerSettings.warm_up``) is off unless ``warm_up=True`` (as ``perfline demo`` and
    ``evaluate --mbf`` pass, like ``perfline serve``): test servers should not spend CPU on
    tables their scans do not use. ``wait_for_warm_up`` returns only once the warm-up thread has
    finished, so that the caller's own work (simulating scans in the same process) does not run
    beside it -- as on a scanner, where the server has been up long before the first scan."""
    settings.setdefault("port", 0)
    settings.setdefault("warm_up", False)
    server = MRDServer(ServerSettings(**settings))
    address = server.start()
    if wait_for_warm_up and server.warm_up_thread is not None:
        server.warm_up_thread.join()
    try:
        yield address
    finally:
        server.stop(timeout=30.0)
