"""NeCo with lightly and PyTorch Lightning (compare lightly's examples/pytorch_lightning/dino.py).

python examples/lightly/neco_lightning.py                 # built-in synthetic scenes, CPU
python examples/lightly/neco_lightning.py --data ~/images --dinov2 --max-steps 10000
"""

import pytorch_lightning as pl
import torch
from common import arguments, backbone_and_transform, dataloader, save_backbone
from neco_loss.integrations.lightly import NeCo

args = arguments(__doc__.splitlines()[0])
backbone, transform = backbone_and_transform(args)
if args.dinov2:
    model = NeCo(backbone)  # reference settings
else:
    model = NeCo(
        backbone, head_hidden_dim=512, head_out_dim=128, lr_backbone=1e-4, lr_head=1e-3, roi_size=4
    )

loader = dataloader(args, transform)
accelerator = "gpu" if torch.cuda.is_available() else "cpu"
trainer = pl.Trainer(
    max_epochs=args.epochs,
    max_steps=args.max_steps,
    devices=1,
    accelerator=accelerator,
    logger=False,
    enable_checkpointing=False,
)
trainer.fit(model=model, train_dataloaders=loader)
save_backbone(model.student_backbone, args.output)
