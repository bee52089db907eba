"""Evaluation under two processes (trainer=ddp_sim) equals one process: every image counted once."""

from __future__ import annotations

import json
import shutil

import pytest

from src.entry import run_task
from tests.conftest import compose_cfg, small_demo_overrides
from tests.test_run import run_cli


@pytest.mark.slow
def test_two_process_evaluation_equals_one_process(small_demo_root, demo_checkpoint, tmp_path):
    # An odd number of test images (19) and of normal images (15): DistributedSampler pads each
    # with a repeated image, and classes are split across the processes.
    root = tmp_path / "demo"
    shutil.copytree(small_demo_root, root)
    (root / "fabric" / "test" / "good" / "000.png").unlink()
    (root / "widget" / "train" / "good" / "000.png").unlink()
    common = [*small_demo_overrides(root), "mode=test", f"ckpt_path={demo_checkpoint}", "evaluation.recalibrate=true",
              "dataset.test_batch_size=4", "logger=none"]
    run_task(compose_cfg([*common, "trainer=cpu", f"paths.output_dir={tmp_path / 'cpu'}"]))  # one process, here
    run_cli(*common, "trainer=ddp_sim", f"paths.output_dir={tmp_path / 'ddp_sim'}")  # two spawned processes
    reports = {t: json.loads((tmp_path / t / "results.json").read_text()) for t in ("cpu", "ddp_sim")}
    calibrations = {t: json.loads((tmp_path / t / "calibration.json").read_text()) for t in ("cpu", "ddp_sim")}

    one, two = reports["cpu"], reports["ddp_sim"]
    assert one["classes"]["demo/fabric"]["num_images"] == 7 and one["classes"]["demo/widget"]["num_images"] == 12
    for key, values in one["classes"].items():
        assert two["classes"][key]["num_images"] == values["num_images"]
        assert two["classes"][key]["num_anomalous"] == values["num_anomalous"]
        # Batches are composed differently in the two settings, so maps differ by float rounding
        # (~1e-7); a few pixels then change histogram bins.
        for metric in one["metrics"]:
            tolerance = 1e-6 if metric.startswith("image") else 1e-4
            assert two["classes"][key][metric] == pytest.approx(values[metric], abs=tolerance), (key, metric)
    for name, weights in one["routing"]["group_weight"].items():
        assert two["routing"]["group_weight"][name] == pytest.approx(weights)
    for key, stats in calibrations["cpu"]["stats"].items():
        other = calibrations["ddp_sim"]["stats"][key]
        assert other["num_images"] == stats["num_images"]
        assert other["threshold"] == pytest.approx(stats["threshold"], rel=1e-5)
        assert other["low"] == pytest.approx(stats["low"]) and other["high"] == pytest.approx(stats["high"])
    assert calibrations["cpu"]["stats"]["demo/widget"]["num_images"] == 7
    assert len(list((tmp_path / "ddp_sim" / "overlays" / "demo__widget").glob("*.png"))) == 6
