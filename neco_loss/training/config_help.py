"""``neco train --help``'s list of config keys, generated from ``TrainConfig`` itself."""

from __future__ import annotations

import dataclasses
import json
import textwrap
import typing
from typing import Any

from neco_loss.training.config import TrainConfig, flag_name, type_name


def config_keys_help() -> str:
    """Every ``TrainConfig`` key as ``--key TYPE (default: X)`` and its docstring line.

    Generated from the dataclass and its docstring's ``Attributes`` (nothing written twice).
    """
    described: dict[str, str] = {}
    name = ""
    lines = (TrainConfig.__doc__ or "").split("Attributes:")[1].splitlines()
    for line in lines:
        text = line.strip()
        head, colon, rest = text.partition(": ")
        if (
            colon
            and head.isidentifier()
            and line.startswith(" " * 8)
            and not line.startswith(" " * 9)
        ):
            name, described[head] = head, rest
        elif text and name:
            described[name] += " " + text
    hints = typing.get_type_hints(TrainConfig)
    rows = []
    for item in dataclasses.fields(TrainConfig):
        if item.default_factory is not dataclasses.MISSING:
            default = item.default_factory()
        else:
            default = item.default
        shown = _flow_text(default)
        flag = f"{flag_name(item.name)} {type_name(hints[item.name])}"
        rows.append(f"  {flag}  (default: {shown.strip()})")
        text = described.get(item.name, "").replace("``", "")
        rows.append(
            textwrap.fill(text, width=88, initial_indent=" " * 6, subsequent_indent=" " * 6)
        )
    return "\n".join(rows)


def _flow_text(value: Any) -> str:
    """A default as YAML flow text for ``--help``.

    JSON (which YAML reads the same) when pyyaml is not installed, so that ``neco --help``
    works with the core install alone.
    """
    try:
        import yaml
    except ModuleNotFoundError:
        return json.dumps(value)
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...")
