"""Latency of the one-click ``perfusion`` chain: last acquisition -> report at the client.

Issue 7: "from the last acquisition of a 3-slice, 60-frame, 16-coil R=3 scan to the report at
the client <= 10 s on this 2-core machine, per stage, with peak memory".

What it does:

1. simulates one k-space scan with the simulator's defaults (3 slices, 16 coils, R=3
   myocardial series, 2-echo AIF series) to a temporary MRD file;
2. starts ``perfline serve`` as a separate process on a free loopback port (so its peak
   memory is its own) and waits until its start-up warm-up (BTEX residue tables) has finished
   -- a server that has been up for a minute, as on a scanner;
3. streams the scan ``--repeats`` times like a scanner (``perfline.server.client.send_dataset``,
   ``{"timings": true}``), measures the time from the end of sending (the last acquisition) to
   the arrival of the JSON report, and collects the per-gadget busy times the server returns;
4. reads the server process's peak resident memory (``VmHWM`` in ``/proc/PID/status``) before
   the first scan and after the last one.

Prints medians (and min / max) over the repeats, a reference workload's time (the machine's
speed at the time: :func:`reference_workload_ms`), the machine load average before and after,
and the per-stage median busy times. Timing is not asserted anywhere; the numbers go in the
README. Run: ``python benchmarks/bench_latency.py --repeats 3``.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _peak_rss_mb(pid: int) -> tuple[float, float]:
    """(current RSS, peak RSS) of a process in MiB, from /proc/PID/status."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = float(rest.split()[0]) / 1024.0
    return values.get("VmRSS", float("nan")), values.get("VmHWM", float("nan"))


def _start_server(port: int, out: Path, warm_timeout_s: float) -> tuple[subprocess.Popen, list[str]]:
    command = [sys.executable, "-c", "import sys; from perfline.cli import main; sys.exit(main())",
               "serve", "--port", str(port), "--out", str(out)]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines: list[str] = []
    warmed = threading.Event()

    def pump() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            lines.append(line.rstrip())
            if "warm-up finished" in line:
                warmed.set()

    threading.Thread(target=pump, daemon=True).start()
    if not warmed.wait(warm_timeout_s):
        process.kill()
        raise RuntimeError(f"server did not finish its warm-up within {warm_timeout_s:.0f} s; "
                           f"last log lines: {lines[-5:]}")
    return process, lines


def reference_workload_ms(repeats: int = 7) -> float:
    """Median ms of a fixed single-threaded numpy / scipy workload shaped like the chain's (an FFT of
    one slice's frames, a batch of low-rank-filter eigenproblems, a table product, a box filter).

    The shared machines' speed drifts (session 24: the same code read 7 and 14 s within an hour),
    so a latency is printed with this number measured just before the scans; compare latencies of
    different runs only at similar reference times."""
    from scipy import ndimage

    from perfline.toolbox.interleaved_recon import single_threaded_blas

    rng = np.random.default_rng(0)
    frames = (rng.standard_normal((63, 144, 192)) + 1j * rng.standard_normal((63, 144, 192))).astype(np.complex64)
    gram = rng.standard_normal((60, 63, 63)) + 1j * rng.standard_normal((60, 63, 63))
    gram = gram @ gram.conj().transpose(0, 2, 1)
    table = rng.standard_normal((6000, 480)).astype(np.float32)
    projection = rng.standard_normal((480, 300)).astype(np.float32)
    image = rng.standard_normal((63, 72, 96)).astype(np.float32)
    times = []
    with single_threaded_blas():
        for _ in range(repeats + 1):  # the first call (allocation, plans) is not timed
            started = time.perf_counter()
            np.fft.fft2(frames)
            np.linalg.eigh(gram)
            table @ projection
            ndimage.uniform_filter1d(image, 9, axis=-1)
            times.append(1000.0 * (time.perf_counter() - started))
    return statistics.median(times[1:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="scans streamed (default 3)")
    parser.add_argument("--seed", type=int, default=2**30 + 6, help="held-out phantom seed")
    parser.add_argument("--kind", choices=("stress", "rest"), default="stress")
    parser.add_argument("--field", type=float, choices=(1.5, 3.0), default=1.5)
    parser.add_argument("--chain", default="perfusion")
    parser.add_argument("--warm-timeout", type=float, default=300.0, help="seconds to wait for warm-up")
    args = parser.parse_args()

    from perfline.server.client import send_dataset
    from perfline.simulator import mrd, study as simulated
    from perfline.toolbox.mbf_evaluation import report_from_results

    with tempfile.TemporaryDirectory(prefix="perfline-latency-") as tmp:
        tmp_path = Path(tmp)
        study = simulated.sample_study(args.seed, kind=args.kind, field_strength_t=args.field)
        path = tmp_path / "scan.h5"
        mrd.write_kspace(study, str(path), phantoms=[simulated.slice_phantom(study, k)
                                                      for k in range(study.n_slices)])
        port = _free_port()
        reference_ms = reference_workload_ms()
        load_before = os.getloadavg()
        started = time.perf_counter()
        server, log_lines = _start_server(port, tmp_path / "reports", args.warm_timeout)
        warm_s = time.perf_counter() - started
        try:
            _, idle_peak = _peak_rss_mb(server.pid)
            latencies, stages = [], {}
            for repeat in range(args.repeats):
                results = send_dataset(path, "127.0.0.1", port, args.chain,
                                       parameters={"timings": True, "scan": args.kind,
                                                   "patient_id": f"latency-{repeat}",
                                                   "hematocrit": round(float(study.bolus.hematocrit), 4)})
                if not results.ok:
                    print("\n".join(results.errors), file=sys.stderr)
                    return 1
                report = report_from_results(results.texts)
                arrival = (results.text_times_s[results.texts.index(report)] if report in results.texts
                           else max(results.text_times_s))
                latencies.append(arrival - results.sent_s)
                for stage in results.stage_timings():
                    stages.setdefault(stage["gadget"], []).append(stage["busy_s"])
                print(f"scan {repeat + 1}: streamed in {results.sent_s:.1f} s, report "
                      f"{latencies[-1]:.2f} s after the last acquisition", flush=True)
            rss, peak = _peak_rss_mb(server.pid)
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
            if server.stderr is not None:
                server.stderr.close()
        load_after = os.getloadavg()

    print(f"\nchain {args.chain!r}, {args.kind} scan, seed {args.seed}, {study.n_slices} slices, "
          f"{args.field:g} T; server warm-up {warm_s:.1f} s")
    print(f"machine speed: reference workload {reference_ms:.0f} ms before the scans (lower is faster)")
    print(f"load average (1, 5, 15 min) before {load_before[0]:.2f} {load_before[1]:.2f} "
          f"{load_before[2]:.2f}, after {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")
    print(f"latency last acquisition -> report: median {statistics.median(latencies):.2f} s "
          f"(min {min(latencies):.2f}, max {max(latencies):.2f}, n={len(latencies)})")
    print(f"server peak resident memory: {peak:.0f} MiB after the scans "
          f"({idle_peak:.0f} MiB after warm-up, {rss:.0f} MiB resident at the end)")
    print("per-stage busy time, median (s):")
    for gadget, values in stages.items():
        print(f"  {gadget:<28}{statistics.median(values):7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
