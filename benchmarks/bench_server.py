"""End-to-end throughput of ``cartesian-recon`` over loopback TCP versus a raw loopback copy.

Dataset: ``ismrmrd_generate_cartesian_shepp_logan -m 256 -c 8 -r 10`` (readout oversampling 2,
so 2560 acquisitions of 8 x 512 complex64 samples, about 84 MB on the wire).

Measured (median of ``--repeats`` runs, each printed):
- raw: the exact MRD byte stream (pre-encoded) copied over a loopback socket to a reader that
  discards it - the limit for this machine;
- e2e-memory: ``send_dataset`` of acquisitions already in memory to ``perfline serve`` (a
  separate process) running cartesian-recon, from connect to the server's CLOSE (all 10
  images received);
- e2e-file: the same, streaming from the MRD HDF5 file (what ``perfline send`` does).
MB/s counts the bytes the client sent.

Run: ``python benchmarks/bench_server.py [--matrix 256 --coils 8 --repetitions 10 --repeats 3]``
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import ismrmrd

from perfline.server.client import send_dataset
from perfline.server.protocol import Close, Header, encode_message
from perfline.server.storage import iter_acquisitions, read_header_xml


def raw_loopback_seconds(payload: bytes) -> float:
    """Seconds to push ``payload`` through a loopback TCP connection to a discarding reader."""
    listener = socket.create_server(("127.0.0.1", 0))
    received = [0]

    def sink() -> None:
        connection, _ = listener.accept()
        buffer = bytearray(1 << 20)
        with connection:
            while count := connection.recv_into(buffer):
                received[0] += count

    thread = threading.Thread(target=sink)
    thread.start()
    start = time.perf_counter()
    with socket.create_connection(listener.getsockname()) as sock:
        sock.sendall(payload)
    thread.join()
    elapsed = time.perf_counter() - start
    listener.close()
    assert received[0] == len(payload)
    return elapsed


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--matrix", type=int, default=256)
    parser.add_argument("--coils", type=int, default=8)
    parser.add_argument("--repetitions", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "shepp_logan.h5"
        subprocess.run(["ismrmrd_generate_cartesian_shepp_logan", "-m", str(args.matrix), "-c", str(args.coils),
                        "-r", str(args.repetitions), "-o", str(path)], check=True, capture_output=True)
        header_xml = read_header_xml(path)
        acquisitions = list(iter_acquisitions(path))
        payload = b"".join([encode_message(ismrmrd.ConfigFile("cartesian-recon")),
                            encode_message(Header(header_xml))]
                           + [encode_message(a) for a in acquisitions] + [encode_message(Close())])
        megabytes = len(payload) / 1e6
        print(f"dataset: {args.matrix}x{args.matrix}, {args.coils} coils, {args.repetitions} repetitions, "
              f"{len(acquisitions)} acquisitions, {megabytes:.1f} MB on the wire")

        port = free_port()
        server = subprocess.Popen([sys.executable, "-m", "perfline.cli", "serve", "--port", str(port)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
            timings: dict[str, list[float]] = {"raw": [], "e2e-memory": [], "e2e-file": []}
            for run in range(args.repeats):
                timings["raw"].append(raw_loopback_seconds(payload))
                for name, source in (("e2e-memory", acquisitions), ("e2e-file", path)):
                    results = send_dataset(source, "127.0.0.1", port, "cartesian-recon", header_xml=header_xml)
                    if not results.ok or len(results.images) != args.repetitions:
                        raise SystemExit(f"{name}: server failed: {results.errors}")
                    timings[name].append(results.seconds)
                print(f"run {run + 1}: " + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in timings.items()))
        finally:
            server.terminate()
            server.wait(timeout=60)

    raw = statistics.median(timings["raw"])
    print(f"{'':12s} {'median s':>9s} {'MB/s':>9s} {'x raw':>7s}")
    for name, values in timings.items():
        median = statistics.median(values)
        print(f"{name:12s} {median:9.3f} {megabytes / median:9.1f} {median / raw:7.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
