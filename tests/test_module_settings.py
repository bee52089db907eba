"""The Lightning module's settings come from one place, and its logs name experts like the reports."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from hydra.utils import instantiate

from src.evaluation.report import expert_names, routing_summary
from src.module import AnomalyMoEModule
from src.optim import StableAdamW
from tests.conftest import compose_cfg, tiny_model


def test_optimisers_come_from_the_module_config():
    cfg = compose_cfg(["experiment=demo"]).module
    module = instantiate(cfg, net=tiny_model())
    main, est = (entry["optimizer"] for entry in module.configure_optimizers())
    assert isinstance(main, StableAdamW) and isinstance(est, torch.optim.Adam)
    for opt, settings in ((main, cfg.optimizer), (est, cfg.estimator_optimizer)):
        for key in ("lr", "weight_decay"):
            assert opt.defaults[key] == settings[key]
    assert main.defaults["eps"] == cfg.optimizer.eps and main.defaults["amsgrad"] is cfg.optimizer.amsgrad


@pytest.mark.parametrize("given", [{}, {"optimizer": lambda groups: StableAdamW(groups)}])
def test_training_without_optimisers_names_the_missing_setting(given):
    module = AnomalyMoEModule(tiny_model(), **given)
    with pytest.raises(ValueError, match="estimator_optimizer.*conf/module/default.yaml"):
        module.configure_optimizers()


def test_training_logs_name_experts_like_the_reports():
    module = AnomalyMoEModule(tiny_model())  # 2 patch, 2 global, 2 component experts
    logged = {}
    module.log_dict = lambda logs, **kwargs: logged.update(logs)
    module.log = lambda name, value, **kwargs: logged.update({name: value})
    mask = torch.tensor([[1, 0, 1, 0, 0, 1], [0, 1, 1, 0, 1, 0]])
    out = SimpleNamespace(logits=torch.randn(2, 6), expert_mask=mask)
    terms = SimpleNamespace(loss=torch.tensor(1.0), as_dict=lambda: {"loss": torch.tensor(1.0)})
    module._log_training(terms, out, torch.tensor(0.5), torch.tensor(3.0), 1e-3, ["demo", "visa"])
    names = expert_names(module.net.num_experts)
    assert names == ["patch0", "patch1", "global0", "global1", "component0", "component1"]
    assert {k for k in logged if k.startswith("train/load_")} == {f"train/load_{n}" for n in names}
    assert logged["train/load_global0"] == 1.0 and logged["train/routing/visa/component0"] == 1.0
    assert float(logged["train/lr"]) == pytest.approx(1e-3) and float(logged["train/estimator_grad_norm"]) == 3.0
    assert routing_summary({}, module.net.num_experts)["experts"] == names  # results.json, routing.png
