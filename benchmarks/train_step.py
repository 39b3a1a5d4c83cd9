"""One training step of the reference recipe: step time, the NeCo loss's share, peak memory.

The reference recipe (``neco_dinov2r.yml``): DINOv2-registers ViT-S/14 (random weights here:
timing needs no pretrained ones), 2 global crops of 518 px and 4 local crops of 98 px, batch 64,
bf16 autocast, projection head 2048-2048-256, the EMA teacher on the global crops. A step is
the student and teacher forwards, the loss, the backward and the AdamW update. The loss is timed
on its own (forward and backward into the patch maps, synchronised), the rest around it; the
same step runs with the loss on our backend and on diffsort (the reference code's sorter).
If batch 64 does not fit, the largest power of two that does is used (and printed).

Usage:
    python benchmarks/train_step.py --device cuda                      # the reference step
    python benchmarks/train_step.py --global-size 224 --batch 8        # smaller, e.g. on a CPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from neco_loss import NeCoLoss
from neco_loss.models import DenseEncoder, DenseViT, EMATeacher, ProjectionHead


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_times(
    backend: str, batch: int, args: argparse.Namespace, device: torch.device
) -> dict[str, float | None]:
    """Median step and loss seconds over ``args.repeats`` steps, and the peak memory."""
    torch.manual_seed(0)
    backbone = DenseViT(args.model, drop_path_rate=0.1, **json.loads(args.model_kwargs))
    head = ProjectionHead(backbone.embed_dim, args.head_hidden_dim, args.head_out_dim)
    student = DenseEncoder(backbone, head).to(device)
    teacher = EMATeacher(student).to(device)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5)
    criterion = NeCoLoss(backend=backend, seed=0)
    sizes = [args.global_size] * 2 + [args.local_size] * 4
    views = [torch.randn(batch, 3, size, size, device=device) for size in sizes]
    corner = torch.rand(batch, 6, 2) * 100
    boxes = torch.cat([corner, corner + 300 + torch.rand(batch, 6, 2) * 100], -1).to(device)
    autocast = device.type == "cuda"
    steps, losses = [], []
    for repeat in range(args.repeats + 1):  # the first is a warm-up
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        synchronize(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            student_maps = [student(view) for view in views]
            with torch.no_grad():
                teacher_maps = [teacher(view) for view in views[:2]]
        maps = [m.detach().requires_grad_() for m in student_maps]
        synchronize(device)
        loss_start = time.perf_counter()
        criterion(maps, teacher_maps, boxes).backward()
        synchronize(device)
        loss_seconds = time.perf_counter() - loss_start
        torch.autograd.backward(student_maps, [m.grad for m in maps])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        teacher.update(student, 0.9995)
        synchronize(device)
        if repeat:
            steps.append(time.perf_counter() - start)
            losses.append(loss_seconds)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return {
        "step": statistics.median(steps),
        "loss": statistics.median(losses),
        "peak_gib": peak,
    }


def fitting_batch(backend: str, args: argparse.Namespace, device: torch.device) -> tuple:
    """``(batch, times)`` for the largest power of two <= ``args.batch`` that fits in memory."""
    batch = args.batch
    while True:
        try:
            return batch, step_times(backend, batch, args, device)
        except torch.OutOfMemoryError:
            if batch == 1:
                raise
            batch //= 2
            torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="vit_small_patch14_reg4_dinov2")
    parser.add_argument("--model-kwargs", default="{}", help="JSON, e.g. a small ViT on a CPU")
    parser.add_argument("--head-hidden-dim", type=int, default=2048)
    parser.add_argument("--head-out-dim", type=int, default=256)
    parser.add_argument("--global-size", type=int, default=518)
    parser.add_argument("--local-size", type=int, default=98)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backends", nargs="+", default=["native", "diffsort"])
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"train step: {args.model}, 2 x {args.global_size} px + 4 x {args.local_size} px, "
        f"{name}, torch {torch.__version__}"
    )
    print("| loss backend | batch | step ms | loss ms | loss share | peak GiB |")
    print("|---|---|---|---|---|---|")
    for backend in args.backends:
        batch, times = fitting_batch(backend, args, device)
        step, loss, peak = times["step"], times["loss"], times["peak_gib"]
        assert step is not None and loss is not None
        peak_text = "-" if peak is None else f"{peak:.2f}"
        print(
            f"| {backend} | {batch} | {step * 1e3:.0f} | {loss * 1e3:.0f} | {loss / step:.1%} "
            f"| {peak_text} |"
        )


if __name__ == "__main__":
    main()
