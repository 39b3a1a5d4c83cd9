"""The dense objectives' loss steps side by side: seconds and peak memory of each arm.

One step = every arm's loss on the same student / teacher patch maps and crop boxes (2 global
+ 4 local views, the reference shapes of ``loss_step.py``) and its backward into the student's
maps; the arms are run round-robin, ``--repeats`` times each after a warm-up, and each arm's
median is reported with its ratio to NeCo's. Peak memory of a step beyond what was held
before it: on CUDA ``max_memory_allocated``; on CPU (Linux) the peak resident memory (reset
before every step, ``neco_loss.training.step_costs``). ``continued`` reads the maps as backbone
features (``D`` = the backbone width) through its two expanders. PaKa's paper claims 37% less
time and 24% less memory than NeCo (arXiv 2509.05606).

Usage:
    python benchmarks/objectives_step.py                          # CPU, batch 8, 224 px globals
    python benchmarks/objectives_step.py --device cuda --batch 64
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from loss_step import LOCAL_GRID, neco_inputs, synchronize

from neco_loss.objectives import OBJECTIVES, BuildContext, build_objective
from neco_loss.training.step_costs import StepCosts

PATCH = 14  # reference DINOv2 ViT-S/14: boxes in pixels of 224 / 98 px crops


def step(criterion: torch.nn.Module, inputs: tuple, crop_sizes: list[int], device: str) -> float:
    """Seconds of one loss forward and backward."""
    student, teacher, boxes = inputs
    synchronize(device)
    start = time.perf_counter()
    criterion(student, teacher, boxes, crop_sizes=crop_sizes).backward()
    synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--global-grid", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--objectives", nargs="+", default=list(OBJECTIVES))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    inputs = neco_inputs(args)
    crop_sizes = [args.global_grid * PATCH] * 2 + [LOCAL_GRID * PATCH] * 4
    context = BuildContext(PATCH, args.dim, seed=0)
    arms = {name: build_objective(name, {}, context).to(args.device) for name in args.objectives}
    seconds: dict[str, list[float]] = {name: [] for name in arms}
    peaks: dict[str, list[float]] = {name: [] for name in arms}
    for criterion in arms.values():  # warm-up
        step(criterion, inputs, crop_sizes, args.device)
    for _ in range(args.repeats):
        for name, criterion in arms.items():
            for tensor in inputs[0]:
                tensor.grad = None
            costs = StepCosts(torch.device(args.device))
            seconds[name].append(step(criterion, inputs, crop_sizes, args.device))
            peak = costs.peak_mib()
            if peak is not None:
                peaks[name].append(peak)
    print(
        f"loss step per objective, batch {args.batch}, 2 x {args.global_grid}^2 + 4 x "
        f"{LOCAL_GRID}^2 tokens, D = {args.dim}, {args.device}, {torch.get_num_threads()} "
        f"threads, median of {args.repeats}, torch {torch.__version__}"
    )
    print("| objective | ms / step | vs neco | peak MiB | vs neco |")
    print("|---|---|---|---|---|")
    first = next(iter(arms))
    base_time = statistics.median(seconds[first])
    base_peak = statistics.median(peaks[first]) if peaks[first] else None
    for name in arms:
        median = statistics.median(seconds[name])
        peak = statistics.median(peaks[name]) if peaks[name] else None
        peak_text = "-" if peak is None else f"{peak:.1f}"
        ratio = "-" if peak is None or not base_peak else f"{peak / base_peak:.2f}x"
        print(
            f"| {name} | {median * 1e3:.1f} | {median / base_time:.2f}x | {peak_text} | {ratio} |"
        )


if __name__ == "__main__":
    main()
