"""Training-step time of our model against the original's step, measured in interleaved rounds.

Three variants of one configuration (``conf/benchmark/<preset>.yaml``'s model, random weights),
each a real ``lightning.Trainer`` step (:mod:`src.measure.training_step`):

* ``original``: the original's computation structure (dense experts, two encoder passes,
  whole-image students) and its step (``module.estimator_update=second_forward``);
* ``ours, original's estimator step``: our model with the original's step;
* ``ours``: our model with the default same-forward estimator update.

On a shared machine the load changes during a run, so the variants are timed in rounds
(each round times the second step of a short fit of each variant) and the medians are compared: every
variant sees the same load. The part of the speedup that the same-forward estimator update gives
is ``ours, original's estimator step`` / ``ours``.

    python benchmarks/training_speed.py --preset cpu_small --image-size 112 --batch 4 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
from functools import partial
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from src.measure.model_speed import OURS_ORIGINAL_STEP, STRUCTURES, make_batch
from src.measure.training_step import time_training

ROOT = Path(__file__).resolve().parents[1]
SECOND_FORWARD = "ours, original's estimator step"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cpu_small", help="conf/benchmark/<preset>.yaml (its model settings)")
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["mode=benchmark", f"benchmark={args.preset}"])
    model_cfg = OmegaConf.merge(OmegaConf.create(OmegaConf.to_container(cfg.model, resolve=True)),
                                cfg.benchmark.get("model") or {})
    model_cfg.backbone.weights = "random"
    variants = {"original": STRUCTURES["original"], SECOND_FORWARD: OURS_ORIGINAL_STEP,
                "ours": STRUCTURES["ours"]}
    torch.manual_seed(0)
    reference = None
    modules = {}
    for name, structure in variants.items():
        target = f"{structure.net_class.__module__}.{structure.net_class.__qualname__}"
        net = instantiate(model_cfg, **structure.options, _target_=target)
        if reference is None:
            reference = net.state_dict()
        net.load_state_dict(reference)
        modules[name] = instantiate(cfg.module, net=net.train(), **structure.module_options)
    device = torch.device("cpu")
    batch = make_batch(args.batch, args.image_size, 5, device, seed=1)
    timed = {name: [] for name in variants}
    step = partial(time_training, batch=batch, device=device, precision="fp32", warmup=1, iterations=1)
    for _ in range(args.rounds):
        for name, module in modules.items():
            timed[name].append(step(module)["seconds"])
    median = {name: statistics.median(v) for name, v in timed.items()}
    print(f"\nTraining step, {args.preset} model, {args.image_size} px, batch {args.batch}, CPU "
          f"({torch.get_num_threads()} threads), median of {args.rounds} interleaved rounds\n")
    print("| variant | s/step | speedup over original |")
    print("|---|---|---|")
    for name, seconds in median.items():
        print(f"| {name} | {seconds:.3f} | {median['original'] / seconds:.2f}x |")
    share = median[SECOND_FORWARD] / median["ours"]
    print(f"\nSame-forward estimator update alone: {share:.2f}x "
          f"(ours with the original's step / ours); the rest of the speedup: "
          f"{median['original'] / median[SECOND_FORWARD]:.2f}x")


if __name__ == "__main__":
    main()
