"""AnomalyMoE entry point: ``python run.py [mode=train|test|predict|...] [group=option ...] [key=value ...]``.

Composes ``conf/config.yaml`` with Hydra and hands it to :func:`src.entry.run_task`; all logic
lives in the modules. Returns the mode's metric (mean image AUROC), so Hydra sweepers can
optimise it. A user error (data, checkpoint, config) is one message and exit code 1
(``HYDRA_FULL_ERROR=1`` shows its traceback); SIGTERM during training exits with 143.
"""

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

os.environ.setdefault("ANOMALYMOE_ROOT", str(Path(__file__).resolve().parent))


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from src.entry import run_task_reporting_user_errors

    return run_task_reporting_user_errors(cfg)


if __name__ == "__main__":
    main()
