"""Shared test helpers: tiny models and small datasets that run on a CPU in seconds."""

from __future__ import annotations

import os
from pathlib import Path

if os.environ.get("PYTEST_XDIST_WORKER"):  # parallel test processes (pytest -n N): one thread each, not N x cores
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # model hubs are never reachable in tests
os.environ.setdefault("WANDB_MODE", "offline")
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

ROOT = Path(__file__).resolve().parents[1]


def tiny_backbone(embed_dim: int = 32, num_heads: int = 2):
    """Random 12-block DINOv2 with unit LayerScale, so that tokens (and routing) depend on the image."""
    from src.models.backbone import DinoV2Backbone

    return DinoV2Backbone(
        weights="random", arch_overrides={"embed_dim": embed_dim, "num_heads": num_heads, "init_values": 1.0}
    )


def tiny_model(**overrides):
    """A 32-dim AnomalyMoE with 2/2/2 experts and narrow global experts."""
    from src.models.anomalymoe import AnomalyMoE

    kwargs = dict(
        num_patch_experts=2, num_global_experts=2, num_component_experts=2, top_k=2,
        ae_channels=4, student_channels=(8, 16), gate_hidden=16,
    )
    kwargs.update(overrides)
    return AnomalyMoE(tiny_backbone(), **kwargs)


def random_masks(batch: int, size: int, counts: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, K, S, S) random rectangle masks padded to the largest count, and the counts."""
    g = torch.Generator().manual_seed(seed)
    k = max(counts) if counts else 0
    masks = torch.zeros(batch, k, size, size, dtype=torch.uint8)
    for b, n in enumerate(counts):
        for m in range(n):
            y0, x0 = torch.randint(0, size // 2, (2,), generator=g).tolist()
            h, w = torch.randint(size // 4, size // 2, (2,), generator=g).tolist()
            masks[b, m, y0 : y0 + h, x0 : x0 + w] = 1
    return masks, torch.tensor(counts)


def official_fixture(name: str) -> Path:
    """Path of an output file of the original code (``$ANOMALYMOE_FIXTURES``, default
    ``../shared/fixtures``). A missing file skips the calling test module with a visible reason, or
    fails it when ``ANOMALYMOE_REQUIRE_FIXTURES=1`` (as in CI)."""
    path = Path(os.environ.get("ANOMALYMOE_FIXTURES", ROOT.parent / "shared" / "fixtures")) / name
    if not path.is_file():
        if os.environ.get("ANOMALYMOE_REQUIRE_FIXTURES") == "1":
            raise FileNotFoundError(f"fixture {path} is required (ANOMALYMOE_REQUIRE_FIXTURES=1) but missing")
        pytest.skip(f"fixture not found at {path}; set ANOMALYMOE_FIXTURES", allow_module_level=True)
    return path


@pytest.fixture
def seeded():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def small_demo_root(tmp_path_factory) -> Path:
    """A small demo dataset (few images per class), generated once per test session."""
    from data_modules.sources.demo import generate_demo_dataset

    root = tmp_path_factory.mktemp("demo")
    generate_demo_dataset(root, seed=0, size=96, num_train=8, num_test_good=4, num_test_defect=2)
    return root


def compose_cfg(overrides: list[str], hydra_node: bool = False):
    """The project's config composed like ``run.py`` does, with ``overrides`` (set
    ``paths.output_dir`` unless ``hydra_node``: it defaults to Hydra's run folder)."""
    from hydra import compose, initialize_config_dir

    os.environ.setdefault("ANOMALYMOE_ROOT", str(ROOT))
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=hydra_node)


def small_demo_overrides(root: Path) -> list[str]:
    """The demo experiment on ``small_demo_root`` at 84 px (the generator settings match, so nothing is regenerated)."""
    return [
        "experiment=demo", f"dataset.root={root}", f"dataset.component_masks={root}/components_true",
        "+dataset.generate_size=96", "+dataset.num_train=8", "+dataset.num_test_good=4", "+dataset.num_test_defect=2",
        "dataset.image_size=84", "dataset.resize=96",
    ]


@pytest.fixture(scope="session")
def demo_checkpoint(small_demo_root, tmp_path_factory) -> Path:
    """A Lightning-format checkpoint of the demo model (initial weights), without calibration."""
    from hydra.utils import instantiate

    cfg = compose_cfg([*small_demo_overrides(small_demo_root), "seed=0"])
    torch.manual_seed(0)
    module = instantiate(cfg.module, net=instantiate(cfg.model))
    path = tmp_path_factory.mktemp("ckpt") / "demo.ckpt"
    torch.save({"state_dict": module.state_dict()}, path)
    return path
