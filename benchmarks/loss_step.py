"""The whole ``NeCoLoss`` at the reference configuration: sorting backends side by side.

One step = ROI alignment of the 10 (teacher global, student view) pairs, reference sampling,
teacher and student soft sorts of all pairs, CE, and the backward into the student's patch maps:
what the reference code's ``knn_loss`` does with its 20 ``DiffSortNet`` calls. Inputs are random
patch maps of the reference shapes (2 global views + 4 local views, 256-d head output) and
overlapping crop boxes. Reported: median time over repeats after one warm-up, the host syncs
and ``isfinite`` scans of one call (``neco_loss.host_syncs``; each sync makes the host wait on a
GPU), and on CUDA the peak memory allocated during a step beyond the inputs. Every backend is
run as users get it (``NeCoLoss()``: no diagnostics) and, for the first backend, also with the
diagnostics of every call (``compute_stats=True``, what a logging step costs).

Usage:
    python benchmarks/loss_step.py                              # CPU, batch 8, 224 px globals
    python benchmarks/loss_step.py --device cuda --batch 64     # the reference batch size
    python benchmarks/loss_step.py --device cuda --batch 64 --global-grid 37   # 518 px globals
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from neco_loss import NeCoLoss
from neco_loss.host_syncs import count_host_syncs, host_syncs

LOCAL_GRID = 7  # 98 px local crops with patch 14 (reference configs)


def neco_inputs(args: argparse.Namespace) -> tuple[list, list, torch.Tensor]:
    """Random student / teacher maps and overlapping boxes (B, 6, 4) on ``args.device``."""
    generator = torch.Generator().manual_seed(0)
    grids = [args.global_grid] * 2 + [LOCAL_GRID] * 4
    student = [torch.randn(args.batch, args.dim, g, g, generator=generator) for g in grids]
    teacher = [torch.randn(args.batch, args.dim, g, g, generator=generator) for g in grids[:2]]
    corner = torch.rand(args.batch, 6, 2, generator=generator) * 100
    size = torch.rand(args.batch, 6, 2, generator=generator) * 200 + 150  # all pairs overlap
    boxes = torch.cat([corner, corner + size], dim=-1)
    student = [m.to(args.device).requires_grad_() for m in student]
    return student, [m.to(args.device) for m in teacher], boxes.to(args.device)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(backend: str, stats: bool, args: argparse.Namespace) -> dict[str, float]:
    """Median seconds per step, syncs and scans per call, peak CUDA bytes, loss."""
    student, teacher, boxes = neco_inputs(args)
    criterion = NeCoLoss(backend=backend, seed=0, compute_stats=stats)
    loss = criterion(student, teacher, boxes)  # warm-up
    loss.backward()
    with count_host_syncs() as counts:
        criterion(student, teacher, boxes).backward()
    times = []
    peak = float("nan")
    for _ in range(args.repeats):
        synchronize(args.device)
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        criterion(student, teacher, boxes).backward()
        synchronize(args.device)
        times.append(time.perf_counter() - start)
        if args.device.startswith("cuda"):
            peak = float(torch.cuda.max_memory_allocated() - base)
    return {
        "seconds": statistics.median(times),
        "syncs": host_syncs(counts),
        "scans": counts["isfinite"],
        "peak": peak,
        "loss": float(loss.detach()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--global-grid", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--backends", nargs="+", default=["native", "native-python", "diffsort"])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"NeCoLoss step, batch {args.batch}, 2 x {args.global_grid}^2 + 4 x {LOCAL_GRID}^2 "
        f"tokens, D = {args.dim}, {args.device}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}"
    )
    print(
        "| backend | diagnostics | ms / step | vs first row | host syncs / call | isfinite "
        "scans / call | peak GiB (CUDA) | loss |"
    )
    print("|---|---|---|---|---|---|---|---|")
    runs = [(args.backends[0], False), (args.backends[0], True)]
    runs += [(backend, False) for backend in args.backends[1:]]
    baseline = None
    for backend, stats in runs:
        result = measure(backend, stats, args)
        baseline = baseline or result["seconds"]
        peak = "-" if result["peak"] != result["peak"] else f"{result['peak'] / 2**30:.2f}"
        print(
            f"| {backend} | {'every call' if stats else 'off (default)'} | "
            f"{result['seconds'] * 1e3:.1f} | {result['seconds'] / baseline:.2f}x | "
            f"{result['syncs']} | {result['scans']} | {peak} | {result['loss']:.6f} |"
        )


if __name__ == "__main__":
    main()
