"""``perfline send``: stream an MRD HDF5 dataset to a server and save what comes back."""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import sys
from pathlib import Path

import h5py
from tqdm import tqdm

from perfline.server.client import send_dataset
from perfline.server.storage import DatasetError, image_series_names, write_images

logger = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("send", help="stream an MRD HDF5 file to a server like a scanner",
                                   description="Send header, acquisitions and images; write returned "
                                               "images to an MRD HDF5 file (group per run, image_<series>).")
    parser.add_argument("file", type=Path, help="input MRD HDF5 file")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9002)
    config = parser.add_mutually_exclusive_group(required=True)
    config.add_argument("--config", help="chain name (CONFIG_FILE), e.g. cartesian-recon")
    config.add_argument("--config-file", type=Path, help="send this chain file's text (CONFIG_TEXT)")
    parser.add_argument("--out", type=Path, required=True, help="output MRD HDF5 file for returned images")
    parser.add_argument("--out-group", help="group for this run (default: current date and time)")
    parser.add_argument("--group", default="dataset", help="input dataset group (default 'dataset')")
    parser.add_argument("--params", help="JSON object (or @FILE) sent as text right after the header")
    parser.add_argument("--nul-terminate", action="store_true", help="NUL-terminate strings like FIRE's client")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the server")
    parser.set_defaults(func=run)
    return parser


def _count_items(path: Path, group: str) -> int:
    with h5py.File(path, "r") as handle:
        if group not in handle:
            raise DatasetError(f"{path}: no group {group!r}; groups: {sorted(handle)}")
        total = handle[group]["data"].shape[0] if "data" in handle[group] else 0
        for name in image_series_names(path, group):
            total += handle[group][name]["header"].shape[0] if "header" in handle[group][name] else 0
    return total


def run(args: argparse.Namespace) -> int:
    parameters = None
    if args.params:
        text = Path(args.params[1:]).read_text() if args.params.startswith("@") else args.params
        parameters = json.loads(text)
    try:
        total = _count_items(args.file, args.group)
    except (OSError, DatasetError) as error:
        print(f"error: cannot read {args.file}: {error}", file=sys.stderr)
        return 2
    config_text = args.config_file.read_text(encoding="utf-8") if args.config_file else None
    try:
        with tqdm(total=total, unit="msg", desc="sending", disable=None) as bar:
            results = send_dataset(args.file, args.host, args.port, args.config, config_text=config_text,
                                   parameters=parameters, group=args.group, nul_terminate=args.nul_terminate,
                                   timeout_s=args.timeout, progress=lambda n: bar.update(n - bar.n))
    except OSError as error:
        print(f"error: cannot stream to {args.host}:{args.port}: {error}", file=sys.stderr)
        return 1
    group = args.out_group or datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S.%f")
    if results.images:
        counts = write_images(args.out, group, results.images)
        for name, count in counts.items():
            print(f"{args.out}:{group}/{name}: {count} images")
    if results.texts:
        with h5py.File(args.out, "a") as handle:
            handle.require_group(group).create_dataset(
                "texts", data=[t.encode("utf-8") for t in results.texts], dtype=h5py.special_dtype(vlen=bytes))
    for text in results.texts:
        if not text.lstrip().startswith("ERROR"):
            logger.info("server text: %s", text[:200])
    print(f"sent {results.items_sent} messages ({results.bytes_sent / 1e6:.1f} MB) in {results.seconds:.2f} s; "
          f"received {len(results.images)} images, {len(results.texts)} texts")
    for error in results.errors:
        print(error, file=sys.stderr)
    if results.errors or not results.closed:
        return 1
    return 0
