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

import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from neco_loss import backbones
from neco_loss.checks import all_finite, nonfinite_weights
from neco_loss.data.feeding import EpochSampler, MultiCropDataset, batches_from
from neco_loss.data.folder import skipped_files
from neco_loss.foreground import foreground_masks
from neco_loss.models import DenseEncoder, DenseViT, EMATeacher, ProjectionHead, momentum_at
from neco_loss.objectives import BuildContext, build_objective, objective_named
from neco_loss.progress import progress_bar
from neco_loss.references import all_gather
from neco_loss.schedules import cosine
from neco_loss.teacher_step import StepMaps, teacher_step
from neco_loss.training.agreement import TrainingStoppedError, agreed_batch, stop_if_any
from neco_loss.training.assembly import (
    MultiViewEncoder,
    build_backbone,
    check_backbone,
    parameter_groups,
    process_group,
    schedule_length,
    training_device,
    training_images,
)
from neco_loss.training.config import TrainConfig, multicrop_transform
from neco_loss.training.run_folder import (
    BACKBONE_FILE,
    LAST,
    SKIP_LOG,
    STOP_NOTE,
    MetricsLog,
    TrainResult,
    check_resumable,
    load_checkpoint,
    save_atomic,
    write_config,
)
from neco_loss.training.signals import StopOnSignals, unblock_stop_signals
from neco_loss.training.step_costs import StepCosts

ADVICE = " (lower the learning rates or the steepness, or set grad_clip)"


class Trainer:
    """Builds everything a config describes and runs (or resumes) the training loop.

    Args:
        config: The run's configuration.
        progress: Show a progress bar.

    """

    def __init__(self, config: TrainConfig, progress: bool = True) -> None:
        self.config = config
        self.progress = progress
        self.rank, self.world = process_group()
        self.device = training_device(config, self.rank)
        self.output_dir = config.output_dir_path
        backbone = build_backbone(config)
        check_backbone(config, backbone)
        gather = all_gather if self.world > 1 else None
        # patch_size + crop_sizes: boxes in the reference code's frame for any crop size
        context = BuildContext(backbone.patch_size, backbone.embed_dim, config.seed, gather)
        self.criterion = build_objective(config.objective, config.loss, context).to(self.device)
        self._build_models(backbone)
        self.crop_sizes = [config.global_size] * config.num_global
        self.crop_sizes += [config.local_size] * config.num_local
        self._build_data()
        self.criterion.check_batch(config.batch_size * (self.world if gather else 1))
        self.total_steps = schedule_length(config, self.steps_per_epoch, announce=self.rank == 0)
        self.step = 0
        self.autocast = config.precision == "bf16" or (
            config.precision == "auto" and self.device.type == "cuda"
        )

    def _build_models(self, backbone: DenseViT) -> None:
        """The student, its EMA teacher, their multi-view encoders and the optimizer."""
        config = self.config
        head: nn.Module = nn.Identity()  # an objective on the backbone's maps has no head
        if objective_named(config.objective).projects:
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
        groups = parameter_groups(self.student, config, self.criterion)
        self.optimizer = torch.optim.AdamW(groups, lr=0.0)

    def _build_data(self) -> None:
        """The seeded multi-crop dataset and this process's sampler of it."""
        config = self.config
        transform = multicrop_transform(config)
        self.dataset = MultiCropDataset(training_images(config), transform, config.seed)
        if len(self.dataset) < config.batch_size * self.world:
            raise ValueError(
                f"the dataset holds {len(self.dataset)} images, fewer than batch_size "
                f"{config.batch_size} x {self.world} processes: lower --batch-size (or "
                "--devices), or add images (--train-images for the synthetic scenes)."
            )
        self.sampler = EpochSampler(
            len(self.dataset), config.seed, config.batch_size, self.rank, self.world
        )
        self.steps_per_epoch = self.sampler.batches_per_epoch

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
        step = self.encode(views)
        student_maps, teacher_maps = step.student, step.teacher
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
                foreground=step.foreground,
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
        if self.step > 0:  # the weights were finite when the run started
            return ADVICE
        # The teacher is a copy of the student before the first step: the student says it all.
        return nonfinite_weights(self.student.state_dict(), self.config.weights) or ADVICE

    def encode(
        self, views: list[Tensor], masks: Callable[[Tensor], Tensor] = foreground_masks
    ) -> StepMaps:
        """The step's student and teacher maps and foreground (``teacher_step``).

        Args:
            views: ``V`` views on the device, global views first.
            masks: Teacher attention ``(B, heads, h, w)`` -> foreground, for a ``loss_mask``.

        """
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return teacher_step(
                self.config.teacher,
                views,
                self.config.num_global,
                self.student_views,
                self.teacher_views,
                self.criterion.loss_mask != "all",
                masks,
            )

    def _stop_if_any(self, reasons: dict[str, str | None]) -> None:
        """Every process stops before step ``self.step + 1`` if any process has a reason."""
        stop_if_any(reasons, self.step + 1, self.world, self.device)

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

    def save(self) -> Path:
        """Write the checkpoint, the backbone weights and the config into ``output_dir``.

        Process 0 writes; the others wait for it, so that every process can resume from it.
        """
        if self.rank == 0:
            write_config(self.config)
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
        check_resumable(state, self.config, self.total_steps)
        self.student.load_state_dict(state["student"])
        self.teacher.load_state_dict(state["teacher"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.criterion.load_state_dict(state["criterion"])
        if state["rng"]["criterion"] is not None and self.criterion.generator is not None:
            self.criterion.generator.set_state(state["rng"]["criterion"])
        self.step = int(state["step"])

    def _batches(self) -> Iterator[tuple[list[Tensor], Tensor]]:
        """Batches from the current step on, epoch after epoch."""
        return batches_from(
            self.dataset,
            self.sampler,
            self.step,
            self.config.batch_size,
            num_workers=self.config.num_workers,
            worker_init_fn=unblock_stop_signals,
            pin_memory=self.device.type == "cuda",
        )

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
        log = self._open_run()
        bar = progress_bar(
            total=self.total_steps,
            initial=self.step,
            desc="neco train",
            unit="step",
            enabled=self.progress and self.rank == 0,
        )
        last_loss = math.nan
        self.costs = StepCosts(self.device)
        batches = self._batches()
        stop = StopOnSignals()
        signalled: str | None = None  # the signal names every process agreed to stop on
        try:
            while self.step < end:
                batch, signalled = agreed_batch(
                    batches, stop.requested, self.step + 1, self.world, self.device
                )
                if batch is None:  # a signal to some process: every process stops here
                    break
                last_loss = self._logged_step(batch, log, bar)
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
        return self._finish(signalled, last_loss)

    def _open_run(self) -> MetricsLog | None:
        """Prepare the folder and the student before the first step.

        Process 0 writes the config (a failed run still says what it was) and removes an old
        stop note, and returns the metrics log; the other processes return ``None``.
        """
        self.student.train()
        if self.rank != 0:
            return None
        write_config(self.config)
        (self.output_dir / STOP_NOTE).unlink(missing_ok=True)
        if self.step == 0:  # a fresh run lists its own skipped images
            (self.output_dir / SKIP_LOG).unlink(missing_ok=True)
        return MetricsLog(self.output_dir / "metrics.csv", self.step)

    def _logged_step(
        self, batch: tuple[list[Tensor], Tensor], log: MetricsLog | None, bar: Any
    ) -> float:
        """One training step, counted, shown on the bar and logged; returns its loss."""
        views, boxes = batch
        start = time.perf_counter()
        logs_this_step = (self.step + 1) % self.config.log_every == 0
        loss = self._train_step(views, boxes, log_stats=logs_this_step and log is not None)
        self.costs.add(time.perf_counter() - start)
        speed = self.config.batch_size * self.world / self.costs.seconds[-1]
        self.step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{speed:.1f}", refresh=False)
        if log is not None and logs_this_step:
            stats = self.criterion.last_stats  # None: an objective without diagnostics
            group = self.optimizer.param_groups[0]
            log.write(self.step, loss, group["lr"], group["weight_decay"], speed, stats)
        return loss

    def _finish(self, signalled: str | None, last_loss: float) -> TrainResult:
        """The last checkpoint; after a signal, the stop note and ``SystemExit``."""
        checkpoint_path = self.output_dir / LAST
        message = f"{signalled}: stopped after step {self.step}; checkpoint {checkpoint_path}"
        if signalled:  # the note before save()'s barrier, as in fit
            self._note(message + "; continue with --resume.")
        checkpoint = self.save()
        if self.rank == 0:
            self.costs.write(self.output_dir)
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
