"""Sweep summaries: one table of the jobs of a multirun, or of any run folders.

One code path for both ways of making it:

* :class:`SweepSummary`, a Hydra callback (``hydra.callbacks`` in ``conf/hydra/default.yaml``),
  records each job's status, error and wall time as ``job.json`` in the job's folder, and writes
  the summary into the sweep folder when the multirun ends, also when a job failed;
* ``python run.py mode=summarize summarize.dir=<multirun folder>`` (``src/modes/summarize.py``)
  writes the same summary later (SLURM jobs that finished after the launcher, re-summarising,
  runs not started together).

A summary is ``summary.md`` and ``summary.csv`` (one row per job: the swept values, the mean
metrics of ``results.json``, per dataset when there are several, the folder, the wall time, the
status), ``summary_seeds.csv`` and a second Markdown table when ``seed`` was swept (mean, std and
n over seeds), ``summary.png`` (mean image AUROC against the swept value) when exactly one numeric
value besides ``seed`` was swept, and a W&B run with the tables when W&B is on.

The swept values are the command-line overrides (``.hydra/overrides.yaml``) that differ between
the jobs; a job that does not override a key reads it from its ``config.yaml`` (or its group choice
in ``.hydra/hydra.yaml``). A job is ``finished`` or ``failed`` as its ``job.json`` records (a job
without one is ``finished`` when it has a ``results.json``) and ``missing`` without either: not
started, still running, or killed. A multirun folder's ``multirun.yaml`` gives every job the sweep
was to run (Hydra's basic sweeper: the product of the comma-separated overrides), so a job that
never started is a ``missing`` row, not an absent one. A ``job.json`` or ``results.json`` that is
not valid JSON is that job's error (``failed``); the other jobs are still summarised.

Only this project's folders count: a run folder holds ``job.json``, ``config.yaml``, ``.hydra``
or a ``results.json`` of this project (an object with ``metrics`` and ``mean``); any other folder
is left out with a note in the summary. The summary is written only into a multirun folder, a
run folder, a folder of run folders, or a new (empty) folder.
"""

from __future__ import annotations

import atexit
import csv
import json
import logging
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

JOB_RECORD = "job.json"
JOB_MARKERS = (JOB_RECORD, "config.yaml", ".hydra")  # what makes a folder a run's folder (or our results.json)
OWN_FOLDERS = ("wandb",)  # what a summary (its W&B run) writes into the sweep folder
HIDDEN_KEYS = ("hydra.", "paths.")  # overrides that place a job, not what it computes
FIGURE_METRIC = "image_auroc"
ERROR_CHARS = 200


class SummaryInputError(ValueError):
    """A folder to summarise does not exist, holds no run folders, or holds a damaged record."""


@dataclass
class Job:
    """One run folder, read back."""

    folder: Path
    status: str  # finished | failed | missing
    values: dict[str, Any]  # its overrides, key -> value
    metrics: dict[str, float | None]  # "image_auroc" (mean over classes), "<dataset>/image_auroc", ...
    datasets: list[str] = field(default_factory=list)
    wall_s: float | None = None
    error: str | None = None


@dataclass
class Summary:
    """The jobs, with the keys that vary between them (the columns of the table)."""

    jobs: list[Job]
    keys: list[str]  # swept keys, in the order of the overrides
    metrics: list[str]  # metric columns: the means, then per dataset when there are several
    output: Path
    notes: list[str] = field(default_factory=list)  # folders left out, and why

    def folder_name(self, job: Job) -> str:
        return str(job.folder.relative_to(self.output)) if job.folder.is_relative_to(self.output) else str(job.folder)

    def rows(self) -> list[dict[str, Any]]:
        """One row per job: folder, swept values, status, metrics, wall time, error."""
        return [{"folder": self.folder_name(job), **{k: job.values.get(k) for k in self.keys}, "status": job.status,
                 **{m: job.metrics.get(m) for m in self.metrics}, "wall_s": job.wall_s, "error": job.error}
                for job in self.jobs]

    def seed_groups(self) -> list[tuple[dict[str, Any], list[Job]]] | None:
        """The jobs grouped by every swept value except ``seed``; None when ``seed`` was not swept."""
        if "seed" not in self.keys:
            return None
        groups: dict[tuple, tuple[dict[str, Any], list[Job]]] = {}
        for job in self.jobs:
            values = {k: job.values.get(k) for k in self.keys if k != "seed"}
            groups.setdefault(tuple(values.values()), (values, []))[1].append(job)
        return list(groups.values())

    def seed_rows(self) -> list[dict[str, Any]] | None:
        """Per group over seeds: n (jobs with results), then mean and std (n - 1) of each metric."""
        groups = self.seed_groups()
        if groups is None:
            return None
        rows = []
        for values, jobs in groups:
            row = {**values, "n": sum(bool(j.metrics) for j in jobs)}
            for metric in self.metrics:
                mean, std = mean_std([j.metrics.get(metric) for j in jobs])
                row |= {f"{metric}_mean": mean, f"{metric}_std": std}
            rows.append(row)
        return rows

    def figure_key(self) -> str | None:
        """The one numeric swept key besides ``seed``, or None."""
        keys = [k for k in self.keys if k != "seed"]
        if len(keys) != 1:
            return None
        values = [j.values.get(keys[0]) for j in self.jobs]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values if v is not None)
        return keys[0] if numeric and any(v is not None for v in values) else None


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    kept = [v for v in values if v is not None and not math.isnan(v)]
    if not kept:
        return None, None
    return statistics.fmean(kept), statistics.stdev(kept) if len(kept) > 1 else None


# --------------------------------------------------------------------------- reading run folders
def ours(results: Path) -> bool:
    """``results`` is a ``results.json`` written by this project (``metrics`` and ``mean``)."""
    try:
        data = json.loads(results.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and isinstance(data.get("metrics"), list) and isinstance(data.get("mean"), dict)


def is_run_folder(folder: Path) -> bool:
    return folder.is_dir() and (any((folder / marker).exists() for marker in JOB_MARKERS)
                                or ours(folder / "results.json"))


def planned_jobs(sweep: Path) -> list[tuple[Path, list[str]]]:
    """(folder, overrides) of every job ``<sweep>/multirun.yaml`` describes (the basic sweeper's
    product of comma-separated values; jobs in ``<sweep>/<job number>``); empty when it names no
    sweep."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    hydra = (_read_yaml(sweep / "multirun.yaml") or {}).get("hydra") or {}
    task = list((hydra.get("overrides") or {}).get("task") or [])
    params = (hydra.get("sweeper") or {}).get("params") or {}
    task += [f"{k}={v}" for k, v in params.items()]
    if not task:
        return []
    batches = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(task), None)
    jobs = [overrides for batch in batches for overrides in batch]
    return [(sweep / str(num), list(overrides)) for num, overrides in enumerate(jobs)]


def _job_order(folder: Path) -> tuple:
    return (0, int(folder.name), "") if folder.name.isdigit() else (1, 0, folder.name)


def find_jobs(paths: Sequence[str | Path], notes: list[str] | None = None) -> list[Path]:
    """The run folders to summarise: a multirun folder (it holds ``multirun.yaml``, or run folders)
    gives its job folders in job order (with those ``multirun.yaml`` plans that do not exist), a
    run folder itself. Folders that are not this project's are appended to ``notes``. Raises
    :class:`SummaryInputError` naming every path that does not exist or holds no run folder."""
    jobs, problems = [], []
    notes = [] if notes is None else notes
    for path in map(Path, paths):
        path = path.expanduser()
        if not path.is_dir():
            problems.append(f"{path} does not exist" if not path.exists() else f"{path} is not a folder")
        elif is_run_folder(path) and not (path / "multirun.yaml").exists():
            jobs.append(path)
        elif (found := sorted((p for p in path.iterdir() if is_run_folder(p)), key=_job_order)) or (
                path / "multirun.yaml").is_file() and planned_jobs(path):
            planned = [folder for folder, _ in planned_jobs(path)] if (path / "multirun.yaml").is_file() else []
            jobs.extend(sorted(set(found) | set(planned), key=_job_order))
            left = sorted(p.name for p in path.iterdir() if p.is_dir() and p not in found and p not in planned
                          and not p.name.startswith(".") and p.name not in OWN_FOLDERS and any(p.iterdir()))
            if left:
                notes.append(f"{path}: left out {', '.join(left)} (not this project's run folders)")
        else:
            problems.append(f"{path} holds no run folders (a run folder has one of {', '.join(JOB_MARKERS)}, "
                            "or a results.json of this project)")
    if problems:
        raise SummaryInputError("; ".join(problems) + "; give a multirun folder (logs/anomalymoe/multiruns/<time>), "
                          "a run folder, or a list of them ([<folder>,<folder>])")
    return jobs


def _read_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text()) if path.is_file() else None


def job_overrides(folder: Path) -> dict[str, Any]:
    """The job's command-line overrides (``.hydra/overrides.yaml``), key -> value, as Hydra parses
    them (numbers as numbers); lists and dicts as their text. Deletions (``~key``) are left out."""
    return overrides_values(_read_yaml(folder / ".hydra" / "overrides.yaml") or [])


def overrides_values(lines: Sequence[str]) -> dict[str, Any]:
    """Override lines -> key -> value (:func:`job_overrides`)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    values = {}
    for override in OverridesParser.create().parse_overrides(lines):
        if override.is_delete():
            continue
        value = override.value()
        scalar = value is None or isinstance(value, (bool, int, float, str))
        values[override.get_key_element().lstrip("+")] = value if scalar else override.get_value_element_as_str()
    return values


def configured_value(folder: Path, key: str) -> Any:
    """``key`` as the job was configured without overriding it: its group choice or config value."""
    hydra = (_read_yaml(folder / ".hydra" / "hydra.yaml") or {}).get("hydra") or {}
    choices = (hydra.get("runtime") or {}).get("choices") or {}
    if key in choices:
        return choices[key]
    for path in (folder / "config.yaml", folder / ".hydra" / "config.yaml"):
        if path.is_file():
            value = OmegaConf.select(OmegaConf.load(path), key, default=None, throw_on_resolution_failure=False)
            return None if OmegaConf.is_config(value) else value
    return None


def error_line(message: str) -> str:
    """An error message as one line of at most ``ERROR_CHARS`` characters."""
    line = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
    return line if len(line) <= ERROR_CHARS else line[: ERROR_CHARS - 1] + "…"


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise SummaryInputError(f"{path} is not valid JSON ({err}); delete it or rerun that job") from None


def read_job(folder: Path) -> Job:
    """A run folder's status (``job.json``, else whether ``results.json`` exists), overrides,
    metrics (``results.json``: ``mean`` and ``datasets``), wall time and error."""
    try:
        record = _read_json(folder / JOB_RECORD)
        results = _read_json(folder / "results.json")
    except SummaryInputError as err:  # that job's error; the others are still summarised
        return Job(folder=folder, status="failed", values=job_overrides(folder), metrics={}, error=error_line(str(err)))
    if results and not ours(folder / "results.json"):
        return Job(folder=folder, status="failed", values=job_overrides(folder), metrics={},
                   error=error_line(f"{folder / 'results.json'} is not a results.json of this project (no metrics "
                                    "and mean)"))
    metrics, datasets = {}, sorted(results.get("datasets") or {})
    for name in results.get("metrics") or results.get("mean") or []:
        metrics[name] = (results.get("mean") or {}).get(name)
        for dataset in datasets:
            metrics[f"{dataset}/{name}"] = results["datasets"][dataset].get(name)
    status = record.get("status") or ("finished" if results else "missing")
    error = record.get("error")
    return Job(folder=folder, status=status, values=job_overrides(folder), metrics=metrics, datasets=datasets,
               wall_s=record.get("wall_s"), error=error_line(error) if error else None)


def summarize(folders: Sequence[Path], output: Path, notes: Sequence[str] = ()) -> Summary:
    """Read the jobs and find the keys that vary between them (a planned job that has no folder:
    ``missing``, its values from ``multirun.yaml``)."""
    planned = {folder: overrides for sweep in {f.parent for f in folders} if (sweep / "multirun.yaml").is_file()
               for folder, overrides in planned_jobs(sweep)}
    jobs = []
    for folder in folders:
        job = read_job(folder)
        if not folder.exists() and folder in planned:
            job.values = overrides_values(planned[folder])
        jobs.append(job)
    keys = list(dict.fromkeys(k for job in jobs for k in job.values if not k.startswith(HIDDEN_KEYS)))
    for job in jobs:
        for key in keys:
            if key not in job.values:
                job.values[key] = configured_value(job.folder, key)
    keys = [k for k in keys if len({repr(job.values[k]) for job in jobs}) > 1]
    means = list(dict.fromkeys(m for job in jobs for m in job.metrics if "/" not in m))
    datasets = sorted({d for job in jobs for d in job.datasets})
    per_dataset = [f"{d}/{m}" for d in datasets for m in means] if len(datasets) > 1 else []
    return Summary(jobs=jobs, keys=keys, metrics=means + per_dataset, output=output, notes=list(notes))


# --------------------------------------------------------------------------- writing the summary
def _percent(value: float | None, std: float | None = None) -> str:
    """A fraction in % (``86.2``), with its standard deviation when given (``86.2 ± 1.3``)."""
    if value is None:
        return ""
    return f"{100 * value:.1f}" + (f" ± {100 * std:.1f}" if std is not None else "")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    return f"{seconds:.1f} s" if seconds < 60 else f"{int(seconds // 60)} min {seconds % 60:02.0f} s"


def _cell(value: Any) -> str:
    return "" if value is None else str(value).replace("|", "\\|")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def markdown(summary: Summary) -> str:
    """``summary.md``: a count line, the jobs' table and, when ``seed`` was swept, the table over seeds."""
    counts = {s: sum(j.status == s for j in summary.jobs) for s in ("finished", "failed", "missing")}
    lines = [f"# Summary of {summary.output}", "",
             f"{len(summary.jobs)} job(s): " + ", ".join(f"{n} {s}" for s, n in counts.items())
             + ". Metrics in %: means over classes (`results.json`); `<dataset>/<metric>`: that dataset's mean.", ""]
    lines += [f"Note: {note}" for note in summary.notes] + ([""] if summary.notes else [])
    header = ["folder", *summary.keys, "status", *summary.metrics, "wall time", "error"]
    lines += _table(header, [[_cell(summary.folder_name(j)), *(_cell(j.values.get(k)) for k in summary.keys),
                              j.status, *(_percent(j.metrics.get(m)) for m in summary.metrics), _duration(j.wall_s),
                              _cell(j.error)] for j in summary.jobs])
    seed_rows = summary.seed_rows()
    if seed_rows is not None:
        keys = [k for k in summary.keys if k != "seed"]
        lines += ["", "## Over seeds", "",
                  "Mean ± standard deviation over the seeds of each setting; n: jobs with results.", ""]
        lines += _table([*keys, "n", *summary.metrics], [
            [*(_cell(row[k]) for k in keys), str(row["n"]),
             *(_percent(row[f"{m}_mean"], row[f"{m}_std"]) for m in summary.metrics)] for row in seed_rows])
    return "\n".join(lines) + "\n"


def write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else [])
        writer.writeheader()
        writer.writerows(rows)
    return path


def figure(summary: Summary, path: Path) -> Path | None:
    """``summary.png``: mean image AUROC against the one numeric swept value, one line per
    dataset, mean and std over seeds; None when no single numeric value was swept."""
    key = summary.figure_key()
    datasets = sorted({d for j in summary.jobs for d in j.datasets})
    if key is None or not datasets:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = sorted({j.values[key] for j in summary.jobs if j.values.get(key) is not None})
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for dataset in datasets:
        points = []
        for x in xs:
            mean, std = mean_std([j.metrics.get(f"{dataset}/{FIGURE_METRIC}") for j in summary.jobs
                                  if j.values.get(key) == x])
            if mean is not None:
                points.append((x, 100 * mean, 100 * (std or 0.0)))
        if points:
            x, y, err = zip(*points)
            ax.errorbar(x, y, yerr=err if any(err) else None, marker="o", capsize=3, label=dataset)
    if min(xs) > 0 and max(xs) / min(xs) >= 100:
        ax.set_xscale("log")
    ax.set_xlabel(key)
    ax.set_ylabel("image AUROC (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def log_to_wandb(summary: Summary, settings: dict, tables: dict[str, list[dict]], picture: Path | None) -> None:
    """The tables (and the figure) as one W&B run (``job_type=summary``) in the sweep's group,
    with the project's W&B settings (``logger.wandb``); a failure is logged, never raised, so
    that it cannot cost the summary files."""
    try:
        import wandb

        from src.loggers import wandb_logger

        settings = {k: v for k, v in settings.items() if k != "_target_"}
        logger = wandb_logger(**{**settings, "save_dir": str(summary.output), "name": settings.get("name") or "summary",
                                 "group": settings.get("group") or summary.output.name, "job_type": "summary"})
        try:
            for key, rows in tables.items():
                logger.log_table(f"summary/{key}", columns=list(rows[0]), data=[list(r.values()) for r in rows])
            if picture is not None:
                logger.log_image("summary/figure", images=[str(picture)])
        finally:
            wandb.finish()
        log.info("W&B: summary logged (project %s)", logger.name)
    except Exception as err:  # the files are written; W&B holds a copy of them
        log.warning("W&B: the summary could not be logged (%s: %s); the files in %s are complete",
                    type(err).__name__, err, summary.output)


def write_summary(summary: Summary, wandb_settings: dict | None = None) -> dict[str, Path]:
    """Write ``summary.md``, ``summary.csv``, ``summary_seeds.csv`` and ``summary.png`` (when they
    apply) into ``summary.output``, then log them to W&B when ``wandb_settings`` (``logger.wandb``)."""
    out = summary.output
    out.mkdir(parents=True, exist_ok=True)
    tables = {"jobs": summary.rows()}
    paths = {"jobs": write_csv(tables["jobs"], out / "summary.csv")}
    seed_rows = summary.seed_rows()
    if seed_rows is not None:
        tables["seeds"] = seed_rows
        paths["seeds"] = write_csv(seed_rows, out / "summary_seeds.csv")
    picture = figure(summary, out / "summary.png")
    if picture is not None:
        paths["figure"] = picture
    (out / "summary.md").write_text(markdown(summary))
    paths["markdown"] = out / "summary.md"
    if wandb_settings is not None:
        log_to_wandb(summary, wandb_settings, tables, picture)
    return paths


def check_output(output: Path, jobs: Sequence[Path]) -> None:
    """Refuse to write a summary into a folder that is none of: a multirun folder, a run folder,
    the folder of summarised jobs, a new or empty folder."""
    if not output.exists() or not any(output.iterdir()) or (output / "multirun.yaml").is_file() or is_run_folder(
            output) or any(job.parent == output for job in jobs):
        return
    raise SummaryInputError(f"{output} is not a run or multirun folder (it holds other files): the summary is not "
                            "written there; set summarize.output=<a new folder>")


def summarize_folders(paths: Sequence[str | Path], output: str | Path, wandb_settings: dict | None = None) -> Summary:
    """Find the run folders under ``paths``, summarise them into ``output``, print the Markdown."""
    notes: list[str] = []
    folders = find_jobs(paths, notes)
    check_output(Path(output), folders)
    summary = summarize(folders, Path(output), notes)
    written = write_summary(summary, wandb_settings)
    print("\n" + written["markdown"].read_text(), flush=True)
    log.info("Summary of %d job(s): %s", len(summary.jobs), ", ".join(str(p) for p in written.values()))
    return summary


def wandb_settings(cfg: DictConfig) -> dict | None:
    """``logger.wandb`` as plain values when W&B is one of the loggers (its ``save_dir`` is the
    summary's folder, so it is left out), else None."""
    node = OmegaConf.select(cfg, "logger.wandb")
    if not isinstance(node, DictConfig):
        return None
    return {k: OmegaConf.to_container(node[k], resolve=True) if OmegaConf.is_config(node[k]) else node[k]
            for k in node if k != "save_dir"}


# --------------------------------------------------------------------------- the Hydra callback
def record_job(folder: Path, status: str, wall_s: float, error: str | None = None) -> Path:
    """``job.json``: how the job ended (``finished`` or ``failed`` with its error) and its wall time."""
    path = folder / JOB_RECORD
    path.write_text(json.dumps({"status": status, "error": error, "wall_s": round(wall_s, 3),
                                "ended": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2))
    return path


class SweepSummary(Callback):
    """Hydra callback: ``job.json`` at the end of every job, the summary at the end of a multirun.

    Hydra calls ``on_multirun_end`` only when no job failed (its sweepers re-raise a failed job's
    error after the jobs ran); the summary is then written when the process exits instead, so a
    sweep in which some jobs failed still gets one. That exit handler is registered again after
    every job run in this process, so that it runs before the ones libraries registered during the
    jobs (W&B closes its service in one).
    """

    def __init__(self) -> None:
        self.started: float | None = None
        self.sweep: tuple[Path, dict | None] | None = None

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.started = time.perf_counter()

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        from hydra.core.utils import JobStatus
        from hydra.errors import CompactHydraException

        if _rank() != 0:  # processes of one DDP job share its folder
            return
        wall = time.perf_counter() - self.started if self.started is not None else float("nan")
        if job_return.status == JobStatus.COMPLETED:
            status, error = "finished", None
        else:
            err = job_return._return_value  # the exception (the `return_value` property raises it)
            status = "failed"
            error = str(err) if isinstance(err, CompactHydraException) else f"{type(err).__name__}: {err}"
        folder = Path(config.hydra.runtime.output_dir)
        try:
            record_job(folder, status, wall, error)
        except OSError as err:
            log.warning("Could not write %s: %s", folder / JOB_RECORD, err)
        if self.sweep is not None:  # a job of this process's multirun (the basic launcher)
            atexit.unregister(self.write)
            atexit.register(self.write)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.sweep = (Path(str(config.hydra.sweep.dir)), wandb_settings(config))
        atexit.register(self.write)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        atexit.unregister(self.write)
        self.write()

    def write(self) -> None:
        """Summarise the sweep folder; a problem is logged (``mode=summarize`` can redo it)."""
        if self.sweep is None:
            return
        sweep_dir, settings = self.sweep
        self.sweep = None
        try:
            summarize_folders([sweep_dir], sweep_dir, settings)
        except SummaryInputError as err:
            log.warning("No summary of %s: %s", sweep_dir, err)
        except Exception:
            log.exception("The summary of %s failed; retry with: python run.py mode=summarize summarize.dir=%s",
                          sweep_dir, sweep_dir)


def _rank() -> int:
    """This process's global rank, as Lightning reads it from the launcher's environment."""
    from lightning.pytorch.utilities import rank_zero_only

    return getattr(rank_zero_only, "rank", 0)
