"""``NeCo`` as a solo-learn method (``solo.methods.base.BaseMomentumMethod``).

The student is solo-learn's ``backbone`` + a NeCo ``projector``; the EMA teacher is its
``momentum_backbone`` + ``momentum_projector``, moved by solo-learn's ``MomentumUpdater``
(cosine ``base_tau -> final_tau``; reference 0.9995 -> 1). Batches come from a dataset whose
transform is ``BoxedMultiCrop``: ``(indexes, (views, boxes), targets)``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from functools import partial
from typing import Any

import omegaconf
import torch
from neco_loss.integrations.lightning_steps import logs_this_step
from neco_loss.integrations.solo_learn.config import loss_kwargs, neco_method_kwargs
from solo.methods.base import BaseMomentumMethod
from solo.utils.misc import omegaconf_select
from solo.utils.momentum import initialize_momentum_params
from torch import Tensor
from torch.optim.lr_scheduler import LambdaLR

from neco_loss.loss import NeCoLoss
from neco_loss.models import (
    REFERENCE_MOMENTUM,
    ProjectionHead,
    recording_cls_attention,
    vit_patch_size,
    vit_tokens_and_patch_map,
)
from neco_loss.references import all_gather
from neco_loss.schedules import warmup_cosine
from neco_loss.teacher_step import attention_grids, teacher_step


class NeCo(BaseMomentumMethod):
    """NeCo post-pretraining in solo-learn.

    Config (``cfg.method_kwargs``, defaults in ``neco_loss.integrations.solo_learn.config``):
    ``proj_hidden_dim``, ``proj_output_dim``, ``head_lr_scale`` (head lr = ``optimizer.lr`` x
    this), ``min_overlap`` (crops), ``gather_references``, ``teacher`` (``"ema"``;
    ``"student"``, the reference's ``use_teacher: False`` as a second student forward of the
    large crops; ``"student_detached"``) and every ``NeCoLoss`` option (``roi_size``,
    ``references``, ``steepness``, ``network``, ``relaxation``, ``loss``, ``top_k``,
    ``loss_mask``, ...). Boxes are mapped with the crops' pixel sizes and the backbone's patch
    size, exact for any crop size. The backbone must be a timm ViT (``dinov2_vits14_reg`` after
    ``register()``, or solo-learn's ``vit_*``).

    Raises:
        TypeError: If the backbone is not a timm ViT.
        ValueError: If ``method_kwargs`` are invalid or there are fewer than two crops.

    """

    def __init__(self, cfg: omegaconf.DictConfig) -> None:
        super().__init__(cfg)
        backbone: Any = self.backbone
        if not hasattr(backbone, "forward_features") or not hasattr(backbone, "patch_embed"):
            raise TypeError(
                f"NeCo needs a ViT backbone with patch tokens, but backbone.name is "
                f"{cfg.backbone.name!r} ({type(backbone).__name__})."
            )
        if not getattr(backbone, "dynamic_img_size", False):
            raise ValueError(
                f"NeCo feeds crops of several sizes to the backbone, but {cfg.backbone.name!r} "
                "was built for one size: add backbone.kwargs.dynamic_img_size=true (hydra: "
                "+backbone.kwargs.dynamic_img_size=true); the dinov2_*_reg backbones set it."
            )
        kwargs = cfg.method_kwargs
        if self.num_large_crops < 1 or self.num_crops < 2:
            raise ValueError(
                f"NeCo needs at least one large crop and two crops but the augmentations make "
                f"{self.num_large_crops} large and {self.num_small_crops} small."
            )
        self.projector = ProjectionHead(
            self.features_dim, kwargs.proj_hidden_dim, kwargs.proj_output_dim
        )
        self.momentum_projector = ProjectionHead(
            self.features_dim, kwargs.proj_hidden_dim, kwargs.proj_output_dim
        )
        initialize_momentum_params(self.projector, self.momentum_projector)
        self.head_lr_scale = float(kwargs.head_lr_scale)
        self.teacher = str(kwargs.teacher)
        gather = kwargs.gather_references
        self.neco_loss = NeCoLoss(
            **loss_kwargs(kwargs),
            patch_size=vit_patch_size(backbone),
            gather=all_gather if gather else None,
            # gathered references are drawn alike on every process from a shared seed
            seed=int(omegaconf_select(cfg, "seed", 5)) if gather else None,
        )

    @staticmethod
    def add_and_assert_specific_cfg(cfg: omegaconf.DictConfig) -> omegaconf.DictConfig:
        """Defaults and checks: NeCo's ``method_kwargs`` and the reference EMA momentum."""
        cfg.momentum = omegaconf_select(cfg, "momentum", {})
        cfg.momentum.base_tau = omegaconf_select(cfg, "momentum.base_tau", REFERENCE_MOMENTUM)
        cfg = super(NeCo, NeCo).add_and_assert_specific_cfg(cfg)
        cfg.method_kwargs = neco_method_kwargs(cfg.method_kwargs)
        return cfg

    @property
    def learnable_params(self) -> list[dict[str, Any]]:
        """solo-learn's groups plus the projector at ``optimizer.lr * head_lr_scale``."""
        projector = {
            "name": "projector",
            "params": self.projector.parameters(),
            "lr": self.lr * self.head_lr_scale,
        }
        return [*super().learnable_params, projector]

    def configure_optimizers(self) -> Any:
        """solo-learn's optimizer; its ``warmup_cosine`` as a per-group factor.

        solo-learn's ``LinearWarmupCosineAnnealingLR`` starts every group at one
        ``warmup_start_lr`` and then updates each group's lr from its previous value: without
        warmup the projector keeps the backbone's lr for the whole run. The same schedule as a
        factor of each group's own lr keeps ``head_lr_scale`` (and ``classifier_lr``) at every
        step; ``min_lr`` is reached by the backbone group, the others end at the same fraction.
        """
        configured = super().configure_optimizers()
        if self.scheduler != "warmup_cosine":
            return configured
        (optimizer,), (scheduler,) = configured
        if self.scheduler_interval == "step":
            total = float(self.trainer.estimated_stepping_batches)
            warmup = self.warmup_epochs * total / self.max_epochs
        else:
            total, warmup = float(self.max_epochs), float(self.warmup_epochs)
        start = self.warmup_start_lr / self.lr if warmup > 0 else 1.0
        factor = partial(
            warmup_cosine,
            warmup_steps=warmup,
            total_steps=total,
            start=start,
            end=self.min_lr / self.lr,
        )
        scheduler["scheduler"] = LambdaLR(optimizer, factor)
        return [optimizer], [scheduler]

    @property
    def momentum_pairs(self) -> list[tuple[Any, Any]]:
        """Backbone and projector pairs for the EMA update."""
        return [*super().momentum_pairs, (self.projector, self.momentum_projector)]

    def forward(self, images: Tensor) -> dict[str, Any]:
        """Student: ``logits``, pooled ``feats`` ``(B, D)``, ``neco_maps`` ``(B, d, h, w)``."""
        out = self.multicrop_forward(images)
        out["logits"] = self.classifier(out["feats"].detach())
        return out

    def multicrop_forward(self, images: Tensor) -> dict[str, Any]:
        """Student on any crop: pooled ``feats`` and ``neco_maps`` from one backbone pass."""
        return self._features(self.backbone, self.projector, images)

    @torch.no_grad()
    def momentum_forward(self, images: Tensor) -> dict[str, Any]:
        """Teacher, in eval mode (no drop-path, as the reference): ``feats`` and ``neco_maps``."""
        self.momentum_backbone.eval()
        self.momentum_projector.eval()
        return self._features(self.momentum_backbone, self.momentum_projector, images)

    def _features(self, backbone: Any, projector: ProjectionHead, images: Tensor) -> dict[str, Any]:
        if not self.no_channel_last:
            images = images.to(memory_format=torch.channels_last)
        tokens, patch_map = vit_tokens_and_patch_map(backbone, images)
        feats = backbone.forward_head(tokens, pre_logits=True)
        return {"feats": feats, "neco_maps": projector(patch_map)}

    def base_training_step(self, images: Tensor, targets: Tensor) -> dict[str, Any]:
        """solo-learn's online classifier step, with a zero loss when no image has a label.

        With ``data.no_labels`` every target is -1, and solo-learn's cross-entropy (which
        ignores -1) would average over nothing: NaN.
        """
        if bool((targets != -1).any()):
            return super().base_training_step(images, targets)
        out = self(images)
        zero = out["logits"].sum() * 0.0
        out.update({"loss": zero, "acc1": zero.detach(), "acc5": zero.detach()})
        return out

    def training_step(self, batch: Sequence[Any], batch_idx: int) -> Tensor:
        """NeCo loss over all (teacher large crop, student crop) pairs + the classifier loss."""
        indexes, views, boxes, targets = _unpack(batch)
        attention = self.neco_loss.loss_mask != "all"
        solo_step = SoloStepEncoders(
            self, partial(super().training_step, [indexes, views, targets], batch_idx), attention
        )
        maps = teacher_step(
            self.teacher,
            views,
            self.num_large_crops,
            solo_step.student,
            solo_step.momentum,
            attention,
        )
        log_stats = logs_this_step(self)
        neco = self.neco_loss(
            maps.student,
            maps.teacher,
            boxes,
            crop_sizes=[tuple(view.shape[-2:]) for view in views],
            foreground=maps.foreground,
            compute_stats=log_stats,
        )
        self.log("train_neco_loss", neco, on_epoch=True, sync_dist=True, prog_bar=True)
        if log_stats and self.neco_loss.last_stats is not None:
            self.log_dict(self.neco_loss.last_stats.as_dict())
        return neco + solo_step.outs["loss"]


class SoloStepEncoders:
    """solo-learn's own training step as the two encoders of ``teacher_step``.

    solo-learn's ``BaseMomentumMethod.training_step`` encodes every view with the student (one
    forward per view) and the large crops with the momentum backbone, in one call: the student
    encoder runs it (then encodes any appended global views again), and the EMA encoder returns
    its momentum maps with the attention recorded meanwhile.

    Args:
        method: The ``NeCo`` method.
        solo_training_step: solo-learn's step on this batch, returning its ``outs``.
        attention: Whether the loss needs the teacher views' foreground.

    """

    def __init__(self, method: NeCo, solo_training_step: Any, attention: bool) -> None:
        self.method = method
        self.solo_training_step = solo_training_step
        self.attention = attention
        self.outs: dict[str, Any] = {}
        self.momentum_records: list[Tensor] = []

    def student(
        self, views: list[Tensor], attention: bool
    ) -> tuple[list[Tensor], list[Tensor] | None]:
        """solo-learn's step on the batch's views, then a student forward of the rest."""
        # The EMA teacher's attention is recorded while solo-learn runs its momentum forward.
        record_momentum = self.attention and not attention
        with contextlib.ExitStack() as stack:
            own = (
                stack.enter_context(recording_cls_attention(self.method.backbone))
                if attention
                else []
            )
            if record_momentum:
                self.momentum_records = stack.enter_context(
                    recording_cls_attention(self.method.momentum_backbone)
                )
            self.outs = self.solo_training_step()
            maps = list(self.outs["neco_maps"])
            maps += [
                self.method.multicrop_forward(view)["neco_maps"] for view in views[len(maps) :]
            ]
        return maps, attention_grids(own, maps) if attention else None

    def momentum(
        self, views: list[Tensor], attention: bool
    ) -> tuple[list[Tensor], list[Tensor] | None]:
        """The momentum maps of the large crops that solo-learn's step made."""
        maps = list(self.outs["momentum_neco_maps"])
        return maps, attention_grids(self.momentum_records, maps) if attention else None


def _unpack(batch: Sequence[Any]) -> tuple[Tensor, list[Tensor], Tensor, Tensor]:
    """``(indexes, (views, boxes), targets)`` or a ``ValueError`` saying what NeCo needs."""
    try:
        indexes, (views, boxes), targets = batch
    except (TypeError, ValueError) as error:
        raise ValueError(
            "NeCo needs batches (indexes, (views, boxes), targets), as solo-learn's datasets "
            "yield with a BoxedMultiCrop transform; "
            f"got a {type(batch).__name__} of {len(batch)} items."
        ) from error
    if not isinstance(boxes, Tensor) or boxes.dim() != 3:
        raise ValueError(
            f"NeCo needs boxes (B, V, 5) after the views, got {type(boxes).__name__} "
            f"{tuple(boxes.shape) if isinstance(boxes, Tensor) else ''}; use BoxedMultiCrop."
        )
    return indexes, list(views), boxes, targets
