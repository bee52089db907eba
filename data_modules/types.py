"""The data side's vocabulary: a sample, the error every data problem raises, and the file
endings and normalisation every family shares. No local imports, so every other data module
(and the model side) can use these without pulling in loaders or sources.

Every dataset family is normalised to the MVTec AD layout::

    <root>/<class>/train/good/*.png
    <root>/<class>/test/<type>/*.png              (<type> = good or a defect type)
    <root>/<class>/ground_truth/<type>/<stem>_mask.png
    <root>/<class>/validation/<type>/*.png        (optional: a dataset's own validation split)
    <root>/<class>/ground_truth_validation/<type>/<stem>_mask.png
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DataError(RuntimeError):
    """A dataset on disk is missing, incomplete or malformed; the message names the fix."""


@dataclass(frozen=True)
class Sample:
    image_path: Path
    label: int  # 0 normal, 1 anomalous
    split: str  # "train", "test" or "validation"
    defect_type: str  # "good" or the defect folder name
    dataset: str
    class_name: str
    mask_path: Path | None = None  # ground truth of an anomalous test image (None: image label only)

    @property
    def class_key(self) -> str:
        return f"{self.dataset}/{self.class_name}"
