"""Anomaly-map overlays for the highest- and lowest-scored test images of each class:
image, ground truth, heat map over the image, predicted mask."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_only

from src.evaluation.visualize import fit_image, render_panels

log = logging.getLogger(__name__)


class AnomalyMapOverlays(Callback):
    """Saves ``<output_dir>/overlays/<dataset>__<class>/{high,low}_<rank>_<type>_<name>_<score>.png``.

    The heat map's colour scale is shared by the images of a class (0 to the largest kept value);
    the predicted mask is the map at or above the class's best-F1 pixel threshold.

    Args:
        output_dir: run folder.
        num_images: images per class at each end of the score ranking (at most the evaluator's
            ``keep_maps``).
    """

    def __init__(self, output_dir: str, num_images: int = 3) -> None:
        self.output_dir = Path(output_dir)
        self.num_images = num_images

    @rank_zero_only
    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        loaders = trainer.test_dataloaders
        loader = loaders[-1] if isinstance(loaders, (list, tuple)) else loaders
        dataset = getattr(loader, "dataset", None)
        if dataset is None or not pl_module.test_results or self.num_images <= 0:  # evaluation.keep_maps=0: none
            return
        written = 0
        for cls, result in pl_module.test_results.items():
            key = pl_module.class_keys[cls] if cls < len(pl_module.class_keys) else str(cls)
            folder = self.output_dir / "overlays" / key.replace("/", "__")
            folder.mkdir(parents=True, exist_ok=True)
            order = torch.argsort(result.image_scores, descending=True).tolist()
            n = min(self.num_images, len(order))
            picks = [("high", r, order[r]) for r in range(n)] + [("low", r, order[-1 - r]) for r in range(n)]
            vmax = float(result.example_maps.max())
            for tag, rank, pos in picks:
                index = int(result.sample_index[pos])
                heat, gt = result.example(index)
                sample = dataset.samples[index]
                image = fit_image(dataset.display_image(index), heat.shape[-1])
                panel = render_panels(image, heat[0].numpy(), vmax, result.pixel_threshold, gt[0].numpy())
                score = float(result.image_scores[pos])
                panel.save(folder / f"{tag}_{rank}_{sample.defect_type}_{sample.image_path.stem}_{score:.3f}.png")
                written += 1
        log.info("Wrote %d anomaly-map overlays under %s", written, self.output_dir / "overlays")
