"""Checkpoints users can trust: safe to open, self-describing, the final model in last.ckpt,
crash-safe writes, resuming from the newest checkpoint that loads, short user errors."""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from src.checkpoints import AtomicCheckpointIO, find_resume_checkpoint, read_checkpoint
from src.entry import run_task
from src.errors import ConfigError, user_error
from src.models.weight_formats import CheckpointError
from tests.conftest import ROOT, compose_cfg, small_demo_overrides
from tests.test_resume import one_thread  # noqa: F401  (autouse: one intra-op thread on a shared CPU)


def cli(*args: str, env: dict | None = None, cwd: Path = ROOT, timeout: int = 300) -> subprocess.CompletedProcess:
    environment = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    environment.pop("HYDRA_FULL_ERROR", None)
    environment.update(env or {})
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=timeout)


def train_overrides(root: Path, output_dir: Path, *extra: str) -> list[str]:
    """The demo at test size: 7 steps (checkpoints every 3: step 3, step 6, then last at step 7)."""
    return [*small_demo_overrides(root), "dataset.batch_size=4", "dataset.jitter=0", "trainer.max_steps=7",
            "callbacks.model_checkpoint.every_n_train_steps=3", "module.scheduler.warmup_steps=2",
            "trainer.log_every_n_steps=1", "evaluation.calibration.images_per_class=4",
            "+trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
            f"paths.output_dir={output_dir}", *extra]


def train(root: Path, output_dir: Path, *extra: str) -> float | None:
    return run_task(compose_cfg(train_overrides(root, output_dir, *extra)))


@pytest.fixture(scope="module")
def demo_run(small_demo_root, tmp_path_factory) -> Path:
    """A finished demo run (7 steps, tested)."""
    folder = tmp_path_factory.mktemp("run") / "demo"
    train(small_demo_root, folder)
    return folder


@pytest.fixture(scope="module")
def no_component_run(small_demo_root, tmp_path_factory) -> Path:
    """A run without component experts and top-4 routing, not tested."""
    folder = tmp_path_factory.mktemp("run") / "no_components"
    train(small_demo_root, folder, "model.num_component_experts=0", "model.top_k=4", "test_after_training=false",
          "dataset.component_masks=null")
    return folder


# --------------------------------------------------------------------------- 1. safe loading
class Payload:
    """Unpickling this writes a marker file: what a malicious checkpoint would do, harmlessly."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.fixture
def payload(demo_run, tmp_path) -> tuple[Path, Path]:
    """A checkpoint of the demo run carrying a pickle payload, and the marker it would write."""
    marker = tmp_path / "payload_ran"
    checkpoint = torch.load(demo_run / "checkpoints" / "last.ckpt", weights_only=True)
    checkpoint["extra"] = Payload(marker)
    path = tmp_path / "payload.ckpt"
    torch.save(checkpoint, path)
    return path, marker


def test_payload_checkpoint_is_refused_at_every_entry_point(small_demo_root, payload, tmp_path, caplog):
    path, marker = payload
    common = [*small_demo_overrides(small_demo_root), "logger=none"]
    for i, mode in enumerate(("test", "predict", "export", "train")):
        only_predict = [f"predict.input={small_demo_root}"] if mode == "predict" else []  # per-mode configs
        cfg = compose_cfg([*common, f"mode={mode}", f"ckpt_path={path}", *only_predict,
                           f"paths.output_dir={tmp_path / str(i)}"])
        with pytest.raises(CheckpointError, match=r"refusing to load ckpt_path=.*payload.ckpt.*could run code"):
            run_task(cfg)

    # Resuming: ckpt_path=last skips it with a warning; Lightning itself is only ever asked with weights_only=True.
    run_dir = tmp_path / "resume"
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copy(path, run_dir / "checkpoints" / "last.ckpt")
    with caplog.at_level(logging.WARNING):
        assert find_resume_checkpoint(run_dir) is None
    assert "skipping" in caplog.text and "last.ckpt" in caplog.text and "refusing to load" in caplog.text
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    with pytest.raises(Exception, match="Weights only load failed"):
        AtomicCheckpointIO().load_checkpoint(path, weights_only=True)
    assert isinstance(AtomicCheckpointIO(), TorchCheckpointIO)

    # Backbone weights and SAM checkpoints.
    cfg = compose_cfg([*common, "model.num_component_experts=0", f"model.backbone.weights={path}",
                       "test_after_training=false", f"paths.output_dir={tmp_path / 'backbone'}"])
    with pytest.raises(Exception) as raised:
        run_task(cfg)
    cause = user_error(raised.value)
    assert isinstance(cause, CheckpointError) and "refusing to load model.backbone.weights=" in str(cause)
    from src.segment.sam import load_sam

    with pytest.raises(CheckpointError, match="refusing to load segment.sam_checkpoint="):
        load_sam(str(path), "vit_b")
    assert not marker.exists(), "the payload ran"


def test_a_slurm_requeue_checkpoint_lightning_would_restore_is_read_safely_first(payload, tmp_path, monkeypatch):
    """Without ckpt_path, Lightning on SLURM restores the folder's newest hpc_ckpt by itself."""
    from types import SimpleNamespace

    from lightning.pytorch.plugins.environments import SLURMEnvironment

    from src.modes.train import check_slurm_restore

    path, marker = payload
    hpc = tmp_path / "hpc_ckpt_1.ckpt"
    shutil.copy(path, hpc)
    trainer = SimpleNamespace(_checkpoint_connector=SimpleNamespace(_hpc_resume_path=str(hpc)))
    check_slurm_restore(trainer, None)  # not on SLURM: Lightning does not restore it
    monkeypatch.setattr(SLURMEnvironment, "detect", staticmethod(lambda: True))
    with pytest.raises(CheckpointError, match=r"refusing to load SLURM requeue checkpoint=.*hpc_ckpt_1.ckpt.*move it out"):
        check_slurm_restore(trainer, None)
    check_slurm_restore(trainer, str(path))  # an explicit ckpt_path: Lightning restores that one
    assert not marker.exists()


def test_every_torch_load_is_weights_only():
    sources = [*ROOT.glob("src/**/*.py"), *ROOT.glob("callbacks/*.py"), *ROOT.glob("data_modules/**/*.py"),
               *ROOT.glob("benchmarks/*.py"), *ROOT.glob("tests/*.py"), ROOT / "run.py"]
    unsafe = [str(p.relative_to(ROOT)) for p in sources if "weights_only=" + "False" in p.read_text()]
    assert not unsafe


# --------------------------------------------------------------------------- 2. self-describing checkpoints
def test_checkpoint_describes_its_run(demo_run, no_component_run):
    checkpoint = read_checkpoint(demo_run / "checkpoints" / "last.ckpt")
    description = checkpoint.description
    assert description["model"]["top_k"] == 6 and description["model"]["backbone"]["arch_overrides"]["embed_dim"] == 64
    assert description["preprocessing"] == {"image_size": 84, "resize": 96, "mean": [0.485, 0.456, 0.406],
                                            "std": [0.229, 0.224, 0.225]}
    assert description["class_keys"] == ["demo/fabric", "demo/widget"]
    assert len(description["git"]["commit"]) == 40
    assert set(checkpoint.calibration.stats) == {"all", "demo/fabric", "demo/widget"}
    # Periodic checkpoints describe themselves too.
    step = read_checkpoint(no_component_run / "checkpoints" / "step_000003.ckpt")
    assert step.global_step == 3 and step.description["model"]["num_component_experts"] == 0


@pytest.mark.slow
def test_predict_needs_only_the_checkpoint_and_the_input(demo_run, small_demo_root, tmp_path):
    # A fresh project root: nothing but the defaults of conf/ (no experiment, no dataset, no model overrides).
    proc = cli("mode=predict", f"ckpt_path={demo_run / 'checkpoints' / 'last.ckpt'}",
               f"predict.input={small_demo_root / 'widget' / 'test'}", "predict.recursive=true",
               env={"ANOMALYMOE_ROOT": str(tmp_path)}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = (tmp_path / "logs").rglob("predictions.json")
    result = json.loads(result.read_text())
    assert result["num_scored"] == 12 and result["statistics"]["source"] == "checkpoint"
    assert result["checkpoint_step"] == 7


@pytest.fixture(scope="module")
def two_dataset_run(small_demo_root, tmp_path_factory) -> Path:
    """A run on the demo and a (fake) VisA, not tested."""
    from tests.test_datasets import fake_visa, prepared

    tmp = tmp_path_factory.mktemp("visa")
    prepared(tmp, "visa", fake_visa(tmp / "VisA"))
    folder = tmp / "run"
    run_task(compose_cfg([
        "experiment=demo", "dataset=[demo,visa]", f"dataset.sources.demo.root={small_demo_root}",
        "dataset.component_masks=null", "model.num_component_experts=0", "model.top_k=3",
        "+dataset.sources.demo.generate_size=96", "+dataset.sources.demo.num_train=8",
        "+dataset.sources.demo.num_test_good=4", "+dataset.sources.demo.num_test_defect=2",
        f"dataset.sources.visa.root={tmp / 'prepared'}", "dataset.image_size=56", "dataset.resize=64",
        "dataset.batch_size=4", "trainer.max_steps=2", "module.scheduler.warmup_steps=1", "test_after_training=false",
        "evaluation.calibration.images_per_class=2", "logger=none", f"paths.output_dir={folder}"]))
    return folder


@pytest.mark.parametrize("run", ["no_component_run", "two_dataset_run"])
def test_predict_on_other_checkpoints_needs_only_the_checkpoint_and_the_input(run, request, small_demo_root, tmp_path):
    ckpt = request.getfixturevalue(run) / "checkpoints" / "last.ckpt"
    run_task(compose_cfg(["mode=predict", f"ckpt_path={ckpt}", f"predict.input={small_demo_root / 'fabric' / 'test'}",
                          "predict.recursive=true", f"paths.output_dir={tmp_path}"]))
    result = json.loads((tmp_path / "predictions" / "predictions.json").read_text())
    assert result["num_scored"] == 8 and result["statistics"]["source"] == "checkpoint"
    keys = read_checkpoint(ckpt).description["class_keys"]
    assert keys == (["demo/fabric", "demo/widget", "visa/candle"] if run == "two_dataset_run"
                    else ["demo/fabric", "demo/widget"])


def test_test_mode_rebuilds_the_model_and_rejects_contradicting_overrides(demo_run, small_demo_root, tmp_path):
    ckpt = demo_run / "checkpoints" / "last.ckpt"
    data = [f"dataset.root={small_demo_root}", f"dataset.component_masks={small_demo_root}/components_true",
            "+dataset.generate_size=96", "+dataset.num_train=8", "+dataset.num_test_good=4", "+dataset.num_test_defect=2",
            "trainer=cpu", "logger=none"]
    # Only the data: the model (tiny, top-6) and the preprocessing (84 px) come from the checkpoint.
    cfg = compose_cfg([*data, "mode=test", f"ckpt_path={ckpt}", "model.dispatch=dense",
                       f"paths.output_dir={tmp_path / 'test'}"], hydra_node=True)
    value = run_task(cfg)
    report = json.loads((tmp_path / "test" / "results.json").read_text())
    trained = json.loads((demo_run / "results.json").read_text())
    assert value == pytest.approx(report["mean"]["image_auroc"]) == pytest.approx(trained["mean"]["image_auroc"])
    assert report["checkpoint"] == {"path": str(ckpt), "global_step": 7}
    assert cfg.dataset.image_size == 84 and cfg.model.dispatch == "dense"  # a runtime setting may differ

    cfg = compose_cfg([*data, "mode=test", f"ckpt_path={ckpt}", "model.top_k=1", "model.num_global_experts=3",
                       f"paths.output_dir={tmp_path / 'conflict'}"], hydra_node=True)
    with pytest.raises(ConfigError) as raised:
        run_task(cfg)
    message = str(raised.value)
    assert "model.top_k=1 but the checkpoint was trained with model.top_k=6" in message
    assert "model.num_global_experts=3 but the checkpoint was trained with model.num_global_experts=2" in message


# --------------------------------------------------------------------------- 3. last.ckpt, 5. resume
def metric_rows(folder: Path) -> list[dict]:
    with open(folder / "csv" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_last_checkpoint_is_the_final_model_and_resume_keeps_the_logs(demo_run, small_demo_root, tmp_path):
    checkpoints = demo_run / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt", "step_000003.ckpt", "step_000006.ckpt"]
    last = torch.load(checkpoints / "last.ckpt", weights_only=True)
    assert last["global_step"] == 7  # max_steps=7 is not a multiple of the interval (3)
    assert last["calibration"] == json.loads((demo_run / "calibration.json").read_text())
    assert json.loads((demo_run / "results.json").read_text())["checkpoint"] == {
        "path": str(checkpoints / "last.ckpt"), "global_step": 7}

    folder = tmp_path / "resumed"
    shutil.copytree(demo_run, folder)
    first = [row["step"] for row in metric_rows(folder) if row.get("train/loss")]
    train(small_demo_root, folder, "trainer.max_steps=9", "ckpt_path=last")
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == [
        "last.ckpt", "step_000003.ckpt", "step_000006.ckpt", "step_000009.ckpt"]  # no last-v1.ckpt
    assert torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 9
    assert json.loads((folder / "results.json").read_text())["checkpoint"]["global_step"] == 9
    steps = [row["step"] for row in metric_rows(folder) if row.get("train/loss")]
    assert steps[: len(first)] == first and len(steps) == len(first) + 2, "the first attempt's rows were lost"


def test_resuming_training_on_other_data_is_refused(demo_run, small_demo_root, tmp_path):
    folder = tmp_path / "resumed"
    shutil.copytree(demo_run, folder)
    other = tmp_path / "other"  # the same classes, one training image fewer
    shutil.copytree(small_demo_root, other)
    next((other / "fabric" / "train" / "good").glob("*.png")).unlink()
    for data, said in ((["dataset.classes=[fabric]"], "but this run reads classes demo/fabric (8 training images)"),
                       ([f"dataset.root={other}", f"dataset.component_masks={other}/components_true"],
                        "(15 training images), other images under the same class names")):
        with pytest.raises(ConfigError) as raised:
            train(small_demo_root, folder, "trainer.max_steps=9", "ckpt_path=last", *data)
        message = str(raised.value)
        assert "was trained on classes demo/fabric, demo/widget (16 training images)" in message and said in message
        assert "another paths.output_dir without ckpt_path" in message
    assert torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 7  # nothing trained


def test_resume_falls_back_past_damaged_checkpoints(demo_run, small_demo_root, tmp_path, caplog):
    folder = tmp_path / "crashed"
    shutil.copytree(demo_run, folder)
    (folder / "results.json").unlink()
    (folder / "checkpoints" / "last.ckpt").write_bytes(b"")  # what a crash during a non-atomic write left
    step6 = folder / "checkpoints" / "step_000006.ckpt"
    step6.write_bytes(step6.read_bytes()[: step6.stat().st_size // 2])
    with caplog.at_level(logging.WARNING):
        found = find_resume_checkpoint(folder)
    assert found.path.name == "step_000003.ckpt" and found.global_step == 3
    assert "last.ckpt" in caplog.text and "step_000006.ckpt" in caplog.text and "not a complete PyTorch file" in caplog.text


_WRITER = """
import sys, torch
from src.checkpoints import AtomicCheckpointIO
io = AtomicCheckpointIO()
state = {"state_dict": {"net.w": torch.randn(4_000_000)}, "global_step": 0}
step = 0
while True:
    step += 1
    state["global_step"] = step
    io.save_checkpoint(state, sys.argv[1])
    print(step, flush=True)
"""


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_write_leaves_a_loadable_file(tmp_path):
    """Kill the writer while it writes (its temporary file exists), TMPDIR on another folder
    (like a cluster's local disk); then the next save cleans up after it."""
    target = tmp_path / "run" / "checkpoints" / "last.ckpt"
    env = dict(os.environ, TMPDIR=str(tmp_path / "tmp"), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    (tmp_path / "tmp").mkdir()
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(target)], env=env, stdout=subprocess.PIPE, text=True)
    proc.stdout.readline()  # one complete checkpoint exists
    deadline = time.time() + 60
    while not list(target.parent.glob(".last.ckpt.*.tmp")) and time.time() < deadline:
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(target.parent.glob(".last.ckpt.*.tmp")), "the writer was not caught mid-write"
    checkpoint = read_checkpoint(target)
    assert checkpoint.global_step >= 1 and checkpoint.state_dict["net.w"].shape == (4_000_000,)
    assert find_resume_checkpoint(tmp_path / "run").path == target
    assert not [p for p in (tmp_path / "tmp").rglob("*") if p.is_file()], "nothing is staged in TMPDIR"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"net.w": torch.zeros(1)}, "global_step": 9}, target)
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"], "the killed writer's file is removed"


def test_a_full_disk_is_one_message_naming_the_folder_and_nothing_is_lost(tmp_path, monkeypatch):
    import errno

    import src.checkpoints

    target = tmp_path / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"net.w": torch.zeros(1)}, "global_step": 3}, target)

    def full_disk(obj, f):  # what torch.save does when the disk fills up
        f.write(b"partial")
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 768 vs 662") from None

    monkeypatch.setattr(src.checkpoints.torch, "save", full_disk)
    with pytest.raises(CheckpointError) as raised:
        AtomicCheckpointIO().save_checkpoint({"state_dict": {"net.w": torch.ones(1)}, "global_step": 6}, target)
    message = str(user_error(raised.value))
    assert f"no space left on the disk of {target.parent} (" in message and "MiB free" in message
    assert "ckpt_path=last" in message and "\n" not in message
    monkeypatch.undo()
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]
    assert read_checkpoint(target).global_step == 3


@pytest.mark.slow
def test_sigterm_writes_interrupted_checkpoint_and_exits_143(small_demo_root, tmp_path):
    folder = tmp_path / "run"
    args = [f"{o}" for o in train_overrides(small_demo_root, folder, "trainer.max_steps=1000",
                                            "callbacks.model_checkpoint.every_n_train_steps=1")]
    environment = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(ROOT / "run.py"), *args], cwd=ROOT, env=environment,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (folder / "checkpoints" / "step_000002.ckpt").exists():
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:] if proc.stderr else ""
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-3000:]
    interrupted = read_checkpoint(folder / "checkpoints" / "interrupted.ckpt")
    assert interrupted.global_step >= 2 and find_resume_checkpoint(folder).path == interrupted.path


# --------------------------------------------------------------------------- 6. errors early and short
def test_bad_ckpt_path_is_one_short_message_before_anything_is_built(tmp_path, capsys, monkeypatch):
    from src.entry import run_task_reporting_user_errors

    absent, random_bytes = tmp_path / "absent.ckpt", tmp_path / "random.ckpt"
    random_bytes.write_bytes(b"\x00random bytes" * 40)
    for ckpt, message in ((absent, "does not exist"), (random_bytes, "is not a complete PyTorch file")):
        cfg = compose_cfg(["experiment=demo", "mode=test", f"ckpt_path={ckpt}", f"paths.output_dir={tmp_path / ckpt.stem}"])
        with pytest.raises(SystemExit) as exited:
            run_task_reporting_user_errors(cfg)
        assert exited.value.code == 1
        assert f"Error: ckpt_path={ckpt} {message}" in capsys.readouterr().err
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")  # the traceback stays available
    with pytest.raises(FileNotFoundError):
        run_task_reporting_user_errors(compose_cfg(["mode=test", f"ckpt_path={absent}", f"paths.output_dir={tmp_path / 'full'}"]))


@pytest.mark.slow
def test_a_user_error_from_the_command_line_has_no_traceback(tmp_path):
    proc = cli("mode=test", f"ckpt_path={tmp_path / 'absent.ckpt'}", f"paths.output_dir={tmp_path / 'out'}")
    assert proc.returncode == 1 and f"Error: ckpt_path={tmp_path / 'absent.ckpt'} does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout and "Error executing job" not in proc.stderr
    assert "Backbone" not in proc.stdout + proc.stderr  # the (full-size) model was never built


def test_user_errors_are_found_behind_hydra_instantiation():
    from hydra.errors import InstantiationException

    try:
        try:
            raise CheckpointError("bad file")
        except CheckpointError as err:
            raise InstantiationException("Error in call to target") from err
    except InstantiationException as err:
        assert str(user_error(err)) == "bad file"
    assert user_error(RuntimeError("a bug")) is None


# --------------------------------------------------------------------------- 7. one calibration owner
def test_test_and_predict_compute_the_same_calibration(demo_checkpoint, small_demo_root, tmp_path):
    common = [*small_demo_overrides(small_demo_root), "logger=none", f"ckpt_path={demo_checkpoint}"]
    run_task(compose_cfg([*common, "mode=test", f"paths.output_dir={tmp_path / 'test'}"]))
    run_task(compose_cfg([*common, "mode=predict", f"predict.input={small_demo_root / 'widget' / 'test' / 'good'}",
                          f"paths.output_dir={tmp_path / 'predict'}"]))
    tested = json.loads((tmp_path / "test" / "calibration.json").read_text())
    predicted = json.loads((tmp_path / "predict" / "predictions" / "calibration.json").read_text())
    assert tested == predicted and set(tested["stats"]) == {"all", "demo/fabric", "demo/widget"}
