"""Checkpoints and reproducibility: SIGTERM mid-epoch + resume equals an uninterrupted run, and
two runs with the same seed give the same weights and metrics."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from lightning import Callback, seed_everything

from src.build import build_components
from src.checkpoints import find_resume_checkpoint
from tests.test_run import compose_cfg


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a shared, busy CPU two threads make these tiny steps ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def demo_overrides(root, output_dir, *extra: str) -> list[str]:
    """The demo at test size (``small_demo_root``): 16 training images, batches of 4 (4 steps an
    epoch), no colour jitter (a resumed run draws its jitter afresh)."""
    return [
        "experiment=demo", f"dataset.root={root}", f"dataset.component_masks={root}/components_true",
        "+dataset.generate_size=96", "+dataset.num_train=8", "+dataset.num_test_good=4", "+dataset.num_test_defect=2",
        "dataset.jitter=0",
        "dataset.image_size=56", "dataset.resize=64", "dataset.batch_size=4", "dataset.test_batch_size=8",
        "logger=none", f"paths.output_dir={output_dir}", "module.scheduler.warmup_steps=2",
        "trainer.log_every_n_steps=1", "+trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
        "~callbacks.progress_bar",  # run.py leaves it out itself (src.config_checks); these tests build directly
        *extra,
    ]


def fit(overrides: list[str], extra_callbacks=(), ckpt_path=None):
    cfg = compose_cfg(overrides)
    seed_everything(cfg.seed, workers=True)
    datamodule, module, trainer = build_components(cfg)
    trainer.callbacks.extend(extra_callbacks)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    return cfg, datamodule, module, trainer


class SigtermAt(Callback):
    """Sends this process SIGTERM after training step ``step``, like a cluster pre-emption."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def flat_state(obj, prefix="") -> dict:
    """Nested dicts/lists of tensors and numbers -> {path: value}."""
    if isinstance(obj, dict):
        return {k: v for key, value in obj.items() for k, v in flat_state(value, f"{prefix}{key}/").items()}
    if isinstance(obj, (list, tuple)):
        return {k: v for i, value in enumerate(obj) for k, v in flat_state(value, f"{prefix}{i}/").items()}
    return {prefix: obj}


def assert_same(a: dict, b: dict, what: str) -> None:
    fa, fb = flat_state(a), flat_state(b)
    assert fa.keys() == fb.keys(), f"{what}: keys differ"
    for key in fa:
        x, y = fa[key], fb[key]
        same = torch.equal(x, y) if torch.is_tensor(x) else x == y
        assert same, f"{what}: {key} differs"


@pytest.mark.slow
def test_sigterm_then_resume_equals_uninterrupted_run(small_demo_root, tmp_path):
    steps = 6  # 1.5 epochs: the interruption (step 3) and the resume fall mid-epoch
    _, _, reference, ref_trainer = fit(demo_overrides(small_demo_root, tmp_path / "ref", f"trainer.max_steps={steps}"))

    run_dir = tmp_path / "interrupted"
    overrides = demo_overrides(small_demo_root, run_dir, f"trainer.max_steps={steps}", "ckpt_path=last")
    with pytest.raises(SystemExit):  # Lightning's SIGTERMException, raised between two steps
        fit(overrides, [SigtermAt(3)])
    saved = run_dir / "checkpoints" / "interrupted.ckpt"
    assert torch.load(saved, map_location="cpu", weights_only=True)["global_step"] == 3

    assert find_resume_checkpoint(run_dir).path == saved
    _, _, resumed, trainer = fit(overrides, ckpt_path=saved)

    assert trainer.global_step == ref_trainer.global_step == steps
    assert_same(reference.state_dict(), resumed.state_dict(), "weights (experts, gate, CLUB estimator)")
    for ref_opt, opt in zip(ref_trainer.optimizers, trainer.optimizers, strict=True):
        assert_same(ref_opt.state_dict(), opt.state_dict(), f"{type(opt).__name__} state")
    assert_same(ref_trainer.lr_scheduler_configs[0].scheduler.state_dict(),
                trainer.lr_scheduler_configs[0].scheduler.state_dict(), "lr scheduler")
    assert reference.pair_rng.getstate() == resumed.pair_rng.getstate()
    assert not saved.exists(), "a finished fit removes the interruption checkpoint"


@pytest.mark.slow
def test_same_seed_same_weights_and_metrics(small_demo_root, tmp_path):
    results = []
    for run in ("a", "b"):
        overrides = demo_overrides(small_demo_root, tmp_path / run, "trainer.max_steps=3", "trainer.deterministic=true",
                                   "dataset.jitter=0.2")  # same seed, same jitter
        try:
            _, datamodule, module, trainer = fit(overrides)
            trainer.test(module, datamodule=datamodule, verbose=False)
        finally:
            torch.use_deterministic_algorithms(False)  # Lightning sets it process-wide
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()
                   if k.startswith("test/") and not k.endswith("images_per_s")}  # throughput: wall-clock
        results.append((module.state_dict(), metrics))
    assert results[0][1] and results[0][1] == results[1][1]
    assert_same(results[0][0], results[1][0], "weights of two runs with the same seed")


def test_resume_path_rules(tmp_path):
    assert find_resume_checkpoint(tmp_path) is None  # first try of a requeued job: nothing to resume yet
    (tmp_path / "checkpoints").mkdir()
    last = tmp_path / "checkpoints" / "last.ckpt"
    hpc = tmp_path / "hpc_ckpt_2.ckpt"
    for path in (last, hpc):
        torch.save({"state_dict": {"net.w": torch.zeros(1)}, "global_step": 2}, path)
    os.utime(last, (1, 1))  # the SLURM requeue checkpoint is newer
    assert find_resume_checkpoint(tmp_path).path == hpc
    # The furthest step wins, whatever the file times (a copy without -p gives them in any order).
    step = tmp_path / "checkpoints" / "step_000010.ckpt"
    torch.save({"state_dict": {"net.w": torch.zeros(1)}, "global_step": 10}, step)
    torch.save({"state_dict": {"net.w": torch.zeros(1)}, "global_step": 12}, last)
    os.utime(last, (1, 1))
    assert find_resume_checkpoint(tmp_path).path == last


class Numbers(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 37

    def __getitem__(self, index: int) -> dict:
        return {"image": torch.tensor(index)}


def batches(loader) -> list[list[int]]:
    return [b["image"].tolist() for b in loader]


@pytest.mark.parametrize(("before", "after"), [(0, 1), (1, 0), (1, 2)])
def test_training_loader_resumes_with_another_number_of_workers(before, after):
    """A requeued job on a machine with fewer CPUs (workers are capped at CPUs - 1) continues the
    epoch exactly: same images, same order."""
    from data_modules.dataset import make_loader

    torch.manual_seed(0)
    uninterrupted = batches(make_loader(Numbers(), 4, True, before))
    torch.manual_seed(0)
    loader = make_loader(Numbers(), 4, True, before)
    served = [b["image"].tolist() for _, b in zip(range(3), loader)]
    state = loader.state_dict()
    torch.manual_seed(1)  # the state decides, not the seed
    resumed = make_loader(Numbers(), 4, True, after)
    resumed.load_state_dict(state)
    assert served + batches(resumed) == uninterrupted


def test_training_loader_resumed_with_another_number_of_processes_starts_its_epoch_afresh(caplog):
    """One process -> DDP (Lightning puts a DistributedSampler in): the images are shared out
    differently, so the position cannot be continued; it must not crash inside torchdata."""
    from torch.utils.data import DistributedSampler

    from data_modules.dataset import TrainLoader, collate_samples, make_loader

    loader = make_loader(Numbers(), 4, True, 0)
    served = [b for _, b in zip(range(3), loader)]
    assert len(served) == 3
    state = loader.state_dict()

    def shard() -> TrainLoader:
        return TrainLoader(Numbers(), batch_size=4, sampler=DistributedSampler(Numbers(), 2, 0, seed=5),
                           collate_fn=collate_samples)

    resumed = shard()
    with caplog.at_level("WARNING"):
        resumed.load_state_dict(state)
    assert "saved by one process and this run has several" in caplog.text
    assert batches(resumed) == batches(shard())

    ddp = shard()  # and back: DDP -> one process
    served = [b for _, b in zip(range(2), ddp)]
    state = ddp.state_dict()
    torch.manual_seed(0)
    single = make_loader(Numbers(), 4, True, 0)
    single.load_state_dict(state)
    assert "saved by several processes and this run has one" in caplog.text
    resumed = batches(single)
    torch.manual_seed(0)
    assert resumed == batches(make_loader(Numbers(), 4, True, 0))
