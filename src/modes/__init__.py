"""One module per ``mode=`` value of ``run.py``; each defines ``run(cfg) -> float | None``."""
