"""``neco train``: NeCo post-pretraining in a plain PyTorch loop.

A plain loop rather than Lightning: the loss needs a student, an EMA teacher and per-step
schedules, all a few lines each, and exact resumption is easier to guarantee (and test) when
every source of randomness is in view. The lightly integration offers a LightningModule.

Exact resume: augmentations are seeded per (seed, epoch, image), the data order per (seed,
epoch), drop-path by the global RNG reseeded per (seed, step, process), and the reference draws
by ``NeCoLoss``'s generator; the checkpoint stores the models, the optimizer, the loss state
(queue), that generator and the step, so a resumed run continues bit-identically on the same
machine.
"""

from __future__ import annotations

import contextlib
import csv
import math
import signal
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from neco_loss import backbones
from neco_loss.checks import all_finite
from neco_loss.data import ImageFolder, NeCoMultiCrop, SyntheticScenes
from neco_loss.data.folder import skipped_files
from neco_loss.diagnostics import NeCoStats
from neco_loss.foreground import foreground_masks
from neco_loss.loss import NeCoLoss
from neco_loss.models import (
    DenseEncoder,
    DenseViT,
    EMATeacher,
    ProjectionHead,
    momentum_at,
    recording_cls_attention,
)
from neco_loss.progress import progress_bar
from neco_loss.references import all_gather
from neco_loss.schedules import cosine
from neco_loss.training.checkpoint import LAST, load_checkpoint, save_atomic
from neco_loss.training.config import TrainConfig, ignored_keys, multicrop_transform

BACKBONE_FILE = "backbone.pt"  # the student backbone's weights, loadable by DenseViT(checkpoint=)
STOP_NOTE = "stopped.txt"  # why a run stopped early (removed when it runs again)
SKIP_LOG = "skipped_images.txt"  # unreadable images of a folder dataset, one per line
ADVICE = " (lower the learning rates or the steepness, or set grad_clip)"


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
    """A permutation per (seed, epoch), cut into global batches of ``batch_size * world``.

    Process ``rank`` takes slice ``rank`` of every global batch, so the processes together see
    exactly what one process with the global batch would see, in the same order. ``start``
    (in global batches) skips what was already trained on.
    """

    def __init__(self, length: int, seed: int, batch_size: int, rank: int = 0, world: int = 1):
        self.length = length
        self.seed = seed
        self.batch_size = batch_size
        self.rank = rank
        self.world = world
        self.epoch = 0
        self.start = 0

    @property
    def batches_per_epoch(self) -> int:
        """Global batches per epoch (the last incomplete one is dropped)."""
        return self.length // (self.batch_size * self.world)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
        order = torch.randperm(self.length, generator=generator)
        global_batch = self.batch_size * self.world
        for batch in range(self.start, self.batches_per_epoch):
            first = batch * global_batch + self.rank * self.batch_size
            yield from order[first : first + self.batch_size].tolist()

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start) * self.batch_size


class MultiViewEncoder(nn.Module):
    """Encodes a list of views in one ``forward`` (what DistributedDataParallel needs).

    Views of one size go through the encoder together.

    Args:
        encoder: ``images (B, 3, s, s) -> maps (B, D, h, w)``.
        vit: The ViT inside ``encoder``, to record its CLS attention (``forward(...,
            attention=True)``).

    """

    def __init__(self, encoder: nn.Module, vit: nn.Module | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.vit = [vit]  # a list: not a submodule twice in state_dict and DDP

    def forward(
        self, views: list[Tensor], attention: bool = False
    ) -> list[Tensor] | tuple[list[Tensor], list[Tensor]]:
        """``V`` views ``(B, 3, s_v, s_v)`` -> ``V`` patch maps ``(B, D, h_v, w_v)``.

        With ``attention``, also each view's last-block CLS attention ``(B, heads, h_v, w_v)``
        (``neco_loss.models.recording_cls_attention``).
        """
        maps: dict[int, Tensor] = {}
        attentions: dict[int, Tensor] = {}
        sizes: dict[tuple[int, ...], list[int]] = {}
        for index, view in enumerate(views):
            sizes.setdefault(tuple(view.shape), []).append(index)
        for indices in sizes.values():
            with contextlib.ExitStack() as stack:
                records = (
                    stack.enter_context(recording_cls_attention(self.vit[0])) if attention else []
                )
                encoded = self.encoder(torch.cat([views[i] for i in indices]))
            maps.update(zip(indices, encoded.chunk(len(indices)), strict=True))
            if attention:  # one record per encoder call: this size's views, in order
                grids = records[0].unflatten(-1, encoded.shape[2:]).chunk(len(indices))
                attentions.update(zip(indices, grids, strict=True))
        in_order = [maps[index] for index in range(len(views))]
        if not attention:
            return in_order
        return in_order, [attentions[index] for index in range(len(views))]


@dataclass
class TrainResult:
    """Where a run left its outputs and its last loss."""

    output_dir: Path
    checkpoint: Path
    backbone: Path
    steps: int
    last_loss: float
    already_finished: bool = False
    skipped: list[str] = field(default_factory=list)  # unreadable images (``SKIP_LOG``)


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


PATH_KEYS = ("dataset", "weights", "output_dir")


def _comparable(key: str, value: Any) -> Any:
    """A config value as resume compares it, with ``~`` expanded in paths.

    ``dataset: ~/images`` in a YAML file then equals the shell's expansion of
    ``--dataset ~/images`` on the command line.
    """
    if key in PATH_KEYS and isinstance(value, str):
        return str(Path(value).expanduser())
    return value


def training_images(config: TrainConfig) -> Any:
    """The training dataset of a config; a folder lists unreadable files in ``SKIP_LOG``."""
    if config.dataset == "synthetic":
        return SyntheticScenes(
            "train", size=config.image_size, length=config.train_images, seed=config.seed
        )
    return ImageFolder(config.dataset, skip_log=config.output_dir_path / SKIP_LOG)


def _device(config: TrainConfig, rank: int = 0) -> torch.device:
    """The process's device: with several processes on CUDA, GPU ``rank`` of this machine."""
    name = config.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"device {name!r} was asked for, but this machine has no usable CUDA GPU "
            "(torch.cuda.is_available() is False): use --device cpu, or auto."
        )
    if name == "cuda" and dist.is_initialized():
        return torch.device("cuda", rank % torch.cuda.device_count())
    return torch.device(name)


def _process_group() -> tuple[int, int]:
    """``(rank, world size)`` of the initialised process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


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


class Trainer:
    """Builds everything a config describes and runs (or resumes) the training loop.

    Args:
        config: The run's configuration.
        progress: Show a progress bar.

    """

    def __init__(self, config: TrainConfig, progress: bool = True) -> None:
        self.config = config
        self.progress = progress
        self.rank, self.world = _process_group()
        self.device = _device(config, self.rank)
        self.output_dir = config.output_dir_path
        backbone = build_backbone(config)
        head = ProjectionHead(backbone.embed_dim, config.head_hidden_dim, config.head_out_dim)
        self.student = DenseEncoder(backbone, head).to(self.device)
        self.teacher = EMATeacher(self.student).to(self.device)
        self.student_views: nn.Module = MultiViewEncoder(self.student, backbone.vit)
        if self.world > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.student_views = nn.parallel.DistributedDataParallel(
                self.student_views, device_ids=device_ids
            )
        self.teacher_views = MultiViewEncoder(
            self.teacher, self.teacher.module.get_submodule("backbone.vit")
        )
        gather = all_gather if self.world > 1 else None
        for name in ("global_size", "local_size"):
            if getattr(config, name) < backbone.patch_size:
                raise ValueError(
                    f"{name} (--{name.replace('_', '-')}) is {getattr(config, name)} px, smaller "
                    f"than one patch of the model ({backbone.patch_size} px): a crop must hold "
                    "at least one patch (reference: 224 and 98 at patch 14)."
                )
        # patch_size + crop_sizes: boxes in the reference code's frame for any crop size
        loss_options = {"patch_size": backbone.patch_size, **config.loss}
        self.criterion = NeCoLoss(seed=config.seed, gather=gather, **loss_options)
        self.criterion.to(self.device)
        self.crop_sizes = [config.global_size] * config.num_global
        self.crop_sizes += [config.local_size] * config.num_local
        self.optimizer = torch.optim.AdamW(_parameter_groups(self.student, config), lr=0.0)
        transform = multicrop_transform(config)
        self.dataset = MultiCropDataset(training_images(config), transform, config.seed)
        if len(self.dataset) < config.batch_size * self.world:
            raise ValueError(
                f"the dataset holds {len(self.dataset)} images, fewer than batch_size "
                f"{config.batch_size} x {self.world} processes: lower --batch-size (or "
                "--devices), or add images (--train-images for the synthetic scenes)."
            )
        self.criterion.check_batch(config.batch_size * (self.world if gather else 1))
        self.sampler = EpochSampler(
            len(self.dataset), config.seed, config.batch_size, self.rank, self.world
        )
        self.steps_per_epoch = self.sampler.batches_per_epoch
        epochs_steps = config.epochs * self.steps_per_epoch
        self.total_steps = min(config.max_steps or epochs_steps, epochs_steps)
        if self.rank == 0 and ignored_keys(config):
            warnings.warn(
                f"{' and '.join(ignored_keys(config))} (for the built-in synthetic scenes "
                f"only) ignored: every image below {config.dataset} is used, at its own size.",
                UserWarning,
                stacklevel=2,
            )
        if self.rank == 0 and config.max_steps is not None and config.max_steps > epochs_steps:
            warnings.warn(
                f"max_steps {config.max_steps} is more than epochs x steps per epoch = "
                f"{config.epochs} x {self.steps_per_epoch} = {epochs_steps}: the run stops "
                f"after {epochs_steps} steps (raise --epochs to train {config.max_steps}).",
                UserWarning,
                stacklevel=2,
            )
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

    def _train_step(self, views: list[Tensor], boxes: Tensor, log_stats: bool) -> float:
        momentum = self._set_schedules()
        # Drop-path draws from the global RNG: seed it per (seed, step, process) so that a
        # resumed run and every process of a distributed run draw reproducibly.
        torch.manual_seed((self.config.seed * 1_000_003 + self.step) * 1009 + self.rank)
        views = [view.to(self.device, non_blocking=True) for view in views]
        boxes = boxes.to(self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            student_maps, teacher_maps, attention = self._forward(views)
        foreground = None
        if attention is not None:
            foreground = [foreground_masks(view_attention) for view_attention in attention]
        features = None
        if not all_finite(student_maps + teacher_maps):
            features = f"the model produced NaN/Inf features{self._nonfinite_cause()}"
        # Agreed before the loss, whose reference gather is a collective every process enters.
        self._stop_if_any({"features": features})
        try:
            loss = self.criterion(
                student_maps,
                teacher_maps,
                boxes,
                crop_sizes=self.crop_sizes,
                foreground=foreground,
                compute_stats=log_stats,
            )
            failure = None if bool(torch.isfinite(loss)) else f"the loss is {float(loss)}{ADVICE}"
        except ValueError as error:  # e.g. no crop pair overlaps in this process's batch
            failure = str(error)
        self._stop_if_any({"loss": failure})  # before backward's all-reduce
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.student.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.teacher.update(self.student, momentum)
        value = loss.detach().clone()
        if self.world > 1:  # log the loss of the global batch, not of this process's slice
            dist.all_reduce(value)
            value /= self.world
        return float(value)

    def _nonfinite_cause(self) -> str:
        """Why features are NaN/Inf: the weights the run started from, or training's advice."""
        broken = [
            name
            for model, prefix in ((self.student, "student."), (self.teacher, "teacher."))
            for name, weight in model.state_dict().items()
            if weight.is_floating_point() and not bool(torch.isfinite(weight).all())
        ]
        if not broken or self.step > 0:
            return ADVICE
        source = f" ({self.config.weights})" if self.config.weights else ""
        return (
            f": the starting weights{source} hold NaN/Inf values, in {len(broken)} tensors, "
            f"e.g. {broken[:3]}; start from finite weights"
        )

    def _forward(
        self, views: list[Tensor]
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor] | None]:
        """Student maps, teacher maps and, for a ``loss_mask``, the teacher views' attention.

        ``teacher`` (the reference's ``use_teacher``): ``"ema"`` runs the EMA teacher;
        ``"student"`` (``use_teacher: False`` as the reference code runs it) encodes the global
        views a second time with the student, in the same forward (one per step for DDP), with
        gradient and fresh drop-path; ``"student_detached"`` reuses the student's own global
        maps, detached (no second forward).
        """
        globals_ = self.config.num_global
        attention = self.criterion.loss_mask != "all"
        teacher = self.config.teacher
        inputs = views + views[:globals_] if teacher == "student" else views
        encoded = self.student_views(inputs, attention and teacher != "ema")
        maps, attentions = encoded if isinstance(encoded, tuple) else (encoded, None)
        student_maps = maps[: len(views)]
        if teacher == "ema":
            encoded = self.teacher_views(views[:globals_], attention)
            teacher_maps, attentions = encoded if attention else (encoded, None)
        elif teacher == "student":
            teacher_maps = maps[len(views) :]
            attentions = None if attentions is None else attentions[len(views) :]
        else:
            teacher_maps = [m.detach() for m in maps[:globals_]]
        return student_maps, teacher_maps, None if attentions is None else attentions[:globals_]

    def _agreed_reasons(self, reasons: dict[str, str | None]) -> dict[str, list[str]]:
        """Every process's reasons to stop at this point, the same on every process.

        One all-reduce of flags per call; the messages are gathered only when a process has
        one. Every process must call this at the same point of the step.

        Returns:
            ``{kind: ["process R: message", ...]}`` for the kinds some process reported.

        """
        flags = torch.tensor([reason is not None for reason in reasons.values()], dtype=torch.int32)
        if self.world > 1:
            flags = flags.to(self.device)
            dist.all_reduce(flags)
        if not bool(flags.any()):
            return {}
        everyone: list[Any] = [reasons]
        if self.world > 1:
            everyone = [None] * self.world
            dist.all_gather_object(everyone, reasons)
        where = "" if self.world == 1 else "process {rank}: "
        agreed: dict[str, list[str]] = {}
        for rank, theirs in enumerate(everyone):
            for kind, reason in theirs.items():
                if reason is not None:
                    agreed.setdefault(kind, []).append(where.format(rank=rank) + reason)
        return agreed

    def _stop_if_any(self, reasons: dict[str, str | None]) -> None:
        """Raise ``TrainingStoppedError`` on every process if any process has a reason."""
        agreed = self._agreed_reasons(reasons)
        if agreed:
            messages = [message for kind in agreed.values() for message in kind]
            raise TrainingStoppedError(f"step {self.step + 1}: " + "; ".join(messages))

    def state(self) -> dict[str, Any]:
        """Everything needed to continue the run exactly."""
        generator = self.criterion.generator
        return {
            "step": self.step,
            "total_steps": self.total_steps,
            "student": self.student.state_dict(),
            "teacher": self.teacher.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "criterion": self.criterion.state_dict(),
            "config": self.config.to_dict(),
            "rng": {"criterion": generator.get_state() if generator is not None else None},
        }

    def _write_config(self) -> None:
        """``config.yaml`` in ``output_dir`` (created): what the run is, for ``--resume``."""
        import yaml  # the [train] extra: imported here so that `neco --help` needs the core only

        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / "config.yaml").write_text(yaml.safe_dump(self.config.to_dict()))

    def save(self) -> Path:
        """Write the checkpoint, the backbone weights and the config into ``output_dir``.

        Process 0 writes; the others wait for it, so that every process can resume from it.
        """
        if self.rank == 0:
            self._write_config()
            # The weights first: a kill between the two files leaves backbone.pt ahead of the
            # checkpoint, never behind it (a resume rewrites both).
            save_atomic(self.student.backbone.vit.state_dict(), self.output_dir / BACKBONE_FILE)
            backbones.save_native(self.student.backbone.vit, self.output_dir)  # transformers
            save_atomic(self.state(), self.output_dir / LAST)
        if self.world > 1:
            dist.barrier()
        return self.output_dir / LAST

    def resume(self) -> None:
        """Load ``output_dir/checkpoint_last.pt`` and continue from its step.

        The schedules (learning rates, weight decay, EMA momentum) span the run's total steps,
        so a resumed run must keep them: changing ``max_steps`` or ``epochs`` is refused.

        Raises:
            FileNotFoundError: If there is no checkpoint.
            ValueError: If it is corrupt, was written by a different config, or the total number
                of steps changed.

        """
        state = load_checkpoint(self.output_dir / LAST)
        saved = {
            k: _comparable(k, v)
            for k, v in state["config"].items()
            if k not in ("max_steps", "epochs")
        }
        current = {k: _comparable(k, v) for k, v in self.config.to_dict().items() if k in saved}
        changed = sorted(k for k in saved if saved[k] != current.get(k))
        if changed:
            raise ValueError(
                f"the checkpoint in {self.output_dir} was written with other values for "
                f"{changed}; resume with the same config."
            )
        total = int(state.get("total_steps", self.total_steps))
        if total != self.total_steps:
            raise ValueError(
                f"the run in {self.output_dir} schedules its learning rates, weight decay and EMA "
                f"over {total} steps (max_steps={state['config'].get('max_steps')}, epochs="
                f"{state['config'].get('epochs')}); max_steps/epochs now give {self.total_steps}. "
                "Resume with the run's max_steps and epochs, or start a new schedule from its "
                f"weights: --weights {self.output_dir / BACKBONE_FILE} --output-dir NEW_FOLDER."
            )
        self.student.load_state_dict(state["student"])
        self.teacher.load_state_dict(state["teacher"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.criterion.load_state_dict(state["criterion"])
        if state["rng"]["criterion"] is not None and self.criterion.generator is not None:
            self.criterion.generator.set_state(state["rng"]["criterion"])
        self.step = int(state["step"])

    def _batches(self) -> Iterator[tuple[list[Tensor], Tensor]]:
        """Batches from the current step on, epoch after epoch."""
        while True:
            epoch, offset = divmod(self.step, self.steps_per_epoch)
            self.sampler.epoch = self.dataset.epoch = epoch
            self.sampler.start = offset
            loader = DataLoader(
                self.dataset,
                batch_size=self.config.batch_size,
                sampler=self.sampler,
                num_workers=self.config.num_workers,
                worker_init_fn=unblock_stop_signals,
                drop_last=True,
                pin_memory=self.device.type == "cuda",
            )
            yield from loader

    def fit(self, stop_at: int | None = None) -> TrainResult:
        """Train until ``total_steps`` (or ``stop_at``), logging metrics, writing checkpoints.

        With several processes, process 0 logs, shows the progress bar and writes files. Every
        reason to stop (SIGTERM or SIGINT, a data error, NaN/Inf features or loss, no
        overlapping crop pair) is agreed by all processes at the same point of a step, so that
        they all stop at the same step, write one checkpoint (the weights after the last
        completed step) and exit with the same message; ``stopped.txt`` in ``output_dir`` says why.

        Args:
            stop_at: Pause after this step (schedules still span ``total_steps``); a later
                ``fit`` or a resumed run continues from there.

        Raises:
            TrainingStoppedError: When a process hit a data error or NaN/Inf values.
            SystemExit: After SIGTERM or SIGINT, once the checkpoint is written.

        """
        end = self.total_steps if stop_at is None else min(stop_at, self.total_steps)
        main = self.rank == 0
        if main:  # before the first step: a failed run still says what it was
            self._write_config()
            (self.output_dir / STOP_NOTE).unlink(missing_ok=True)
            if self.step == 0:  # a fresh run lists its own skipped images
                (self.output_dir / SKIP_LOG).unlink(missing_ok=True)
        self.student.train()
        log = MetricsLog(self.output_dir / "metrics.csv", self.step) if main else None
        bar = progress_bar(
            total=self.total_steps,
            initial=self.step,
            desc="neco train",
            unit="step",
            enabled=self.progress and main,
        )
        last_loss = math.nan
        batches = self._batches()
        stop = StopOnSignals()
        signalled: str | None = None  # the signal names every process agreed to stop on
        try:
            while self.step < end:
                batch, data_error = _next_batch(batches)
                agreed = self._agreed_reasons({"signal": stop.requested, "data": data_error})
                if "data" in agreed:
                    raise TrainingStoppedError(
                        f"step {self.step + 1}: " + "; ".join(agreed["data"])
                    )
                if agreed:  # a signal to some process: every process stops here
                    names = {reason.rsplit(": ", 1)[-1] for reason in agreed["signal"]}
                    signalled = "/".join(sorted(names))
                    break
                assert batch is not None
                views, boxes = batch
                start = time.perf_counter()
                logs_this_step = (self.step + 1) % self.config.log_every == 0
                last_loss = self._train_step(views, boxes, log_stats=logs_this_step and main)
                speed = self.config.batch_size * self.world / (time.perf_counter() - start)
                self.step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{last_loss:.4f}", img_s=f"{speed:.1f}", refresh=False)
                if log is not None and logs_this_step:
                    stats = self.criterion.last_stats
                    assert stats is not None
                    group = self.optimizer.param_groups[0]
                    log.write(
                        self.step, last_loss, group["lr"], group["weight_decay"], speed, stats
                    )
                every = self.config.checkpoint_every
                if every and self.step % every == 0 and self.step < end:
                    self.save()
        except TrainingStoppedError as failure:
            # The note first: save() ends in a barrier, after which processes may exit at once.
            checkpoint = self.output_dir / LAST
            self._note(f"{failure}. {checkpoint} holds the weights after step {self.step}.")
            self.save()
            raise
        finally:
            bar.close()
            stop.restore()
            if log is not None:
                log.close()
        checkpoint_path = self.output_dir / LAST
        message = f"{signalled}: stopped after step {self.step}; checkpoint {checkpoint_path}"
        if signalled:  # the note before save()'s barrier, as above
            self._note(message + "; continue with --resume.")
        checkpoint = self.save()
        if signalled:
            raise SystemExit(message)
        return TrainResult(
            self.output_dir,
            checkpoint,
            self.output_dir / BACKBONE_FILE,
            self.step,
            last_loss,
            skipped=skipped_files(self.output_dir / SKIP_LOG),
        )

    def _note(self, text: str) -> None:
        """Write why the run stopped to ``output_dir/stopped.txt`` (process 0)."""
        if self.rank == 0:
            (self.output_dir / STOP_NOTE).write_text(text + "\n")


def _next_batch(
    batches: Iterator[tuple[list[Tensor], Tensor]],
) -> tuple[tuple[list[Tensor], Tensor] | None, str | None]:
    """The next batch, or the reason it could not be read (agreed before the step runs)."""
    try:
        return next(batches), None
    except Exception as error:  # a corrupt image, a vanished file: every process must know
        return None, f"data error: {type(error).__name__}: {error}"


class TrainingStoppedError(RuntimeError):
    """A process could not go on (data error, NaN/Inf); every process raises it at one step."""


STOP_SIGNALS = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT"}
"""Signals that stop a run after its step, with a checkpoint: preemption and ``kill`` (SIGTERM),
Ctrl-C and torch's parent-death signal to the processes of ``--devices N`` (SIGINT)."""


class StopOnSignals:
    """Turns SIGTERM and SIGINT into a request to stop after this step.

    The loop then saves a checkpoint and exits; ``--resume`` continues exactly (more signals
    while it does so change nothing: SIGKILL ends a run at once, without a checkpoint). Only
    installed in the main thread (signal handlers cannot be set elsewhere); installing replaces
    an inherited "ignore" (a background job's SIGINT), so that the processes of ``--devices N``
    take torch's parent-death SIGINT and never outlive the parent that started them.

    The kernel delivers a process-directed signal to any thread that does not block it, and a
    signal delivered to one of gloo's communication threads interrupts its socket calls and
    aborts the process ("terminate called without an active exception"). So, while installed,
    both signals are blocked in the main thread, and in every thread started from then on
    (threads inherit the mask), and one thread takes them with ``sigtimedwait``: no
    communication thread started during training can receive them (those of
    ``init_process_group`` block them too, see ``neco_loss.training.distributed``). Threads
    started earlier that leave them unblocked get the Python handler, which makes the same
    request.

    Attributes:
        requested: The name of the first signal received (``"SIGTERM"``), else ``None``.

    """

    WAIT_S = 0.2  # how often the waiting thread checks whether it should end

    def __init__(self) -> None:
        self.requested: str | None = None
        self.previous: dict[int, Any] = {}
        self._mask: set[int | signal.Signals] | None = None
        self._done = threading.Event()
        self._waiter: threading.Thread | None = None
        if threading.current_thread() is threading.main_thread():
            for number in STOP_SIGNALS:
                self.previous[number] = signal.signal(number, self._request)
            self._mask = signal.pthread_sigmask(signal.SIG_BLOCK, set(STOP_SIGNALS))
            self._waiter = threading.Thread(target=self._wait, name="neco-signals", daemon=True)
            self._waiter.start()  # after the block: it inherits it, as sigtimedwait needs

    def _request(self, signum: int, frame: Any) -> None:
        self.requested = self.requested or STOP_SIGNALS[signal.Signals(signum)]

    def _wait(self) -> None:
        while not self._done.is_set():
            info = signal.sigtimedwait(set(STOP_SIGNALS), self.WAIT_S)
            if info is not None:
                self._request(info.si_signo, None)

    def restore(self) -> None:
        """Stop waiting, unblock the signals and reinstall the previous handlers.

        A signal still pending is delivered on unblocking, to this object's handler.
        """
        if self._waiter is not None:
            self._done.set()
            self._waiter.join()
        if self._mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, self._mask)
        for number, previous in self.previous.items():
            signal.signal(number, previous)


def unblock_stop_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: SIGTERM and SIGINT unblocked in a worker.

    Workers forked during training inherit ``StopOnSignals``'s blocked signals; unblocked,
    ``kill`` still ends them.
    """
    signal.pthread_sigmask(signal.SIG_UNBLOCK, set(STOP_SIGNALS))


class MetricsLog:
    """``metrics.csv``: one row per logged step."""

    HEADER = (
        "step",
        "loss",
        "lr_backbone",
        "weight_decay",
        "images_per_s",
        "valid_pair_fraction",
        "rank_agreement",
        "teacher_entropy",
    )

    def __init__(self, path: Path, resumed_step: int) -> None:
        """Open ``path``, keeping the rows of steps ``<= resumed_step`` (all of a fresh run's).

        A run resumed from a checkpoint older than its last logged rows repeats those steps:
        their rows are dropped, so that every step has one row.
        """
        path.parent.mkdir(parents=True, exist_ok=True)
        kept: list[list[str]] = []
        if resumed_step > 0 and path.exists():
            with path.open(newline="") as existing:
                kept = [
                    row for row in list(csv.reader(existing))[1:] if int(row[0]) <= resumed_step
                ]
        self.file = open(path, "w", newline="")  # noqa: SIM115 (closed by close)
        self.writer = csv.writer(self.file)
        self.writer.writerows([list(self.HEADER), *kept])
        self.file.flush()

    def write(
        self, step: int, loss: float, lr: float, weight_decay: float, speed: float, stats: NeCoStats
    ) -> None:
        """Append a row and flush it."""
        self.writer.writerow(
            [
                step,
                f"{loss:.6f}",
                f"{lr:.3e}",
                f"{weight_decay:.4f}",
                f"{speed:.2f}",
                f"{stats.valid_pairs / stats.total_pairs:.4f}",
                f"{stats.rank_agreement:.4f}",
                f"{stats.teacher_entropy:.4f}",
            ]
        )
        self.file.flush()

    def close(self) -> None:
        """Close the file."""
        self.file.close()


def train(
    config: TrainConfig, resume: bool = False, progress: bool = True, overwrite: bool = False
) -> TrainResult:
    """Run ``neco train``: build from ``config``, optionally resume, train, save.

    Args:
        config: The run.
        resume: Continue the run in ``output_dir`` from its checkpoint.
        progress: Show a progress bar.
        overwrite: Start afresh even if ``output_dir`` holds a run (its files are replaced).

    Returns:
        Paths of the outputs and the last loss; ``already_finished`` when a resumed run had
        nothing left to do (nothing is written then).

    Raises:
        FileExistsError: If ``output_dir`` holds a run and neither ``resume`` nor
            ``overwrite`` is set (nothing in the folder is touched).

    """
    finished = finished_run(config, resume, overwrite)
    if finished is not None:
        return finished
    trainer = Trainer(config, progress=progress)
    if resume:
        trainer.resume()
    elif overwrite and trainer.rank == 0:
        for name in (LAST, BACKBONE_FILE, "metrics.csv", STOP_NOTE):
            (config.output_dir_path / name).unlink(missing_ok=True)
    return trainer.fit()


def finished_run(config: TrainConfig, resume: bool, overwrite: bool) -> TrainResult | None:
    """Check ``output_dir`` before a run starts: the run there if resuming it has nothing to do.

    Returns:
        With ``resume``, the run in ``output_dir`` if it already completed its schedule under
        this config (nothing is to be written then); else ``None``.

    Raises:
        FileExistsError: If ``output_dir`` holds a checkpoint, or metrics without one (a run
            in progress, or stopped before its first checkpoint), and neither ``resume`` nor
            ``overwrite`` is set: a new run would overwrite it.

    """
    output = config.output_dir_path
    checkpoint = output / LAST
    metrics = output / "metrics.csv"
    if metrics.exists() and not checkpoint.exists() and not overwrite:
        raise FileExistsError(
            f"{output} holds a run without a checkpoint ({metrics.name} but no {LAST}): one in "
            "progress, or one stopped before its first checkpoint. Pass --overwrite to start "
            "afresh there, or choose another --output-dir."
        )
    if checkpoint.exists() and not (resume or overwrite):
        try:
            step = str(load_checkpoint(checkpoint)["step"])
        except ValueError:
            step = "unreadable"
        raise FileExistsError(
            f"{output} holds a run (checkpoint at step {step}): pass --resume to continue it, "
            "--overwrite to replace it, or choose another --output-dir."
        )
    if not resume:
        return None
    state = load_checkpoint(checkpoint)
    saved = state["config"]
    same_length = all(saved.get(k) == getattr(config, k) for k in ("max_steps", "epochs"))
    if "total_steps" not in state or not same_length or state["step"] < state["total_steps"]:
        return None
    return TrainResult(
        output, output / LAST, output / BACKBONE_FILE, int(state["step"]), math.nan, True
    )
