"""Anomaly-map overlays: image, ground truth, heat map and blend for the highest- and
lowest-scored test images of each class."""

from __future__ import annotations

import logging
from pathlib import Path

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_only
from PIL import Image

log = logging.getLogger(__name__)


def render_overlay(image: np.ndarray, gt: np.ndarray, heat: np.ndarray, vmax: float) -> Image.Image:
    """(S, S, 3) uint8 image, (S, S) bool ground truth, (S, S) map -> one 4-panel PNG row."""
    size = heat.shape[0]
    colours = matplotlib.colormaps["jet"](np.clip(heat / max(vmax, 1e-12), 0, 1))[..., :3]
    heat_rgb = (colours * 255).astype(np.uint8)
    blend = (0.5 * image + 0.5 * heat_rgb).astype(np.uint8)
    gt_rgb = np.repeat((gt.astype(np.uint8) * 255)[..., None], 3, axis=2)
    row = np.concatenate([image, gt_rgb, heat_rgb, blend], axis=1)
    return Image.fromarray(row).resize((4 * size, size))


class AnomalyMapOverlays(Callback):
    """Saves ``<output_dir>/overlays/<dataset>__<class>/{high,low}_<rank>_<type>_<name>.png``.

    Args:
        output_dir: run folder.
        num_images: images per class at each end of the score ranking.
    """

    def __init__(self, output_dir: str, num_images: int = 3) -> None:
        self.output_dir = Path(output_dir)
        self.num_images = num_images

    @rank_zero_only
    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        dataset = getattr(getattr(trainer, "datamodule", None), "test_set", None)
        if dataset is None or not pl_module.test_results:
            return
        written = 0
        for cls, result in pl_module.test_results.items():
            key = pl_module.class_keys[cls] if cls < len(pl_module.class_keys) else str(cls)
            folder = self.output_dir / "overlays" / key.replace("/", "__")
            folder.mkdir(parents=True, exist_ok=True)
            order = torch.argsort(result.image_scores, descending=True).tolist()
            n = min(self.num_images, len(order))
            picks = [("high", r, order[r]) for r in range(n)] + [("low", r, order[-1 - r]) for r in range(n)]
            vmax = float(result.final_maps.max())
            for tag, rank, pos in picks:
                sample = dataset.samples[int(result.sample_index[pos])]
                size = result.final_maps.shape[-1]
                image = torch.from_numpy(dataset.display_image(int(result.sample_index[pos]))).permute(2, 0, 1)[None].float()
                image = F.interpolate(image, size=(size, size), mode="bilinear", antialias=True)[0]
                image = image.clamp(0, 255).permute(1, 2, 0).to(torch.uint8).numpy()
                panel = render_overlay(
                    image, result.gt_masks[pos, 0].cpu().numpy(), result.final_maps[pos, 0].cpu().numpy(), vmax
                )
                score = float(result.image_scores[pos])
                panel.save(folder / f"{tag}_{rank}_{sample.defect_type}_{sample.image_path.stem}_{score:.3f}.png")
                written += 1
        log.info("Wrote %d anomaly-map overlays under %s", written, self.output_dir / "overlays")
