"""Runs in each of the processes of tests/test_distributed.py (gloo on CPU)."""

import torch
import torch.distributed as dist

from neco_loss import NeCoLoss


def scenario(views: int = 4, batch: int = 4, dim: int = 8, seed: int = 0):
    """Student / teacher maps and boxes of a whole batch; processes take slices of it."""
    generator = torch.Generator().manual_seed(seed)
    grids = [8, 8] + [4] * (views - 2)
    student = [torch.randn(batch, dim, g, g, generator=generator) for g in grids]
    teacher = [torch.randn(batch, dim, g, g, generator=generator) for g in grids[:2]]
    corner = torch.rand(batch, views, 2, generator=generator) * 50
    boxes = torch.cat(
        [corner, corner + 60 + torch.rand(batch, views, 2, generator=generator) * 60], -1
    )
    return student, teacher, boxes


def gather_function(name: str):
    if name == "lightly":
        from lightly.utils.dist import gather

        return gather
    from neco_loss.references import all_gather

    return all_gather


def worker(rank: int, world: int, init_file: str, out_dir: str, options: dict, gather: str):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    student, teacher, boxes = scenario()
    share = len(boxes) // world
    part = slice(rank * share, (rank + 1) * share)
    student = [m[part].clone().requires_grad_() for m in student]
    teacher = [m[part] for m in teacher]
    criterion = NeCoLoss(roi_size=2, seed=0, gather=gather_function(gather), **options)
    loss = criterion(student, teacher, boxes[part])
    loss.backward()
    torch.save({"loss": loss.detach(), "grads": [m.grad for m in student]}, f"{out_dir}/{rank}.pt")
    dist.destroy_process_group()
