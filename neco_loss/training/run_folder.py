"""A run's folder.

What is in it (checkpoint, weights, config, metrics, the stop note, skipped images), how it is
written (atomically, one run at a time) and what it says before a run starts
(``finished_run``).
"""

from __future__ import annotations

import contextlib
import csv
import errno
import math
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from neco_loss.checks import error_cause
from neco_loss.diagnostics import NeCoStats
from neco_loss.training.config import TrainConfig

LAST = "checkpoint_last.pt"
BACKBONE_FILE = "backbone.pt"  # the student backbone's weights, loadable by DenseViT(checkpoint=)
STOP_NOTE = "stopped.txt"  # why a run stopped early (removed when it runs again)
SKIP_LOG = "skipped_images.txt"  # unreadable images of a folder dataset, one per line
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


# The teacher (``EMATeacher``) holds the student's ``DenseEncoder`` as ``module``: its backbone
# weights are those under this prefix, the keys of ``backbone.pt`` after it.
TEACHER_BACKBONE = "module.backbone.vit."


def teacher_backbone_state(path: Path) -> dict[str, torch.Tensor]:
    """The EMA teacher's backbone weights in checkpoint ``path``, keyed as ``backbone.pt``.

    Raises:
        FileNotFoundError, ValueError: As ``load_checkpoint``.

    """
    teacher = load_checkpoint(path)["teacher"]
    return {
        key.removeprefix(TEACHER_BACKBONE): value
        for key, value in teacher.items()
        if key.startswith(TEACHER_BACKBONE)
    }


@dataclass
class TrainResult:
    """Where a run left its outputs and its last loss."""

    output_dir: Path
    checkpoint: Path
    backbone: Path
    steps: int
    last_loss: float
    already_finished: bool = False
    skipped: list[str] = field(default_factory=list)  # unreadable images (``SKIP_LOG``)


PATH_KEYS = ("dataset", "weights", "output_dir")


def comparable(key: str, value: Any) -> Any:
    """A config value as resume compares it, with ``~`` expanded in paths.

    ``dataset: ~/images`` in a YAML file then equals the shell's expansion of
    ``--dataset ~/images`` on the command line.
    """
    if key in PATH_KEYS and isinstance(value, str):
        return str(Path(value).expanduser())
    return value


class MetricsLog:
    """``metrics.csv``: one row per logged step."""

    HEADER = (
        "step",
        "loss",
        "lr_backbone",
        "weight_decay",
        "images_per_s",
        "valid_pair_fraction",
        "rank_agreement",
        "teacher_entropy",
    )

    def __init__(self, path: Path, resumed_step: int) -> None:
        """Open ``path``, keeping the rows of steps ``<= resumed_step`` (all of a fresh run's).

        A run resumed from a checkpoint older than its last logged rows repeats those steps:
        their rows are dropped, so that every step has one row.
        """
        path.parent.mkdir(parents=True, exist_ok=True)
        kept: list[list[str]] = []
        if resumed_step > 0 and path.exists():
            with path.open(newline="") as existing:
                kept = [
                    row for row in list(csv.reader(existing))[1:] if int(row[0]) <= resumed_step
                ]
        self.file = open(path, "w", newline="")  # noqa: SIM115 (closed by close)
        self.writer = csv.writer(self.file)
        self.writer.writerows([list(self.HEADER), *kept])
        self.file.flush()

    def write(
        self,
        step: int,
        loss: float,
        lr: float,
        weight_decay: float,
        speed: float,
        stats: NeCoStats | None,
    ) -> None:
        """Append a row and flush it (the diagnostics left empty without ``stats``)."""
        diagnostics = ["", "", ""]
        if stats is not None:
            diagnostics = [
                f"{stats.valid_pairs / stats.total_pairs:.4f}",
                f"{stats.rank_agreement:.4f}",
                f"{stats.teacher_entropy:.4f}",
            ]
        self.writer.writerow(
            [step, f"{loss:.6f}", f"{lr:.3e}", f"{weight_decay:.4f}", f"{speed:.2f}", *diagnostics]
        )
        self.file.flush()

    def close(self) -> None:
        """Close the file."""
        self.file.close()


def finished_run(config: TrainConfig, resume: bool, overwrite: bool) -> TrainResult | None:
    """Check ``output_dir`` before a run starts: the run there if resuming it has nothing to do.

    Returns:
        With ``resume``, the run in ``output_dir`` if it already completed its schedule under
        this config (nothing is to be written then); else ``None``.

    Raises:
        ValueError: If the finished run was trained with other settings (``check_resumable``).
        FileExistsError: If ``output_dir`` holds a checkpoint, or metrics without one (a run
            in progress, or stopped before its first checkpoint), and neither ``resume`` nor
            ``overwrite`` is set: a new run would overwrite it.

    """
    output = config.output_dir_path
    checkpoint = output / LAST
    metrics = output / "metrics.csv"
    if metrics.exists() and not checkpoint.exists() and not overwrite:
        raise FileExistsError(
            f"{output} holds a run without a checkpoint ({metrics.name} but no {LAST}): one in "
            "progress, or one stopped before its first checkpoint. Pass --overwrite to start "
            "afresh there, or choose another --output-dir."
        )
    if checkpoint.exists() and not (resume or overwrite):
        try:
            step = str(load_checkpoint(checkpoint)["step"])
        except ValueError:
            step = "unreadable"
        raise FileExistsError(
            f"{output} holds a run (checkpoint at step {step}): pass --resume to continue it, "
            "--overwrite to replace it, or choose another --output-dir."
        )
    if not resume:
        return None
    state = load_checkpoint(checkpoint)
    saved = state["config"]
    same_length = all(saved.get(k) == getattr(config, k) for k in ("max_steps", "epochs"))
    if "total_steps" not in state or not same_length or state["step"] < state["total_steps"]:
        return None
    # A finished run is reused only for the config it was trained with (an edited ablation
    # file must not report the old run under the new settings).
    check_resumable(state, config, int(state["total_steps"]))
    return TrainResult(
        output, output / LAST, output / BACKBONE_FILE, int(state["step"]), math.nan, True
    )


def write_config(config: TrainConfig) -> None:
    """``config.yaml`` in ``output_dir`` (created): what the run is, for ``--resume``."""
    import yaml  # the [train] extra: imported here so that `neco --help` needs the core only

    config.output_dir_path.mkdir(parents=True, exist_ok=True)
    (config.output_dir_path / "config.yaml").write_text(yaml.safe_dump(config.to_dict()))


def check_resumable(state: dict[str, Any], config: TrainConfig, total_steps: int) -> None:
    """Raise unless the checkpoint ``state`` can be continued under ``config``.

    The schedules (learning rates, weight decay, EMA momentum) span the run's total steps, so
    a resumed run must keep them, and every other key but ``output_dir`` (a run folder moved
    or copied elsewhere continues, or is reused, from there).

    Raises:
        ValueError: Naming the keys that changed, or the two lengths and the way out.

    """
    output = config.output_dir_path
    saved = {
        k: comparable(k, v)
        for k, v in state["config"].items()
        if k not in ("max_steps", "epochs", "output_dir")
    }
    current = {k: comparable(k, v) for k, v in config.to_dict().items() if k in saved}
    changed = sorted(k for k in saved if saved[k] != current.get(k))
    if changed:
        raise ValueError(
            f"the checkpoint in {output} was written with other values for {changed}; resume "
            "with the same config."
        )
    total = int(state.get("total_steps", total_steps))
    if total != total_steps:
        raise ValueError(
            f"the run in {output} schedules its learning rates, weight decay and EMA over "
            f"{total} steps (max_steps={state['config'].get('max_steps')}, epochs="
            f"{state['config'].get('epochs')}); max_steps/epochs now give {total_steps}. "
            "Resume with the run's max_steps and epochs, or start a new schedule from its "
            f"weights: --weights {output / BACKBONE_FILE} --output-dir NEW_FOLDER."
        )
