"""The training loop: epochs of augmented crops, validation on whole photographs, checkpoints.

Resumable by construction: everything an epoch depends on (weights, optimiser, schedule, RNG
seeds derived from `seed` and the epoch number) is in `last.pt`, written at the end of every
epoch, so an interrupted run continues with `--resume` and reaches the same result.
"""

from __future__ import annotations

import csv
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ..card import CARD_VERSION, sha256, write_json_atomic
from ..metrics import evaluate_image, mean_scores
from ..model import AttentionUNet, InferenceModel, UNetConfig, count_parameters, normalise
from ..preprocess import unletterbox
from .augment import AugmentConfig, augment
from .dataset import Sample, load_sample, open_datasets, split_by_group
from .loss import LOSSES

THRESHOLDS = np.round(np.arange(0.30, 0.71, 0.05), 2)


@dataclass
class TrainConfig:
    data_dirs: list[str]  # one folder per camera / dataset, each paired and grouped on its own
    out_dir: str
    width: int = 16
    depth: int = 4
    size: int = 512  # working canvas side: the FOV is scaled to fill it
    crop: int = 256
    batch_size: int = 8
    epochs: int = 56  # the default recipe (train/default/README.md); same as the CLI's
    steps_per_epoch: int = 48
    lr: float = 3e-3
    weight_decay: float = 1e-4
    val_fraction: float = 0.2
    group: str = "auto"
    # "datasets": every step draws from each data folder equally, so a small second camera is
    # not drowned by a large first one; "images": every photograph equally.
    balance: str = "datasets"
    loss: str = "bce+dice"  # training.loss.LOSSES
    norm: str = "image"  # model.UNetConfig.norm: input standardisation over the image or local
    seed: int = 0
    device: str = "auto"
    threads: int = 0  # torch CPU threads; 0 = torch's default
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self):
        # `crop` is the training crop side; the augmentation cuts its views at that side (it
        # used to keep its own default of 256 whatever --crop said).
        if self.augment.crop != self.crop:
            self.augment = replace(self.augment, crop=self.crop)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda asked for, but PyTorch sees no CUDA GPU")
    return torch.device(name)


def _draw(samples: list[Sample], rng: np.random.Generator, count: int, balance: str):
    """Indices of `count` training samples: uniform over photographs, or over data folders
    first and then over that folder's photographs."""
    if balance == "images":
        return rng.integers(len(samples), size=count)
    by_set: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        by_set.setdefault(s.dataset, []).append(i)
    groups = [by_set[k] for k in sorted(by_set)]
    return [groups[g][rng.integers(len(groups[g]))]
            for g in rng.integers(len(groups), size=count)]


def _batch(samples: list[Sample], rng: np.random.Generator, cfg: TrainConfig):
    images, targets = [], []
    for i in _draw(samples, rng, cfg.batch_size, cfg.balance):
        s = samples[i]
        image, target = augment(s.image, s.target, s.fov, rng, cfg.augment)
        images.append(image)
        targets.append(target)
    return torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(targets))[:, None]


@torch.no_grad()
def validate(model: InferenceModel, samples: list[Sample], device: torch.device):
    """Scores in each photograph's own pixel grid, at every candidate threshold.

    Returns (means, best threshold, per-dataset means). With several data folders the overall
    mean is the mean of the folders' means, so each camera counts equally in model selection.
    """
    model.eval()
    rows: dict[str, dict[float, list]] = {}
    for s in samples:
        prob = model(torch.from_numpy(s.image[None]).to(device))[0].float().cpu().numpy()
        full = unletterbox(prob, s.letterbox)
        per_threshold = rows.setdefault(s.dataset, {float(t): [] for t in THRESHOLDS})
        for t in per_threshold:
            per_threshold[t].append(evaluate_image(full, s.truth, t))
    per_set = {name: {t: mean_scores(r) for t, r in by_t.items()} for name, by_t in rows.items()}
    means = {float(t): mean_scores([per_set[name][float(t)] for name in per_set])
             for t in THRESHOLDS}
    best = max(means, key=lambda t: means[t]["dice"])
    return means, best, per_set


class Trainer:
    def __init__(self, cfg: TrainConfig, resume: bool = False, log=print):
        self.cfg, self.log = cfg, log
        self.out = Path(cfg.out_dir)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        torch.use_deterministic_algorithms(True, warn_only=True)
        self.device = _device(cfg.device)
        self.datasets = open_datasets(cfg.data_dirs, cfg.group)
        self.train_set, self.val_set = [], []
        for ds in self.datasets:
            train_pairs, val_pairs = split_by_group(ds.pairs, ds.group_rule, cfg.val_fraction,
                                                    cfg.seed)
            self.train_set += [load_sample(p, cfg.size, ds.name) for p in train_pairs]
            self.val_set += [load_sample(p, cfg.size, ds.name) for p in val_pairs]
        self.out.mkdir(parents=True, exist_ok=True)  # only once the data is known to be usable
        self.net = AttentionUNet(UNetConfig(cfg.width, cfg.depth, norm=cfg.norm)).to(self.device)
        self.model = InferenceModel(self.net)
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=cfg.lr,
                                     weight_decay=cfg.weight_decay)
        total = cfg.epochs * cfg.steps_per_epoch
        self.sched = torch.optim.lr_scheduler.OneCycleLR(
            self.opt, max_lr=cfg.lr, total_steps=total, pct_start=0.1)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.device.type == "cuda")
        self.epoch, self.best_dice, self.elapsed = 0, -1.0, 0.0
        if resume and (self.out / "last.pt").exists():
            self._load_state(self.out / "last.pt")
        for ds in self.datasets:
            n_train = sum(s.dataset == ds.name for s in self.train_set)
            n_val = sum(s.dataset == ds.name for s in self.val_set)
            self.log(f"{ds.name}: train {n_train} images, val {n_val} images "
                     f"(split by {ds.group_rule})")
        self.log(f"{count_parameters(self.net):,} parameters on {self.device}")

    # --- checkpoints -------------------------------------------------------------------
    def _state(self) -> dict:
        return {"config": asdict(self.cfg), "model_config": self.net.config.to_dict(),
                "state_dict": self.net.state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "scaler": self.scaler.state_dict(),
                "epoch": self.epoch, "best_dice": self.best_dice, "elapsed": self.elapsed}

    def _load_state(self, path: Path) -> None:
        state = torch.load(path, map_location=self.device, weights_only=False)
        self.net.load_state_dict(state["state_dict"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.best_dice = state["epoch"], state["best_dice"]
        self.elapsed = state["elapsed"]
        self.log(f"resumed from {path} after epoch {self.epoch}")

    def _dataset_card(self, ds) -> dict:
        return {"name": ds.name, "path": str(ds.root), "group_rule": ds.group_rule,
                "licence": ds.licence,
                "images_train": sum(s.dataset == ds.name for s in self.train_set),
                "images_val": [s.key for s in self.val_set if s.dataset == ds.name]}

    @staticmethod
    def _save(obj: dict, path: Path) -> None:
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save(obj, tmp)
        os.replace(tmp, path)

    # --- one epoch ----------------------------------------------------------------------
    def _train_epoch(self, progress, task) -> float:
        cfg = self.cfg
        self.model.train()
        rng = np.random.default_rng([cfg.seed, self.epoch])  # resumable: depends on epoch only
        torch.manual_seed(cfg.seed * 100_003 + self.epoch)
        losses = []
        for _ in range(cfg.steps_per_epoch):
            images, targets = _batch(self.train_set, rng, cfg)
            images, targets = images.to(self.device), targets.to(self.device)
            x = images.permute(0, 3, 1, 2).float() / 255.0
            with torch.autocast(self.device.type, enabled=self.device.type == "cuda"):
                logits = self.net(normalise(x, self.net.config))
                loss = LOSSES[cfg.loss](logits, targets)
            self.opt.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
            self.sched.step()
            losses.append(loss.item())
            progress.update(task, advance=1, loss=f"{np.mean(losses[-20:]):.4f}")
        return float(np.mean(losses))

    def _record(self, row: dict) -> None:
        path = self.out / "metrics.csv"
        new = not path.exists() or self.epoch == 1
        with open(path, "w" if new else "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)

    def run(self) -> dict:
        cfg = self.cfg
        columns = [TextColumn(f"epoch {{task.fields[epoch]}}/{cfg.epochs}"),
                   BarColumn(), TextColumn("loss {task.fields[loss]}"),
                   TextColumn("val Dice {task.fields[val]}"), TimeElapsedColumn(),
                   TextColumn("ETA"), TimeRemainingColumn()]
        with Progress(*columns, transient=False) as progress:
            task = progress.add_task("train", total=cfg.epochs * cfg.steps_per_epoch,
                                     completed=self.epoch * cfg.steps_per_epoch,
                                     epoch=self.epoch, loss="-", val="-")
            while self.epoch < cfg.epochs:
                start = time.perf_counter()
                train_loss = self._train_epoch(progress, task)
                means, threshold, per_set = validate(self.model, self.val_set, self.device) \
                    if self.val_set else (_NO_SCORES, 0.5, {})
                self.epoch += 1
                self.elapsed += time.perf_counter() - start
                at_half = means[0.5]
                row = {"epoch": self.epoch, "train_loss": round(train_loss, 5),
                       "val_dice@0.5": round(at_half["dice"], 5),
                       "val_auc": round(at_half["auc"], 5),
                       "best_threshold": threshold,
                       "val_dice@best": round(means[threshold]["dice"], 5),
                       **{f"val_dice@best[{name}]": round(by_t[threshold]["dice"], 5)
                          for name, by_t in per_set.items()},
                       "lr": self.sched.get_last_lr()[0], "seconds": round(self.elapsed, 1)}
                self._record(row)
                score = means[threshold]["dice"]
                if not self.val_set or score > self.best_dice:
                    self.best_dice = score
                    self._save_best(means[threshold], threshold,
                                    {name: by_t[threshold] for name, by_t in per_set.items()})
                self._save(self._state(), self.out / "last.pt")
                progress.update(task, epoch=self.epoch, val=f"{score:.4f}")
        plot_curves(self.out / "metrics.csv", self.out / "curves.png")
        return load_json(self.out / "model.json")

    def _save_best(self, scores: dict, threshold: float, per_set: dict) -> None:
        cfg = self.cfg
        weights = self.out / "model.pt"
        self._save({"model_config": self.net.config.to_dict(),
                    "state_dict": {k: v.cpu() for k, v in self.net.state_dict().items()},
                    "epoch": self.epoch}, weights)
        card = {
            "card_version": CARD_VERSION,
            "name": self.out.name,
            "architecture": "attention-unet",
            "model": self.net.config.to_dict(),
            "parameters": count_parameters(self.net),
            "working_size": cfg.size,
            "input": "uint8 N x H x W x 3 RGB, H = W = working_size",
            "output": "float32 N x H x W vessel probability",
            "preprocessing": "crop to the field-of-view bounding box, scale its longer side to "
                             "working_size, centre on black (retina_batch.preprocess.prepare)",
            "normalisation": "per-image per-channel standardisation inside the model",
            "threshold": threshold,
            "training": {
                "data": [str(d) for d in cfg.data_dirs],
                "datasets": [self._dataset_card(ds) for ds in self.datasets],
                "images_train": [s.key for s in self.train_set],
                "images_val": [s.key for s in self.val_set],
                "group_rule": ", ".join(sorted({ds.group_rule for ds in self.datasets})),
                "recipe": asdict(cfg),
                "epoch": self.epoch,
                "seconds": round(self.elapsed, 1),
                "device": str(self.device),
                "machine": f"{platform.processor() or platform.machine()}, "
                           f"{torch.get_num_threads()} threads",
                "torch": torch.__version__,
            },
            "validation": {"where": "whole image, original pixel grid; mean of the data "
                                    "folders' means",
                           **{k: round(v, 5) for k, v in scores.items()},
                           "per_dataset": {name: {k: round(v, 5) for k, v in s.items()}
                                           for name, s in per_set.items()}} if self.val_set
            else {"where": "none held out (--val-fraction 0): the weights are the last "
                           "epoch's, the threshold the default 0.5"},
            "weights": weights.name,
            "sha256": sha256(weights),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        write_json_atomic(self.out / "model.json", card)


_NO_SCORES = {float(t): {"dice": float("nan"), "auc": float("nan")} for t in THRESHOLDS}


def load_json(path: Path) -> dict:
    import json

    with open(path) as f:
        return json.load(f)


def plot_curves(csv_path: Path, png_path: Path) -> None:
    """Loss and validation Dice per epoch; skipped quietly when matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    epochs = [int(r["epoch"]) for r in rows]
    validated = not math.isnan(float(rows[-1]["val_dice@best"]))  # --val-fraction 0: nan
    fig, axes = plt.subplots(1, 2 if validated else 1, figsize=(9 if validated else 4.5, 3.5),
                             squeeze=False)
    a = axes[0, 0]
    a.plot(epochs, [float(r["train_loss"]) for r in rows])
    a.set(xlabel="epoch", ylabel="train loss")
    if not validated:
        a.set_title("no validation held out (--val-fraction 0)", fontsize=9)
    else:
        _plot_validation(axes[0, 1], epochs, rows)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def _plot_validation(b, epochs: list[int], rows: list[dict]) -> None:
    b.plot(epochs, [float(r["val_dice@best"]) for r in rows], label="Dice @ best threshold")
    # several data folders: one line per camera as well, so a loss on one shows
    for column in [c for c in rows[0] if c.startswith("val_dice@best[")]:
        b.plot(epochs, [float(r[column]) for r in rows], label=column[len("val_dice@best"):],
               linestyle="--")
    b.plot(epochs, [float(r["val_auc"]) for r in rows], label="ROC AUC")
    b.set(xlabel="epoch", ylabel="validation")
    b.legend()


def train(data_dirs, out_dir: str, resume: bool = False, log=print, **options) -> dict:
    """Train a model on one data folder or a list of them; returns its card. Options are
    TrainConfig's fields."""
    if isinstance(data_dirs, (str, os.PathLike)):
        data_dirs = [data_dirs]
    if options.get("balance", "datasets") not in ("datasets", "images"):
        raise ValueError("balance must be 'datasets' or 'images'")
    if options.get("loss", "bce+dice") not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}")
    if options.get("norm", "image") not in ("image", "local"):
        raise ValueError("norm must be 'image' or 'local'")
    cfg = TrainConfig(data_dirs=[str(d) for d in data_dirs], out_dir=str(out_dir), **options)
    if cfg.epochs < 1 or cfg.steps_per_epoch < 1:
        raise ValueError("epochs and steps per epoch must be at least 1")
    if cfg.crop % 2**cfg.depth or cfg.size % 2**cfg.depth:
        raise ValueError(f"crop and size must be multiples of {2**cfg.depth} (2^depth)")
    return Trainer(cfg, resume=resume, log=log).run()
