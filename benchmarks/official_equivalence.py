"""How far ``NeCoLoss`` is from the authors' loss in each official configuration, float64.

For each configuration of ``tests/test_official_equivalence.py`` (the official ``knn_loss``
transcribed in ``tests/official_neco.py``; same maps, crops and seeded draws): the relative
difference of the loss and of the student gradients (max abs difference / max abs gradient),
with the default log floor and with the former ``epsilon=1e-8`` clamp.

    python benchmarks/official_equivalence.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))  # the tests package, run from anywhere

from tests.test_official_equivalence import CONFIGS, both_sides  # noqa: E402

EPSILONS = {"default": None, "1e-8": 1e-8}


def differences(config: dict, epsilon: float | None) -> tuple[float, float]:
    """``(loss, gradient)`` relative differences to the official loss for one configuration."""
    (ours, our_grads), (theirs, their_grads) = both_sides(config, epsilon=epsilon)
    loss = float(((ours - theirs) / theirs).detach().abs())
    gradient = max(
        float((a - b).abs().max() / b.abs().max())
        for a, b in zip(our_grads, their_grads, strict=True)
    )
    return loss, gradient


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=[c for c in CONFIGS if c != "queue"])
    args = parser.parse_args()
    print("| configuration | log floor | loss rel. diff | gradient rel. diff |")
    print("|---|---|---|---|")
    for name in args.configs:
        for label, epsilon in EPSILONS.items():
            loss, gradient = differences(CONFIGS[name], epsilon)
            print(f"| {name} | {label} | {loss:.1e} | {gradient:.1e} |")


if __name__ == "__main__":
    main()
