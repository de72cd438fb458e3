"""``perfline train``: train the segmentation ResUNet on simulated studies (on the fly)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "train", help="train the segmentation CNN on simulated studies",
        description="Train the ResUNet (LV, myocardium, RV) on phantom studies generated on the "
                    "fly; writes best.safetensors/.json, checkpoint.pt and train_log.jsonl.")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--steps-per-epoch", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2, help="data-generating processes")
    parser.add_argument("--validation-studies", type=int, default=16)
    parser.add_argument("--time-limit", type=float, default=None, metavar="S",
                        help="stop (keeping the best weights) after this many seconds")
    parser.add_argument("--filters", type=int, nargs="+", default=None)
    parser.add_argument("--blocks", type=int, nargs="+", default=None)
    parser.add_argument("--stem-stride", type=int, default=None)
    parser.add_argument("--paper", action="store_true",
                        help="the paper's best network: 2 levels, 2+3 blocks, 64/128 filters")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--lr-halving-epochs", type=int, default=10)
    parser.add_argument("--init-weights", default=None, metavar="STEM",
                        help="start from these weights (fine-tuning), e.g. models/resunet_perfusion")
    parser.add_argument("--augmentation", default="{}", metavar="JSON",
                        help='overrides of the augmentation ranges, e.g. \'{"scale": [0.8, 1.6]}\'')
    parser.add_argument("--bf16", action="store_true",
                        help="forward pass under bfloat16 autocast (AMX CPUs and GPUs: about 2x faster steps)")
    parser.add_argument("--augmentations-per-slice", type=int, default=None, metavar="N",
                        help="training samples drawn per simulated slice (default 3)")
    parser.add_argument("--settings", type=Path, default=None, metavar="JSON",
                        help="complete TrainSettings JSON (as stored in a model sidecar under 'settings'); "
                             "replaces every training option above")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if present)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    parser.add_argument("--export-onnx", action="store_true",
                        help="export the best weights to OUT/best.onnx at the end")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    try:
        import torch  # noqa: F401
    except ImportError:
        logger.error("training needs torch: pip install 'perfline[train]'")
        return 2
    from tqdm import tqdm

    from perfline.models.train import load_settings, train
    from perfline.models.weights import export_onnx, load_torch_model

    if args.settings is not None:
        try:
            settings = load_settings(args.settings)
        except (OSError, ValueError) as error:
            logger.error("--settings %s: expected a TrainSettings JSON file: %s", args.settings, error)
            return 2
    else:
        settings = _settings_from_options(args)
    bar = tqdm(total=settings.epochs * settings.steps_per_epoch, unit="step",
               dynamic_ncols=True)

    def progress(epoch: int, step: int, loss: float) -> None:
        bar.n = epoch * settings.steps_per_epoch + step + 1
        bar.set_postfix(epoch=epoch, loss=f"{loss:.3f}", refresh=False)
        bar.update(0)

    best = train(settings, args.out, resume=args.resume, device=args.device, progress=progress)
    bar.close()
    print(json.dumps(best, indent=2))
    if args.export_onnx:
        model = load_torch_model(args.out / "best")
        print(f"exported {export_onnx(model, args.out / 'best')}")
    return 0


def _settings_from_options(args: argparse.Namespace):  # noqa: ANN202 - TrainSettings (torch import deferred)
    """TrainSettings from the command-line options."""
    from perfline.models.resunet import ResUNetConfig
    from perfline.models.train import TrainSettings

    network = ResUNetConfig.paper() if args.paper else ResUNetConfig()
    overrides = {key: value for key, value in (("filters", args.filters),
                 ("blocks", args.blocks), ("stem_stride", args.stem_stride)) if value}
    if overrides:
        network = ResUNetConfig(**{**network.model_dump(), **overrides})
    return TrainSettings(network=network, epochs=args.epochs,
                         steps_per_epoch=args.steps_per_epoch, batch_size=args.batch_size,
                         workers=args.workers, validation_studies=args.validation_studies,
                         time_limit_s=args.time_limit, seed=args.seed,
                         learning_rate=args.learning_rate,
                         lr_halving_epochs=args.lr_halving_epochs,
                         init_weights=args.init_weights,
                         augmentation=json.loads(args.augmentation),
                         autocast_bf16=args.bf16,
                         **({} if args.augmentations_per_slice is None else
                            {"augmentations_per_slice": args.augmentations_per_slice}))
