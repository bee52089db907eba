"""mode=benchmark: our model against the original's computation structure (speed, memory).

The measuring code lives in :mod:`src.measure`; this mode builds the configured model
(random backbone weights: timing does not depend on them, and nothing is downloaded), runs the
preset's variants (``benchmark.variants``: e.g. fp32 and bf16, with and without compiled
experts) one after the other, prints the reports and writes them to the run folder
(``benchmark.md``, ``benchmark.json``, brought up to date after each variant). With
``benchmark.write=true`` it also appends dated rows to ``benchmark.file`` (``BENCHMARKS.md``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from src.measure.model_speed import BenchmarkSettings, run_benchmark
from src.measure.report import append_detailed_rows, append_to_benchmarks, format_report, ratios
from src.models.anomalymoe import AnomalyMoE

log = logging.getLogger(__name__)

TABLES = ("summary", "detailed")


def settings_from_config(bench: dict) -> list:
    """One ``BenchmarkSettings`` per entry of ``variants`` (each overrides the preset's values),
    or the preset itself without variants."""
    names = {f.name for f in dataclasses.fields(BenchmarkSettings)}
    base = {k: (tuple(v) if isinstance(v, list) else v) for k, v in bench.items() if k in names}
    variants = bench.get("variants") or [{}]
    for i, variant in enumerate(variants):
        unknown = sorted(set(variant) - names)
        if unknown:
            raise ValueError(f"benchmark.variants[{i}] has unknown keys {unknown}; known: {sorted(names)}")
    return [BenchmarkSettings(**{**base, **{k: (tuple(v) if isinstance(v, list) else v) for k, v in variant.items()}})
            for variant in variants]


def run(cfg: DictConfig) -> float | None:
    bench = OmegaConf.to_container(cfg.benchmark, resolve=True)
    table = bench.get("table", "summary")
    if table not in TABLES:
        raise ValueError(f"benchmark.table={table!r}: choose one of {TABLES}")
    all_settings = settings_from_config(bench)  # checks every variant before the first measurement
    model_cfg = OmegaConf.create(OmegaConf.to_container(cfg.model, resolve=True))  # not struct: deltas may add keys
    model_cfg = OmegaConf.merge(model_cfg, bench.get("model") or {})
    # Timing does not depend on the weights: the benchmark never downloads or reads them.
    model_cfg.backbone.weights = "random"

    def build_net(net_class: type[AnomalyMoE], **options) -> AnomalyMoE:
        return hydra.utils.instantiate(model_cfg, **options, _target_=f"{net_class.__module__}.{net_class.__qualname__}")

    def build_module(net: AnomalyMoE, **module_options):
        # The run's loss weights and optimisers; the speed options are the benchmark's own.
        return hydra.utils.instantiate(cfg.module, net=net, compile_experts=False, channels_last=False,
                                       **module_options)

    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    reports, metric = [], None
    for settings in all_settings:
        results = run_benchmark(build_net, settings, build_module)
        report = format_report(results)
        print("\n" + report + "\n", flush=True)
        reports.append({"ratios": ratios(results), "report": report})
        # After every variant: a run stopped at its time limit keeps the reports of those that finished.
        (out / "benchmark.md").write_text("\n\n".join(r["report"] for r in reports) + "\n")
        (out / "benchmark.json").write_text(json.dumps(reports if len(reports) > 1 else reports[0], indent=2))
        if bench.get("write", False):
            (append_detailed_rows if table == "detailed" else append_to_benchmarks)(results, Path(bench["file"]))
            log.info("Appended rows to %s", bench["file"])
        metric = metric if metric is not None else ratios(results).get("inference_speedup_b8")
    log.info("Report written to %s and %s", out / "benchmark.md", out / "benchmark.json")
    return metric
