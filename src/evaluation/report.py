"""Per-class, per-dataset and overall results: ``results.json``, ``results.csv`` and a Markdown table."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from src.evaluation.evaluator import ClassEvaluation


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None and not math.isnan(v)]
    return sum(kept) / len(kept) if kept else None


def build_report(results: Mapping[int, ClassEvaluation], class_keys: Sequence[str], protocol: str = "paper") -> dict:
    """``{"protocol", "classes": {"<dataset>/<class>": metrics}, "datasets": {name: means}, "mean": means}``.

    Dataset numbers are unweighted means over its classes, the overall number the mean over
    classes (as the paper reports); undefined metrics (``None``) are left out of means.
    """
    classes = {}
    for index in sorted(results):
        result = results[index]
        key = class_keys[index] if index < len(class_keys) else str(index)
        classes[key] = {
            **result.metrics,
            "num_images": int(result.labels.numel()),
            "num_anomalous": int(result.labels.sum()),
            **({"notes": result.notes} if result.notes else {}),
        }
    metric_names = sorted({m for r in results.values() for m in r.metrics})
    datasets: dict[str, dict] = {}
    for name in sorted({k.split("/")[0] for k in classes}):
        members = [v for k, v in classes.items() if k.split("/")[0] == name]
        datasets[name] = {m: _mean([v.get(m) for v in members]) for m in metric_names}
        datasets[name]["num_classes"] = len(members)
    overall = {m: _mean([v.get(m) for v in classes.values()]) for m in metric_names}
    return {"protocol": protocol, "classes": classes, "datasets": datasets, "mean": overall}


def write_report(report: dict, output_dir: Path) -> list[Path]:
    """Write ``results.json`` and ``results.csv`` (one row per class, dataset and overall)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path = output_dir / "results.json"
    json_path.write_text(json.dumps(report, indent=2))
    metrics = sorted(report["mean"])
    csv_path = output_dir / "results.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["level", "name", *metrics, "protocol"])
        for key, values in report["classes"].items():
            writer.writerow(["class", key, *[values.get(m) for m in metrics], report["protocol"]])
        for key, values in report["datasets"].items():
            writer.writerow(["dataset", key, *[values.get(m) for m in metrics], report["protocol"]])
        writer.writerow(["mean", "all", *[report["mean"].get(m) for m in metrics], report["protocol"]])
    return [json_path, csv_path]


def markdown_tables(report: dict) -> str:
    """One Markdown table per dataset: class rows, metric columns, a mean row."""
    metrics = sorted(report["mean"])

    def fmt(value) -> str:
        return "n/a" if value is None else f"{100 * value:.1f}"

    blocks = []
    for name, means in report["datasets"].items():
        lines = [f"**{name}** (protocol: {report['protocol']})", "", "| class | " + " | ".join(metrics) + " |"]
        lines.append("|---" * (len(metrics) + 1) + "|")
        for key, values in report["classes"].items():
            if key.split("/")[0] == name:
                lines.append(f"| {key.split('/', 1)[1]} | " + " | ".join(fmt(values.get(m)) for m in metrics) + " |")
        lines.append("| **mean** | " + " | ".join(fmt(means.get(m)) for m in metrics) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
