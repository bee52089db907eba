"""benchmarks/gpu.sh in its dry run (CPU, tiny model): every step runs and writes its rows."""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = Path(os.environ.get("ANOMALYMOE_FIXTURES", ROOT.parent / "shared" / "fixtures")) / "official_tiny.pt"


@pytest.mark.slow
def test_gpu_script_dry_run_writes_every_row(tmp_path):
    if not FIXTURE.is_file() and os.environ.get("ANOMALYMOE_REQUIRE_FIXTURES") != "1":
        pytest.skip(f"the script's parity step needs {FIXTURE}; set ANOMALYMOE_FIXTURES")
    env = {**os.environ, "PYTHON": sys.executable, "GPU_BENCH_OUT": str(tmp_path / "run"),
           "PYTHONPATH": str(ROOT), "ANOMALYMOE_FIXTURES": str(FIXTURE.parent)}
    env.pop("BENCHMARKS_FILE", None)
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--dry-run"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = (tmp_path / "run" / "BENCHMARKS.md").read_text()  # the dry run never writes the project's file
    rows = [line for line in text.splitlines() if line.startswith("| 20")]
    assert all("| gpu_dry_run |" in row and "| random |" in row for row in rows)
    measurements = [row.split(" | ")[6] for row in rows]
    assert "| inference, ours | 1 |" in text and "| inference, ours | 2 |" in text and "| inference, original | 2 |" in text
    assert measurements.count("training step, ours") == 2 and measurements.count("training step, original") == 1
    assert "| bf16 | cl |" in text and "| fp32 | no |" in text
    training = next(row for row in rows if "training run, run.py, 10 steps" in row)
    assert "FAILED" not in training and "mode=test on last.ckpt: image AUROC" in training
    bf16 = next(row for row in rows if "training run, run.py, 10 steps" in row and "| bf16 |" in row)
    assert "FAILED" not in bf16 and "mode=test on last.ckpt: image AUROC" in bf16
    decisions = next(row for row in rows if "bf16 autocast decisions" in row)
    assert "FAILED" not in decisions and "decisions differ from fp32" in decisions
    parity = next(row for row in rows if "parity test" in row)
    assert "1 passed" in parity and "FAILED" not in parity
    assert measurements[-1] == "benchmarks/gpu.sh, all steps"
    assert (tmp_path / "run" / "train" / "checkpoints" / "last.ckpt").is_file()
    assert (tmp_path / "run" / "test" / "results.json").is_file()


def test_gpu_script_refuses_unknown_arguments():
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--fast"], capture_output=True, text=True)
    assert done.returncode == 2 and "usage: benchmarks/gpu.sh [--dry-run]" in done.stderr


def _metrics(run: Path, losses: list[float]) -> None:
    (run / "csv").mkdir(parents=True)
    lines = ["epoch,step,train/loss"] + [f"0,{i},{v}" for i, v in enumerate(losses)]
    (run / "csv" / "metrics.csv").write_text("\n".join(lines) + "\n")


def _checks(monkeypatch, *argv: str) -> None:
    """``python benchmarks/gpu_checks.py *argv`` in this process."""
    monkeypatch.setattr(sys, "argv", ["gpu_checks.py", *argv])
    runpy.run_path(str(ROOT / "benchmarks" / "gpu_checks.py"), run_name="__main__")


def test_training_check_passes_a_falling_finite_run_and_reports_a_flat_one(tmp_path, monkeypatch):
    file = tmp_path / "BENCHMARKS.md"
    good, flat = tmp_path / "good", tmp_path / "flat"
    _metrics(good, [1.0, 0.9, 0.7, 0.5, 0.4])
    _metrics(flat, [0.5, 0.6, 0.5, float("nan"), 0.6])
    for run in (good, flat):
        (run / "checkpoints").mkdir()
        (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    (good / "results.json").write_text('{"mean": {"image_auroc": 0.75}}')
    _checks(monkeypatch, "training", "--file", str(file), "--train-dir", str(good), "--test-dir", str(good),
            "--steps", "5", "--require-falling")
    with pytest.raises(SystemExit, match="a loss is not finite; loss not falling"):
        _checks(monkeypatch, "training", "--file", str(file), "--train-dir", str(flat), "--test-dir", str(flat),
                "--steps", "5", "--require-falling")
    rows = [line for line in file.read_text().splitlines() if line.startswith("| 20")]
    assert "train/loss 1 (first 1) -> 0.4 (last 1)" in rows[0] and "image AUROC 0.750" in rows[0]
    assert "FAILED" not in rows[0]
    assert "FAILED: a loss is not finite; loss not falling" in rows[1] and "wrote no" in rows[1]


def test_failed_step_and_parity_rows(tmp_path, monkeypatch):
    file = tmp_path / "BENCHMARKS.md"
    _checks(monkeypatch, "failed", "--file", str(file), "--measurement", "mode=benchmark benchmark=gpu", "--rc", "1",
            "--log", "run.log")
    log = tmp_path / "parity.log"
    log.write_text("...F\n1 failed, 22 passed in 3.21s\n")
    with pytest.raises(SystemExit, match="parity test: 1 failed, 22 passed in 3.21s"):
        _checks(monkeypatch, "parity", "--file", str(file), "--log", str(log), "--rc", "1")
    text = file.read_text()
    assert "| mode=benchmark benchmark=gpu |" in text and "FAILED: exit status 1. see run.log" in text
    assert "FAILED: parity test: 1 failed, 22 passed in 3.21s (exit status 1)" in text
