"""Faults in one of two processes (gloo): every process stops at the same step, one checkpoint
is written, the same message is given, and nothing hangs (each run is bounded by a timeout)."""

import json
import subprocess
import sys

import pytest
import torch

from neco_loss.training.run_folder import LAST, STOP_NOTE, load_checkpoint
from neco_loss.training.trainer import ADVICE
from tests.fault_worker import FAULT_STEP
from tests.test_training import TINY

STEPS = 6
TIMEOUT = 240  # seconds: a hang fails the test instead of the suite


def run(scenario: str, output, results) -> list[dict]:
    results.mkdir(parents=True, exist_ok=True)
    config = {
        **TINY,
        "max_steps": STEPS,
        "epochs": 100,
        "train_images": 16,
        "batch_size": 2,
        "device": "cpu",
        "checkpoint_every": 1,
        "output_dir": str(output),
    }
    command = [sys.executable, "-m", "tests.fault_worker", scenario, json.dumps(config)]
    finished = subprocess.run(
        [*command, str(results)], capture_output=True, text=True, timeout=TIMEOUT
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    return [json.loads((results / f"{rank}.json").read_text()) for rank in (0, 1)]


@pytest.mark.slow
def test_fault_sigterm_on_one_process(tmp_path):
    straight = run("clean", tmp_path / "straight", tmp_path / "r0")
    assert [r["step"] for r in straight] == [STEPS, STEPS]

    stopped = run("sigterm", tmp_path / "run", tmp_path / "r1")
    steps = {r["step"] for r in stopped}
    assert steps == {FAULT_STEP}, stopped  # both processes stopped after the same step
    assert stopped[0]["message"] == stopped[1]["message"]
    assert stopped[0]["message"].startswith(f"SIGTERM: stopped after step {FAULT_STEP}")
    assert load_checkpoint(tmp_path / "run" / LAST)["step"] == FAULT_STEP
    assert list((tmp_path / "run").glob("*.tmp")) == []

    resumed = run("resume", tmp_path / "run", tmp_path / "r2")
    assert [r["step"] for r in resumed] == [STEPS, STEPS]
    final = load_checkpoint(tmp_path / "run" / LAST)
    expected = load_checkpoint(tmp_path / "straight" / LAST)
    for part in ("student", "teacher"):
        for key, value in expected[part].items():
            assert torch.equal(final[part][key], value), (part, key)
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[1:]
    assert [row.split(",")[0] for row in rows] == [str(step) for step in range(1, STEPS + 1)]


@pytest.mark.slow
def test_fault_nan_on_one_process(tmp_path):
    stopped = run("nan", tmp_path / "run", tmp_path / "r")
    assert {r["step"] for r in stopped} == {FAULT_STEP - 1}
    message = stopped[0]["message"]
    assert message == stopped[1]["message"]
    assert message == f"step {FAULT_STEP}: process 1: the model produced NaN/Inf features{ADVICE}"
    assert load_checkpoint(tmp_path / "run" / LAST)["step"] == FAULT_STEP - 1
    assert (tmp_path / "run" / STOP_NOTE).read_text().startswith(message)


@pytest.mark.slow
def test_fault_data_error_through_neco_train_devices_2(tmp_path):
    """The launcher maps an agreed stop of its processes to one error of ``neco train``."""
    import yaml

    from neco_loss.app.cli import main

    images = tmp_path / "images"
    images.mkdir()
    for index in range(4):
        (images / f"{index}.png").write_bytes(b"not an image")
    config = tmp_path / "run.yaml"
    settings = {**TINY, "dataset": str(images), "train_images": None, "batch_size": 1}
    config.write_text(yaml.safe_dump({**settings, "output_dir": str(tmp_path / "out")}))
    with pytest.raises(SystemExit) as stop:
        main(["train", str(config), "--devices", "2", "--device", "cpu", "--quiet"])
    message = str(stop.value.code)
    assert message.startswith("error: step 1: process 0: data error: ValueError: none of the 4")
    assert "; process 1: data error" in message
    assert load_checkpoint(tmp_path / "out" / LAST)["step"] == 0
    assert (tmp_path / "out" / STOP_NOTE).read_text().startswith(message.removeprefix("error: "))
