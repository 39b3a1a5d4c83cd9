"""``neco eval PROTOCOL... --checkpoint RUN...``: the evaluation protocols on backbones."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

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
        help="a run folder or a weights file (then also --config); repeat "
        "to compare backbones, e.g. before and after NeCo",
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
    parser.add_argument(
        "--dataset",
        default="synthetic",
        choices=["synthetic", "voc", "ade20k", "coco-things", "coco-stuff"],
        help="dataset to score on",
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

    from neco_loss.evaluation.datasets import CLASS_NAMES, IGNORE_INDEX, NUM_CLASSES
    from neco_loss.evaluation.suite import PROTOCOLS, evaluate, evaluation_splits

    protocols = list(PROTOCOLS) if "all" in args.protocols else args.protocols
    names = backbone_names(args.checkpoint, args.name)
    checkpoints = dict(zip(names, args.checkpoint, strict=True))
    backbones = {name: _backbone(path, args.config) for name, path in checkpoints.items()}
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
        NUM_CLASSES[args.dataset],
        protocols,
        args.output,
        ignore_index=IGNORE_INDEX,
        clusters=args.clusters,
        linear_epochs=args.linear_epochs,
        search=args.search,
        class_names=CLASS_NAMES.get(args.dataset),
        context=context,
    )
    print((args.output / "results.md").read_text(), end="")
    print(f"tables and figures in {args.output}")


def _image_size(args: argparse.Namespace) -> int:
    """``--image-size``, else 448 px (paper) for real datasets and the run's size for synthetic."""
    if args.image_size:
        return int(args.image_size)
    if args.dataset != "synthetic":
        return 448
    from neco_loss.training import load_config

    return load_config(args.config or args.checkpoint[0] / "config.yaml").image_size


def _backbone(checkpoint: Path, config_path: Path | None) -> Any:
    """The ``DenseViT`` (eval mode) of a run folder or of a weights file plus config.

    Raises:
        SystemExit: With one line naming what is missing or unreadable.

    """
    from neco_loss.backbone_families import HF_FOLDER
    from neco_loss.models import DenseViT
    from neco_loss.training import load_config

    if not checkpoint.exists():
        raise SystemExit(f"error: --checkpoint {checkpoint}: no such run folder or weights file.")
    if (checkpoint / HF_FOLDER).is_dir():  # a transformers run: its save_pretrained folder
        return _finite_weights(DenseViT(str(checkpoint / HF_FOLDER)).eval(), checkpoint)
    weights = checkpoint
    if checkpoint.is_dir():  # a run's output_dir
        weights, config_path = checkpoint / "backbone.pt", config_path or checkpoint / "config.yaml"
    if config_path is None:
        raise SystemExit(
            f"error: --checkpoint {checkpoint} is a weights file: also give --config (the run's "
            "config.yaml), or pass the run folder instead."
        )
    for path in (weights, config_path):
        if not path.is_file():
            raise SystemExit(f"error: {path} does not exist (from --checkpoint {checkpoint}).")
    config = load_config(config_path)
    try:
        model = DenseViT(config.model, checkpoint=weights, **config.model_kwargs).eval()
    except ValueError as error:  # a truncated or foreign weights file, named by the message
        raise SystemExit(f"error: {error}") from None
    return _finite_weights(model, checkpoint)


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


def _finite_weights(model: Any, checkpoint: Path) -> Any:
    """``model`` if all its weights are finite.

    Raises:
        SystemExit: Naming the checkpoint and the count: a diverged run's scores would be
            those of garbage features.

    """
    import torch

    tensors = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    bad = sum(int((~torch.isfinite(tensor)).sum()) for tensor in tensors)
    if bad:
        total = sum(tensor.numel() for tensor in tensors)
        raise SystemExit(
            f"error: --checkpoint {checkpoint}: {bad} of its {total} weights are NaN or "
            "infinite; there is nothing to score."
        )
    return model


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
