"""Dataset loaders on tiny fixtures written in the standard layouts."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from neco_loss.evaluation.datasets import NUM_CLASSES, segmentation_dataset


def write(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8), mode).save(path)


def rgb(height=20, width=30):
    return np.full((height, width, 3), 120, dtype=np.uint8)


def labels(values, height=20, width=30):
    """A mask whose columns cycle through ``values``."""
    row = np.array([values[i % len(values)] for i in range(width)], dtype=np.uint8)
    return np.tile(row, (height, 1))


def test_pascal_voc(tmp_path):
    root = tmp_path / "VOC2012"
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("a\nb\n")
    for name in ("a", "b"):
        write(root / "JPEGImages" / f"{name}.jpg", rgb())
        write(root / "SegmentationClass" / f"{name}.png", labels([0, 15, 20, 255]))
    data = segmentation_dataset("voc", root, "val", 16)
    image, mask = data[0]
    assert len(data) == 2 and image.shape == (3, 16, 16) and mask.shape == (16, 16)
    assert set(mask.unique().tolist()) == {0, 15, 20, 255}


def test_ade20k_shifts_labels_and_ignores_zero(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    write(root / "images" / "validation" / "x.jpg", rgb())
    write(root / "annotations" / "validation" / "x.png", labels([0, 1, 150]))
    _, mask = segmentation_dataset("ade20k", root, "val", 16)[0]
    assert set(mask.unique().tolist()) == {255, 0, 149}
    assert NUM_CLASSES["ade20k"] == 150


def test_coco_stuff_and_things_super_categories(tmp_path):
    root = tmp_path / "coco"
    stuff_categories = [
        {"id": 92, "name": "banner", "supercategory": "textile"},
        {"id": 105, "name": "floor-wood", "supercategory": "floor"},
        {"id": 183, "name": "other", "supercategory": "other"},
    ]
    stuff_json = root / "annotations" / "stuff_annotations" / "stuff_val2017.json"
    stuff_json.parent.mkdir(parents=True)
    stuff_json.write_text(json.dumps({"categories": stuff_categories}))
    write(root / "images" / "val2017" / "1.jpg", rgb())
    write(
        root / "annotations" / "stuff_annotations" / "stuff_val2017_pixelmaps" / "1.png",
        labels([0, 92, 105, 183]),
    )
    _, mask = segmentation_dataset("coco-stuff", root, "val", 16)[0]
    # sorted super-categories without "other": floor -> 0, textile -> 1; things (0), other -> 255
    assert set(mask.unique().tolist()) == {0, 1, 255}
    assert (mask[:, 0] == 255).all()

    panoptic = [
        {"id": 1, "name": "person", "supercategory": "person", "isthing": 1},
        {"id": 3, "name": "car", "supercategory": "vehicle", "isthing": 1},
        {"id": 2, "name": "bicycle", "supercategory": "vehicle", "isthing": 1},
        {"id": 200, "name": "wall", "supercategory": "wall", "isthing": 0},
    ]
    panoptic_json = root / "annotations" / "panoptic_annotations" / "panoptic_val2017.json"
    panoptic_json.parent.mkdir(parents=True)
    panoptic_json.write_text(json.dumps({"categories": panoptic}))
    write(root / "annotations" / "val2017" / "1.png", labels([0, 1, 2, 3, 200]))
    _, mask = segmentation_dataset("coco-things", root, "val", 30)[0]
    values = mask[0].tolist()
    assert values[:5] == [255, 0, 1, 1, 255]  # person -> 0, vehicle -> 1, stuff/unlabelled -> 255


def test_synthetic_and_errors(tmp_path):
    image, mask = segmentation_dataset("synthetic", None, "val", 32)[0]
    # A misspelt split is refused, not read as the training images.
    with pytest.raises(ValueError, match="split"):
        segmentation_dataset("synthetic", None, "tset", 32)
    assert image.shape == (3, 32, 32) and mask.shape == (32, 32)
    with pytest.raises(ValueError, match="dataset must be one of"):
        segmentation_dataset("cityscapes", tmp_path, "val", 32)
    with pytest.raises(ValueError, match="needs its folder: give --data-root"):
        segmentation_dataset("voc", None, "val", 32)
    with pytest.raises(FileNotFoundError, match=r"Expected layout: ROOT/JPEGImages"):
        segmentation_dataset("voc", tmp_path, "val", 32)
    with pytest.raises(FileNotFoundError, match="ADEChallengeData2016"):
        segmentation_dataset("ade20k", tmp_path, "val", 32)


def test_synthetic_splits_draw_as_many_scenes_as_asked():
    """Asking for more scenes than a split's default draws them (not a silent cap at 96);
    the first ones are the default ones, and a seed draws other scenes."""
    from neco_loss.data.synthetic import DEFAULT_LENGTH
    from neco_loss.evaluation.suite import evaluation_splits

    wanted = DEFAULT_LENGTH["test"] + 32
    train_set, scored = evaluation_splits("synthetic", None, 32, 0, wanted, "train", "test", seed=3)
    assert len(scored) == wanted and len(train_set) == DEFAULT_LENGTH["train"]
    default = segmentation_dataset("synthetic", None, "test", 32, seed=3)
    assert torch.equal(scored[5][0], default[5][0])
    other_seed = segmentation_dataset("synthetic", None, "test", 32, seed=4)
    assert not torch.equal(scored[5][0], other_seed[5][0])
