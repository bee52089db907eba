"""Checks of ``benchmarks/gpu.sh`` that write dated rows to BENCHMARKS.md ("## Paper model on a GPU").

    python benchmarks/gpu_checks.py training --train-dir RUN --test-dir RUN --steps 50 --file BENCHMARKS.md
    python benchmarks/gpu_checks.py parity --log pytest.log --rc 0 --file BENCHMARKS.md
    python benchmarks/gpu_checks.py total --seconds 300 --file BENCHMARKS.md
    python benchmarks/gpu_checks.py failed --measurement "mode=benchmark" --rc 1 --log run.log --file BENCHMARKS.md
    python benchmarks/gpu_checks.py note --measurement "bf16 decisions" --rc 0 --log out.log --file BENCHMARKS.md

``note``: a row with the last line of a script's output (FAILED with a non-zero exit status).

``training``: the training run's logged ``train/loss`` (``<train-dir>/csv/metrics.csv``) has one
finite value per step and, with ``--require-falling``, its last fifth averages below its first
fifth; ``checkpoints/last.ckpt`` exists and ``mode=test`` on it wrote ``results.json``. Exits
with status 1 (after writing the row) when a check fails.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
from pathlib import Path

from src.measure.markdown import append_row
from src.measure.report import DETAILED_HEADER, DETAILED_INTRO, DETAILED_SECTION, detailed_row
from src.measure.timing import describe_device, measuring_device


def training_losses(train_dir: Path) -> list[float]:
    """``train/loss`` of every logged step, in step order."""
    path = train_dir / "csv" / "metrics.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the training run logs with logger=csv and log_every_n_steps=1")
    with path.open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    return [float(r["train/loss"]) for r in sorted(rows, key=lambda r: int(r["step"]))]


def check_training(args: argparse.Namespace) -> tuple[list[str], str]:
    """Problems found and the row's notes."""
    problems = []
    losses = training_losses(args.train_dir)
    if len(losses) != args.steps:
        problems.append(f"{len(losses)} logged losses, expected {args.steps}")
    if not all(math.isfinite(v) for v in losses):
        problems.append("a loss is not finite")
    fifth = max(1, len(losses) // 5)
    first, last = sum(losses[:fifth]) / fifth, sum(losses[-fifth:]) / fifth
    if args.require_falling and not last < first:
        problems.append(f"loss not falling ({first:.4g} -> {last:.4g})")
    ckpt = args.train_dir / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():
        problems.append(f"{ckpt} missing")
    results = args.test_dir / "results.json"
    auroc = None
    if results.is_file():
        auroc = json.loads(results.read_text()).get("mean", {}).get("image_auroc")
    else:
        problems.append(f"mode=test on last.ckpt wrote no {results}")
    notes = (f"{len(losses)} steps, train/loss {first:.4g} (first {fifth}) -> {last:.4g} (last {fifth}); "
             f"mode=test on last.ckpt: image AUROC {'none' if auroc is None else f'{auroc:.3f}'}")
    if args.seconds is not None:
        notes += f"; {args.seconds:.0f} s training + test"
    return problems, notes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("check", choices=["training", "parity", "total", "failed", "note"])
    parser.add_argument("--file", type=Path, required=True, help="the BENCHMARKS.md to append to")
    parser.add_argument("--benchmark", default="gpu", help="the benchmark column (gpu, gpu_dry_run)")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--batch", default="8")
    parser.add_argument("--train-dir", type=Path)
    parser.add_argument("--test-dir", type=Path)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--require-falling", action="store_true")
    parser.add_argument("--seconds", type=float, help="wall time to report")
    parser.add_argument("--log", type=Path, help="parity: the pytest output; failed: the step's log")
    parser.add_argument("--rc", type=int, default=0, help="parity, failed: the step's exit status")
    parser.add_argument("--measurement", help="failed: the step")
    args = parser.parse_args()

    problems: list[str] = []
    if args.check == "training":
        problems, notes = check_training(args)
        measurement = f"training run, run.py, {args.steps} steps"
    elif args.check == "parity":
        text = args.log.read_text() if args.log and args.log.is_file() else ""
        summary = re.findall(r"^=*\s*(\d+ (?:passed|failed|error|skipped)\b.*? in [\d.]+s).*$", text, re.M)
        notes = summary[-1] if summary else "no pytest summary"
        if args.rc != 0 or "passed" not in notes or "skipped" in notes:
            problems.append(f"parity test: {notes} (exit status {args.rc})")
        measurement, args.batch = "parity test (tests/test_parity.py) on this device", "4"
    elif args.check == "note":
        lines = args.log.read_text().strip().splitlines() if args.log and args.log.is_file() else []
        notes = lines[-1] if lines else "no output"
        if args.rc != 0:
            problems.append(f"exit status {args.rc}")
        measurement, args.batch = args.measurement, ""
    elif args.check == "failed":
        problems.append(f"exit status {args.rc}" + (" (stopped at its time limit)" if args.rc in (124, 137) else ""))
        notes = f"see {args.log}"
        measurement, args.batch = args.measurement, ""
    else:
        notes = f"{args.seconds:.0f} s wall for every step of benchmarks/gpu.sh"
        measurement, args.batch = "benchmarks/gpu.sh, all steps", ""
    if problems:
        notes = "FAILED: " + "; ".join(problems) + ". " + notes
    device = describe_device(measuring_device("auto"))
    row = detailed_row(args.benchmark, device, args.precision, "no", measurement, args.batch, None, None,
                       notes.replace("|", "/"))
    append_row(args.file, DETAILED_SECTION, DETAILED_INTRO, DETAILED_HEADER, row)
    print(row)
    if problems and args.check != "failed":
        sys.exit("; ".join(problems))


if __name__ == "__main__":
    main()
