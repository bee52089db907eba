"""The original code's computation structure, built around this project's model for measurements.

Same parameters and same outputs as :class:`~src.models.anomalymoe.AnomalyMoE` (the parity test
checks this structure against the original code's outputs too); only the cost differs:

* every expert runs on every image (``dispatch="dense"``) and the global students run on whole
  images (``student_strip_rows=0``): :data:`ORIGINAL_OPTIONS`, plain model options;
* the encoder runs two full passes per forward, one for the image and one for its jittered copy
  (all blocks), at test time too: :class:`OriginalStructure`;
* after each training update, a second forward pass (no gradient, train mode) only to give the
  CLUB estimator its features: :class:`OriginalTrainingStep`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from src.models.anomalymoe import AnomalyMoE
from src.models.outputs import MoEPrediction
from src.module import AnomalyMoEModule

ORIGINAL_OPTIONS = {"dispatch": "dense", "student_strip_rows": 0}


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


class OriginalTrainingStep(AnomalyMoEModule):
    """The module's training step followed by the original's second forward pass, whose detached
    features train the estimator once more. The cost is the original's (the estimator's extra
    step on this step's features is a few small matrix products); the dynamics are not."""

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        est_opt = self.optimizers()[1].optimizer
        with torch.no_grad():
            again = self.net.forward_train(batch["image"], batch.get("image_ae"), batch.get("masks"),
                                           batch.get("num_masks"))
            pairs = self.objective.eir_pairs(again)
        est_opt.zero_grad(set_to_none=True)
        est_loss = self.objective.estimator_loss(pairs, again.logits)
        if est_loss.requires_grad:
            self.manual_backward(est_loss)
            torch.nn.utils.clip_grad_norm_(list(self.estimator.parameters()), self.gradient_clip)
            est_opt.step()
        return loss
