"""Per-class, per-dataset and overall results: ``results.json``, ``results.csv``, Markdown tables, routing.

Dataset numbers are unweighted means over the dataset's classes, the overall numbers the mean
over all classes (as the paper reports); undefined metrics (``None``) are left out of means and
the classes' notes say why.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from src.evaluation.calibration import GROUPS, Calibration
from src.evaluation.evaluator import PROTOCOLS, ClassEvaluation
from src.evaluation.metrics import IMAGE_METRICS, METRICS, image_metrics


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None and not math.isnan(v)]
    return sum(kept) / len(kept) if kept else None


def _dataset(key: str) -> str:
    return key.split("/")[0]


def expert_names(counts: Sequence[int]) -> list[str]:
    """``patch0 .. global0 .. component0 ..`` for (P, G, K) experts."""
    return [f"{group}{i}" for group, n in zip(GROUPS, counts) for i in range(n)]


def routing_summary(results: Mapping[str, ClassEvaluation], counts: Sequence[int]) -> dict:
    """Per class: fraction of images routed to each expert and mean routing weight per expert;
    per dataset: the mean total routing weight of each expert group over its images."""
    bounds = np.cumsum([0, *counts])
    classes, datasets = {}, {}
    for key, result in results.items():
        w = result.routing_weights.float()
        classes[key] = {"selected": (w > 0).float().mean(0).tolist(), "mean_weight": w.mean(0).tolist()}
        datasets.setdefault(_dataset(key), []).append(w)
    group_weight = {}
    for name, weights in datasets.items():
        w = torch.cat(weights)
        group_weight[name] = {g: float(w[:, bounds[i] : bounds[i + 1]].sum(1).mean()) for i, g in enumerate(GROUPS)}
        group_weight[name]["num_images"] = int(w.shape[0])
    return {"experts": expert_names(counts), "classes": classes, "group_weight": group_weight}


def per_defect_type(result: ClassEvaluation, defect_types: Sequence[str]) -> dict[str, dict]:
    """Image metrics of each anomalous type of a class against all its normal images (the
    MVTec convention); ``defect_types[i]`` is the type of test-set image ``i``."""
    kinds = [defect_types[int(i)] for i in result.sample_index]
    normal = ~result.labels.bool()
    out = {}
    for kind in sorted({k for k, n in zip(kinds, normal.tolist()) if not n}):
        sel = normal | torch.tensor([k == kind for k in kinds])
        metrics, notes = image_metrics(result.image_scores[sel], result.labels[sel])
        out[kind] = {**metrics, "num_anomalous": int((~normal & sel).sum()), **({"notes": notes} if notes else {})}
    return out


def _decision(result: ClassEvaluation, threshold: float) -> dict:
    """How the normal-data threshold does on the test set of a class."""
    anomalous = result.image_scores >= threshold
    labels = result.labels.bool()
    return {
        "threshold": threshold,
        "false_positive_rate": float(anomalous[~labels].float().mean()) if (~labels).any() else None,
        "true_positive_rate": float(anomalous[labels].float().mean()) if labels.any() else None,
    }


def build_report(
    results: Mapping[int, ClassEvaluation],
    class_keys: Sequence[str],
    protocol: str = "paper",
    expert_counts: Sequence[int] | None = None,
    calibration: Calibration | None = None,
    defect_types: Sequence[str] | None = None,
) -> dict:
    """The whole report as a JSON-ready dict (see README "Evaluation"); with ``defect_types``
    (the type of each test-set image) also each class's image metrics per defect type."""
    by_key = {class_keys[i] if i < len(class_keys) else str(i): results[i] for i in sorted(results)}
    classes = {}
    for key, result in by_key.items():
        classes[key] = {
            **{m: result.metrics.get(m) for m in METRICS},
            "num_images": int(result.labels.numel()),
            "num_anomalous": int(result.labels.sum()),
            **({"notes": result.notes} if result.notes else {}),
        }
        if defect_types is not None:
            classes[key]["defect_types"] = per_defect_type(result, defect_types)
        if protocol == "inductive" and calibration is not None and key in calibration.stats:
            classes[key]["decision"] = _decision(result, calibration.stats[key].threshold)
    datasets: dict[str, dict] = {}
    for name in sorted({_dataset(k) for k in classes}):
        members = [v for k, v in classes.items() if _dataset(k) == name]
        datasets[name] = {m: _mean([v[m] for v in members]) for m in METRICS}
        datasets[name]["num_classes"] = len(members)
    report = {
        "protocol": protocol,
        "protocol_description": PROTOCOLS.get(protocol, ""),
        "metrics": list(METRICS),
        "classes": classes,
        "datasets": datasets,
        "mean": {m: _mean([v[m] for v in classes.values()]) for m in METRICS},
    }
    if expert_counts is not None:
        report["routing"] = routing_summary(by_key, expert_counts)
    if calibration is not None:
        report["calibration"] = {"rule": calibration.rule, "quantile": calibration.quantile, "notes": calibration.notes,
                                 "thresholds": {k: s.threshold for k, s in calibration.stats.items()}}
    return report


def write_report(report: dict, output_dir: Path) -> list[Path]:
    """Write ``results.json`` and ``results.csv`` (one row per class, dataset and overall)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path = output_dir / "results.json"
    json_path.write_text(json.dumps(report, indent=2))
    csv_path = output_dir / "results.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["level", "name", *METRICS, "num_images", "protocol"])
        for key, values in report["classes"].items():
            writer.writerow(["class", key, *[values.get(m) for m in METRICS], values["num_images"], report["protocol"]])
        for key, values in report["datasets"].items():
            writer.writerow(["dataset", key, *[values.get(m) for m in METRICS], "", report["protocol"]])
        writer.writerow(["mean", "all", *[report["mean"].get(m) for m in METRICS], "", report["protocol"]])
    return [json_path, csv_path]


SCORE_COLUMNS = ("path", "class", "defect_type", "label", "score", "anomalous", "experts")


def score_row(
    path: str, class_key: str, score: float, anomalous: bool | None, routing: Sequence[float], names: Sequence[str],
    defect_type: str | None = None, label: int | None = None,
) -> dict:
    """One image's row of ``scores.csv`` / ``predictions.csv``: ``anomalous`` empty without a
    threshold (the paper's transductive protocol), ``label`` and ``defect_type`` empty for new
    images; ``experts`` lists the routed experts, ``weight_<expert>`` every expert's weight."""
    weights = [float(w) for w in routing]
    return {
        "path": path, "class": class_key, "defect_type": defect_type if defect_type is not None else "",
        "label": "" if label is None else int(label), "score": float(score),
        "anomalous": "" if anomalous is None else bool(anomalous),
        "experts": " ".join(n for n, w in zip(names, weights, strict=True) if w > 0),
        **{f"weight_{n}": round(w, 6) for n, w in zip(names, weights, strict=True)},
    }


def write_score_rows(rows: Sequence[dict], path: Path, names: Sequence[str]) -> Path:
    """``rows`` (:func:`score_row`) as a CSV file with the columns of :data:`SCORE_COLUMNS` and the expert weights."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, [*SCORE_COLUMNS, *(f"weight_{n}" for n in names)])
        writer.writeheader()
        writer.writerows(rows)
    return path


def rows_of_test_images(
    results: Mapping[int, ClassEvaluation], class_keys: Sequence[str], samples: Sequence, names: Sequence[str],
    thresholds: Mapping[str, float] | None = None,
) -> list[dict]:
    """One row per test image, in test-set order; ``samples[i]`` is the dataset's i-th sample
    (``image_path``, ``defect_type``, ``label``); ``thresholds`` per class key (inductive protocol)."""
    rows = []
    for cls, result in results.items():
        key = class_keys[cls] if cls < len(class_keys) else str(cls)
        threshold = None if thresholds is None else thresholds.get(key)
        for index, score, routing in zip(result.sample_index.tolist(), result.image_scores.tolist(),
                                         result.routing_weights, strict=True):
            sample = samples[index]
            rows.append((index, score_row(str(sample.image_path), key, score,
                                          None if threshold is None else score >= threshold, routing, names,
                                          sample.defect_type, sample.label)))
    return [row for _, row in sorted(rows, key=lambda r: r[0])]


def _fmt(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def markdown_tables(report: dict) -> str:
    """One Markdown table per dataset (class rows, metric columns, a mean row; values in %),
    then the mean routing weight of each expert group per dataset."""
    metrics = report["metrics"]
    blocks = []
    for name, means in report["datasets"].items():
        lines = [f"**{name}** (protocol: {report['protocol']})", "", "| class | " + " | ".join(metrics) + " |"]
        lines.append("|---" * (len(metrics) + 1) + "|")
        for key, values in report["classes"].items():
            if _dataset(key) == name:
                lines.append(f"| {key.split('/', 1)[-1]} | " + " | ".join(_fmt(values.get(m)) for m in metrics) + " |")
        lines.append("| **mean** | " + " | ".join(_fmt(means.get(m)) for m in metrics) + " |")
        blocks.append("\n".join(lines))
    by_type = [(key, kind, v) for key, c in report["classes"].items() for kind, v in c.get("defect_types", {}).items()]
    if any(len(c.get("defect_types", {})) > 1 for c in report["classes"].values()):
        lines = ["**image metrics per defect type** (each against all normal images of its class, %)", "",
                 "| class | defect type | " + " | ".join(IMAGE_METRICS) + " |", "|---" * (len(IMAGE_METRICS) + 2) + "|"]
        lines += [f"| {key} | {kind} | " + " | ".join(_fmt(v.get(m)) for m in IMAGE_METRICS) + " |"
                  for key, kind, v in by_type]
        blocks.append("\n".join(lines))
    if "routing" in report:
        lines = ["**mean routing weight per expert group** (%)", "", "| dataset | " + " | ".join(GROUPS) + " |",
                 "|---" * (len(GROUPS) + 1) + "|"]
        for name, weights in report["routing"]["group_weight"].items():
            lines.append(f"| {name} | " + " | ".join(_fmt(weights[g]) for g in GROUPS) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
