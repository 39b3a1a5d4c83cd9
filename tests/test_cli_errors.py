"""``neco``: errors as one line naming the fix, help that lists every config key."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from neco_loss.app.cli import main
from neco_loss.training.config import TrainConfig

ROOT = Path(__file__).parents[1]
TINY = "examples/recipes/tiny_cpu.yaml"


def error_line(capsys, argv: list[str]) -> str:
    """Run ``neco ARGV``: it must stop with one ``error:`` line (Python prints a string
    ``SystemExit`` on stderr and exits with status 1; see the subprocess test below)."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    line = exit_info.value.code
    assert isinstance(line, str) and line.startswith("error: ") and "\n" not in line, line
    return line


@pytest.mark.parametrize(
    "argv, expected",
    [
        (
            [TINY, "--batch-sise", "3"],
            "unknown config key 'batch_sise' (did you mean 'batch_size'?)",
        ),
        ([TINY, "--loss.roi-sise", "3"], "unknown loss key 'roi_sise' (did you mean 'roi_size'?)"),
        ([TINY, "--epochs", "many"], "config key 'epochs' (--epochs) must be int but is str"),
        ([TINY, "--loss.steepness", "-1"], "loss: steepness must be finite and > 0"),
        ([TINY, "--batch-size", "4096"], "lower --batch-size"),
        (["missing.yaml"], "config file missing.yaml does not exist"),
    ],
)
def test_train_errors(capsys, tmp_path, monkeypatch, argv, expected):
    monkeypatch.chdir(ROOT)
    line = error_line(capsys, ["train", *argv, "--output-dir", str(tmp_path / "run")])
    assert expected in line
    if "batch-size" not in expected:  # config errors come before anything is built or written
        assert not (tmp_path / "run").exists()


def test_eval_error_names_the_flag(capsys, tmp_path):
    (tmp_path / "backbone.pt").write_bytes(b"")
    line = error_line(capsys, ["eval", "in-context", "--checkpoint", str(tmp_path / "none")])
    assert "--checkpoint" in line


def test_debug_shows_the_traceback(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(ValueError, match="unknown config key"):
        main(["train", TINY, "--batch-sise", "3", "--debug"])


def test_train_help_lists_every_config_key(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for item in dataclasses.fields(TrainConfig):
        assert f"--{item.name.replace('_', '-')} " in out, item.name
    assert "--batch-size int  (default: 64)" in out
    assert "Images per step (reference: 64)." in out  # the docstring line, not written twice


@pytest.mark.parametrize("command", ["demo", "eval", "make-images", "sort-demo", "ablate"])
def test_every_option_shows_its_default(capsys, command):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default:" in out
    if command == "eval":
        assert "images of the val split to score (0: all) (default: 64)" in out


def test_the_installed_command_prints_one_line():
    """The real entry point, as a user runs it: no traceback, exit status 1."""
    neco = Path(sys.executable).parent / "neco"
    result = subprocess.run(
        [str(neco), "train", TINY, "--batch-sise", "3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: unknown config key 'batch_sise' (did you mean 'batch_size'?); every key with "
        "its type and default: neco train --help."
    ]
