"""neco ablate: variants of a configuration trained and evaluated; the shipped ablation files."""

import json
from pathlib import Path

import pytest
import yaml

from neco_loss.ablation import load_ablation, merge
from neco_loss.cli import main
from neco_loss.loss import NeCoLoss
from neco_loss.training import build_config
from tests.test_training import TINY

ABLATIONS = sorted((Path(__file__).parents[1] / "examples" / "ablations").glob("*.yaml"))


def test_merge_is_nested():
    base = {"loss": {"roi_size": 4, "top_k": 2}, "lr_head": 0.1}
    assert merge(base, {"loss": {"top_k": 3}}) == {
        "loss": {"roi_size": 4, "top_k": 3},
        "lr_head": 0.1,
    }
    assert base["loss"]["top_k"] == 2


@pytest.mark.parametrize("path", ABLATIONS, ids=lambda p: p.stem)
def test_shipped_ablations_give_valid_configs(path):
    base, variants, evaluation = load_ablation(path)
    assert len(variants) >= 2 and evaluation["protocols"] == ["in-context", "linear"]
    for changes in variants.values():
        NeCoLoss(**build_config(merge(base, changes or {})).loss)  # the loss accepts its keys


def test_ablation_trains_evaluates_and_plots(tmp_path, capsys):
    spec = {
        "base": {**TINY, "max_steps": 1},
        "variants": {"CE": {}, "L2": {"loss": {"loss": "l2"}}},
        "evaluation": {"train_images": 6, "val_images": 4, "linear_epochs": 1},
    }
    path = tmp_path / "loss.yaml"
    path.write_text(yaml.safe_dump(spec))
    output = tmp_path / "out"
    main(["ablate", str(path), "--output", str(output), "--quiet", "--seed", "3"])
    written = json.loads((output / "ablation.json").read_text())
    results, context = written["results"], written["context"]
    assert set(results) == {"CE", "L2"}
    assert context["dataset"] == "synthetic" and context["val_images"] == 4
    assert context["overrides"] == "--seed 3" and "neco_loss_version" in context
    assert set(results["L2"]) == {"in-context mIoU", "linear mIoU"}
    assert (output / "ablation.png").stat().st_size > 5_000
    assert "| CE |" in capsys.readouterr().out
    assert yaml.safe_load((output / "L2" / "config.yaml").read_text())["seed"] == 3
    # Run again into the same folder: the finished variants are reused, not trained again.
    trained = (output / "CE" / "checkpoint_last.pt").stat().st_mtime_ns
    main(["ablate", str(path), "--output", str(output), "--quiet", "--seed", "3"])
    assert (output / "CE" / "checkpoint_last.pt").stat().st_mtime_ns == trained
    assert json.loads((output / "ablation.json").read_text())["results"] == results


def test_bad_ablation_files(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"variants": {"a": {}}}))
    with pytest.raises(ValueError, match="needs 'base' and 'variants'"):
        load_ablation(path)
    path.write_text(yaml.safe_dump({"base": "missing.yaml", "variants": {"a": {}}}))
    with pytest.raises(FileNotFoundError, match="base config"):
        load_ablation(path)
    path.write_text(yaml.safe_dump({"base": {}, "variants": {"a": {}}, "evaluation": {"k": 1}}))
    with pytest.raises(ValueError, match=r"unknown evaluation keys \['k'\]"):
        load_ablation(path)
