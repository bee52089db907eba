"""Speed and memory of our model against the original's computation structure, side by side.

"ours": the model as configured (sparse dispatch: only routed experts run; one batched encoder
pass for both images in training and none for the jittered copy at test time; the global
students in strips at inference), trained by the Lightning module's own training step.

"original": :mod:`benchmarks.original_structure`, every expert on every image, two full encoder
passes per forward (at test time too), whole-image students, and the original's training step
(after each update a second forward pass feeds the CLUB estimator, which then steps once). Its inference is the computation that
``tests/test_parity.py`` checks against the original code's outputs.

Both use the same weights and inputs; inference outputs are compared. Training steps run in a
real ``lightning.Trainer`` (``trainer.precision`` bf16-mixed for bf16), inference calls the model
under ``torch.autocast``. ``torch.compile`` and channels-last are applied to the built models
with :func:`src.models.acceleration.accelerate`.

    python run.py mode=benchmark benchmark=cpu_small      (conf/benchmark/*.yaml)
"""

from __future__ import annotations

import datetime as dt
import logging
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from lightning import Callback, Trainer
from torch import Tensor
from torch.utils.data import DataLoader

from benchmarks.original_structure import ORIGINAL_OPTIONS, ORIGINAL_STEP, OriginalStructure
from src.models.acceleration import accelerate
from src.models.anomalymoe import AnomalyMoE
from src.module import AnomalyMoEModule

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Structure:
    net_class: type[AnomalyMoE]
    options: dict = field(default_factory=dict)  # model options on top of the configured model
    module_options: dict = field(default_factory=dict)  # Lightning module options (its training step)


STRUCTURES = {
    "ours": Structure(AnomalyMoE),
    "original": Structure(OriginalStructure, ORIGINAL_OPTIONS, ORIGINAL_STEP),
}
# Our model trained with the original's estimator step: how much of the training speedup the
# same-forward estimator update gives.
OURS_ORIGINAL_STEP = Structure(AnomalyMoE, {}, ORIGINAL_STEP)

# Inference from the original's structure to ours, one change at a time (cumulative).
INFERENCE_STEPS = {
    "original": STRUCTURES["original"],
    "+ one encoder pass": Structure(AnomalyMoE, {"dispatch": "dense", "student_strip_rows": 0}),
    "+ sparse dispatch": Structure(AnomalyMoE, {"dispatch": "sparse", "student_strip_rows": 0}),
    "+ student strips (ours)": STRUCTURES["ours"],
}

# build_net(net_class, **options) -> a model of the benchmark's configuration.
NetBuilder = Callable[..., AnomalyMoE]
ModuleBuilder = Callable[..., AnomalyMoEModule]  # build_module(net, **module_options) -> module


# --------------------------------------------------------------------------- measuring
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def release_freed_memory_to_os() -> None:
    """Make glibc return large freed blocks at once (fixed mmap threshold), so that the resident
    size follows live tensor memory on the CPU instead of keeping freed arenas."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_mmap_threshold, m_trim_threshold = -3, -1
    libc.mallopt(m_mmap_threshold, 64 * 1024)
    libc.mallopt(m_trim_threshold, 64 * 1024)


@contextmanager
def peak_memory(device: torch.device) -> Iterator[dict]:
    """Peak memory above the level at entry (weights and inputs excluded), in bytes: CUDA
    allocator statistics, or the sampled resident size on the CPU."""
    result = {"peak_bytes": 0}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield result
        torch.cuda.synchronize(device)
        result["peak_bytes"] = torch.cuda.max_memory_allocated(device) - base
        return
    base = _rss_bytes()
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.0005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        result["peak_bytes"] = max(peak[0], _rss_bytes()) - base


def time_it(fn: Callable[[], object], device: torch.device, warmup: int, iterations: int) -> float:
    """Median seconds per call after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iterations):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# --------------------------------------------------------------------------- inputs
def make_batch(batch_size: int, image_size: int, num_masks: int, device: torch.device, seed: int = 0) -> dict:
    """Random images, a jittered copy and ``num_masks`` rectangular component masks per image."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(batch_size, 3, image_size, image_size, generator=g)
    masks = torch.zeros(batch_size, num_masks, image_size, image_size, dtype=torch.uint8)
    step = max(1, image_size // max(1, num_masks))
    for m in range(num_masks):
        masks[:, m, m * step : (m + 1) * step, :] = 1
    return {
        "image": image.to(device),
        "image_ae": (image + 0.1 * torch.randn(image.shape, generator=g)).to(device),
        "masks": masks.to(device),
        "num_masks": torch.full((batch_size,), num_masks, device=device),
    }


# --------------------------------------------------------------------------- training
class _StepTimer(Callback):
    """Seconds of every training step and the peak memory of the last one."""

    def __init__(self, device: torch.device, last_step: int) -> None:
        self.device, self.last_step = device, last_step
        self.seconds: list[float] = []
        self.memory: dict = {}
        self._stack = ExitStack()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.last_step:
            self.memory = self._stack.enter_context(peak_memory(self.device))
        self._sync()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._sync()
        self.seconds.append(time.perf_counter() - self._start)
        if batch_idx == self.last_step:
            self._stack.close()


def time_training(module: AnomalyMoEModule, batch: dict, device: torch.device, precision: str, warmup: int,
                  iterations: int) -> dict:
    """Median seconds of the module's real training step (a ``lightning.Trainer`` fitting on
    ``batch`` again and again) after ``warmup`` steps, and the peak memory of one more step."""
    steps = warmup + iterations + 1
    timer = _StepTimer(device, last_step=steps - 1)
    trainer = Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, max_steps=steps,
        precision="bf16-mixed" if precision == "bf16" else "32-true", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        callbacks=[timer],
    )
    trainer.fit(module, DataLoader([batch] * steps, batch_size=None))
    return {"seconds": statistics.median(timer.seconds[warmup : warmup + iterations]),
            "peak_bytes": timer.memory["peak_bytes"]}


# --------------------------------------------------------------------------- benchmark
@dataclass
class BenchmarkSettings:
    name: str = "cpu_small"
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    channels_last: bool = False
    compile_experts: bool = False
    compile_backend: str = "inductor"
    image_size: int = 392
    train_batch_size: int = 8
    infer_batch_sizes: tuple[int, ...] = (1, 8)
    num_masks: int = 5
    warmup: int = 2
    iterations: int = 5
    structures: tuple[str, ...] = ("ours", "original")  # which of STRUCTURES to measure
    expert_scaling: tuple[int, ...] = (6, 12, 24)  # experts per group for the cost-growth table; () skips it
    scaling_batch_size: int = 8
    inference_steps: bool = True  # time each change from the original to ours at the largest batch
    training_steps: bool = True  # also time ours with the original's estimator step

    def __post_init__(self) -> None:
        unknown = sorted(set(self.structures) - set(STRUCTURES))
        if unknown or not self.structures:
            raise ValueError(f"benchmark.structures={list(self.structures)}: choose among {list(STRUCTURES)}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"benchmark.precision={self.precision!r}: choose fp32 or bf16")


def inference_call(net: AnomalyMoE, batch: dict, autocast: Callable) -> Callable[[], object]:
    """A no-argument call running ``net`` on ``batch`` without gradients (what gets timed)."""

    def infer():
        with torch.no_grad(), autocast():
            return net(batch["image"], batch["image_ae"], batch["masks"], batch["num_masks"])

    return infer


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("benchmark.device=cuda but torch sees no CUDA device; use benchmark.device=cpu or auto")
    return torch.device(name)


def _max_abs(a: Tensor, b: Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def run_benchmark(build_net: NetBuilder, settings: BenchmarkSettings, build_module: ModuleBuilder) -> dict:
    """Measure inference and training of ``settings.structures``; ``build_net(net_class, **options)``
    makes a model of the benchmark's configuration, ``build_module(net, **module_options)`` the
    Lightning module whose training step is timed (with the run's loss weights and optimisers)."""
    device = _device(settings.device)
    if device.type == "cpu":
        release_freed_memory_to_os()
    autocast = (
        (lambda: torch.autocast(device.type, dtype=torch.bfloat16))
        if settings.precision == "bf16"
        else nullcontext
    )
    speed = {"channels_last": settings.channels_last, "compile_experts": settings.compile_experts,
             "compile_backend": settings.compile_backend}

    def build(structure: Structure, **options) -> AnomalyMoE:
        return accelerate(build_net(structure.net_class, **structure.options, **options).to(device), **speed)

    torch.manual_seed(0)
    nets = {s: build(STRUCTURES[s]) for s in settings.structures}
    reference = nets[settings.structures[0]].state_dict()
    for net in nets.values():
        net.load_state_dict(reference)
    results: dict = {"settings": dict(settings.__dict__), "device": describe_device(device), "inference": {},
                     "training": {}, "max_output_diff": {}}

    for b in settings.infer_batch_sizes:
        batch = make_batch(b, settings.image_size, settings.num_masks, device)
        outputs = {}
        for structure, net in nets.items():
            net.eval()
            infer = inference_call(net, batch, autocast)
            seconds = time_it(infer, device, settings.warmup, settings.iterations)
            with peak_memory(device) as mem:
                outputs[structure] = infer()
            results["inference"][(structure, b)] = {"seconds": seconds, "images_per_s": b / seconds,
                                                     "peak_bytes": mem["peak_bytes"]}
            log.info("inference %-8s batch %d: %.4f s/batch", structure, b, seconds)
        if len(outputs) > 1:
            first, *others = outputs.values()
            results["max_output_diff"][b] = max(
                _max_abs(getattr(first, k), getattr(other, k))
                for other in others for k in ("map_patch", "map_global", "map_component", "routing_weights")
            )

    if settings.inference_steps:
        b = max(settings.infer_batch_sizes)
        batch = make_batch(b, settings.image_size, settings.num_masks, device)
        results["steps"] = {"batch_size": b}
        for step, structure in INFERENCE_STEPS.items():
            net = build(structure).eval()
            net.load_state_dict(reference)
            infer = inference_call(net, batch, autocast)
            seconds = time_it(infer, device, settings.warmup, settings.iterations)
            with peak_memory(device) as mem:
                infer()
            results["steps"][step] = {"seconds": seconds, "peak_bytes": mem["peak_bytes"]}
            log.info("inference step %-24s batch %d: %.4f s/batch", step, b, seconds)
            del net

    batch = make_batch(settings.train_batch_size, settings.image_size, settings.num_masks, device, seed=1)
    trained = {name: (net, STRUCTURES[name]) for name, net in nets.items()}
    if settings.training_steps and "ours" in nets:
        net = build(OURS_ORIGINAL_STEP)
        net.load_state_dict(reference)
        trained["ours, original's estimator step"] = (net, OURS_ORIGINAL_STEP)
    for name, (net, structure) in trained.items():
        module = build_module(net.train(), **structure.module_options)  # dropout on, as in training
        timed = time_training(module, batch, device, settings.precision, settings.warmup, settings.iterations)
        results["training"][name] = {**timed, "images_per_s": settings.train_batch_size / timed["seconds"]}
        log.info("training  %-8s: %.4f s/step", name, timed["seconds"])
    del nets, trained

    scaling = {}
    for n in settings.expert_scaling:
        batch = make_batch(settings.scaling_batch_size, settings.image_size, settings.num_masks, device, seed=2)
        for structure in settings.structures:
            torch.manual_seed(0)
            net = build(STRUCTURES[structure], num_patch_experts=n, num_global_experts=n,
                        num_component_experts=n).eval()
            infer = inference_call(net, batch, autocast)
            scaling[(structure, n)] = time_it(infer, device, 1, max(1, settings.iterations // 2))
            log.info("scaling   %-8s %2d experts/group: %.4f s/batch", structure, n, scaling[(structure, n)])
            del net
    results["scaling"] = scaling
    return results


def describe_device(device: torch.device) -> str:
    """The GPU's name, or the CPU's cores and torch threads."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import os

    return f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


# --------------------------------------------------------------------------- reporting
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


def append_row(path: Path, section: str, intro: str, header: str, row: str) -> None:
    """Add ``row`` at the end of the table of ``section`` in the Markdown file ``path`` (the file,
    the section with ``intro`` and the table with ``header`` are created when missing)."""
    text = path.read_text() if path.is_file() else "# Benchmarks\n"
    if section not in text.splitlines():
        separator = "|---" * (header.count("|") - 1) + "|"
        text = text.rstrip() + f"\n\n{section}\n\n{intro}\n\n{header}\n{separator}\n"
    lines = text.splitlines()
    start = lines.index(section)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    last_row = max(i for i in range(start, end) if lines[i].startswith("|"))
    lines.insert(last_row + 1, row)
    path.write_text("\n".join(lines) + "\n")


SUMMARY_SECTION = "## Model speed"
SUMMARY_INTRO = (
    "Rows appended by `python run.py mode=benchmark benchmark=<name>` (see `conf/benchmark/`). Speedups and "
    "memory ratios compare our model with the original's computation structure (dense experts, two encoder "
    "passes, an extra estimator forward per training step) in one process, same weights and inputs. Memory is "
    "the peak above the resident weights and inputs."
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
