"""Dataset configs: a few lines each, the loader settings shared through Hydra defaults."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from tests.conftest import ROOT, compose_cfg

DATASETS = sorted(p.stem for p in (ROOT / "conf" / "dataset").glob("*.yaml"))
LOADER = OmegaConf.load(ROOT / "conf" / "dataset" / "loader" / "default.yaml")


@pytest.mark.parametrize("dataset", DATASETS)
def test_dataset_configs_are_short_and_share_the_loader_settings(dataset):
    assert len((ROOT / "conf" / "dataset" / f"{dataset}.yaml").read_text().splitlines()) <= 15
    cfg = compose_cfg([f"dataset={dataset}", "paths.output_dir=/tmp/unused"]).dataset
    assert set(LOADER) <= set(cfg), "every dataset has every loader setting"
    assert cfg.sources and cfg._target_ == LOADER._target_


def test_the_last_dataset_of_a_list_sets_the_loader_values():
    cfg = compose_cfg(["dataset=[mvtec_ad,demo]", "paths.output_dir=/tmp/unused"]).dataset
    assert list(cfg.sources) == ["mvtec_ad", "demo"] and cfg.image_size == 168 and cfg.num_workers == 0


def test_every_source_names_a_registered_kind():
    from data_modules.sources import SOURCE_KINDS

    cfg = compose_cfg(["dataset=[all,demo,folder]", "paths.output_dir=/tmp/unused"]).dataset
    assert {s.kind for s in cfg.sources.values()} == set(SOURCE_KINDS)


def test_an_unknown_source_kind_lists_the_kinds():
    from data_modules.datamodule import AnomalyDataModule
    from data_modules.types import DataError

    with pytest.raises(DataError, match=r"kind='mvtech' is not a source kind; use one of \['bmad', 'demo', 'folder'"):
        AnomalyDataModule({"mine": {"kind": "mvtech", "root": "/tmp/unused"}})
