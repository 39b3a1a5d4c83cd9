"""Stops agreed by every process of a run.

Each process brings its reasons to stop (a signal, a data error, NaN/Inf values) to the same
point of a step, all learn every reason, and all stop at the same step, so that one checkpoint
holds them all.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, TypeVar

import torch
import torch.distributed as dist

Batch = TypeVar("Batch")


class TrainingStoppedError(RuntimeError):
    """A process could not go on (data error, NaN/Inf); every process raises it at one step."""


def agreed_reasons(
    reasons: dict[str, str | None], world: int, device: torch.device
) -> dict[str, list[str]]:
    """Every process's reasons to stop at this point, the same on every process.

    One all-reduce of flags per call; the messages are gathered only when a process has
    one. Every process must call this at the same point of the step.

    Args:
        reasons: ``{kind: message or None}`` of this process.
        world: Number of processes.
        device: Where the flags go for the all-reduce (the process's device).

    Returns:
        ``{kind: ["process R: message", ...]}`` for the kinds some process reported.

    """
    flags = torch.tensor([reason is not None for reason in reasons.values()], dtype=torch.int32)
    if world > 1:
        flags = flags.to(device)
        dist.all_reduce(flags)
    if not bool(flags.any()):
        return {}
    everyone: list[Any] = [reasons]
    if world > 1:
        everyone = [None] * world
        dist.all_gather_object(everyone, reasons)
    where = "" if world == 1 else "process {rank}: "
    agreed: dict[str, list[str]] = {}
    for rank, theirs in enumerate(everyone):
        for kind, reason in theirs.items():
            if reason is not None:
                agreed.setdefault(kind, []).append(where.format(rank=rank) + reason)
    return agreed


def stop_if_any(
    reasons: dict[str, str | None], step: int, world: int, device: torch.device
) -> None:
    """Raise ``TrainingStoppedError`` on every process if any process has a reason.

    Args:
        reasons: As ``agreed_reasons``.
        step: The step that would run (named in the message).
        world: Number of processes.
        device: The process's device.

    """
    agreed = agreed_reasons(reasons, world, device)
    if agreed:
        messages = [message for kind in agreed.values() for message in kind]
        raise TrainingStoppedError(f"step {step}: " + "; ".join(messages))


def agreed_batch(
    batches: Iterator[Batch], signal: str | None, step: int, world: int, device: torch.device
) -> tuple[Batch | None, str | None]:
    """The next batch, once every process agrees to run step ``step``.

    Args:
        batches: This process's batches.
        signal: The stop signal this process received (``"SIGTERM"``), else ``None``.
        step: The step the batch is for (named in messages).
        world: Number of processes.
        device: The process's device.

    Returns:
        ``(batch, None)``, or ``(None, "SIGTERM")`` (the signal names) when a process was
        signalled: every process stops there.

    Raises:
        TrainingStoppedError: On every process, when one could not read its batch.

    """
    try:
        batch, data_error = next(batches), None
    except Exception as error:  # a corrupt image, a vanished file: every process must know
        batch, data_error = None, f"data error: {type(error).__name__}: {error}"
    agreed = agreed_reasons({"signal": signal, "data": data_error}, world, device)
    if "data" in agreed:
        raise TrainingStoppedError(f"step {step}: " + "; ".join(agreed["data"]))
    if agreed:
        names = {reason.rsplit(": ", 1)[-1] for reason in agreed["signal"]}
        return None, "/".join(sorted(names))
    return batch, None
