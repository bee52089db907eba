"""AnomalyMoE entry point: ``python run.py [mode=train|test|predict] [group=option ...] [key=value ...]``.

Composes ``conf/config.yaml`` with Hydra and hands it to :func:`src.tasks.run_task`; all logic
lives in the modules. Returns the mean image AUROC, so Hydra sweepers can optimise it.
"""

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

os.environ.setdefault("ANOMALYMOE_ROOT", str(Path(__file__).resolve().parent))


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from src.tasks import run_task

    return run_task(cfg)


if __name__ == "__main__":
    main()
