"""``NeCo``: a LightningModule in the style of lightly's examples (``examples/pytorch_lightning``).

Student ViT + projection head, a teacher copy with ``deactivate_requires_grad`` moved by
``update_momentum`` on a ``cosine_schedule`` over the global steps, the core ``NeCoLoss``, and
AdamW over lightly's ``get_weight_decay_parameters`` (no decay on norms and biases).
"""

from __future__ import annotations

import copy
from typing import Any

import pytorch_lightning as pl
import torch
from lightly.models.utils import (
    deactivate_requires_grad,
    get_weight_decay_parameters,
    update_momentum,
)
from lightly.utils.dist import gather
from lightly.utils.scheduler import cosine_schedule
from neco_loss.integrations.lightly.transform import split_views_and_boxes
from neco_loss.integrations.lightning_steps import logs_this_step
from torch import Tensor, nn

from neco_loss.checks import check_choice
from neco_loss.models import DINOV2_REGISTERS, REFERENCE_MOMENTUM, DenseViT, ProjectionHead
from neco_loss.objectives import BuildContext, build_objective, objective_named
from neco_loss.teacher_step import TEACHERS, StepMaps, per_view_encoder, teacher_step


class NeCo(pl.LightningModule):
    """NeCo post-pretraining of a ViT as a LightningModule.

    Batches are what ``LightlyDataset`` (or any dataset) with ``NeCoTransform`` and
    ``MultiViewCollate`` yields: ``(views_then_boxes, targets, filenames)`` or
    ``(views_then_boxes, targets)``.

    Args:
        backbone: A ``DenseViT``, or a timm model name for one (``backbone_kwargs`` passed on).
        head_hidden_dim: Projection head width (reference: 2048).
        head_out_dim: Projection head output (reference: 256).
        lr_backbone: Backbone learning rate (reference: 1e-5 for DINOv2 ViT-S).
        lr_head: Head learning rate (reference: 1e-4).
        weight_decay: AdamW weight decay (reference: 0.04 at the start).
        momentum_start: EMA momentum at step 0 (reference: 0.9995; cosine to 1).
        n_global_views: Number of global views (the teacher's inputs).
        teacher: ``"ema"`` (reference), ``"student"`` (the reference's ``use_teacher: False``:
            a second student forward of the global views, with gradient) or
            ``"student_detached"`` (the student's own global maps, detached); see
            ``neco_loss.teacher_step.TEACHERS``.
        gather_distributed: Draw references from the batches of all processes with
            ``lightly.utils.dist.gather`` (default False, as lightly's losses).
        objective: The dense loss (``neco_loss.objectives.OBJECTIVES``): ``"neco"`` (default),
            or an arm of a side-by-side run on the same aligned pairs: ``"paka"``,
            ``"similarity_ce"``, ``"continued"`` (the testbed backbone's VICReg(L), on the
            backbone's maps: no projection head; its expanders train at ``lr_head``).
        backbone_kwargs: For a backbone given by name (e.g. ``pretrained=True``).
        **loss_kwargs: The objective's options; for ``neco``, ``NeCoLoss``'s (``roi_size``,
            ``references``, ``steepness``, ``loss_mask``, ...). ``patch_size`` defaults to the
            backbone's, and every step passes the views' pixel sizes, so boxes are exact for
            any crop size.

    """

    def __init__(
        self,
        backbone: DenseViT | str = DINOV2_REGISTERS,
        head_hidden_dim: int = 2048,
        head_out_dim: int = 256,
        lr_backbone: float = 1e-5,
        lr_head: float = 1e-4,
        weight_decay: float = 0.04,
        momentum_start: float = REFERENCE_MOMENTUM,
        n_global_views: int = 2,
        teacher: str = "ema",
        gather_distributed: bool = False,
        backbone_kwargs: dict[str, Any] | None = None,
        objective: str = "neco",
        **loss_kwargs: Any,
    ) -> None:
        super().__init__()
        if isinstance(backbone, str):
            backbone = DenseViT(backbone, **(backbone_kwargs or {}))
        self.student_backbone = backbone
        self.student_head: nn.Module = nn.Identity()  # an objective on the backbone's maps
        if objective_named(objective).projects:
            self.student_head = ProjectionHead(backbone.embed_dim, head_hidden_dim, head_out_dim)
        self.teacher_backbone = copy.deepcopy(self.student_backbone)
        self.teacher_head = copy.deepcopy(self.student_head)
        deactivate_requires_grad(self.teacher_backbone)
        deactivate_requires_grad(self.teacher_head)
        check_choice(teacher, "teacher", TEACHERS)
        self.teacher = teacher
        context = BuildContext(
            loss_kwargs.pop("patch_size", backbone.patch_size),
            backbone.embed_dim,
            loss_kwargs.pop("seed", None),
            gather if gather_distributed else None,
        )
        self.criterion = build_objective(objective, loss_kwargs, context)
        self.lr_backbone = lr_backbone
        self.lr_head = lr_head
        self.weight_decay = weight_decay
        self.momentum_start = momentum_start
        self.n_global_views = n_global_views

    def forward(self, images: Tensor) -> Tensor:
        """Student patch embeddings ``(B, head_out_dim, h, w)``."""
        return self.student_head(self.student_backbone(images))

    @torch.no_grad()
    def forward_teacher(self, images: Tensor) -> Tensor:
        """Teacher patch embeddings, in eval mode (no drop-path)."""
        self.teacher_backbone.eval()
        return self.teacher_head(self.teacher_backbone(images))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """One NeCo step: EMA update, both forwards, the loss, logs."""
        momentum = cosine_schedule(
            self.global_step, int(self.trainer.estimated_stepping_batches), self.momentum_start, 1
        )
        update_momentum(self.student_backbone, self.teacher_backbone, m=momentum)
        update_momentum(self.student_head, self.teacher_head, m=momentum)
        views, boxes = split_views_and_boxes(batch[0])
        maps = self.encode(views)
        log_stats = logs_this_step(self)
        loss = self.criterion(
            maps.student,
            maps.teacher,
            boxes,
            crop_sizes=[tuple(view.shape[-2:]) for view in views],
            foreground=maps.foreground,
            compute_stats=log_stats,
        )
        self.log("train_loss", loss, prog_bar=True)
        if log_stats and self.criterion.last_stats is not None:
            self.log_dict(self.criterion.last_stats.as_dict())
        return loss

    def encode(self, views: list[Tensor]) -> StepMaps:
        """Student maps, teacher maps (per ``teacher``) and the ``loss_mask`` foreground.

        ``neco_loss.teacher_step.teacher_step``, with one forward per view.
        """
        return teacher_step(
            self.teacher,
            views,
            self.n_global_views,
            per_view_encoder(self.forward, self.student_backbone.vit),
            per_view_encoder(self.forward_teacher, self.teacher_backbone.vit),
            self.criterion.loss_mask != "all",
        )

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW; backbone and head learning rates; no decay on norms and biases."""
        groups = []
        for modules, lr in (
            ([self.student_backbone], self.lr_backbone),
            ([self.student_head, self.criterion], self.lr_head),  # continued's expanders
        ):
            decay, no_decay = get_weight_decay_parameters(modules)
            groups.append({"params": decay, "lr": lr, "weight_decay": self.weight_decay})
            groups.append({"params": no_decay, "lr": lr, "weight_decay": 0.0})
        return torch.optim.AdamW([group for group in groups if group["params"]])
