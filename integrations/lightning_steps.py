"""When a Lightning training step's logs are written: NeCo diagnostics are computed only then."""

from __future__ import annotations

from typing import Any


def logs_this_step(module: Any) -> bool:
    """Whether Lightning writes the logs of the running training step of ``module``.

    Lightning's own rule (``log_every_n_steps``, and the last step): its logger connector's
    ``should_update_logs``. ``True`` outside a trainer, so a module called by hand still logs.
    """
    trainer = getattr(module, "_trainer", None)
    connector = getattr(trainer, "_logger_connector", None)
    if connector is None:
        return True
    return bool(connector.should_update_logs)
