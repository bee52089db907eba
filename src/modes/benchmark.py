"""mode=benchmark: our model against the original's computation structure (speed, memory)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from src.benchmark import BenchmarkSettings, append_to_benchmarks, format_report, ratios, run_benchmark
from src.models.anomalymoe import AnomalyMoE

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> float | None:
    bench = cfg.benchmark
    fields = set(BenchmarkSettings.__dataclass_fields__)
    settings = BenchmarkSettings(**{k: (tuple(v) if isinstance(v, list) else v)
                                    for k, v in OmegaConf.to_container(bench, resolve=True).items() if k in fields})
    model_cfg = OmegaConf.create(OmegaConf.to_container(cfg.model, resolve=True))  # not struct: deltas may add keys
    model_cfg = OmegaConf.merge(model_cfg, OmegaConf.to_container(bench.get("model") or {}, resolve=True))
    # Timing does not depend on the weights: the benchmark never downloads or reads them.
    model_cfg.backbone.weights = "random"

    def build_net(**overrides) -> AnomalyMoE:
        return hydra.utils.instantiate(OmegaConf.merge(model_cfg, overrides))

    results = run_benchmark(build_net, settings)
    report = format_report(results)
    print("\n" + report + "\n", flush=True)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark.md").write_text(report + "\n")
    (out / "benchmark.json").write_text(json.dumps({"ratios": ratios(results), "report": report}, indent=2))
    if bench.get("write", True):
        append_to_benchmarks(results, Path(bench.file))
        log.info("Appended a row to %s", bench.file)
    return ratios(results).get("inference_speedup_b8")
