"""A short image-level DINO pretraining, the starting point of the CPU demo.

NeCo is a *post*-pretraining method: the paper improves DINO / DINOv2 backbones. The demo
cannot download one, so it gives a randomly initialised small ViT a brief DINO pretraining
(Caron et al., 2021) with lightly's ``DINOLoss`` and ``DINOProjectionHead`` on the same data,
then post-pretrains that with NeCo. The image embedding is the mean of the patch tokens.
Needs lightly (``pip install 'neco-loss[lightly]'``).
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from neco_loss.data import NeCoMultiCrop
from neco_loss.models import DenseViT, EMATeacher, momentum_at
from neco_loss.schedules import cosine

DINO_OUTPUT_DIM = 1024  # prototypes; small for a small model (DINO uses 65536)
DINO_MOMENTUM = 0.996  # DINO's teacher momentum at the start (cosine to 1)


class _PooledDino(nn.Module):
    """Backbone -> mean patch token -> DINO head."""

    def __init__(self, backbone: DenseViT) -> None:
        super().__init__()
        from lightly.models.modules import DINOProjectionHead

        self.backbone = backbone
        with warnings.catch_warnings():  # lightly 1.6 still uses the old weight_norm API
            warnings.simplefilter("ignore", FutureWarning)
            self.head = DINOProjectionHead(backbone.embed_dim, 256, 64, DINO_OUTPUT_DIM)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.backbone(images).mean(dim=(2, 3)))


def _views_only(batch: list[tuple[list[Tensor], Tensor]]) -> list[Tensor]:
    views = [item[0] for item in batch]
    return [torch.stack(group) for group in zip(*views, strict=True)]


def dino_warmup(
    backbone: DenseViT,
    images: Any,
    transform: NeCoMultiCrop,
    *,
    steps: int,
    batch_size: int = 32,
    lr: float = 5e-4,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """Train ``backbone`` in place with DINO for ``steps`` steps; returns the losses.

    Args:
        backbone: The ViT to pretrain.
        images: A dataset of images (or ``(image, ...)`` tuples).
        transform: Multi-crop views (its boxes are not used).
        steps: Optimisation steps.
        batch_size: Images per step.
        lr: Peak AdamW learning rate (cosine to 0).
        seed: Seed of data order and augmentations.
        progress: Show a progress bar.

    """
    from lightly.loss import DINOLoss
    from tqdm.auto import tqdm

    from neco_loss.training.trainer import MultiCropDataset

    torch.manual_seed(seed)
    device = next(backbone.parameters()).device
    student = _PooledDino(backbone).to(device)
    # lightly's DINO head uses weight norm, which cannot be deep-copied: build the copy.
    teacher = EMATeacher(
        student,
        copy_into=_PooledDino(copy.deepcopy(backbone)).to(device),
    )
    criterion = DINOLoss(output_dim=DINO_OUTPUT_DIM, warmup_teacher_temp_epochs=0).to(device)
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.04)
    dataset = MultiCropDataset(images, transform, seed)
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=True, drop_last=True, collate_fn=_views_only
    )
    losses: list[float] = []
    bar = tqdm(total=steps, desc="DINO warm-up", disable=not progress, unit="step")
    student.train()
    while len(losses) < steps:
        for views in loader:
            views = [view.to(device) for view in views]
            step = len(losses)
            if step == steps:
                break
            for group in optimizer.param_groups:
                group["lr"] = cosine(step, steps, lr, 0.0)
            globals_ = torch.cat(views[: transform.num_global])
            teacher_out = teacher(globals_).chunk(transform.num_global)
            student_out = [
                student(torch.cat(views[: transform.num_global])).chunk(transform.num_global)
            ]
            locals_ = views[transform.num_global :]
            if locals_:
                student_out.append(student(torch.cat(locals_)).chunk(len(locals_)))
            loss = criterion(list(teacher_out), [o for part in student_out for o in part])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            teacher.update(student, momentum_at(step, steps, DINO_MOMENTUM, 1.0))
            losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    trained: _PooledDino = teacher.module  # type: ignore[assignment]
    backbone.load_state_dict(trained.backbone.state_dict())  # DINO evaluates the teacher
    return losses
