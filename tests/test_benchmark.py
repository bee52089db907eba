"""The benchmark harness: both structures run, agree, and rows land in BENCHMARKS.md."""

from __future__ import annotations

import pytest
import torch

from src.benchmark import INFERENCE_STEPS, STRUCTURES, BenchmarkSettings, Trainer, append_to_benchmarks, format_report, make_batch, run_benchmark
from src.losses import LossWeights
from src.module import AnomalyMoEModule
from tests.conftest import tiny_model


def settings(**kw) -> BenchmarkSettings:
    base = dict(name="unit", device="cpu", image_size=56, train_batch_size=2, infer_batch_sizes=(1, 2), num_masks=2,
                warmup=0, iterations=1, expert_scaling=(2, 3), scaling_batch_size=1)
    base.update(kw)
    return BenchmarkSettings(**base)


@pytest.mark.slow
def test_benchmark_runs_both_structures_and_they_agree(tmp_path):
    results = run_benchmark(lambda **kw: tiny_model(**kw), settings())
    assert set(results["training"]) == set(STRUCTURES)
    assert all(v["seconds"] > 0 for v in results["inference"].values())
    assert max(results["max_output_diff"].values()) <= 1e-5
    assert set(results["scaling"]) == {(s, n) for s in STRUCTURES for n in (2, 3)}
    report = format_report(results)
    assert "| ours |" in report and "inference_speedup_b2" in report
    assert set(results["steps"]) == {"batch_size", *INFERENCE_STEPS} and "+ sparse dispatch" in report

    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\n## Data loading\n\n| a |\n|---|\n| 1 |\n")
    append_to_benchmarks(results, path)
    append_to_benchmarks(results, path)
    text = path.read_text()
    assert text.count("| unit |") == 2 and "## Data loading" in text and "| 1 |" in text
    section = text[text.index("## Model speed"):]
    assert section.count("\n| ") == 3  # header + two rows


def test_original_structure_trains_the_estimator_on_a_second_forward():
    batch = make_batch(2, 56, 2, torch.device("cpu"))
    for structure in STRUCTURES:
        torch.manual_seed(0)
        net = tiny_model(top_k=6, **STRUCTURES[structure])
        trainer = Trainer(AnomalyMoEModule(net, LossWeights()), structure)
        before = {k: v.clone() for k, v in trainer.module.state_dict().items()}
        trainer.step(batch)
        after = trainer.module.state_dict()
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        assert any(k.startswith("net.patch_experts") for k in changed), structure
        assert any(k.startswith("estimator.") for k in changed), structure
        assert not any(k.startswith("net.encoder") for k in changed), structure
