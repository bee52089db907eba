"""Bad exported files are refused with one message naming the file and the fix; model.json and
the graph are tied by digests; the runtime decodes PIL images and arrays like files.

One tiny model is exported once for the module (no part prototypes, a 28 px input), with a
``model.json`` of the fields the runtime reads; each test damages a copy.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from src.entry import run_task_reporting_user_errors
from src.inference import Detector, ModelFileError, open_rgb
from tests.conftest import compose_cfg, tiny_model


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """A folder with a sealed model.onnx and model.json, and a copy whose weights lie in model.onnx.data."""
    import onnx

    from src.deploy import DeployableDetector
    from src.evaluation.calibration import Calibration, NormalStatistics
    from src.evaluation.scorer import Scorer
    from src.modes.export import seal, write_onnx

    torch.manual_seed(0)
    net = tiny_model(dispatch="dense", num_component_experts=0).eval()
    stats = {"a/x": NormalStatistics([0.0] * 3, [1.0] * 3, 0.5, 4, 0.3, 0.45),
             "a/y": NormalStatistics([0.0] * 3, [2.0] * 3, 0.25, 4, 0.2, 0.3)}
    stats["all"] = stats["a/x"]
    scorer = Scorer(eval_size=32)
    detector = DeployableDetector(net, scorer, Calibration(1.0, stats), ["a/x", "a/y"], None).eval()
    root = tmp_path_factory.mktemp("exported")
    folder = root / "plain"
    folder.mkdir()
    files = write_onnx(detector, folder / "model.onnx", 28)
    info = {"format": "anomalymoe-onnx", "files": [f.name for f in files], "class_keys": ["a/x", "a/y"],
            "experts": ["patch_0", "patch_1", "global_0", "global_1"], "inputs": ["image", "given_class"],
            "outputs": ["anomaly_map", "score", "anomalous", "class_index", "class_distance", "threshold",
                        "routing_weights"],
            "preprocessing": {"resize": 32, "crop": 28, "segment_size": None},
            "thresholds": {k: v.threshold for k, v in stats.items()}, "statistics": {k: asdict(v) for k, v in stats.items()},
            "decision_rule": "score >= threshold", "notes": [], "scorer": asdict(scorer)}
    (folder / "model.json").write_text(json.dumps(seal(folder / "model.onnx", files, info), indent=2))
    external = root / "external"
    external.mkdir()
    model = onnx.load(str(folder / "model.onnx"))
    onnx.save_model(model, str(external / "model.onnx"), save_as_external_data=True, location="model.onnx.data",
                    size_threshold=0)
    files = [external / "model.onnx", external / "model.onnx.data"]
    info = {k: v for k, v in info.items() if k != "graph_sha256"} | {"files": ["model.onnx", "model.onnx.data"]}
    (external / "model.json").write_text(json.dumps(seal(external / "model.onnx", files, info), indent=2))
    return root


@pytest.fixture
def copy(exported, tmp_path):
    def make(name: str = "plain") -> Path:
        shutil.copytree(exported / name, tmp_path / name)
        return tmp_path / name / "model.onnx"

    return make


def edit_json(path: Path, change) -> None:
    info = json.loads(path.read_text())
    change(info)
    path.write_text(json.dumps(info))


def one_error_line(model: Path, tmp_path: Path, capsys) -> str:
    """The ``Error:`` lines ``mode=predict ckpt_path=<model>`` prints (one expected)."""
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    Image.new("RGB", (40, 40), (90, 90, 90)).save(images / "grey.png")
    cfg = compose_cfg(["mode=predict", f"ckpt_path={model}", f"predict.input={images}",
                       f"paths.output_dir={tmp_path / 'run'}", "logger=none"])
    with pytest.raises(SystemExit):
        run_task_reporting_user_errors(cfg)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def truncated(model: Path) -> None:
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])


def random_bytes(model: Path) -> None:
    model.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())


def not_json(model: Path) -> None:
    model.with_suffix(".json").write_text('{"format": "anomalymoe-onnx", ')


def thresholds_as_strings(model: Path) -> None:
    edit_json(model.with_suffix(".json"), lambda i: i["thresholds"].update({k: str(v) for k, v in i["thresholds"].items()}))


def missing_statistics(model: Path) -> None:
    edit_json(model.with_suffix(".json"), lambda i: i["statistics"].pop("a/y"))


def another_threshold(model: Path) -> None:
    """What another export's model.json would say: valid, but not what the graph was built with."""
    def change(info):
        info["thresholds"]["a/x"] = info["statistics"]["a/x"]["threshold"] = 0.342
    edit_json(model.with_suffix(".json"), change)


def reversed_classes(model: Path) -> None:
    edit_json(model.with_suffix(".json"), lambda i: i["class_keys"].reverse())


def another_graph(model: Path) -> None:
    """The graph of another export beside this model.json (its description differs by one note)."""
    from src.modes.export import seal

    info = json.loads(model.with_suffix(".json").read_text())
    other = model.with_name("other.onnx")
    shutil.copy(model, other)
    seal(other, [other], {**info, "notes": ["another export"]})
    other.replace(model)


BROKEN = {  # damage -> what the message must say (the file named in it, the fix)
    truncated: (r"model\.onnx is not the file .*model\.json describes \(its SHA-256 differs.*copy model\.onnx and model\.json"),
    random_bytes: r"model\.onnx is not the file .*SHA-256 differs",
    not_json: r"model\.json is not JSON .*use the model\.json written with model\.onnx",
    thresholds_as_strings: r"model\.json: thresholds\['a/x'\] must be a number \(found '0\.5'\): use the model\.json",
    missing_statistics: r"model\.json: statistics has no entry for class 'a/y': use the model\.json",
    another_threshold: r"model\.json is not the description of .*model\.onnx \(the graph records another model\.json",
    reversed_classes: r"model\.json is not the description of .*model\.onnx",
    another_graph: r"model\.onnx is not the file .*model\.json describes",
}


@pytest.mark.parametrize("damage", list(BROKEN), ids=[f.__name__ for f in BROKEN])
def test_a_damaged_or_mismatched_file_is_one_error_naming_it(damage, copy, tmp_path, capsys):
    model = copy()
    damage(model)
    with pytest.raises(ModelFileError, match=BROKEN[damage]):
        Detector(model)
    line = one_error_line(model, tmp_path, capsys)
    assert str(model.parent) in line and re.search(BROKEN[damage], line), line
    assert not (tmp_path / "run" / "predictions" / "predictions.json").exists()


def test_missing_weights_file_is_one_error_naming_it(copy, tmp_path, capsys):
    model = copy("external")
    assert Detector(model).predict([Image.new("RGB", (40, 40))]).scores.shape == (1,)
    model.with_name("model.onnx.data").unlink()
    expected = r"model\.onnx\.data not found \(.*model\.json lists it: the graph's weights\): copy model\.onnx, model\.onnx\.data"
    with pytest.raises(ModelFileError, match=expected):
        Detector(model)
    assert "model.onnx.data not found" in one_error_line(model, tmp_path, capsys)


def test_a_pt2_is_one_error_naming_the_onnx_export(tmp_path, capsys):
    model = tmp_path / "model.pt2"
    model.write_bytes(b"PK")
    assert "export.format=onnx" in one_error_line(model, tmp_path, capsys)


def test_pil_images_and_arrays_are_decoded_like_files(copy, tmp_path):
    detector = Detector(copy())
    rng = np.random.default_rng(0)
    deep = rng.integers(0, 65536, (40, 36), dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    colour = rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)
    Image.fromarray(colour).save(tmp_path / "colour.png")
    files = detector.predict([tmp_path / "deep.png", tmp_path / "colour.png"])
    pil = detector.predict([Image.open(tmp_path / "deep.png"), Image.open(tmp_path / "colour.png")])
    arrays = detector.predict([deep, colour])
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")  # a 16-bit file, not converted to 8 bits
    for other in (pil, arrays):
        np.testing.assert_array_equal(other.scores, files.scores)
        np.testing.assert_array_equal(other.maps, files.maps)
    white = detector.predict([Image.fromarray(deep).convert("RGB")])  # what a plain .convert("RGB") gives
    assert (np.asarray(Image.fromarray(deep).convert("RGB")) == 255).mean() > 0.99  # nearly all white
    assert (np.asarray(open_rgb(tmp_path / "deep.png")) == 255).mean() < 0.01
    assert white.scores[0] != files.scores[0]
    with pytest.raises(ValueError, match=r"image 0 \(array \(4, 4\) float32\).*floats have no defined value range"):
        detector.predict([np.zeros((4, 4), np.float32)])


def test_no_images_is_an_empty_result(copy):
    detector = Detector(copy())
    empty = detector.predict([])
    assert empty.scores.shape == (0,) and empty.classes == [] and empty.maps.shape == (0, 32, 32)
    assert empty.routing_weights.shape == (0, len(detector.experts))
    one = detector.predict([Image.new("RGB", (40, 40), (20, 120, 40))])
    assert one.maps.shape[1:] == empty.maps.shape[1:] and one.routing_weights.shape[1:] == empty.routing_weights.shape[1:]
