"""Speed and memory of our model against the original's computation structure, side by side.

"ours": sparse dispatch (only routed experts run), one batched encoder pass for both images in
training and none for the jittered copy at test time, the CLUB estimator trained on the
detached features of the same step.

"original": every expert on every image (``dispatch="dense"``), two full encoder passes per
forward, at test time too (``original_encoder_passes=True``), and after each training update a
second full forward (no grad, train mode) whose features train the estimator; the global
students run on whole images (``student_strip_rows=0``). Its inference is
the computation that ``tests/test_parity.py`` checks against the original code's outputs.

Both use the same weights and inputs; inference outputs are compared.
"""

from __future__ import annotations

import datetime as dt
import logging
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from src.losses import LossWeights
from src.models.anomalymoe import AnomalyMoE
from src.module import AnomalyMoEModule, _clip
from src.optim import StableAdamW

log = logging.getLogger(__name__)

STRUCTURES = {
    "ours": {"dispatch": "sparse", "original_encoder_passes": False},
    "original": {"dispatch": "dense", "original_encoder_passes": True, "student_strip_rows": 0},
}

# Inference from the original's structure to ours, one change at a time (cumulative).
INFERENCE_STEPS = {
    "original": STRUCTURES["original"],
    "+ one encoder pass": {"dispatch": "dense", "original_encoder_passes": False, "student_strip_rows": 0},
    "+ sparse dispatch": {"dispatch": "sparse", "original_encoder_passes": False, "student_strip_rows": 0},
    "+ student strips (ours)": STRUCTURES["ours"],
}


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


# --------------------------------------------------------------------------- steps
@dataclass
class Trainer:
    """A bare training loop step (no Lightning), for ``ours`` or the ``original`` structure."""

    module: AnomalyMoEModule
    structure: str
    autocast: Callable = nullcontext
    main_opt: torch.optim.Optimizer = field(init=False)
    est_opt: torch.optim.Optimizer = field(init=False)

    def __post_init__(self) -> None:
        groups = [{"params": list(m.parameters())} for m in self.module.net.trainable_groups().values()]
        self.main_opt = StableAdamW([g for g in groups if g["params"]], lr=5e-4)
        self.est_opt = torch.optim.Adam(self.module.estimator.parameters(), lr=5e-4, weight_decay=1e-4)

    def step(self, batch: dict) -> None:
        module, net = self.module, self.module.net
        net.train()
        with self.autocast():
            out = net.forward_train(batch["image"], batch["image_ae"], batch["masks"], batch["num_masks"])
            losses, pairs = module.compute_losses(out)
            total = losses["loss"]
            if self.structure == "ours":
                total = total + module.estimator_loss(pairs, out.logits)
        self.main_opt.zero_grad(set_to_none=True)
        self.est_opt.zero_grad(set_to_none=True)
        total.backward()
        _clip([p for g in self.main_opt.param_groups for p in g["params"]], 0.1)
        if self.structure == "original":
            self.main_opt.step()
            # The original's second forward pass, only to feed the estimator.
            self.est_opt.zero_grad(set_to_none=True)
            with torch.no_grad(), self.autocast():
                again = net.forward_train(batch["image"], batch["image_ae"], batch["masks"], batch["num_masks"])
                _, pairs = module.compute_losses(again)
            with self.autocast():
                est_loss = module.estimator_loss(pairs, again.logits)
            if est_loss.requires_grad:
                est_loss.backward()
        _clip(list(module.estimator.parameters()), 0.1)
        if self.structure == "ours":
            self.main_opt.step()
        self.est_opt.step()


# --------------------------------------------------------------------------- benchmark
@dataclass
class BenchmarkSettings:
    name: str = "cpu_small"
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    channels_last: bool = False
    compile_experts: bool = False
    image_size: int = 392
    train_batch_size: int = 8
    infer_batch_sizes: tuple[int, ...] = (1, 8)
    num_masks: int = 5
    warmup: int = 2
    iterations: int = 5
    expert_scaling: tuple[int, ...] = (6, 12, 24)  # experts per group for the cost-growth table
    scaling_batch_size: int = 8
    inference_steps: bool = True  # time each change from the original to ours at the largest batch


def inference_call(net: AnomalyMoE, batch: dict, autocast: Callable) -> Callable[[], object]:
    """A no-argument call running ``net`` on ``batch`` without gradients (what gets timed)."""

    def infer():
        with torch.no_grad(), autocast():
            return net(batch["image"], batch["image_ae"], batch["masks"], batch["num_masks"])

    return infer


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _max_abs(a: Tensor, b: Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def run_benchmark(build_net: Callable[..., AnomalyMoE], settings: BenchmarkSettings) -> dict:
    """Measure inference and training for both structures; ``build_net(**overrides)`` makes a model."""
    device = _device(settings.device)
    if device.type == "cpu":
        release_freed_memory_to_os()
    autocast = (
        (lambda: torch.autocast(device.type, dtype=torch.bfloat16))
        if settings.precision == "bf16"
        else nullcontext
    )
    torch.manual_seed(0)
    extras = {"channels_last": settings.channels_last, "compile_experts": settings.compile_experts}
    nets = {s: build_net(**STRUCTURES[s], **extras).to(device) for s in STRUCTURES}
    nets["original"].load_state_dict(nets["ours"].state_dict())
    results: dict = {"settings": settings.__dict__, "device": _describe(device), "inference": {}, "training": {}}

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
        results.setdefault("max_output_diff", {})[b] = max(
            _max_abs(getattr(outputs["ours"], k), getattr(outputs["original"], k))
            for k in ("map_patch", "map_global", "map_component", "routing_weights")
        )

    if settings.inference_steps:
        b = max(settings.infer_batch_sizes)
        batch = make_batch(b, settings.image_size, settings.num_masks, device)
        results["steps"] = {"batch_size": b}
        for step, overrides in INFERENCE_STEPS.items():
            net = build_net(**overrides, **extras).to(device).eval()
            net.load_state_dict(nets["ours"].state_dict())

            infer = inference_call(net, batch, autocast)

            seconds = time_it(infer, device, settings.warmup, settings.iterations)
            with peak_memory(device) as mem:
                infer()
            results["steps"][step] = {"seconds": seconds, "peak_bytes": mem["peak_bytes"]}
            log.info("inference step %-24s batch %d: %.4f s/batch", step, b, seconds)
            del net

    batch = make_batch(settings.train_batch_size, settings.image_size, settings.num_masks, device, seed=1)
    for structure, net in nets.items():
        trainer = Trainer(AnomalyMoEModule(net, LossWeights()).to(device), structure, autocast)
        seconds = time_it(lambda t=trainer: t.step(batch), device, settings.warmup, settings.iterations)
        with peak_memory(device) as mem:
            trainer.step(batch)
        results["training"][structure] = {"seconds": seconds, "images_per_s": settings.train_batch_size / seconds,
                                          "peak_bytes": mem["peak_bytes"]}
        log.info("training  %-8s: %.4f s/step", structure, seconds)
    del nets

    scaling = {}
    for n in settings.expert_scaling:
        batch = make_batch(settings.scaling_batch_size, settings.image_size, settings.num_masks, device, seed=2)
        for structure in STRUCTURES:
            torch.manual_seed(0)
            net = build_net(**STRUCTURES[structure], **extras, num_patch_experts=n, num_global_experts=n,
                            num_component_experts=n).to(device).eval()

            infer = inference_call(net, batch, autocast)

            scaling[(structure, n)] = time_it(infer, device, 1, max(1, settings.iterations // 2))
            log.info("scaling   %-8s %2d experts/group: %.4f s/batch", structure, n, scaling[(structure, n)])
            del net
    results["scaling"] = scaling
    return results


def _describe(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import os

    return f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


# --------------------------------------------------------------------------- reporting
def ratios(results: dict) -> dict[str, float]:
    inf, tr = results["inference"], results["training"]
    out = {}
    for (structure, b), v in inf.items():
        if structure == "ours":
            out[f"inference_speedup_b{b}"] = inf[("original", b)]["seconds"] / v["seconds"]
            out[f"inference_memory_ratio_b{b}"] = v["peak_bytes"] / max(1, inf[("original", b)]["peak_bytes"])
    out["training_speedup"] = tr["original"]["seconds"] / tr["ours"]["seconds"]
    out["training_memory_ratio"] = tr["ours"]["peak_bytes"] / max(1, tr["original"]["peak_bytes"])
    return out


def format_report(results: dict) -> str:
    s = results["settings"]
    mib = 2**20
    lines = [
        f"Benchmark `{s['name']}` on {results['device']} ({s['precision']}, {s['image_size']} px, "
        f"channels_last={s['channels_last']}, compile={s['compile_experts']})",
        "",
        "| structure | train s/step | train img/s | train peak MiB | "
        + " | ".join(f"infer b{b} img/s | infer b{b} peak MiB" for b in s["infer_batch_sizes"]) + " |",
        "|---" * (4 + 2 * len(s["infer_batch_sizes"])) + "|",
    ]
    for structure in STRUCTURES:
        tr = results["training"][structure]
        cells = [f"{tr['seconds']:.3f}", f"{tr['images_per_s']:.1f}", f"{tr['peak_bytes'] / mib:.0f}"]
        for b in s["infer_batch_sizes"]:
            v = results["inference"][(structure, b)]
            cells += [f"{v['images_per_s']:.1f}", f"{v['peak_bytes'] / mib:.0f}"]
        lines.append(f"| {structure} | " + " | ".join(cells) + " |")
    lines += ["", "Ratios (ours vs original): " + ", ".join(f"{k} = {v:.2f}" for k, v in ratios(results).items())]
    diffs = ", ".join(f"b{b}: {d:.1e}" for b, d in results["max_output_diff"].items())
    lines += [f"Largest output difference (maps, routing): {diffs}", ""]
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
                f"{v['peak_bytes'] / mib:.0f} | {v['peak_bytes'] / max(1, first['peak_bytes']):.2f} |"
            )
        lines.append("")
    ns = s["expert_scaling"]
    lines += [
        f"Inference seconds per batch of {s['scaling_batch_size']} vs experts per group (top-k fixed):",
        "",
        "| structure | " + " | ".join(f"{n}/{n}/{n}" for n in ns) + " |",
        "|---" * (len(ns) + 1) + "|",
    ]
    for structure in STRUCTURES:
        lines.append(f"| {structure} | " + " | ".join(f"{results['scaling'][(structure, n)]:.3f}" for n in ns) + " |")
    return "\n".join(lines)


SECTION = "## Model speed"
TABLE_HEADER = (
    "| date | benchmark | device | precision | train speedup | infer speedup b1 | infer speedup b8 | "
    "infer memory ratio b8 | ours train img/s | ours infer img/s b8 | max output diff |"
)


def append_to_benchmarks(results: dict, path: Path) -> None:
    """Add a dated row to the ``## Model speed`` table of ``BENCHMARKS.md`` (created if needed)."""
    r = ratios(results)
    s = results["settings"]
    row = (
        f"| {dt.date.today().isoformat()} | {s['name']} | {results['device']} | {s['precision']} | "
        f"{r['training_speedup']:.2f}x | {r.get('inference_speedup_b1', float('nan')):.2f}x | "
        f"{r.get('inference_speedup_b8', float('nan')):.2f}x | {r.get('inference_memory_ratio_b8', float('nan')):.2f} | "
        f"{results['training']['ours']['images_per_s']:.1f} | "
        f"{results['inference'].get(('ours', 8), {}).get('images_per_s', float('nan')):.1f} | "
        f"{max(results['max_output_diff'].values()):.1e} |"
    )
    text = path.read_text() if path.is_file() else "# Benchmarks\n"
    if SECTION not in text:
        separator = "|---" * (TABLE_HEADER.count("|") - 1) + "|"
        text = text.rstrip() + (
            f"\n\n{SECTION}\n\nRows appended by `python run.py mode=benchmark benchmark=<name>` "
            "(see `conf/benchmark/`). Speedups and memory ratios compare our model with the original's "
            "computation structure (dense experts, two encoder passes, an extra estimator forward per "
            "training step) in one process, same weights and inputs. Memory is the peak above the "
            "resident weights and inputs.\n\n"
            f"{TABLE_HEADER}\n{separator}\n"
        )
    lines = text.splitlines()
    start = lines.index(SECTION)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    last_row = max(i for i in range(start, end) if lines[i].startswith("|"))
    lines.insert(last_row + 1, row)
    path.write_text("\n".join(lines) + "\n")
