"""The benchmark scripts run (small sizes; the documented runs take minutes)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def table_rows(script: str, *arguments: str) -> list[list[str]]:
    """Run ``benchmarks/SCRIPT`` and return its table's rows (after the header), split."""
    result = subprocess.run(
        [sys.executable, f"benchmarks/{script}", *arguments],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    return [line.split(" | ") for line in lines[1:]]


def test_loss_step_benchmark_reports_syncs_and_stats_cost():
    rows = table_rows(
        "loss_step.py",
        *["--batch", "2", "--global-grid", "8", "--repeats", "1", "--threads", "1"],
        *["--backends", "native", "diffsort"],
    )
    assert [row[1] for row in rows] == ["off (default)", "every call", "off (default)"]
    assert [row[4] for row in rows] == ["3", "6", "3"]  # host syncs per call
    assert len({row[-1] for row in rows}) == 1  # the same loss for every row


def test_train_step_benchmark_runs_a_small_step():
    tiny = '{"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}'
    rows = table_rows(
        "train_step.py",
        *["--model-kwargs", tiny, "--head-hidden-dim", "32", "--head-out-dim", "16"],
        *["--global-size", "64", "--local-size", "32", "--batch", "2", "--repeats", "1"],
        *["--device", "cpu"],
    )
    assert [row[0] for row in rows] == ["| native", "| diffsort"]
    assert all(row[1] == "2" and row[-1] == "- |" for row in rows)


def test_official_equivalence_benchmark_reports_both_log_floors():
    rows = table_rows("official_equivalence.py", "--configs", "steepness 1000/1000")
    assert [row[1] for row in rows] == ["default", "1e-8"]
    assert float(rows[0][2]) < 1e-12 < float(rows[1][2])  # the default equals the official loss


def test_sorting_benchmark_compares_the_backends(tmp_path):
    rows = table_rows(
        "sorting.py",
        *["--networks", "bitonic", "--sizes", "16", "--rows", "64", "--repeats", "1"],
        *["--backends", "native", "diffsort", "--output", str(tmp_path / "sorting.md")],
    )
    assert [row[3] for row in rows] == ["native", "diffsort"]
    assert abs(float(rows[1][-1].rstrip(" |"))) < 1e-4  # the same loss as native
    assert (tmp_path / "sorting.md").is_file()


def test_kernel_builds_benchmark_times_every_build_this_cpu_runs(tmp_path):
    from neco_loss.sorting.kernels import cpp

    rows = table_rows(
        "kernel_builds.py",
        *["--sizes", "16", "--rows", "64", "--repeats", "1", "--output", str(tmp_path / "k.md")],
    )
    assert [row[2] for row in rows] == cpp.runnable_builds()
    assert min(float(row[-1].rstrip("x |")) for row in rows) == 1.0
    assert (tmp_path / "k.md").read_text().count("| 16 | 64 |") == len(rows)


def test_objectives_benchmark_times_every_arm_against_neco():
    rows = table_rows(
        "objectives_step.py",
        *["--batch", "2", "--global-grid", "8", "--repeats", "1", "--threads", "1"],
    )
    assert [row[0].strip("| ") for row in rows] == ["neco", "similarity_ce", "paka", "continued"]
    assert rows[0][2] == "1.00x" and all(float(row[1]) > 0 for row in rows)
