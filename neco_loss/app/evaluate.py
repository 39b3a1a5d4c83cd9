"""``neco eval PROTOCOL... --checkpoint RUN...``: the evaluation protocols on backbones."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

NAME = "eval"
HELP = "evaluation protocols on one or more backbones"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Protocols, checkpoints and names, the dataset and its splits, protocol settings."""
    parser.add_argument(
        "protocols",
        nargs="+",
        choices=["in-context", "linear", "overclustering", "fractions", "all"],
        help="protocols to run",
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        action="append",
        required=True,
        help="a run folder, a weights file (then also --config), a training config (its "
        "starting model: model, weights, pretrained), shipped weights (testbed), hf:ID or a "
        "transformers folder, or a timm name (its pretrained weights); repeat to compare "
        "backbones, e.g. before and after NeCo",
    )
    parser.add_argument(
        "--config", type=Path, default=None, help="a run's config.yaml (with a weights file)"
    )
    parser.add_argument(
        "--name",
        action="append",
        default=None,
        help="a name per --checkpoint for tables and figures (None: the shortest distinct tail "
        "of their paths)",
    )
    _add_data_arguments(parser)
    from neco_loss.evaluation.linear import EPOCHS

    parser.add_argument(
        "--clusters", type=int, nargs="+", default=[100, 300, 500], help="overclustering K"
    )
    parser.add_argument(
        "--linear-epochs", type=int, default=EPOCHS, help="epochs of the linear probe"
    )
    parser.add_argument(
        "--search",
        default="torch",
        choices=["torch", "scann"],
        help='in-context neighbour search (scann: pip install "neco-loss[scann]")',
    )
    parser.add_argument(
        "--output", type=Path, default=Path("outputs/eval"), help="tables and figures go here"
    )


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    from neco_loss.evaluation.datasets import DATASETS

    parser.add_argument(
        "--dataset",
        default="synthetic",
        choices=DATASETS,
        help="dataset to score on (folder: your own images and masks, docs/evaluation.md)",
    )
    parser.add_argument(
        "--data-root", type=Path, default=None, help="the dataset's folder (all but synthetic)"
    )
    parser.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="None: the run's image_size (synthetic), 448 px otherwise (paper)",
    )
    parser.add_argument("--train-split", default="train", help="split to fit on")
    parser.add_argument("--val-split", default="val", help="split to score")
    parser.add_argument(
        "--train-images", type=int, default=200, help="images of the train split to use (0: all)"
    )
    parser.add_argument(
        "--val-images", type=int, default=64, help="images of the val split to score (0: all)"
    )


def run(args: argparse.Namespace, overrides: list[str]) -> None:
    """Score every checkpoint with every protocol; print the table."""
    import torch

    from neco_loss.app.checkpoint_specs import scored_backbone
    from neco_loss.evaluation.datasets import IGNORE_INDEX, dataset_classes
    from neco_loss.evaluation.suite import PROTOCOLS, evaluate, evaluation_splits

    protocols = list(PROTOCOLS) if "all" in args.protocols else args.protocols
    names = backbone_names(args.checkpoint, args.name)
    checkpoints = dict(zip(names, args.checkpoint, strict=True))
    classes, class_names = dataset_classes(args.dataset, args.data_root)
    backbones = {name: scored_backbone(path, args.config) for name, path in checkpoints.items()}
    size = _image_size(args)
    datasets = evaluation_splits(
        args.dataset,
        args.data_root,
        size,
        args.train_images,
        args.val_images,
        args.train_split,
        args.val_split,
    )
    where = f" in {args.data_root}" if args.data_root else " (built in, no files)"
    print(
        f"scoring on {args.dataset}{where}: {len(datasets[1])} {args.val_split} images, "
        f"{len(datasets[0])} {args.train_split} images to fit on, {size} px"
    )
    context = {
        "dataset": args.dataset,
        "data_root": str(args.data_root) if args.data_root else None,
        "splits": f"{args.train_split} / {args.val_split}",
        "image_size": size,
        "checkpoints": {name: str(path) for name, path in checkpoints.items()},
        "steps": {name: _trained_step(path) for name, path in checkpoints.items()},
    }
    evaluate(
        {name: torch.no_grad()(backbone) for name, backbone in backbones.items()},
        *datasets,
        classes,
        protocols,
        args.output,
        ignore_index=IGNORE_INDEX,
        clusters=args.clusters,
        linear_epochs=args.linear_epochs,
        search=args.search,
        class_names=class_names,
        context=context,
    )
    print((args.output / "results.md").read_text(), end="")
    print(f"tables and figures in {args.output}")


def _image_size(args: argparse.Namespace) -> int:
    """``--image-size``, else 448 px (paper) for real datasets.

    For synthetic: the size of the first run (or training config) given, else the default.
    """
    if args.image_size:
        return int(args.image_size)
    if args.dataset != "synthetic":
        return 448
    from neco_loss.app.checkpoint_specs import is_config
    from neco_loss.training import TrainConfig, load_config

    first = args.checkpoint[0]
    for config in (args.config, first if is_config(first) else None, first / "config.yaml"):
        if config is not None and config.is_file():
            return load_config(config).image_size
    return TrainConfig().image_size


def _trained_step(checkpoint: Path) -> int | None:
    """The step a run folder's weights are from (``None`` for a weights file).

    Warns in one line when the run is unfinished (a ``stopped.txt``, or fewer steps than its
    schedule): its scores are those of a partly trained backbone.
    """
    from neco_loss.training.run_folder import LAST, STOP_NOTE, load_checkpoint

    if not (checkpoint / LAST).is_file():
        return None
    state = load_checkpoint(checkpoint / LAST, mmap=True)  # the step only: nothing else read
    step, total = int(state["step"]), int(state.get("total_steps", state["step"]))
    note = checkpoint / STOP_NOTE
    if note.is_file() or step < total:
        why = f": {note.read_text().strip().splitlines()[0]}" if note.is_file() else ""
        print(
            f"warning: --checkpoint {checkpoint} is an unfinished run, step {step} of {total}"
            f"{why}; scoring it as it is.",
            file=sys.stderr,
        )
    return step


def backbone_names(checkpoints: list[Path], names: list[str] | None) -> list[str]:
    """One distinct name per checkpoint: ``--name`` values, else the shortest unique path tail.

    Raises:
        SystemExit: If ``--name`` is given a different number of times than ``--checkpoint``,
            or two names are equal.

    """
    if names:
        if len(names) != len(checkpoints):
            raise SystemExit(
                f"error: give --name once per --checkpoint ({len(checkpoints)}), not {len(names)}."
            )
    else:
        parts = [
            p.resolve().with_suffix("").parts if p.is_file() else p.resolve().parts
            for p in checkpoints
        ]
        depth = 1
        while len({part[-depth:] for part in parts}) < len(parts) and depth < len(parts[0]):
            depth += 1
        names = ["/".join(part[-depth:]) for part in parts]
    if len(set(names)) < len(names):
        raise SystemExit(f"error: two backbones have the same name {names}; use --name.")
    return names
