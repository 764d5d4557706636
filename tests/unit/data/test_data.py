"""DataStore and dataset sources."""

from __future__ import annotations

import os
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from knn_cm.data import DataStore, float_to_uint8, load_array, load_cifar10, load_digits, load_image_folder, sources
from tests.conftest import shared_cifar_archive


def test_from_array_float_view_and_roundtrip():
    images = np.arange(2 * 3 * 4 * 4, dtype=np.uint8).reshape(2, 3, 4, 4)
    store = DataStore.from_array(torch.from_numpy(images))
    assert len(store) == 2 and store.shape == (3, 4, 4) and store.dim == 48
    values = store.float()
    assert values.dtype == torch.float32 and values.min() >= -1 and values.max() <= 1
    assert torch.equal(store.float(torch.tensor([0]))[0, 0, 0, 0], torch.tensor(-1.0))
    assert torch.equal(float_to_uint8(values), torch.from_numpy(images))


def test_fingerprint_depends_on_content_and_xflip():
    images = np.zeros((3, 1, 2, 2), dtype=np.uint8)
    changed = images.copy()
    changed[2, 0, 1, 1] = 1
    first, second = DataStore.from_array(images), DataStore.from_array(changed)
    assert first.fingerprint == DataStore.from_array(images.copy()).fingerprint
    assert first.fingerprint != second.fingerprint
    assert first.fingerprint != first.with_xflip().fingerprint


def test_xflip_doubles_with_mirrored_copies():
    images = np.random.default_rng(0).integers(0, 256, (5, 3, 4, 6), dtype=np.uint8)
    store = DataStore.from_array(images, xflip=True)
    assert len(store) == 10 and store.base_size == 5
    assert torch.equal(store.uint8([7])[0], torch.from_numpy(images[2][..., ::-1].copy()))
    assert torch.equal(store.uint8([2])[0], torch.from_numpy(images[2]))
    resident = store.resident("cpu")
    assert resident.size == 10
    assert torch.equal(resident.gather(torch.tensor([8]))[0], store.float([8]).reshape(-1))


@pytest.mark.parametrize("bad, message", [
    (np.zeros((2, 3, 4), np.uint8), "shape"),
    (np.zeros((2, 3, 4, 4), np.float32), "uint8"),
    (np.zeros((0, 3, 4, 4), np.uint8), "empty"),
])
def test_bad_arrays_are_rejected(bad, message):
    with pytest.raises(ValueError, match=message):
        DataStore.from_array(bad)


def test_digits_is_the_embedded_default():
    store = load_digits()
    assert len(store) == 1797 and store.shape == (1, 8, 8)
    assert store.images.max() == 255 and store.labels is not None


def test_resident_uint8_storage_matches_float_storage():
    store = load_digits()
    fast, compact = store.resident("cpu", storage="float"), store.resident("cpu", storage="uint8")
    indices = torch.tensor([0, 5, 1796])
    assert torch.equal(fast.gather(indices), compact.gather(indices))
    assert torch.allclose(fast.sq_norms, compact.sq_norms)


def _write_images(folder, with_classes: bool, count: int = 6, size=(10, 8)):
    generator = np.random.default_rng(0)
    arrays = []
    for i in range(count):
        array = generator.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        arrays.append(array)
        sub = folder / (f"class{i % 2}" if with_classes else "")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(sub / f"{i:03d}.png")
    return arrays


@pytest.mark.parametrize("with_classes", [True, False])
def test_image_folder_reads_sorted_and_labels(tmp_path, with_classes):
    arrays = _write_images(tmp_path / "images", with_classes)
    store = load_image_folder(tmp_path / "images", progress=False)
    assert len(store) == 6 and store.shape == (3, 8, 10)
    if with_classes:
        # sorted paths: class0/000, class0/002, class0/004, class1/001, ...
        assert store.labels.tolist() == [0, 0, 0, 1, 1, 1]
        assert np.array_equal(store.images[1], arrays[2].transpose(2, 0, 1))
    else:
        assert store.labels is None
        assert np.array_equal(store.images[3], arrays[3].transpose(2, 0, 1))
    again = load_image_folder(tmp_path / "images", progress=False)  # from the cache
    assert again.fingerprint == store.fingerprint


def test_image_folder_archive_subfolder_resize_and_memmap(tmp_path, monkeypatch):
    _write_images(tmp_path / "root" / "train", with_classes=True)
    _write_images(tmp_path / "root" / "test", with_classes=True, count=2)
    archive = tmp_path / "data.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "root" / "train", arcname="train")
        tar.add(tmp_path / "root" / "test", arcname="test")
    monkeypatch.setattr(sources, "MEMMAP_BYTES", 0)  # force the memory-mapped path
    store = load_image_folder(archive, subfolder="train", resolution=4, progress=False)
    assert len(store) == 6 and store.shape == (3, 4, 4)
    assert isinstance(store.images, np.memmap)
    assert store.labels.tolist() == [0, 0, 0, 1, 1, 1]
    with pytest.raises(ValueError, match="no images"):
        load_image_folder(archive, subfolder="valid", progress=False)


def test_image_folder_mixed_sizes_need_resolution(tmp_path):
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(tmp_path / "b.png")
    with pytest.raises(ValueError, match="resolution"):
        load_image_folder(tmp_path, use_cache=False, progress=False)
    assert load_image_folder(tmp_path, resolution=4, use_cache=False, progress=False).shape == (3, 4, 4)


def test_arrays_npy_npz_channels_last_and_float(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    np.save(tmp_path / "a.npy", images)
    np.savez(tmp_path / "b.npz", images=images.transpose(0, 3, 1, 2), labels=np.arange(4))
    assert load_array(tmp_path / "a.npy").shape == (3, 8, 8)
    assert np.array_equal(load_array(tmp_path / "b.npz").images, images.transpose(0, 3, 1, 2))
    np.save(tmp_path / "f.npy", images.astype(np.float32) / 255.0)
    with pytest.raises(ValueError, match="value_range"):
        load_array(tmp_path / "f.npy")
    assert np.array_equal(load_array(tmp_path / "f.npy", value_range=(0, 1)).images, images.transpose(0, 3, 1, 2))


def test_cifar10_offline_error_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="download=True"):
        load_cifar10(tmp_path / "nowhere", download=False)


@pytest.mark.shared
@pytest.mark.skipif(not shared_cifar_archive().exists(), reason="../shared/data/cifar10-jpeg.tar.gz is absent")
def test_shared_cifar10_archive_loads():
    store = load_image_folder(shared_cifar_archive(), subfolder="train", progress=False)
    assert len(store) == 50000 and store.shape == (3, 32, 32)
    assert sorted(np.bincount(store.labels).tolist()) == [5000] * 10


def _write_bmps(folder, count: int = 3) -> list[np.ndarray]:
    """Uncompressed images: editing pixels in place keeps every file's size."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays = [np.random.default_rng(i).integers(0, 256, (4, 4, 3), dtype=np.uint8) for i in range(count)]
    for i, array in enumerate(arrays):
        Image.fromarray(array).save(folder / f"{i:03d}.bmp")
    return arrays


def test_image_edited_in_place_changes_the_fingerprint(tmp_path):
    """The cache is keyed by content: same file names, sizes and folder mtime, other pixels -> new pixels."""
    folder = tmp_path / "images"
    _write_bmps(folder)
    first = load_image_folder(folder, progress=False)
    stats = [(p.stat().st_size, p.stat().st_mtime_ns) for p in (folder / "001.bmp", folder)]
    edited = np.full((4, 4, 3), 7, dtype=np.uint8)
    Image.fromarray(edited).save(folder / "001.bmp")
    os.utime(folder / "001.bmp", ns=(stats[0][1], stats[0][1]))  # even with its old time
    assert [(p.stat().st_size, p.stat().st_mtime_ns) for p in (folder / "001.bmp", folder)] == stats
    second = load_image_folder(folder, progress=False)
    assert second.fingerprint != first.fingerprint
    assert np.array_equal(second.images[1], edited.transpose(2, 0, 1))


@pytest.mark.parametrize("damage", ["flipped_bytes", "truncated", "not_an_array"])
def test_corrupt_dataset_cache_is_rebuilt_with_a_warning(tmp_path, monkeypatch, damage):
    monkeypatch.setenv("KNN_CM_CACHE", str(tmp_path / "cache"))
    arrays = _write_bmps(tmp_path / "images")
    first = load_image_folder(tmp_path / "images", progress=False)
    (cached,) = (tmp_path / "cache" / "datasets").glob("*.npy")
    data = bytearray(cached.read_bytes())
    if damage == "flipped_bytes":
        data[-5:] = bytes(255 - b for b in data[-5:])
    elif damage == "truncated":
        data = data[: len(data) - 7]
    else:
        data = bytearray(b"not a numpy array")
    cached.write_bytes(bytes(data))
    with pytest.warns(RuntimeWarning, match=f"dataset cache {cached} is corrupt"):
        second = load_image_folder(tmp_path / "images", progress=False)
    assert second.fingerprint == first.fingerprint
    assert np.array_equal(second.images[2], arrays[2].transpose(2, 0, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # rebuilt: the next load is clean
        assert load_image_folder(tmp_path / "images", progress=False).fingerprint == first.fingerprint


# ------------------------------------------------------------------ names, paths, one cache entry
def _write_jpegs(folder, count: int = 4) -> list:
    """Tiny real JPEGs in two class folders, like the CIFAR-10 JPEG archive's train/<class>/NNNN.jpg."""
    files = []
    for i in range(count):
        sub = folder / f"class{i % 2}"
        sub.mkdir(parents=True, exist_ok=True)
        array = np.random.default_rng(i).integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(array).save(sub / f"{i:04d}.jpg", quality=90)
        files.append(sub / f"{i:04d}.jpg")
    return files


def _tar_gz(folder, archive, arcname="train", test_folder=None):
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=arcname)
        if test_folder is not None:
            tar.add(test_folder, arcname="test")
    return archive


@pytest.mark.parametrize("damage", ["not_an_image", "truncated_jpeg"])
def test_a_corrupt_image_in_a_folder_names_its_file(tmp_path, damage):
    files = _write_jpegs(tmp_path / "images")
    bad = files[2]
    data = bad.read_bytes()
    bad.write_bytes(b"this is not a JPEG" if damage == "not_an_image" else data[: len(data) // 2])
    with pytest.raises(sources.UnreadableDataError) as caught:
        load_image_folder(tmp_path / "images", use_cache=False, progress=False)
    message = str(caught.value)
    assert message.startswith(f"{bad.resolve()} is not a readable image (")
    assert "BytesIO" not in message and "\n" not in message


def test_a_corrupt_image_in_an_archive_names_the_member_and_the_archive(tmp_path):
    files = _write_jpegs(tmp_path / "images")
    files[1].write_bytes(b"\xff\xd8\xff garbage")
    archive = _tar_gz(tmp_path / "images", tmp_path / "data.tar.gz")
    with pytest.raises(sources.UnreadableDataError,
                       match=f"^train/{files[1].parent.name}/{files[1].name} in archive {archive.resolve()} is not "
                             f"a readable image"):
        load_image_folder(archive, subfolder="train", use_cache=False, progress=False)


def test_a_damaged_archive_is_named(tmp_path):
    _write_jpegs(tmp_path / "images", count=40)
    archive = _tar_gz(tmp_path / "images", tmp_path / "data.tar.gz")
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) // 2])  # a download cut short
    with pytest.raises(sources.UnreadableDataError, match=f"^archive {archive.resolve()} is damaged"):
        load_image_folder(archive, use_cache=False, progress=False)


def test_two_names_of_the_same_archive_decode_once(tmp_path, monkeypatch):
    """The cache is keyed by the archive's content: a copy under another file name, loaded under another
    dataset name (dataset=cifar10_jpeg vs dataset=image_folder), and at resolution null or at the images' own
    size (which crops and resizes nothing), all read the one entry decoded first."""
    monkeypatch.setenv("KNN_CM_CACHE", str(tmp_path / "cache"))
    _write_jpegs(tmp_path / "images")
    _write_jpegs(tmp_path / "test_images", count=2)
    first = _tar_gz(tmp_path / "images", tmp_path / "cifar10-jpeg.tar.gz", test_folder=tmp_path / "test_images")
    copy = tmp_path / "elsewhere" / "my-copy.tar.gz"
    copy.parent.mkdir()
    copy.write_bytes(first.read_bytes())
    decoded = load_image_folder(first, subfolder="train", name="cifar10_jpeg", progress=False)
    assert len(list((tmp_path / "cache" / "datasets").glob("*.npy"))) == 1

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded a second time")

    monkeypatch.setattr(sources, "_decode", no_decoding)
    for path, name, resolution in [(copy, "image_folder", None), (copy, None, 8), (first, "cifar10_jpeg", 8)]:
        again = load_image_folder(path, subfolder="train", name=name, resolution=resolution, progress=False)
        assert np.array_equal(again.images, decoded.images)
    assert len(list((tmp_path / "cache" / "datasets").glob("*.npy"))) == 1
    with pytest.raises(AssertionError, match="decoded a second time"):  # other content or options: a new entry
        load_image_folder(copy, subfolder="train", resolution=4, progress=False)


def test_the_first_resize_free_decode_is_stored_as_the_native_one(tmp_path, monkeypatch):
    """Decoded first at resolution 8 (the images' own size), then read at resolution null: one entry."""
    monkeypatch.setenv("KNN_CM_CACHE", str(tmp_path / "cache"))
    _write_jpegs(tmp_path / "images")
    sized = load_image_folder(tmp_path / "images", resolution=8, progress=False)
    monkeypatch.setattr(sources, "_decode", lambda *a, **k: pytest.fail("decoded a second time"))
    assert np.array_equal(load_image_folder(tmp_path / "images", progress=False).images, sized.images)
    assert len(list((tmp_path / "cache" / "datasets").glob("*.npy"))) == 1


def test_missing_sources_show_absolute_paths_and_the_cifar10_jpeg_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    missing = tmp_path.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
    with pytest.raises(FileNotFoundError) as caught:
        load_image_folder("../shared/data/cifar10-jpeg.tar.gz", subfolder="train", name="cifar10_jpeg")
    message = str(caught.value)
    assert message.startswith(f"image folder or archive {missing.resolve()} (given as "
                              f"../shared/data/cifar10-jpeg.tar.gz) does not exist")
    assert "dataset=cifar10_jpeg dataset.path=" in message
    with pytest.raises(FileNotFoundError, match=f"^image folder or archive {tmp_path / 'photos'} \\(given as photos\\) "
                                                f"does not exist$"):
        load_image_folder("photos")  # not CIFAR-10: no CIFAR-10 hint
    with pytest.raises(FileNotFoundError, match=f"^array file {tmp_path / 'a.npy'} \\(given as a.npy\\)"):
        load_array("a.npy")
    with pytest.raises(FileNotFoundError) as caught:
        load_cifar10("nowhere", download=False)
    assert str(caught.value).startswith(f"CIFAR-10 not found in {tmp_path / 'nowhere'} (given as nowhere).")
    assert "dataset=cifar10_jpeg" in str(caught.value) and "dataset=image_folder" not in str(caught.value)


def test_the_cifar10_jpeg_config_names_its_missing_archive(tmp_path, monkeypatch):
    """dataset=cifar10_jpeg from another folder: the error names the absolute path it looked at."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from knn_cm.data.from_config import store_from_config

    configs = Path(__file__).resolve().parents[3] / "configs"
    with initialize_config_dir(config_dir=str(configs / "common" / "dataset"), version_base=None):
        config = compose(config_name="cifar10_jpeg")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as caught:
        store_from_config(OmegaConf.to_container(config.store, resolve=True))
    expected = (tmp_path / config.path).resolve()
    assert str(caught.value).startswith(f"image folder or archive {expected} (given as {config.path}) does not exist")
    assert "dataset=cifar10_jpeg dataset.path=" in str(caught.value)


def test_an_archive_of_the_subfolder_alone_reads_it(tmp_path):
    """An archive holding only train/ (its common top folder) and subfolder=train: the images, not "no images"."""
    _write_jpegs(tmp_path / "images")
    archive = _tar_gz(tmp_path / "images", tmp_path / "train-only.tar.gz")
    store = load_image_folder(archive, subfolder="train", use_cache=False, progress=False)
    assert len(store) == 4 and store.labels.tolist() == [0, 0, 1, 1]
