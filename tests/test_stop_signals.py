"""Every way users stop ``neco train`` saves the run: Ctrl-C (SIGINT) like SIGTERM, and a
signal to the parent of ``--devices 2``, to its process group, or the parent's death.

Each case runs ``neco train`` as a subprocess (tiny model, CPU, gloo), signals it once it has
logged a few steps, and checks: one checkpoint of the step every process stopped after,
``stopped.txt``, a non-zero exit with one line, no process left, and a resume that ends with
the weights of an uninterrupted run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from neco_loss.training.run_folder import LAST, STOP_NOTE, load_checkpoint
from tests.test_training import TINY

STEPS = 12
TIMEOUT = 240  # seconds: a hang fails the test instead of the suite
pytestmark = pytest.mark.slow


def write_config(tmp_path: Path, name: str, devices: int) -> tuple[Path, Path]:
    output = tmp_path / name
    config = {
        **TINY,
        "max_steps": STEPS,
        "epochs": 100,
        "train_images": 16,
        "batch_size": 2,
        "devices": devices,
        "device": "cpu",
        "log_every": 1,
        "output_dir": str(output),
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, output


def neco_train(config: Path, *flags: str, **options) -> subprocess.Popen:
    command = [sys.executable, "-m", "neco_loss.app.cli", "train", str(config), "--quiet", *flags]
    return subprocess.Popen(command, stderr=subprocess.PIPE, text=True, **options)


def logged_steps(output: Path) -> int:
    metrics = output / "metrics.csv"
    return len(metrics.read_text().splitlines()) - 1 if metrics.exists() else 0


def wait_for_steps(output: Path, process: subprocess.Popen, steps: int = 2) -> None:
    deadline = time.monotonic() + TIMEOUT
    while logged_steps(output) < steps:
        assert process.poll() is None, process.stderr.read() if process.stderr else ""
        assert time.monotonic() < deadline, "the run did not start"
        time.sleep(0.01)


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie that nobody reaped has ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def worker_pids(parent: int) -> list[int]:
    """The processes ``parent`` started with torch.multiprocessing (not its resource tracker)."""
    workers = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            command = (stat.parent / "cmdline").read_bytes()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[1]) == parent and b"spawn_main" in command:
            workers.append(int(stat.parent.name))
    return workers


def assert_stopped_with_a_checkpoint(output: Path, name: str) -> int:
    step = int(load_checkpoint(output / LAST)["step"])
    assert 0 < step < STEPS
    note = (output / STOP_NOTE).read_text()
    assert note.startswith(f"{name}: stopped after step {step}; checkpoint "), note
    assert "continue with --resume" in note
    assert list(output.glob("*.tmp")) == []
    return step


def assert_resumes_to_the_straight_run(config: Path, output: Path, straight: Path) -> None:
    resumed = neco_train(config, "--resume")
    assert resumed.wait(TIMEOUT) == 0, resumed.stderr.read() if resumed.stderr else ""
    final, expected = load_checkpoint(output / LAST), load_checkpoint(straight / LAST)
    assert final["step"] == STEPS
    for part in ("student", "teacher"):
        for key, value in expected[part].items():
            assert torch.equal(final[part][key], value), (part, key)


@pytest.fixture(scope="module")
def straight_runs(tmp_path_factory) -> dict[int, Path]:
    """An uninterrupted run per process count, for the resumed runs to equal."""
    tmp_path = tmp_path_factory.mktemp("straight")
    outputs = {}
    for devices in (1, 2):
        config, outputs[devices] = write_config(tmp_path, f"devices{devices}", devices)
        process = neco_train(config)
        assert process.wait(TIMEOUT) == 0, process.stderr.read() if process.stderr else ""
    return outputs


def test_ctrl_c_saves_a_one_process_run_like_sigterm(tmp_path, straight_runs):
    config, output = write_config(tmp_path, "run", 1)
    process = neco_train(config)
    wait_for_steps(output, process)
    process.send_signal(signal.SIGINT)
    assert process.wait(TIMEOUT) != 0
    error = process.stderr.read().strip()
    step = assert_stopped_with_a_checkpoint(output, "SIGINT")
    assert error.splitlines()[-1].startswith(f"SIGINT: stopped after step {step}")
    again = neco_train(config)  # the same command without --resume: refused, nothing touched
    assert again.wait(TIMEOUT) == 1
    assert "pass --resume to continue it" in again.stderr.read()
    assert_resumes_to_the_straight_run(config, output, straight_runs[1])


def test_a_suspended_and_resumed_run_still_stops_cleanly(tmp_path, straight_runs):
    """SIGSTOP then SIGCONT (a scheduler's suspend and resume) used to crash the signal
    thread (garbage si_signo from the interrupted wait); SIGTERM then went unheard."""
    config, output = write_config(tmp_path, "run", 1)
    process = neco_train(config)
    wait_for_steps(output, process)
    process.send_signal(signal.SIGSTOP)
    time.sleep(0.3)  # stopped: no step runs meanwhile
    process.send_signal(signal.SIGCONT)
    time.sleep(0.02)  # the signal thread wakes with the interrupted wait
    process.send_signal(signal.SIGTERM)
    assert process.wait(TIMEOUT) != 0
    error = process.stderr.read()
    assert "Traceback" not in error and "not a valid Signals" not in error
    step = assert_stopped_with_a_checkpoint(output, "SIGTERM")
    assert error.strip().splitlines()[-1].startswith(f"SIGTERM: stopped after step {step}")


def test_metrics_without_a_checkpoint_are_a_run_in_use(tmp_path):
    config, output = write_config(tmp_path, "run", 1)
    output.mkdir()
    (output / "metrics.csv").write_text("step,loss\n1,2.0\n")
    process = neco_train(config)
    assert process.wait(TIMEOUT) == 1
    assert "holds a run without a checkpoint" in process.stderr.read()
    assert (output / "metrics.csv").read_text() == "step,loss\n1,2.0\n"


@pytest.mark.parametrize(
    "signum, target, resume",
    [
        (signal.SIGTERM, "parent", True),
        (signal.SIGINT, "parent", False),
        (signal.SIGTERM, "group", False),
    ],
)
def test_a_signal_to_the_parent_or_its_group_stops_every_process(
    tmp_path, straight_runs, signum, target, resume
):
    """The stop itself is the same code whichever signal reached the parent, so the resume is
    checked once (parent SIGTERM) to keep the suite's time."""
    config, output = write_config(tmp_path, "run", 2)
    process = neco_train(config, start_new_session=True)  # its own process group
    wait_for_steps(output, process)
    workers = worker_pids(process.pid)
    if target == "group":
        os.killpg(process.pid, signum)
    else:
        process.send_signal(signum)
    assert process.wait(TIMEOUT) != 0
    error = process.stderr.read().strip().splitlines()
    assert "SIGTERM: stopped after step" in error[-1], error[-5:]  # the processes got SIGTERM
    assert_stopped_with_a_checkpoint(output, "SIGTERM")
    assert not any(alive(pid) for pid in workers)
    if resume:
        assert_resumes_to_the_straight_run(config, output, straight_runs[2])


def test_workers_never_outlive_a_killed_parent_started_in_the_background(tmp_path):
    """A script's background job ignores SIGINT, torch's parent-death signal: the workers
    take it anyway, stop after one more step with a checkpoint, and exit."""
    config, output = write_config(tmp_path, "run", 2)
    command = f"{sys.executable} -m neco_loss.app.cli train {config} --quiet & echo $!; wait"
    shell = subprocess.Popen(
        ["bash", "-c", command], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    parent = int(shell.stdout.readline())
    wait_for_steps(output, shell)
    workers = worker_pids(parent)
    assert len(workers) == 2
    os.kill(parent, signal.SIGKILL)
    shell.wait(TIMEOUT)
    deadline = time.monotonic() + TIMEOUT
    while any(alive(pid) for pid in workers):
        assert time.monotonic() < deadline, "workers outlived their parent"
        time.sleep(0.1)
    assert_stopped_with_a_checkpoint(output, "SIGINT")
