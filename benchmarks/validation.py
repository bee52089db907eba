"""Seconds per 1,000 images of the check run before training (:mod:`data_modules.validate`).

    python benchmarks/validation.py --images 1000 --repeats 3

Writes ``--images`` synthetic full-size images in the MVTec AD layout (half 1024 x 1024 PNG,
half 1500 x 1000 JPEG; a fifth of them anomalous test images with a mask each) and a
component-mask file per image, then times :meth:`AnomalyDataModule.check_samples` for the
``fit`` stage (listing, decoding every image and mask, mask sizes, duplicate names), without
and with reading the component-mask files. The files were just written, so they come from the
page cache, as in a second run over a dataset. Prints one JSON line per check.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from data_modules.components import save_component_masks
from data_modules.datamodule import AnomalyDataModule
from src.measure.images import natural_image


def write_dataset(root: Path, count: int, components: Path | None) -> None:
    rng = np.random.default_rng(0)
    templates = {"png": natural_image(rng, 1024, 1024), "jpg": natural_image(rng, 1500, 1000)}
    masks = {k: Image.fromarray((np.asarray(v)[..., 0] > 128).astype(np.uint8) * 255) for k, v in templates.items()}
    for i in range(count):
        ext = "png" if i % 2 == 0 else "jpg"
        cls = f"{ext}_class"
        split, kind = {4: ("test", "defect"), 3: ("test", "good")}.get(i % 5, ("train", "good"))
        folder = root / cls / split / kind
        folder.mkdir(parents=True, exist_ok=True)
        templates[ext].save(folder / f"{i:04d}.{ext}", quality=95)  # same pixels, separate files
        if kind == "defect":
            (root / cls / "ground_truth" / kind).mkdir(parents=True, exist_ok=True)
            masks[ext].save(root / cls / "ground_truth" / kind / f"{i:04d}_mask.png")
        if components is not None:
            h, w = templates[ext].height, templates[ext].width
            save_component_masks(components / cls / split / kind / f"{i:04d}.npz", np.zeros((2, h, w), bool))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root, components = Path(tmp) / "data", Path(tmp) / "components"
        start = time.perf_counter()
        write_dataset(root, args.images, components)
        print(json.dumps({"wrote_images": args.images, "seconds": round(time.perf_counter() - start, 1)}), flush=True)
        for repeat in range(args.repeats):
            for masks in (None, components):
                dm = AnomalyDataModule({"synthetic": {"root": str(root), "component_masks": masks}}, num_workers=0)
                start = time.perf_counter()
                dm.check_samples("fit")
                seconds = time.perf_counter() - start
                checked = sum(len(m.samples(s)) for m in dm.sources.values() for s in ("train", "test"))
                print(json.dumps({"repeat": repeat, "images": checked, "component_masks": masks is not None,
                                  "seconds": round(seconds, 3),
                                  "seconds_per_1000_images": round(1000 * seconds / checked, 3)}), flush=True)


if __name__ == "__main__":
    main()
