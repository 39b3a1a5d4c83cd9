"""Two gloo processes of ``neco train`` with a fault injected into one of them.

Run as ``python -m tests.fault_worker SCENARIO CONFIG_JSON RESULT_DIR`` by tests/test_faults.py
(a subprocess, so that a hang is bounded by the test's timeout). Scenarios:

- ``sigterm``: process 1 receives a real SIGTERM after its step 3;
- ``nan``: process 1's teacher produces NaN features at step 3;
- ``clean`` / ``resume``: no fault (``resume`` continues from the checkpoint).

Each process writes ``RESULT_DIR/<rank>.json``: the step it stopped at and its message.
"""

import json
import os
import signal
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from neco_loss.training import TrainConfig, Trainer
from neco_loss.training.agreement import TrainingStoppedError
from neco_loss.training.distributed import init_process_group

FAULT_STEP = 3


def inject(trainer: Trainer, scenario: str) -> None:
    if scenario == "sigterm":
        original = trainer._train_step

        def step_then_signal(views, boxes, log_stats):
            loss = original(views, boxes, log_stats)
            if trainer.step + 1 == FAULT_STEP:  # this process's step 3 is done
                os.kill(os.getpid(), signal.SIGTERM)  # process-directed, as kill and schedulers
            return loss

        trainer._train_step = step_then_signal
    elif scenario == "nan":
        original_teacher = trainer.teacher_views.forward

        def nan_at_fault_step(views, attention=False):
            maps, attentions = original_teacher(views, attention)
            if trainer.step + 1 == FAULT_STEP:
                maps = [torch.full_like(m, float("nan")) for m in maps]
            return maps, attentions

        trainer.teacher_views.forward = nan_at_fault_step


def worker(rank: int, port: int, scenario: str, config: dict, result_dir: str) -> None:
    init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    trainer = Trainer(TrainConfig(**config), progress=False)
    if scenario == "resume":
        trainer.resume()
    if rank == 1:
        inject(trainer, scenario)
    message = ""
    try:
        trainer.fit()
    except (SystemExit, TrainingStoppedError) as stop:
        message = str(stop)
    finally:
        dist.destroy_process_group()
    result = {"step": trainer.step, "message": message}
    Path(result_dir, f"{rank}.json").write_text(json.dumps(result))


def main() -> None:
    scenario, config, result_dir = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(worker, nprocs=2, args=(port, scenario, config, result_dir), join=True)


if __name__ == "__main__":
    main()
