"""The benchmark harness: both structures run and agree; mode=benchmark reports to its run folder and
appends rows to BENCHMARKS.md only when asked (``benchmark.write=true``)."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest
import torch

from src.measure.model_speed import INFERENCE_STEPS, STRUCTURES, BenchmarkSettings, make_batch, run_benchmark
from src.measure.original_structure import ORIGINAL_OPTIONS, ORIGINAL_STEP, OriginalStructure
from src.measure.report import DETAILED_HEADER, append_detailed_rows, append_to_benchmarks, format_report
from src.measure.training_step import time_training
from src.entry import run_task
from src.models.anomalymoe import AnomalyMoE
from src.modes.benchmark import settings_from_config
from src.optim import StableAdamW
from src.module import AnomalyMoEModule
from tests.conftest import ROOT, compose_cfg, tiny_backbone

TINY = dict(num_patch_experts=2, num_global_experts=2, num_component_experts=2, top_k=2, ae_channels=4,
            student_channels=(8, 16), gate_hidden=16)


def build_net(net_class=AnomalyMoE, **options) -> AnomalyMoE:
    return net_class(tiny_backbone(), **{**TINY, **options})


def build_module(net, **options):
    return AnomalyMoEModule(net, **options, optimizer=partial(StableAdamW, lr=5e-4), estimator_optimizer=partial(torch.optim.Adam, lr=5e-4))


def settings(**kw) -> BenchmarkSettings:
    base = dict(name="unit", device="cpu", image_size=56, train_batch_size=2, infer_batch_sizes=(1, 2), num_masks=2,
                warmup=0, iterations=1, expert_scaling=(2, 3), scaling_batch_size=1)
    base.update(kw)
    return BenchmarkSettings(**base)


@pytest.mark.slow
def test_benchmark_runs_both_structures_and_they_agree(tmp_path):
    results = run_benchmark(build_net, settings(), build_module)
    assert set(results["training"]) == {*STRUCTURES, "ours, original's estimator step"}
    assert all(v["seconds"] > 0 for v in results["inference"].values())
    assert all(v["seconds"] > 0 and v["peak_bytes"] >= 0 for v in results["training"].values())
    assert max(results["max_output_diff"].values()) <= 1e-5
    assert set(results["scaling"]) == {(s, n) for s in STRUCTURES for n in (2, 3)}
    report = format_report(results)
    assert "| ours |" in report and "inference_speedup_b2" in report and "training_speedup_same_forward_estimator" in report
    assert set(results["steps"]) == {"batch_size", *INFERENCE_STEPS} and "+ sparse dispatch" in report

    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\n## Data loading\n\n| a |\n|---|\n| 1 |\n")
    append_to_benchmarks(results, path)
    append_to_benchmarks(results, path)
    append_detailed_rows(results, path)
    text = path.read_text()
    assert text.count("| unit |") == 2 + 7 and "## Data loading" in text and "| 1 |" in text
    section = text[text.index("## Model speed"):text.index("## Paper model on a GPU")]
    assert section.count("\n| ") == 3  # header + two rows
    detailed = text[text.index("## Paper model on a GPU"):]
    assert DETAILED_HEADER in detailed and "| inference, ours | 2 |" in detailed and "| training step, original | 2 |" in detailed


def test_one_structure_with_accelerated_experts_and_no_scaling():
    results = run_benchmark(build_net, settings(structures=("ours",), expert_scaling=(), inference_steps=False,
                                                training_steps=False,
                                                infer_batch_sizes=(2,), channels_last=True, compile_experts=True,
                                                compile_backend="eager"), build_module)
    assert set(results["training"]) == {"ours"} and not results["max_output_diff"] and not results["scaling"]
    assert "| ours |" in format_report(results) and "Ratios" not in format_report(results)


def test_original_structure_gives_the_same_outputs_with_two_encoder_passes(batch_of_two):
    torch.manual_seed(0)
    ours = build_net().eval()
    original = build_net(OriginalStructure, **ORIGINAL_OPTIONS).eval()
    original.load_state_dict(ours.state_dict())
    calls = []
    original.encoder.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    b = batch_of_two
    with torch.no_grad():
        expected, got = ours(b["image"], b["image_ae"], b["masks"], b["num_masks"]), \
            original(b["image"], b["image_ae"], b["masks"], b["num_masks"])
        original.forward_train(b["image"], b["image_ae"], b["masks"], b["num_masks"])
    assert calls == [2, 2, 2, 2], "two separate passes of two images, at test time and in training"
    for name in ("map_patch", "map_global", "map_component", "routing_weights"):
        torch.testing.assert_close(getattr(got, name), getattr(expected, name), atol=1e-5, rtol=1e-5)


@pytest.fixture
def batch_of_two():
    return make_batch(2, 56, 2, torch.device("cpu"))


def test_both_training_steps_update_experts_and_estimator(batch_of_two):
    for name, structure in STRUCTURES.items():
        torch.manual_seed(0)
        module = build_module(build_net(structure.net_class, top_k=6, **structure.options), **structure.module_options)
        before = {k: v.clone() for k, v in module.state_dict().items()}
        timed = time_training(module, batch_of_two, torch.device("cpu"), "fp32", warmup=0, iterations=1)
        assert timed["seconds"] > 0
        after = module.state_dict()
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        assert any(k.startswith("net.patch_experts") for k in changed), name
        assert any(k.startswith("estimator.") for k in changed), name
        assert not any(k.startswith("net.encoder") for k in changed), name
    assert STRUCTURES["ours"].module_options == {}
    assert STRUCTURES["original"].module_options == ORIGINAL_STEP == {"estimator_update": "second_forward"}


def test_variants_override_the_preset_and_unknown_keys_are_refused():
    preset = {"name": "gpu", "device": "cpu", "infer_batch_sizes": [1, 8, 32], "file": "x", "write": True,
              "variants": [{"precision": "fp32"}, {"precision": "bf16", "compile_experts": True, "structures": ["ours"]}]}
    first, second = settings_from_config(preset)
    assert first.infer_batch_sizes == (1, 8, 32) and first.structures == ("ours", "original")
    assert second.precision == "bf16" and second.compile_experts and second.structures == ("ours",)
    with pytest.raises(ValueError, match=r"benchmark.variants\[0\] has unknown keys \['precison'\]"):
        settings_from_config({"variants": [{"precison": "bf16"}]})
    with pytest.raises(ValueError, match="benchmark.structures"):
        settings_from_config({"structures": ["fast"]})


@pytest.mark.parametrize("preset", sorted(p.stem for p in (ROOT / "conf" / "benchmark").glob("*.yaml")))
def test_presets_append_to_benchmarks_md_only_when_asked(preset):
    bench = compose_cfg(["mode=benchmark", f"benchmark={preset}"]).benchmark
    assert bench.write is False
    assert Path(bench.file).resolve() == (ROOT / "BENCHMARKS.md").resolve()  # where benchmark.write=true appends


# mode=benchmark at the smallest size: the tiny model, one batch size, one timed call each.
TINY_RUN = ["mode=benchmark", "model=tiny", "~benchmark.model", "benchmark.device=cpu", "benchmark.image_size=28",
            "benchmark.infer_batch_sizes=[2]", "benchmark.train_batch_size=2", "benchmark.warmup=0",
            "benchmark.iterations=1", "benchmark.expert_scaling=[]", "benchmark.inference_steps=false",
            "benchmark.training_steps=false"]


@pytest.mark.slow
def test_mode_benchmark_reports_to_its_run_folder_and_appends_only_when_asked(tmp_path):
    tracked = (ROOT / "BENCHMARKS.md").read_text()
    copy = tmp_path / "BENCHMARKS.md"  # benchmark.file: the tests never write the project's file
    copy.write_text(tracked)

    run_task(compose_cfg([*TINY_RUN, f"benchmark.file={copy}", f"paths.output_dir={tmp_path / 'plain'}"]))
    assert copy.read_text() == tracked
    report = (tmp_path / "plain" / "benchmark.md").read_text()
    assert report.startswith("Benchmark `cpu_small` on CPU") and "| ours |" in report and "| original |" in report
    assert json.loads((tmp_path / "plain" / "benchmark.json").read_text())["report"].strip() == report.strip()

    run_task(compose_cfg([*TINY_RUN, f"benchmark.file={copy}", f"paths.output_dir={tmp_path / 'written'}",
                          "benchmark.write=true"]))
    added = [line for line in copy.read_text().splitlines() if line not in tracked.splitlines()]
    assert len(added) == 1 and "| cpu_small | CPU (" in added[0]
    section = copy.read_text().split("## Model speed")[1].split("\n## ")[0]
    assert added[0] in section
    assert (tmp_path / "written" / "benchmark.md").is_file()
    assert (ROOT / "BENCHMARKS.md").read_text() == tracked
