"""benchmarks/gpu.sh in its dry run (CPU, tiny model): every step runs and writes its rows."""

from __future__ import annotations

import os
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
    assert "FAILED" not in training and "last.ckpt loaded by mode=test" in training
    parity = next(row for row in rows if "parity test" in row)
    assert "1 passed" in parity and "FAILED" not in parity
    assert measurements[-1] == "benchmarks/gpu.sh, all steps"
    assert (tmp_path / "run" / "train" / "checkpoints" / "last.ckpt").is_file()
    assert (tmp_path / "run" / "test" / "results.json").is_file()


def test_gpu_script_refuses_unknown_arguments():
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--fast"], capture_output=True, text=True)
    assert done.returncode == 2 and "usage: benchmarks/gpu.sh [--dry-run]" in done.stderr
