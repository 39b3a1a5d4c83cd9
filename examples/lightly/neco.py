"""NeCo with lightly in a plain PyTorch loop (compare lightly's examples/pytorch/dino.py).

python examples/lightly/neco.py                      # built-in synthetic scenes, CPU
python examples/lightly/neco.py --data ~/images --dinov2 --max-steps 10000
"""

import copy

import torch
from common import arguments, backbone_and_transform, dataloader, save_backbone
from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.utils.scheduler import cosine_schedule
from neco_loss.integrations.lightly import split_views_and_boxes
from torch import nn

from neco_loss import NeCoLoss
from neco_loss.models import ProjectionHead


class NeCoModel(nn.Module):
    def __init__(self, backbone):
        super().__init__()
        self.student_backbone = backbone
        self.student_head = ProjectionHead(backbone.embed_dim, 512, 128)
        self.teacher_backbone = copy.deepcopy(backbone)
        self.teacher_head = copy.deepcopy(self.student_head)
        deactivate_requires_grad(self.teacher_backbone)
        deactivate_requires_grad(self.teacher_head)

    def forward(self, x):
        return self.student_head(self.student_backbone(x))

    @torch.no_grad()
    def forward_teacher(self, x):
        self.teacher_backbone.eval()
        return self.teacher_head(self.teacher_backbone(x))


args = arguments(__doc__.splitlines()[0])
backbone, transform = backbone_and_transform(args)
model = NeCoModel(backbone)
device = "cuda" if torch.cuda.is_available() else "cpu"
model.to(device)

loader = dataloader(args, transform)
# patch_size + crop_sizes (below): boxes stay exact when a crop is not a multiple of the patch
# (e.g. 98 px crops at patch 16, where the ViT drops the last 2 px)
criterion = NeCoLoss(roi_size=7 if args.dinov2 else 4, patch_size=backbone.patch_size)
optimizer = torch.optim.AdamW(
    [
        {"params": model.student_backbone.parameters(), "lr": 1e-5 if args.dinov2 else 1e-4},
        {"params": model.student_head.parameters(), "lr": 1e-4 if args.dinov2 else 1e-3},
    ],
    weight_decay=0.04,
)

total_steps = min(args.max_steps, args.epochs * len(loader))
step = 0
print("Starting Training")
for epoch in range(args.epochs):
    total_loss = 0.0
    for index, batch in enumerate(loader):
        if step == total_steps:
            break
        momentum = cosine_schedule(step, total_steps, 0.9995, 1)
        update_momentum(model.student_backbone, model.teacher_backbone, m=momentum)
        update_momentum(model.student_head, model.teacher_head, m=momentum)
        views, boxes = split_views_and_boxes(batch[0])
        views = [view.to(device) for view in views]
        student_maps = [model(view) for view in views]
        teacher_maps = [model.forward_teacher(view) for view in views[:2]]
        # diagnostics (two extra sorts, host syncs) only when they are printed: once per epoch
        loss = criterion(
            student_maps,
            teacher_maps,
            boxes.to(device),
            crop_sizes=[view.shape[-1] for view in views],
            compute_stats=index == 0,
        )
        total_loss += loss.detach()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        step += 1
    avg_loss = total_loss / max(1, step)
    print(
        f"epoch: {epoch:>02}, steps: {step}, loss: {avg_loss:.5f}, "
        f"rank agreement: {criterion.last_stats.rank_agreement:.3f}"
    )
save_backbone(model.student_backbone, args.output)
