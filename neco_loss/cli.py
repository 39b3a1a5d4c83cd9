"""The ``neco`` command: ``demo``, ``train``, ``eval in-context``, ``sort-demo``."""

from __future__ import annotations

import argparse
from pathlib import Path


def _eval_in_context(args: argparse.Namespace) -> None:
    from neco_loss.data import SyntheticScenes
    from neco_loss.evaluation import in_context_miou
    from neco_loss.evaluation.datasets import Normalized
    from neco_loss.models import DenseViT
    from neco_loss.training import load_config

    weights, config_path = args.checkpoint, args.config
    if weights.is_dir():  # a run's output_dir
        weights, config_path = weights / "backbone.pt", config_path or weights / "config.yaml"
    if config_path is None:
        raise SystemExit("--config is needed when --checkpoint is a weights file.")
    config = load_config(config_path)
    backbone = DenseViT(config.model, checkpoint=weights, **config.model_kwargs).eval()
    size = args.image_size or config.image_size
    if args.dataset != "synthetic":
        raise SystemExit(
            f"dataset {args.dataset!r}: only 'synthetic' is available so far (real dataset "
            "loaders come with the evaluation suite)."
        )
    train_set = Normalized(SyntheticScenes("train", size, args.train_images, seed=config.seed))
    val_set = Normalized(SyntheticScenes("val", size, args.val_images, seed=config.seed))
    result = in_context_miou(
        backbone, train_set, val_set, SyntheticScenes.num_classes, progress=True
    )
    print(f"in-context mIoU: {result.miou:.4f}")
    print("IoU per class:", [round(v, 4) for v in result.iou.tolist()])


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``neco`` command."""
    parser = argparse.ArgumentParser(prog="neco", description="NeCo post-pretraining tools.")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="the main job on the built-in synthetic scenes")
    demo.add_argument("--output", type=Path, default=Path("outputs/demo"))
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--neco-steps", type=int, default=None)
    demo.add_argument("--dino-steps", type=int, default=None)

    train = commands.add_parser(
        "train", help="NeCo post-pretraining from a YAML config; extra '--key value' override it"
    )
    train.add_argument("config", type=Path)
    train.add_argument("--resume", action="store_true", help="continue from output_dir")
    train.add_argument("--quiet", action="store_true", help="no progress bar")

    evaluate = commands.add_parser("eval", help="evaluation protocols")
    protocols = evaluate.add_subparsers(dest="protocol", required=True)
    in_context = protocols.add_parser("in-context", help="dense nearest-neighbour segmentation")
    in_context.add_argument(
        "--checkpoint",
        type=Path,
        required=True,
        help="a run's output_dir, or a backbone weights file (then also --config)",
    )
    in_context.add_argument("--config", type=Path, default=None, help="the run's config.yaml")
    in_context.add_argument("--dataset", default="synthetic")
    in_context.add_argument("--image-size", type=int, default=None)
    in_context.add_argument("--train-images", type=int, default=200)
    in_context.add_argument("--val-images", type=int, default=64)

    sort_demo = commands.add_parser("sort-demo", help="soft sorting demo, native vs diffsort")
    sort_demo.add_argument("--output", type=Path, default=Path("outputs/sort_demo"))
    sort_demo.add_argument("--rows", type=int, default=3136)
    sort_demo.add_argument("--n", type=int, default=49)

    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "train":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "demo":
        from neco_loss.demo import DINO_STEPS, run_demo

        run_demo(args.output, args.seed, args.neco_steps, args.dino_steps or DINO_STEPS)
    elif args.command == "train":
        from neco_loss.training import load_config
        from neco_loss.training import train as run_training

        result = run_training(
            load_config(args.config, extra), resume=args.resume, progress=not args.quiet
        )
        print(
            f"trained {result.steps} steps, last loss {result.last_loss:.4f}; "
            f"checkpoint {result.checkpoint}, backbone weights {result.backbone}"
        )
    elif args.command == "eval":
        _eval_in_context(args)
    else:
        from neco_loss.sort_demo import demo as sorting_demo

        sorting_demo(args.output, args.rows, args.n)


if __name__ == "__main__":
    main()
