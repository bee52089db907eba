"""Images per second through the real training DataLoader (448 -> 392, colour-jittered copy).

    python benchmarks/data_loading.py --workers 0 1 2 --batches 30

Writes synthetic full-size images in the MVTec AD layout (``--png`` images of 1024 x 1024
PNG like MVTec AD's large classes and ``--jpg`` images of 1500 x 1000 JPEG like VisA's), builds
the training loader the way ``dataset=[...]`` does (:class:`AnomalyDataModule`, batch 8,
``image``, ``image_ae``, workers as given) and times ``--batches`` batches after ``--warmup``
(worker start-up excluded). Prints one JSON line per setting: images/s overall and per worker.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from data_modules.datamodule import AnomalyDataModule
from src.measure.images import natural_image


def write_dataset(root: Path, num_png: int, num_jpg: int) -> None:
    rng = np.random.default_rng(0)
    for name, count, size, ext in (("png_1024", num_png, (1024, 1024), "png"), ("jpg_1500", num_jpg, (1500, 1000), "JPG")):
        for split, n in (("train", count), ("test", 1)):  # a class needs a test split to pass the checks
            folder = root / name / split / "good"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                natural_image(rng, *size).save(folder / f"{i:03d}.{ext}", quality=95)


def measure(root: Path, workers: int, batches: int, warmup: int, batch_size: int) -> dict:
    dm = AnomalyDataModule(
        sources={"bench": {"kind": "mvtec_ad", "root": str(root)}},
        image_size=392, resize=448, batch_size=batch_size, num_workers=workers,
    )
    dm.setup("fit")
    loader = dm.train_dataloader()
    seen, start = 0, None
    for step, batch in enumerate(_cycle(loader)):
        if step == warmup:
            start, seen = time.perf_counter(), 0
        if step >= warmup:
            seen += batch["image"].shape[0]
        if step + 1 >= warmup + batches:
            break
    elapsed = time.perf_counter() - start
    assert batch["image"].shape[-2:] == (392, 392) and batch["image_ae"].shape == batch["image"].shape
    rate = seen / elapsed
    return {"workers": workers, "batch_size": batch_size, "images": seen, "seconds": round(elapsed, 2),
            "images_per_s": round(rate, 1), "images_per_s_per_process": round(rate / max(workers, 1), 1),
            "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count()}


def _cycle(loader):
    while True:
        yield from loader


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--png", type=int, default=48)
    parser.add_argument("--jpg", type=int, default=48)
    parser.add_argument("--root", type=Path, default=None, help="reuse (or keep) the synthetic images here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or Path(tmp) / "data"
        if not (root / "png_1024").is_dir():
            write_dataset(root, args.png, args.jpg)
        for workers in args.workers:
            print(json.dumps(measure(root, workers, args.batches, args.warmup, args.batch_size)), flush=True)


if __name__ == "__main__":
    main()
