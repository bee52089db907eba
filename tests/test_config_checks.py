"""Config values checked before anything heavy, defaults fitted to the machine, the step progress bar."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from hydra.utils import instantiate

from src.config_checks import clamp_top_k, config_problems, fit_to_machine, prepare_run, silence_harmless_warnings
from src.errors import ConfigError
from tests.conftest import compose_cfg


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_every_bad_value_is_named_at_once(tmp_path):
    cfg = compose_cfg(["dataset=folder", "dataset.batch_size=-1", "dataset.image_size=100", "dataset.val_fraction=1.5",
                       "model.top_k=19", "dataset.sources.folder.normal_test_fraction=1", "trainer.max_steps=0",
                       f"paths.output_dir={tmp_path}"])
    with pytest.raises(ConfigError) as err:
        prepare_run(cfg)
    text = str(err.value)
    assert text.startswith("6 config value(s) cannot work")
    for key in ("dataset.batch_size=-1: use a whole number", "dataset.image_size=100: not a multiple of the backbone's "
                "14 px patches; use 98 or 112", "dataset.val_fraction=1.5", "model.top_k=19: must be between 1 and the "
                "number of experts (18); set model.top_k=18", "dataset.sources.folder.normal_test_fraction=1",
                "trainer.max_steps=0"):
        assert key in text, text


def test_the_default_configs_pass():
    assert config_problems(compose_cfg([])) == []
    assert config_problems(compose_cfg(["experiment=demo"])) == []


def test_a_bad_value_stops_the_run_before_anything_heavy(tmp_path):
    from src.entry import run_task

    cfg = compose_cfg(["experiment=demo", "dataset.batch_size=-1", f"paths.output_dir={tmp_path}",
                       f"paths.data_dir={tmp_path / 'data'}"])
    with pytest.raises(ConfigError, match=r"dataset.batch_size=-1"):
        run_task(cfg)
    assert not (tmp_path / "data").exists(), "nothing was generated or loaded"


def test_top_k_is_clamped_without_component_experts(caplog):
    cfg = compose_cfg(["experiment=demo", "model.num_component_experts=0"])
    assert cfg.model.top_k == 6
    clamp_top_k(cfg)
    assert cfg.model.top_k == 4 and "using top_k=4" in caplog.text
    assert config_problems(cfg) == []
    net = instantiate(cfg.model)
    assert net.top_k == 4
    with_components = compose_cfg(["experiment=demo", "model.top_k=7"])
    clamp_top_k(with_components)
    assert with_components.model.top_k == 7  # an impossible top_k with component experts is refused, not changed
    assert config_problems(with_components) == ["model.top_k=7: must be between 1 and the number of experts (6); set "
                                                "model.top_k=6"]


def test_loader_workers_and_threads_fit_the_cpus(monkeypatch, restore_threads, caplog):
    caplog.set_level(logging.INFO)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cfg = compose_cfg(["dataset=folder"])
    assert cfg.dataset.num_workers == 8
    assert fit_to_machine(cfg, cpus=2) == (1, 1)
    assert cfg.dataset.num_workers == 1 and torch.get_num_threads() == 1
    assert "dataset.num_workers=8 capped at 1" in caplog.text and "intra-op threads: 1" in caplog.text
    cfg = compose_cfg(["dataset=folder", "dataset.num_workers=2"])
    assert fit_to_machine(cfg, cpus=8) == (2, 6)
    cfg = compose_cfg(["dataset=folder", "trainer=ddp_sim"])  # two CPU processes share the cores
    assert fit_to_machine(cfg, cpus=4) == (1, 1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    assert fit_to_machine(compose_cfg(["dataset=demo"]), cpus=8) == (0, 1)  # an explicit setting is kept


def test_known_harmless_warnings_are_silenced():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        silence_harmless_warnings()
        warnings.warn("'set_vital' is deprecated, please do not call", UserWarning)
        warnings.warn("Found 277 module(s) in eval mode at the start of training.", UserWarning)
        warnings.warn("Using ModelCheckpoint with manual optimization and every_n_train_steps, but no "
                      "pre-optimization state was saved.", UserWarning)
        warnings.warn("something else", UserWarning)
    assert [str(w.message) for w in caught] == ["something else"]


def test_progress_bar_counts_steps_of_max_steps(tmp_path):
    from lightning import Trainer
    from lightning.pytorch.demos.boring_classes import BoringModel

    from callbacks.progress import StepProgressBar

    class Recording(StepProgressBar):
        shown: list[int] = []

        def _update(self, progress_bar_id, current, visible=True, hard=False):
            if progress_bar_id is not None and progress_bar_id == self.train_progress_bar_id:
                self.shown.append(current)
            super()._update(progress_bar_id, current, visible, hard)

    bar = Recording()
    trainer = Trainer(max_steps=5, max_epochs=-1, limit_train_batches=2, limit_val_batches=0, callbacks=[bar],
                      logger=False, enable_checkpointing=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(BoringModel())
    task = bar.progress.tasks[bar.train_progress_bar_id]
    assert task.description.startswith("Training steps")
    assert (task.completed, task.total) == (5, 5)
    assert len(bar.progress.tasks) == 1  # one bar over the three epochs
    assert bar.shown == sorted(bar.shown) and bar.shown[-1] == 5  # only forward (a right speed column)


def test_switched_off_progress_bar_leaves_the_callback_out(tmp_path):
    cfg = compose_cfg(["experiment=demo", "+trainer.enable_progress_bar=false", f"paths.output_dir={tmp_path}"])
    prepare_run(cfg)
    assert "progress_bar" not in cfg.callbacks
