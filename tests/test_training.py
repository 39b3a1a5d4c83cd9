"""neco train: a tiny run, exact resume, configs and their errors."""

import pytest
import torch
import yaml

from neco_loss.training import Trainer, build_config, load_config, train
from neco_loss.training.run_folder import LAST, load_checkpoint

TINY = {
    "model_kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2},
    "head_hidden_dim": 32,
    "head_out_dim": 16,
    "image_size": 48,
    "train_images": 8,
    "global_size": 32,
    "local_size": 16,
    "num_local": 2,
    "batch_size": 4,
    "epochs": 5,
    "loss": {"roi_size": 2},
    "lr_backbone": 1e-3,
    "lr_head": 1e-3,
    "momentum": 0.9,
}


def tiny_config(tmp_path, **changes):
    return build_config({**TINY, "output_dir": str(tmp_path), **changes})


def test_three_steps_train_save_and_move_the_teacher(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, max_steps=3), progress=False)
    initial = {k: v.clone() for k, v in trainer.student.state_dict().items()}
    result = trainer.fit()
    assert result.steps == 3 and torch.isfinite(torch.tensor(result.last_loss))
    for name in (LAST, "backbone.pt", "config.yaml", "metrics.csv"):
        assert (tmp_path / name).is_file()
    assert len((tmp_path / "metrics.csv").read_text().splitlines()) == 1 + 3
    student = trainer.student.state_dict()
    teacher = trainer.teacher.module.state_dict()
    name = "backbone.vit.blocks.0.attn.qkv.weight"
    assert not torch.equal(student[name], initial[name])  # the student learned
    assert not torch.equal(teacher[name], initial[name])  # the teacher moved by EMA ...
    assert not torch.equal(teacher[name], student[name])  # ... but is not the student
    assert all(not p.requires_grad for p in trainer.teacher.parameters())
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["max_steps"] == 3 and saved["loss"] == {"roi_size": 2}


def test_resume_reaches_the_identical_state(tmp_path, monkeypatch):
    straight = Trainer(tiny_config(tmp_path / "straight", max_steps=3), progress=False)
    straight.fit()

    config = tiny_config(tmp_path / "resumed", max_steps=3, checkpoint_every=2)
    interrupted = Trainer(config, progress=False)
    crash_before_step(monkeypatch, interrupted, 3)
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit()
    assert load_checkpoint(tmp_path / "resumed" / LAST)["step"] == 2

    resumed = Trainer(config, progress=False)
    resumed.resume()
    resumed.fit()
    for name, expected in straight.state().items():
        if name in ("student", "teacher", "criterion"):
            for key, value in expected.items():
                assert torch.equal(resumed.state()[name][key], value), (name, key)
    assert resumed.state()["optimizer"]["state"].keys() == expected_keys(straight)
    metrics = (tmp_path / "resumed" / "metrics.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in metrics[1:]] == ["1", "2", "3"]


def crash_before_step(monkeypatch, trainer, step):
    """Make ``trainer`` raise KeyboardInterrupt (a crash) when step ``step`` would start."""
    original = trainer._train_step

    def crash(views, boxes, log_stats):
        if trainer.step + 1 == step:
            raise KeyboardInterrupt
        return original(views, boxes, log_stats)

    monkeypatch.setattr(trainer, "_train_step", crash)


def expected_keys(trainer):
    return trainer.state()["optimizer"]["state"].keys()


def test_resume_refuses_another_config_and_bad_files(tmp_path):
    Trainer(tiny_config(tmp_path, max_steps=1), progress=False).fit()
    with pytest.raises(ValueError, match=r"other values for \['lr_head'\]"):
        Trainer(tiny_config(tmp_path, max_steps=2, lr_head=0.5), progress=False).resume()
    (tmp_path / LAST).write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot be read"):
        Trainer(tiny_config(tmp_path, max_steps=2), progress=False).resume()
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        Trainer(tiny_config(tmp_path / "empty", max_steps=2), progress=False).resume()


def test_resume_accepts_the_shells_expansion_of_a_home_path(tmp_path, monkeypatch):
    """``--dataset ~/images`` arrives expanded by the shell; YAML keeps ``~/images``."""
    from PIL import Image

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "images").mkdir()
    for index in range(4):
        Image.new("RGB", (40, 30), color=(index * 60, 20, 200)).save(
            tmp_path / "images" / f"{index}.png"
        )
    run = tmp_path / "run"
    expanded = tiny_config(run, dataset=str(tmp_path / "images"), max_steps=1, train_images=None)
    Trainer(expanded, progress=False).fit()
    resumed = Trainer(
        tiny_config(run, dataset="~/images", max_steps=1, train_images=None), progress=False
    )
    resumed.resume()
    assert resumed.step == 1


def test_train_from_an_image_folder(tmp_path):
    from PIL import Image

    for index in range(4):
        Image.new("RGB", (40, 30), color=(index * 60, 20, 200)).save(tmp_path / f"{index}.png")
    result = train(
        tiny_config(tmp_path / "out", dataset=str(tmp_path), max_steps=1, train_images=None),
        progress=False,
    )
    assert result.steps == 1


class TestConfig:
    def test_yaml_and_overrides(self, tmp_path):
        path = tmp_path / "run.yaml"
        path.write_text(yaml.safe_dump({"epochs": 3, "loss": {"top_k": 5}}))
        config = load_config(path, ["--lr-head", "1e-3", "--loss.steepness", "[10, 100]"])
        assert config.epochs == 3 and config.lr_head == 1e-3
        assert config.loss == {"top_k": 5, "steepness": [10, 100]}

    def test_errors(self, tmp_path):
        with pytest.raises(
            ValueError, match=r"unknown config key 'epoch' \(did you mean 'epochs'\?\)"
        ):
            build_config({"epoch": 3})
        with pytest.raises(
            TypeError, match=r"config key 'batch_size' \(--batch-size\) must be int"
        ):
            build_config({"batch_size": "64"})
        with pytest.raises(FileNotFoundError, match="an existing folder of images"):
            build_config({"dataset": str(tmp_path / "missing")})
        with pytest.raises(FileNotFoundError, match="weights file"):
            build_config({"weights": str(tmp_path / "missing.pt")})
        with pytest.raises(ValueError, match="precision must be"):
            build_config({"precision": "fp8"})
        with pytest.raises(ValueError, match="'--key value' pairs"):
            build_config({}, ["--epochs"])
        with pytest.raises(FileNotFoundError, match="config file"):
            load_config(tmp_path / "none.yaml")
        with pytest.raises(ValueError, match="batch_size 64"):
            Trainer(tiny_config(tmp_path, batch_size=64), progress=False)
        with pytest.raises(ValueError, match="teacher must be one of"):
            build_config({"teacher": "none"})


@pytest.mark.parametrize(
    "loss, message",
    [
        ({"roi_size": 2, "reference_images": "inter"}, "offers 0"),
        (
            {"roi_size": 2, "references": "count", "num_references": 5, "network": "odd_even"},
            "draws 5 references per image, but a batch of 1 images x 4",
        ),  # noqa: E501
        ({"roi_size": 2, "references": "queue", "queue_length": 3}, "queue_length 3 is shorter"),
    ],
)
def test_reference_strategy_too_big_for_the_batch_fails_before_training(tmp_path, loss, message):
    with pytest.raises(ValueError, match=message):
        Trainer(tiny_config(tmp_path, batch_size=1, loss=loss), progress=False)


def test_malicious_checkpoints_are_refused(tmp_path):
    import os
    import pickle

    from neco_loss.weights import load_state_dict

    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (tmp_path / LAST).write_bytes(pickle.dumps({"step": Exploit()}))
    with pytest.raises(ValueError, match="cannot be read"):
        load_checkpoint(tmp_path / LAST)
    torch.save({"weight": Exploit()}, tmp_path / "weights.pt", _use_new_zipfile_serialization=True)
    with pytest.raises(ValueError, match="weights.pt cannot be read .*Weights only load failed"):
        load_state_dict(tmp_path / "weights.pt")
    assert not marker.exists()


def test_without_teacher_the_student_is_its_own_target(tmp_path):
    trainer = Trainer(
        tiny_config(tmp_path, max_steps=2, teacher="student_detached"), progress=False
    )
    teacher_before = {k: v.clone() for k, v in trainer.teacher.state_dict().items()}
    result = trainer.fit()
    assert result.steps == 2 and torch.isfinite(torch.tensor(result.last_loss))
    name = "module.backbone.vit.blocks.0.attn.qkv.weight"
    student = trainer.student.state_dict()["backbone.vit.blocks.0.attn.qkv.weight"]
    assert not torch.equal(student, teacher_before[name])  # the student learned


class TestTeachers:
    """``teacher``: the EMA teacher, the reference's use_teacher: False, and our cheap variant."""

    def forward(self, tmp_path, teacher):
        model = {
            **TINY["model_kwargs"],
            "depth": 2,
        }  # timm: block i drops with i / (depth - 1) x rate
        config = tiny_config(tmp_path, teacher=teacher, model_kwargs=model, drop_path_rate=0.5)
        trainer = Trainer(config, progress=False)
        views, _ = next(trainer._batches())
        trainer.student.train()
        torch.manual_seed(0)
        return trainer.encode(views)

    def test_student_is_a_second_forward_with_gradient(self, tmp_path):
        student_maps, teacher_maps, attention = self.forward(tmp_path, "student")
        assert len(teacher_maps) == 2 and attention is None
        assert all(m.requires_grad for m in teacher_maps)
        # drop-path draws anew in the second forward of the same views
        assert not torch.equal(teacher_maps[0], student_maps[0])

    def test_student_detached_reuses_the_student_maps(self, tmp_path):
        student_maps, teacher_maps, _ = self.forward(tmp_path, "student_detached")
        assert not any(m.requires_grad for m in teacher_maps)
        torch.testing.assert_close(teacher_maps[0], student_maps[0].detach())

    @pytest.mark.parametrize("teacher", ["ema", "student", "student_detached"])
    def test_trains_with_a_foreground_mask(self, tmp_path, teacher):
        config = tiny_config(
            tmp_path,
            teacher=teacher,
            max_steps=2,
            global_size=48,
            loss={"roi_size": 2, "loss_mask": "foreground"},
        )
        trainer = Trainer(config, progress=False)
        views, _ = next(trainer._batches())
        trainer.student.train()
        _, teacher_maps, attention = trainer.encode(views, masks=lambda grid: grid)
        assert [tuple(a.shape) for a in attention] == [(4, 2, 6, 6)] * 2
        torch.testing.assert_close(attention[0].sum(dim=(2, 3)), torch.ones(4, 2), atol=0.5, rtol=0)
        result = trainer.fit()
        assert result.steps == 2 and torch.isfinite(torch.tensor(result.last_loss))


def test_crops_not_divisible_by_the_patch_train(tmp_path):
    """98 px crops at patch 16 (the reference's DINO configs): here 20 px at patch 8."""
    trainer = Trainer(tiny_config(tmp_path, local_size=20, max_steps=1), progress=False)
    assert trainer.crop_sizes == [32, 32, 20, 20]
    assert trainer.fit().steps == 1
