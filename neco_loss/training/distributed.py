"""Run ``neco train`` on several processes: one per GPU (NCCL) or CPU processes (gloo).

``neco train CONFIG --devices N`` starts N processes on this machine; under ``torchrun`` (which
sets ``RANK`` / ``WORLD_SIZE``, also across nodes) the process group comes from the environment.
Every process trains on its slice of each global batch, the student is wrapped in
``DistributedDataParallel`` and the loss draws references from all processes' batches.
"""

from __future__ import annotations

import contextlib
import csv
import os
import signal
import socket
import threading
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

from neco_loss.data.folder import skipped_files
from neco_loss.training.agreement import TrainingStoppedError
from neco_loss.training.config import TrainConfig
from neco_loss.training.run_folder import (
    BACKBONE_FILE,
    LAST,
    SKIP_LOG,
    STOP_NOTE,
    TrainResult,
    finished_run,
    load_checkpoint,
    run_lock,
)
from neco_loss.training.signals import STOP_SIGNALS, ForwardStopSignals
from neco_loss.training.trainer import Trainer


def _backend(config: TrainConfig) -> str:
    return "nccl" if torch.cuda.is_available() and config.device != "cpu" else "gloo"


def init_process_group(backend: str, **options: Any) -> None:
    """``torch.distributed.init_process_group`` with the stop signals blocked in its threads.

    A SIGTERM (preemption, ``kill``) or SIGINT that the kernel delivers to one of the process
    group's communication threads interrupts its socket calls and aborts the process
    ("terminate called without an active exception"). Blocked there, it reaches the main
    thread, where the trainer turns it into a stop every process agrees on.
    """
    if threading.current_thread() is not threading.main_thread():
        dist.init_process_group(backend, **options)
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, set(STOP_SIGNALS))  # inherited by new threads
    try:
        dist.init_process_group(backend, **options)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, set(STOP_SIGNALS))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _worker(
    rank: int,
    world: int,
    port: int,
    config: dict[str, Any],
    resume: bool,
    progress: bool,
    overwrite: bool,
) -> None:
    settings = TrainConfig(**config)
    init_process_group(
        _backend(settings), init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        train(settings, resume=resume, progress=progress, overwrite=overwrite)
    finally:
        dist.destroy_process_group()


def _result(config: TrainConfig) -> TrainResult:
    """What the processes left in ``output_dir``."""
    output = config.output_dir_path
    rows = list(csv.reader((output / "metrics.csv").open()))
    last_loss = float(rows[-1][1]) if len(rows) > 1 else float("nan")
    step = int(load_checkpoint(output / LAST)["step"])
    skipped = skipped_files(output / SKIP_LOG)
    return TrainResult(
        output, output / LAST, output / BACKBONE_FILE, step, last_loss, False, skipped
    )


def train(
    config: TrainConfig, resume: bool = False, progress: bool = True, overwrite: bool = False
) -> TrainResult:
    """Run ``neco train``: build from ``config``, optionally resume, train, save.

    Args:
        config: The run.
        resume: Continue the run in ``output_dir`` from its checkpoint.
        progress: Show a progress bar.
        overwrite: Start afresh even if ``output_dir`` holds a run (its files are replaced).

    Returns:
        Paths of the outputs and the last loss; ``already_finished`` when a resumed run had
        nothing left to do (nothing is written then).

    Raises:
        FileExistsError: If ``output_dir`` holds a run and neither ``resume`` nor
            ``overwrite`` is set (nothing in the folder is touched).

    """
    finished = finished_run(config, resume, overwrite)
    if finished is not None:
        return finished
    trainer = Trainer(config, progress=progress)
    if resume:
        trainer.resume()
    elif overwrite and trainer.rank == 0:
        for name in (LAST, BACKBONE_FILE, "metrics.csv", STOP_NOTE):
            (config.output_dir_path / name).unlink(missing_ok=True)
    return trainer.fit()


def launch(
    config: TrainConfig, resume: bool = False, progress: bool = True, overwrite: bool = False
) -> TrainResult:
    """Train on ``config.devices`` processes (or as one process of a ``torchrun`` job).

    Arguments as ``neco_loss.training.train``. The run holds ``output_dir``'s lock
    (``run_lock``) while it runs: the process that started it here, or process 0 of a
    ``torchrun`` job.

    Returns:
        The run's outputs (from process 0's files when several processes ran here).

    Raises:
        ValueError: If more CUDA devices are asked for than this machine has.
        FileExistsError: As ``train``, before any process starts; also when another run
            writes to ``output_dir``.

    """
    torchrun = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    first = not torchrun or os.environ.get("RANK", "0") == "0"
    with run_lock(config.output_dir_path) if first else contextlib.nullcontext():
        if torchrun:
            init_process_group(_backend(config), init_method="env://")
            try:
                return train(config, resume=resume, progress=progress, overwrite=overwrite)
            finally:
                dist.destroy_process_group()
        if config.devices == 1:
            return train(config, resume=resume, progress=progress, overwrite=overwrite)
        return _spawn(config, resume, progress, overwrite)


def _spawn(config: TrainConfig, resume: bool, progress: bool, overwrite: bool) -> TrainResult:
    """Start ``config.devices`` processes here, forward stop signals to them, report."""
    finished = finished_run(config, resume, overwrite)
    if finished is not None:
        return finished
    if _backend(config) == "nccl" and config.devices > torch.cuda.device_count():
        raise ValueError(
            f"devices={config.devices} but this machine has {torch.cuda.device_count()} GPUs."
        )
    (config.output_dir_path / STOP_NOTE).unlink(missing_ok=True)  # a new note is this run's
    arguments = (config.devices, _free_port(), config.to_dict(), resume, progress, overwrite)
    context = mp.start_processes(_worker, arguments, config.devices, join=False)
    forwarding = ForwardStopSignals(context.processes)
    try:
        while not context.join():
            pass
    except ProcessException:
        note = config.output_dir_path / STOP_NOTE
        if not note.exists():  # not a stop the processes agreed on: the raw error
            raise
        text = note.read_text().strip()  # what every process said
        if text.startswith(tuple(STOP_SIGNALS.values())):
            raise SystemExit(text) from None
        raise TrainingStoppedError(text) from None
    finally:
        forwarding.restore()
    return _result(config)
