"""Kill a real training process (SIGTERM, SIGKILL), resume, and reach identical weights."""

import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from neco_loss.training import Trainer, build_config
from neco_loss.training.run_folder import LAST, load_checkpoint
from tests.test_training import TINY

STEPS = 30


def checkpoint_step(path) -> int:
    try:
        return int(load_checkpoint(path)["step"])
    except (FileNotFoundError, ValueError):
        return -1


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_killed_run_resumes_to_identical_weights(tmp_path, signum):
    settings = {
        **TINY,
        "max_steps": STEPS,
        "epochs": 100,
        "checkpoint_every": 1,
        "train_images": 16,
    }
    straight = Trainer(
        build_config({**settings, "output_dir": str(tmp_path / "straight")}), progress=False
    )
    straight.fit()

    run = tmp_path / "killed"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({**settings, "output_dir": str(run)}))
    command = [sys.executable, "-m", "neco_loss.app.cli", "train", str(config), "--quiet"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while checkpoint_step(run / LAST) < 3 and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    stopped_at = checkpoint_step(run / LAST)
    assert 3 <= stopped_at < STEPS, stderr.decode()[-2000:]  # killed mid-way, checkpoint intact
    if signum == signal.SIGTERM:
        assert process.returncode != 0 and b"SIGTERM: stopped after step" in stderr

    subprocess.run([*command, "--resume"], check=True, capture_output=True, timeout=600)
    resumed = load_checkpoint(run / LAST)
    assert resumed["step"] == STEPS
    for part in ("student", "teacher"):
        for key, value in straight.state()[part].items():
            assert torch.equal(resumed[part][key], value), (part, key)
