"""The ``neco`` command: the table of subcommands, one line per error, one line per warning.

Each subcommand is a module of ``neco_loss.app`` with ``NAME``, ``HELP``, ``add_arguments``
and ``run`` (``COMMANDS``); ``train`` and ``ablate`` also take ``--key value`` config overrides
(``TAKES_OVERRIDES``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import warnings
from types import ModuleType
from typing import Any

from neco_loss.app import (
    ablate,
    check_sorter,
    demo,
    evaluate,
    make_images,
    sort_demo,
    testbed_backbone,
    train,
)
from neco_loss.backbones import TRUST_REMOTE_CODE
from neco_loss.extras import install_hint
from neco_loss.progress import silence_library_bars

# What a user can fix from the message alone: printed as one line, no traceback.
USER_ERRORS = (ValueError, TypeError, OSError, KeyError)
# In the order of ``neco --help``.
COMMANDS: tuple[ModuleType, ...] = (
    demo,
    train,
    evaluate,
    ablate,
    testbed_backbone,
    make_images,
    sort_demo,
    check_sorter,
)


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
        status = _run(argv)
    except SystemExit:  # SystemExit("error: ..."): Python prints it to stderr, exit status 1
        raise
    except KeyboardInterrupt:
        raise SystemExit("interrupted") from None
    except Exception as error:
        if debug:
            raise
        raise SystemExit(_error_line(error, argv)) from None
    finally:
        os.environ.pop(TRUST_REMOTE_CODE, None)  # the flag was for this command only
        warnings.showwarning = show_warning
    if status:
        raise SystemExit(status)


def _error_line(error: Exception, argv: list[str]) -> str:
    """The one ``error:`` line for ``error``: a missing extra names its install command."""
    missing = error.name if isinstance(error, ModuleNotFoundError) else None
    hint = install_hint(missing) if missing else None
    if missing and hint:
        return (
            f"error: neco {' '.join(argv[:1])} needs {missing.split('.')[0]!r}, which is not "
            f"installed: {hint}"
        )
    # A run stopped on purpose can only come from the trainer, hence only once imported.
    agreement = sys.modules.get("neco_loss.training.agreement")
    stopped = (agreement.TrainingStoppedError,) if agreement is not None else ()
    known = isinstance(error, (*USER_ERRORS, *stopped))
    message = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
    if not known:
        message = f"{type(error).__name__}: {message} (neco --debug ... shows the traceback)"
    return f"error: {message}"


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
    from neco_loss.checks import did_you_mean
    from neco_loss.training.config import TrainConfig, flag_name

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


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The ``neco`` parser and each command's own parser, by command name."""
    parser = argparse.ArgumentParser(
        prog="neco",
        description=(
            "NeCo post-pretraining tools. Add --debug to any command for tracebacks, and "
            "--trust-remote-code to let its model run code of its own (a hub: repo's "
            "hubconf.py, transformers' trust_remote_code): no config or run folder can."
        ),
    )
    commands = parser.add_subparsers(dest="command", required=True)
    parsers = {}
    for module in COMMANDS:
        # No abbreviations: train and ablate pass unknown '--key value' pairs on as config
        # overrides, which a prefix match would take (e.g. '--seed' for ablate's '--seeds').
        parsers[module.NAME] = commands.add_parser(
            module.NAME,
            help=module.HELP,
            description=module.HELP,
            formatter_class=_HelpFormatter,
            allow_abbrev=False,
        )
        module.add_arguments(parsers[module.NAME])
    return parser, parsers


def _run(argv: list[str]) -> int | None:
    """Parse ``argv`` and run its command; its exit status (``None``: 0)."""
    parser, parsers = build_parser()
    args, extra = parser.parse_known_args(argv)
    command = next(module for module in COMMANDS if module.NAME == args.command)
    if extra and not getattr(command, "TAKES_OVERRIDES", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    _check_option_typos(extra, parsers[args.command])
    result: int | None = command.run(args, extra)
    return result


if __name__ == "__main__":
    main()
