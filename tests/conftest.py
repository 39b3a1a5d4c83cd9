"""Hypothesis profiles: bounded and deterministic by default so that CI stays fast and stable.

Set HYPOTHESIS_PROFILE=thorough for a longer, randomised search.
"""

import os
import sys
from pathlib import Path

from hypothesis import HealthCheck, settings

# solo-learn main built by scripts/solo_learn.sh: its tests run when it is there.
SOLO_LEARN = Path(__file__).parents[1] / ".solo-learn"
if SOLO_LEARN.is_dir():
    sys.path.insert(0, str(SOLO_LEARN))
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(SOLO_LEARN), os.environ.get("PYTHONPATH")])
    )

settings.register_profile(
    "ci",
    max_examples=25,
    deadline=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("thorough", max_examples=500, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

pytest_plugins = ["pytester"]  # tests of the soft-sort pytest plugin run pytest inside pytest
