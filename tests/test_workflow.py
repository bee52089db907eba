"""Research workflow: DDP on two CPU processes, multirun sweeps with offline W&B, sweep configs,
logger modes, validation split and export."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from data_modules.dataset import split_validation
from data_modules.types import Sample
from src.loggers import wandb_offline_by_default
from src.models.weight_formats import original_to_ours
from src.modes.export import export_original
from tests.conftest import ROOT, tiny_model
from tests.test_run import compose_cfg

SMALL_DEMO = ["+dataset.generate_size=96", "+dataset.num_test_good=4", "+dataset.num_test_defect=2",
              "dataset.image_size=56", "dataset.resize=64"]


def run_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python run.py ...`` with one intra-op thread per process (the CPU is shared)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.pop("WANDB_API_KEY", None)
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def net_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    return {k: v for k, v in state["state_dict"].items() if k.startswith("net.")} | {"step": state["global_step"]}


# --------------------------------------------------------------------------- DDP
@pytest.mark.slow
def test_ddp_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    """2 processes x 4 images = 1 process x 8 images, with every batch-coupled term switched off.

    Eight training images make every step see all of them, whatever the sampler. The terms that
    couple the images of one process's batch are off: ESB (importance of the batch-mean gate
    probabilities), EIR (random expert pairs and a shuffle per process), hard mining (threshold
    over the process's batch), the component loss (mean over the process's components), dropout
    and colour jitter (per-process random streams). What remains is a mean over images, which DDP's
    gradient averaging reproduces; weights agree to float rounding (measured 9e-7 after 4 steps).
    """
    common = [
        "experiment=demo", f"dataset.root={tmp_path / 'data'}", "+dataset.num_train=4", *SMALL_DEMO,
        "dataset.jitter=0", "dataset.component_masks=null", "model.num_component_experts=0", "module.loss.lambda_esb=0", "module.loss.lambda_eir=0",
        "module.loss.hard_mining_factor=1.0", "model.bottleneck_dropout=0", "model.ae_dropout=0",
        "model.component_dropout=0", "model.top_k=2", "trainer.max_steps=4", "module.scheduler.warmup_steps=2",
        "test_after_training=false", "logger=none", "callbacks.model_checkpoint.every_n_train_steps=1",
    ]
    run_cli(*common, "trainer=cpu", "dataset.batch_size=8", f"paths.output_dir={tmp_path / 'one'}")
    run_cli(*common, "trainer=ddp_sim", "dataset.batch_size=4", f"paths.output_dir={tmp_path / 'two'}")
    one = net_weights(tmp_path / "one" / "checkpoints" / "last.ckpt")
    two = net_weights(tmp_path / "two" / "checkpoints" / "last.ckpt")
    assert one.pop("step") == two.pop("step") == 4
    assert one.keys() == two.keys()
    gap = max((one[k] - two[k]).abs().max().item() for k in one)
    assert gap < 1e-5, f"DDP and single-process weights differ by {gap}"
    # Training moved the weights far beyond that tolerance (step 1 has lr 0: the initial weights).
    start = net_weights(tmp_path / "one" / "checkpoints" / "step_000001.ckpt")
    start.pop("step")
    assert max((one[k] - start[k]).abs().max().item() for k in one) > 1e-3


@pytest.mark.slow
def test_ddp_sim_trains_and_tests_with_the_csv_logger(tmp_path):
    """The project's CPU DDP config as a user runs it: CSV logger, test after training. The test
    names the final checkpoint and its step, and no process warns about unsynchronised metrics."""
    out = tmp_path / "run"
    proc = run_cli("experiment=demo", f"dataset.root={tmp_path / 'data'}", "+dataset.num_train=4", *SMALL_DEMO,
                   f"dataset.component_masks={tmp_path / 'data'}/components_true", "trainer=ddp_sim", "trainer.max_steps=2", "trainer.log_every_n_steps=1",
                   "dataset.batch_size=2", "module.scheduler.warmup_steps=1",
                   "evaluation.calibration.images_per_class=2",
                   "+trainer.enable_progress_bar=false", f"paths.output_dir={out}")
    report = json.loads((out / "results.json").read_text())
    assert report["checkpoint"] == {"path": str(out / "checkpoints" / "last.ckpt"), "global_step": 2}
    header = (out / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "train/loss" in header and "train/loss_epoch" in header and "test/image_auroc" in header
    output = proc.stdout + proc.stderr
    assert "sync_dist" not in output
    assert output.count("Saved the final model") <= 1


def test_csv_log_continues_a_file_another_process_wrote(tmp_path):
    """trainer=ddp_sim: the main process's writer exists before the training processes write
    ``metrics.csv`` with more columns; its test rows must keep theirs."""
    from src.loggers import AppendingCSVLogger

    main = AppendingCSVLogger(save_dir=str(tmp_path), name="csv", version="")
    main.experiment  # made before training, as Lightning does
    child = AppendingCSVLogger(save_dir=str(tmp_path), name="csv", version="")
    child.log_metrics({"train/loss": 1.0}, step=0)
    child.log_metrics({"train/loss_epoch": 0.5}, step=1)
    child.save()
    main.log_metrics({"test/image_auroc": 0.9}, step=1)
    main.save()
    with open(tmp_path / "csv" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["train/loss"] for r in rows] == ["1.0", "", ""]
    assert [r["train/loss_epoch"] for r in rows] == ["", "0.5", ""]
    assert [r["test/image_auroc"] for r in rows] == ["", "", "0.9"]


def test_keep_maps_0_writes_no_overlays(tmp_path):
    from types import SimpleNamespace

    from callbacks.overlays import AnomalyMapOverlays

    trainer = SimpleNamespace(test_dataloaders=SimpleNamespace(dataset=object()))
    AnomalyMapOverlays(str(tmp_path), num_images=0).on_test_end(trainer, SimpleNamespace(test_results={0: None}))
    assert not (tmp_path / "overlays").exists()


# --------------------------------------------------------------------------- multirun + W&B
def read_wandb_records(path: Path) -> list:
    """Records of an offline ``run-*.wandb`` file (LevelDB log format: 32 KiB blocks of
    [crc32, length, type] chunks after a 7-byte ':W&B' header)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, records, pending = path.read_bytes(), 7, [], b""
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    block = 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk = data[pos + 7 : pos + 7 + length]
        if kind == 0:
            break
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


@pytest.mark.slow
def test_multirun_sweep_on_the_demo_with_offline_wandb(tmp_path):
    """Two jobs (top_k 1 and 2), each validating on held-out images and logging to csv and W&B."""
    sweep_dir = tmp_path / "sweep"
    run_cli(
        "-m", "experiment=demo", "model.top_k=1,2", "logger=[csv,wandb]", "hparams_search=validation",
        f"dataset.root={tmp_path / 'data'}",
        f"dataset.component_masks={tmp_path / 'data' / 'components_true'}",
        "+dataset.num_train=4", *SMALL_DEMO, "dataset.batch_size=4", "trainer.max_steps=2",
        "trainer.log_every_n_steps=1", "module.scheduler.warmup_steps=2", f"hydra.sweep.dir={sweep_dir}",
    )
    for job, top_k in (("0", 1), ("1", 2)):
        job_dir = sweep_dir / job
        assert yaml.safe_load((job_dir / "config.yaml").read_text())["model"]["top_k"] == top_k
        report = json.loads((job_dir / "results.json").read_text())
        assert set(report["classes"]) == {"demo/fabric", "demo/widget"} and report["mean"]["image_auroc"] is not None
        # hparams_search=validation held out 30 % of each class's good and anomalous test images:
        # fabric 4 good + 4 anomalous -> 1 + 1, widget 4 + 8 -> 1 + 2; 20 - 5 are left for testing
        assert sum(c["num_images"] for c in report["classes"].values()) == 15

    # The offline W&B run of job 1, read back from its run folder.
    (run_file,) = (sweep_dir / "1" / "wandb").glob("offline-run-*/run-*.wandb")
    records = read_wandb_records(run_file)
    history = {item.key or "/".join(item.nested_key) for r in records if r.HasField("history") for item in r.history.item}
    for key in ("train/patch", "train/global", "train/component", "train/esb", "train/eir", "train/estimator",
                "train/lr", "train/grad_norm", "train/router_entropy", "train/load_patch0", "train/load_component1",
                "train/routing/demo/global1", "val/image_auroc", "test/results", "test/overlays/demo__fabric", "test/overlays/demo__widget"):
        # media (tables, images) are logged as nested keys: test/results/_type, ...
        assert key in history or f"{key}/_type" in history, f"{key} not logged; logged: {sorted(history)}"
    config = {u.key: json.loads(u.value_json) for r in records if r.HasField("config") for u in r.config.update}
    assert config["model"]["top_k"] == 2
    assert config["git"]["commit"] and len(config["git"]["commit"]) == 40
    files = run_file.parent / "files" / "media"
    table = json.loads(next(files.glob("table/test/results_*.table.json")).read_text())
    assert "image_auroc" in table["columns"] and any(row[1] == "demo/widget" for row in table["data"])
    assert len(list(files.glob("images/test/overlays/*.png"))) == 12  # 6 panels per class
    assert (sweep_dir / "1" / "csv" / "metrics.csv").is_file()  # csv alongside


# --------------------------------------------------------------------------- configs
SWEEP_CONFIGS = sorted(f"{p.parent.name}={p.stem}" for p in (ROOT / "sweep").glob("*/*.yaml"))


@pytest.mark.parametrize("choice", SWEEP_CONFIGS)
def test_sweep_configs_compose_from_sweep_folder(choice):
    cfg = compose_cfg(["experiment=demo", choice])
    hydra = cfg.hydra
    if choice.startswith("ablation="):
        assert hydra.sweeper.params and all(k.split(".")[0] in ("model", "module") for k in hydra.sweeper.params)
    if choice == "hparams_search=optuna":
        assert hydra.sweeper._target_.endswith("OptunaSweeper") and hydra.sweeper.direction == "maximize"
        assert cfg.optimized_metric == "val/image_auroc" and cfg.dataset.val_fraction > 0
    if choice == "cluster=slurm":
        assert hydra.launcher._target_.endswith("SlurmLauncher") and cfg.ckpt_path == "last"
        assert hydra.launcher.tasks_per_node == hydra.launcher.gpus_per_node == cfg.trainer.devices == 4


def test_wandb_sweep_parameters_are_valid_overrides():
    sweep = yaml.safe_load((ROOT / "sweep" / "wandb_sweep.yaml").read_text())
    assert "${args_no_hyphens}" in sweep["command"]
    fixed = [a for a in sweep["command"] if "=" in a]
    values = [f"{k}={v['values'][0] if 'values' in v else v['min']}" for k, v in sweep["parameters"].items()]
    cfg = compose_cfg(["experiment=demo", *fixed, *values])
    assert cfg.optimized_metric == sweep["metric"]["name"]
    assert cfg.logger.wandb.offline is False


@pytest.mark.parametrize(
    ("env", "offline"),
    [({}, True), ({"WANDB_API_KEY": "k"}, False), ({"WANDB_API_KEY": "k", "WANDB_MODE": "offline"}, True),
     ({"WANDB_MODE": "online"}, False), ({"WANDB_MODE": "disabled"}, True)],
)
def test_wandb_is_offline_unless_a_key_is_configured(monkeypatch, tmp_path, env, offline):
    for key in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "absent-netrc"))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert wandb_offline_by_default(None) is offline
    assert wandb_offline_by_default(True) is True


def test_wandb_login_in_netrc_counts_as_a_key(monkeypatch, tmp_path):
    netrc = tmp_path / "netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password secret\n")
    netrc.chmod(0o600)
    for key in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("NETRC", str(netrc))
    assert wandb_offline_by_default(None) is False


def test_validation_split_is_stratified_disjoint_and_deterministic():
    samples = [Sample(Path(f"{c}/{t}/{i}.png"), int(t != "good"), "test", t, "d", c)
               for c in ("a", "b") for t, n in (("good", 10), ("crack", 4)) for i in range(n)]
    val, test = split_validation(samples, 0.3)
    assert split_validation(samples, 0.3) == (val, test)
    assert {s.image_path for s in val}.isdisjoint(s.image_path for s in test) and len(val) + len(test) == len(samples)
    for c in ("a", "b"):
        assert sum(s.class_name == c and s.label == 0 for s in val) == 3
        assert sum(s.class_name == c and s.label == 1 for s in val) == 1
    assert split_validation(samples, 0.0) == ([], samples)


def test_export_writes_original_key_names(tmp_path):
    net = tiny_model()
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}, "global_step": 3}, ckpt)
    out = export_original(ckpt, tmp_path / "model_final.pth")
    exported = torch.load(out, weights_only=True)
    assert "encoder.register_tokens" in exported and "encoder.pos_embed" in exported
    assert not any(k.startswith(("net.", "encoder.vit.", "estimator.")) for k in exported)
    back = original_to_ours(exported)
    assert back.keys() == net.state_dict().keys()
    for key, value in net.state_dict().items():
        torch.testing.assert_close(back[key], value)


def test_tensorboard_logger_writes_event_files(tmp_path):
    from hydra.utils import instantiate

    cfg = compose_cfg(["logger=tensorboard", f"paths.output_dir={tmp_path}"])
    logger = instantiate(cfg.logger.tensorboard)
    logger.log_metrics({"train/loss": 1.0}, step=0)
    logger.finalize("success")
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
