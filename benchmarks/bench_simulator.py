"""Speed of the simulator: k-space study to MRD HDF5, and the in-memory image-domain path.

Targets (issue 3): 3 slices x 60 frames x 16 coils k-space study <= 10 s; image-domain path
>= 20 slices/s. Prints medians of repeated runs (wall clock; the machine is shared, so the
CPU time of the process is printed too).

Usage: python benchmarks/bench_simulator.py [--repeats 3] [--image-studies 8] [--image-only]
       [--torch-threads 1] [--processes 2] [--against COMMIT [--rounds 3]]

The image path is timed with ``--torch-threads`` torch threads (default 1, as in a DataLoader
worker; torch's default on this machine is 2, which only the motion warp uses), then as the
throughput of ``--processes`` worker processes (one torch thread each) simulating studies
concurrently (wall clock from the first to the last study, after a warm-up in every worker).

``--against COMMIT`` instead compares the image path (Fermi, one process) of the working tree
with that of an earlier commit: alternating runs in fresh processes, the other version taken
from ``git archive COMMIT`` into a temporary folder laid out as the ``perfline`` package and put
first on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from perfline.simulator import mrd, simulate_image_study, truth
from perfline.simulator import study as st


def _timed(function) -> tuple[float, float]:  # noqa: ANN001
    wall, cpu = time.perf_counter(), time.process_time()
    function()
    return time.perf_counter() - wall, time.process_time() - cpu


def _warm_worker() -> None:
    import torch

    torch.set_num_threads(1)
    simulate_image_study(0, n_slices=1, n_frames=10)


def _simulate(seed: int) -> int:
    return len(simulate_image_study(seed))


def image_path(studies: int, processes: int, flow_models: tuple[str, ...]) -> None:
    simulate_image_study(0)  # warm-up: imports, noise bank, LUTs
    for flow_model in flow_models:
        walls, cpus = [], []
        for seed in range(1, studies + 1):
            wall, cpu = _timed(lambda seed=seed: simulate_image_study(seed, flow_model=flow_model))
            walls.append(wall)
            cpus.append(cpu)
        print(f"image-domain path, 3 slices x 63 frames 144 x 192, {flow_model}: median "
              f"{statistics.median(walls) * 1000:.0f} ms per study = {3 / statistics.median(walls):.1f} slices/s wall "
              f"({3 / statistics.median(cpus):.1f} slices per CPU-second) over {studies} studies, "
              f"load average {os.getloadavg()[0]:.2f}")
    if processes > 1:
        with multiprocessing.get_context("fork").Pool(processes, initializer=_warm_worker) as pool:
            pool.map(_simulate, range(1000, 1000 + processes))  # warm both workers
            start = time.perf_counter()
            n_slices = sum(pool.map(_simulate, range(1, 1 + studies * processes), chunksize=1))
            wall = time.perf_counter() - start
        print(f"image-domain path, fermi, {processes} worker processes: {n_slices} slices in {wall:.2f} s = "
              f"{n_slices / wall:.1f} slices/s wall, load average {os.getloadavg()[0]:.2f}")


PACKAGE_FOLDERS = ("core", "server", "gadgets", "toolbox", "simulator", "models", "chains")


def against(commit: str, rounds: int, studies: int, torch_threads: int) -> None:
    """Alternate image-path runs of COMMIT and of the working tree, each in a fresh process."""
    root = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory() as folder:
        source, package = Path(folder) / "source", Path(folder) / "package" / "perfline"
        source.mkdir()
        archive = subprocess.run(["git", "-C", str(root), "archive", commit], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(source)], input=archive, check=True)
        package.parent.mkdir()
        package.symlink_to(source / "perfline")
        for name in PACKAGE_FOLDERS:
            if (source / name).is_dir() and not (package / name).exists():
                (source / "perfline" / name).symlink_to(source / name)
        command = [sys.executable, str(Path(__file__).resolve()), "--image-only", "--fermi-only",
                   "--processes", "1", "--image-studies", str(studies), "--torch-threads", str(torch_threads)]
        for _ in range(rounds):
            for label, pythonpath in ((commit, str(package.parent)), ("working tree", "")):
                env = dict(os.environ, PYTHONPATH=pythonpath)
                out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
                print(f"{label}: {out.strip().splitlines()[-1]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--image-studies", type=int, default=8)
    parser.add_argument("--image-only", action="store_true", help="skip the k-space studies")
    parser.add_argument("--torch-threads", type=int, default=1, help="torch threads of this process")
    parser.add_argument("--processes", type=int, default=2, help="worker processes of the throughput run")
    parser.add_argument("--fermi-only", action="store_true", help="image path: skip the BTEX studies")
    parser.add_argument("--against", metavar="COMMIT", help="compare the image path with this commit")
    parser.add_argument("--rounds", type=int, default=3, help="alternations of --against")
    args = parser.parse_args()
    if args.against:
        against(args.against, args.rounds, args.image_studies, args.torch_threads)
        return
    import torch

    torch.set_num_threads(args.torch_threads)
    print(f"cpus: {os.cpu_count()}, load average: {os.getloadavg()[0]:.2f}, torch threads {torch.get_num_threads()}")
    if not args.image_only:
        kspace(args.repeats)
    image_path(args.image_studies, args.processes, ("fermi",) if args.fermi_only else ("fermi", "btex"))


def kspace(repeats: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        for acceleration, flow_model in ((3, "btex"), (3, "fermi"), (1, "btex")):
            walls, cpus = [], []
            for repeat in range(repeats):
                study = st.sample_study(100 + repeat, n_slices=3, n_frames=60, n_coils=16,
                                        acceleration=acceleration, flow_model=flow_model)

                def run() -> None:
                    phantoms = [st.slice_phantom(study, k) for k in range(study.n_slices)]
                    mrd.write_kspace(study, os.path.join(folder, "k.h5"), phantoms=phantoms)
                    truth.write_truth(study, os.path.join(folder, "t.h5"), phantoms)

                wall, cpu = _timed(run)
                walls.append(wall)
                cpus.append(cpu)
            size = os.path.getsize(os.path.join(folder, "k.h5")) / 1e6
            print(f"k-space study 3 slices x 60 frames (+3 PD) x 16 coils, R={acceleration}, {flow_model}, "
                  f"with truth: median {statistics.median(walls):.2f} s wall ({statistics.median(cpus):.2f} s CPU) "
                  f"over {repeats}; file {size:.0f} MB")


if __name__ == "__main__":
    main()
