"""Sweep summaries (src/summary.py): rows, the table over seeds, the figure, failed and missing jobs,
W&B, mode=summarize, and a real multirun of the demo that ends in its summary."""

from __future__ import annotations

import csv
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from src.summary import SummaryInputError, SweepSummary, find_jobs, summarize, summarize_folders, write_summary
from tests.conftest import ROOT, compose_cfg, small_demo_overrides

METRICS = ["image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro"]


def make_job(folder: Path, overrides: list[str], auroc: dict[str, float] | None = None, record: dict | None = None,
             config: dict | None = None) -> Path:
    """A run folder as a job leaves it: ``.hydra/overrides.yaml``, and optionally ``results.json``
    (image AUROC per dataset, every other metric 0.5), ``job.json`` and ``config.yaml``."""
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if auroc is not None:
        datasets = {name: {m: value if m == "image_auroc" else 0.5 for m in METRICS} for name, value in auroc.items()}
        mean = {m: statistics.fmean(d[m] for d in datasets.values()) for m in METRICS}
        (folder / "results.json").write_text(json.dumps({"metrics": METRICS, "mean": mean, "datasets": datasets}))
    if record is not None:
        (folder / "job.json").write_text(json.dumps(record))
    if config is not None:
        (folder / "config.yaml").write_text(yaml.safe_dump(config))
    return folder


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def seed_sweep(tmp_path) -> Path:
    """top_k 1, 2 x seed 0, 1; job 3 failed after a few seconds, job 4 (top_k 3) never ran."""
    sweep = tmp_path / "sweep"
    common = ["experiment=demo", f"hydra.sweep.dir={sweep}", "+dataset.num_train=8"]
    aurocs = {0: 0.6, 1: 0.8, 2: 0.7}
    for num, (top_k, seed) in enumerate([(1, 0), (1, 1), (2, 0), (2, 1), (3, 0)]):
        record = {"status": "finished", "error": None, "wall_s": 10.0 + num}
        if num == 3:
            error = "2 values cannot work:\n  model.x=1: why\n  model.y=2: why"
            record = {"status": "failed", "error": error, "wall_s": 3.0}
        make_job(sweep / str(num), [*common, f"model.top_k={top_k}", f"seed={seed}"],
                 auroc={"demo": aurocs[num]} if num in aurocs else None, record=record if num < 4 else None)
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    return sweep


def test_rows_hold_the_swept_values_metrics_and_status_of_each_job(seed_sweep):
    summary = summarize(find_jobs([seed_sweep]), seed_sweep)
    # experiment and dataset.num_train are the same for all jobs; hydra.* places them
    assert summary.keys == ["model.top_k", "seed"]
    assert summary.metrics == METRICS  # one dataset: its mean only
    rows = summary.rows()
    assert [r["folder"] for r in rows] == ["0", "1", "2", "3", "4"]
    assert [(r["model.top_k"], r["seed"], r["status"]) for r in rows] == [
        (1, 0, "finished"), (1, 1, "finished"), (2, 0, "finished"), (2, 1, "failed"), (3, 0, "missing")]
    assert [r["image_auroc"] for r in rows] == [0.6, 0.8, 0.7, None, None]
    assert rows[3]["error"] == "2 values cannot work: model.x=1: why model.y=2: why" and rows[3]["wall_s"] == 3.0
    assert rows[4]["wall_s"] is None and rows[4]["error"] is None


def test_files_and_the_table_over_seeds(seed_sweep):
    paths = write_summary(summarize(find_jobs([seed_sweep]), seed_sweep))
    assert set(paths) == {"jobs", "seeds", "figure", "markdown"}
    rows = read_csv(seed_sweep / "summary.csv")
    assert [r["status"] for r in rows] == ["finished", "finished", "finished", "failed", "missing"]
    assert float(rows[1]["image_auroc"]) == 0.8 and rows[4]["image_auroc"] == ""
    seeds = {r["model.top_k"]: r for r in read_csv(seed_sweep / "summary_seeds.csv")}
    assert list(seeds) == ["1", "2", "3"] and [seeds[k]["n"] for k in seeds] == ["2", "1", "0"]
    assert float(seeds["1"]["image_auroc_mean"]) == pytest.approx(0.7)
    assert float(seeds["1"]["image_auroc_std"]) == pytest.approx(statistics.stdev([0.6, 0.8]))
    assert float(seeds["2"]["image_auroc_mean"]) == pytest.approx(0.7) and seeds["2"]["image_auroc_std"] == ""
    text = (seed_sweep / "summary.md").read_text()
    assert "5 job(s): 3 finished, 1 failed, 1 missing" in text
    assert "| 1 | 2 | 70.0 ± 14.1 |" in text  # top_k 1 over seeds 0 and 1, in %
    assert "| 3 | 2 | 1 | failed |" in text and "| 4 | 3 | 0 | missing |" in text


def test_several_datasets_get_columns_each_and_a_line_each(tmp_path):
    for num, (top_k, auroc) in enumerate([(1, {"a": 0.6, "b": 0.9}), (2, {"a": 0.7, "b": 1.0})]):
        make_job(tmp_path / str(num), [f"model.top_k={top_k}"], auroc=auroc, record={"status": "finished"})
    summary = summarize(find_jobs([tmp_path]), tmp_path)
    assert summary.metrics == METRICS + [f"{d}/{m}" for d in ("a", "b") for m in METRICS]
    assert [r["b/image_auroc"] for r in summary.rows()] == [0.9, 1.0]
    assert [r["image_auroc"] for r in summary.rows()] == pytest.approx([0.75, 0.85])
    assert summary.figure_key() == "model.top_k" and "figure" in write_summary(summary)


def test_a_figure_only_for_one_numeric_swept_value(tmp_path):
    def sweep(name: str, overrides: list[list[str]]) -> dict:
        for num, values in enumerate(overrides):
            make_job(tmp_path / name / str(num), values, auroc={"demo": 0.5 + num / 10})
        return write_summary(summarize(find_jobs([tmp_path / name]), tmp_path / name))

    assert "figure" in sweep("lambda", [["module.loss.lambda_eir=1e-5"], ["module.loss.lambda_eir=1e-3"]])
    assert "figure" not in sweep("two", [["model.top_k=1", "module.loss.lambda_eir=0"],
                                         ["model.top_k=2", "module.loss.lambda_eir=1e-4"]])
    assert "figure" not in sweep("text", [["dataset=demo"], ["dataset=visa"]])
    assert not (tmp_path / "text" / "summary.png").exists()


def test_a_value_one_run_does_not_override_is_read_from_its_config(tmp_path):
    """Runs not started together: the value a run did not override is its configured one."""
    a = make_job(tmp_path / "a", ["model.top_k=2", "dataset=demo"], auroc={"demo": 0.6})
    b = make_job(tmp_path / "b", ["dataset=demo"], auroc={"demo": 0.7}, config={"model": {"top_k": 6}})
    summary = summarize(find_jobs([a, b]), tmp_path / "out")
    assert summary.keys == ["model.top_k"] and [r["model.top_k"] for r in summary.rows()] == [2, 6]
    assert [r["folder"] for r in summary.rows()] == [str(a), str(b)]  # outside the output folder: full paths


def test_folders_that_do_not_exist_hold_no_runs_or_damaged_files_are_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SummaryInputError, match=r"absent does not exist; .*empty holds no run folders"):
        find_jobs([tmp_path / "absent", tmp_path / "empty"])


def test_a_damaged_results_file_is_that_jobs_error_and_the_others_are_summarised(tmp_path):
    sweep = tmp_path / "sweep"
    make_job(sweep / "0", ["seed=0"], auroc={"demo": 0.6})
    damaged = make_job(sweep / "1", ["seed=1"], auroc={"demo": 0.7})
    (damaged / "results.json").write_text('{"mean": ')  # a job killed while writing it
    foreign = make_job(sweep / "2", ["seed=2"])
    (foreign / "results.json").write_text(json.dumps({"accuracy": 0.9}))
    rows = summarize(find_jobs([sweep]), sweep).rows()
    assert [r["status"] for r in rows] == ["finished", "failed", "failed"] and rows[0]["image_auroc"] == 0.6
    assert "1/results.json is not valid JSON" in rows[1]["error"]
    assert "2/results.json is not a results.json of this project" in rows[2]["error"]


def test_every_planned_job_of_a_multirun_is_a_row_and_never_started_ones_are_missing(tmp_path):
    sweep = tmp_path / "sweep"
    (sweep / "multirun.yaml").parent.mkdir()
    (sweep / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {"overrides": {"task": ["model.top_k=1,2",
                                                                                          "seed=0,1"]}}}))
    make_job(sweep / "0", ["model.top_k=1", "seed=0"], auroc={"demo": 0.6}, record={"status": "finished"})
    make_job(sweep / "1", ["model.top_k=1", "seed=1"])  # killed while it ran: no record, no results
    rows = summarize_folders([sweep], sweep).rows()
    assert [(r["folder"], r["model.top_k"], r["seed"], r["status"]) for r in rows] == [
        ("0", 1, 0, "finished"), ("1", 1, 1, "missing"), ("2", 2, 0, "missing"), ("3", 2, 1, "missing")]


def test_only_this_projects_folders_are_read_and_written(tmp_path):
    other = tmp_path / "photos"
    other.mkdir()
    (other / "results.json").write_text(json.dumps({"accuracy": 0.9}))  # not ours
    (other / "holiday.jpg").write_bytes(b"jpeg")
    with pytest.raises(SummaryInputError, match="photos holds no run folders"):
        summarize_folders([other], other)
    assert sorted(p.name for p in other.iterdir()) == ["holiday.jpg", "results.json"]
    sweep = tmp_path / "sweep"
    make_job(sweep / "0", ["seed=0"], auroc={"demo": 0.6})
    (sweep / "unrelated").mkdir()
    (sweep / "unrelated" / "results.json").write_text("[1, 2]")
    summary = summarize_folders([sweep], sweep)
    assert [j.folder.name for j in summary.jobs] == ["0"]
    assert "left out unrelated (not this project's run folders)" in (sweep / "summary.md").read_text()
    with pytest.raises(SummaryInputError, match="photos is not a run or multirun folder .*summarize.output"):
        summarize_folders([sweep], other)
    assert sorted(p.name for p in other.iterdir()) == ["holiday.jpg", "results.json"]


def test_the_callback_records_jobs_and_writes_the_summary_at_the_end(tmp_path):
    from hydra.core.utils import JobReturn, JobStatus

    from src.entry import JobError

    sweep = tmp_path / "sweep"
    callback = SweepSummary()
    callback.on_multirun_start(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}}))
    for num, ret in enumerate([JobReturn(status=JobStatus.COMPLETED, _return_value=0.5),
                               JobReturn(status=JobStatus.FAILED, _return_value=JobError("model.top_k=9: too many")),
                               JobReturn(status=JobStatus.FAILED, _return_value=RuntimeError("a bug"))]):
        make_job(sweep / str(num), [f"model.top_k={num + 1}"])
        callback.on_job_start(OmegaConf.create({}), task_function=None)
        callback.on_job_end(OmegaConf.create({"hydra": {"runtime": {"output_dir": str(sweep / str(num))}}}), ret)
    records = [json.loads((sweep / str(n) / "job.json").read_text()) for n in range(3)]
    assert [(r["status"], r["error"]) for r in records] == [
        ("finished", None), ("failed", "model.top_k=9: too many"), ("failed", "RuntimeError: a bug")]
    assert all(r["wall_s"] >= 0 for r in records)
    callback.on_multirun_end(OmegaConf.create({}))
    assert [r["status"] for r in read_csv(sweep / "summary.csv")] == ["finished", "failed", "failed"]
    (sweep / "summary.csv").unlink()
    callback.write()  # written once: the exit handler has nothing left to do
    assert not (sweep / "summary.csv").exists()


def test_the_summary_is_logged_to_wandb_and_a_wandb_failure_keeps_the_files(seed_sweep, monkeypatch, caplog):
    summarize_folders([seed_sweep], seed_sweep, {"_target_": "src.loggers.wandb_logger", "project": "anomalymoe",
                                                 "offline": True, "group": None, "tags": []})
    run = next((seed_sweep / "wandb").glob("offline-run-*"))
    (table,) = (run / "files" / "media" / "table" / "summary").glob("jobs_*.table.json")
    jobs = json.loads(table.read_text())
    assert jobs["columns"][:4] == ["folder", "model.top_k", "seed", "status"] and len(jobs["data"]) == 5
    assert list((run / "files" / "media" / "table" / "summary").glob("seeds_*.table.json"))
    assert list((run / "files" / "media" / "images" / "summary").glob("figure_*.png"))

    def broken(**kwargs):
        raise RuntimeError("no W&B today")

    for name in ("summary.md", "summary.csv"):
        (seed_sweep / name).unlink()
    monkeypatch.setattr("src.loggers.wandb_logger", broken)
    summarize_folders([seed_sweep], seed_sweep, {"project": "anomalymoe"})
    assert (seed_sweep / "summary.md").is_file() and (seed_sweep / "summary.csv").is_file()
    assert "no W&B today" in caplog.text


def test_summarize_mode_reads_folders_only(seed_sweep, tmp_path):
    from src.entry import run_task
    from src.errors import ConfigError

    own = tmp_path / "own"
    run_task(compose_cfg(["mode=summarize", f"summarize.dir={seed_sweep}", f"paths.output_dir={own}"]))
    assert (seed_sweep / "summary.md").is_file() and not own.exists()  # no run folder taken, no config saved
    runs = f"[{seed_sweep / '0'},{seed_sweep / '2'}]"
    run_task(compose_cfg(["mode=summarize", f"summarize.dir={runs}", f"paths.output_dir={own}"]))
    assert [r["folder"] for r in read_csv(own / "summary.csv")] == [str(seed_sweep / "0"), str(seed_sweep / "2")]
    with pytest.raises(ConfigError, match=r"mode=summarize needs summarize.dir="):
        run_task(compose_cfg(["mode=summarize", f"paths.output_dir={own}"]))
    with pytest.raises(ConfigError, match=r"summarize.dir: .*absent does not exist"):
        run_task(compose_cfg(["mode=summarize", f"summarize.dir={tmp_path / 'absent'}", f"paths.output_dir={own}"]))


# --------------------------------------------------------------------------- a real multirun
@pytest.fixture(scope="module")
def demo_sweep(small_demo_root, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """``model.top_k=7,1,2 seed=0,1`` on the small demo, 2 steps per job, logging to csv and W&B:
    top_k=7 (more than the 6 experts) fails both its jobs, which come first."""
    sweep = tmp_path_factory.mktemp("summary") / "sweep"
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.pop("WANDB_API_KEY", None)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), "-m", *small_demo_overrides(small_demo_root), "model.top_k=7,1,2",
         "seed=0,1", "trainer.max_steps=2", "dataset.batch_size=4", "module.scheduler.warmup_steps=1",
         "logger=[csv,wandb]", f"hydra.sweep.dir={sweep}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    return sweep, proc


@pytest.mark.slow
def test_a_multirun_with_a_failed_job_runs_the_others_and_ends_in_its_summary(demo_sweep):
    sweep, proc = demo_sweep
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]  # a job failed
    assert "model.top_k=7: must be between 1 and the number of experts (6)" in proc.stderr
    assert "Traceback" not in proc.stderr
    rows = read_csv(sweep / "summary.csv")
    assert [(r["folder"], r["model.top_k"], r["seed"], r["status"]) for r in rows] == [
        ("0", "7", "0", "failed"), ("1", "7", "1", "failed"), ("2", "1", "0", "finished"), ("3", "1", "1", "finished"),
        ("4", "2", "0", "finished"), ("5", "2", "1", "finished")]
    assert list(rows[0]) == ["folder", "model.top_k", "seed", "status", *METRICS, "wall_s", "error"]
    assert "model.top_k=7: must be between 1" in rows[0]["error"]
    for row in rows[2:]:  # each finished job's own results
        mean = json.loads((sweep / row["folder"] / "results.json").read_text())["mean"]
        assert [float(row[m]) for m in METRICS] == pytest.approx([mean[m] for m in METRICS])
        assert float(row["wall_s"]) > 0 and row["error"] == ""
    seeds = read_csv(sweep / "summary_seeds.csv")
    assert [(r["model.top_k"], r["n"]) for r in seeds] == [("7", "0"), ("1", "2"), ("2", "2")]
    for group, jobs in ((seeds[1], rows[2:4]), (seeds[2], rows[4:6])):
        values = [float(j["image_auroc"]) for j in jobs]
        assert float(group["image_auroc_mean"]) == pytest.approx(statistics.fmean(values))
        assert float(group["image_auroc_std"]) == pytest.approx(statistics.stdev(values))
    assert (sweep / "summary.png").stat().st_size > 0 and "## Over seeds" in (sweep / "summary.md").read_text()


@pytest.mark.slow
def test_the_multirun_shares_a_wandb_group_and_logs_the_summary_once(demo_sweep):
    from tests.test_workflow import read_wandb_records

    sweep, _ = demo_sweep
    groups = {}
    for run_file in sweep.glob("*/wandb/offline-run-*/run-*.wandb"):
        run = next(r.run for r in read_wandb_records(run_file) if r.HasField("run"))
        groups[run_file.parents[2].name] = (run.run_group, run.job_type)
    assert groups == {job: (sweep.name, "") for job in ("2", "3", "4", "5")}  # the failed jobs never started W&B
    (summary_run,) = (sweep / "wandb").glob("offline-run-*/run-*.wandb")
    run = next(r.run for r in read_wandb_records(summary_run) if r.HasField("run"))
    assert (run.run_group, run.job_type) == (sweep.name, "summary")
    (table,) = summary_run.parent.glob("files/media/table/summary/jobs_*.table.json")
    assert [row[3] for row in json.loads(table.read_text())["data"]] == ["failed"] * 2 + ["finished"] * 4


@pytest.mark.slow
def test_summarize_mode_later_gives_the_same_summary(demo_sweep):
    from src.entry import run_task

    sweep, _ = demo_sweep
    before = {name: (sweep / name).read_text() for name in ("summary.md", "summary.csv", "summary_seeds.csv")}
    run_task(compose_cfg(["mode=summarize", f"summarize.dir={sweep}", f"paths.output_dir={sweep / 'again'}"]))
    assert {name: (sweep / name).read_text() for name in before} == before
