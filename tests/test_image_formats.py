"""Image formats: 16-bit and 32-bit integer images, float images, very large images, broken component-mask files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hydra.utils import instantiate
from PIL import Image

from data_modules import base
from data_modules.base import AnomalyTransforms, DataError, Sample, open_image, set_max_image_pixels
from data_modules.components import load_component_masks, read_component_masks
from data_modules.validate import validate_samples
from tests.conftest import compose_cfg


@pytest.fixture(autouse=True)
def default_limit():
    yield
    set_max_image_pixels(None)


def sixteen_bit(path: Path, values: np.ndarray) -> Path:
    Image.fromarray(values.astype(np.uint16)).save(path)
    return path


def test_sixteen_bit_images_are_scaled_by_a_fixed_factor(tmp_path):
    dark = np.full((16, 16), 1000)
    dark[0, 0] = 1100  # the old per-image stretch made this a full-range image
    bright = np.full((16, 16), 40000)
    a = np.asarray(open_image(sixteen_bit(tmp_path / "dark.png", dark)))
    b = np.asarray(open_image(sixteen_bit(tmp_path / "bright.png", bright)))
    assert a.shape == (16, 16, 3) and a.max() == 4 and a.min() == 4  # 1000 and 1100 * 255 / 65535
    assert (b == 156).all()  # 40000 * 255 / 65535: brighter stays brighter
    full = np.asarray(open_image(sixteen_bit(tmp_path / "full.png", np.arange(256).reshape(16, 16) * 257)))
    assert full[..., 0].flatten().tolist() == list(range(256))  # 8-bit values survive exactly


def test_32_bit_integer_images_holding_16_bit_values(tmp_path):
    Image.fromarray(np.full((8, 8), 40000, np.int32), mode="I").save(tmp_path / "i.tif")
    assert (np.asarray(open_image(tmp_path / "i.tif")) == 156).all()
    Image.fromarray(np.full((8, 8), 70000, np.int32), mode="I").save(tmp_path / "big.tif")
    with pytest.raises(DataError, match=r"big.tif holds 32-bit values outside 0..65535"):
        open_image(tmp_path / "big.tif")


def test_float_images_are_refused_naming_the_file(tmp_path):
    path = tmp_path / "float.tif"
    Image.fromarray(np.random.default_rng(0).random((8, 8)).astype(np.float32), mode="F").save(path)
    with pytest.raises(DataError, match=r"float.tif holds 32-bit floats \(mode F\).*16-bit PNG"):
        open_image(path)
    problems = validate_samples([Sample(path, 0, "train", "good", "d", "c")])
    assert len(problems) == 1 and "mode F" in problems[0].what


def test_very_large_images_are_refused_and_predict_scores_the_others(tmp_path):
    from src.modes.predict import ImageFiles, collate

    small, large = tmp_path / "small.png", tmp_path / "large.png"
    Image.new("RGB", (20, 20)).save(small)
    Image.new("RGB", (40, 40)).save(large)
    instantiate(compose_cfg(["dataset=demo", "dataset.max_image_pixels=1000"]).dataset)  # the config key sets it
    assert base.MAX_IMAGE_PIXELS == 1000
    with pytest.raises(DataError, match=r"large.png is 40x40.*dataset.max_image_pixels=1000"):
        open_image(large)
    batch = collate([item for item in ImageFiles([small, large], AnomalyTransforms(32, 28), tmp_path)])
    assert batch["image"].shape[0] == 1 and len(batch["errors"]) == 1
    assert batch["errors"][0]["path"] == str(large) and "max_image_pixels" in batch["errors"][0]["error"]
    Image.new("RGB", (100, 100)).save(large)  # above twice the limit: Pillow's own refusal, also named
    with pytest.raises(DataError, match=r"large.png is too large.*dataset.max_image_pixels=1000"):
        open_image(large)
    set_max_image_pixels(None)
    assert open_image(large).size == (100, 100)


def test_unreadable_component_mask_file_is_a_data_error_naming_it(tmp_path):
    path = tmp_path / "c" / "test" / "good" / "x.npz"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(DataError, match=r"component mask file .*x.npz is unreadable.*mode=segment"):
        read_component_masks(path)
    image = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(image)
    sample = Sample(image, 0, "test", "good", "d", "c")
    with pytest.raises(DataError, match=r"x.npz is unreadable"):
        load_component_masks(tmp_path, sample, (8, 8))
    path.write_bytes(b"not a zip")
    problems = validate_samples([sample], {"d": tmp_path})
    assert [p.what for p in problems] == ["unreadable component mask file"] and problems[0].path == path
