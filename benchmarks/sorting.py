"""Soft sorting backends side by side: one NeCo loss step per configuration.

A step is what the NeCo loss does per sorter pair: the teacher's soft permutation without
gradient, the student's with gradient, ``CE(Q_t, Q_s) = -mean(sum_rank Q_t log Q_s)`` and its
backward, through ``soft_permutation_loss`` as ``NeCoLoss`` calls it. Backends: ``native`` (on
the CPU the compiled kernel with the fused CE: no permutation is materialised),
``native-unfused`` (the compiled sort, CE in PyTorch), ``native-python`` (the portable
PyTorch backend), ``diffsort`` (the reference), ``torchsort``. Reported per configuration and
backend: the median time of a step over repeats, the memory autograd holds between forward and
backward (distinct saved tensors, exact), the speed and memory ratios to diffsort, optionally
the peak RSS of a fresh process running one step, and the loss difference to native.

Configurations that would hold more than ``--max-held-gib`` for backward (diffsort at n = 256)
are skipped with the predicted amount; ones slower than ``--max-step-seconds`` run once.

Usage:
    python benchmarks/sorting.py                 # full grid, writes outputs/benchmarks/sorting.md
    python benchmarks/sorting.py --quick         # bitonic, n in {49, 128}, rows 3136
    python benchmarks/sorting.py --peak-rss      # also the peak RSS of one step per process
    python benchmarks/sorting.py --quick --device cuda --backends native diffsort
        # on a GPU also the roofline: forward sort vs writing Q once at memory bandwidth
"""

from __future__ import annotations

import argparse
import multiprocessing
import platform
import resource
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from neco_loss import soft_permutation
from neco_loss.functional import SortOptions, soft_permutation_loss
from neco_loss.permutation_losses import permutation_loss
from neco_loss.sorting.networks import sorts_every_input


@dataclass
class Result:
    network: str
    n: int
    rows: int
    backend: str
    seconds: float | None
    held_bytes: float
    peak_rss_bytes: float | None
    loss: float | None
    note: str = ""


def inputs(rows: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(rows, n, generator=generator), torch.randn(rows, n, generator=generator)


def loss_of(backend: str, network: str, student: torch.Tensor, teacher: torch.Tensor):
    """The step's loss, with its graph (Cauchy, steepness 100: the reference)."""
    if backend == "native-unfused":  # the compiled sort, the CE in PyTorch
        with torch.no_grad():
            _, q_teacher = soft_permutation(teacher, network, backend="native")
        _, q_student = soft_permutation(student, network, backend="native")
        return permutation_loss(q_student, q_teacher).mean()
    options = SortOptions(network=network, backend=backend)
    return soft_permutation_loss(student, teacher, options).per_row.mean()


def step(backend: str, network: str, student: torch.Tensor, teacher: torch.Tensor) -> float:
    student = student.detach().requires_grad_()
    loss = loss_of(backend, network, student, teacher)
    loss.backward()
    return float(loss.detach())


def held_bytes_per_row(backend: str, network: str, n: int, rows: int = 8) -> float:
    """Bytes autograd keeps between the step's forward and backward, per row (distinct)."""
    sizes: dict[tuple[int, tuple[int, ...]], int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        sizes[(tensor.data_ptr(), tuple(tensor.shape))] = tensor.numel() * tensor.element_size()
        return tensor

    student = torch.randn(rows, n, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss_of(backend, network, student, torch.randn(rows, n))
    return sum(sizes.values()) / rows


def _peak_rss_child(backend: str, network: str, rows: int, n: int, queue) -> None:
    student, teacher = inputs(rows, n)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step(backend, network, student, teacher)
    queue.put((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)


def peak_rss_bytes(backend: str, network: str, rows: int, n: int) -> float:
    """Peak RSS growth of a fresh process running one step (Linux reports ru_maxrss in KiB)."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_peak_rss_child, args=(backend, network, rows, n, queue))
    process.start()
    process.join()
    return float(queue.get())


def measure(backend: str, network: str, n: int, rows: int, args: argparse.Namespace) -> Result:
    if backend in ("diffsort", "torchsort") and network == "bitonic_padded":
        return Result(network, n, rows, backend, None, 0, None, None, "not offered by diffsort")
    if not sorts_every_input(network, n):
        return Result(network, n, rows, backend, None, 0, None, None, "layout mis-sorts this n")
    held = held_bytes_per_row(backend, network, n) * rows
    if held > args.max_held_gib * 2**30:
        note = f"skipped: would hold {held / 2**30:.1f} GiB"
        return Result(network, n, rows, backend, None, held, None, None, note)
    student, teacher = (tensor.to(args.device) for tensor in inputs(rows, n))
    loss = step(backend, network, student, teacher)  # warm-up (plans, caches, allocator)
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step(backend, network, student, teacher)  # returns the loss as a float: a device sync
        times.append(time.perf_counter() - start)
        if times[-1] > args.max_step_seconds:
            break
    rss = peak_rss_bytes(backend, network, rows, n) if args.peak_rss else None
    return Result(network, n, rows, backend, statistics.median(times), held, rss, loss)


def table(results: list[Result]) -> str:
    header = (
        "| network | n | rows | backend | ms / step | µs / row | diffsort / this (time) "
        "| held for backward | diffsort / this (held) | peak RSS | loss - native |"
    )
    lines = [header, "|" + "---|" * 11]
    by_key = {(r.network, r.n, r.rows, r.backend): r for r in results}
    for r in results:
        native = by_key.get((r.network, r.n, r.rows, "native"))
        diffsort = by_key.get((r.network, r.n, r.rows, "diffsort"))
        if r.seconds is None:
            lines.append(
                f"| {r.network} | {r.n} | {r.rows} | {r.backend} | {r.note} | | | "
                f"{r.held_bytes / 2**20:.0f} MiB | | | |"
            )
            continue
        speed = held_ratio = diff = ""
        if diffsort is not None:
            held_ratio = f"{diffsort.held_bytes / r.held_bytes:.0f}x"
            if diffsort.seconds is not None:
                speed = f"{diffsort.seconds / r.seconds:.1f}x"
        if native is not None and native.loss is not None and r.loss is not None:
            diff = f"{r.loss - native.loss:+.1e}"
        rss = f"{r.peak_rss_bytes / 2**20:.0f} MiB" if r.peak_rss_bytes is not None else "-"
        lines.append(
            f"| {r.network} | {r.n} | {r.rows} | {r.backend} | {r.seconds * 1e3:.0f} | "
            f"{r.seconds * 1e6 / r.rows:.1f} | {speed} | {r.held_bytes / 2**20:.2f} MiB | "
            f"{held_ratio} | {rss} | {diff} |"
        )
    return "\n".join(lines)


def copy_bandwidth(device: str, size_bytes: int = 2**30) -> float:
    """Measured device memory bandwidth in bytes/s: a large copy reads and writes each byte."""
    source = torch.empty(size_bytes // 4, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    times = []
    for _ in range(5):
        torch.cuda.synchronize()
        start = time.perf_counter()
        target.copy_(source)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 2 * size_bytes / statistics.median(times)


def roofline(args: argparse.Namespace) -> str:
    """GPU: the native forward sort against writing its permutation once at memory bandwidth."""
    bandwidth = copy_bandwidth(args.device)
    lines = [
        f"Measured copy bandwidth: {bandwidth / 1e9:.0f} GB/s",
        "",
        "| network | n | rows | forward ms | bytes of Q | Q written once at bandwidth, ms "
        "| forward / roofline |",
        "|---|---|---|---|---|---|---|",
    ]
    for network in args.networks:
        for n in args.sizes:
            if not sorts_every_input(network, n):
                continue
            for rows in args.rows:
                scores, _ = inputs(rows, n)
                scores = scores.to(args.device)
                times = []
                for _ in range(args.repeats + 1):
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                    soft_permutation(scores, network, backend="native")
                    torch.cuda.synchronize()
                    times.append(time.perf_counter() - start)
                seconds = statistics.median(times[1:])
                q_bytes = rows * n * n * scores.element_size()
                floor = q_bytes / bandwidth
                lines.append(
                    f"| {network} | {n} | {rows} | {seconds * 1e3:.2f} | {q_bytes / 2**20:.0f} MiB "
                    f"| {floor * 1e3:.3f} | {seconds / floor:.1f}x |"
                )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="bitonic, n in {49, 128}, rows 3136")
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 49, 64, 128, 256])
    parser.add_argument("--rows", type=int, nargs="+", default=[784, 3136])
    parser.add_argument("--networks", nargs="+", default=["bitonic", "odd_even"])
    parser.add_argument(
        "--backends",
        nargs="+",
        default=["native", "native-unfused", "native-python", "diffsort", "torchsort"],
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-step-seconds", type=float, default=20.0)
    parser.add_argument("--max-held-gib", type=float, default=8.0)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (peak RSS is CPU-only)")
    parser.add_argument("--peak-rss", action="store_true", help="peak RSS of one step per process")
    parser.add_argument("--output", type=Path, default=Path("outputs/benchmarks/sorting.md"))
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.rows, args.networks = [49, 128], [3136], ["bitonic"]

    results = []
    for network in args.networks:
        for n in args.sizes:
            for rows in args.rows:
                for backend in args.backends:
                    result = measure(backend, network, n, rows, args)
                    results.append(result)
                    shown = "-" if result.seconds is None else f"{result.seconds * 1e3:.0f} ms"
                    print(
                        f"{network:15s} n={n:<4d} rows={rows:<5d} {backend:10s}",
                        shown,
                        result.note,
                        flush=True,
                    )

    text = (
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}\n\n" + table(results) + "\n"
    )
    if args.device.startswith("cuda"):
        text += "\n" + roofline(args) + "\n"
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
