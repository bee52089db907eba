"""Speed and memory of our model against the original's computation structure, side by side.

"ours": the model as configured (sparse dispatch: only routed experts run; one batched encoder
pass for both images in training and none for the jittered copy at test time; the global
students in strips at inference), trained by the Lightning module's own training step.

"original": :mod:`src.measure.original_structure`, every expert on every image, two full encoder
passes per forward (at test time too), whole-image students, and the original's training step
(after each update a second forward pass feeds the CLUB estimator, which then steps once). Its inference is the computation that
``tests/test_parity.py`` checks against the original code's outputs.

Both use the same weights and inputs; inference outputs are compared. Training steps run in a
real ``lightning.Trainer`` (``trainer.precision`` bf16-mixed for bf16), inference calls the model
under ``torch.autocast``. ``torch.compile`` and channels-last are applied to the built models
with :func:`src.models.acceleration.accelerate`. The report and its rows for ``BENCHMARKS.md``:
:mod:`src.measure.report`.

    python run.py mode=benchmark benchmark=cpu_small      (conf/benchmark/*.yaml)
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import Tensor

from src.measure.original_structure import ORIGINAL_OPTIONS, ORIGINAL_STEP, OriginalStructure
from src.measure.timing import describe_device, measuring_device, peak_memory, release_freed_memory_to_os, time_it
from src.measure.training_step import time_training
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


def _max_abs(a: Tensor, b: Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def run_benchmark(build_net: NetBuilder, settings: BenchmarkSettings, build_module: ModuleBuilder) -> dict:
    """Measure inference and training of ``settings.structures``; ``build_net(net_class, **options)``
    makes a model of the benchmark's configuration, ``build_module(net, **module_options)`` the
    Lightning module whose training step is timed (with the run's loss weights and optimisers)."""
    device = measuring_device(settings.device)
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
