"""``neco train``: NeCo post-pretraining in a plain PyTorch loop.

A plain loop rather than Lightning: the loss needs a student, an EMA teacher and per-step
schedules, all a few lines each, and exact resumption is easier to guarantee (and test) when
every source of randomness is in view. The lightly integration offers a LightningModule.

Exact resume: augmentations are seeded per (seed, epoch, image), the data order per (seed,
epoch), the reference draws by ``NeCoLoss``'s generator and drop-path by the global RNG; the
checkpoint stores the models, the optimizer, the loss state (queue), both generators and the
step, so a resumed run continues bit-identically on the same machine.
"""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from neco_loss.data import ImageFolder, NeCoMultiCrop, SyntheticScenes
from neco_loss.loss import NeCoLoss
from neco_loss.models import DenseEncoder, DenseViT, EMATeacher, ProjectionHead, momentum_at
from neco_loss.schedules import cosine
from neco_loss.training.checkpoint import LAST, load_checkpoint, save_atomic
from neco_loss.training.config import TrainConfig

BACKBONE_FILE = "backbone.pt"  # the student backbone's weights, loadable by DenseViT(checkpoint=)


class MultiCropDataset(Dataset):
    """Applies ``NeCoMultiCrop`` to a dataset's images, seeded per (seed, epoch, index).

    Items of ``base`` may be images or tuples whose first entry is the image (masks are
    dropped). Returns ``(views, boxes)``.
    """

    def __init__(self, base: Any, transform: NeCoMultiCrop, seed: int) -> None:
        self.base = base
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[list[Tensor], Tensor]:
        item = self.base[index]
        image = item[0] if isinstance(item, tuple) else item
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + index)
            return self.transform(image)


class EpochSampler(Sampler[int]):
    """A permutation per (seed, epoch); ``start`` skips the indices already trained on."""

    def __init__(self, length: int, seed: int) -> None:
        self.length = length
        self.seed = seed
        self.epoch = 0
        self.start = 0

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
        yield from torch.randperm(self.length, generator=generator)[self.start :].tolist()

    def __len__(self) -> int:
        return self.length - self.start


@dataclass
class TrainResult:
    """Where a run left its outputs and its last loss."""

    output_dir: Path
    checkpoint: Path
    backbone: Path
    steps: int
    last_loss: float


def build_backbone(config: TrainConfig) -> DenseViT:
    """The student backbone of a config (seeded initialisation)."""
    torch.manual_seed(config.seed)
    return DenseViT(
        config.model,
        pretrained=config.pretrained and config.weights is None,
        checkpoint=config.weights,
        drop_path_rate=config.drop_path_rate,
        **config.model_kwargs,
    )


def training_images(config: TrainConfig) -> Any:
    """The training dataset of a config."""
    if config.dataset == "synthetic":
        return SyntheticScenes(
            "train", size=config.image_size, length=config.train_images, seed=config.seed
        )
    return ImageFolder(config.dataset)


def multicrop_transform(config: TrainConfig) -> NeCoMultiCrop:
    """The multi-crop transform a config describes."""
    return NeCoMultiCrop(
        config.global_size,
        config.local_size,
        config.num_global,
        config.num_local,
        tuple(config.global_scale),
        tuple(config.local_scale),
        config.min_overlap,
        config.flip,
        jitter_strength=config.jitter_strength,
        blur_strength=config.blur_strength,
    )


def _device(config: TrainConfig) -> torch.device:
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(config.device)


def _parameter_groups(student: DenseEncoder, config: TrainConfig) -> list[dict[str, Any]]:
    """Backbone / head x decay / no decay groups.

    Biases and norms are not decayed (reference ``exclude_norm_bias: True``).
    """
    groups = []
    for part, lr in ((student.backbone, config.lr_backbone), (student.head, config.lr_head)):
        decay = [p for p in part.parameters() if p.requires_grad and p.ndim > 1]
        other = [p for p in part.parameters() if p.requires_grad and p.ndim <= 1]
        groups.append({"params": decay, "peak_lr": lr, "decay": True})
        groups.append({"params": other, "peak_lr": lr, "decay": False})
    return [group for group in groups if group["params"]]


def _encode_views(encoder: nn.Module, views: list[Tensor]) -> list[Tensor]:
    """Patch maps of every view; views of one size go through the encoder together."""
    maps: list[Tensor | None] = [None] * len(views)
    sizes: dict[tuple[int, ...], list[int]] = {}
    for index, view in enumerate(views):
        sizes.setdefault(tuple(view.shape), []).append(index)
    for indices in sizes.values():
        encoded = encoder(torch.cat([views[i] for i in indices])).chunk(len(indices))
        for index, feature_map in zip(indices, encoded, strict=True):
            maps[index] = feature_map
    return [feature_map for feature_map in maps if feature_map is not None]


class Trainer:
    """Builds everything a config describes and runs (or resumes) the training loop.

    Args:
        config: The run's configuration.
        progress: Show a progress bar.

    """

    def __init__(self, config: TrainConfig, progress: bool = True) -> None:
        self.config = config
        self.progress = progress
        self.device = _device(config)
        self.output_dir = Path(config.output_dir).expanduser()
        backbone = build_backbone(config)
        head = ProjectionHead(backbone.embed_dim, config.head_hidden_dim, config.head_out_dim)
        self.student = DenseEncoder(backbone, head).to(self.device)
        self.teacher = EMATeacher(self.student).to(self.device)
        self.criterion = NeCoLoss(seed=config.seed, **config.loss).to(self.device)
        self.optimizer = torch.optim.AdamW(_parameter_groups(self.student, config), lr=0.0)
        transform = multicrop_transform(config)
        for size in (config.global_size, config.local_size):
            if size % backbone.patch_size:
                raise ValueError(
                    f"crop size {size} is not divisible by the patch size {backbone.patch_size}."
                )
        self.dataset = MultiCropDataset(training_images(config), transform, config.seed)
        if len(self.dataset) < config.batch_size:
            raise ValueError(
                f"the dataset holds {len(self.dataset)} images, fewer than batch_size "
                f"{config.batch_size}."
            )
        self.sampler = EpochSampler(len(self.dataset), config.seed)
        self.steps_per_epoch = len(self.dataset) // config.batch_size
        epochs_steps = config.epochs * self.steps_per_epoch
        self.total_steps = min(config.max_steps or epochs_steps, epochs_steps)
        self.step = 0
        self.autocast = config.precision == "bf16" or (
            config.precision == "auto" and self.device.type == "cuda"
        )

    def _set_schedules(self) -> float:
        """Learning rates and weight decay of this step; returns the EMA momentum."""
        config = self.config
        for group in self.optimizer.param_groups:
            group["lr"] = cosine(self.step, self.total_steps, group["peak_lr"], config.final_lr)
            group["weight_decay"] = (
                cosine(self.step, self.total_steps, config.weight_decay, config.weight_decay_end)
                if group["decay"]
                else 0.0
            )
        return momentum_at(self.step, self.total_steps, config.momentum, config.momentum_end)

    def _train_step(self, views: list[Tensor], boxes: Tensor) -> float:
        momentum = self._set_schedules()
        views = [view.to(self.device, non_blocking=True) for view in views]
        boxes = boxes.to(self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            student_maps = _encode_views(self.student, views)
            teacher_maps = _encode_views(self.teacher, views[: self.config.num_global])
        if not all(bool(torch.isfinite(m).all()) for m in student_maps + teacher_maps):
            raise FloatingPointError(
                f"the model produced NaN/Inf features at step {self.step}: training stopped. "
                "Lower the learning rates, or enable grad_clip."
            )
        loss = self.criterion(student_maps, teacher_maps, boxes)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"the loss is {float(loss)} at step {self.step}: training stopped. Lower the "
                "learning rates or steepness, or enable grad_clip."
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.student.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.teacher.update(self.student, momentum)
        return float(loss.detach())

    def state(self) -> dict[str, Any]:
        """Everything needed to continue the run exactly."""
        generator = self.criterion.generator
        return {
            "step": self.step,
            "student": self.student.state_dict(),
            "teacher": self.teacher.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "criterion": self.criterion.state_dict(),
            "config": self.config.to_dict(),
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "criterion": generator.get_state() if generator is not None else None,
            },
        }

    def save(self) -> Path:
        """Write the checkpoint, the backbone weights and the config into ``output_dir``."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / "config.yaml").write_text(yaml.safe_dump(self.config.to_dict()))
        save_atomic(self.state(), self.output_dir / LAST)
        save_atomic(self.student.backbone.vit.state_dict(), self.output_dir / BACKBONE_FILE)
        return self.output_dir / LAST

    def resume(self) -> None:
        """Load ``output_dir/checkpoint_last.pt`` and continue from its step.

        Raises:
            FileNotFoundError: If there is no checkpoint.
            ValueError: If it is corrupt or was written by a different config.

        """
        state = load_checkpoint(self.output_dir / LAST)
        saved = {k: v for k, v in state["config"].items() if k not in ("max_steps", "epochs")}
        current = {k: v for k, v in self.config.to_dict().items() if k in saved}
        changed = sorted(k for k in saved if saved[k] != current.get(k))
        if changed:
            raise ValueError(
                f"the checkpoint in {self.output_dir} was written with other values for "
                f"{changed}; resume with the same config (epochs and max_steps may change)."
            )
        self.student.load_state_dict(state["student"])
        self.teacher.load_state_dict(state["teacher"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.criterion.load_state_dict(state["criterion"])
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        if state["rng"]["criterion"] is not None and self.criterion.generator is not None:
            self.criterion.generator.set_state(state["rng"]["criterion"])
        self.step = int(state["step"])

    def _batches(self) -> Iterator[tuple[list[Tensor], Tensor]]:
        """Batches from the current step on, epoch after epoch."""
        while True:
            epoch, offset = divmod(self.step, self.steps_per_epoch)
            self.sampler.epoch = self.dataset.epoch = epoch
            self.sampler.start = offset * self.config.batch_size
            loader = DataLoader(
                self.dataset,
                batch_size=self.config.batch_size,
                sampler=self.sampler,
                num_workers=self.config.num_workers,
                drop_last=True,
                pin_memory=self.device.type == "cuda",
            )
            yield from loader

    def fit(self, stop_at: int | None = None) -> TrainResult:
        """Train until ``total_steps`` (or ``stop_at``), logging metrics, writing checkpoints.

        Args:
            stop_at: Pause after this step (schedules still span ``total_steps``); a later
                ``fit`` or a resumed run continues from there.

        """
        end = self.total_steps if stop_at is None else min(stop_at, self.total_steps)
        from tqdm.auto import tqdm

        self.student.train()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.output_dir / "metrics.csv"
        new_log = self.step == 0 or not log_path.exists()
        last_loss = math.nan
        with open(log_path, "w" if new_log else "a", newline="") as log_file:
            writer = csv.writer(log_file)
            if new_log:
                writer.writerow(
                    [
                        "step",
                        "loss",
                        "lr_backbone",
                        "weight_decay",
                        "images_per_s",
                        "valid_pair_fraction",
                        "rank_agreement",
                        "teacher_entropy",
                    ]
                )
            bar = tqdm(
                total=self.total_steps,
                initial=self.step,
                desc="neco train",
                disable=not self.progress,
                unit="step",
            )
            batches = self._batches()
            while self.step < end:
                views, boxes = next(batches)
                start = time.perf_counter()
                last_loss = self._train_step(views, boxes)
                speed = self.config.batch_size / (time.perf_counter() - start)
                self.step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{last_loss:.4f}", img_s=f"{speed:.1f}")
                if self.step % self.config.log_every == 0:
                    stats = self.criterion.last_stats
                    assert stats is not None
                    writer.writerow(
                        [
                            self.step,
                            f"{last_loss:.6f}",
                            f"{self.optimizer.param_groups[0]['lr']:.3e}",
                            f"{self.optimizer.param_groups[0]['weight_decay']:.4f}",
                            f"{speed:.2f}",
                            f"{stats.valid_pairs / stats.total_pairs:.4f}",
                            f"{stats.rank_agreement:.4f}",
                            f"{stats.teacher_entropy:.4f}",
                        ]
                    )
                    log_file.flush()
                every = self.config.checkpoint_every
                if every and self.step % every == 0 and self.step < end:
                    self.save()
            bar.close()
        checkpoint = self.save()
        return TrainResult(
            self.output_dir, checkpoint, self.output_dir / BACKBONE_FILE, self.step, last_loss
        )


def train(config: TrainConfig, resume: bool = False, progress: bool = True) -> TrainResult:
    """Run ``neco train``: build from ``config``, optionally resume, train, save.

    Returns:
        Paths of the outputs and the last loss.

    """
    trainer = Trainer(config, progress=progress)
    if resume:
        trainer.resume()
    return trainer.fit()
