"""``neco sort-demo``: the soft sorting networks on an embedded default (no downloads).

A soft permutation at several steepness values (printed and drawn), the native backend against
diffsort (the reference code's sorter) on a NeCo-sized problem, and one loss step of each, timed.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

import torch

from neco_loss.functional import SortOptions, soft_permutation_loss
from neco_loss.sorting import soft_permutation

NAME = "sort-demo"
HELP = "soft sorting demo, native vs diffsort"
DEMO_STEEPNESS = (1.0, 10.0, 100.0)
REPEATS = 3  # timed steps after one warm-up; the median is shown


def _loss_step(backend: str, student: torch.Tensor, teacher: torch.Tensor) -> tuple[float, float]:
    """One CE(Q_t, Q_s) forward + backward; returns (loss, seconds)."""
    start = time.perf_counter()
    student = student.detach().requires_grad_()
    loss = soft_permutation_loss(student, teacher, SortOptions(backend=backend)).per_row.mean()
    loss.backward()
    return float(loss.detach()), time.perf_counter() - start


def _draw(example: torch.Tensor, perms: list[torch.Tensor], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(
        1, len(perms), figsize=(3.2 * len(perms) + 0.8, 3.4), layout="constrained"
    )
    for axis, steepness, perm in zip(axes, DEMO_STEEPNESS, perms, strict=True):
        shown = axis.imshow(perm.numpy(), cmap="viridis", vmin=0, vmax=1)
        axis.set_title(f"steepness {steepness:g}")
        axis.set_xlabel("rank j")
        axis.set_ylabel("element i")
        axis.set_xticks(range(perm.shape[1]))
        axis.set_yticks(range(perm.shape[0]), [f"{v:g}" for v in example.tolist()])
    figure.suptitle("Soft permutation P[i, j] = P(element i lands at rank j), bitonic, Cauchy")
    figure.colorbar(shown, ax=list(axes), label="P[i, j]", fraction=0.02, pad=0.02)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def demo(output: Path, rows: int, n: int) -> None:
    """Run the sorting demo; see the module docstring."""
    example = torch.tensor([0.3, -1.2, 0.25, 2.0, 0.9, -0.4])
    print("1. Soft permutation of", [round(v, 2) for v in example.tolist()])
    perms = []
    for steepness in DEMO_STEEPNESS:
        sorted_x, perm = soft_permutation(example.unsqueeze(0), steepness=steepness)
        perms.append(perm[0])
        print(
            f"   steepness {steepness:>5g}: soft-sorted",
            [round(v, 3) for v in sorted_x[0].tolist()],
        )
    print(f"   hard ranks (argmax over ranks): {perms[-1].argmax(dim=1).tolist()}")
    if importlib.util.find_spec("matplotlib") is not None:
        figure = output / "soft_permutation.png"
        _draw(example, perms, figure)
        print(f"   figure: {figure}")

    size_note = (
        " (64 images x 49 patches, NeCo's reference size)" if (rows, n) == (3136, 49) else ""
    )
    print(f"2. native vs diffsort: {rows} rows{size_note}, n = {n}")
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(rows, n, generator=generator)
    teacher = torch.randn(rows, n, generator=generator)
    if importlib.util.find_spec("diffsort") is None:
        print(
            "   diffsort is not installed (pip install 'neco-loss[diffsort]'): comparison skipped"
        )
        loss, seconds = _loss_step("native", student, teacher)
        print(f"   native loss {loss:.6f}, {seconds * 1e3:.0f} ms per step")
        return
    with torch.no_grad():
        _, ours = soft_permutation(student)
        _, reference = soft_permutation(student, backend="diffsort")
    print(f"   max |P_native - P_diffsort| = {(ours - reference).abs().max():.2e}")
    results = {}
    for backend in ("native", "diffsort"):
        runs = [_loss_step(backend, student, teacher) for _ in range(1 + REPEATS)][1:]  # warm-up
        results[backend] = sorted(runs, key=lambda run: run[1])[REPEATS // 2]  # median time
        loss, seconds = results[backend]
        print(
            f"   {backend:8s} CE loss {loss:.6f}  step (teacher + student sort, CE, backward)"
            f" {seconds * 1e3:6.0f} ms"
        )
    speedup = results["diffsort"][1] / results["native"][1]
    print(f"   native is {speedup:.1f}x faster; full tables: make bench (docs/performance.md)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--output``, ``--rows``, ``--n``."""
    parser.add_argument(
        "--output", type=Path, default=Path("outputs/sort_demo"), help="figure folder"
    )
    parser.add_argument(
        "--rows", type=int, default=3136, help="rows sorted (64 images x 49 patches)"
    )
    parser.add_argument("--n", type=int, default=49, help="elements per row")


def run(args: argparse.Namespace, overrides: list[str]) -> None:
    """The demo with the command line's sizes."""
    demo(args.output, args.rows, args.n)
