"""Commands of README.md and docs/*.md run exactly as written, as a user types them.

Marked ``docs``: ``make test`` leaves them out (they take about 30 minutes on 2 cores);
``make test-docs`` runs them, and CI runs both. Each command runs in a shell with ``.venv/bin``
first on ``PATH`` (as after ``source .venv/bin/activate``), from the repository root when it
names the repository's files (``examples/...``, ``benchmarks/...``, ``make``), and from a
scratch user folder (also ``HOME``, so ``~`` lands there) when it names the user's files
(``my.yaml``, ``~/images``), which the test makes first. ``tests/test_documented_commands.py``
lists which commands are run here and why the others are not.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import subprocess
import time
import zipfile
from pathlib import Path

import pytest
import yaml

from neco_loss.data.synthetic import save_scenes
from neco_loss.training import build_config, train
from tests.test_documented_commands import documented_commands
from tests.test_eval_datasets import labels, rgb, write
from tests.test_eval_specs import labelled_folder
from tests.test_training import TINY

ROOT = Path(__file__).parents[1]
pytestmark = pytest.mark.docs


def shell(
    command: str, cwd: Path, home: Path | None = None, timeout: float = 900
) -> subprocess.CompletedProcess:
    """Run a documented command line in bash; fail with its output if it fails."""
    assert command in documented_commands(), f"{command!r} is not (or no longer) documented"
    env = {**os.environ, "PATH": f"{ROOT / '.venv' / 'bin'}:{os.environ['PATH']}"}
    if home is not None:
        env["HOME"] = str(home)
    result = subprocess.run(
        ["bash", "-c", command],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def demo_outputs() -> Path:
    """``make demo`` in the repository root, once for the commands that read its outputs."""
    shell("make demo", ROOT, timeout=1200)
    return ROOT / "outputs" / "demo"


def test_make_demo_prints_before_and_after(demo_outputs):
    results = json.loads((demo_outputs / "results.json").read_text())
    assert results["miou_before"] > 0.2 and results["miou_after"] > 0.2
    assert (demo_outputs / "in_context.png").stat().st_size > 10_000


def test_eval_commands_on_the_demo_outputs(demo_outputs, tmp_path):
    shell("neco eval in-context --checkpoint outputs/demo/neco", ROOT)
    shell(
        "neco eval all --checkpoint outputs/demo/neco --config outputs/demo/neco/config.yaml "
        "--checkpoint outputs/demo/start_backbone.pt",
        ROOT,
    )
    assert "overclustering" in (ROOT / "outputs" / "eval" / "results.md").read_text()
    result = shell(
        "neco eval in-context linear --checkpoint examples/recipes/tiny_cpu.yaml --checkpoint "
        "outputs/demo/neco",
        ROOT,
    )
    assert result.stdout.startswith("scoring on synthetic (built in, no files): 64 val images")


def test_eval_on_your_own_labelled_images(tmp_path):
    """The folder command verbatim, on a few labelled images in the documented layout."""
    labelled_folder(tmp_path / "work" / "my_images")
    result = shell(
        "neco eval in-context --checkpoint testbed --dataset folder --data-root my_images "
        "--image-size 224",
        tmp_path / "work",
    )
    assert result.stdout.startswith("scoring on folder in my_images: 3 val images")


def test_pascal_voc_evaluation_on_a_made_up_tree(tmp_path):
    """The VOC command verbatim, with ``~/data/VOCdevkit/VOC2012`` made up under a scratch
    HOME (the reader's layout, a few images) and ``RUN`` a one-step run folder."""
    root = tmp_path / "data" / "VOCdevkit" / "VOC2012"
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    for split, folder, names in (
        ("trainaug", "SegmentationClassAug", "abc"),
        ("val", "SegmentationClass", "de"),
    ):
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(names))
        for name in names:
            write(root / "JPEGImages" / f"{name}.jpg", rgb(40, 56))
            write(root / folder / f"{name}.png", labels([0, 15, 20, 255], 40, 56))
    train(build_config({**TINY, "max_steps": 1, "output_dir": str(tmp_path / "work" / "RUN")}))
    shell(
        "neco eval linear overclustering --checkpoint RUN --dataset voc --data-root "
        "~/data/VOCdevkit/VOC2012 --train-split trainaug --val-split val --train-images 0 "
        "--val-images 0",
        tmp_path / "work",
        home=tmp_path,
    )
    results = json.loads((tmp_path / "work" / "outputs" / "eval" / "results.json").read_text())
    assert results["context"]["dataset"] == "voc"


def test_tiny_recipe():
    shutil.rmtree(ROOT / "outputs" / "tiny_cpu", ignore_errors=True)  # a first run, as in README
    result = shell("neco train examples/recipes/tiny_cpu.yaml", ROOT)
    assert "trained 300 steps" in result.stdout


def test_a_users_run_trained_interrupted_resumed_and_evaluated(tmp_path):
    """README's block: ``neco train my.yaml --dataset ~/images --max-steps 200``, stopped (a
    SIGTERM, as a scheduler sends), ``neco train my.yaml --resume`` to the end, then
    ``neco eval in-context`` on the run folder."""
    save_scenes(tmp_path / "images", 64)  # the user's images
    config = {**TINY, "dataset": "~/images", "epochs": 100, "max_steps": 200}
    config["checkpoint_every"] = 20
    (tmp_path / "my.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "PATH": f"{ROOT / '.venv' / 'bin'}:{os.environ['PATH']}"}
    first = "neco train my.yaml --dataset ~/images --max-steps 200"
    assert first in documented_commands()
    process = subprocess.Popen(
        ["bash", "-c", f"exec {first}"],
        cwd=tmp_path,
        env={**env, "HOME": str(tmp_path)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    checkpoint = tmp_path / "outputs" / "train" / "checkpoint_last.pt"
    deadline = time.monotonic() + 600
    while not checkpoint.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    process.send_signal(signal.SIGTERM)  # the run stops at a step boundary, checkpointed
    output, _ = process.communicate(timeout=300)
    assert (tmp_path / "outputs" / "train" / "stopped.txt").is_file(), output
    resumed = shell("neco train my.yaml --resume", tmp_path, home=tmp_path)
    assert "trained 200 steps" in resumed.stdout
    shell("neco eval in-context --checkpoint outputs/train", tmp_path, home=tmp_path)
    assert (tmp_path / "outputs" / "eval" / "results.json").is_file()


def test_sort_demo(tmp_path):
    result = shell("neco sort-demo", tmp_path)
    assert "3136" in result.stdout


@pytest.mark.parametrize(
    "command", ["python examples/lightly/neco.py", "python examples/lightly/neco_lightning.py"]
)
def test_lightly_examples(command):
    result = shell(command, ROOT)
    assert "backbone" in result.stdout


def test_make_lint():
    shell("make lint", ROOT)


def test_a_wheel_carries_the_compiled_kernel(tmp_path):
    """The README's wheel command compiles the kernel into the wheel; installed elsewhere, it
    loads from there with no compiler and no checkout on the path."""
    wheels = ROOT / "outputs" / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    shell("pip wheel --no-build-isolation --no-deps -w outputs/wheels .", ROOT)
    (wheel,) = wheels.glob("neco_loss-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    modules = ["_soft_sort", "_soft_sort_avx512"] if x86 else ["_soft_sort"]
    assert sorted(n.split("/")[-1].split(".")[0] for n in names if n.endswith(".so")) == modules
    assert "neco_loss/sorting/kernels/csrc/soft_sort.cpp" in names
    site = tmp_path / "site"
    python = str(ROOT / ".venv" / "bin" / "python")
    subprocess.run(
        [python, "-m", "pip", "install", "--no-deps", "--target", str(site), str(wheel)],
        check=True,
        capture_output=True,
    )
    check = (
        "from neco_loss.sorting.kernels.cpp import cpu_kernels; import torch; "
        "from neco_loss import soft_permutation; soft_permutation(torch.randn(2, 9)); "
        "print(cpu_kernels().__file__)"
    )
    environment = {
        **os.environ,
        "PYTHONPATH": str(site),
        "CXX": "/nonexistent/g++",
        "NECO_REQUIRE_KERNEL": "1",
    }
    loaded = subprocess.run(
        [python, "-c", check], cwd=tmp_path, env=environment, capture_output=True, text=True
    )
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert Path(loaded.stdout.strip()).is_relative_to(site)


def test_dataset_figure():
    result = shell("python examples/synthetic_scenes_figure.py", ROOT)
    assert "docs/img/synthetic_scenes.png" in result.stdout


def test_synthetic_headroom():
    result = shell(".venv/bin/python benchmarks/synthetic_headroom.py --split test", ROOT)
    assert "| testbed backbone |" in result.stdout and "| label oracle |" in result.stdout
