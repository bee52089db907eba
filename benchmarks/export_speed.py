"""The exported model (``mode=export``) on the CPU: onnxruntime against eager PyTorch, at batch 1
and batch 8, for the demo model and the paper-size model, with RANDOM weights (speed and memory do
not depend on them; the scores mean nothing).

For each model, in separate processes (so that each peak memory is that stage's own):

1. **checkpoint**: the model with random weights (nothing is trained), its part prototypes fitted
   by ``mode=segment``'s code with its own encoder on a small generated demo set, and the
   calibration computed on the normal training images (:meth:`src.module.AnomalyMoEModule.calibrate`),
   saved as a Lightning-format ``.ckpt``;
2. **export**: ``mode=export export.format=onnx`` on it, with its
   self-check (the parity figures come from its ``model.json``);
3. **memory**: for each runtime, a process that loads it and runs one batch of the largest size:
   its peak resident memory (and after loading);
4. **time**: for each batch size, one process with every runtime loaded, timed in interleaved
   rounds (a shared machine's changing load falls on all of them alike): median seconds per batch
   of ``--repeats`` rounds after ``--warmup`` runs. The runtimes get the same feed (demo test
   images, decoded and resized by :mod:`src.inference`); only the graph is timed (decoding and
   resizing are the same for all).

The runtimes: onnxruntime's CPU execution provider (``model.onnx``) and eager PyTorch: the wrapped module the exports trace (dense dispatch) and the
same module with sparse dispatch (the experts ``mode=predict`` runs with the checkpoint).

    python -m benchmarks.export_speed --models demo --repeats 10
    OMP_NUM_THREADS=2 python -m benchmarks.export_speed --models paper --repeats 3 --threads 2

``--stages`` runs part of it on a kept ``--workdir`` (the timing when the machine is quiet, say).
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
import os
import resource
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ["+dataset.generate_size=192", "+dataset.num_train=8", "+dataset.num_test_good=4", "+dataset.num_test_defect=1"]
MODELS = {
    "demo": ["experiment=demo", "evaluation.calibration.images_per_class=8"],
    "paper": ["model.backbone.weights=random", "trainer=cpu", "dataset.image_size=392", "dataset.resize=448",
              "evaluation.calibration.images_per_class=4"],
}
STAGES = ("checkpoint", "export", "memory", "time")
RUNTIMES = ("onnxruntime", "eager torch, dense", "eager torch, sparse")  # a .pt2 is not opened (src.inference.REFUSED)


def overrides(model: str, work: Path, *extra: str) -> list[str]:
    return [*MODELS[model], f"dataset.root={work / 'data'}", f"dataset.component_masks={work / model / 'components'}",
            *DATA, "logger=none", "seed=0", *extra]


def compose_config(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    os.environ.setdefault("ANOMALYMOE_ROOT", str(ROOT))
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def isolated(fn, *args):
    """``fn(*args)`` in a fresh process (its own peak memory)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


# --------------------------------------------------------------------------- stages (one process each)
def make_checkpoint(model: str, work: Path) -> dict:
    """Random weights, part prototypes and calibration on the generated demo set -> ``model.ckpt``."""
    import torch

    from src.build import build_module, describe_run
    from src.modes.segment import segment_datasets
    from src.segment.online import PartSegmentation

    started = time.perf_counter()
    cfg = compose_config(overrides(model, work, "mode=segment", f"paths.output_dir={work / model / 'build'}"))
    torch.manual_seed(0)
    datamodule, module = build_module(cfg)
    datamodule.prepare_data()
    segment_datasets(cfg, datamodule, module.net.encoder, first_use=True)
    module.segmentation, why = PartSegmentation.from_cache(datamodule.component_class_folders())
    assert module.segmentation is not None, why
    module.class_keys = list(datamodule.test_class_keys)
    module.calibrate(datamodule)
    path = work / model / "model.ckpt"
    torch.save({"state_dict": module.state_dict(), "global_step": 0,
                "anomalymoe": {**describe_run(cfg), "class_keys": module.class_keys},
                "calibration": module.calibration.to_dict(), "segmentation": module.segmentation.to_dict()}, path)
    built = {"seconds": time.perf_counter() - started, "parameters": sum(p.numel() for p in module.net.parameters()),
             "image_size": int(cfg.dataset.image_size), "segment_size": int(cfg.segment.image_size)}
    (work / model / "checkpoint.json").write_text(json.dumps(built, indent=2))
    return built


def export(model: str, work: Path, fmt: str) -> dict:
    """``mode=export export.format=<fmt>`` on the checkpoint: the command's time and peak memory,
    and its ``model.json`` (export time, file size, peak memory after writing, parity)."""
    from src.entry import run_task

    out = work / model / fmt
    started = time.perf_counter()
    run_task(compose_config(overrides(model, work, "mode=export", f"export.format={fmt}",
                                      f"ckpt_path={work / model / 'model.ckpt'}", f"paths.output_dir={out}")))
    name = {"onnx": "model.onnx"}[fmt]
    info = json.loads((out / "export" / "model.json").read_text())
    figures = {"model": model, "format": fmt, "path": str(out / "export" / name),
               "command_seconds": time.perf_counter() - started, "command_peak_rss_mb": peak_rss_mb(), **info["export"],
               "files": info["files"], "parity": info["parity"]}
    (out / "export.json").write_text(json.dumps(figures, indent=2))
    return figures


def feed_images(work: Path, batch: int) -> list[Path]:
    images = sorted((work / "data").glob("*/test/*/*.png"))
    return [images[i % len(images)] for i in range(batch)]


def load_runtime(model: str, work: Path, runtime: str, threads: int):
    """``run(feed) -> outputs`` of one runtime."""
    from src.inference import Detector

    if runtime == "onnxruntime":
        return Detector(work / model / "onnx" / "export" / "model.onnx", threads=threads).run
    return eager_runner(model, work, "sparse" if runtime.endswith("sparse") else "dense", threads)


def make_feed(model: str, work: Path, batch: int) -> dict:
    """The graph's inputs for ``batch`` demo test images (decoded and resized as the runtime does)."""
    from src.inference import graph_inputs, open_rgb

    pre = json.loads((work / model / "onnx" / "export" / "model.json").read_text())["preprocessing"]
    return graph_inputs([open_rgb(p) for p in feed_images(work, batch)], pre["resize"], pre["crop"], pre["segment_size"])


def runtime_memory(model: str, work: Path, runtime: str, batch: int, threads: int) -> dict:
    """Peak resident memory of a process that loads one runtime and runs one batch."""
    run = load_runtime(model, work, runtime, threads)
    loaded = peak_rss_mb()
    run(make_feed(model, work, batch))
    return {"runtime": runtime, "batch": batch, "peak_rss_mb": peak_rss_mb(), "rss_after_load_mb": loaded}


def time_runtimes(model: str, work: Path, runtimes: list[str], batch: int, repeats: int, warmup: int,
                  threads: int) -> list[dict]:
    """Seconds per batch of each runtime, timed in interleaved rounds (each round runs every
    runtime once, in a rotating order): on a shared machine whose load changes, every runtime sees
    the same load. Returns the median and the smallest time of each."""
    from src.measure.timing import interleaved_rounds  # here: the memory stages' processes import no torch

    feed = make_feed(model, work, batch)
    runs = {r: load_runtime(model, work, r, threads) for r in runtimes}
    for run in runs.values():
        for _ in range(warmup):
            run(feed)
    load_before = os.getloadavg()[0]
    times, outputs = interleaved_rounds({r: functools.partial(runs[r], feed) for r in runtimes}, repeats)
    load = (load_before, os.getloadavg()[0])  # the machine's 1-minute load average (the benchmark's threads included)
    return [{"runtime": r, "batch": batch, "seconds": statistics.median(t), "min_seconds": min(t),
             "images_per_s": batch / statistics.median(t), "repeats": repeats, "load_average": load,
             "scores": [float(v) for v in outputs[r]["score"]]} for r, t in times.items()]


def eager_runner(model: str, work: Path, dispatch: str, threads: int):
    """The wrapped module the exports trace, run eagerly (``dispatch``: dense as traced, or sparse)."""
    import torch

    from src.build import build_module
    from src.checkpoints import apply_checkpoint_config, load_weights, read_checkpoint
    from src.modes.export import build_detector, input_names
    from src.modes.predict import choose_segmenter

    torch.set_num_threads(threads)
    checkpoint = read_checkpoint(work / model / "model.ckpt")
    cfg = compose_config(overrides(model, work, "mode=export", f"ckpt_path={checkpoint.path}"))
    apply_checkpoint_config(cfg, checkpoint, [])
    _, module = build_module(cfg)
    load_weights(module, checkpoint)
    module.eval()
    detector, _ = build_detector(module, *choose_segmenter(module, {}, torch.device("cpu")))
    detector.net.dispatch = dispatch
    names = input_names(detector)

    def run(feed: dict) -> dict:
        with torch.inference_mode():
            out = detector(*[torch.from_numpy(feed[n]) for n in names])
        return {"score": out[1].numpy()}

    return run


# --------------------------------------------------------------------------- report
def report(rows: list[dict], memory: list[dict], exports: list[dict], built: dict, threads: int) -> str:
    lines = [f"Graph time per batch, CPU, {threads} thread(s), runtimes in interleaved rounds; random weights\n",
             "| model | runtime | batch | s/batch: median (min) | images/s | load average before / after |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['runtime']} | {r['batch']} | {r['seconds']:.3f} ({r['min_seconds']:.3f}) | "
                     f"{r['images_per_s']:.2f} | {r['load_average'][0]:.1f} / {r['load_average'][1]:.1f} |")
    lines += ["", "| model | runtime | peak RSS MiB of a process running one batch of | peak RSS MiB | after loading |",
              "|---|---|---|---|---|"]
    for m in memory:
        lines.append(f"| {m['model']} | {m['runtime']} | {m['batch']} | {m['peak_rss_mb']:.0f} | {m['rss_after_load_mb']:.0f} |")
    header = ("| model | parameters | format | export s | files | MB | peak RSS MiB at the write | whole command s "
              "(peak MiB) | largest score diff (of scale) | largest map diff | decisions / classes equal |")
    lines += ["", header, "|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in exports:
        p = e["parity"]
        lines.append(f"| {e['model']} | {built[e['model']]['parameters'] / 1e6:.1f} M | {e['format']} | {e['seconds']:.0f} | "
                     f"{' + '.join(e['files'])} | {e['file_mb']:.1f} | {e['peak_rss_mb']:.0f} | "
                     f"{e['command_seconds']:.0f} ({e['command_peak_rss_mb']:.0f}) | {p['max_score_difference']:.2g} "
                     f"({p['max_relative_difference']:.2g}) | {p['max_map_difference']:.2g} | {p['decisions_equal']}/{p['images']}"
                     f" / {p['classes_equal']}/{p['images']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["demo"], choices=list(MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), choices=RUNTIMES)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (the median is reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES,
                        help="checkpoint and export write into --workdir; memory and time read what they wrote there")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the data, checkpoints and exports here")
    parser.add_argument("--json", type=Path, default=None, help="also write every figure to this file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = (args.workdir or Path(tmp)).resolve()
        rows, memory = [], []
        for model in args.models:
            if "checkpoint" in args.stages:
                seconds = isolated(make_checkpoint, model, work)["seconds"]
                print(f"{model}: checkpoint in {seconds:.0f} s", flush=True)
            for fmt in ("onnx",) if "export" in args.stages else ():
                print(f"{model}: export {fmt} {isolated(export, model, work, fmt)['seconds']:.0f} s", flush=True)
            for runtime in args.runtimes if "memory" in args.stages else ():
                memory.append({"model": model, **isolated(runtime_memory, model, work, runtime, max(args.batches),
                                                          args.threads)})
                print(f"{model}: {runtime} peak RSS {memory[-1]['peak_rss_mb']:.0f} MiB", flush=True)
            for batch in args.batches if "time" in args.stages else ():
                timed = isolated(time_runtimes, model, work, args.runtimes, batch, args.repeats, args.warmup, args.threads)
                rows += [{"model": model, **r} for r in timed]
                print("\n".join(f"{model}: {r['runtime']} batch {batch}: {r['seconds']:.3f} s" for r in timed), flush=True)
        built = {m: json.loads((work / m / "checkpoint.json").read_text()) for m in args.models}
        exports = [json.loads((work / m / fmt / "export.json").read_text()) for m in args.models for fmt in ("onnx",)]
        text = report(rows, memory, exports, built, args.threads)
        print("\n" + text)
        if args.json:
            args.json.write_text(json.dumps({"argv": sys.argv, "threads": args.threads, "built": built, "exports": exports,
                                             "memory": memory, "runtimes": rows}, indent=2))


if __name__ == "__main__":
    main()
