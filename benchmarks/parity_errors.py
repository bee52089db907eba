"""Largest differences between this model and the original code's outputs on the parity fixture.

    python benchmarks/parity_errors.py [--fixtures ../shared/fixtures]

Loads ``official_tiny.pt`` (the original's reduced model, inputs and outputs) into the model
built as ``tests/test_parity.py`` builds it, for each computation structure (sparse, dense and
the benchmark's "original"), and prints one JSON line per structure: the largest absolute error
of the routing weights, gate logits, raw maps, final 256 px maps and image scores, and the
relative error of each eval-mode training loss. The test asserts the limits; this prints the
margins, which depend on the CPU's floating-point kernels.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the figures of tests/test_parity.py, from its own helpers: tests/ is not installed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fixtures", default=str(ROOT.parent / "shared" / "fixtures"),
                        help="folder holding official_tiny.pt")
    args = parser.parse_args()
    path = Path(args.fixtures) / "official_tiny.pt"
    if not path.is_file():
        sys.exit(f"parity fixture {path} not found: pass --fixtures <folder holding official_tiny.pt>")
    os.environ["ANOMALYMOE_FIXTURES"] = args.fixtures  # read by tests.test_parity at import

    from src.evaluation.evaluator import AnomalyEvaluator
    from src.models.weight_formats import check_and_load, original_to_ours
    from tests.test_parity import STRUCTURES, build_model, eval_mode_losses, padded_masks

    fixture = torch.load(path, map_location="cpu", weights_only=True)
    config, inputs, expected = fixture["config"], fixture["inputs"], fixture["outputs"]
    image, image_ae = inputs["image_st"].float(), inputs["image_ae"].float()
    masks, counts = padded_masks(inputs["masks"])
    for structure in STRUCTURES:
        model = build_model(config, structure)
        check_and_load(model, original_to_ours(dict(fixture["state_dict"])), "fixture")
        model.eval()
        with torch.no_grad():
            prediction = model(image, image_ae, masks, counts)
            out = model.forward_train(image, image_ae, masks, counts)
        errors = {"routing_weights": prediction.routing_weights - expected["routing_weights"],
                  "logits": prediction.logits - expected["raw_logits"]}
        for name in ("map_patch", "map_global", "map_component"):
            errors[name] = getattr(prediction, name) - expected[name]
        evaluator = AnomalyEvaluator(protocol="paper", keep_maps=4, eval_size=config["eval_size"],
                                     kernel_size=config["gaussian_kernel"], sigma=config["gaussian_sigma"],
                                     top_fraction=config["top_percent"])
        evaluator.update(prediction, {"index": torch.arange(4), "class_index": torch.zeros(4, dtype=torch.long),
                                      "label": inputs["labels"], "gt_mask": inputs["gt_masks"]})
        result = evaluator.evaluate()[0]
        errors["final_maps_256"] = result.example_maps[torch.argsort(result.example_index)] - expected["final_maps_256"]
        errors["image_scores"] = result.image_scores - expected["image_scores"]
        line = {"structure": structure, **{k: f"{v.abs().max().item():.1e}" for k, v in errors.items()}}
        for name, value in eval_mode_losses(model, out).items():
            reference = fixture["losses_train_fuse_eval_mode"][name].item()
            line[f"loss_{name}_relative"] = f"{abs(value.item() - reference) / abs(reference):.1e}"
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
