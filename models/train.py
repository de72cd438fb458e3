"""Training of the ResUNet on simulated studies generated on the fly (Xue et al. 2020 App. E3).

Loss cross-entropy + soft IoU; Adam (lr 1e-3, betas 0.9/0.999, eps 1e-8), lr halved every 10
epochs; the best model on the validation studies (split by study seed, never mixed with the
training studies) is kept. An "epoch" is a fixed number of steps, since the data are infinite.

Outputs in ``out_dir``: ``best.safetensors`` + ``best.json`` (architecture, metrics, SHA-256),
``checkpoint.pt`` (resume; loaded with ``torch.load(weights_only=True)``, no arbitrary
unpickling) and ``train_log.jsonl`` (one line of metrics per epoch).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from perfline.models.data import (TEST_SEED_START, Augmentation, augmented_sample,
                                  is_validation_study, study_samples)
from perfline.models.resunet import ResUNet, ResUNetConfig, segmentation_loss
from perfline.models.weights import save_weights

logger = logging.getLogger(__name__)


class TrainSettings(BaseModel):
    """Everything that defines a training run (stored in best.json and the checkpoint)."""

    model_config = ConfigDict(extra="forbid")

    network: ResUNetConfig = Field(default_factory=ResUNetConfig)
    augmentation: Augmentation = Field(default_factory=Augmentation)
    epochs: int = Field(60, ge=1)
    steps_per_epoch: int = Field(200, ge=1)
    batch_size: int = Field(16, ge=2)
    learning_rate: float = Field(1e-3, gt=0)
    lr_halving_epochs: int = Field(10, ge=1)
    iou_weight: float = Field(1.0, ge=0)
    validation_studies: int = Field(16, ge=1)
    augmentations_per_slice: int = Field(3, ge=1, description="samples drawn per simulated slice")
    workers: int = Field(2, ge=0)
    seed: int = 0
    time_limit_s: float | None = Field(None, gt=0, description="stop after this wall time")
    simulator_frames: int = Field(64, ge=48)
    init_weights: str | None = Field(None, description="model stem to start from (fine-tuning)")
    autocast_bf16: bool = Field(False, description="forward pass under bfloat16 autocast "
                                "(CPU with AMX: ~2x faster steps); weights, optimiser, loss "
                                "and validation stay float32")


class SimulatedSlices(IterableDataset):
    """Endless (crop [48, 176, 176] float32, labels [176, 176] int64) training pairs from
    training-split simulator seeds; every worker draws its own seeds."""

    def __init__(self, settings: TrainSettings, seed: int) -> None:
        self.settings = settings
        self.seed = seed
        self.buffer_size = 24

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        rng = np.random.default_rng([self.seed, worker])
        buffer: list[tuple[np.ndarray, np.ndarray]] = []
        while True:
            study_seed = int(rng.integers(0, TEST_SEED_START))
            if is_validation_study(study_seed):
                continue
            samples = study_samples(study_seed, rng, self.settings.augmentation,
                                    repeats=self.settings.augmentations_per_slice,
                                    n_frames=self.settings.simulator_frames)
            buffer.extend(samples)
            # a small shuffle buffer keeps one study's slices out of the same batch
            while len(buffer) > self.buffer_size:
                crop, labels = buffer.pop(int(rng.integers(len(buffer))))
                yield torch.from_numpy(crop), torch.from_numpy(labels.astype(np.int64))


def validation_seeds(count: int) -> list[int]:
    """The first ``count`` validation-split study seeds."""
    seeds, seed = [], 0
    while len(seeds) < count:
        if is_validation_study(seed):
            seeds.append(seed)
        seed += 1
    return seeds


def _plain_samples(seed: int, n_frames: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Validation crops of one study: Gd and signal units alternate from slice to slice."""
    from perfline.simulator import simulate_image_study

    samples = []
    for index, slice_ in enumerate(simulate_image_study(seed, n_frames=n_frames)):
        samples.append(augmented_sample(slice_, None, None,
                                        signal_units=(seed + index) % 2 == 1))
    return samples


def validation_set(settings: TrainSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """Crops and labels of the validation studies (validation seeds, no augmentation),
    simulated in ``settings.workers`` processes."""
    seeds = validation_seeds(settings.validation_studies)
    frames = [settings.simulator_frames] * len(seeds)
    if settings.workers > 1:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(settings.workers, mp_context=context) as pool:
            studies = list(pool.map(_plain_samples, seeds, frames))
    else:
        studies = [_plain_samples(seed, n) for seed, n in zip(seeds, frames)]
    crops = [crop for study in studies for crop, _ in study]
    labels = [label for study in studies for _, label in study]
    return torch.from_numpy(np.stack(crops)), torch.from_numpy(np.stack(labels).astype(np.int64))


@torch.no_grad()
def evaluate(model: ResUNet, crops: torch.Tensor, labels: torch.Tensor, device: torch.device,
             iou_weight: float, batch_size: int = 16) -> dict[str, float]:
    """Validation loss and per-class Dice (argmax, on the crop) averaged over slices."""
    model.eval()
    losses, dices = [], {1: [], 2: [], 3: []}
    for start in range(0, len(crops), batch_size):
        x = crops[start:start + batch_size].to(device)
        y = labels[start:start + batch_size].to(device)
        logits = model(x)
        losses.append(float(segmentation_loss(logits, y, iou_weight=iou_weight)) * len(x))
        predicted = logits.argmax(dim=1)
        for label in dices:
            a, m = predicted == label, y == label
            total = (a.sum(dim=(1, 2)) + m.sum(dim=(1, 2))).float()
            overlap = (a & m).sum(dim=(1, 2)).float()
            dices[label].extend(torch.where(total > 0, 2 * overlap / total.clamp(min=1),
                                            torch.ones_like(total)).tolist())
    model.train()
    return {"val_loss": sum(losses) / len(crops), "val_dice_lv": float(np.mean(dices[1])),
            "val_dice_myo": float(np.mean(dices[2])), "val_dice_rv": float(np.mean(dices[3]))}


# settings that may change between a run and its resumption
_RESUMABLE = {"epochs": None, "time_limit_s": None, "workers": None}


def _out_of_time(started: float, settings: TrainSettings) -> bool:
    return (settings.time_limit_s is not None
            and time.monotonic() - started > settings.time_limit_s)


def train(settings: TrainSettings, out_dir: Path, *, resume: bool = False,
          device: str | None = None, progress=None) -> dict[str, float]:
    """Train; returns the best validation metrics. ``progress(epoch, step, loss)`` is called
    after every step when given (the CLI shows a bar)."""
    started = time.monotonic()
    out_dir.mkdir(parents=True, exist_ok=True)
    torch_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(settings.seed)
    model = ResUNet(settings.network).to(torch_device)
    if settings.init_weights and not resume:
        from perfline.models.weights import load_torch_model

        initial = load_torch_model(Path(settings.init_weights))
        if initial.config != settings.network:
            raise ValueError(f"--init-weights {settings.init_weights} has network "
                             f"{initial.config}, expected {settings.network}")
        model.load_state_dict(initial.state_dict())
        logger.info("starting from %s", settings.init_weights)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.learning_rate,
                                 betas=(0.9, 0.999), eps=1e-8)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, settings.lr_halving_epochs, 0.5)
    first_epoch, best = 0, {"val_dice_myo": -1.0}
    checkpoint_path = out_dir / "checkpoint.pt"
    if resume and checkpoint_path.exists():
        state = torch.load(checkpoint_path, map_location=torch_device, weights_only=True)
        if json.loads(state["settings"]) | _RESUMABLE != settings.model_dump(mode="json") | _RESUMABLE:
            raise ValueError(f"cannot resume {checkpoint_path}: it was written with other "
                             f"settings ({state['settings']})")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        first_epoch = int(state["epoch"]) + 1
        best = json.loads(state["best"])
        logger.info("resumed from %s at epoch %d", checkpoint_path, first_epoch)
    logger.info("building %d validation studies", settings.validation_studies)
    val_crops, val_labels = validation_set(settings)
    loader = DataLoader(SimulatedSlices(settings, settings.seed * 1000 + first_epoch),
                        batch_size=settings.batch_size, num_workers=settings.workers,
                        persistent_workers=settings.workers > 0,
                        prefetch_factor=4 if settings.workers > 0 else None)
    batches = iter(loader)
    log_path = out_dir / "train_log.jsonl"
    if settings.init_weights and first_epoch == 0:
        # the starting weights on the same validation set: the reference a fine-tuned model
        # is compared with (logged as epoch -1, never itself saved as "best")
        initial = {"epoch": -1, "init_weights": settings.init_weights,
                   "elapsed_s": round(time.monotonic() - started, 1),
                   **evaluate(model, val_crops, val_labels, torch_device, settings.iou_weight)}
        logger.info("initial weights: %s", initial)
        with log_path.open("a") as log:
            log.write(json.dumps(initial) + "\n")
    for epoch in range(first_epoch, settings.epochs):
        model.train()
        losses = []
        for step in range(settings.steps_per_epoch):
            x, y = next(batches)
            x, y = x.to(torch_device, non_blocking=True), y.to(torch_device, non_blocking=True)
            with torch.autocast(torch_device.type, dtype=torch.bfloat16,
                                enabled=settings.autocast_bf16):
                logits = model(x)
            loss = segmentation_loss(logits.float(), y, iou_weight=settings.iou_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if progress is not None:
                progress(epoch, step, losses[-1])
            if _out_of_time(started, settings):
                break
        scheduler.step()
        metrics = {"epoch": epoch, "train_loss": float(np.mean(losses)), "steps": len(losses),
                   "lr": optimizer.param_groups[0]["lr"],
                   "elapsed_s": round(time.monotonic() - started, 1),
                   **evaluate(model, val_crops, val_labels, torch_device, settings.iou_weight)}
        logger.info("epoch %d: %s", epoch, metrics)
        with log_path.open("a") as log:
            log.write(json.dumps(metrics) + "\n")
        if metrics["val_dice_myo"] > best["val_dice_myo"]:
            best = metrics
            save_weights(model, out_dir / "best", metadata={
                "settings": json.loads(settings.model_dump_json()), "metrics": metrics})
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "epoch": epoch,
                    "best": json.dumps(best), "settings": settings.model_dump_json()},
                   checkpoint_path)
        if _out_of_time(started, settings):
            logger.info("time limit %.0f s reached after epoch %d", settings.time_limit_s, epoch)
            break
    return best


def load_settings(source: str | Path) -> TrainSettings:
    """:class:`TrainSettings` from a JSON string or the path of a JSON file (e.g. a sidecar's
    ``settings``); raises ``OSError`` or pydantic's ``ValidationError`` (a ``ValueError``)."""
    text = str(source)
    if not text.lstrip().startswith("{"):
        text = Path(text).read_text()
    return TrainSettings.model_validate_json(text)


def main(argv: list[str] | None = None) -> int:
    """``python -m perfline.models.train --settings JSON --out DIR [--resume]
    [--export-onnx]``: a run from a complete :class:`TrainSettings` JSON (string or file),
    for the settings that ``perfline train`` has no option for (e.g. ``autocast_bf16``,
    ``augmentations_per_slice``). Progress is logged every ``--log-every`` steps."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m perfline.models.train",
                                     description=main.__doc__)
    parser.add_argument("--settings", required=True,
                        help="TrainSettings as JSON, or the path of a JSON file")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--export-onnx", action="store_true")
    parser.add_argument("--device", default=None)
    parser.add_argument("--log-every", type=int, default=20)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    settings = load_settings(args.settings)
    last = [time.monotonic()]

    def progress(epoch: int, step: int, loss: float) -> None:
        if (step + 1) % args.log_every == 0:
            now = time.monotonic()
            logger.info("epoch %d step %d loss %.4f (%.2f s per step)", epoch, step + 1, loss,
                        (now - last[0]) / args.log_every)
            last[0] = now

    best = train(settings, args.out, resume=args.resume, device=args.device, progress=progress)
    logger.info("best: %s", best)
    if args.export_onnx:
        from perfline.models.weights import export_onnx, load_torch_model

        logger.info("exported %s", export_onnx(load_torch_model(args.out / "best"),
                                                args.out / "best"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
