"""SyntheticScenes, NeCoMultiCrop boxes, ImageFolder."""

import math
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from neco_loss.data import CLASS_NAMES, ImageFolder, NeCoMultiCrop, SyntheticScenes
from neco_loss.geometry import intersect

from .crops import assert_view_shows_box, coordinate_image

ASPECT = 0.55 + 0.45 * 0.7  # the aspect drawn from u = 0.7 in (0.55, 1.0)


class TestSyntheticScenes:
    def test_deterministic_and_split_dependent(self):
        first = SyntheticScenes("train", size=48)[3]
        again = SyntheticScenes("train", size=48)[3]
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
        assert not torch.equal(first[0], SyntheticScenes("val", size=48)[3][0])
        test = SyntheticScenes("test", size=48)[3][0]
        assert not torch.equal(test, first[0]) and not torch.equal(
            test, SyntheticScenes("val", size=48)[3][0]
        )
        assert not torch.equal(first[0], SyntheticScenes("train", size=48, seed=1)[3][0])

    def test_shapes_values_and_classes(self):
        scenes = SyntheticScenes("val", size=64, length=40)
        assert len(scenes) == 40
        seen = torch.zeros(len(CLASS_NAMES), dtype=torch.long)
        for image, mask in scenes:
            assert image.shape == (3, 64, 64) and image.dtype == torch.float32
            assert 0 <= image.min() and image.max() <= 1
            assert mask.shape == (64, 64) and mask.dtype == torch.long
            seen += torch.bincount(mask.flatten(), minlength=len(CLASS_NAMES))
        assert (seen > 0).all()  # every class occurs
        assert 0.1 < seen[1:].sum() / seen.sum() < 0.8  # objects cover a good part

    @pytest.mark.parametrize(
        "label, area",
        [
            (1, math.pi * ASPECT),  # ellipse pi * r * (r * aspect), in units of r^2
            (2, 4 * ASPECT),  # rectangle (2r) x (2r * aspect)
            (3, 3 * math.sqrt(3) / 4),  # equilateral triangle of inradius r / 2
        ],
    )
    def test_shape_areas(self, label, area, monkeypatch):
        """Masks are the shapes they claim to be: areas match the closed forms."""
        scenes = SyntheticScenes("train", size=400)
        values = iter([0.25, 0.5, 0.5, 0.3, 0.7])  # radius, centre x, y, angle, aspect
        monkeypatch.setattr(
            "neco_loss.data.synthetic._uniform",
            lambda g, low, high: low + (high - low) * next(values),
        )
        ys, xs = torch.meshgrid(torch.arange(400.0) + 0.5, torch.arange(400.0) + 0.5, indexing="ij")
        inside, _, _ = scenes._shape(label, xs, ys, torch.Generator())
        radius = (0.13 + 0.25 * (0.3 - 0.13)) * 400
        assert inside.sum().item() == pytest.approx(area * radius**2, rel=0.03)

    def test_bad_arguments(self):
        with pytest.raises(ValueError, match="split must be one of"):
            SyntheticScenes("testing")
        with pytest.raises(ValueError, match="size must be an int >= 16"):
            SyntheticScenes(size=8)
        with pytest.raises(IndexError):
            SyntheticScenes("val", length=2)[2]


class TestNeCoMultiCrop:
    @pytest.mark.parametrize("flip", [False, True])
    def test_boxes_locate_the_pixels(self, flip):
        torch.manual_seed(0)
        height, width = 120, 160
        transform = NeCoMultiCrop(64, 32, flip=flip, photometric=False, normalize=False)
        for _ in range(5):
            views, boxes = transform(coordinate_image(height, width))
            assert len(views) == 6 and boxes.shape == (6, 5)
            for view, box in zip(views, boxes.tolist(), strict=True):
                # within a pixel and a half of the original image
                assert_view_shows_box(view, box, height, width, border=2, pixels=1.5)
            if flip:
                assert set(boxes[:, 4].tolist()) <= {0.0, 1.0}

    def test_overlap_constraint(self):
        torch.manual_seed(1)
        transform = NeCoMultiCrop(min_overlap=0.1)
        area = 200 * 300
        for _ in range(50):
            boxes = transform.sample_boxes(200, 300)
            for index in range(1, 6):
                shared = intersect(boxes[index], boxes[: min(index, 2)])
                overlap = (shared[:, 2] - shared[:, 0]).clamp(min=0) * (
                    shared[:, 3] - shared[:, 1]
                ).clamp(min=0)
                required = 0.1 * area * (2 if index < 2 else 1)
                assert (overlap > required).all()
            assert (boxes[:, 2] <= 300).all() and (boxes[:, 3] <= 200).all()

    def test_impossible_overlap_is_an_error(self):
        transform = NeCoMultiCrop(local_scale=(0.05, 0.1), min_overlap=0.5, max_tries=20)
        with pytest.raises(ValueError, match="could not sample crop"):
            transform.sample_boxes(100, 100)

    def test_pil_input_normalised_views(self):
        image = Image.new("RGB", (90, 70), color=(200, 10, 10))
        views, boxes = NeCoMultiCrop(28, 14, num_local=2)(image)
        assert [tuple(v.shape) for v in views] == [(3, 28, 28)] * 2 + [(3, 14, 14)] * 2
        assert boxes.dtype == torch.float32 and (boxes[:, 4] == 0).all()

    def test_bad_arguments(self):
        with pytest.raises(ValueError, match="global_scale must be"):
            NeCoMultiCrop(global_scale=(0.5, 0.2))
        with pytest.raises(ValueError, match="min_overlap must be in"):
            NeCoMultiCrop(min_overlap=1.0)
        with pytest.raises(ValueError, match="image must be a PIL image or a"):
            NeCoMultiCrop()(torch.rand(4, 10, 10))


class TestImageFolder:
    def test_recursive_formats_and_corrupt_files(self, tmp_path):
        (tmp_path / "a" / "b").mkdir(parents=True)
        Image.new("RGB", (8, 6)).save(tmp_path / "one.png")
        Image.new("L", (8, 6)).save(tmp_path / "a" / "two.JPG")
        Image.new("RGB", (8, 6)).save(tmp_path / "a" / "b" / "three.webp")
        (tmp_path / "a" / "broken.jpg").write_bytes(b"not an image")
        Image.new("RGB", (64, 48), color=(1, 2, 3)).save(tmp_path / "whole.png")
        whole = (tmp_path / "whole.png").read_bytes()
        (tmp_path / "whole.png").unlink()
        (tmp_path / "truncated.png").write_bytes(whole[: len(whole) // 2])
        (tmp_path / "notes.txt").write_text("skip me")
        folder = ImageFolder(tmp_path)
        assert len(folder) == 5
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            images = [folder[i] for i in range(len(folder))]
        assert all(image.mode == "RGB" and image.size == (8, 6) for image in images)
        assert len(folder.skipped) == 2
        assert {"broken.jpg", "truncated.png"} == {path.name for path in folder.skipped}
        assert any("truncated.png" in str(warning.message) for warning in caught)

    @pytest.mark.parametrize("side", [20000, 9000], ids=["PIL-refuses", "over-MAX_PIXELS"])
    def test_a_decompression_bomb_costs_one_image(self, tmp_path, side):
        """A header-only PNG of side x side pixels is skipped before decoding, like a broken
        file: 20000 px PIL refuses (DecompressionBombError, not an OSError); 9000 px (81 M)
        is under PIL's limit but over ours."""

        def chunk(kind: bytes, data: bytes) -> bytes:
            crc = struct.pack(">I", zlib.crc32(kind + data))
            return struct.pack(">I", len(data)) + kind + data + crc

        header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
        (tmp_path / "bomb.png").write_bytes(
            b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")
        )
        Image.new("RGB", (8, 6), color=(9, 9, 9)).save(tmp_path / "good.png")
        folder = ImageFolder(tmp_path, skip_log=tmp_path / "skipped.txt")
        images = [folder[i] for i in range(len(folder))]
        assert [image.getpixel((0, 0)) for image in images] == [(9, 9, 9), (9, 9, 9)]
        assert [path.name for path in folder.skipped] == ["bomb.png"]
        path, reason = (tmp_path / "skipped.txt").read_text().strip().split("\t")
        assert path == str(tmp_path / "bomb.png")
        assert ("decompression bomb" if side == 20000 else "more than MAX_PIXELS") in reason

    @pytest.mark.parametrize("mode", ["I;16", "I"])
    def test_16_bit_images_are_scaled_not_clipped(self, tmp_path, mode):
        ramp = np.linspace(0, 65535, 64 * 16).reshape(16, 64).astype(np.uint16)
        image = Image.fromarray(ramp if mode == "I;16" else ramp.astype(np.int32))
        assert image.mode == mode
        image.save(tmp_path / "ramp.png" if mode == "I;16" else tmp_path / "ramp.tif")
        (converted,) = [ImageFolder(tmp_path)[0]]
        grey = np.asarray(converted)[..., 0].astype(np.float64)
        assert converted.mode == "RGB"
        assert (grey == 255).mean() < 0.01  # convert("RGB") made 99.5% of it 255
        np.testing.assert_allclose(grey, ramp / 257, atol=0.5 + 1e-9)

    def test_errors(self, tmp_path):
        with pytest.raises(FileNotFoundError, match="does not exist"):
            ImageFolder(tmp_path / "missing")
        with pytest.raises(ValueError, match="no images"):
            ImageFolder(tmp_path)
        (tmp_path / "bad.png").write_bytes(b"x")
        with pytest.warns(UserWarning), pytest.raises(ValueError, match="none of the 1 images"):
            ImageFolder(tmp_path)[0]


class TestSaveScenes:
    def test_cli_writes_the_training_scenes(self, tmp_path):
        from neco_loss.app.cli import main

        main(["make-images", str(tmp_path / "images"), "--count", "3", "--size", "48"])
        paths = sorted((tmp_path / "images").iterdir())
        assert [path.name for path in paths] == [f"scene_{i:05d}.png" for i in range(3)]
        scene = SyntheticScenes("train", size=48, length=3)[2][0]
        pixels = v2.functional.pil_to_tensor(Image.open(paths[2])).float() / 255
        assert (pixels - scene).abs().max() < 1 / 255  # to_pil_image truncates to 8 bits

    def test_count_must_be_positive(self, tmp_path):
        from neco_loss.data.synthetic import save_scenes

        with pytest.raises(ValueError, match="count must be an int >= 1 but is 0"):
            save_scenes(tmp_path, 0)


def test_a_run_reports_skipped_images_once_at_its_end(tmp_path, capsys):
    """No warning per file mid-run (it breaks the progress bar), from worker processes too:
    one summary line and a list in the run folder."""
    import yaml

    from neco_loss.app.cli import main
    from tests.test_training import TINY

    images = tmp_path / "images"
    images.mkdir()
    for index in range(6):
        Image.new("RGB", (48, 48), color=(40 * index, 20, 90)).save(images / f"{index}.png")
    for name in ("bad1.jpg", "bad2.png"):
        (images / name).write_bytes(b"not an image")
    settings = {**TINY, "dataset": str(images), "train_images": None, "batch_size": 2}
    settings.pop("image_size")  # synthetic scenes only: a folder's run would warn it is ignored
    settings.update(max_steps=4, num_workers=2, output_dir=str(tmp_path / "run"))
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(settings))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a per-file warning would fail the run here
        warnings.filterwarnings("ignore", message=".* starts from random weights")
        main(["train", str(config), "--quiet"])
    captured = capsys.readouterr()
    listed = tmp_path / "run" / "skipped_images.txt"
    assert f"skipped 2 unreadable images, listed in {listed}" in captured.out
    assert "skipping unreadable" not in captured.err
    assert {line.split("\t")[0].rsplit("/", 1)[1] for line in listed.read_text().splitlines()} == {
        "bad1.jpg",
        "bad2.png",
    }


def test_the_dataset_figure_script(tmp_path):
    from examples.synthetic_scenes_figure import draw

    path = draw(tmp_path / "scenes.png", count=3)
    assert path.stat().st_size > 20_000
