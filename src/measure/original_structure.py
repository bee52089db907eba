"""The original code's computation structure, built around this project's model for measurements.

Same parameters and same outputs as :class:`~src.models.anomalymoe.AnomalyMoE` (the parity test
checks this structure against the original code's outputs too); only the cost differs:

* every expert runs on every image (``dispatch="dense"``) and the global students run on whole
  images (``student_strip_rows=0``): :data:`ORIGINAL_OPTIONS`, plain model options;
* the encoder runs two full passes per forward, one for the image and one for its jittered copy
  (all blocks), at test time too: :class:`OriginalStructure`;
* after each training update, a second forward pass (no gradient, train mode, new EIR pairs)
  only to give the CLUB estimator its features, then one estimator step: the module option
  :data:`ORIGINAL_STEP` (``module.estimator_update=second_forward``), which
  ``tests/test_trajectory.py`` checks against five steps of the original training loop.
"""

from __future__ import annotations

import torch
from torch import Tensor

from src.models.anomalymoe import AnomalyMoE
from src.models.outputs import MoEPrediction

ORIGINAL_OPTIONS = {"dispatch": "dense", "student_strip_rows": 0}
ORIGINAL_STEP = {"estimator_update": "second_forward"}  # options of the Lightning module


class OriginalStructure(AnomalyMoE):
    """AnomalyMoE with the original's encoder passes (build it with :data:`ORIGINAL_OPTIONS`)."""

    def encode(self, image: Tensor, image_ae: Tensor | None):
        if image_ae is None:
            return super().encode(image, None)
        with torch.no_grad():
            out = self.encoder(image, self.target_layers)
            ae = self.encoder(image_ae, self.target_layers)  # all blocks, a separate pass
        return out.taps, ae.taps, out.cls, out.grid

    def forward_eval(self, image, image_ae=None, masks=None, num_masks=None) -> MoEPrediction:
        with torch.no_grad():  # the original encodes the jittered copy at test time too, unused
            self.encoder(image if image_ae is None else image_ae, self.target_layers)
        return super().forward_eval(image, image_ae, masks, num_masks)
