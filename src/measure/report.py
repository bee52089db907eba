"""The benchmark's report (a Markdown summary of one run of :func:`~src.measure.model_speed.run_benchmark`)
and its dated rows for the tables of ``BENCHMARKS.md``."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from src.measure.markdown import append_row
from src.measure.model_speed import INFERENCE_STEPS

MIB = 2**20


def ratios(results: dict) -> dict[str, float]:
    """Speedups and memory ratios of ours against the original (empty unless both were measured)."""
    inf, tr = results["inference"], results["training"]
    if not {"ours", "original"} <= set(tr):
        return {}
    out = {}
    for (structure, b), v in inf.items():
        if structure == "ours":
            out[f"inference_speedup_b{b}"] = inf[("original", b)]["seconds"] / v["seconds"]
            out[f"inference_memory_ratio_b{b}"] = v["peak_bytes"] / max(1, inf[("original", b)]["peak_bytes"])
    out["training_speedup"] = tr["original"]["seconds"] / tr["ours"]["seconds"]
    out["training_memory_ratio"] = tr["ours"]["peak_bytes"] / max(1, tr["original"]["peak_bytes"])
    second = tr.get("ours, original's estimator step")
    if second is not None:  # the part of the training speedup that the same-forward estimator gives
        out["training_speedup_same_forward_estimator"] = second["seconds"] / tr["ours"]["seconds"]
    return out


def format_report(results: dict) -> str:
    """The Markdown report of one benchmark run: per structure, tables of speed and memory, the ratios."""
    s = results["settings"]
    lines = [
        f"Benchmark `{s['name']}` on {results['device']} ({s['precision']}, {s['image_size']} px, "
        f"channels_last={s['channels_last']}, compile={s['compile_experts']})",
        "",
        "| structure | train s/step | train img/s | train peak MiB | "
        + " | ".join(f"infer b{b} img/s | infer b{b} peak MiB" for b in s["infer_batch_sizes"]) + " |",
        "|---" * (4 + 2 * len(s["infer_batch_sizes"])) + "|",
    ]
    for structure, tr in results["training"].items():
        cells = [f"{tr['seconds']:.3f}", f"{tr['images_per_s']:.1f}", f"{tr['peak_bytes'] / MIB:.0f}"]
        for b in s["infer_batch_sizes"]:
            v = results["inference"].get((structure, b))
            cells += [f"{v['images_per_s']:.1f}", f"{v['peak_bytes'] / MIB:.0f}"] if v else ["", ""]
        lines.append(f"| {structure} | " + " | ".join(cells) + " |")
    lines.append("")
    if ratios(results):
        lines.append("Ratios (ours vs original): " + ", ".join(f"{k} = {v:.2f}" for k, v in ratios(results).items()))
    if results["max_output_diff"]:
        diffs = ", ".join(f"b{b}: {d:.1e}" for b, d in results["max_output_diff"].items())
        lines.append(f"Largest output difference (maps, routing): {diffs}")
    lines.append("")
    if "steps" in results:
        steps = results["steps"]
        first = steps["original"]
        lines += [
            f"Inference at batch {steps['batch_size']}, one change at a time (cumulative):",
            "",
            "| structure | s/batch | speedup | peak MiB | memory ratio |",
            "|---|---|---|---|---|",
        ]
        for step in INFERENCE_STEPS:
            v = steps[step]
            lines.append(
                f"| {step} | {v['seconds']:.3f} | {first['seconds'] / v['seconds']:.2f}x | "
                f"{v['peak_bytes'] / MIB:.0f} | {v['peak_bytes'] / max(1, first['peak_bytes']):.2f} |"
            )
        lines.append("")
    ns = s["expert_scaling"]
    if ns:
        lines += [
            f"Inference seconds per batch of {s['scaling_batch_size']} vs experts per group (top-k fixed):",
            "",
            "| structure | " + " | ".join(f"{n}/{n}/{n}" for n in ns) + " |",
            "|---" * (len(ns) + 1) + "|",
        ]
        for structure in s["structures"]:
            lines.append(f"| {structure} | " + " | ".join(f"{results['scaling'][(structure, n)]:.3f}" for n in ns) + " |")
    return "\n".join(lines)


SUMMARY_SECTION = "## Model speed"
SUMMARY_INTRO = (
    "Rows appended by `python run.py mode=benchmark benchmark=<name> benchmark.write=true` (see "
    "`conf/benchmark/`). Speedups and memory ratios compare our model with the original's computation structure "
    "(dense experts, two encoder passes, an extra estimator forward per training step) in one process, same "
    "weights and inputs. Memory is the peak above the resident weights and inputs."
)
SUMMARY_HEADER = (
    "| date | benchmark | device | precision | train speedup | infer speedup b1 | infer speedup b8 | "
    "infer memory ratio b8 | ours train img/s | ours infer img/s b8 | max output diff |"
)

DETAILED_SECTION = "## Paper model on a GPU"
DETAILED_INTRO = (
    "Rows appended by `benchmarks/gpu.sh` (`python run.py mode=benchmark benchmark=gpu`, then a training run "
    "through `run.py`, `mode=test` on its checkpoint and the parity test on the GPU). Backbone weights are "
    "random (`model.backbone.weights=random`: no download on the GPU machine); speed and memory do not depend "
    "on them. Peak memory is the allocator's peak above the resident weights and inputs. \"speed options\": "
    "`compile` = `torch.compile` of every patch and global expert, `cl` = channels-last global experts."
)
DETAILED_HEADER = (
    "| date | benchmark | device | weights | precision | speed options | measurement | batch | images/s | "
    "peak MiB | notes |"
)


def append_to_benchmarks(results: dict, path: Path) -> None:
    """Add a dated summary row to the ``## Model speed`` table of ``path`` (created if needed)."""
    r = ratios(results)
    s = results["settings"]
    nan = float("nan")
    row = (
        f"| {dt.date.today().isoformat()} | {s['name']} | {results['device']} | {s['precision']} | "
        f"{r.get('training_speedup', nan):.2f}x | {r.get('inference_speedup_b1', nan):.2f}x | "
        f"{r.get('inference_speedup_b8', nan):.2f}x | {r.get('inference_memory_ratio_b8', nan):.2f} | "
        f"{results['training']['ours']['images_per_s']:.1f} | "
        f"{results['inference'].get(('ours', 8), {}).get('images_per_s', nan):.1f} | "
        f"{max(results['max_output_diff'].values(), default=nan):.1e} |"
    )
    append_row(path, SUMMARY_SECTION, SUMMARY_INTRO, SUMMARY_HEADER, row)


def detailed_row(benchmark: str, device: str, precision: str, accelerated: str, measurement: str, batch: int | str,
                 images_per_s: float | None, peak_bytes: int | None, notes: str = "", weights: str = "random") -> str:
    """One dated row of the ``## Paper model on a GPU`` table."""
    speed = "" if images_per_s is None else f"{images_per_s:.1f}"
    memory = "" if peak_bytes is None else f"{peak_bytes / MIB:.0f}"
    return (f"| {dt.date.today().isoformat()} | {benchmark} | {device} | {weights} | {precision} | {accelerated} | "
            f"{measurement} | {batch} | {speed} | {memory} | {notes} |")


def append_detailed_rows(results: dict, path: Path) -> None:
    """One row per measurement (inference per structure and batch size, training per structure)."""
    s = results["settings"]
    accelerated = " + ".join(n for n, on in (("compile", s["compile_experts"]), ("cl", s["channels_last"])) if on) or "no"
    common = (s["name"], results["device"], s["precision"], accelerated)
    r = ratios(results)
    rows = []
    for (structure, b), v in results["inference"].items():
        notes = f"{r[f'inference_speedup_b{b}']:.2f}x faster than original" if structure == "ours" and r else ""
        if structure == "ours" and b in results["max_output_diff"]:
            notes += f"{'; ' if notes else ''}max output diff {results['max_output_diff'][b]:.1e}"
        rows.append(detailed_row(*common, f"inference, {structure}", b, v["images_per_s"], v["peak_bytes"], notes))
    for structure, v in results["training"].items():
        notes = f"{r['training_speedup']:.2f}x faster than original" if structure == "ours" and r else ""
        if structure == "ours" and "training_speedup_same_forward_estimator" in r:
            notes += f"; {r['training_speedup_same_forward_estimator']:.2f}x from the same-forward estimator"
        rows.append(detailed_row(*common, f"training step, {structure}", s["train_batch_size"], v["images_per_s"],
                                 v["peak_bytes"], notes))
    for row in rows:
        append_row(path, DETAILED_SECTION, DETAILED_INTRO, DETAILED_HEADER, row)
