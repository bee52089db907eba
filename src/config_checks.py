"""Config values checked, and fitted to the machine, before anything heavy starts.

:func:`prepare_run` is called once at the start of every run. It

* checks every numeric value that can be wrong (batch sizes, image sizes and their divisibility
  by the backbone's patch size, fractions, expert counts and ``top_k``, steps) and raises one
  :class:`ConfigError` listing every problem with its key and fix;
* clamps ``model.top_k`` to the number of experts when ``model.num_component_experts=0`` makes
  it impossible (``top_k`` set for every expert, as the demo does), with a logged note;
* caps ``dataset.num_workers`` at the CPUs available to the process (minus the main process)
  and sets the main process's intra-op threads so that workers and main process together use
  the available cores once (both logged); an explicit ``OMP_NUM_THREADS`` is kept;
* silences library warnings known to be harmless here (:data:`HARMLESS_WARNINGS`);
* leaves the step progress bar out when ``trainer.enable_progress_bar=false``.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from numbers import Number

import torch
from omegaconf import DictConfig, open_dict

from data_modules.io import available_cpus
from src.errors import ConfigError

log = logging.getLogger(__name__)

MODES_WITH_MODEL = ("train", "test", "predict", "benchmark")

# (message regex, category, why it is harmless here)
HARMLESS_WARNINGS = (
    (r"'set_vital' is deprecated", UserWarning, "torchdata's StatefulDataLoader calls a deprecated torch function"),
    (r".*isinstance\(treespec, LeafSpec\)", Warning, "Lightning's pytree helper uses a deprecated torch check"),
    (r"Found \d+ module\(s\) in eval mode at the start of training", Warning,
     "the frozen DINOv2 encoder stays in eval mode on purpose"),
    (r"The number of training batches \(\d+\) is smaller than the logging interval", Warning,
     "training runs for trainer.max_steps across epochs; logging is per step"),
    (r"Using ModelCheckpoint with manual optimization and every_n_train_steps", Warning,
     "step_<n>.ckpt holds the weights after step n's update, which is what a resume from step n continues from"),
    (r"It is recommended to use `self.log\('(test|val)/", Warning,
     "test and validation metrics are computed from the predictions of every process (gathered), so each "
     "process logs the same value"),
)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _patch_size(model: DictConfig) -> int:
    found = re.search(r"patch(\d+)", str(model.get("backbone", {}).get("name", "")))
    return int(found.group(1)) if found else 14


def config_problems(cfg: DictConfig) -> list[str]:
    """Every problem of ``cfg``'s numeric values, as ``key=value: why; fix`` lines."""
    problems: list[str] = []

    def need(ok: bool, key: str, value, why: str) -> None:
        if not ok:
            problems.append(f"{key}={value}: {why}")

    data = cfg.get("dataset") or {}
    for key in ("batch_size", "test_batch_size"):
        if key in data:
            v = data[key]
            need(_is_int(v) and v >= 1, f"dataset.{key}", v, "use a whole number of images, 1 or more (e.g. 8)")
    if "num_workers" in data:
        v = data.num_workers
        need(_is_int(v) and v >= 0, "dataset.num_workers", v, "use 0 (load in the main process) or more")
    resize, crop = data.get("resize"), data.get("image_size")
    if resize is not None:
        need(_is_int(resize) and resize >= 1, "dataset.resize", resize, "use a size in pixels, e.g. 448")
    if crop is not None:
        need(_is_int(crop) and crop >= 1, "dataset.image_size", crop, "use a size in pixels, e.g. 392")
        if _is_int(crop) and _is_int(resize) and crop > resize:
            problems.append(f"dataset.image_size={crop}: larger than dataset.resize={resize}; use a crop of at most "
                            "the resized size")
    model = cfg.get("model") or {}
    size = crop if crop is not None else resize
    if cfg.get("mode", "train") in MODES_WITH_MODEL and model and _is_int(size) and size >= 1:
        patch = _patch_size(model)
        if size % patch:
            fits = [patch * (size // patch), patch * (size // patch + 1)]
            problems.append(f"dataset.image_size={size}: not a multiple of the backbone's {patch} px patches; use "
                            f"{fits[0] or fits[1]} or {fits[1]}")
    for key, low, high in (("val_fraction", 0.0, 1.0), ("jitter", 0.0, None)):
        if key in data:
            v = data[key]
            ok = isinstance(v, Number) and v >= low and (high is None or v < high)
            need(ok, f"dataset.{key}", v, f"use a number in [{low}, {high})" if high else f"use a number >= {low}")
    for name, source in (data.get("sources") or {}).items():
        if isinstance(source, DictConfig) and source.get("normal_test_fraction") is not None:
            v = source.normal_test_fraction
            need(isinstance(v, Number) and 0 <= v < 1, f"dataset.sources.{name}.normal_test_fraction", v,
                 "use a share in [0, 1), e.g. 0.2")
    if data.get("max_image_pixels") is not None:
        v = data.max_image_pixels
        need(_is_int(v) and v >= 1, "dataset.max_image_pixels", v, "use a number of pixels, e.g. 89478485")

    if model:
        counts = {}
        for key in ("num_patch_experts", "num_global_experts", "num_component_experts"):
            v = model.get(key, 0)
            need(_is_int(v) and v >= 0, f"model.{key}", v, "use 0 or more experts")
            counts[key] = v if _is_int(v) and v >= 0 else 0
        total, k = sum(counts.values()), model.get("top_k")
        if total == 0:
            problems.append("model: no experts (num_patch_experts + num_global_experts + num_component_experts = 0)")
        elif k is not None and not (_is_int(k) and 1 <= k <= total):
            problems.append(f"model.top_k={k}: must be between 1 and the number of experts ({total}); set "
                            f"model.top_k={min(max(int(k) if _is_int(k) else 1, 1), total)}")

    trainer = cfg.get("trainer") or {}
    if "max_steps" in trainer:
        v = trainer.max_steps
        need(_is_int(v) and (v >= 1 or v == -1), "trainer.max_steps", v, "use a number of steps, 1 or more")
    if "log_every_n_steps" in trainer:
        v = trainer.log_every_n_steps
        need(_is_int(v) and v >= 1, "trainer.log_every_n_steps", v, "use 1 or more")
    lr = (cfg.get("module") or {}).get("optimizer", {}).get("lr")
    if lr is not None:
        need(isinstance(lr, Number) and lr > 0, "module.optimizer.lr", lr, "use a positive learning rate, e.g. 5e-4")
    images = ((cfg.get("evaluation") or {}).get("calibration") or {}).get("images_per_class")
    if images is not None:
        need(_is_int(images) and images >= 1, "evaluation.calibration.images_per_class", images,
             "use 1 or more, or null for all")
    return problems


def clamp_top_k(cfg: DictConfig) -> None:
    """Without component experts, a ``top_k`` above the remaining experts becomes their number."""
    model = cfg.get("model")
    if not model or model.get("num_component_experts", 0) != 0 or not _is_int(model.get("top_k")):
        return
    rest = model.get("num_patch_experts", 0) + model.get("num_global_experts", 0)
    if _is_int(rest) and 1 <= rest < model.top_k:
        log.warning("model.top_k=%d is more than the %d experts left with model.num_component_experts=0: using "
                    "top_k=%d (every expert); set model.top_k to choose fewer", model.top_k, rest, rest)
        with open_dict(cfg):
            cfg.model.top_k = rest


def fit_to_machine(cfg: DictConfig, cpus: int | None = None) -> tuple[int, int]:
    """Cap ``dataset.num_workers`` and set the intra-op threads for ``cpus`` CPUs; returns
    (loader workers, threads of the main process)."""
    cpus = cpus or available_cpus()
    trainer = cfg.get("trainer") or {}
    devices = trainer.get("devices", 1)
    processes = devices if trainer.get("accelerator") == "cpu" and _is_int(devices) and devices > 1 else 1
    per_process = max(1, cpus // processes)
    data = cfg.get("dataset") or {}
    workers = data.get("num_workers", 0)
    if _is_int(workers) and workers > per_process - 1:
        capped = max(0, per_process - 1)
        log.info("dataset.num_workers=%d capped at %d: %d CPU(s) for %d process(es)", workers, capped, cpus, processes)
        with open_dict(cfg):
            cfg.dataset.num_workers = capped
        workers = capped
    threads = max(1, per_process - (workers if _is_int(workers) else 0))
    if os.environ.get("OMP_NUM_THREADS"):
        threads = torch.get_num_threads()
        log.info("intra-op threads: %d (OMP_NUM_THREADS), %d loader worker(s), %d CPU(s)", threads, workers, cpus)
    else:
        torch.set_num_threads(threads)
        log.info("intra-op threads: %d per process, %d loader worker(s), %d CPU(s)", threads, workers, cpus)
    return workers, threads


def silence_harmless_warnings() -> None:
    for message, category, _why in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


def prepare_run(cfg: DictConfig) -> None:
    """Check the config (one :class:`ConfigError` for all problems), then fit it to the machine."""
    clamp_top_k(cfg)
    if (cfg.get("trainer") or {}).get("enable_progress_bar") is False and "progress_bar" in (cfg.get("callbacks") or {}):
        with open_dict(cfg):  # Lightning refuses a progress-bar callback when bars are switched off
            del cfg.callbacks["progress_bar"]
    problems = config_problems(cfg)
    if problems:
        raise ConfigError(f"{len(problems)} config value(s) cannot work:\n" + "\n".join(f"  {p}" for p in problems))
    silence_harmless_warnings()
    fit_to_machine(cfg)
