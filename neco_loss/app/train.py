"""``neco train CONFIG``: NeCo post-pretraining from a YAML config."""

from __future__ import annotations

import argparse
from pathlib import Path

from neco_loss.progress import plural

NAME = "train"
HELP = "NeCo post-pretraining from a YAML config; '--key value' overrides any config key"
TAKES_OVERRIDES = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The config file, ``--resume``, ``--overwrite``, ``--quiet``; config keys in the epilog."""
    from neco_loss.training.config_help import config_keys_help

    parser.epilog = (
        "config keys (YAML keys; '--key value' on the command line, nested as "
        "--loss.top-k 5):\n" + config_keys_help()
    )
    parser.add_argument(
        "config", type=Path, help="a YAML config, e.g. examples/recipes/tiny_cpu.yaml"
    )
    parser.add_argument("--resume", action="store_true", help="continue from output_dir")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the run already in output_dir"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace, overrides: list[str]) -> None:
    """Train (or resume, or find finished) the run; print where its outputs are."""
    from neco_loss.training import load_config
    from neco_loss.training.distributed import launch
    from neco_loss.training.run_folder import SKIP_LOG

    config = load_config(args.config, overrides)
    result = launch(config, resume=args.resume, progress=not args.quiet, overwrite=args.overwrite)
    if result.already_finished:
        print(f"already finished at step {result.steps}; nothing to do ({result.output_dir})")
        return
    print(
        f"trained {plural(result.steps, 'step')}, last loss {result.last_loss:.4f}; "
        f"checkpoint {result.checkpoint}, backbone weights {result.backbone}"
    )
    if result.skipped:
        print(
            f"skipped {len(result.skipped)} unreadable images, listed in "
            f"{result.output_dir / SKIP_LOG}"
        )
