"""The solo-learn commands of docs/solo_learn.md, run verbatim as a user types them.

Needs solo-learn main (``bash scripts/solo_learn.sh`` builds it into ``.solo-learn``); skipped
without it, as in CI.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("solo.args.pretrain", reason="needs solo-learn main (scripts/solo_learn.sh)")

ROOT = Path(__file__).parents[1]
DOC = ROOT / "docs" / "solo_learn.md"


def documented_block(marker: str) -> list[str]:
    """The command lines of the ```bash block of docs/solo_learn.md that mentions ``marker``."""
    for block in re.findall(r"```bash\n(.*?)```", DOC.read_text(), flags=re.DOTALL):
        if marker in block:
            return [line for line in block.splitlines() if line.strip()]
    raise AssertionError(f"no bash block with {marker!r} in {DOC}")


def test_the_tiny_cpu_commands_run_verbatim(tmp_path):
    """From a project folder holding examples/: relative --config-path, the tiny run logs
    neco/* metrics."""
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    environment = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    for line in documented_block("neco_tiny_cpu.yaml"):
        result = subprocess.run(
            line,
            shell=True,
            cwd=tmp_path,
            env=environment,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, f"{line}\n{result.stderr[-3000:]}"
    metrics = list(tmp_path.rglob("metrics.csv"))
    assert metrics, "Lightning's CSV logger wrote nothing"
    header = metrics[0].read_text().splitlines()[0]
    assert "train_neco_loss_step" in header and "neco/rank_agreement" in header
    assert list((tmp_path / "outputs" / "solo_trained_models").rglob("*.ckpt"))
