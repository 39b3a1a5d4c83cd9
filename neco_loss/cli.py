"""The ``neco`` command and its subcommands.

demo, train, eval, ablate, testbed-backbone, make-images, sort-demo, check-sorter.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from neco_loss.backbones import TRUST_REMOTE_CODE
from neco_loss.extras import install_hint
from neco_loss.progress import plural, silence_library_bars

# What a user can fix from the message alone: printed as one line, no traceback.
USER_ERRORS = (ValueError, TypeError, OSError, KeyError)


def _backbone(checkpoint: Path, config_path: Path | None) -> Any:
    """The ``DenseViT`` (eval mode) of a run folder or of a weights file plus config.

    Raises:
        SystemExit: With one line naming what is missing or unreadable.

    """
    from neco_loss.backbones import HF_FOLDER
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


def _backbone_names(checkpoints: list[Path], names: list[str] | None) -> list[str]:
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


def _evaluate(args: argparse.Namespace) -> None:
    import torch

    from neco_loss.evaluation.datasets import CLASS_NAMES, IGNORE_INDEX, NUM_CLASSES
    from neco_loss.evaluation.suite import PROTOCOLS, evaluate, evaluation_splits

    protocols = list(PROTOCOLS) if "all" in args.protocols else args.protocols
    names = _backbone_names(args.checkpoint, args.name)
    backbones = {
        name: _backbone(path, args.config)
        for name, path in zip(names, args.checkpoint, strict=True)
    }
    size = args.image_size or (448 if args.dataset != "synthetic" else None)  # paper: 448 px
    if size is None:  # the synthetic default: the size the run trained on
        from neco_loss.training import load_config

        first = args.checkpoint[0]
        size = load_config(args.config or first / "config.yaml").image_size
    datasets = evaluation_splits(
        args.dataset,
        args.data_root,
        size,
        args.train_images,
        args.val_images,
        args.train_split,
        args.val_split,
    )
    features = {name: torch.no_grad()(backbone) for name, backbone in backbones.items()}
    context = {
        "dataset": args.dataset,
        "data_root": str(args.data_root) if args.data_root else None,
        "splits": f"{args.train_split} / {args.val_split}",
        "image_size": size,
        "checkpoints": {name: str(path) for name, path in zip(names, args.checkpoint, strict=True)},
        "steps": {
            name: _trained_step(path) for name, path in zip(names, args.checkpoint, strict=True)
        },
    }
    evaluate(
        features,
        datasets[0],
        datasets[1],
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


def _size_range(text: str) -> tuple[int, int]:
    """``"1..130"`` (or ``"22"``) as ``(min_n, max_n)``."""
    low, _, high = text.partition("..")
    try:
        sizes = (int(low), int(high or low))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected MIN..MAX such as 1..130, got {text!r}"
        ) from None
    if not 1 <= sizes[0] <= sizes[1]:
        raise argparse.ArgumentTypeError(f"expected 1 <= MIN <= MAX, got {text!r}")
    return sizes


def _check_sorters(args: argparse.Namespace) -> int:
    """Run the properties on each sorter; print the tables; 1 if a property failed."""
    from neco_loss.testing import SorterError, resolve_properties, run_properties
    from neco_loss.testing.report import QUICK, load_sorter, markdown_table, named_sorters

    specs = list(args.sorters)
    if args.report:  # the published report also checks second derivatives
        specs += list(QUICK if args.quick else named_sorters())
        args.properties = [*args.properties, "gradgradcheck"]
    if not specs:
        raise SystemExit("error: name a sorter (MODULE:FUNCTION or a report name), or --report")
    try:
        properties = resolve_properties(args.properties)
        sorters = [load_sorter(spec) for spec in specs]
        reference = load_sorter(args.reference).sorter if args.reference else None
    except (SorterError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None
    max_n = min(args.n[1], 24) if args.quick else args.n[1]
    reports = []
    for named in sorters:
        try:
            report = run_properties(
                named.sorter,
                properties,
                max_examples=5 if args.quick else args.max_examples,
                n=(max(args.n[0], named.min_n), max(max_n, named.min_n)),
                steepness=args.steepness,
                reference=reference,
                random_seed=args.seed,
                name=named.name,
            )
        except SorterError as error:
            raise SystemExit(f"error: {error}") from None
        print(report.as_text(), flush=True)
        reports.append(report)
    if args.markdown:
        notes = {named.name: named.note for named in sorters if named.note}
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown_table(reports, notes))
        print(f"table written to {args.markdown}")
    failed = any(report.failures for report in reports)
    return 1 if failed and not args.report else 0


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``neco`` command: errors as one ``error:`` line, exit status 1.

    ``--debug`` (anywhere on the line) shows the traceback instead. ``--trust-remote-code``
    (anywhere on the line) lets the model of this command run code of its own.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if debug:
        argv.remove("--debug")
    # Only this command line can let a model run code of its own (neco_loss.backbones).
    os.environ.pop(TRUST_REMOTE_CODE, None)
    if "--trust-remote-code" in argv:
        argv.remove("--trust-remote-code")
        os.environ[TRUST_REMOTE_CODE] = "1"
    if "--quiet" in argv:
        silence_library_bars()
    show_warning = warnings.showwarning
    warnings.showwarning = _warning_line
    try:
        _run(argv)
    except SystemExit:  # SystemExit("error: ..."): Python prints it to stderr, exit status 1
        raise
    except KeyboardInterrupt:
        raise SystemExit("interrupted") from None
    except Exception as error:
        if debug:
            raise
        missing = error.name if isinstance(error, ModuleNotFoundError) else None
        hint = install_hint(missing) if missing else None
        if missing and hint:
            raise SystemExit(
                f"error: neco {' '.join(argv[:1])} needs {missing.split('.')[0]!r}, which is not "
                f"installed: {hint}"
            ) from None
        # A run stopped on purpose can only come from the trainer, hence only once imported.
        agreement = sys.modules.get("neco_loss.training.agreement")
        stopped = (agreement.TrainingStoppedError,) if agreement is not None else ()
        known = isinstance(error, (*USER_ERRORS, *stopped))
        message = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        if not known:
            message = f"{type(error).__name__}: {message} (neco --debug ... shows the traceback)"
        raise SystemExit(f"error: {message}") from None
    finally:
        os.environ.pop(TRUST_REMOTE_CODE, None)  # the flag was for this command only
        warnings.showwarning = show_warning


def _warning_line(
    message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any
) -> None:
    """Show a warning as one ``warning:`` line on stderr, as errors are one ``error:`` line."""
    print(f"warning: {message}", file=sys.stderr)


def _check_option_typos(extra: list[str], parser: argparse.ArgumentParser) -> None:
    """Refuse an unknown option that is a typo of one of the command's own options.

    ``train`` and ``ablate`` pass unknown ``--key value`` pairs on as config overrides; a typo
    of a config key is named by the config (``unknown config key``), a typo of ``--resume``
    would only be "overrides must come in pairs".

    Raises:
        ValueError: ``unknown option --resum (did you mean '--resume'?)``.

    """
    from neco_loss.training.config import TrainConfig, did_you_mean, flag_name

    keys = {flag_name(item.name) for item in dataclasses.fields(TrainConfig)}
    options = [flag for flag in parser._option_string_actions if flag.startswith("--")]
    for token in extra:
        flag = token.split("=")[0]
        if token.startswith("--") and flag.split(".")[0] not in keys:
            suggestion = did_you_mean(flag, options)
            if suggestion:
                raise ValueError(f"unknown option {token}{suggestion}")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown for every option; epilogs kept as written."""


def _run(argv: list[str]) -> None:
    from neco_loss.testbed import PretrainSettings
    from neco_loss.training.config_help import config_keys_help

    parser = argparse.ArgumentParser(
        prog="neco",
        description=(
            "NeCo post-pretraining tools. Add --debug to any command for tracebacks, and "
            "--trust-remote-code to let its model run code of its own (a hub: repo's "
            "hubconf.py, transformers' trust_remote_code): no config or run folder can."
        ),
    )
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str, **options: Any) -> argparse.ArgumentParser:
        # No abbreviations: train and ablate pass unknown '--key value' pairs on as config
        # overrides, which a prefix match would take (e.g. '--seed' for ablate's '--seeds').
        return commands.add_parser(
            name,
            help=help,
            description=help,
            formatter_class=_HelpFormatter,
            allow_abbrev=False,
            **options,
        )

    demo = command("demo", "the main job on the built-in synthetic scenes")
    demo.add_argument("--output", type=Path, default=Path("outputs/demo"), help="output folder")
    demo.add_argument("--seed", type=int, default=0, help="seed of data, weights and draws")
    demo.add_argument(
        "--neco-steps", type=int, default=None, help="NeCo steps (None: the recipe's max_steps)"
    )
    demo.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        help="run every seed into OUTPUT/seed<N> and print the per-seed table with the paired "
        "95%% interval of the change",
    )
    demo.add_argument(
        "--split",
        default="test",
        choices=["test", "val"],
        help="SyntheticScenes split to score (settings are chosen on val, reported on test)",
    )

    train = command(
        "train",
        "NeCo post-pretraining from a YAML config; '--key value' overrides any config key",
        epilog="config keys (YAML keys; '--key value' on the command line, nested as "
        "--loss.top-k 5):\n" + config_keys_help(),
    )
    train.add_argument(
        "config", type=Path, help="a YAML config, e.g. examples/recipes/tiny_cpu.yaml"
    )
    train.add_argument("--resume", action="store_true", help="continue from output_dir")
    train.add_argument(
        "--overwrite", action="store_true", help="replace the run already in output_dir"
    )
    train.add_argument("--quiet", action="store_true", help="no progress bar")

    evaluation = command("eval", "evaluation protocols on one or more backbones")
    evaluation.add_argument(
        "protocols",
        nargs="+",
        choices=["in-context", "linear", "overclustering", "fractions", "all"],
        help="protocols to run",
    )
    evaluation.add_argument(
        "--checkpoint",
        type=Path,
        action="append",
        required=True,
        help="a run folder or a weights file (then also --config); repeat "
        "to compare backbones, e.g. before and after NeCo",
    )
    evaluation.add_argument(
        "--config", type=Path, default=None, help="a run's config.yaml (with a weights file)"
    )
    evaluation.add_argument(
        "--name",
        action="append",
        default=None,
        help="a name per --checkpoint for tables and figures (None: the shortest distinct tail "
        "of their paths)",
    )
    evaluation.add_argument(
        "--dataset",
        default="synthetic",
        choices=["synthetic", "voc", "ade20k", "coco-things", "coco-stuff"],
        help="dataset to score on",
    )
    evaluation.add_argument(
        "--data-root", type=Path, default=None, help="the dataset's folder (all but synthetic)"
    )
    evaluation.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="None: the run's image_size (synthetic), 448 px otherwise (paper)",
    )
    evaluation.add_argument("--train-split", default="train", help="split to fit on")
    evaluation.add_argument("--val-split", default="val", help="split to score")
    evaluation.add_argument(
        "--train-images", type=int, default=200, help="images of the train split to use (0: all)"
    )
    evaluation.add_argument(
        "--val-images", type=int, default=64, help="images of the val split to score (0: all)"
    )
    evaluation.add_argument(
        "--clusters", type=int, nargs="+", default=[100, 300, 500], help="overclustering K"
    )
    evaluation.add_argument(
        "--linear-epochs", type=int, default=20, help="epochs of the linear probe"
    )
    evaluation.add_argument(
        "--search",
        default="torch",
        choices=["torch", "scann"],
        help='in-context neighbour search (scann: pip install "neco-loss[scann]")',
    )
    evaluation.add_argument(
        "--output", type=Path, default=Path("outputs/eval"), help="tables and figures go here"
    )

    ablate = command(
        "ablate",
        "train and evaluate the variants of an ablation file; '--key value' overrides apply "
        "to every variant",
    )
    ablate.add_argument(
        "ablation", type=Path, help="an ablation file, e.g. examples/ablations/loss.yaml"
    )
    ablate.add_argument(
        "--output", type=Path, default=None, help="default: outputs/ablations/<file name>"
    )
    ablate.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        help="train every variant with each of these seeds (default: the file's 'seeds', else "
        "the config's seed)",
    )
    ablate.add_argument("--quiet", action="store_true", help="no progress bars")

    testbed = command(
        "testbed-backbone",
        "pretrain the testbed backbone from scratch (VICReg with VICRegL's local term on "
        "SyntheticScenes); the defaults reproduce the shipped neco_loss/assets/testbed_vit.pt",
    )
    testbed.add_argument(
        "--output", type=Path, default=Path("outputs/testbed"), help="weights and log go here"
    )
    testbed.add_argument("--steps", type=int, default=PretrainSettings.steps, help="steps")
    testbed.add_argument("--seed", type=int, default=PretrainSettings.seed, help="seed")
    testbed.add_argument("--quiet", action="store_true", help="no progress bar")

    images = command(
        "make-images", "write synthetic scenes as PNG files, for tools that read folders"
    )
    images.add_argument("folder", type=Path, help="where the PNG files go")
    images.add_argument("--count", type=int, default=64, help="number of images")
    images.add_argument("--size", type=int, default=96, help="image side in pixels")
    images.add_argument("--seed", type=int, default=0, help="seed of the scenes")

    sort_demo = command("sort-demo", "soft sorting demo, native vs diffsort")
    sort_demo.add_argument(
        "--output", type=Path, default=Path("outputs/sort_demo"), help="figure folder"
    )
    sort_demo.add_argument(
        "--rows", type=int, default=3136, help="rows sorted (64 images x 49 patches)"
    )
    sort_demo.add_argument("--n", type=int, default=49, help="elements per row")

    check = command(
        "check-sorter",
        "property-based checks of any soft sorter (neco_loss.testing), with counterexamples",
    )
    check.add_argument(
        "sorters",
        nargs="*",
        help="MODULE:FUNCTION of a sorter x -> (sorted_x, perm) or x -> perm (optionally taking "
        "steepness=), or a report name such as diffsort/bitonic/cauchy",
    )
    check.add_argument("--n", type=_size_range, default=(1, 130), help="sizes MIN..MAX")
    check.add_argument(
        "--properties",
        nargs="+",
        default=["all"],
        help="'all' (every property but the optional gradgradcheck) and/or property names",
    )
    check.add_argument("--max-examples", type=int, default=50, help="per property")
    check.add_argument(
        "--steepness",
        type=float,
        default=100.0,
        help="the steepness of a sorter without a steepness parameter (sets tolerances)",
    )
    check.add_argument("--reference", default=None, help="a sorter for the parity property")
    check.add_argument("--seed", type=int, default=0, help="hypothesis' search seed")
    check.add_argument(
        "--report", action="store_true", help="also check every sorter of the published report"
    )
    check.add_argument(
        "--quick", action="store_true", help="reduced: 3 report sorters, n <= 24, 5 examples"
    )
    check.add_argument("--markdown", type=Path, default=None, help="write the table here")

    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in ("train", "ablate"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    _check_option_typos(extra, commands.choices[args.command])
    if args.command == "demo":
        from neco_loss.demo import run_demo

        if args.seeds:
            from neco_loss.demo import run_demo_seeds

            print(run_demo_seeds(args.output, args.seeds, split=args.split), end="")
        else:
            run_demo(args.output, args.seed, args.neco_steps, split=args.split)
    elif args.command == "train":
        from neco_loss.training import load_config
        from neco_loss.training.distributed import launch
        from neco_loss.training.run_folder import SKIP_LOG

        config = load_config(args.config, extra)
        result = launch(
            config, resume=args.resume, progress=not args.quiet, overwrite=args.overwrite
        )
        if result.already_finished:
            print(f"already finished at step {result.steps}; nothing to do ({result.output_dir})")
        else:
            print(
                f"trained {plural(result.steps, 'step')}, last loss {result.last_loss:.4f}; "
                f"checkpoint {result.checkpoint}, backbone weights {result.backbone}"
            )
            if result.skipped:
                print(
                    f"skipped {len(result.skipped)} unreadable images, listed in "
                    f"{result.output_dir / SKIP_LOG}"
                )
    elif args.command == "ablate":
        from neco_loss.ablation import run_ablation

        output = args.output or Path("outputs/ablations") / args.ablation.stem
        run_ablation(args.ablation, output, extra, progress=not args.quiet, seeds=args.seeds)
        print((output / "ablation.md").read_text(), end="")
        print(f"table, plot and per-variant runs in {output}")
    elif args.command == "testbed-backbone":
        from neco_loss.testbed import pretrain_testbed

        settings = PretrainSettings(steps=args.steps, seed=args.seed)
        weights = pretrain_testbed(args.output, settings, progress=not args.quiet)
        print(
            f"testbed backbone written to {weights} (log: {weights.parent / 'pretrain_log.json'})"
        )
    elif args.command == "eval":
        _evaluate(args)
    elif args.command == "check-sorter":
        raise SystemExit(_check_sorters(args))
    elif args.command == "make-images":
        from neco_loss.data.synthetic import save_scenes

        paths = save_scenes(args.folder, args.count, args.size, args.seed)
        print(f"wrote {len(paths)} images to {args.folder}")
    else:
        from neco_loss.sort_demo import demo as sorting_demo

        sorting_demo(args.output, args.rows, args.n)


if __name__ == "__main__":
    main()
