"""Synthetic images for measuring image loading and checking."""

from __future__ import annotations

import numpy as np
from PIL import Image


def natural_image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Smooth shapes plus sensor-like noise: compresses and decodes like a photograph, not like noise."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.zeros((height, width, 3), np.float32)
    for c in range(3):
        fy, fx, phase = rng.uniform(2, 12, 2).tolist() + [rng.uniform(0, 6.3)]
        img[..., c] = 0.5 + 0.3 * np.sin(2 * np.pi * (yy / height * fy + xx / width * fx) + phase)
    img += rng.normal(0, 0.02, img.shape).astype(np.float32)
    return Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8))
