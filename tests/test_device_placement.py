"""Device placement without a GPU: every path that runs on the model's device, with every
parameter, buffer and input on a logical ``cuda`` device (:mod:`tests.logical_device`).

An operation that mixes a ``cuda`` tensor with a non-scalar CPU tensor fails, naming the
line, as it would on the first GPU run.
"""

from __future__ import annotations

from dataclasses import fields
from functools import partial

import pytest
import torch

from src.evaluation.evaluator import AnomalyEvaluator, NormalCalibrator
from src.models.outputs import MoEPrediction
from src.module import AnomalyMoEModule
from src.optim import StableAdamW, warm_cosine_schedule
from tests.conftest import random_masks, tiny_model
from tests.logical_device import CUDA, DeviceMismatch, LogicalCuda, is_cuda, module_on_cuda, on_cuda

SIZE = 56


# ---------------------------------------------------------------------- the checker itself
def test_checker_catches_a_mismatch_and_names_the_line():
    with LogicalCuda():
        x = torch.ones(3, device="cuda")
        with pytest.raises(DeviceMismatch, match=r"tests/test_device_placement.py:\d+: aten.add.Tensor mixes devices"):
            x + torch.arange(3)
        with pytest.raises(DeviceMismatch, match="numpy"):
            x.numpy()


def test_checker_passes_scalars_moves_and_indices():
    with LogicalCuda():
        x = torch.arange(4.0).to("cuda")
        assert x.device == CUDA and is_cuda(x)
        assert is_cuda(x * torch.tensor(2.0))  # a 0-dim CPU tensor is a scalar
        y = x + torch.arange(4).to(x.device)  # .to(device) fixes it
        assert y.device == CUDA and y.tolist() == [0.0, 2.0, 4.0, 6.0]
        assert torch.zeros(2, device=x.device).device == CUDA and torch.zeros(2).device.type == "cpu"
        assert x.cpu().device.type == "cpu" and not is_cuda(x.cpu()) and x.cuda() is x
        assert x[torch.tensor([0, 2])].device == CUDA  # CPU indices index a cuda tensor, as on a GPU
        assert x[x > 1].shape == (2,)  # data-dependent shapes work: the data are real
        x.add_(1)
        assert is_cuda(x) and x.tolist() == [1.0, 2.0, 3.0, 4.0]


def test_checker_tracks_modules_and_gradients():
    with LogicalCuda():
        linear = module_on_cuda(torch.nn.Linear(4, 2))
        assert isinstance(linear.weight, torch.nn.Parameter) and linear.weight.device == CUDA
        linear(torch.randn(3, 4, device="cuda")).sum().backward()
        assert linear.weight.grad.device == CUDA
        torch.optim.Adam(linear.parameters()).step()
        assert is_cuda(linear.weight)
        with pytest.raises(DeviceMismatch, match="aten.addmm"):
            linear(torch.randn(3, 4))


# ---------------------------------------------------------------------- the project's paths
class _Optimizer:
    """What ``LightningModule.optimizers()`` hands a manual-optimisation step, without a trainer."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    def __getattr__(self, name):
        return getattr(self.optimizer, name)


def without_trainer(module: AnomalyMoEModule, logged: dict) -> tuple:
    """Give ``module`` what its training step asks of a Trainer (optimisers, scheduler, backward,
    logging into ``logged``); returns the main and the estimator's optimiser."""
    configured = module.configure_optimizers()
    main, est = configured[0]["optimizer"], configured[1]["optimizer"]
    scheduler = configured[0]["lr_scheduler"]["scheduler"]
    module.optimizers = lambda: (_Optimizer(main), _Optimizer(est))
    module.lr_schedulers = lambda: scheduler
    module.manual_backward = lambda loss: loss.backward()
    module.log_dict = lambda values, **_: logged.update(values)
    module.log = lambda name, value, **_: logged.update({name: value})
    return main, est


@pytest.fixture
def cuda_rng(monkeypatch):
    """The CUDA random-state calls of the training step, served by the CPU's."""
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device=None: torch.get_rng_state())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device=None: None)
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: None)


def _batch(counts=(2, 0, 1), with_masks=True) -> dict:
    torch.manual_seed(0)
    batch = {"image": torch.rand(len(counts), 3, SIZE, SIZE)}
    if with_masks:
        batch["masks"], batch["num_masks"] = random_masks(len(counts), SIZE, list(counts))
    return batch


def _module(**kwargs) -> AnomalyMoEModule:
    torch.manual_seed(0)
    return AnomalyMoEModule(
        tiny_model(**kwargs), optimizer=partial(StableAdamW, lr=1e-3),
        scheduler=partial(warm_cosine_schedule, total_steps=10, warmup_steps=2, final_lr=1e-5),
        estimator_optimizer=partial(torch.optim.Adam, lr=1e-3))


@pytest.mark.parametrize("estimator_update", ["same_forward", "second_forward"])
def test_training_step_on_cuda(cuda_rng, estimator_update):
    """Both optimisers, every loss term (patch, global, component, ESB, EIR) and the logging."""
    module = _module()
    module.estimator_update = estimator_update
    logged = {}
    with LogicalCuda():
        module_on_cuda(module)
        main, est = without_trainer(module, logged)
        batch = {k: on_cuda(v) for k, v in _batch().items()}
        batch["dataset"] = ["demo", "demo", "other"]
        loss = module.training_step(batch, 0)
        assert loss.device == CUDA and torch.isfinite(loss.elem)
        assert all(p.device == CUDA for p in module.parameters())
        assert all(t.device == CUDA for t in logged.values() if torch.is_tensor(t) and t.dim() > 0)
        for term in ("esb", "eir", "estimator", "component"):
            assert torch.isfinite(logged[f"train/{term}"].elem), term
        assert all(p.device == CUDA for group in est.param_groups for p in group["params"])
        states = [v for state in main.state.values() for v in state.values() if torch.is_tensor(v) and v.dim()]
        assert states and all(is_cuda(v) for v in states)


@pytest.mark.parametrize("dispatch", ["sparse", "dense"])
@pytest.mark.parametrize("with_masks", [True, False])
def test_inference_on_cuda(dispatch, with_masks):
    model = tiny_model(top_k=2, dispatch=dispatch).eval()
    batch = _batch(with_masks=with_masks)
    with torch.no_grad():
        expected = model(*(batch.get(k) for k in ("image", "image_ae", "masks", "num_masks")))
    with LogicalCuda(), torch.no_grad():
        module_on_cuda(model)
        got = model(*(on_cuda(batch[k]) if k in batch else None for k in ("image", "image_ae", "masks", "num_masks")))
    for name in ("map_patch", "map_global", "map_component"):
        value = getattr(got, name)
        assert value.device == CUDA, name
        torch.testing.assert_close(value.elem, getattr(expected, name))


def _prediction_and_batch(n: int = 4) -> tuple[MoEPrediction, dict]:
    g = torch.Generator().manual_seed(0)
    maps = [torch.rand(n, 1, SIZE, SIZE, generator=g) for _ in range(3)]
    prediction = MoEPrediction(*maps, torch.rand(n, 3, generator=g), torch.rand(n, 3, generator=g),
                               torch.rand(n, 3, generator=g))
    gt = torch.zeros(n, 1, SIZE, SIZE)
    gt[n // 2:, :, 10:20, 10:20] = 1
    batch = {"index": torch.arange(n), "class_index": torch.zeros(n, dtype=torch.long),
             "label": (torch.arange(n) >= n // 2).long(), "gt_mask": gt,
             "image_path": [f"{i}.png" for i in range(n)]}
    return prediction, batch


def _on_cuda_all(prediction: MoEPrediction, batch: dict) -> tuple[MoEPrediction, dict]:
    moved = type(prediction)(*(on_cuda(getattr(prediction, f.name)) for f in fields(prediction)))
    return moved, {k: on_cuda(v) if torch.is_tensor(v) else v for k, v in batch.items()}


def test_evaluator_update_and_calibration_on_cuda():
    """A test step's evaluator update and the calibration, on a batch that Lightning moved to the GPU."""
    prediction, batch = _prediction_and_batch()
    expected = AnomalyEvaluator(eval_size=32)
    expected.update(prediction, batch)
    expected = expected.evaluate()[0].metrics
    with LogicalCuda():
        evaluator, calibrator = AnomalyEvaluator(eval_size=32), NormalCalibrator(eval_size=32)
        calibrator.class_keys = ["demo/a"]
        evaluator.update(*_on_cuda_all(prediction, batch))
        calibrator.update(*_on_cuda_all(prediction, batch))
        got = evaluator.evaluate()[0].metrics
        calibration = calibrator.evaluate()
    assert got == pytest.approx(expected, nan_ok=True)
    assert calibration.stats["demo/a"].threshold is not None


def test_online_segmentation_on_cuda():
    """The cluster route with the model's encoder on the GPU (mode=predict segments new images)."""
    from src.segment.cluster import ClusterSegmenter
    from src.segment.features import BackboneFeatures

    model = tiny_model().eval()
    torch.manual_seed(0)
    images = [torch.rand(3, SIZE, SIZE) for _ in range(3)]
    expected_segmenter = ClusterSegmenter(BackboneFeatures(model.encoder, [3, 5], "cpu"), coreset_ratio=0.5)
    prototypes = expected_segmenter.fit(images[:2], k=2)
    expected = expected_segmenter.segment(prototypes, images[2])
    with LogicalCuda():
        module_on_cuda(model)
        segmenter = ClusterSegmenter(BackboneFeatures(model.encoder, [3, 5], "cuda"), coreset_ratio=0.5)
        got = segmenter.segment(segmenter.fit(images[:2], k=2), images[2])
    assert torch.equal(got, expected)
