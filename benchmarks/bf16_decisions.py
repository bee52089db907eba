"""How many test decisions bf16 autocast changes: the demo test set scored in fp32 and under
``torch.autocast(bfloat16)`` with the same weights and the same (fp32) calibration.

    python benchmarks/bf16_decisions.py [--ckpt last.ckpt] [--root DIR] [--device cpu|cuda] [overrides ...]

Without ``--ckpt`` the demo model's initial weights (seed 0) are scored; ``--root``: the demo data
folder (generated there at 96 px when missing). Prints one line: images, decisions that differ,
the largest score difference relative to the threshold.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", type=Path)
    parser.add_argument("--root", type=Path)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from hydra import compose, initialize_config_dir

    from src.build import build_module

    root = args.root or Path(tempfile.mkdtemp()) / "demo"
    overrides = ["experiment=demo", f"dataset.root={root}", f"dataset.component_masks={root}/components_true",
                 "+dataset.generate_size=96", "+dataset.num_train=8", "+dataset.num_test_good=4",
                 "+dataset.num_test_defect=2", "dataset.image_size=84", "dataset.resize=96", "seed=0",
                 "paths.output_dir=" + str(root.parent / "out"), *args.overrides]
    os.environ.setdefault("ANOMALYMOE_ROOT", str(ROOT))
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    torch.manual_seed(0)
    datamodule, module = build_module(cfg)
    if args.ckpt:
        module.load_state_dict(torch.load(args.ckpt, map_location="cpu", weights_only=True)["state_dict"])
    module.to(args.device)
    datamodule.prepare_data()
    datamodule.setup("test")
    calibration = module.calibrate(datamodule)  # fp32
    keys = list(datamodule.test_class_keys)
    scorer = module.evaluator.scorer
    images = differ = 0
    worst = 0.0
    for batch, prediction in module.infer(datamodule.test_dataloader()):
        with torch.no_grad(), torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16):
            low = module.anomaly_maps(batch)
        for i, c in enumerate(batch["class_index"].tolist()):
            stats = calibration.get(keys[c])
            a, b = scorer.score(prediction.select([i]), stats), scorer.score(low.select([i]), stats)
            images += 1
            differ += int(a.anomalous[0] != b.anomalous[0])
            worst = max(worst, abs(float(a.scores[0] - b.scores[0])) / max(abs(stats.threshold), 1e-12))
    print(f"bf16 autocast on {args.device}: {images} test images, {differ} decisions differ from fp32, "
          f"largest score difference {worst:.2e} of the threshold")


if __name__ == "__main__":
    main()
