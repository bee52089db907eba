"""Images per second in the training progress bar and logs, and once for the test."""

from __future__ import annotations

import pytest
import torch

from callbacks.throughput import Throughput


class _Module:
    device = torch.device("cpu")

    def __init__(self):
        self.logged, self.bar = {}, set()

    def log(self, name, value, prog_bar=False, **_):
        self.logged[name] = value
        if prog_bar:
            self.bar.add(name)

    def log_dict(self, values, **_):
        self.logged.update(values)


def test_training_rate_is_images_over_the_window_and_in_the_progress_bar(monkeypatch):
    clock = iter([0.0, 1.0, 2.0, 4.0, 8.0])
    monkeypatch.setattr("callbacks.throughput.time.perf_counter", lambda: next(clock))
    callback, module = Throughput(window=2), _Module()
    callback.on_train_start(None, module)  # t = 0
    for i, size in enumerate([4, 4, 4]):  # steps end at t = 1, 2, 4
        callback.on_train_batch_end(None, module, None, {"image": torch.zeros(size, 3, 2, 2)}, i)
    assert module.logged["train/images_per_s"] == pytest.approx(8 / 3)  # the last two steps: 8 images in 3 s
    assert "train/images_per_s" in module.bar and "train/peak_memory_mib" not in module.logged  # no CUDA here


def test_test_rate_counts_every_test_image(monkeypatch):
    clock = iter([10.0, 12.5])
    monkeypatch.setattr("callbacks.throughput.time.perf_counter", lambda: next(clock))
    callback, module = Throughput(), _Module()
    callback.on_test_epoch_start(None, module)
    for i, size in enumerate([3, 2]):
        callback.on_test_batch_end(None, module, None, {"image": torch.zeros(size, 3, 2, 2)}, i)
    callback.on_test_epoch_end(None, module)
    assert module.logged["test/images_per_s"] == pytest.approx(5 / 2.5)


def test_window_must_be_positive():
    with pytest.raises(ValueError, match="callbacks.throughput.window=0"):
        Throughput(window=0)


def test_the_run_config_has_the_callback():
    from tests.conftest import compose_cfg

    cfg = compose_cfg(["paths.output_dir=/tmp/x"])
    assert cfg.callbacks.throughput._target_ == "callbacks.throughput.Throughput"
