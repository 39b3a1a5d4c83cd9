"""Reading YAML written by users (configs, ablation files, overrides): data only, located errors."""

from __future__ import annotations

import functools
from typing import Any


@functools.cache
def _loader_without_aliases() -> type:
    """PyYAML's safe loader, refusing aliases (``*name``, ``<<: *name``).

    Aliases are how a few hundred bytes of YAML become gigabytes (a "billion laughs"): a
    config never needs them.
    """
    import yaml

    class Loader(yaml.SafeLoader):
        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise yaml.composer.ComposerError(
                    None,
                    None,
                    f"YAML aliases (*{event.anchor}) are not allowed in a config; write the "
                    "values out",
                    event.start_mark,
                )
            return super().compose_node(parent, index)

    return Loader


def read_yaml(text: str, source: str) -> Any:
    """Parse YAML text safely (no tags that build objects, no aliases).

    Args:
        text: The YAML text.
        source: What it is, for errors (a file name, ``--key``).

    Raises:
        ValueError: ``SOURCE line L, column C: problem`` for a syntax error or an alias.

    """
    import yaml  # the [train] extra; imported here so that `neco --help` needs only the core

    try:
        return yaml.load(text, Loader=_loader_without_aliases())  # noqa: S506 (a SafeLoader)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ValueError(f"{source}{where}: {error.problem}.") from None
    except yaml.YAMLError as error:
        raise ValueError(f"{source}: {error}") from None
