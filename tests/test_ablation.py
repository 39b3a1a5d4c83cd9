"""neco ablate: variants of a configuration trained and evaluated; the shipped ablation files."""

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import yaml

from neco_loss.app.ablate import run_ablation
from neco_loss.app.ablation_file import load_ablation, merge
from neco_loss.app.cli import main
from neco_loss.app.experiment import BASELINE
from neco_loss.app.statistics import bootstrap_estimate
from neco_loss.evaluation.datasets import IGNORE_INDEX, NUM_CLASSES
from neco_loss.evaluation.suite import PER_IMAGE_FILE, evaluate, evaluation_splits
from neco_loss.loss import NeCoLoss
from neco_loss.models import DenseViT
from neco_loss.training import build_config
from neco_loss.training.assembly import build_backbone
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
    ablation = load_ablation(path)
    assert len(ablation.variants) >= 2
    assert ablation.evaluation["protocols"] == ["in-context", "linear"]
    for changes in ablation.variants.values():
        NeCoLoss(**build_config(merge(ablation.base, changes)).loss)  # the loss accepts its keys


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
    assert context["split"] == "val"
    assert context["overrides"] == "--seed 3" and "neco_loss_version" in context
    assert context["seeds"] == [3]
    assert set(results["L2"]) == {"in-context mIoU", "linear mIoU"}
    one_seed = results["L2"]["linear mIoU"]
    # one seed: the interval holds the scored images' noise only
    assert one_seed["count"] == 1 and one_seed["low"] <= one_seed["mean"] <= one_seed["high"]
    assert one_seed["values"] == [written["runs"]["L2 (seed 3)"]["linear mIoU"]]
    assert (output / "ablation.png").stat().st_size > 5_000
    assert "change in" not in (output / "ablation.md").read_text()  # no baseline row
    assert "| CE | 1 |" in capsys.readouterr().out
    assert yaml.safe_load((output / "L2" / "seed3" / "config.yaml").read_text())["seed"] == 3
    # Run again into the same folder: the finished runs are reused, not trained again.
    trained = (output / "CE" / "seed3" / "checkpoint_last.pt").stat().st_mtime_ns
    main(["ablate", str(path), "--output", str(output), "--quiet", "--seed", "3"])
    assert (output / "CE" / "seed3" / "checkpoint_last.pt").stat().st_mtime_ns == trained
    assert json.loads((output / "ablation.json").read_text())["results"] == results


def test_ablation_over_seeds_with_baseline_and_x_axis(tmp_path):
    """Every variant trains per seed and every seed scores the start and its runs on its own
    images; rows and paired changes are two-level bootstraps of the images' pixel counts."""
    start = tmp_path / "start.pt"
    torch.save(build_backbone(build_config(TINY)).vit.state_dict(), start)
    spec = {
        "base": {**TINY, "max_steps": 1, "weights": str(start)},
        "variants": {"f=0.25": {}, "f=1": {"loss": {"loss": "l2"}}},
        "seeds": [5, 6],
        "baseline": True,
        "x": {"label": "reference fraction f", "values": {"f=0.25": 0.25, "f=1": 1}},
        "reference": "f=0.25",
        "evaluation": {"train_images": 6, "val_images": 4, "linear_epochs": 1, "split": "test"},
    }
    path = tmp_path / "fraction.yaml"
    path.write_text(yaml.safe_dump(spec))
    output = tmp_path / "out"
    results = run_ablation(path, output, progress=False)
    assert list(results) == [BASELINE, "f=0.25", "f=1"]
    written = json.loads((output / "ablation.json").read_text())
    runs = written["runs"]
    counts = {
        seed: torch.load(output / "evaluation" / f"seed{seed}" / PER_IMAGE_FILE) for seed in (5, 6)
    }
    for variant in ("f=0.25", "f=1"):
        for metric in ("in-context mIoU", "linear mIoU"):
            values = [runs[f"{variant} (seed {seed})"][metric] for seed in (5, 6)]
            mine = [counts[seed][f"{variant} (seed {seed})"][metric] for seed in (5, 6)]
            assert results[variant][metric] == bootstrap_estimate(mine)
            assert results[variant][metric].mean == pytest.approx(sum(values) / 2)
            assert written["results"][variant][metric]["values"] == values
            # The change from the start is paired on each seed's own images.
            starts = [counts[seed][f"{BASELINE} (seed {seed})"][metric] for seed in (5, 6)]
            change = bootstrap_estimate(mine, starts)
            assert written["results"][variant][metric]["change_vs_start"] == asdict(change)
            start_values = [runs[f"{BASELINE} (seed {seed})"][metric] for seed in (5, 6)]
            assert change.mean == pytest.approx(
                sum(v - s for v, s in zip(values, start_values, strict=True)) / 2
            )
    versus = written["results"]["f=1"]["linear mIoU"]["change_vs_f=0.25"]
    assert versus["p_value"] is not None and versus["low"] <= versus["mean"] <= versus["high"]
    assert "change_vs_f=0.25" not in written["results"]["f=0.25"]["linear mIoU"]
    assert results[BASELINE]["in-context mIoU"].count == 2  # scored on every seed's images
    # Seed 6's start is scored on the test images drawn with seed 6, which differ from seed 5's.
    assert written["context"]["split"] == "test"
    config = build_config(TINY)
    start_vit = DenseViT(config.model, checkpoint=start, **config.model_kwargs).eval()
    train_set, scored = evaluation_splits(
        "synthetic", None, TINY["image_size"], 6, 4, "train", "test", seed=6
    )
    direct = evaluate(
        {"start": torch.no_grad()(start_vit)},
        train_set,
        scored,
        NUM_CLASSES["synthetic"],
        ["in-context"],
        tmp_path / "direct",
        ignore_index=IGNORE_INDEX,
        progress=False,
    )["start"]["in-context mIoU"]
    assert runs[f"{BASELINE} (seed 6)"]["in-context mIoU"] == pytest.approx(direct)
    assert direct != pytest.approx(runs[f"{BASELINE} (seed 5)"]["in-context mIoU"])
    assert (output / "f=1" / "seed6" / "backbone.pt").is_file()
    markdown = (output / "ablation.md").read_text()
    assert f"| {BASELINE} | 2 |" in markdown and "f=0.25 (seed 5)" in markdown
    assert (
        "| change in in-context mIoU vs start | change in linear mIoU vs start "
        "| change in in-context mIoU vs f=0.25 | change in linear mIoU vs f=0.25 "
        "| s/step | peak MiB |"
    ) in markdown
    row = next(line for line in markdown.splitlines() if line.startswith("| f=1 |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[-5] == change.format(signed=True)  # f=1, linear mIoU vs start
    assert float(cells[-2]) > 0  # seconds per step, measured
    assert (output / "ablation.png").stat().st_size > 5_000
    # A second row of panels: the paired changes from the reference (f=0.25), zero dashed.
    from PIL import Image

    with Image.open(output / "ablation.png") as picture:
        assert picture.height >= 700  # 7.2 in at 110 dpi with the change row, 3.8 in without
    # --seeds replaces the file's seeds; --seed next to seeds is refused.
    with pytest.raises(ValueError, match="--seed conflicts"):
        run_ablation(path, output, ["--seed", "1"], progress=False)


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
    for key, value, message in (
        ("seeds", [1, 1], "'seeds' of .* must be a non-empty list of distinct ints"),
        ("seeds", "0", "'seeds' of"),
        ("baseline", "yes", "'baseline' of .* must be true or false"),
        ("evaluation", {"split": "train"}, "'evaluation.split' of .* must be 'val' or 'test'"),
        ("reference", "c", r"'reference' of .* must name a variant \(\['a', 'b'\]\)"),
        ("x", {"label": "f", "values": {"a": 1}}, r"must give a number for every variant"),
        ("x", {"label": "f", "values": {"a": 1, "b": "big"}}, r"'x.values.b' .* a number"),
    ):
        spec = {"base": {}, "variants": {"a": {}, "b": {}}, key: value}
        path.write_text(yaml.safe_dump(spec))
        with pytest.raises(ValueError, match=message):
            load_ablation(path)


def test_baseline_needs_starting_weights(tmp_path):
    path = tmp_path / "a.yaml"
    spec = {"base": {**TINY, "max_steps": 1}, "variants": {"a": {}}, "baseline": True}
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ValueError, match="has no 'weights'"):
        run_ablation(path, tmp_path / "out", progress=False)
