"""Pictures: anomaly-map panels and the routing heat map."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
from PIL import Image

matplotlib.use("Agg")


def fit_image(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (size, size, 3) uint8 (bilinear, antialiased), to lie under a map."""
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))


def heat_colours(heat: np.ndarray, vmax: float) -> np.ndarray:
    """(S, S) map -> (S, S, 3) uint8 JET colours of ``heat / vmax`` clipped to [0, 1]."""
    colours = matplotlib.colormaps["jet"](np.clip(heat / max(vmax, 1e-12), 0, 1))[..., :3]
    return (colours * 255).astype(np.uint8)


def mask_panel(mask: np.ndarray) -> np.ndarray:
    """(S, S) bool -> (S, S, 3) uint8, white on black."""
    return np.repeat((mask.astype(np.uint8) * 255)[..., None], 3, axis=2)


def render_panels(
    image: np.ndarray, heat: np.ndarray, vmax: float, threshold: float | None, gt: np.ndarray | None = None
) -> Image.Image:
    """One PNG row: image | ground truth (if given) | heat map over the image | predicted mask.

    ``image`` (S, S, 3) uint8 at the map's size, ``heat`` (S, S), ``gt`` (S, S) bool; masks are
    white on black; the predicted mask is ``heat >= threshold`` (empty when ``threshold`` is None).
    """
    panels = [image]
    if gt is not None:
        panels.append(mask_panel(gt))
    panels.append((0.5 * image + 0.5 * heat_colours(heat, vmax)).astype(np.uint8))
    panels.append(mask_panel(heat >= threshold if threshold is not None else np.zeros(heat.shape, dtype=bool)))
    return Image.fromarray(np.concatenate(panels, axis=1))


def routing_figure(fractions: np.ndarray, rows: Sequence[str], experts: Sequence[str], path: Path) -> Path:
    """Heat map of the fraction of each row's images routed to each expert (cells annotated)."""
    import matplotlib.pyplot as plt

    height = 1.2 + 0.35 * len(rows)
    width = 2.5 + 0.55 * len(experts)
    fig, ax = plt.subplots(figsize=(width, height))
    im = ax.imshow(fractions, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(experts)), experts, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    if fractions.size <= 600:
        for (r, c), value in np.ndenumerate(fractions):
            ax.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=7, color="white" if value < 0.6 else "black")
    ax.set_title("Fraction of test images routed to each expert")
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
