"""Configs per mode: each ``mode=`` composes only the groups that mode reads (``conf/mode/*.yaml``)."""

from __future__ import annotations

import os
import pkgutil
import subprocess
import sys

import pytest
import yaml
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from tests.conftest import ROOT, compose_cfg

# Each group is read by its own mode only, but segment: training computes missing component masks
# with it (segment.on_first_use).
READERS = {"predict": {"predict"}, "segment": {"segment", "train"}, "benchmark": {"benchmark"}, "export": {"export"},
           "summarize": {"summarize"}}
MODE_GROUPS = tuple(READERS)
MODES = sorted(p.stem for p in (ROOT / "conf" / "mode").glob("*.yaml"))


def test_every_mode_module_has_a_mode_config():
    import src.modes

    modules = sorted(m.name for m in pkgutil.iter_modules(src.modes.__path__) if not m.name.startswith("_"))
    assert MODES == modules
    for mode in MODES:
        assert compose_cfg([f"mode={mode}"]).mode == mode


@pytest.mark.parametrize("overrides", [[], ["experiment=demo"], ["experiment=demo", "hparams_search=optuna"]])
def test_training_config_holds_no_settings_of_other_modes(overrides):
    cfg = compose_cfg(overrides)
    assert cfg.mode == "train"
    # What the run folder's config.yaml and the loggers' hyperparameters hold (src.tasks).
    params = OmegaConf.to_container(cfg, resolve=False)
    others = {g for g, modes in READERS.items() if "train" not in modes}
    assert not others & set(params), f"training config carries {others & set(params)}"
    assert params["segment"]["on_first_use"] == ("experiment=demo" in overrides)  # the demo segments on first use
    assert {"model", "module", "dataset", "trainer", "logger", "callbacks", "evaluation"} <= set(params)


@pytest.mark.parametrize("mode", MODES)
def test_each_mode_composes_its_own_group_only(mode):
    cfg = compose_cfg([f"mode={mode}", "experiment=demo"])
    assert {g for g in MODE_GROUPS if g in cfg} == {g for g, modes in READERS.items() if mode in modes}


def test_mode_settings_and_their_options():
    predict = compose_cfg(["mode=predict", "ckpt_path=a.ckpt", "predict.input=images", "predict.class_key=demo/widget"])
    assert predict.predict.input == "images" and predict.predict.class_key == "demo/widget" and predict.predict.heatmaps
    export = compose_cfg(["mode=export", "ckpt_path=a.ckpt", "paths.output_dir=out"])
    assert export.export.path == "out/model_final.pth"
    assert compose_cfg(["mode=benchmark"]).benchmark.name == "cpu_small"
    full = compose_cfg(["mode=benchmark", "benchmark=full", "benchmark.precision=bf16", "benchmark.channels_last=true"])
    assert (full.benchmark.name, full.benchmark.precision, full.benchmark.channels_last) == ("full", "bf16", True)
    segment = compose_cfg(["mode=segment", "dataset=visa", "segment.k=4", "segment.k_per_class={capsules:3}"])
    assert segment.segment.route == "cluster" and segment.segment.k == 4 and segment.segment.k_per_class == {"capsules": 3}
    assert segment.segment.blocks == segment.model.target_layers  # the model's component features
    summarize = compose_cfg(["mode=summarize", "summarize.dir=[runs/a,runs/b]"]).summarize
    assert list(summarize.dir) == ["runs/a", "runs/b"] and summarize.output is None
    sam = compose_cfg(["mode=segment", "segment=sam", "segment.sam_checkpoint=sam.pth"])
    assert sam.segment.route == "sam" and sam.segment.sam_checkpoint == "sam.pth" and sam.segment.refine.iterations == 3


def test_an_experiment_holds_settings_for_one_mode():
    """``experiment=demo`` brings its segment settings (experiment/demo/segment.yaml) to mode=segment,
    and to mode=train (experiment/demo/train.yaml: masks computed on first use); not to test."""
    plain = compose_cfg(["mode=segment"]).segment
    demo = compose_cfg(["mode=segment", "experiment=demo"])
    assert plain.k_per_class is None and plain.truth is None
    assert demo.segment.k_per_class == {"widget": 4} and demo.segment.truth == "components_true"
    assert demo.segment.image_size == 196 and demo.model.top_k == 6  # and the experiment's other settings
    sam = compose_cfg(["experiment=demo", "mode=segment", "segment=sam", "segment.features=color"]).segment
    assert sam.route == "sam" and sam.k_per_class == {"widget": 4} and sam.features == "color"
    train = compose_cfg(["experiment=demo"]).segment
    assert train.on_first_use and train.k_per_class == {"widget": 4} and train.image_size == 196
    assert "segment" not in compose_cfg(["experiment=demo", "mode=test"])


@pytest.mark.parametrize("override", ["segment.k=3", "segment=sam", "benchmark=full", "predict.input=x"])
def test_settings_of_another_mode_are_an_error(override):
    with pytest.raises(ConfigCompositionException):
        compose_cfg(["mode=test", override])  # mode=test composes no such group


def test_unknown_mode_lists_the_modes():
    with pytest.raises(ConfigCompositionException, match="(?s)Could not find 'mode/fit'.*benchmark.*train"):
        compose_cfg(["mode=fit"])


def test_command_line_resolves_a_mode_config(tmp_path):
    """``python run.py mode=segment experiment=demo`` composes and resolves as typed (Hydra's ``--cfg job``)."""
    env = dict(os.environ, HYDRA_FULL_ERROR="1")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), "mode=segment", "experiment=demo", f"paths.log_dir={tmp_path}",
         "--cfg", "job", "--resolve"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["mode"] == "segment" and cfg["segment"]["k_per_class"] == {"widget": 4}
    assert cfg["segment"]["output"] is None  # each dataset's own folder; the demo's: its segment_output
    assert cfg["dataset"]["sources"]["demo"]["segment_output"].endswith("data/components/demo")
    assert not {"predict", "benchmark", "export"} & set(cfg)
