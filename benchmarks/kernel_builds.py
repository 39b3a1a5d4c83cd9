"""The C++ kernel's builds side by side: portable vs AVX-512, one NeCo loss step each.

``setup.py`` compiles ``soft_sort.cpp`` twice on x86-64: ``_soft_sort`` (no ``-march``: any
x86-64 CPU) and ``_soft_sort_avx512`` (``-march=x86-64-v4``), and the loader picks the best one
the CPU runs. This measures what the portable build costs: the step of ``benchmarks/sorting.py``
(teacher sort, student sort and fused CE, forward and backward; bitonic, Cauchy, steepness 100,
float32) with each build, repeats interleaved so that both see the same machine load, median
seconds and the ratio to the best build. Builds this CPU cannot run are skipped.

Usage:
    python benchmarks/kernel_builds.py                  # n = 49 and 128, rows 3136, 7 repeats
    python benchmarks/kernel_builds.py --sizes 16 --rows 64 --repeats 1   # a smoke run
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import time
from pathlib import Path

import torch

from neco_loss.functional import SortOptions, soft_permutation_loss
from neco_loss.sorting.kernels import cpp


def installed_builds() -> list[str]:
    """The builds installed here that this CPU runs, best first."""
    return [name for name in cpp.runnable_builds() if importlib.util.find_spec(cpp.BUILDS[name])]


def use_build(name: str) -> str:
    """Make the native backend run build ``name``; returns the module's build flags."""
    os.environ[cpp.FORCE_BUILD] = name
    cpp.cpu_kernels.cache_clear()
    kernels = cpp.cpu_kernels()
    if kernels is None:
        raise RuntimeError(f"the {name} build does not load (see the warning)")
    return kernels.BUILD_FLAGS


def step_seconds(student: torch.Tensor, teacher: torch.Tensor) -> float:
    start = time.perf_counter()
    student = student.detach().requires_grad_()
    soft_permutation_loss(student, teacher, SortOptions()).per_row.mean().backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[49, 128])
    parser.add_argument("--rows", type=int, default=3136, help="batch 64 x 49 patches")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--output", type=Path, default=Path("outputs/benchmarks/kernel_builds.md"))
    args = parser.parse_args()
    builds = installed_builds()
    flags = {name: use_build(name) for name in builds}
    lines = [
        f"CPU: {cpp.cpu_name()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}; median of {args.repeats} steps",
        "",
        "| n | rows | build | flags | seconds per step | x best |",
        "|---|---|---|---|---|---|",
    ]
    for n in args.sizes:
        generator = torch.Generator().manual_seed(0)
        student = torch.randn(args.rows, n, generator=generator)
        teacher = torch.randn(args.rows, n, generator=generator)
        times: dict[str, list[float]] = {name: [] for name in builds}
        for name in builds:  # warm-up: plans and allocator
            use_build(name)
            step_seconds(student, teacher)
        for _ in range(args.repeats):
            for name in builds:
                use_build(name)
                times[name].append(step_seconds(student, teacher))
        medians = {name: statistics.median(values) for name, values in times.items()}
        best = min(medians.values())
        for name in builds:
            lines.append(
                f"| {n} | {args.rows} | {name} | `{flags[name]}` | {medians[name]:.4f} | "
                f"{medians[name] / best:.2f}x |"
            )
    os.environ.pop(cpp.FORCE_BUILD)
    cpp.cpu_kernels.cache_clear()
    text = "\n".join(lines)
    print(text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text + "\n")


if __name__ == "__main__":
    main()
