"""The benchmark scripts run (small sizes; the documented runs take minutes)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_loss_step_benchmark_reports_syncs_and_stats_cost():
    arguments = ["--batch", "2", "--global-grid", "8", "--repeats", "1", "--threads", "1"]
    result = subprocess.run(
        [sys.executable, "benchmarks/loss_step.py", *arguments, "--backends", "native", "diffsort"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line.split(" | ") for line in result.stdout.splitlines() if line.startswith("| n")]
    rows += [line.split(" | ") for line in result.stdout.splitlines() if line.startswith("| d")]
    assert [row[1] for row in rows] == ["off (default)", "every call", "off (default)"]
    assert [row[4] for row in rows] == ["3", "6", "3"]  # host syncs per call
    assert len({row[-1] for row in rows}) == 1  # the same loss for every row


def test_train_step_benchmark_runs_a_small_step():
    tiny = '{"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}'
    arguments = ["--model-kwargs", tiny, "--head-hidden-dim", "32", "--head-out-dim", "16"]
    arguments += ["--global-size", "64", "--local-size", "32", "--batch", "2", "--repeats", "1"]
    result = subprocess.run(
        [sys.executable, "benchmarks/train_step.py", *arguments, "--device", "cpu"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line.split(" | ") for line in result.stdout.splitlines() if line.startswith("| n")]
    rows += [line.split(" | ") for line in result.stdout.splitlines() if line.startswith("| d")]
    assert [row[0] for row in rows] == ["| native", "| diffsort"]
    assert all(row[1] == "2" and row[-1] == "- |" for row in rows)
