"""mode=export: a checkpoint as a file to ship (``export.format``).

* ``original`` (default): the network with the original's key names (``model_final.pth``). The
  file loads into the original code (``model.load_state_dict(torch.load(path))``) and back into
  this project (``mode=test ckpt_path=<file>``); like the original's file it holds only the
  network.
* ``onnx``: ``<export.dir>/model.onnx``, one graph from the resized uint8 image to the anomaly map,
  the score, the decision and the class (:mod:`src.deploy`), and ``model.json`` describing it. It
  runs with onnxruntime alone (:mod:`src.inference`) and in ``mode=predict ckpt_path=<model.onnx>``.
  Weights above 1 GiB (the paper-size model) go to ``model.onnx.data`` beside it.
* ``torch`` is refused: a ``torch.export`` program (``model.pt2``) cannot be loaded without running
  code stored in the file (:data:`src.inference.REFUSED`), and a shipped file must be data.

``model.json`` and the graph are sealed together (:func:`seal`): the graph records the digest of
``model.json``, ``model.json`` the digest of each graph file, and the runtime refuses either when
they do not match (:mod:`src.inference`).

An export checks itself before it is kept: the exported model (through :mod:`src.inference`)
and the checkpoint (through ``mode=predict``'s path and scorer) score the same images (a few
normal training images per class, or ``export.check_input``); when a score differs by more than
``export.tolerance`` times the scale of the scores (the largest threshold or score), a class or a
decision differs (beyond a score within the tolerance of its threshold), the files are moved to
``<export.dir>/rejected/`` with their ``model.json`` and the run fails naming the worst image.
"""

from __future__ import annotations

import copy
import gc
import json
import logging
import platform
import resource
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from src.models.weight_formats import CheckpointError, ours_to_original, read_state_file

log = logging.getLogger(__name__)

FORMATS = ("original", "onnx")


class ExportCheckError(CheckpointError):
    """The exported model does not score like the checkpoint."""


def export_original(ckpt_path: str | Path, out_path: str | Path) -> Path:
    """Read a Lightning ``.ckpt`` of this project and save its network under the original's key names."""
    state = read_state_file(Path(ckpt_path).expanduser(), "ckpt_path")
    net = {k[len("net."):]: v for k, v in state.items() if k.startswith("net.")}
    if not net:
        raise CheckpointError(
            f"{ckpt_path} holds no 'net.*' weights: mode=export reads a checkpoint written by mode=train "
            "(e.g. <run>/checkpoints/last.ckpt)"
        )
    out_path = Path(out_path).expanduser()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ours_to_original(net), out_path)
    return out_path


# --------------------------------------------------------------------------- onnx and torch
def _versions(fmt: str) -> dict:
    from src.build import REPOSITORY, git_commit

    versions = {"torch": torch.__version__, "python": platform.python_version(), "project": git_commit(REPOSITORY)}
    if fmt == "onnx":
        import onnx
        import onnxruntime

        versions.update(onnx=onnx.__version__, onnxruntime=onnxruntime.__version__)
    return versions


def build_detector(module, segmenter, note: str | None = None):
    """The deployable graph of a loaded module (``segmenter``: the one ``mode=predict`` would use,
    None when images are scored without masks) and the note on its component masks."""
    from src.deploy import DeployableDetector
    from src.evaluation.calibration import POOLED

    if module.calibration is None:
        raise CheckpointError("the module has no calibration (thresholds) to export")
    segmentation = module.segmentation if segmenter is not None else None
    keys = list(segmentation.classes) if segmentation else [k for k in module.calibration.stats if k != POOLED]
    net = copy.copy(module.net)  # shares the weights: a paper-size model is 2 GB
    net.dispatch = "dense"  # every expert runs; the gate's weights zero the others (no data-dependent shapes)
    return DeployableDetector(net, module.evaluator.scorer, module.calibration, keys, segmentation).eval(), note


def example_inputs(detector, size: int, batch: int = 2) -> tuple:
    """Inputs of the graph's shapes (the class chosen, random images): what the exporter traces."""
    inputs = [torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8), torch.full((batch,), -1)]
    if detector.segmentation is not None:
        s = int(detector.segmentation.params["image_size"])
        inputs += [torch.randint(0, 256, (batch, 3, s, s), dtype=torch.uint8),
                   torch.arange(size).expand(batch, size) * s // size, torch.arange(size).expand(batch, size) * s // size]
    return tuple(inputs)


def input_names(detector) -> list[str]:
    names = ["image", "given_class", "segment_image", "mask_rows", "mask_cols"]
    return names if detector.segmentation is not None else names[:2]


def _batch_dims(inputs: tuple) -> tuple:
    batch = torch.export.Dim("batch", min=1, max=1024)
    return tuple({0: batch} for _ in inputs)


def onnx_export(module: torch.nn.Module, inputs: tuple, path: Path, names: list[str], outputs: list[str],
                external_data: bool = False) -> None:
    """``torch.onnx.export`` with this project's settings: the dynamo exporter, a dynamic batch
    dimension on every input, and no onnxscript optimisation."""
    logging.getLogger("onnx_ir").setLevel(logging.WARNING)  # one line per deduplicated constant otherwise
    with torch.no_grad():
        torch.onnx.export(module, inputs, str(path), dynamo=True, input_names=names, output_names=outputs,
                          dynamic_shapes=_batch_dims(inputs), external_data=external_data, verbose=False,
                          optimize=False)  # onnxscript's optimiser drops additions of tiny constants (the 1e-11 of the scorer)


def write_onnx(detector, path: Path, size: int) -> list[Path]:
    """``model.onnx`` (weights above :data:`EXTERNAL_DATA_BYTES` in ``model.onnx.data`` beside
    it); returns the files written."""
    from src.deploy import OUTPUTS
    from src.evaluation.protocol import gaussian_kernel

    inputs = example_inputs(detector, size)
    external = weight_bytes(detector) > EXTERNAL_DATA_BYTES
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)  # the weights of the model.onnx this export replaces
    try:
        onnx_export(detector, inputs, path, input_names(detector), list(OUTPUTS), external)
    finally:
        gaussian_kernel.cache_clear()  # it may hold a tensor made while tracing, unusable in eager code
    return [path, data] if data.is_file() else [path]


FILE_NAMES = {"onnx": "model.onnx"}
EXTERNAL_DATA_BYTES = 1 << 30  # ONNX weights above 1 GiB go to model.onnx.data (a protobuf file stops at 2 GiB)


def seal(path: Path, files: list[Path], info: dict) -> dict:
    """Tie the graph and its description together: the graph's metadata records the digest of
    ``info`` (:data:`src.inference.DESCRIPTION_DIGEST`), then ``info["graph_sha256"]`` the digest of
    each file of the graph (``model.onnx`` and its ``model.onnx.data``). Returns ``info``."""
    import onnx

    from src.inference import DESCRIPTION_DIGEST, description_digest, file_digest

    model = onnx.load(str(path), load_external_data=False)  # the weights file is left as it is
    for entry in [e for e in model.metadata_props if e.key == DESCRIPTION_DIGEST]:
        model.metadata_props.remove(entry)
    model.metadata_props.add(key=DESCRIPTION_DIGEST, value=description_digest(info))
    onnx.save(model, str(path))
    info["graph_sha256"] = {f.name: file_digest(f) for f in files}
    return info


def weight_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def check_images(cfg: DictConfig, datamodule) -> list[Path]:
    """``export.check_input`` (a file or folder), else the first normal training images of each class."""
    from src.modes.predict import list_inputs

    if cfg.export.get("check_input"):
        return list_inputs(Path(cfg.export.check_input).expanduser(), recursive=True)[0]
    loader = datamodule.normal_dataloader(cfg.export.check_images)
    return [s.image_path for s in loader.dataset.samples]


def parity(checked: list[dict], exported: list[dict], thresholds: list[float], tolerance: float) -> dict:
    """Largest differences between the checkpoint's and the export's records of the same images."""
    scale = max([abs(t) for t in thresholds] + [abs(r["score"]) for r in checked] + [1e-12])
    diffs = [abs(a["score"] - b["score"]) for a, b in zip(checked, exported)]
    maps = [float(np.abs(a["map"] - b["map"]).max()) for a, b in zip(checked, exported)]
    worst = int(np.argmax(diffs))
    allowed = tolerance * scale
    problems = [f"{a['path']}: class {a['class']} (checkpoint) vs {b['class']} (export)"
                for a, b in zip(checked, exported) if a["class"] != b["class"]]
    problems += [f"{a['path']}: score {a['score']:.6g} (checkpoint) vs {b['score']:.6g} (export), difference "
                 f"{d:.3g} > {allowed:.3g}" for a, b, d in zip(checked, exported, diffs) if not d <= allowed]  # NaN fails
    problems += [f"{a['path']}: decision {a['anomalous']} (checkpoint) vs {b['anomalous']} (export), score "
                 f"{a['score']:.6g} not within {allowed:.3g} of the threshold {a['statistics'].threshold:.6g}"
                 for a, b in zip(checked, exported)
                 if a["anomalous"] != b["anomalous"] and abs(a["score"] - a["statistics"].threshold) > allowed]
    return {"images": len(checked), "score_scale": scale, "tolerance": allowed,
            "tolerance_rule": f"{tolerance:g} x score scale (the largest |threshold| or |score| of the check)",
            "max_score_difference": max(diffs), "mean_score_difference": float(np.mean(diffs)),
            "max_relative_difference": max(diffs) / scale, "worst_image": checked[worst]["path"],
            "max_map_difference": max(maps),
            "decisions_equal": sum(a["anomalous"] == b["anomalous"] for a, b in zip(checked, exported)),
            "classes_equal": sum(a["class"] == b["class"] for a, b in zip(checked, exported)),
            "passed": not problems, "problems": problems[:20]}


def export_model(cfg: DictConfig, fmt: str) -> Path:
    """Export, check against the checkpoint, describe; returns the path of the model file."""
    from dataclasses import asdict

    from data_modules.dataset import AnomalyTransforms
    from src.build import build_module
    from src.checkpoints import load_weights, read_checkpoint
    from src.evaluation.report import expert_names
    from src.inference import Detector
    from src.modes.predict import (
        ImageFiles,
        calibrate_if_missing,
        choose_segmenter,
        collate,
        score_with_checkpoint,
        score_with_export,
    )

    checkpoint = read_checkpoint(cfg.ckpt_path)
    if checkpoint.kind != "lightning":
        raise CheckpointError(f"ckpt_path={cfg.ckpt_path}: export.format={fmt} reads a .ckpt written by mode=train "
                              "(it needs the preprocessing and part prototypes stored in it)")
    out_dir = Path(cfg.export.dir).expanduser()
    path = out_dir / FILE_NAMES[fmt]
    datamodule, module = build_module(cfg)
    load_weights(module, checkpoint)
    module.eval()
    segmenter, note = choose_segmenter(module, {}, torch.device("cpu"), datamodule.max_pixels)
    source = calibrate_if_missing(module, datamodule, module.net.num_experts[2] > 0 and segmenter is None)
    detector, note = build_detector(module, segmenter, note)
    transforms = getattr(datamodule, "transforms", None) or AnomalyTransforms()
    out_dir.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    files = write_onnx(detector, path, transforms.output_size)
    seconds = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    calibration = module.calibration
    keys, stats = detector.class_keys, detector.statistics
    info = {
        "format": f"anomalymoe-{fmt}",
        "files": [f.name for f in files],
        "checkpoint": str(checkpoint.path), "global_step": checkpoint.global_step,
        "class_keys": keys,
        "experts": expert_names(module.net.num_experts),
        "preprocessing": {"resize": transforms.resize, "crop": transforms.crop,
                          "segment_size": int(detector.segmentation.params["image_size"]) if detector.segmentation else None,
                          "input": "image: (B, 3, S, S) uint8 RGB, PIL bilinear resize to (resize, resize), centre crop "
                                   "to S = crop; the normalisation is in the graph"},
        "inputs": input_names(detector),
        "outputs": ["anomaly_map (B, 1, E, E)", "score (B,)", "anomalous (B,)", "class_index (B,)",
                    "class_distance (B, N)", "threshold (B,)", "routing_weights (B, experts)"],
        "component_masks": f"computed in the graph from the part prototypes ({detector.feature_kind} features), "
                           "their mean-field refinement included"
        if detector.segmentation is not None
        else "none: scored against statistics of images without masks" if module.net.num_experts[2] else "no component experts",
        "thresholds": {k: stats[k].threshold for k in stats},
        "statistics": {k: asdict(v) for k, v in stats.items()},
        "statistics_source": source,
        "decision_rule": calibration.rule,
        "notes": list(calibration.notes) + ([note] if note else []),
        "scorer": asdict(module.evaluator.scorer),
        "export": {"seconds": round(seconds, 1), "peak_rss_mb": round(peak_mb),
                   "file_mb": round(sum(f.stat().st_size for f in files) / 2**20, 2),
                   "dispatch": "dense: every expert runs, the gate's weights zero the unselected ones"},
        "versions": _versions(fmt),
    }
    seal(path, files, info)

    images = check_images(cfg, datamodule)
    class_key = detector.class_keys[0] if segmenter is None and len(detector.class_keys) == 1 else None
    loader = DataLoader(ImageFiles(images, transforms, Path("/"), None, segmenter, class_key,
                                   max_pixels=datamodule.max_pixels),
                        batch_size=cfg.export.batch_size, collate_fn=collate)
    checked = [r for r in score_with_checkpoint(module, calibration, loader) if "error" not in r]
    checkpoint_path, max_pixels = checkpoint.path, datamodule.max_pixels
    del module, detector, segmenter, loader, datamodule, checkpoint  # done with: the runtime loads its own
    gc.collect()  # copy of the weights (2 GB at paper size)
    exported = {r["path"]: r for r in score_with_export(Detector(path, info=info), images, transforms, None,
                                                          cfg.export.batch_size, max_pixels) if "error" not in r}
    exported = [exported[r["path"]] for r in checked]
    if not checked:
        raise ExportCheckError(f"no readable image to check the export with ({len(images)} given)")
    figures = parity(checked, exported, [stats[k].threshold for k in keys], cfg.export.tolerance)
    info["parity"] = figures
    log.info("Export check on %d images: largest score difference %.3g (%.2g of the score scale %.3g; tolerance "
             "%.3g), largest map difference %.3g, %d/%d decisions and %d/%d classes equal", figures["images"],
             figures["max_score_difference"], figures["max_relative_difference"], figures["score_scale"],
             figures["tolerance"], figures["max_map_difference"], figures["decisions_equal"], figures["images"],
             figures["classes_equal"], figures["images"])
    if not figures["passed"]:
        rejected = out_dir / "rejected"
        rejected.mkdir(exist_ok=True)
        for f in files:  # moved together: model.onnx names its weights file model.onnx.data
            f.replace(rejected / f.name)
        (rejected / path.with_suffix(".json").name).write_text(json.dumps(info, indent=2))
        raise ExportCheckError(f"the exported model does not score like {checkpoint_path} (moved to {rejected}, "
                               "figures in its model.json):\n  " + "\n  ".join(figures["problems"]))
    path.with_suffix(".json").write_text(json.dumps(info, indent=2))
    return path


def run(cfg: DictConfig) -> None:
    """Export ``ckpt_path`` in ``export.format``."""
    from src.errors import ConfigError
    from src.inference import REFUSED

    fmt = cfg.export.get("format", "original")
    if fmt == "torch":
        raise ConfigError(f"export.format=torch is not offered: {REFUSED['.pt2']}")
    if fmt not in FORMATS:
        raise ConfigError(f"export.format={fmt!r}; choose one of {FORMATS}")
    if fmt == "original":
        out = export_original(cfg.ckpt_path, cfg.export.path)
        log.info("Wrote %s (original key names) from %s", out, cfg.ckpt_path)
        return
    out = export_model(cfg, fmt)
    log.info("Wrote %s and %s from %s", out, out.with_suffix(".json"), cfg.ckpt_path)
