"""The solo-learn adapter without solo-learn: boxed crops, method_kwargs, version check."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from neco_loss.integrations.solo_learn import BoxedMultiCrop, neco_method_kwargs
from neco_loss.integrations.solo_learn.config import DEFAULTS, loss_kwargs
from omegaconf import OmegaConf
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from neco_loss.geometry import intersection_area

from .crops import assert_view_shows_box, ramp_image

ROOT = Path(__file__).parents[1]


def entry(size: int, crops: int, scale=(0.25, 1.0), flip: float = 0.0) -> dict:
    """One solo-learn augmentation entry (the keys BoxedMultiCrop reads)."""
    return {
        "rrc": {"enabled": True, "crop_min_scale": scale[0], "crop_max_scale": scale[1]},
        "horizontal_flip": {"prob": flip},
        "crop_size": size,
        "num_crops": crops,
    }


def to_tensor(_entry) -> v2.Compose:
    return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])


class TestBoxedMultiCrop:
    @pytest.mark.parametrize("flip", [0.0, 1.0])
    def test_views_show_their_boxes(self, flip):
        torch.manual_seed(0)
        augmentations = [entry(32, 2, flip=flip), entry(16, 3, (0.05, 0.25), flip=flip)]
        transform = BoxedMultiCrop(augmentations, to_tensor)
        for _ in range(5):
            views, boxes = transform(ramp_image(160, 120))
            assert [tuple(v.shape) for v in views] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
            assert boxes.shape == (5, 5) and (boxes[:, 4] == flip).all()
            for view, box in zip(views, boxes.tolist(), strict=True):
                # bicubic on 8-bit values: within a pixel of the original image
                assert_view_shows_box(view, box, 120, 160, border=2, pixels=1.0)

    def test_overlap_constraint_and_scales(self):
        torch.manual_seed(1)
        transform = BoxedMultiCrop(
            [entry(32, 2, (0.3, 0.6)), entry(16, 4, (0.05, 0.1))], to_tensor, min_overlap=0.05
        )
        area = 120 * 160
        for _ in range(20):
            _, boxes = transform(ramp_image(160, 120))
            sides = boxes[:, 2:4] - boxes[:, :2]
            fractions = sides.prod(1) / area
            assert (fractions[:2] > 0.29).all() and (fractions[:2] < 0.61).all()
            assert (fractions[2:] < 0.11).all()
            for index in range(1, 6):
                overlap = intersection_area(boxes[index, :4], boxes[: min(index, 2), :4])
                assert (overlap > 0.05 * area * (2 if index < 2 else 1)).all()

    def test_solo_style_batches(self):
        """Through a dataset that yields (index, transform(image), -1), as solo-learn's."""

        class Images(torch.utils.data.Dataset):
            def __len__(self):
                return 4

            def __getitem__(self, index):
                return index, transform(ramp_image(80, 60)), -1

        transform = BoxedMultiCrop([entry(32, 2), entry(16, 2, (0.05, 0.25))], to_tensor)
        indexes, (views, boxes), targets = next(iter(DataLoader(Images(), batch_size=4)))
        assert indexes.tolist() == [0, 1, 2, 3] and (targets == -1).all()
        assert [tuple(v.shape) for v in views] == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 2
        assert boxes.shape == (4, 4, 5)

    def test_each_entry_builds_its_pipeline_once(self):
        built = []

        def builder(augmentation):
            built.append(augmentation["crop_size"])
            return to_tensor(augmentation)

        BoxedMultiCrop([entry(32, 2), entry(16, 4, (0.05, 0.25))], builder)
        assert built == [32, 16]

    def test_omegaconf_entries(self):
        augmentations = OmegaConf.create([entry(32, 1), entry(32, 1), entry(16, 2)])
        transform = BoxedMultiCrop(augmentations, to_tensor)
        assert transform.sizes == [32, 32, 16, 16] and transform.num_large == 2

    def test_errors(self):
        disabled = entry(32, 2)
        disabled["rrc"]["enabled"] = False
        with pytest.raises(ValueError, match=r"augmentations\[0\].rrc.enabled is false"):
            BoxedMultiCrop([disabled], to_tensor)
        with pytest.raises(ValueError, match=r"augmentations\[2\] makes large crops"):
            BoxedMultiCrop([entry(32, 1), entry(16, 1), entry(32, 1)], to_tensor)
        missing = entry(32, 2)
        del missing["horizontal_flip"]
        with pytest.raises(ValueError, match=r"augmentations\[0\] lacks horizontal_flip.prob"):
            BoxedMultiCrop([missing], to_tensor)
        with pytest.raises(ValueError, match="NeCo needs two or more"):
            BoxedMultiCrop([entry(32, 1)], to_tensor)
        impossible = BoxedMultiCrop(
            [entry(32, 1, (0.05, 0.06)), entry(32, 1, (0.05, 0.06))],
            to_tensor,
            min_overlap=0.5,
            max_tries=10,
        )
        with pytest.raises(ValueError, match="could not sample crop 1"):
            impossible(ramp_image(80, 60))


class TestMethodKwargs:
    def test_defaults_are_the_reference(self):
        parsed = neco_method_kwargs(None)
        assert parsed == {**DEFAULTS, "steepness": [100.0, 100.0]}
        assert parsed["roi_size"] == 7 and parsed["network"] == "bitonic"
        assert parsed["relaxation"] == "cauchy" and parsed["references"] == "per_image"
        assert parsed["proj_hidden_dim"] == 2048 and parsed["proj_output_dim"] == 256
        assert parsed["teacher"] == "ema" and parsed["loss_mask"] == "all"
        assert loss_kwargs(parsed)["steepness"] == (100.0, 100.0)

    def test_omegaconf_node_and_overrides(self):
        node = OmegaConf.create(
            {"steepness": [30, 10], "top_k": 8, "loss": "l2", "references": "queue"}
        )
        parsed = neco_method_kwargs(node)
        assert parsed["steepness"] == [30.0, 10.0] and parsed["top_k"] == 8
        assert loss_kwargs(parsed)["loss"] == "l2"
        assert neco_method_kwargs({"steepness": 50})["steepness"] == [50.0, 50.0]

    @pytest.mark.parametrize(
        "kwargs, message",
        [
            ({"steepnes": 10}, r"unknown NeCo method_kwargs \['steepnes'\]"),
            ({"steepness": [1, 2, 3]}, "method_kwargs.steepness must be"),
            ({"loss": "kl"}, "loss must be one of"),
            ({"network": "bubble"}, "network must be one of"),
            ({"references": "all"}, "references must be one of"),
            ({"roi_size": 0}, "roi_size must be an int >= 1"),
            ({"top_k": 50}, "top_k"),
            ({"proj_output_dim": 0}, "method_kwargs.proj_output_dim must be an int >= 1"),
            ({"head_lr_scale": 0}, "method_kwargs.head_lr_scale must be a number > 0"),
            ({"min_overlap": 1.5}, r"method_kwargs.min_overlap must be in \[0, 1\)"),
            ({"gather_references": "yes"}, "method_kwargs.gather_references must be"),
            ({"teacher": "none"}, "method_kwargs.teacher must be one of"),
            ({"loss_mask": "fg"}, "loss_mask must be one of"),
        ],
    )
    def test_errors_name_the_key(self, kwargs, message):
        with pytest.raises(ValueError, match=message):
            neco_method_kwargs(kwargs)

    def test_not_a_mapping(self):
        with pytest.raises(TypeError, match="method_kwargs must be a mapping but is list"):
            neco_method_kwargs([1, 2])


def test_old_solo_learn_is_refused(tmp_path):
    """PyPI's 1.0.2 layout (no solo.args.pretrain) gets an error naming the supported version."""
    package = tmp_path / "solo"
    (package / "methods").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "methods" / "__init__.py").write_text("")
    metadata = tmp_path / "solo_learn-1.0.2.dist-info"
    metadata.mkdir()
    (metadata / "METADATA").write_text("Metadata-Version: 2.1\nName: solo-learn\nVersion: 1.0.2\n")
    script = textwrap.dedent(
        """
        from neco_loss.integrations.solo_learn import register
        try:
            register()
        except ImportError as error:
            print(error)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert "solo-learn 1.0.2 is installed" in result.stdout
    assert "GitHub main (version 1.0.6)" in result.stdout


def test_shipped_solo_config_is_the_reference():
    """examples/solo_learn/neco_vits14.yaml composes (hydra) into the reference crops and loss."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(ROOT / "examples" / "solo_learn"), version_base="1.2"):
        cfg = compose("neco_vits14.yaml")
    parsed = neco_method_kwargs(cfg.method_kwargs)
    assert parsed["references"] == "queue" and parsed["queue_length"] == 8192
    assert parsed["steepness"] == [100.0, 100.0] and parsed["roi_size"] == 7
    transform = BoxedMultiCrop(cfg.augmentations, to_tensor)
    assert transform.sizes == [518] * 2 + [98] * 4 and transform.num_large == 2
    assert transform.scales == [(0.25, 1.0)] * 2 + [(0.05, 0.25)] * 4
    assert transform.flip_probabilities == [0.0] * 6
    # solo-learn scales lr by batch / 256: the reference 1e-5 at batch 64 on one device
    scale = cfg.optimizer.batch_size * len(cfg.devices) / 256
    assert cfg.optimizer.lr * scale == pytest.approx(1e-5)
