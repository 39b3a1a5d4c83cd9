"""Every command shown in README.md and docs/*.md is accounted for: run verbatim by a test, run
by a test with smaller arguments, or not run here, with the reason.

A command added to the docs fails this test until it is listed below, so that the docs cannot
drift away from what is tested.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).parents[1]

VERBATIM = "verbatim"  # a test runs exactly this line (the test file holds it)
SMALLER = "smaller"  # a test runs the same command with smaller sizes or steps
CI = "ci"  # .ci/run runs it
NOT_RUN = "not run"  # why not, below
DOCS = "tests/test_docs_verbatim.py::"  # make test-docs

COMMANDS: dict[str, tuple[str, str]] = {
    "make test": (CI, ".ci/run"),
    "make demo": (VERBATIM, DOCS + "test_make_demo_prints_before_and_after"),
    "make bench": (
        SMALLER,
        "tests/test_benchmarks.py::test_sorting_benchmark_compares_the_backends",
    ),
    "make lint": (VERBATIM, DOCS + "test_make_lint"),
    "pip wheel --no-build-isolation --no-deps -w outputs/wheels .": (
        VERBATIM,
        DOCS + "test_a_wheel_carries_the_compiled_kernel",
    ),
    ".venv/bin/python benchmarks/kernel_builds.py": (
        SMALLER,
        "tests/test_benchmarks.py::test_kernel_builds_benchmark_times_every_build_this_cpu_runs",
    ),
    "neco check-sorter examples.sorters.neural_sort:neural_sort --n 1..16 --max-examples 20": (
        VERBATIM,
        "tests/test_check_sorter_cli.py",
    ),
    ".venv/bin/neco check-sorter --report --max-examples 50 --markdown outputs/sorter_report.md": (
        SMALLER,
        "tests/test_check_sorter_cli.py::test_the_quick_report_as_ci_runs_it (--quick; the "
        "full report takes 28 minutes)",
    ),
    "neco train examples/recipes/tiny_cpu.yaml": (VERBATIM, DOCS + "test_tiny_recipe"),
    "neco train my.yaml --dataset ~/images --max-steps 200": (
        VERBATIM,
        DOCS + "test_a_users_run_trained_interrupted_resumed_and_evaluated",
    ),
    "neco train my.yaml --resume": (
        VERBATIM,
        DOCS + "test_a_users_run_trained_interrupted_resumed_and_evaluated",
    ),
    "neco train CONFIG.yaml [--key value ...] [--resume | --overwrite] [--quiet]": (
        NOT_RUN,
        "the synopsis; every flag is tested in tests/test_run_safety.py and test_cli_errors.py",
    ),
    "neco train CONFIG.yaml --devices 8": (
        SMALLER,
        "tests/test_faults.py (2 gloo processes; 8 needs 8 GPUs)",
    ),
    "torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 -m "
    "neco_loss.app.cli train CONFIG.yaml": (NOT_RUN, "two machines with 8 GPUs each"),
    "neco eval in-context --checkpoint outputs/train": (
        VERBATIM,
        DOCS + "test_a_users_run_trained_interrupted_resumed_and_evaluated",
    ),
    "neco eval in-context --checkpoint outputs/demo/neco": (
        VERBATIM,
        DOCS + "test_eval_commands_on_the_demo_outputs",
    ),
    "neco eval all --checkpoint outputs/demo/neco --config outputs/demo/neco/config.yaml "
    "--checkpoint outputs/demo/start_backbone.pt": (
        VERBATIM,
        DOCS + "test_eval_commands_on_the_demo_outputs",
    ),
    "neco eval linear overclustering --checkpoint RUN --dataset voc --data-root "
    "~/data/VOCdevkit/VOC2012 --train-split trainaug --val-split val --train-images 0 "
    "--val-images 0": (VERBATIM, DOCS + "test_pascal_voc_evaluation_on_a_made_up_tree"),
    "neco eval in-context linear --checkpoint examples/recipes/tiny_cpu.yaml --checkpoint "
    "outputs/demo/neco": (VERBATIM, DOCS + "test_eval_commands_on_the_demo_outputs"),
    "neco eval in-context --checkpoint testbed --dataset folder --data-root my_images "
    "--image-size 224": (VERBATIM, DOCS + "test_eval_on_your_own_labelled_images"),
    "neco sort-demo": (VERBATIM, DOCS + "test_sort_demo"),
    "neco ablate examples/ablations/objectives.yaml": (
        SMALLER,
        "tests/test_ablation.py::test_ablation_over_seeds_with_baseline_and_x_axis (the same "
        "runner at 1 step; tests/test_objectives.py steps every arm; the measured run in "
        "docs/ablations.md took about an hour)",
    ),
    "neco ablate examples/ablations/objectives_tuning.yaml": (
        SMALLER,
        "tests/test_ablation.py::test_shipped_ablations_give_valid_configs (24 runs of 300 "
        "steps: about an hour and a half)",
    ),
    "python benchmarks/objectives_step.py": (
        SMALLER,
        "tests/test_benchmarks.py::test_objectives_benchmark_times_every_arm_against_neco",
    ),
    "neco ablate examples/ablations/loss.yaml": (
        SMALLER,
        "tests/test_ablation.py::test_ablation_trains_evaluates_and_plots (1 step; the shipped "
        "files are validated by test_shipped_ablations_give_valid_configs)",
    ),
    "neco ablate examples/ablations/reference_fraction.yaml --batch-size 8": (
        SMALLER,
        "tests/test_ablation.py::test_shipped_ablations_give_valid_configs",
    ),
    "neco ablate examples/ablations/sorting_network.yaml": (
        SMALLER,
        "tests/test_ablation.py::test_shipped_ablations_give_valid_configs (the measured run "
        "in docs/ablations.md took 44 CPU minutes)",
    ),
    "neco ablate examples/ablations/teacher.yaml": (
        SMALLER,
        "tests/test_ablation.py::test_shipped_ablations_give_valid_configs (about an hour)",
    ),
    "neco ablate examples/ablations/steepness.yaml --max-steps 1000 --seeds 1 2": (
        SMALLER,
        "tests/test_ablation.py::test_shipped_ablations_give_valid_configs",
    ),
    "neco demo --seeds 0 1 2 3 4 --output outputs/demo_seeds": (
        SMALLER,
        "tests/test_cli_demo.py::test_demo_seeds_table_and_paired_interval (finished seeds read "
        "back; one seed is make demo, run verbatim; the five take about 40 minutes)",
    ),
    "neco testbed-backbone --output outputs/testbed": (
        SMALLER,
        "tests/test_testbed.py::test_pretraining_writes_loadable_half_weights (2 steps; the "
        "3000 default steps take about an hour)",
    ),
    "python examples/synthetic_scenes_figure.py": (VERBATIM, DOCS + "test_dataset_figure"),
    ".venv/bin/python benchmarks/synthetic_headroom.py --split test": (
        VERBATIM,
        DOCS + "test_synthetic_headroom",
    ),
    "python examples/lightly/neco.py": (VERBATIM, DOCS + "test_lightly_examples"),
    "python examples/lightly/neco_lightning.py": (VERBATIM, DOCS + "test_lightly_examples"),
    "python examples/lightly/neco_lightning.py --data ~/images --dinov2 --max-steps 10000": (
        NOT_RUN,
        "needs the user's images and timm's pretrained DINOv2 (internet)",
    ),
    ".venv/bin/python benchmarks/loss_step.py": (
        SMALLER,
        "tests/test_benchmarks.py::test_loss_step_benchmark_reports_syncs_and_stats_cost",
    ),
    ".venv/bin/python benchmarks/loss_step.py --threads 1 --repeats 15": (
        SMALLER,
        "tests/test_benchmarks.py::test_loss_step_benchmark_reports_syncs_and_stats_cost",
    ),
    ".venv/bin/python benchmarks/train_step.py --global-size 224 --batch 8 --repeats 2": (
        SMALLER,
        "tests/test_benchmarks.py::test_train_step_benchmark_runs_a_small_step",
    ),
    ".venv/bin/python benchmarks/sorting.py --quick --repeats 5 --max-step-seconds 120 "
    "--max-held-gib 16": (
        SMALLER,
        "tests/test_benchmarks.py::test_sorting_benchmark_compares_the_backends",
    ),
    ".venv/bin/python benchmarks/sorting.py --networks bitonic --sizes 49 --backends native "
    "diffsort --repeats 5": (
        SMALLER,
        "tests/test_benchmarks.py::test_sorting_benchmark_compares_the_backends",
    ),
    ".venv/bin/python benchmarks/sorting.py --networks bitonic --repeats 3 --max-step-seconds 10 "
    "--max-held-gib 6": (
        SMALLER,
        "tests/test_benchmarks.py::test_sorting_benchmark_compares_the_backends",
    ),
    ".venv/bin/python benchmarks/sorting.py --networks odd_even --sizes 16 49 64 --repeats 3 "
    "--max-step-seconds 10 --max-held-gib 6": (
        SMALLER,
        "tests/test_benchmarks.py::test_sorting_benchmark_compares_the_backends",
    ),
    "python benchmarks/sorting.py --quick --device cuda --backends native native-python diffsort": (
        NOT_RUN,
        "needs a GPU",
    ),
    "python benchmarks/sorting.py --quick --device cuda --backends native diffsort": (
        NOT_RUN,
        "needs a GPU",
    ),
    "python benchmarks/train_step.py --device cuda": (NOT_RUN, "needs a GPU"),
    "python benchmarks/loss_step.py --device cuda --batch 64 --repeats 10": (
        NOT_RUN,
        "needs a GPU",
    ),
    "pip install 'neco-loss[solo]'": (CI, "scripts/setup.sh installs every extra"),
    'echo "setuptools<81" > /tmp/solo-constraint.txt': (
        SMALLER,
        "scripts/solo_learn.sh (the same constraint, in a temporary file)",
    ),
    "PIP_CONSTRAINT=/tmp/solo-constraint.txt pip install --use-pep517 --no-deps "
    "git+https://github.com/vturrisi/solo-learn.git": (
        SMALLER,
        "scripts/solo_learn.sh (the same pip call; GitHub is out of CI's reach)",
    ),
    "bash scripts/solo_learn.sh /path/to/solo-learn": (
        NOT_RUN,
        "builds solo-learn from a checkout outside CI's reach; run by hand, docs/solo_learn.md",
    ),
    "neco-solo-pretrain --config-path examples/solo_learn --config-name neco_vits14.yaml "
    "data.train_path=~/data/coco/images/train2017": (
        SMALLER,
        "tests/test_solo_learn_real.py::test_reference_yaml_learning_rates (the YAML; COCO and "
        "pretrained weights are not here)",
    ),
    "neco make-images outputs/solo_images --count 64": (
        VERBATIM,
        "tests/test_solo_learn_docs.py (needs solo-learn main)",
    ),
    "neco-solo-pretrain --config-path examples/solo_learn --config-name neco_tiny_cpu.yaml": (
        VERBATIM,
        "tests/test_solo_learn_docs.py (needs solo-learn main)",
    ),
}


def documented_commands() -> set[str]:
    """Command lines of the ```bash blocks of README.md and docs/*.md (comments dropped,
    continuation lines joined)."""
    commands = set()
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for block in re.findall(r"```(?:bash|sh|console)\n(.*?)```", page.read_text(), re.S):
            for line in re.sub(r"\\\n\s*", "", block).splitlines():
                command = line.split("  #")[0].strip()
                if command and not command.startswith("#"):
                    commands.add(command)
    return commands


def test_every_documented_command_is_accounted_for():
    documented = documented_commands()
    assert sorted(documented - set(COMMANDS)) == [], "documented but not listed here"
    assert sorted(set(COMMANDS) - documented) == [], "listed here but no longer documented"


def test_the_cited_tests_exist_and_verbatim_ones_hold_the_command():
    for command, (kind, where) in COMMANDS.items():
        if kind == NOT_RUN:
            continue
        path, _, rest = where.partition("::")
        path = path.split(" ")[0]
        assert (ROOT / path).is_file(), (command, where)
        if rest:
            assert f"def {rest.split(' ')[0]}(" in (ROOT / path).read_text(), (command, where)
        if kind == VERBATIM and path.endswith(".py"):
            text = (ROOT / path).read_text()
            strings = {  # the parser joins adjacent literals, as the test's call sees them
                node.value
                for node in ast.walk(ast.parse(text))
                if isinstance(node, ast.Constant) and isinstance(node.value, str)
            }
            assert command in strings or "documented_block" in text, (command, where)
