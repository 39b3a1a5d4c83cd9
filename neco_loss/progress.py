"""Progress bars that suit a terminal and a log file alike, and the wording of counts."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any

# A bar redrawn every 0.1 s (tqdm's default) is a line every 0.1 s in a log file: when stderr
# is not a terminal, the bar is written at most once a minute (and at its end).
LOG_INTERVAL_S = 60.0


def progress_bar(
    iterable: Iterable[Any] | None = None, *, enabled: bool = True, **options: Any
) -> Any:
    """A ``tqdm`` bar on stderr; sparse when stderr is a file or a pipe (``LOG_INTERVAL_S``).

    Args:
        iterable: What to iterate over, as ``tqdm(iterable)``.
        enabled: ``False``: no bar at all (``--quiet``).
        **options: ``tqdm`` options (``total``, ``desc``, ``unit``, ``initial``).

    """
    from tqdm.auto import tqdm  # the [train] extra

    if not sys.stderr.isatty():
        options.setdefault("mininterval", LOG_INTERVAL_S)
        options.setdefault("maxinterval", LOG_INTERVAL_S)
    return tqdm(iterable, disable=not enabled, file=sys.stderr, **options)


def silence_library_bars() -> None:
    """Turn off the bars of HuggingFace's libraries ("Loading weights", "Writing shards").

    They read ``HF_HUB_DISABLE_PROGRESS_BARS`` when first imported; transformers, if imported
    already, is told directly (and tells the hub).
    """
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if "transformers" in sys.modules:
        from transformers.utils import logging

        logging.disable_progress_bar()  # the hub's bars too


def plural(count: int, noun: str) -> str:
    """``1 step``, ``2 steps``."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"
