"""``neco eval`` scores any starting point (a training config, shipped weights, a transformers
folder, a timm name) and your own labelled images (``--dataset folder``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from neco_loss.app.cli import main
from neco_loss.data.synthetic import CLASS_NAMES, SyntheticScenes
from tests.test_backbones import dinov3_folder

SIZES = ["--train-images", "4", "--val-images", "3"]
RECIPE = "examples/recipes/tiny_cpu.yaml"  # starts from the shipped testbed weights


def in_context(output: Path) -> float:
    results = json.loads((output / "results.json").read_text())["results"]
    return next(iter(results.values()))["in-context mIoU"]


def test_the_start_of_a_config_and_the_shipped_weights_score_alike(tmp_path, capsys):
    main(["eval", "in-context", "--checkpoint", RECIPE, *SIZES, "--output", str(tmp_path / "a")])
    first = capsys.readouterr().out.splitlines()[0]
    assert first == (
        "scoring on synthetic (built in, no files): 3 val images, 4 train images to fit on, 96 px"
    )
    main(["eval", "in-context", "--checkpoint", "testbed", *SIZES, "--output", str(tmp_path / "b")])
    assert in_context(tmp_path / "a") == in_context(tmp_path / "b")


def test_a_transformers_dinov3_folder_is_scored_as_it_is(tmp_path):
    folder = dinov3_folder(tmp_path)
    output = tmp_path / "eval"
    main(["eval", "in-context", "--checkpoint", str(folder), *SIZES, "--output", str(output)])
    assert 0.0 <= in_context(output) <= 1.0


def test_an_unknown_checkpoint_and_an_offline_timm_name_stop_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # nothing cached
    for spec, message in (
        (str(tmp_path / "none"), "no such run folder, weights file, training config"),
        ("vit_small_patch16_dinov3", "are not cached and huggingface.co cannot be reached"),
    ):
        with pytest.raises(SystemExit) as stopped:
            main(["eval", "in-context", "--checkpoint", spec, *SIZES])
        line = stopped.value.code
        assert isinstance(line, str) and line.startswith("error: ") and "\n" not in line, line
        assert message in line


def labelled_folder(root: Path, masks_from: int = 0) -> Path:
    """A user's dataset in the documented layout, made from synthetic scenes."""
    root.mkdir(parents=True)
    (root / "classes.txt").write_text("\n".join(CLASS_NAMES) + "\n")
    for split, count in (("train", 4), ("val", 3)):
        (root / split / "images").mkdir(parents=True)
        (root / split / "masks").mkdir(parents=True)
        scenes = SyntheticScenes("val" if split == "val" else "train", size=64, length=count)
        for index in range(count):
            image, mask = scenes[index]
            pixels = (image.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / split / "images" / f"scene{index}.jpg")
            labels = mask.numpy().astype(np.uint8) + masks_from
            Image.fromarray(labels).save(root / split / "masks" / f"scene{index}.png")
    return root


def test_your_own_labelled_images_are_scored(tmp_path, capsys):
    root = labelled_folder(tmp_path / "mine")
    output = tmp_path / "eval"
    argv = ["eval", "in-context", "linear", "--checkpoint", "testbed", "--dataset", "folder"]
    sizes = ["--train-images", "0", "--image-size", "64"]  # default: 448 px, as the paper
    main([*argv, "--data-root", str(root), "--output", str(output), *sizes])
    out = capsys.readouterr().out
    assert out.splitlines()[0] == (
        f"scoring on folder in {root}: 3 val images, 4 train images to fit on, 64 px"
    )
    results = json.loads((output / "results.json").read_text())
    assert len(results["per_class"]["testbed"]["in-context"]) == len(CLASS_NAMES)
    assert 0.0 <= in_context(output) <= 1.0


def test_a_mask_value_beyond_the_classes_is_refused_in_one_line(tmp_path):
    root = labelled_folder(tmp_path / "mine", masks_from=3)  # labels 3..7 for 5 classes
    argv = ["eval", "in-context", "--checkpoint", "testbed", "--dataset", "folder"]
    with pytest.raises(SystemExit) as stopped:
        main([*argv, "--data-root", str(root), "--image-size", "64", *SIZES])
    line = stopped.value.code
    assert isinstance(line, str) and "\n" not in line
    assert "must hold class indices 0..4 or 255 in one channel, but holds [" in line
    (root / "classes.txt").unlink()
    with pytest.raises(SystemExit, match="classes.txt does not exist. Expected layout: ROOT"):
        main([*argv, "--data-root", str(root), "--image-size", "64", *SIZES])
