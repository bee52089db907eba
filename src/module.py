"""Lightning wrapper: training steps, the two optimisers, logging and test evaluation.

Training uses manual optimisation because two optimisers step every iteration (SPEC 7.6-7.7):
1. the main objective (patch, global, component, ESB, EIR) with StableAdamW, gradients
   clipped to ``gradient_clip``;
2. the CLUB estimator, maximising the log-likelihood of the expert pairs chosen for EIR.
   ``estimator_update`` chooses its features:

   * ``"second_forward"``: the original's step. After the main update, a second forward pass
     of the batch (no grad, train mode, new dropout masks, new EIR pairs) gives the estimator
     the updated model's features; then the estimator steps.
   * ``"same_forward"`` (default, a documented difference): the estimator trains on the
     *detached* features of the same forward pass and the same pairs, i.e. the features from
     before this step's update. Both losses share one backward pass and the second forward
     pass is saved (about a third of the step time); the estimator lags the experts by one
     update, which shifts EIR slightly from the original's (guarded by
     ``tests/test_trajectory.py``).

Resumable state (saved in every checkpoint, per rank): the random stream of the training
steps (dropout masks, the CLUB shuffles) and ``pair_rng`` (which experts EIR pairs). Training
steps draw from their own stream, not the process-wide one, so what the data loader draws
(colour jitter, worker seeds) cannot shift it: ``N steps + resume + N steps`` repeats ``2N``
steps exactly when the data are the same.
"""

from __future__ import annotations

import copy
import logging
import random
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from lightning import LightningModule
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler

from src.errors import ConfigError
from src.evaluation.calibration import Calibration
from src.evaluation.evaluator import AnomalyEvaluator, ClassEvaluation, NormalCalibrator
from src.evaluation.report import build_report, expert_names, rows_of_test_images
from src.losses import LossTerms, LossWeights, Objective
from src.models.acceleration import accelerate
from src.models.anomalymoe import AnomalyMoE
from src.models.outputs import MoEPrediction, TrainOutput
from src.segment.online import PartSegmentation

log = logging.getLogger(__name__)


def without_masks(batch: dict) -> dict:
    """The batch as an image without component masks reaches the model."""
    return {k: v for k, v in batch.items() if k not in ("masks", "num_masks")}


def _clip(params: list[Tensor], max_norm: float) -> Tensor:
    """Clip the global gradient norm of ``params`` (those with a gradient); returns the norm before."""
    with_grad = [p for p in params if p.grad is not None]
    if not with_grad:
        return torch.zeros(())
    return torch.nn.utils.clip_grad_norm_(with_grad, max_norm)


class AnomalyMoEModule(LightningModule):
    """Args:
    net: the torch model.
    loss: loss coefficients.
    optimizer: partial optimiser for the experts and the gate (called with param groups).
    scheduler: partial LR scheduler for that optimiser, stepped every iteration (or None).
    estimator_optimizer: partial optimiser for the CLUB estimator.
        Both optimisers are needed to train (not to test or predict); their settings live in one
        place, ``module.optimizer`` and ``module.estimator_optimizer`` of ``conf/module/default.yaml``.
    gradient_clip: max global gradient norm of each optimiser's parameters (original: 0.1).
    evaluator: test-time protocol and metrics; defaults to the original's protocol.
    calibrator: statistics of normal images (inductive protocol, decision threshold).
    compile_experts: ``torch.compile`` each patch and global expert with ``compile_backend``
        (applied in ``configure_model``, see :func:`src.models.acceleration.accelerate`).
    channels_last: the global experts in channels-last memory format (faster convolutions on
        recent GPUs).
    estimator_update: ``"same_forward"`` or the original's ``"second_forward"`` (see above).
    """

    ESTIMATOR_UPDATES = ("same_forward", "second_forward")

    def __init__(
        self,
        net: AnomalyMoE,
        loss: LossWeights | None = None,
        optimizer: Callable | None = None,
        scheduler: Callable | None = None,
        estimator_optimizer: Callable | None = None,
        gradient_clip: float = 0.1,
        evaluator: AnomalyEvaluator | None = None,
        calibrator: NormalCalibrator | None = None,
        compile_experts: bool = False,
        channels_last: bool = False,
        compile_backend: str = "inductor",
        estimator_update: str = "same_forward",
    ) -> None:
        super().__init__()
        if estimator_update not in self.ESTIMATOR_UPDATES:
            raise ConfigError(f"module.estimator_update={estimator_update!r} is not one of {list(self.ESTIMATOR_UPDATES)}")
        self.estimator_update = estimator_update
        self.automatic_optimization = False
        self.net = net
        self.loss_weights = loss or LossWeights()
        self.objective = Objective(net.encoder.embed_dim, net.num_experts, self.loss_weights)
        self.estimator = self.objective.estimator  # registered here: checkpoint keys estimator.*
        self.speed_options = {"channels_last": channels_last, "compile_experts": compile_experts,
                              "compile_backend": compile_backend}
        self._accelerated = False
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.estimator_optimizer_factory = estimator_optimizer
        self.gradient_clip = gradient_clip
        self.evaluator = evaluator or AnomalyEvaluator()
        self.val_evaluator = copy.deepcopy(self.evaluator)  # validation (sweeps) keeps its own state
        self.calibrator = calibrator or NormalCalibrator()
        self.step_rng: dict[str, Tensor] | None = None  # random state of the training steps
        self._restored_rng = False
        self.val_results: dict[int, ClassEvaluation] = {}
        self.class_keys: list[str] = []  # "<dataset>/<class>" of the datamodule's class indices (setup)
        self.calibration: Calibration | None = None  # normal-image statistics of the current weights
        self.calibration_source: str | None = None  # "checkpoint" or "computed" (by calibrate)
        self.checkpoint_info: dict | None = None  # {"path", "global_step"}: the file holding these weights
        self.test_results: dict[int, ClassEvaluation] = {}
        self.test_report: dict | None = None
        self.test_scores: list[dict] = []  # one row per test image (scores.csv)
        # Each class's part prototypes from the segmentation cache the model trains on: new images
        # are segmented the same way (mode=predict); None when the masks are not mode=segment's.
        self.segmentation: PartSegmentation | None = None

    def setup(self, stage: str) -> None:
        from src.config_checks import silence_harmless_warnings

        silence_harmless_warnings()  # processes started by trainer=ddp_sim (spawn) do not inherit the filters
        datamodule = self._trainer.datamodule if self._trainer is not None else None
        if datamodule is not None and hasattr(datamodule, "test_class_keys"):
            self.class_keys = list(datamodule.test_class_keys)
        if stage == "fit" and self.net.num_experts[2] > 0 and hasattr(datamodule, "component_class_folders"):
            folders = datamodule.component_class_folders()
            self.segmentation, why = PartSegmentation.from_cache(folders) if folders else (None, "no component masks")
            if self.segmentation is None:
                log.info("New images will be scored without component masks (mode=predict): %s", why)

    @property
    def pair_rng(self) -> random.Random:
        """The random stream that picks the EIR expert pairs (the objective's)."""
        return self.objective.pair_rng

    def configure_model(self) -> None:
        """Apply the speed options once (Lightning calls this before fit, test and predict)."""
        if not self._accelerated:
            accelerate(self.net, **self.speed_options)
            self._accelerated = True

    # ------------------------------------------------------------------ optimisers
    def configure_optimizers(self):
        missing = [name for name, factory in (("optimizer", self.optimizer_factory),
                                              ("estimator_optimizer", self.estimator_optimizer_factory)) if factory is None]
        if missing:
            raise ValueError(f"training needs {' and '.join(f'module.{m}' for m in missing)}: a partial optimiser "
                             "(_partial_: true), as conf/module/default.yaml sets it")
        groups = [{"params": list(m.parameters()), "name": name} for name, m in self.net.trainable_groups().items()]
        groups = [g for g in groups if g["params"]]
        main = self.optimizer_factory(groups)
        est = self.estimator_optimizer_factory(list(self.estimator.parameters()))
        if self.scheduler_factory is None:
            return [main, est]
        return [{"optimizer": main, "lr_scheduler": {"scheduler": self.scheduler_factory(main), "interval": "step"}}, {"optimizer": est}]

    def on_fit_start(self) -> None:
        precision = str(self.trainer.precision)
        if precision.startswith("16"):
            raise ValueError(
                f"trainer.precision={precision} needs a gradient scaler, which the clipping of this "
                "manual-optimisation loop does not handle; use trainer.precision=bf16-mixed or 32."
            )
        if not self._restored_rng:
            # Each process gets its own streams (the original seeds 42 + rank).
            self.pair_rng.seed(self.trainer.global_rank + 1000 * self.current_epoch)
            seed = (torch.initial_seed() + self.trainer.global_rank) % 2**63
            self.step_rng = {"cpu": torch.Generator().manual_seed(seed).get_state()}
            if self.device.type == "cuda":
                with torch.random.fork_rng(devices=[self.device], device_type="cuda"):
                    torch.cuda.manual_seed(seed)
                    self.step_rng["cuda"] = torch.cuda.get_rng_state(self.device)

    # ------------------------------------------------------------------ resumable state
    @contextmanager
    def _step_random_stream(self) -> Iterator[None]:
        """Run the block on the training steps' own random stream, then store where it stands."""
        cuda = self.device.type == "cuda"
        with torch.random.fork_rng(devices=[self.device] if cuda else [], device_type="cuda"):
            if self.step_rng is not None:
                torch.set_rng_state(self.step_rng["cpu"])
                if cuda and self.step_rng.get("cuda") is not None:
                    torch.cuda.set_rng_state(self.step_rng["cuda"], self.device)
            yield
            self.step_rng = {"cpu": torch.get_rng_state()}
            if cuda:
                self.step_rng["cuda"] = torch.cuda.get_rng_state(self.device)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Store every rank's random state (called on all ranks; rank 0 writes the file)."""
        mine = {"pair_rng": self.pair_rng.getstate(), "step_rng": self.step_rng}
        states = [mine]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            states = [None] * dist.get_world_size()
            dist.all_gather_object(states, mine)
        checkpoint["anomalymoe_random_state"] = states
        if self.calibration is not None:
            checkpoint["calibration"] = self.calibration.to_dict()
        if self.segmentation is not None:
            checkpoint["segmentation"] = self.segmentation.to_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Resume: the random streams (the calibration is recomputed when the fit ends)."""
        states = checkpoint.get("anomalymoe_random_state")
        trainer = self._trainer
        rank = trainer.global_rank if trainer is not None else 0
        world = trainer.world_size if trainer is not None else 1
        if not states:
            log.warning("The checkpoint has no random state (older format): EIR pairs and dropout restart from seeds.")
            return
        if len(states) != world:
            log.warning(
                "The checkpoint was written by %d processes, this run has %d: random streams restart from seeds "
                "(weights, optimisers, estimator and step are restored).", len(states), world
            )
            return
        self.pair_rng.setstate(states[rank]["pair_rng"])
        self.step_rng = states[rank]["step_rng"]
        self._restored_rng = True

    def on_train_start(self) -> None:
        self.set_calibration(None)  # the weights are about to change
        self.checkpoint_info = None

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        main_opt, est_opt = self.optimizers()
        # Only the main optimiser's Lightning wrapper steps: Lightning counts global_step per
        # wrapped optimiser step, and trainer.max_steps means training iterations here.
        est_opt = est_opt.optimizer
        main_params = [p for g in main_opt.param_groups for p in g["params"]]
        est_params = [p for g in est_opt.param_groups for p in g["params"]]
        second_forward = self.estimator_update == "second_forward"
        with self._step_random_stream():
            out = self.net.forward_train(*self._inputs(batch))
            terms = self.objective(out)
            main_opt.zero_grad(set_to_none=True)
            est_opt.zero_grad(set_to_none=True)
            if second_forward:
                self.manual_backward(terms.loss)
            else:
                # The estimator's loss and the main objective touch disjoint parameters, so one
                # backward pass serves both.
                self.manual_backward(terms.loss + terms.estimator)
            grad_norm = _clip(main_params, self.gradient_clip)
            lr = main_opt.param_groups[0]["lr"]  # this step's (the scheduler moves it on below)
            main_opt.step()
            if second_forward:
                with torch.no_grad():
                    again = self.net.forward_train(*self._inputs(batch))  # the updated model, new pairs
                    pairs = self.objective.eir_pairs(again)
                terms.estimator = self.objective.estimator_loss(pairs, again.logits)
                if terms.estimator.requires_grad:
                    self.manual_backward(terms.estimator)
        est_grad_norm = _clip(est_params, self.gradient_clip)
        est_opt.step()
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()

        self._log_training(terms, out, grad_norm, est_grad_norm, lr, batch.get("dataset"))
        return terms.loss

    @staticmethod
    def _inputs(batch: dict) -> tuple:
        return batch["image"], batch.get("image_ae"), batch.get("masks"), batch.get("num_masks")

    def _log_training(
        self, terms: LossTerms, out: TrainOutput, grad_norm: Tensor, est_grad_norm: Tensor, lr: float,
        datasets: list[str] | None = None,
    ) -> None:
        logs = {f"train/{k}": v.detach() for k, v in terms.as_dict().items()}
        logs["train/grad_norm"] = grad_norm  # before clipping
        logs["train/estimator_grad_norm"] = est_grad_norm
        logs["train/lr"] = torch.tensor(lr)
        probs = torch.softmax(out.logits.detach(), dim=1)
        logs["train/router_entropy"] = -(probs * probs.clamp_min(1e-12).log()).sum(1).mean()
        mask = out.expert_mask.float()  # (B, E)
        names = expert_names(self.net.num_experts)  # patch0 .., global0 .., component0 .. as in the reports
        load = mask.mean(0)
        logs.update({f"train/load_{name}": load[e] for e, name in enumerate(names)})
        # Per-dataset routing: the fraction of each dataset's images routed to each expert.
        for name in sorted(set(datasets or [])):
            rows = torch.tensor([d == name for d in datasets], device=mask.device)
            share = mask[rows].mean(0)
            logs.update({f"train/routing/{name}/{expert}": share[e] for e, expert in enumerate(names)})
        self.log_dict(logs, on_step=True, on_epoch=False, batch_size=out.logits.shape[0])
        self.log("train/loss_epoch", terms.loss.detach(), on_step=False, on_epoch=True, prog_bar=True,
                 batch_size=out.logits.shape[0], sync_dist=True)  # the mean over processes, once an epoch

    # ------------------------------------------------------------------ validation (sweeps)
    def on_validation_start(self) -> None:
        self.val_evaluator.reset()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.val_evaluator.update(self.anomaly_maps(batch), batch)

    def on_validation_epoch_end(self) -> None:
        """``val/image_auroc`` and ``val/pixel_auroc``: means over classes, the paper's protocol."""
        self.val_results = self.val_evaluator.evaluate()  # gathered over processes
        self.val_evaluator.reset()
        for metric in ("image_auroc", "pixel_auroc"):
            values = [r.metrics[metric] for r in self.val_results.values() if r.metrics.get(metric) is not None]
            if values:
                self.log(f"val/{metric}", sum(values) / len(values), sync_dist=False)

    # ------------------------------------------------------------------ calibration and testing
    def set_calibration(self, calibration: Calibration | None, source: str | None = None) -> None:
        self.calibration, self.calibration_source = calibration, source if calibration is not None else None

    def calibrate(self, datamodule) -> Calibration:
        """Compute the normal-image calibration of the current weights (:mod:`src.evaluation.calibration`).

        The one place it is computed: when a fit ends (before ``last.ckpt`` is written), before a
        test of weights that have none, and in ``mode=predict``. Under several processes each
        scores its share of the images and the statistics are gathered, so every process must
        call it.
        """
        loader = datamodule.normal_dataloader(self.calibrator.images_per_class)
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1:
            sampler = DistributedSampler(loader.dataset, trainer.world_size, trainer.global_rank, shuffle=False)
            loader = DataLoader(loader.dataset, loader.batch_size, sampler=sampler, collate_fn=loader.collate_fn,
                                num_workers=loader.num_workers)
        # With component experts, the same images are also scored without component masks: the
        # statistics of the pipeline that images without masks take (Calibration.unmasked).
        unmasked = copy.deepcopy(self.calibrator) if self.net.num_experts[2] > 0 else None
        for calibrator in filter(None, (self.calibrator, unmasked)):
            calibrator.reset()
            calibrator.class_keys = list(datamodule.test_class_keys)
        with torch.no_grad():
            for batch, prediction in self.infer(loader):
                self.calibrator.update(prediction, batch)
                if unmasked is not None:
                    # A batch without any mask already took the pipeline without masks.
                    has_masks = "num_masks" in batch and bool(batch["num_masks"].any())
                    unmasked.update(self.anomaly_maps(without_masks(batch)) if has_masks else prediction, batch)
        calibration = self.calibrator.evaluate()  # gathered over processes
        self.calibrator.reset()
        if unmasked is not None:
            calibration.unmasked = unmasked.evaluate().stats
        for note in calibration.notes:
            log.warning("calibration: %s", note)
        self.set_calibration(calibration, "computed")
        return calibration

    def infer(self, loader: Iterable[dict]) -> Iterator[tuple[dict, MoEPrediction | None]]:
        """The evaluation forward pass over ``loader``: each batch (moved to the module's device)
        and its raw maps and routing (None for a batch without images). Calibration and
        prediction run it; Lightning's test loop calls the same :meth:`anomaly_maps`."""
        training = self.training
        self.eval()
        try:
            for batch in loader:
                batch = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}
                with torch.no_grad():
                    prediction = self.anomaly_maps(batch) if "image" in batch else None
                yield batch, prediction
        finally:
            self.train(training)

    def on_test_start(self) -> None:
        self.evaluator.reset()
        if self.calibration is None:
            log.info("Calibrating on normal training images before the test")
            self.calibrate(self.trainer.datamodule)
        self._apply_calibration()

    def anomaly_maps(self, batch: dict) -> MoEPrediction:
        """Raw per-group maps and routing of a batch (evaluation forward pass)."""
        return self.net(*self._inputs(batch))

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.evaluator.update(self.anomaly_maps(batch), batch)

    def _apply_calibration(self) -> None:
        """Hand the normal-image statistics of every test class to an inductive evaluator."""
        if self.evaluator.protocol != "inductive":
            return
        missing = [k for k in self.class_keys if k not in self.calibration.stats]
        if missing:
            raise ConfigError(f"the calibration has no statistics for test classes {missing} (it has "
                              f"{sorted(self.calibration.stats)}); set evaluation.recalibrate=true")
        self.evaluator.normalization = {i: self.calibration.stats[k] for i, k in enumerate(self.class_keys)}

    def on_test_epoch_end(self) -> None:
        self.test_results = self.evaluator.evaluate()
        self.evaluator.reset()
        loaders = self.trainer.test_dataloaders if self._trainer is not None else None
        test_set = getattr(loaders[-1] if isinstance(loaders, (list, tuple)) else loaders, "dataset", None)
        samples = getattr(test_set, "samples", None)
        types = [s.defect_type for s in samples] if samples is not None else None  # per-type results
        self.test_report = build_report(self.test_results, self.class_keys, self.evaluator.protocol,
                                        self.net.num_experts, self.calibration, types)
        thresholds = None
        if self.evaluator.protocol == "inductive" and self.calibration is not None:
            thresholds = {k: v.threshold for k, v in self.calibration.stats.items()}
        self.test_scores = [] if samples is None else rows_of_test_images(
            self.test_results, self.class_keys, samples, expert_names(self.net.num_experts), thresholds)
        # The weights tested: the checkpoint they were loaded from or saved to, and its step.
        self.test_report["checkpoint"] = self.checkpoint_info or {"path": None, "global_step": self.trainer.global_step}
        logs = {f"test/{k}": v for k, v in self.test_report["mean"].items() if v is not None}
        for level in ("datasets", "classes"):
            for key, values in self.test_report[level].items():
                logs.update({f"test/{key}/{m}": values[m] for m in self.test_report["metrics"] if values[m] is not None})
                for note in values.get("notes", []):
                    log.warning("%s: %s", key, note)
        self.log_dict(logs, sync_dist=False, rank_zero_only=True, add_dataloader_idx=False)

