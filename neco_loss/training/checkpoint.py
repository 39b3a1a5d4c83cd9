"""Atomic, code-free checkpoints of a training run, and the lock of its folder."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from neco_loss.checks import error_cause

LAST = "checkpoint_last.pt"
LOCK = ".neco-train.lock"  # in output_dir, held while a run writes there (run_lock)


def save_atomic(state: dict[str, Any], path: Path) -> None:
    """Write ``state`` to ``path`` through a temporary file and a rename.

    The temporary file has a name of its own (``mkstemp``: created exclusively, so a file or
    link planted at a predictable name is neither followed nor overwritten). A crash mid-write
    leaves the previous file intact; a failed write removes the partial file.

    Raises:
        OSError: ``no space left on FOLDER ...`` when the disk (or quota) is full; the previous
            file is kept.

    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    temporary = Path(name)
    try:
        os.fchmod(handle, 0o644)  # mkstemp makes it private; a checkpoint is as any file
        # A Python file object, not a path: Python's writes raise OSError(ENOSPC), which torch's
        # zip writer then hides behind its own "unexpected pos ..." on closing.
        with os.fdopen(handle, "wb") as file:
            torch.save(state, file)
        os.replace(temporary, path)
    except BaseException as error:
        temporary.unlink(missing_ok=True)
        full = _disk_full(error)
        if full is None:
            raise
        kept = f"the previous {path.name} is kept" if path.exists() else "no earlier one exists"
        raise OSError(
            full.errno,
            f"no space left on {path.parent} to write {path.name} ({kept}; the partial file "
            "was removed): free some space, then continue with --resume.",
        ) from error


def _disk_full(error: BaseException | None) -> OSError | None:
    """The "disk or quota full" ``OSError`` in ``error``'s chain of causes, if any."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return error
        error = error.__cause__ or error.__context__
    return None


@contextlib.contextmanager
def run_lock(output_dir: Path) -> Iterator[None]:
    """Hold ``output_dir``'s lock while a run writes there; released on any exit.

    An exclusive ``flock`` on ``output_dir/.neco-train.lock`` (the kernel drops it when the
    process ends, however it ends, so a killed run never leaves the folder locked). The file is
    created once and never written: a refused run touches nothing in the folder.

    Raises:
        FileExistsError: At once, if another process holds it (its pid named, from
            ``/proc/locks``, where there is one).

    """
    import fcntl  # POSIX; imported here so that the rest of the trainer imports anywhere

    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / LOCK
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FileExistsError(
                f"{output_dir} is in use by another neco train (process "
                f"{_lock_holder(os.fstat(descriptor).st_ino)}): wait for it to end, or choose "
                "another --output-dir."
            ) from None
        yield
    finally:
        os.close(descriptor)  # releases the lock


def _lock_holder(inode: int) -> str:
    """The pid holding a ``flock`` on the file with this inode (Linux), else ``unknown``."""
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return "unknown"
    for line in lines:  # "1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF"
        fields = line.split()
        if len(fields) > 5 and fields[1] == "FLOCK" and fields[5].endswith(f":{inode}"):
            return fields[4]
    return "unknown"


def load_checkpoint(path: Path, mmap: bool = False) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (no code runs from the file).

    Args:
        path: The checkpoint file.
        mmap: Map the tensors instead of reading them (for a look at the step: a real run's
            checkpoint holds gigabytes of weights and optimizer state).

    Raises:
        FileNotFoundError: If there is no checkpoint.
        ValueError: If the file is corrupt or not a checkpoint of ``neco train``.

    """
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path} to resume from.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:  # torch raises many types for a damaged or foreign file
        raise ValueError(f"checkpoint {path} cannot be read ({error_cause(error)}).") from error
    required = {"step", "student", "teacher", "optimizer", "criterion", "config", "rng"}
    if not isinstance(state, dict) or not required <= set(state):
        raise ValueError(f"{path} is not a neco train checkpoint (needs keys {sorted(required)}).")
    return state
