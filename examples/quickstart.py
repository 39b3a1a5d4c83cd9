"""The NeCo loss on random tensors: what goes in, what comes out (python examples/quickstart.py)."""

import torch

from neco_loss import NeCoLoss, neco_loss

# Patch maps of 2 images: 2 global views (16 x 16 tokens) and 4 local views (7 x 7), 256-d.
student = [torch.randn(2, 256, 16, 16, requires_grad=True) for _ in range(2)]
student += [torch.randn(2, 256, 7, 7, requires_grad=True) for _ in range(4)]
teacher = [torch.randn(2, 256, 16, 16) for _ in range(2)]  # the EMA teacher sees the globals
# Every view's crop box in original-image pixels (x0, y0, x1, y1), per image.
boxes = torch.tensor(
    [
        [0, 0, 300, 300],
        [100, 80, 400, 380],
        [50, 50, 150, 150],
        [200, 200, 320, 320],
        [120, 10, 220, 110],
        [10, 200, 110, 300],
    ]
).float()
criterion = NeCoLoss()  # the reference configuration
loss = criterion(student, teacher, boxes.expand(2, -1, -1), compute_stats=True)
loss.backward()
print(f"NeCoLoss: {loss.item():.4f}", criterion.last_stats)

# Already aligned features (B, N, D) and references: the functional form.
aligned = torch.randn(2, 49, 256)
print(f"neco_loss: {neco_loss(aligned, aligned + 0.1, references=aligned[1]).item():.4f}")
