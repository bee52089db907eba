"""Image formats: 16-bit and 32-bit integer images, float images, very large images, broken component-mask files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from data_modules.components import load_component_masks, read_component_masks
from data_modules.dataset import AnomalyDataset, AnomalyTransforms, make_loader
from data_modules.io import open_image
from data_modules.types import DataError, Sample
from data_modules.validate import validate_samples
from tests.conftest import compose_cfg


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
    datamodule = instantiate(compose_cfg(["dataset=demo", "dataset.max_image_pixels=1000"]).dataset)
    assert datamodule.max_pixels == 1000  # the config key sets the limit the data module passes on
    with pytest.raises(DataError, match=r"large.png is 40x40.*dataset.max_image_pixels=1000"):
        open_image(large, max_pixels=datamodule.max_pixels)
    batch = collate([item for item in ImageFiles([small, large], AnomalyTransforms(32, 28), tmp_path,
                                                 max_pixels=datamodule.max_pixels)])
    assert batch["image"].shape[0] == 1 and len(batch["errors"]) == 1
    assert batch["errors"][0]["path"] == str(large) and "max_image_pixels" in batch["errors"][0]["error"]
    Image.new("RGB", (100, 100)).save(large)  # far above the limit: refused from the header, before decoding
    with pytest.raises(DataError, match=r"large.png is 100x100.*dataset.max_image_pixels=1000"):
        open_image(large, max_pixels=1000)
    assert open_image(large).size == (100, 100)  # the default limit, in the same process: nothing global changed
    problems = validate_samples([Sample(large, 0, "train", "good", "d", "c")], max_pixels=1000)
    assert len(problems) == 1 and "dataset.max_image_pixels=1000" in problems[0].what


@pytest.mark.slow
def test_the_pixel_limit_reaches_loader_workers_started_with_spawn(tmp_path):
    """macOS and Windows start loader workers with ``spawn``: a fresh interpreter that imports
    the modules anew. The limit travels with the dataset, so it holds there too."""
    import multiprocessing

    small, large = tmp_path / "small.png", tmp_path / "large.png"
    Image.new("RGB", (20, 20)).save(small)
    Image.new("RGB", (40, 40)).save(large)
    datamodule = instantiate(compose_cfg(["dataset=demo", "dataset.max_image_pixels=1000", "dataset.num_workers=1",
                                          "dataset.test_batch_size=1"]).dataset)
    samples = [Sample(p, 0, "test", "good", "demo", "fabric") for p in (small, large)]
    dataset = AnomalyDataset(samples, datamodule.transforms, ["demo/fabric"], False, None, datamodule.max_pixels)
    method = multiprocessing.get_start_method()
    multiprocessing.set_start_method("spawn", force=True)
    try:
        batches = iter(make_loader(dataset, datamodule.test_batch_size, False, datamodule.num_workers))
        assert next(batches)["image_path"] == [str(small)]
        with pytest.raises(DataError, match=r"large.png is 40x40.*dataset.max_image_pixels=1000"):
            next(batches)
    finally:
        multiprocessing.set_start_method(method, force=True)


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
    assert len(problems) == 1 and problems[0].what.startswith("unreadable component mask file (")
    assert problems[0].path == path


def test_the_check_before_training_reads_what_the_loader_reads(tmp_path):
    """A JPEG cut short with its header intact, and component-mask files that are zip archives
    with a damaged member or without their ``shape`` entry, are found before step 1."""
    import zipfile

    from data_modules.components import component_path, save_component_masks

    rng = np.random.default_rng(0)
    good, cut = tmp_path / "good.jpg", tmp_path / "cut.jpg"
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(good, quality=95)
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    samples = [Sample(p, 0, "train", "good", "d", "c") for p in (good, cut)]
    problems = validate_samples(samples)
    assert [p.path for p in problems] == [cut] and "not a readable image" in problems[0].what

    masks = tmp_path / "masks"
    damaged = component_path(masks, "c", "train", "good", "good")
    save_component_masks(damaged, rng.random((2, 64, 64)) > 0.5)
    data = bytearray(damaged.read_bytes())
    data[60:80] = bytes(20)  # inside the first member's compressed data: the zip's directory is intact
    damaged.write_bytes(bytes(data))
    assert zipfile.is_zipfile(damaged)
    problems = validate_samples(samples[:1], {"d": masks})
    assert [p.path for p in problems] == [damaged] and "unreadable component mask file" in problems[0].what
    with zipfile.ZipFile(damaged, "w") as archive:  # the masks without their shape entry
        archive.writestr("masks.npy", b"")
    assert "unreadable component mask file (KeyError" in validate_samples(samples[:1], {"d": masks})[0].what
    save_component_masks(damaged, np.zeros((2, 32, 64), bool))  # readable, but not the image's size
    assert "component masks are 64x32 but the image" in validate_samples(samples[:1], {"d": masks})[0].what


def test_exif_orientation_is_applied_when_an_image_is_opened(tmp_path):
    """A camera's portrait photo (pixels stored landscape, EXIF orientation 6: turn 90° clockwise)
    is used upright in training, test and predict, and its mask has the upright size."""
    pixels = np.zeros((20, 40, 3), np.uint8)  # (H, W, C) as stored
    pixels[0, 0] = 255
    photo = Image.fromarray(pixels)
    exif = photo.getexif()
    exif[0x0112] = 6
    path = tmp_path / "photo.jpg"
    photo.save(path, exif=exif, quality=100)
    upright = np.asarray(open_image(path))
    assert upright.shape == (40, 20, 3)
    assert upright[0, -1, 0] > 200 and upright[0, 0, 0] < 50  # the top-left pixel is now top-right
    mask = tmp_path / "photo_mask.png"
    Image.new("L", (20, 40)).save(mask)
    sample = Sample(path, 1, "test", "bad", "d", "c", mask)
    assert validate_samples([sample]) == []
    Image.new("L", (40, 20)).save(mask)  # the size of the stored pixels, not of the upright image
    assert "mask is 40x20 but its image" in validate_samples([sample])[0].what


class FailingImages(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int):
        raise DataError(f"cannot read image x{index}.png: broken data stream. Replace or remove the file.")


def test_a_data_error_in_a_loader_worker_is_one_message():
    from src.errors import user_error

    with pytest.raises(DataError) as raised:
        next(iter(torch.utils.data.DataLoader(FailingImages(), num_workers=1)))
    assert "Traceback" in str(raised.value)  # torch's wrapping
    assert str(user_error(raised.value)) == "cannot read image x0.png: broken data stream. Replace or remove the file."
