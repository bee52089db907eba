"""The Hydra entry point: config composition, errors for absent data, and end-to-end runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from PIL import Image

from data_modules.types import DataError
from src.evaluation.metrics import METRICS
from src.models.weight_formats import ours_to_original
from tests.conftest import ROOT, small_demo_overrides

CONF = str(ROOT / "conf")
EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))
DATASETS = sorted(p.stem for p in (ROOT / "conf" / "dataset").glob("*.yaml"))


def compose_cfg(overrides: list[str]):
    os.environ.setdefault("ANOMALYMOE_ROOT", str(ROOT))
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiments_compose(experiment):
    cfg = compose_cfg([f"experiment={experiment}"])
    assert cfg.model._target_ and cfg.dataset._target_ and cfg.trainer.max_steps > 0


@pytest.mark.parametrize("dataset", [d for d in DATASETS if d not in ("demo", "all")])
def test_absent_dataset_names_path_and_source(dataset, tmp_path):
    cfg = compose_cfg([f"dataset={dataset}", "model.top_k=3", f"dataset.root={tmp_path / 'absent'}"])
    assert cfg.model.top_k == 3
    datamodule = instantiate(cfg.dataset)
    with pytest.raises(DataError, match=r"absent.*(Download|download)"):
        datamodule.setup()


def test_several_datasets_need_a_root_each(tmp_path):
    from hydra.errors import InstantiationException

    cfg = compose_cfg(["dataset=all", f"dataset.root={tmp_path}"])
    with pytest.raises(InstantiationException, match=r"dataset.sources.mvtec_ad.root, .*dataset.sources.visa.root"):
        instantiate(cfg.dataset)
    cfg = compose_cfg(["dataset=all", *[f"dataset.sources.{name}.root={tmp_path / 'absent'}" for name in cfg.dataset.sources]])
    with pytest.raises(DataError, match=r"absent.*(Download|download)"):
        instantiate(cfg.dataset).setup()


def run_cli(*overrides: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), *overrides], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.mark.slow
def test_demo_train_test_and_original_checkpoint(small_demo_root, tmp_path):
    common = [*small_demo_overrides(small_demo_root), "dataset.batch_size=4", "trainer.max_steps=4",
              "trainer.log_every_n_steps=1"]
    train_dir = tmp_path / "train"
    proc = run_cli(*common, f"paths.output_dir={train_dir}")
    report = json.loads((train_dir / "results.json").read_text())
    assert set(report["classes"]) == {"demo/fabric", "demo/widget"}
    assert report["protocol"] == "paper" and report["mean"]["image_auroc"] is not None
    assert set(report["metrics"]) == set(METRICS) and all(report["mean"][m] is not None for m in METRICS)
    assert "| class | image_auroc | image_ap |" in proc.stdout and "| fabric |" in proc.stdout
    assert "| **mean** |" in proc.stdout and "mean routing weight per expert group" in proc.stdout
    csv_rows = (train_dir / "results.csv").read_text().splitlines()
    assert csv_rows[0].startswith("level,name,image_auroc") and len(csv_rows) == 1 + 2 + 1 + 1
    assert (train_dir / "config.yaml").is_file() and (train_dir / "routing.png").is_file()
    assert len(report["routing"]["classes"]["demo/widget"]["selected"]) == 6
    overlays = sorted((train_dir / "overlays" / "demo__widget").glob("*.png"))
    assert len(overlays) == 6 and Image.open(overlays[0]).size == (4 * 256, 256)  # image, gt, heat, predicted mask
    calibration = json.loads((train_dir / "calibration.json").read_text())
    assert torch.load(train_dir / "checkpoints" / "last.ckpt", weights_only=True)["calibration"] == calibration
    assert report["checkpoint"] == {"path": str(train_dir / "checkpoints" / "last.ckpt"), "global_step": 4}
    metrics = (train_dir / "csv" / "metrics.csv").read_text()
    for column in ("train/patch", "train/global", "train/component", "train/esb", "train/eir", "train/estimator",
                   "train/images_per_s", "test/images_per_s"):
        assert column in metrics

    # What a newcomer reads: each line once, no product tips, parts and parameters rather than a
    # FLOPs count of 0, the backbone named by what it is (the demo's 64-dim ViT, not timm's ViT-B name).
    console = proc.stdout + proc.stderr
    assert "Tip" not in console and "litlogger" not in console and "TPU available" not in console
    assert "FLOPs" not in console and console.count("`Trainer.fit` stopped") == 1
    assert "| net.encoder | ViT of 12 blocks, 64 dims, 2 heads, 14 px patches, 4 registers" in console
    assert "| net.patch_experts | 2 x PatchExpert |" in console and "| estimator | CLUBEstimator |" in console
    assert ("Backbone (ViT of 12 blocks, 64 dims, 2 heads, 14 px patches, 4 registers, positions for 518 px, timm's "
            "vit_base_patch14_reg4_dinov2 changed by model.backbone.arch_overrides) uses RANDOM weights") in console

    # The Lightning checkpoint reproduces the numbers.
    ckpt = train_dir / "checkpoints" / "last.ckpt"
    test_dir = tmp_path / "test"
    run_cli(*common, "mode=test", f"ckpt_path={ckpt}", f"paths.output_dir={test_dir}")
    assert json.loads((test_dir / "results.json").read_text())["classes"] == report["classes"]

    # The inductive protocol uses the checkpoint's calibration and reports the threshold's rates.
    inductive_dir = tmp_path / "inductive"
    run_cli(*common, "mode=test", f"ckpt_path={ckpt}", "evaluation.protocol=inductive",
            f"paths.output_dir={inductive_dir}")
    inductive = json.loads((inductive_dir / "results.json").read_text())
    assert inductive["protocol"] == "inductive" and not (inductive_dir / "calibration.json").exists()
    decision = inductive["classes"]["demo/widget"]["decision"]
    assert decision["threshold"] == calibration["stats"]["demo/widget"]["threshold"]
    assert 0 <= decision["false_positive_rate"] <= 1 and 0 <= decision["true_positive_rate"] <= 1

    # So does the same network saved with the original's key names (like model_final.pth).
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    net = {k[len("net."):]: v for k, v in state.items() if k.startswith("net.")}
    original = tmp_path / "model_final.pth"
    torch.save({f"module.{k}": v for k, v in ours_to_original(net).items()}, original)
    orig_dir = tmp_path / "original"
    run_cli(*common, "mode=test", f"ckpt_path={original}", f"paths.output_dir={orig_dir}")
    assert json.loads((orig_dir / "results.json").read_text())["classes"] == report["classes"]


def test_test_mode_without_checkpoint_is_an_error(small_demo_root, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), "experiment=demo", "mode=test", f"dataset.root={small_demo_root}",
         f"paths.output_dir={tmp_path}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode != 0
    assert "mode=test needs ckpt_path" in proc.stderr
