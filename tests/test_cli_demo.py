"""The ``neco`` command and the demo (the README's first command), in short form."""

import json

import pytest
import yaml

from neco_loss.app.cli import main
from tests.test_training import TINY


def test_train_then_eval_in_context(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({**TINY, "output_dir": str(tmp_path / "out")}))
    main(["train", str(config), "--max-steps", "2", "--quiet"])
    assert "trained 2 steps" in capsys.readouterr().out
    main(["train", str(config), "--max-steps", "2", "--quiet", "--resume"])
    assert "already finished at step 2" in capsys.readouterr().out
    with pytest.raises(
        SystemExit, match="schedules its learning rates, weight decay and EMA over 2 steps"
    ):
        main(["train", str(config), "--max-steps", "3", "--quiet", "--resume"])
    sizes = ["--train-images", "4", "--val-images", "3", "--output", str(tmp_path / "eval")]
    main(["eval", "in-context", "--checkpoint", str(tmp_path / "out"), *sizes])
    assert "| out | " in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no such run folder, weights file, training config"):
        main(["eval", "in-context", "--checkpoint", str(tmp_path / "nowhere"), *sizes])
    weights = str(tmp_path / "out" / "backbone.pt")
    config = str(tmp_path / "out" / "config.yaml")
    main(["eval", "in-context", "--checkpoint", weights, "--config", config, *sizes])
    assert "| backbone | " in capsys.readouterr().out
    with pytest.raises(SystemExit, match="is a weights file: also give --config"):
        main(["eval", "in-context", "--checkpoint", weights, *sizes])


def test_eval_all_protocols_compares_backbones(tmp_path, capsys):
    for run in ("before", "after"):
        config = tmp_path / f"{run}.yaml"
        steps = 1 if run == "before" else 2
        config.write_text(yaml.safe_dump({**TINY, "output_dir": str(tmp_path / run)}))
        main(["train", str(config), "--max-steps", str(steps), "--quiet"])
    output = tmp_path / "eval"
    main(
        [
            "eval",
            "all",
            "--checkpoint",
            str(tmp_path / "before"),
            "--checkpoint",
            str(tmp_path / "after"),
            "--train-images",
            "8",
            "--val-images",
            "6",
            "--clusters",
            "6",
            "--linear-epochs",
            "2",
            "--output",
            str(output),
        ]
    )
    written = json.loads((output / "results.json").read_text())
    results, context = written["results"], written["context"]
    assert set(results) == {"before", "after"}
    assert context["dataset"] == "synthetic" and context["val_images"] == 6
    assert set(context["checkpoints"]) == {"before", "after"} and context["clusters"] == [5, 6]
    assert {"neco_loss_version", "time", "linear_epochs", "image_size"} <= set(context)
    expected = {
        "in-context mIoU",
        "linear mIoU",
        "overclustering K=5",
        "overclustering K=6",
        "in-context 1/128",
        "in-context 1/64",
        "in-context 1/8",
        "in-context 1/1",
    }
    assert set(results["after"]) == expected
    assert all(0 <= value <= 1 for row in results.values() for value in row.values())
    for picture in (
        "in-context",
        "linear",
        "overclustering",
        "retrieval_before",
        "retrieval_after",
    ):
        assert (output / f"{picture}.png").stat().st_size > 5_000
    markdown = (output / "results.md").read_text()
    assert "| after |" in markdown and "- dataset: synthetic" in markdown


def test_train_reports_config_errors(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"epochz": 1}))
    with pytest.raises(
        SystemExit, match=r"unknown config key 'epochz' \(did you mean 'epochs'\?\)"
    ):
        main(["train", str(config)])


def test_unknown_arguments_outside_train():
    with pytest.raises(SystemExit):
        main(["demo", "--epochs", "3"])


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path, capsys):
    main(["demo", "--output", str(tmp_path), "--neco-steps", "2", "--split", "val"])
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "results.json").read_text())
    before, after = result["miou_before"], result["miou_after"]
    control = result["miou_control"] - before
    assert (
        f"in-context mIoU: before {before:.4f} -> after {after:.4f} ({after - before:+.4f}); "
        f"continued VICReg(L): {control:+.4f}"
    ) in out
    assert "docs/ablations.md#neco-side-by-side" in out
    assert 0 <= before <= 1 and 0 <= after <= 1
    assert (tmp_path / "in_context.png").stat().st_size > 10_000
    assert (tmp_path / "neco" / "checkpoint_last.pt").is_file()
    assert (tmp_path / "continued" / "checkpoint_last.pt").is_file()


def test_tiny_cpu_recipe_is_the_demo_configuration():
    from pathlib import Path

    from neco_loss.app.demo import DEMO_CONFIG
    from neco_loss.training import build_config, load_config

    recipe = load_config(Path(__file__).parents[1] / "examples" / "recipes" / "tiny_cpu.yaml")
    expected = build_config({**DEMO_CONFIG, "output_dir": "outputs/tiny_cpu"})
    assert recipe == expected


@pytest.mark.parametrize(
    "recipe",
    [
        "dinov2_vits14_reg_coco",
        "dinov2_vitb14_reg_coco",
        "dino_vits16_coco",
        "dinov3_vits16_coco",
        "my_images",
    ],
)
def test_recipes_are_valid_configs(recipe):
    from pathlib import Path

    from neco_loss.training import load_config

    path = Path(__file__).parents[1] / "examples" / "recipes" / f"{recipe}.yaml"
    config = load_config(path, ["--dataset", "synthetic"])  # the data folder is the user's
    assert config.pretrained
    patch = 16 if "16" in config.model else 14
    assert config.global_size % patch == 0  # local crops need not be (98 px at patch 16)
    assert config.local_size // patch >= 2


def test_quickstart_runs():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "examples" / "quickstart.py"
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "NeCoLoss: " in result.stdout and "neco_loss: " in result.stdout


def test_sort_demo_runs_small(tmp_path, capsys):
    """neco sort-demo at 64 rows (its default 3136 rows take about 50 s)."""
    main(["sort-demo", "--rows", "64", "--output", str(tmp_path)])
    out = capsys.readouterr().out
    assert "2. native vs diffsort: 64 rows, n = 49" in out and "faster" in out
    assert (tmp_path / "soft_permutation.png").stat().st_size > 10_000


def _write_seed(folder, seed, change, **fields):
    from dataclasses import asdict
    from importlib.metadata import version

    from neco_loss.app.demo import DemoResult

    values = (seed, "test", 0.4, 0.4 + change, 0.41, 0.5, 0.5, 0.39, 0.52, [], [], 300, 1.0)
    result = DemoResult(*values, version("neco-loss"))
    (folder / f"seed{seed}").mkdir(exist_ok=True)
    written = {**asdict(result), **fields}
    (folder / f"seed{seed}" / "results.json").write_text(json.dumps(written))


def test_demo_seeds_table_and_paired_interval(tmp_path):
    """Finished seeds are read back; the change's paired interval is computed on known
    numbers (differences 0.02, 0.03, 0.04: mean 0.03, t(0.975, 2) * 0.01 / sqrt(3) = 0.0248;
    the one-sample t-test's p = 0.0351)."""
    from neco_loss.app.demo import run_demo_seeds

    for seed, change in zip((0, 1, 2), (0.02, 0.03, 0.04), strict=True):
        _write_seed(tmp_path, seed, change)
    table = run_demo_seeds(tmp_path, [0, 1, 2], progress=False)
    assert "| 1 | 0.4000 | 0.4300 | 0.4100 | 0.3900 | 0.5000 | 0.5000 | 0.5200 |" in table
    assert (
        "- in-context, NeCo (mIoU change): +0.0300 [+0.0052, +0.0548] p=0.0351, Student-t over "
        "3 seeds, test split" in table
    )
    assert "- in-context, NeCo - control (mIoU change): +0.0400 [+0.0152, +0.0648]" in table
    assert "- linear, continued VICReg(L) (mIoU change): +0.0200" in table
    assert (tmp_path / "seeds.md").read_text() == table


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("split", "val", "split 'val' \\(asked: 'test'\\)"),
        ("neco_steps", 200, "neco_steps 200 \\(asked: 300\\)"),
        ("version", "0.0.1", "version '0.0.1'"),
    ],
)
def test_demo_seeds_refuse_a_seed_measured_otherwise(tmp_path, field, value, message):
    from neco_loss.app.demo import run_demo_seeds

    _write_seed(tmp_path, 0, 0.02, **{field: value})
    with pytest.raises(ValueError, match=f"seed0/results.json was measured with {message}"):
        run_demo_seeds(tmp_path, [0], progress=False)


def test_demo_seeds_refuse_an_older_format(tmp_path):
    from neco_loss.app.demo import run_demo_seeds

    (tmp_path / "seed0").mkdir()
    (tmp_path / "seed0" / "results.json").write_text(json.dumps({"seed": 0, "split": "test"}))
    with pytest.raises(ValueError, match="older format: delete"):
        run_demo_seeds(tmp_path, [0], progress=False)


def test_demo_retrains_a_run_folder_left_with_other_settings(tmp_path, capsys):
    """A demo folder from another version or step count is trained again, not refused."""
    from neco_loss.app.demo import _clear_stale, _config
    from neco_loss.training import train

    config = _config({"output_dir": str(tmp_path / "neco"), "train_images": 64}, 0, 1)
    train(config, progress=False)
    _clear_stale(config)  # the same settings: kept
    assert (tmp_path / "neco" / "checkpoint_last.pt").is_file()
    _clear_stale(_config({"output_dir": str(tmp_path / "neco"), "train_images": 64}, 0, 2))
    assert not (tmp_path / "neco").exists()
    assert "it ran 1 steps, not 2. It is trained again." in capsys.readouterr().out
