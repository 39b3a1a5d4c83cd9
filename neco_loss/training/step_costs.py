"""What a run's steps cost: seconds per step and peak memory, written to ``costs.json``.

Arms of a side-by-side study differ in their loss only, so their costs are measured the same
way in the same process: the wall time of each training step (data loading excluded: the
batch is ready when the step starts) and the peak memory of the steps. On CUDA the peak is
``torch.cuda.max_memory_allocated`` since the run's first step; on CPU (Linux) it is the
process's peak resident memory (``VmHWM``, reset through ``/proc/self/clear_refs`` when the
run starts) above its resident memory then, i.e. what the steps added to what was already
held (model, data, earlier runs' freed memory is given back first with ``malloc_trim``).
"""

from __future__ import annotations

import ctypes
import gc
import json
import re
import statistics
from pathlib import Path
from typing import Any

import torch

COSTS_FILE = "costs.json"
_MIB = 2**20


def _status_mib(field: str) -> float | None:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in MiB; ``None`` off Linux."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return None if match is None else int(match.group(1)) / 1024


def _reset_cpu_peak() -> float | None:
    """Give freed memory back, reset the peak resident memory; the resident memory now."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to VmRSS (Linux >= 4.0)
    except OSError:
        return None
    return _status_mib("VmRSS")


class StepCosts:
    """Times the steps of one run and measures their peak memory.

    Args:
        device: The training device.

    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: list[float] = []
        self.start_mib: float | None = None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        else:
            self.start_mib = _reset_cpu_peak()

    def add(self, seconds: float) -> None:
        """Record one step's wall time."""
        self.seconds.append(seconds)

    def peak_mib(self) -> float | None:
        """Peak memory of the steps so far in MiB (``None`` where it cannot be measured)."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / _MIB
        peak = _status_mib("VmHWM")
        if peak is None or self.start_mib is None:
            return None
        return peak - self.start_mib

    def summary(self) -> dict[str, Any]:
        """Median seconds per step (the first step, with its warm-up, left out) and peak MiB."""
        timed = self.seconds[1:] or self.seconds
        return {
            "seconds_per_step": statistics.median(timed) if timed else None,
            "steps_timed": len(timed),
            "peak_memory_mib": self.peak_mib(),
            "memory": "cuda max_memory_allocated"
            if self.device.type == "cuda"
            else "peak resident memory above the run's start (VmHWM - VmRSS)",
            "device": str(self.device),
            "threads": torch.get_num_threads(),
        }

    def write(self, folder: Path) -> Path:
        """Write ``summary()`` to ``folder/costs.json``."""
        path = folder / COSTS_FILE
        path.write_text(json.dumps(self.summary(), indent=2))
        return path


def read_costs(folder: Path) -> dict[str, Any] | None:
    """A run folder's ``costs.json``, or ``None`` when it has none."""
    path = folder / COSTS_FILE
    return json.loads(path.read_text()) if path.is_file() else None
