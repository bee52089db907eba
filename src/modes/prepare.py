"""mode=prepare: convert downloaded datasets into the MVTec AD layout and check them.

``python run.py mode=prepare dataset=visa dataset.source=<download folder>`` writes the dataset
to ``dataset.root``; a second run finds it prepared and does nothing. Every dataset of the
config is handled (``dataset=[visa,ped2]``, with ``dataset.sources.<name>.source``); without a
source the root is only validated. Counts are compared with the published ones; the summary
(written, converted, skipped on purpose, warnings) is logged and saved as ``prepare.json``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

from data_modules.datamodule import AnomalyDataModule
from data_modules.prepare import prepare_dataset
from data_modules.types import DataError

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> float | None:
    datamodule: AnomalyDataModule = hydra.utils.instantiate(cfg.dataset)
    report, failed = {}, {}
    for name, module in datamodule.sources.items():
        source = datamodule.download_dirs.get(name)
        convert = getattr(module, "convert", None)
        if module.reads_source:  # read in place: nothing to convert, only checked
            datamodule.check_samples("fit", {name: module})
            counts = {split: len(module.samples(split)) for split in ("train", "test")}
            report[name] = {"root": str(module.root), "status": "read in place, checked", "counts": counts}
            print(f"{name}: {module.root} is read in place (nothing to prepare); checked {counts['train']} training "
                  f"and {counts['test']} test images", flush=True)
            continue
        try:
            if convert is None:  # generated data (demo): make it, then check it
                module.prepare_data()
            result = prepare_dataset(name, module.root, source, convert, getattr(module, "format", name),
                                     skip_bad=datamodule.skip_bad, max_pixels=datamodule.max_pixels)
            module.class_names()  # the configured classes exist
        except DataError as err:
            if len(datamodule.sources) == 1:
                raise
            failed[name] = str(err)  # the other datasets are still prepared
            log.error("%s: %s", name, err)
            continue
        report[name] = {
            "root": str(result.root),
            "status": result.status,
            "summary": result.summary.to_json() if result.summary else None,
            "warnings": result.validation.warnings,
            "notes": result.validation.notes,
            "counts": {c: {"train": k.train, "test": dict(k.test), "validation": dict(k.validation),
                           "masks": dict(k.masks)} for c, k in result.validation.counts.items()},
        }
        print("\n".join(result.lines()), flush=True)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "prepare.json").write_text(json.dumps(report, indent=1))
    warnings = sum(len(r.get("warnings", [])) for r in report.values())
    log.info("Prepared %d dataset(s), %d warning(s); summary in %s", len(report), warnings, out / "prepare.json")
    if failed:
        raise DataError(f"{len(failed)} of {len(datamodule.sources)} datasets could not be prepared:\n"
                        + "\n".join(f"  {name}: {error}" for name, error in failed.items()))
    return None
