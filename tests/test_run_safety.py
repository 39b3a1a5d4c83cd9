"""Runs that survive: a stop names its step and leaves its config, checkpoint and reason;
resume keeps one metrics row per step and its schedule; a finished or existing run is never
overwritten by accident."""

import sys

import pytest
import torch
import yaml

from neco_loss.app.cli import main
from neco_loss.training import Trainer
from neco_loss.training.agreement import TrainingStoppedError
from neco_loss.training.run_folder import LAST, STOP_NOTE, load_checkpoint
from tests.test_training import TINY, crash_before_step, tiny_config


def test_a_nan_stop_names_its_step_and_leaves_the_run(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, max_steps=3), progress=False)
    with torch.no_grad():
        trainer.student.head.mlp[0].weight.fill_(float("nan"))
    with pytest.raises(TrainingStoppedError, match="^step 1: the model produced NaN/Inf"):
        trainer.fit()
    for name in ("config.yaml", LAST, "metrics.csv", STOP_NOTE):
        assert (tmp_path / name).is_file(), name
    assert load_checkpoint(tmp_path / LAST)["step"] == 0
    note = (tmp_path / STOP_NOTE).read_text()
    assert note.startswith("step 1: the model produced NaN/Inf features") and "after step 0" in note


def test_no_overlapping_pair_stops_like_a_nan(tmp_path, monkeypatch):
    trainer = Trainer(tiny_config(tmp_path, max_steps=3), progress=False)
    original = trainer.criterion.forward

    def apart(student, teacher, boxes, **options):
        if trainer.step == 1:  # the second step's crops share nothing
            boxes = boxes.clone()
            boxes[:, :, 0] = torch.arange(boxes.shape[1]) * 1000.0
            boxes[:, :, 2] = boxes[:, :, 0] + 10
        return original(student, teacher, boxes, **options)

    monkeypatch.setattr(trainer.criterion, "forward", apart)
    with pytest.raises(TrainingStoppedError, match="^step 2: no crop pair overlaps"):
        trainer.fit()
    assert load_checkpoint(tmp_path / LAST)["step"] == 1


def test_resume_keeps_one_metrics_row_per_step(tmp_path, monkeypatch):
    """A crash after step 3 (logged) with the checkpoint at step 2: step 3 runs again, once."""
    config = tiny_config(tmp_path, max_steps=4, checkpoint_every=2)
    first = Trainer(config, progress=False)
    crash_before_step(monkeypatch, first, 4)
    with pytest.raises(KeyboardInterrupt):
        first.fit()
    rows = (tmp_path / "metrics.csv").read_text().splitlines()[1:]
    assert [row.split(",")[0] for row in rows] == ["1", "2", "3"]
    resumed = Trainer(config, progress=False)
    resumed.resume()
    resumed.fit()
    rows = (tmp_path / "metrics.csv").read_text().splitlines()[1:]
    assert [row.split(",")[0] for row in rows] == ["1", "2", "3", "4"]


def test_a_changed_length_is_refused_with_the_way_out(tmp_path):
    Trainer(tiny_config(tmp_path, max_steps=2), progress=False).fit()
    longer = Trainer(tiny_config(tmp_path, max_steps=5), progress=False)
    with pytest.raises(ValueError, match=r"over 2 steps .* now give 5.*--weights .*backbone\.pt"):
        longer.resume()


@pytest.fixture
def neco_train(capsys):
    """``neco train ARGS`` in this process: ``(exit code, stdout, stderr)``."""

    def run(*args):
        try:
            main(["train", *args])
            code = 0
        except SystemExit as stop:
            code = 1
            print(stop.code, file=sys.stderr)
        output = capsys.readouterr()
        return code, output.out, output.err

    return run


def snapshot(folder):
    return {path.name: path.stat().st_mtime_ns for path in folder.iterdir()}


@pytest.fixture
def finished_run(tmp_path, neco_train):
    config = tmp_path / "run.yaml"
    output = tmp_path / "out"
    config.write_text(yaml.safe_dump({**TINY, "max_steps": 2, "output_dir": str(output)}))
    code, _, stderr = neco_train(str(config), "--quiet")
    assert code == 0, stderr[-2000:]
    return config, output


def test_a_finished_run_is_not_trained_again(finished_run, neco_train):
    config, output = finished_run
    before = snapshot(output)
    code, stdout, stderr = neco_train(str(config), "--resume", "--quiet")
    assert code == 0, stderr[-2000:]
    assert "already finished at step 2" in stdout
    assert snapshot(output) == before  # nothing written


def test_an_existing_run_is_refused_without_resume_or_overwrite(finished_run, neco_train):
    config, output = finished_run
    before = snapshot(output)
    code, _, stderr = neco_train(str(config), "--quiet", "--max-steps", "3")
    assert code != 0
    assert "error: " in stderr and "holds a run (checkpoint at step 2): pass --resume" in stderr
    assert snapshot(output) == before
    code, _, stderr = neco_train(str(config), "--quiet", "--max-steps", "3", "--overwrite")
    assert code == 0, stderr[-2000:]
    assert load_checkpoint(output / LAST)["step"] == 3
    assert len((output / "metrics.csv").read_text().splitlines()) == 1 + 3


def test_a_data_error_stops_before_the_step(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, max_steps=3), progress=False)
    transform = trainer.dataset.transform

    def unreadable_at_second_step(image):
        if trainer.step == 1:
            raise OSError("image file is truncated")
        return transform(image)

    trainer.dataset.transform = unreadable_at_second_step
    with pytest.raises(TrainingStoppedError, match="^step 2: data error: OSError: image file is"):
        trainer.fit()
    assert load_checkpoint(tmp_path / LAST)["step"] == 1
    assert "data error" in (tmp_path / STOP_NOTE).read_text()
