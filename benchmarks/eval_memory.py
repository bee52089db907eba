"""Peak memory of evaluating one class of VisA-size on synthetic anomaly maps.

    python benchmarks/eval_memory.py --images 2200 --size 392 --protocol paper --memory-budget-mb 512

Feeds ``--images`` synthetic test images (three raw group maps at ``--size`` px, as the model
returns them; half anomalous with a ground-truth blob) through :class:`AnomalyEvaluator` in
batches, then evaluates. Prints one JSON line: the process's peak resident memory (before any
map, after streaming, after evaluating), what the maps would take if held, and the timings.
Run each setting in its own process: the peak is per process.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch
import torch.nn.functional as F

from src.evaluation.calibration import NormalStatistics
from src.evaluation.evaluator import AnomalyEvaluator
from src.models.anomalymoe import MoEPrediction


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def synthetic_batch(start: int, batch: int, size: int, generator: torch.Generator) -> tuple[MoEPrediction, dict]:
    """Maps like the model's: a 28 x 28 token grid upsampled to ``size``; every second image anomalous."""
    grid = torch.rand(batch, 3, 28, 28, generator=generator)
    labels = (torch.arange(start, start + batch) % 2).long()
    gt = torch.zeros(batch, 1, size, size)
    for i in range(batch):
        if labels[i]:
            y, x = torch.randint(0, size - 64, (2,), generator=generator).tolist()
            gt[i, :, y : y + 48, x : x + 64] = 1
            grid[i, :, y * 28 // size : (y + 48) * 28 // size + 1, x * 28 // size : (x + 64) * 28 // size + 1] += 0.5
    maps = F.interpolate(grid, size=(size, size), mode="bilinear")
    weights = torch.softmax(torch.rand(batch, 18, generator=generator), dim=1)
    prediction = MoEPrediction(maps[:, :1], maps[:, 1:2], maps[:, 2:], weights, weights, torch.rand(batch, 3, generator=generator))
    batch_dict = {"index": torch.arange(start, start + batch), "class_index": torch.zeros(batch, dtype=torch.long),
                  "label": labels, "gt_mask": gt}
    return prediction, batch_dict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2200)
    parser.add_argument("--size", type=int, default=392)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--protocol", choices=["paper", "inductive"], default="paper")
    parser.add_argument("--memory-budget-mb", type=float, default=512)
    parser.add_argument("--spill-dir", default=None)
    args = parser.parse_args()

    evaluator = AnomalyEvaluator(protocol=args.protocol, memory_budget_mb=args.memory_budget_mb, spill_dir=args.spill_dir)
    evaluator.normalization = {0: NormalStatistics([0.0] * 3, [1.0] * 3, 0.5, 1, 0.0, 0.0)}
    generator = torch.Generator().manual_seed(0)
    before = peak_mib()
    start = time.perf_counter()
    for first in range(0, args.images, args.batch):
        prediction, batch = synthetic_batch(first, min(args.batch, args.images - first), args.size, generator)
        evaluator.update(prediction, batch)
    streamed, stream_s = peak_mib(), time.perf_counter() - start
    start = time.perf_counter()
    result = evaluator.evaluate()[0]
    evaluate_s = time.perf_counter() - start
    mib = 2**20
    print(json.dumps({
        "images": args.images, "size": args.size, "protocol": args.protocol, "memory_budget_mb": args.memory_budget_mb,
        "peak_rss_mib": {"before_maps": round(before), "after_streaming": round(streamed), "after_evaluate": round(peak_mib())},
        "spilled_chunks": evaluator.store.spilled_chunks, "chunks": evaluator.store.num_chunks,
        "held_if_kept_mib": {
            "raw_full_resolution_maps": round(args.images * 3 * args.size**2 * 4 / mib),
            "smoothed_256_maps": round(args.images * 3 * 256**2 * 4 / mib),
        },
        "seconds": {"stream": round(stream_s, 1), "evaluate": round(evaluate_s, 1)},
        "metrics": {k: None if v is None else round(v, 4) for k, v in result.metrics.items()},
    }))


if __name__ == "__main__":
    main()
