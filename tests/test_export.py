"""The exported model scores like the checkpoint, and its runtime needs no training stack.

Fast tests check the pieces the graph and the runtime replace (3x3 inverses, batched refinement,
index maps of the nearest resizes); the slow one exports the small demo model trained in
``tests/test_predict_path.py`` and predicts with the file.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data_modules.dataset import AnomalyTransforms
from data_modules.io import open_image
from src.inference import Detector, ImageError, graph_inputs, mask_index, nearest_index, onnx_runner, open_rgb
from src.models.experts import legacy_nearest_index
from src.modes.export import parity
from src.segment.refine import RefineSettings, inverse_3x3, refine
from src.segment.runner import resize_masks
from tests.conftest import ROOT, compose_cfg, tiny_model
from tests.test_predict_path import overrides, trained  # noqa: F401  (the trained demo model, module-scoped)


def test_cofactor_inverse_and_batched_refinement_match_the_segmentation(seeded):
    images = torch.rand(2, 3, 40, 40)
    logits = 5 * torch.randn(2, 4, 40, 40)
    one_by_one = torch.stack([refine(logits[i], images[i], RefineSettings()) for i in range(2)])
    assert torch.equal(refine(logits, images, RefineSettings()), one_by_one)
    exported = refine(logits, images, RefineSettings(), exported=True)
    torch.testing.assert_close(exported, one_by_one, atol=1e-5, rtol=0)
    matrices = torch.rand(50, 3, 3) @ torch.rand(50, 3, 3).mT + 1e-3 * torch.eye(3)
    torch.testing.assert_close(inverse_3x3(matrices), torch.linalg.inv(matrices), atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("size", [84, 96, 112, 392, 448, 1024])
def test_index_maps_equal_torchs_nearest_resizes(size):
    for out in (6, 8, 28, 32):
        ref = F.interpolate(torch.arange(size, dtype=torch.float32)[None, None, None], size=(1, out), mode="nearest")
        assert torch.equal(legacy_nearest_index(size, out), ref[0, 0, 0].long())
    for out in (84, 96, 100, 448, 900):
        ref = F.interpolate(torch.arange(size, dtype=torch.float32)[None, None, None], size=(1, out), mode="nearest-exact")
        assert np.array_equal(nearest_index(size, out), ref[0, 0, 0].long().numpy())


@pytest.mark.parametrize("height,width", [(96, 96), (120, 90), (333, 517)])
def test_mask_index_carries_masks_like_predict(height, width):
    """Masks at the segmentation size -> the image's size -> the model's input, as mode=predict."""
    segment_size, transforms = 84, AnomalyTransforms(resize=96, crop=84)
    labels = torch.randint(0, 5, (segment_size, segment_size))
    masks = labels[None] == torch.arange(5)[:, None, None]  # (5, s, s)
    expected = transforms.masks(resize_masks(masks, (height, width))).bool()
    rows = mask_index(height, segment_size, 96, 84)
    cols = mask_index(width, segment_size, 96, 84)
    assert torch.equal(masks[:, rows][:, :, cols], expected)


@pytest.mark.parametrize("features", ["color", "backbone"])
def test_the_graphs_class_choice_and_masks_are_the_online_segmenters(features, small_demo_root, seeded):
    """Colour or backbone prototypes: the graph's masks (eager) are those mode=predict computes for the file."""
    from src.deploy import DeployableDetector
    from src.evaluation.calibration import Calibration, NormalStatistics
    from src.evaluation.scorer import Scorer
    from src.segment.cluster import ClusterSegmenter
    from src.segment.features import BackboneFeatures, ColorFeatures
    from src.segment.online import ClassParts, OnlineSegmenter, PartSegmentation
    from src.segment.runner import load_for_segmentation

    net, size = tiny_model(dispatch="dense").eval(), 70  # 70 px: the colour cells of 3 px overhang the border
    dense = ColorFeatures("lab", stride=3) if features == "color" else BackboneFeatures(net.encoder, [2, 5])
    segmenter = ClusterSegmenter(dense, coreset_ratio=0.5, refine_settings=RefineSettings(iterations=2))
    classes = {}
    for name, kept in (("widget", [0, 2]), ("fabric", [1])):
        train = sorted((small_demo_root / name / "train" / "good").glob("*.png"))[:3]
        classes[f"demo/{name}"] = ClassParts(segmenter.fit([load_for_segmentation(p, size)[0] for p in train], 3), kept)
    parts = PartSegmentation({"route": "cluster", "image_size": size, **segmenter.describe()}, classes)
    stats = NormalStatistics([0.0] * 3, [1.0] * 3, 0.5, 1, 0.0, 0.0)
    calibration = Calibration(1.0, {k: stats for k in [*classes, "all"]})
    detector = DeployableDetector(net, Scorer(), calibration, list(classes), parts).eval()
    online = OnlineSegmenter(parts, net.encoder)
    transforms = AnomalyTransforms(resize=96, crop=84)
    paths = [p for name in ("widget", "fabric") for p in sorted((small_demo_root / name / "test").rglob("*.png"))[:2]]
    feed = {k: torch.from_numpy(v) for k, v in graph_inputs([open_image(p) for p in paths], 96, 84, size).items()}
    with torch.no_grad():
        masks, counts, chosen, _ = detector.component_masks(feed["segment_image"], feed["given_class"],
                                                            feed["mask_rows"], feed["mask_cols"])
    for i, path in enumerate(paths):
        expected, choice = online.segment(path)
        assert list(classes)[int(chosen[i])] == choice.key == f"demo/{path.parts[-4]}"
        assert int(counts[i]) == len(classes[choice.key].kept)
        assert torch.equal(masks[i, : counts[i]], transforms.masks(expected)), path


def test_the_colour_grid_exports_with_cells_cut_by_the_border(tmp_path):
    """ONNX's average pooling of the cells the border cuts (ceil mode) divides by the pixels inside, as torch."""
    import onnxruntime as ort

    from src.segment.features import color_grid

    class Grid(torch.nn.Module):
        def forward(self, images):
            return color_grid(images, "lab", 3)

    images = torch.rand(2, 3, 70, 50)
    torch.onnx.export(Grid().eval(), (images,), str(tmp_path / "grid.onnx"), dynamo=True, verbose=False)
    out = ort.InferenceSession(str(tmp_path / "grid.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"images": images.numpy()})[0]
    expected = color_grid(images, "lab", 3)
    assert out.shape == (2, 3, 24, 17)
    np.testing.assert_allclose(out, expected.numpy(), rtol=0, atol=1e-4 * float(expected.abs().max()))


def test_the_runtime_refuses_images_like_the_data_pipeline(tmp_path):
    from PIL import Image

    missing = tmp_path / "missing.png"
    with pytest.raises(ImageError, match=f"image {missing} does not exist"):
        open_rgb(missing)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    with pytest.raises(ImageError, match=f"cannot read image {broken}.*Replace or remove"):
        open_rgb(broken)
    large = tmp_path / "large.png"
    Image.new("RGB", (40, 30)).save(large)
    with pytest.raises(ImageError, match=f"image {large} is 40x30 .* above the limit of 1000 pixels"):
        open_rgb(large, max_pixels=1000)
    floats = tmp_path / "floats.tif"
    Image.fromarray(np.ones((4, 4), np.float32)).save(floats)
    with pytest.raises(ImageError, match=f"image {floats} holds 32-bit floats"):
        open_rgb(floats)


def test_the_runtime_opens_images_as_the_data_pipeline(tmp_path):
    """Upright by the EXIF orientation (a camera's portrait photo), 16-bit scaled: the same pixels as open_image."""
    from PIL import Image

    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8))
    exif = photo.getexif()
    exif[0x0112] = 6  # turn 90 degrees clockwise
    photo.save(tmp_path / "photo.jpg", exif=exif)
    Image.fromarray(rng.integers(0, 65536, (20, 30), dtype=np.uint16)).save(tmp_path / "deep.png")
    for name in ("photo.jpg", "deep.png"):
        ours, pipeline = np.asarray(open_rgb(tmp_path / name)), np.asarray(open_image(tmp_path / name))
        assert ours.shape == pipeline.shape and np.array_equal(ours, pipeline), name
    assert np.asarray(open_rgb(tmp_path / "photo.jpg")).shape == (40, 30, 3)


def test_the_check_fails_on_a_score_a_class_or_a_nan():
    def record(score, key="a/x", anomalous=False):
        from src.evaluation.calibration import NormalStatistics

        return {"path": "p.png", "class": key, "score": score, "anomalous": anomalous, "map": np.zeros((2, 2)),
                "statistics": NormalStatistics([0] * 3, [1] * 3, 0.5, 1, 0.4, 0.5)}

    assert parity([record(0.3)], [record(0.3 + 1e-7)], [0.5], 1e-3)["passed"]
    assert not parity([record(0.3)], [record(0.31)], [0.5], 1e-3)["passed"]
    assert not parity([record(0.3)], [record(float("nan"))], [0.5], 1e-3)["passed"]
    assert not parity([record(0.3)], [record(0.3, "a/y")], [0.5], 1e-3)["passed"]
    assert parity([record(0.5, anomalous=True)], [record(0.5 - 1e-7)], [0.5], 1e-3)["passed"]  # at the threshold


def test_a_requested_provider_onnxruntime_cannot_use_is_a_warning_naming_the_model(tmp_path):
    """The sessions log errors only, so a provider that is not used (missing, or failing to start)
    is reported by the runtime itself, with the model's path."""
    from onnx import TensorProto, helper, save

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    path = tmp_path / "tiny.onnx"
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    providers = ["NoSuchExecutionProvider", "CPUExecutionProvider"]
    with pytest.warns(UserWarning, match=r"tiny\.onnx runs on \['CPUExecutionProvider'\] without the requested "
                                         r"\['NoSuchExecutionProvider'\]"):
        run = onnx_runner(path, providers, threads=1)
    assert run({"x": np.array([-1.0, 2.0], np.float32)})["y"].tolist() == [0.0, 2.0]


def test_the_runtime_imports_no_training_stack():
    code = ("import sys; import src.inference; heavy = {'torch', 'lightning', 'hydra', 'timm', 'omegaconf'} & "
            "{m.split('.')[0] for m in sys.modules}; print(sorted(heavy)); sys.exit(bool(heavy))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.slow
def test_exported_model_predicts_like_the_checkpoint(trained, tmp_path, capfd):  # noqa: F811
    from src.entry import run_task

    fmt, name = "onnx", "model.onnx"
    base = overrides(trained["root"], trained["masks"])
    run_task(compose_cfg([*base, "mode=export", f"export.format={fmt}", f"ckpt_path={trained['ckpt']}",
                          f"paths.output_dir={tmp_path / 'export'}"]))
    model = tmp_path / "export" / "export" / name
    info = json.loads(model.with_suffix(".json").read_text())
    assert info["format"] == f"anomalymoe-{fmt}" and info["files"] == [name] and list(info["graph_sha256"]) == [name]
    assert info["parity"]["passed"] and info["parity"]["images"] == 8 and info["parity"]["classes_equal"] == 8
    assert info["class_keys"] == ["demo/fabric", "demo/widget"] and info["preprocessing"]["segment_size"]
    assert info["component_masks"].startswith("computed in the graph") and "refinement included" in info["component_masks"]
    folder = trained["root"] / "widget" / "test"
    predicted = {}
    for source, ckpt, extra in (("ckpt", trained["ckpt"], base), (fmt, model, [])):
        run_task(compose_cfg([*extra, "mode=predict", f"ckpt_path={ckpt}", f"predict.input={folder}",
                              "predict.recursive=true", f"paths.output_dir={tmp_path / source}"]))
        with (tmp_path / source / "predictions" / "predictions.csv").open() as f:
            predicted[source] = {row["path"]: row for row in csv.DictReader(f)}
    assert set(predicted["ckpt"]) == set(predicted[fmt])
    tolerance = info["parity"]["tolerance"]
    for path, row in predicted["ckpt"].items():
        other = predicted[fmt][path]
        assert abs(float(row["score"]) - float(other["score"])) <= tolerance, path
        assert (row["class"], row["anomalous"], row["experts"]) == (other["class"], other["anomalous"], other["experts"])
    assert json.loads((tmp_path / fmt / "predictions" / "predictions.json").read_text())["checkpoint_format"] == fmt
    assert "W:onnxruntime" not in capfd.readouterr().err  # the runtime's sessions print errors only


@pytest.mark.slow
def test_a_model_without_part_prototypes_or_statistics_without_masks_exports(trained, tmp_path, monkeypatch):  # noqa: F811
    """A checkpoint without part prototypes (masks from elsewhere) and without the statistics of
    images without masks (an older checkpoint): the export computes them, as mode=predict does;
    its weights in model.onnx.data (as a paper-size model's) load beside it."""
    from src.entry import run_task
    from src.modes import export

    checkpoint = torch.load(trained["ckpt"], weights_only=True)
    del checkpoint["segmentation"], checkpoint["calibration"]["unmasked"]
    bare = tmp_path / "bare.ckpt"
    torch.save(checkpoint, bare)
    monkeypatch.setattr(export, "EXTERNAL_DATA_BYTES", 0)
    run_task(compose_cfg([*overrides(trained["root"], trained["masks"]), "mode=export", "export.format=onnx",
                          f"ckpt_path={bare}", f"paths.output_dir={tmp_path / 'export'}"]))
    folder = tmp_path / "export" / "export"
    info = json.loads((folder / "model.json").read_text())
    assert info["files"] == ["model.onnx", "model.onnx.data"] and (folder / "model.onnx.data").is_file()
    assert info["parity"]["passed"] and info["parity"]["images"] == 8 and info["preprocessing"]["segment_size"] is None
    assert info["component_masks"].startswith("none") and info["statistics_source"].startswith("computed")
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    for name in ("model.onnx", "model.onnx.data", "model.json"):
        (folder / name).rename(moved / name)
    image = min((trained["root"] / "widget" / "test" / "good").glob("*.png"))
    result = Detector(moved / "model.onnx").predict([image], "demo/widget")
    assert result.classes == ["demo/widget"] and np.isfinite(result.scores).all()
    assert not any(name.startswith("component") for name, w in zip(info["experts"], result.routing_weights[0]) if w > 0)
