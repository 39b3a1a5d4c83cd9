"""``neco eval`` and ``neco train`` inputs: missing or corrupt files named, one name per
backbone, a CUDA request without CUDA answered in one line."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from neco_loss.app.cli import main
from neco_loss.app.evaluate import backbone_names
from tests.test_training import TINY


@pytest.fixture
def run(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({**TINY, "output_dir": str(tmp_path / "out")}))
    main(["train", str(config), "--max-steps", "1", "--quiet"])
    capsys.readouterr()
    return tmp_path / "out"


SIZES = ["--train-images", "4", "--val-images", "3"]


def test_a_truncated_backbone_is_named(run, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    weights = broken / "backbone.pt"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(SystemExit, match=f"checkpoint {weights} cannot be read"):
        main(["eval", "in-context", "--checkpoint", str(broken), *SIZES])


def test_weights_files_with_one_name_get_distinct_names(run, tmp_path, capsys):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        shutil.copy(run / "backbone.pt", tmp_path / folder / "backbone.pt")
    output = tmp_path / "eval"
    main(
        [
            "eval",
            "in-context",
            "--checkpoint",
            str(tmp_path / "a" / "backbone.pt"),
            "--checkpoint",
            str(tmp_path / "b" / "backbone.pt"),
            "--config",
            str(run / "config.yaml"),
            "--output",
            str(output),
            *SIZES,
        ]
    )
    table = (output / "results.md").read_text()
    assert "| a/backbone | " in table and "| b/backbone | " in table


def testbackbone_names(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "w.pt").touch()
    runs = [tmp_path / "run1", tmp_path / "run2"]
    assert backbone_names(runs, None) == ["run1", "run2"]
    assert backbone_names(runs, ["before", "after"]) == ["before", "after"]
    with pytest.raises(SystemExit, match="give --name once per --checkpoint"):
        backbone_names(runs, ["only"])
    with pytest.raises(SystemExit, match="the same name"):
        backbone_names(runs, ["same", "same"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_one_line(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({**TINY, "output_dir": str(tmp_path / "out")}))
    result = subprocess.run(
        [sys.executable, "-m", "neco_loss.app.cli", "train", str(config), "--device", "cuda"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert "error: device 'cuda' was asked for, but this machine has no usable CUDA GPU" in (
        result.stderr
    )
    assert "Traceback" not in result.stderr


def test_non_finite_weights_are_refused_not_scored(run, tmp_path):
    """A diverged run's weights (NaN) get one line naming the checkpoint, never an mIoU."""
    poisoned = tmp_path / "poisoned"
    shutil.copytree(run, poisoned)
    weights = torch.load(poisoned / "backbone.pt", weights_only=True)
    first = next(key for key, value in weights.items() if value.is_floating_point())
    weights[first] = torch.full_like(weights[first], float("nan"))
    torch.save(weights, poisoned / "backbone.pt")
    with pytest.raises(SystemExit, match=f"--checkpoint {poisoned}: .* NaN or infinite"):
        main(["eval", "in-context", "--checkpoint", str(poisoned), *SIZES])
    assert not (tmp_path / "outputs").exists()


def test_non_finite_features_are_refused_not_scored(tmp_path):
    from neco_loss.evaluation.datasets import NUM_CLASSES
    from neco_loss.evaluation.suite import evaluate, evaluation_splits

    train_set, val_set = evaluation_splits("synthetic", None, 32, 4, 3, "train", "val")

    def features(images):
        return torch.full((len(images), 8, 4, 4), float("inf"))

    with pytest.raises(ValueError, match="backbone 'inf' gives non-finite features"):
        evaluate(
            {"inf": features},
            train_set,
            val_set,
            NUM_CLASSES["synthetic"],
            ["in-context"],
            tmp_path,
            progress=False,
        )


def test_eval_says_which_step_it_scored_and_warns_on_unfinished_runs(run, tmp_path, capsys):
    output = tmp_path / "eval"
    main(["eval", "in-context", "--checkpoint", str(run), "--output", str(output), *SIZES])
    assert "warning:" not in capsys.readouterr().err  # a finished run
    context = json.loads((output / "results.json").read_text())["context"]
    assert context["steps"] == {"out": 1}
    (run / "stopped.txt").write_text("SIGINT: stopped after step 1; checkpoint ...\n")
    main(["eval", "in-context", "--checkpoint", str(run), "--output", str(output), *SIZES])
    assert capsys.readouterr().err.splitlines()[0] == (
        f"warning: --checkpoint {run} is an unfinished run, step 1 of 1: SIGINT: stopped after "
        "step 1; checkpoint ...; scoring it as it is."
    )
