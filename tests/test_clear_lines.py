"""One clear line for each way a run can go wrong that is not a bug: a full disk, YAML
aliases and syntax errors, broken starting weights, out-of-range numbers, unreadable weights,
option typos, a step budget the epochs cap, keys a folder does not read, crops smaller than a
patch, escaping variant names; and output that suits a log file."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from torchvision.transforms.functional import to_pil_image

from neco_loss.app.ablation_file import load_ablation
from neco_loss.app.cli import main
from neco_loss.models import DenseViT
from neco_loss.progress import plural
from neco_loss.training import Trainer, build_config, load_config
from neco_loss.training import trainer as trainer_module
from neco_loss.training.agreement import TrainingStoppedError
from neco_loss.training.run_folder import BACKBONE_FILE, LAST, load_checkpoint
from tests.test_cli_errors import error_line
from tests.test_training import TINY, tiny_config

ROOT = Path(__file__).parents[1]
NECO = Path(sys.executable).parent / "neco"


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


# A full disk is a real one: a 1 MiB tmpfs in a private mount namespace (unshare -rm).
DISK_FULL = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import torch
    from neco_loss.training.run_folder import save_atomic
    folder = Path(sys.argv[1])
    save_atomic({"step": 1}, folder / "checkpoint_last.pt")
    try:
        save_atomic({"big": torch.zeros(1_000_000)}, folder / "checkpoint_last.pt")
    except OSError as error:
        print("ERROR", error)
    print("STEP", torch.load(folder / "checkpoint_last.pt")["step"])
    print("FILES", sorted(path.name for path in folder.iterdir()))
    """
)


def test_a_full_disk_says_so_and_keeps_the_previous_checkpoint(tmp_path):
    unshare = shutil.which("unshare")
    probe = (
        subprocess.run([unshare or "unshare", "-rm", "true"], capture_output=True, check=False)
        if unshare
        else None
    )
    if probe is None or probe.returncode != 0:
        pytest.skip("no unshare -rm here to mount a small tmpfs")
    (tmp_path / "disk").mkdir()
    script = tmp_path / "fill.py"
    script.write_text(DISK_FULL)
    command = (
        f"mount -t tmpfs -o size=1m tmpfs {tmp_path / 'disk'} && "
        f"{sys.executable} {script} {tmp_path / 'disk'}"
    )
    result = subprocess.run(
        ["unshare", "-rm", "sh", "-c", command],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"no space left on {tmp_path / 'disk'} to write checkpoint_last.pt" in result.stdout
    assert "the previous checkpoint_last.pt is kept" in result.stdout
    assert "STEP 1" in result.stdout  # the previous checkpoint, intact
    assert "FILES ['checkpoint_last.pt']" in result.stdout  # no partial file left


def test_yaml_aliases_are_refused_in_files_and_overrides(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(
        'model_kwargs:\n  a: &a ["x", "x", "x"]\n  b: &b [*a, *a, *a]\n  c: [*b, *b, *b]\n'
    )
    with pytest.raises(ValueError, match=r"line 3, column 10: YAML aliases \(\*a\) are not"):
        load_config(bomb)
    with pytest.raises(ValueError, match=r"--model-kwargs line 1.*aliases"):
        build_config({}, ["--model-kwargs", "{a: &a [1], b: *a}"])
    spec = {"base": {}, "variants": {"x": {"model_kwargs": {"a": 1}}}, "seeds": [0]}
    ablation = tmp_path / "ablation.yaml"
    ablation.write_text(yaml.safe_dump(spec) + "evaluation: &e {split: val}\nx: *e\n")
    with pytest.raises(ValueError, match="aliases"):
        load_ablation(ablation)


def test_a_yaml_syntax_error_names_its_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model: x\n  bad: [1, 2\nepochs: 3\n")
    with pytest.raises(ValueError, match=rf"config file {path} line 2, column 6: mapping values"):
        load_config(path)


def test_nan_starting_weights_are_named_as_such(tmp_path):
    vit = DenseViT(**{"model": "vit_small_patch14_reg4_dinov2", **TINY["model_kwargs"]})
    weights = {
        name: torch.full_like(value, float("nan")) for name, value in vit.vit.state_dict().items()
    }
    torch.save(weights, tmp_path / "nan.pt")
    config = tiny_config(tmp_path / "run", max_steps=2, weights=str(tmp_path / "nan.pt"))
    with pytest.raises(TrainingStoppedError) as stop:
        Trainer(config, progress=False).fit()
    message = str(stop.value)
    assert message.startswith("step 1: the model produced NaN/Inf features")
    assert f"the starting weights ({tmp_path / 'nan.pt'}) hold NaN/Inf values" in message
    assert "learning rate" not in message


@pytest.mark.parametrize(
    "flag, value, expected",
    [
        ("--lr-backbone", "1.0e+39", "'lr_backbone' (--lr-backbone) must be finite and within"),
        ("--lr-head", ".inf", "'lr_head' (--lr-head) must be finite"),
        ("--weight-decay", "-0.1", "weight_decay (--weight-decay) must be >= 0 but is -0.1"),
        ("--momentum", "1.5", "momentum (--momentum) must be in [0, 1] but is 1.5"),
        ("--grad-clip", "0", "grad_clip (--grad-clip) must be > 0 or null"),
        ("--local-scale", "[0.5, 0.2]", "crops: local_scale must be"),
        ("--local-size", "3", "crops: local_size must be an int >= 5 but is 3"),
    ],
)
def test_out_of_range_numbers_are_refused_when_the_config_is_read(flag, value, expected):
    with pytest.raises(ValueError, match=re.escape(expected)):
        build_config(dict(TINY), [flag, value])


def test_a_crop_smaller_than_a_patch_names_its_key(tmp_path):
    with pytest.raises(ValueError, match=r"^local_size \(--local-size\) is 6 px, smaller than one"):
        Trainer(tiny_config(tmp_path, local_size=6), progress=False)


def test_load_errors_keep_their_cause(tmp_path, capsys):
    torch.save({"weights": torch.zeros(2), "extra": os.stat_result((0,) * 10)}, tmp_path / "obj.pt")
    config = write_yaml(tmp_path / "run.yaml", {**TINY, "max_steps": 1})
    line = error_line(
        capsys,
        [
            "train",
            str(config),
            "--weights",
            str(tmp_path / "obj.pt"),
            "--output-dir",
            str(tmp_path / "a"),
        ],
    )
    assert "objects other than tensors" in line and "os.stat_result" in line
    wide = {**TINY["model_kwargs"], "embed_dim": 64}
    big = DenseViT("vit_small_patch14_reg4_dinov2", **wide)
    torch.save(big.vit.state_dict(), tmp_path / "wide.pt")
    line = error_line(
        capsys,
        [
            "train",
            str(config),
            "--weights",
            str(tmp_path / "wide.pt"),
            "--output-dir",
            str(tmp_path / "b"),
        ],
    )
    assert "does not fit the model" in line and "of another shape (e.g. ['cls_token (1, 1, " in line
    assert "(1, 1, 64) in the file, (1, 1, 32) in the model" in line


def test_a_typo_of_an_option_gets_a_did_you_mean(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    line = error_line(capsys, ["train", "examples/recipes/tiny_cpu.yaml", "--resum"])
    assert line == "error: unknown option --resum (did you mean '--resume'?)"
    line = error_line(capsys, ["ablate", "examples/ablations/loss.yaml", "--quiett"])
    assert "(did you mean '--quiet'?)" in line


def test_a_step_budget_the_epochs_cap_is_said(tmp_path):
    with pytest.warns(
        UserWarning, match=r"max_steps 40 is more than epochs x steps per epoch = 1 x 2 = 2"
    ):
        trainer = Trainer(tiny_config(tmp_path, max_steps=40, epochs=1), progress=False)
    assert trainer.total_steps == 2


def test_keys_a_folder_does_not_read_are_named(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for index in range(4):
        to_pil_image(torch.rand(3, 40, 40)).save(images / f"{index}.png")
    config = tiny_config(tmp_path / "run", dataset=str(images), max_steps=1)
    with pytest.warns(
        UserWarning,
        match=r"^image_size and train_images \(for the built-in synthetic scenes only\) ignored",
    ):
        Trainer(config, progress=False)


def test_the_summary_counts_in_words(capsys, tmp_path):
    config = write_yaml(
        tmp_path / "run.yaml", {**TINY, "max_steps": 1, "output_dir": str(tmp_path / "run")}
    )
    main(["train", str(config), "--quiet"])
    assert capsys.readouterr().out.startswith("trained 1 step, last loss")
    assert plural(2, "step") == "2 steps"


@pytest.mark.parametrize("name", ["/tmp/elsewhere", "../outside", "a/../../b", ""])
def test_variant_names_stay_inside_the_output_folder(tmp_path, name):
    spec = {"base": dict(TINY), "variants": {name: {"max_steps": 1}, "fine/name": {}}}
    path = write_yaml(tmp_path / "ablation.yaml", spec)
    with pytest.raises(ValueError, match=r"variant name .* must be a relative name without '\.\.'"):
        load_ablation(path)


def test_nested_variant_names_are_kept(tmp_path):
    spec = {"base": dict(TINY), "variants": {"100/1000": {}, "f=0.5": {}}}
    assert list(load_ablation(write_yaml(tmp_path / "a.yaml", spec)).variants) == [
        "100/1000",
        "f=0.5",
    ]


def test_backbone_weights_never_lag_the_checkpoint(tmp_path, monkeypatch):
    """A kill between the two files of a save: backbone.pt may be ahead, never behind."""
    Trainer(tiny_config(tmp_path / "whole", max_steps=3, checkpoint_every=1), progress=False).fit(
        stop_at=2
    )
    after_two = torch.load(tmp_path / "whole" / BACKBONE_FILE, weights_only=True)
    trainer = Trainer(
        tiny_config(tmp_path / "cut", max_steps=3, checkpoint_every=1), progress=False
    )
    original, calls = trainer_module.save_atomic, []

    def killed_between_the_files(state, path):
        calls.append(path.name)
        if len(calls) == 4:  # the second file of the step-2 save
            raise KeyboardInterrupt
        original(state, path)

    monkeypatch.setattr(trainer_module, "save_atomic", killed_between_the_files)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    backbone = torch.load(tmp_path / "cut" / BACKBONE_FILE, weights_only=True)
    assert load_checkpoint(tmp_path / "cut" / LAST)["step"] == 1
    for name, value in after_two.items():  # backbone.pt holds step 2: ahead, not behind
        torch.testing.assert_close(backbone[name], value, rtol=0, atol=0)


def test_a_log_file_gets_a_few_bar_lines_not_one_per_step(tmp_path):
    config = write_yaml(
        tmp_path / "run.yaml",
        {**TINY, "max_steps": 8, "epochs": 8, "output_dir": str(tmp_path / "run")},
    )
    result = subprocess.run(
        [str(NECO), "train", str(config)],
        capture_output=True,  # stderr is a pipe, as in a job scheduler's log
        text=True,
        timeout=300,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    draws = result.stderr.count("neco train:")
    assert 1 <= draws <= 3, result.stderr  # the start, the end (tqdm's close), not each step
    assert "8/8" in result.stderr


def test_quiet_silences_the_model_librarys_bars(tmp_path, capsys):
    from tests.test_backbones import hf_folder

    folder = hf_folder(tmp_path, registers=0)
    capsys.readouterr()
    config = {
        **TINY,
        "model": str(folder),
        "model_kwargs": {},
        "max_steps": 1,
        "output_dir": str(tmp_path / "run"),
    }
    main(["train", str(write_yaml(tmp_path / "run.yaml", config)), "--quiet"])
    err = capsys.readouterr().err
    assert "Loading weights" not in err and "Writing model shards" not in err, err
