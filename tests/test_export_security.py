"""A ``model.pt2`` runs no code: three crafted archives, each of which makes torch's loader run a
command (it creates a marker file), are refused by ``Detector`` and by ``mode=predict`` before
anything in them is read."""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from src.entry import run_task_reporting_user_errors
from src.inference import Detector, ModelFileError
from tests.conftest import compose_cfg


class Program(torch.nn.Module):
    def forward(self, image, given_class):
        score = image.float().mean((1, 2, 3))
        return score, score > 0, given_class


@pytest.fixture(scope="module")
def clean_archive(tmp_path_factory) -> Path:
    """A genuine ``torch.export`` archive with a dynamic batch (its sizes are sympy expressions, its guards code)."""
    path = tmp_path_factory.mktemp("pt2") / "clean.pt2"
    batch = torch.export.Dim("batch", min=1, max=1024)
    inputs = (torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.full((2,), -1))
    torch.export.save(torch.export.export(Program(), inputs, dynamic_shapes=({0: batch}, {0: batch}), strict=False),
                      str(path))
    return path


class Command:
    """Unpickling it runs ``command``."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        import os

        return os.system, (self.command,)


def pickled_constant(files: dict, top: str, command: str) -> None:
    """(a) a pickle under constants/ named like the tensors and JSON files the old name filter let through."""
    files[f"{top}/data/constants/opaque_obj_0.json"] = pickle.dumps(Command(command))
    files[f"{top}/data/constants/model_constants_config.json"] = json.dumps({"config": {"c": {
        "path_name": "opaque_obj_0.json", "is_param": False, "use_pickle": True, "tensor_meta": None}}}).encode()


def shape_expression(files: dict, top: str, command: str) -> None:
    """(b) an ``expr_str`` of the graph's sizes, which torch's loader hands to sympify."""
    text = files[f"{top}/models/model.json"].decode()
    symbol = "Symbol('s4', positive=True, integer=True)"
    assert symbol in text
    files[f"{top}/models/model.json"] = text.replace(symbol, f"__import__('os').system({command!r}) or {symbol}").encode()


def guard(files: dict, top: str, command: str) -> None:
    """(c) a line of ``guards_code``, which the loaded program evaluates on its first call."""
    text = files[f"{top}/models/model.json"].decode()
    assert '"guards_code": [' in text
    files[f"{top}/models/model.json"] = text.replace(
        '"guards_code": [', f'"guards_code": ["__import__(\'os\').system({command!r}) == 0", ', 1).encode()


@pytest.fixture(params=[pickled_constant, shape_expression, guard], ids=["pickle", "expr_str", "guards_code"])
def attack(request, clean_archive, tmp_path) -> tuple[Path, Path]:
    """(the crafted model.pt2 with a complete model.json beside it, the marker its command would create)."""
    marker = tmp_path / "MARKER"
    path = tmp_path / "export" / "model.pt2"
    path.parent.mkdir()
    with zipfile.ZipFile(clean_archive) as archive:
        files = {name: archive.read(name) for name in archive.namelist()}
    request.param(files, next(iter(files)).split("/")[0], f"touch {marker}")
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    stats = {"low": [0.0] * 3, "high": [1.0] * 3, "threshold": 0.5, "num_images": 1, "score_mean": 0.0, "score_max": 0.0}
    path.with_suffix(".json").write_text(json.dumps({
        "format": "anomalymoe-torch", "class_keys": ["a/x"], "experts": ["patch_0"], "inputs": ["image", "given_class"],
        "outputs": ["score", "anomalous", "class_index"], "notes": [], "decision_rule": "score >= threshold",
        "preprocessing": {"resize": 4, "crop": None, "segment_size": None}, "scorer": {"eval_size": 4},
        "statistics": {"a/x": stats, "all": stats}, "thresholds": {"a/x": 0.5, "all": 0.5}}))
    return path, marker


def test_a_crafted_pt2_runs_nothing_through_the_runtime(attack, tmp_path):
    path, marker = attack
    image = Image.new("RGB", (4, 4), (90, 90, 90))
    with pytest.raises(ModelFileError, match=r"model\.pt2: a torch\.export program cannot be opened .*export\.format=onnx"):
        Detector(path).predict([image])
    assert not marker.exists()


def test_a_crafted_pt2_runs_nothing_through_predict(attack, tmp_path, capsys):
    path, marker = attack
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (4, 4), (90, 90, 90)).save(folder / "grey.png")
    cfg = compose_cfg(["mode=predict", f"ckpt_path={path}", f"predict.input={folder}", f"paths.output_dir={tmp_path / 'run'}",
                       "logger=none"])
    with pytest.raises(SystemExit):
        run_task_reporting_user_errors(cfg)
    assert not marker.exists()
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and str(path) in errors[0] and "export.format=onnx" in errors[0]
    assert not (tmp_path / "run" / "predictions" / "predictions.json").exists()


def test_export_format_torch_is_refused_naming_onnx(tmp_path):
    from src.errors import ConfigError
    from src.modes.export import run

    cfg = compose_cfg(["mode=export", "export.format=torch", f"paths.output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="export.format=torch is not offered: .*export.format=onnx"):
        run(cfg)
