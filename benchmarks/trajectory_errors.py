"""Per-step differences between our training and the original's five recorded steps.

    python benchmarks/trajectory_errors.py [--fixtures ../shared/fixtures]

Replays ``official_trajectory_tiny.pt`` as ``tests/test_trajectory.py`` does, for the original's
step (``second_forward``) with both hard-mining rules and for the default step, and prints per
step ours, the original's value and the difference of every loss and gradient norm, then the
final-weight errors (``||ours - original|| / ||original - start||`` per trained group, and the CLUB
estimator's). The test asserts the limits; this prints the figures, which depend on the CPU's
floating-point kernels.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the figures of tests/test_trajectory.py, from its own helpers: tests/ is not installed

NAMES = ("lr", "patch", "global", "component", "esb", "eir", "loss", "estimator", "grad_norm", "estimator_grad_norm")
SETTINGS = (("second_forward", "original"), ("second_forward", "per_group"), ("same_forward", "original"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fixtures", default=str(ROOT.parent / "shared" / "fixtures"))
    args = parser.parse_args()
    os.environ["ANOMALYMOE_FIXTURES"] = args.fixtures
    from tests.test_trajectory import FIXTURE, change_error, club_change_error, replay

    fixture = torch.load(FIXTURE, weights_only=True)
    for setting in SETTINGS:
        steps, module = replay(fixture, *setting)
        print(f"\nmodule.estimator_update={setting[0]} module.loss.hard_mining={setting[1]}")
        print("| step | " + " | ".join(NAMES) + " |")
        print("|---" * (len(NAMES) + 1) + "|")
        for ours, expected in zip(steps, fixture["steps"], strict=True):
            cells = [f"{ours[n]:.6g} ({ours[n] - expected[n]:+.1e})" for n in NAMES]
            print(f"| {expected['step'] + 1} | " + " | ".join(cells) + " |")
        errors = {**change_error(fixture, module), "club_estimator": club_change_error(fixture, module)}
        print("final weights, error / change: " + ", ".join(f"{k} {v:.2g}" for k, v in errors.items()))


if __name__ == "__main__":
    main()
