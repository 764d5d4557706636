"""Dataset sources, each returning a :class:`DataStore`: digits, CIFAR-10, image folders, arrays.

Every loader is usable as a Hydra ``_target_`` (see ``configs/common/dataset/``; ``knn_cm.data.from_config`` builds
them from configs without running other code). Decoded image folders are cached as ``.npy`` files so a
second run skips decoding. The cache file is named by content alone: a digest of the source's bytes (every
image file's relative name and bytes for a folder, the archive's bytes for an archive) and of the decode
options (``subfolder``, ``channels``, ``resolution``), never by the dataset's or the archive's name, so two
copies or two names of the same bytes share one entry, and an image edited in place is decoded again. A
decode whose ``resolution`` crops and resizes nothing (every image already square at that size) equals the
decode at the images' own size and is stored as that one. Written durably (temporary file, fsync, rename)
with a sidecar ``.json`` holding its shape and digest; a cache that does not match them is rebuilt with a
warning naming it. Memory-mapped when large.

Errors name resolved absolute paths, and an image that does not decode is named by its file (and archive).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import tarfile
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np

from knn_cm.data.store import DataStore
from knn_cm.io import atomic_path, cache_dir, file_digest, fsync_path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")
MEMMAP_BYTES = 1 << 30  # decoded datasets larger than this stay on disk, memory-mapped
CACHE_FORMAT = "knn_cm.decoded_images.v3"  # entries are named by their source's content alone
NATIVE = "native"  # the resolution option of a decode that crops and resizes nothing
SPLIT_NAMES = {"train", "test", "val", "valid", "validation"}  # top folders that name a dataset's splits


class UnreadableDataError(ValueError):
    """An image file, an archive member or an archive that does not read; the message names the file."""


def load_digits(xflip: bool = False) -> DataStore:
    """scikit-learn's digits: 1,797 grey 8x8 images, the embedded default dataset (no download).

    Pixel values 0..16 are rescaled to 0..255 so the [-1, 1] float view spans the full range.
    """
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # [1797, 1, 8, 8]
    return DataStore(images, name="digits", labels=digits.target, xflip=xflip)


def load_cifar10(root: str | os.PathLike | None = None, train: bool = True, download: bool = False,
                 xflip: bool = False) -> DataStore:
    """CIFAR-10 through torchvision (50,000 train or 10,000 test images, 3x32x32).

    Downloads only when ``download=True``; otherwise a missing dataset is a clear error naming the
    folder searched and the alternatives.
    """
    import torchvision

    root = Path(root).expanduser() if root is not None else cache_dir() / "cifar10"
    try:
        dataset = torchvision.datasets.CIFAR10(root=str(root), train=train, download=download)
    except RuntimeError as error:  # torchvision: "Dataset not found or corrupted"
        raise FileNotFoundError(
            f"CIFAR-10 not found in {shown_path(root)}. Pass download=True (dataset.download=true) to fetch "
            f"it, or, offline, {CIFAR10_JPEG_HINT}"
        ) from error
    except OSError as error:  # URLError and socket errors when offline
        raise ConnectionError(
            f"Downloading CIFAR-10 into {shown_path(root)} failed ({error}). This machine may be offline: copy "
            f"the 'cifar-10-batches-py' folder into {root.resolve()}, or {CIFAR10_JPEG_HINT}"
        ) from error
    images = np.ascontiguousarray(dataset.data.transpose(0, 3, 1, 2))  # [N, 32, 32, 3] -> [N, 3, 32, 32]
    return DataStore(images, name="cifar10" if train else "cifar10-test", labels=dataset.targets, xflip=xflip)


def load_array(path: str | os.PathLike, key: str | None = None, value_range: tuple[float, float] | None = None,
               channels_last: bool | None = None, xflip: bool = False, name: str | None = None) -> DataStore:
    """Images from a ``.npy`` or ``.npz`` file: uint8 [N, C, H, W] or [N, H, W, C].

    Args:
        key: the array's name inside an ``.npz`` (default: the only array, or ``images``/``x``).
        value_range: for float arrays, the (low, high) values that map to 0 and 255; required then.
        channels_last: force the layout; by default [N, H, W, C] is assumed when the last axis has
            at most 4 entries and the second more.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"array file {shown_path(path)} does not exist")
    if path.suffix == ".npz":
        with np.load(path) as archive:
            if key is None:
                names = list(archive.keys())
                key = names[0] if len(names) == 1 else next((n for n in ("images", "x", "arr_0") if n in names), None)
                if key is None:
                    raise ValueError(f"{path} holds arrays {names}; pass key= to choose one")
            if key not in archive:
                raise ValueError(f"{path} has no array {key!r}; it holds {list(archive.keys())}")
            images = archive[key]
    elif path.suffix == ".npy":
        images = np.load(path, mmap_mode="r")
    else:
        raise ValueError(f"array files must end in .npy or .npz, got {path.name}")
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4:
        raise ValueError(f"{path}: expected images [N, C, H, W] or [N, H, W, C], got shape {images.shape}")
    if channels_last is None:  # channels are the short axis (<= 4); channels-first when both are
        channels_last = images.shape[-1] <= 4 < images.shape[1]
    if channels_last:
        images = images.transpose(0, 3, 1, 2)
    if images.dtype != np.uint8:
        if value_range is None:
            raise ValueError(f"{path}: dtype {images.dtype} needs value_range=(low, high) to map it to 0..255; "
                             f"uint8 arrays need none")
        low, high = value_range
        images = np.clip(np.rint((images.astype(np.float64) - low) * (255.0 / (high - low))), 0, 255).astype(np.uint8)
    return DataStore(np.ascontiguousarray(images) if not isinstance(images, np.memmap) else images,
                     name=name or path.stem, xflip=xflip)


def load_image_folder(path: str | os.PathLike, subfolder: str | None = None, resolution: int | None = None,
                      channels: int = 3, xflip: bool = False, use_cache: bool = True, name: str | None = None,
                      progress: bool = True) -> DataStore:
    """Images from a folder (class sub-folders or flat) or an archive (.tar, .tar.gz, .tgz, .zip).

    Files are read in sorted path order, so element indices are stable across machines. With class
    sub-folders, labels are the sorted sub-folder names' positions.

    Args:
        subfolder: read only this folder inside ``path`` (e.g. "train" in an archive holding train/
            and test/). A source whose top folders are splits (two of train, test, val, ...) is refused
            without one; "." reads every image, the splits together.
        resolution: center-crop to a square and resize to this size (e.g. 64 for CelebA-64 and
            ImageNet-64); None keeps the images' own size, which must then be the same for all.
        channels: 3 (RGB) or 1 (grey).
        use_cache: decode once and keep an ``.npy`` copy in the cache folder, keyed by the source's
            content alone (an archive's bytes; a folder's relative file names and bytes) and by
            ``subfolder``, ``resolution`` and ``channels``, never by ``path`` or ``name``; a corrupt copy
            is rebuilt with a warning.

    Raises:
        FileNotFoundError: ``path`` does not exist (the message shows it resolved to an absolute path).
        UnreadableDataError: an image does not decode, or the archive is damaged (the message names it).
    """
    path = Path(path).expanduser()
    if not path.exists():
        hint = f"; {CIFAR10_JPEG_HINT}" if "cifar" in f"{name} {path.name}".lower() else ""
        raise FileNotFoundError(f"image folder or archive {shown_path(path)} does not exist{hint}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    entries = _list_images(path)
    if subfolder in (".", "./"):
        subfolder = None  # every image, the splits together, on purpose
    elif subfolder is None:
        _refuse_mixed_splits(path, entries)
    if subfolder is not None:
        prefix = subfolder.strip("/") + "/"
        # The subfolder below the archive's common top folders, or (an archive of that folder alone, whose
        # common top folder is the subfolder itself) from the archive's root.
        chosen = [(e[len(prefix):], size, member) for e, size, member in entries if e.startswith(prefix)] or \
                 [(m.removeprefix("./")[len(prefix):], size, m) for _, size, m in entries
                  if m.removeprefix("./").startswith(prefix)]
        entries = _strip_common_prefix(chosen)
    if not entries:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {shown_path(path)}"
                         + (f" under {subfolder!r}" if subfolder else ""))
    name = name or path.name.split(".")[0] + (f"-{subfolder.strip('/')}" if subfolder else "")
    class_names = sorted({entry.rsplit("/", 1)[0] for entry, _, _ in entries if "/" in entry})
    labels = None
    if class_names:
        label_of = {class_name: i for i, class_name in enumerate(class_names)}
        labels = np.array([label_of.get(entry.rsplit("/", 1)[0], -1) if "/" in entry else -1
                           for entry, _, _ in entries], dtype=np.int64)

    content = _content_digest(path, entries)
    native = cache_dir() / "datasets" / f"{_cache_key(content, subfolder, channels, NATIVE)}.npy"
    resized = cache_dir() / "datasets" / f"{_cache_key(content, subfolder, channels, resolution)}.npy"
    if use_cache:
        for cached in dict.fromkeys((native, resized)):  # the native decode serves any resolution it equals
            if cached.exists() and (resolution is None or _recorded_square_side(cached) in (resolution, None)):
                images = _read_cache(cached, (len(entries), channels)
                                     + ((resolution, resolution) if resolution else ()))
                if images is not None:
                    return DataStore(images, name=name, labels=labels, xflip=xflip)

    iterator = _iter_images(path, entries)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, total=len(entries), desc=f"decoding {name}", leave=False)
    target = (native if resolution is None else resized) if use_cache else \
        cache_dir() / "datasets" / f".scratch-{resized.stem}-{os.getpid()}.npy"
    unchanged = True  # no image cropped or resized: the decode equals the native one
    with atomic_path(target) as temp:
        images = None
        for i, (member, data) in enumerate(iterator):
            image, same = _decode(data, resolution, channels, _member_label(path, member))
            unchanged &= same
            if images is None:
                first_member, first_shape = member, image.shape
                images = np.lib.format.open_memmap(temp, mode="w+", dtype=np.uint8,
                                                   shape=(len(entries),) + first_shape)
            if image.shape != first_shape:
                raise ValueError(f"{_member_label(path, member)} decodes to shape {image.shape} but "
                                 f"{first_member} to {first_shape}; pass resolution= to resize all images "
                                 f"to one size")
            images[i] = image
        images.flush()
        del images
    if use_cache and unchanged and target != native:
        os.replace(target, native)  # stored once, under the decode it equals
        fsync_path(native.parent)
        target = native
    if use_cache:
        _write_sidecar(target)
    result = np.load(target, mmap_mode="r")
    if result.nbytes <= MEMMAP_BYTES or not use_cache:
        result = np.array(result)
    if not use_cache:
        os.unlink(target)
    return DataStore(result, name=name, labels=labels, xflip=xflip)


# ------------------------------------------------------------------------------------------ helpers
def _refuse_mixed_splits(path: Path, entries: list[tuple[str, int, str]]) -> None:
    """Refuse to read a source whose top folders are two or more of a dataset's splits (train/ and test/) as one
    dataset: the splits would be mixed, labelled by split."""
    tops = {entry.split("/", 1)[0] for entry, _, _ in entries if "/" in entry}
    splits = sorted(tops & SPLIT_NAMES)
    if len(splits) >= 2:
        choice = "train" if "train" in splits else splits[0]
        raise ValueError(f"image folder or archive {shown_path(path)} holds the splits {', '.join(splits)}; pass "
                         f"subfolder={choice!r} to read one (dataset.subfolder={choice}), or subfolder='.' to read "
                         f"them all as one dataset")


def _is_image(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return not base.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES)


def _is_archive(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)


def shown_path(path: str | os.PathLike) -> str:
    """``path`` resolved to an absolute path for messages, with the spelling it was given when relative."""
    path = Path(path).expanduser()
    return str(path.resolve()) if path.is_absolute() else f"{path.resolve()} (given as {path})"


CIFAR10_JPEG_HINT = ("read a CIFAR-10 JPEG archive or folder (train/<class>/*.jpg) with dataset=cifar10_jpeg "
                     "dataset.path=<archive or folder>")


def _content_digest(path: Path, entries: list[tuple[str, int, str]]) -> str:
    """What the source holds, whatever it is called: the archive's bytes (``file_digest``), or each image
    file's name relative to the folder and its bytes. The listing (entries) depends only on these too."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr([(name, size) for name, size, _ in entries]).encode())
    files = [(member, path / member) for _, _, member in entries] if path.is_dir() else [("", path)]
    for member, file in files:
        digest.update(f"{member}:{file_digest(file)};".encode())
    return digest.hexdigest()


def _cache_key(content: str, subfolder: str | None, channels: int, resolution: int | str | None) -> str:
    """The cache file's name: the content digest and the decode options, nothing else."""
    options = (CACHE_FORMAT, content, subfolder.strip("/") if subfolder else None, channels, resolution or NATIVE)
    return hashlib.blake2b(repr(options).encode(), digest_size=10).hexdigest()


def _recorded_square_side(cached: Path) -> int | None:
    """The side of the images a cache file records when they are square; None when unknown (the full check
    in :func:`_read_cache` then decides), -1 when they are not square."""
    try:
        shape = json.loads(_sidecar(cached).read_text())["shape"]
        return shape[2] if shape[2] == shape[3] else -1
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None


def _member_label(path: Path, member: str) -> str:
    """An image's name in messages: its file, or the archive and the member inside it."""
    return str((path / member).resolve()) if path.is_dir() else f"{member} in archive {path.resolve()}"


def _sidecar(cached: Path) -> Path:
    return cached.with_name(cached.name + ".json")


def _write_sidecar(cached: Path) -> None:
    """Record the cache file's shape and digest (verified on every load)."""
    shape = list(np.load(cached, mmap_mode="r").shape)
    record = {"format": CACHE_FORMAT, "shape": shape, "digest": file_digest(cached)}
    with atomic_path(_sidecar(cached)) as temp:
        temp.write_text(json.dumps(record))


def _read_cache(cached: Path, expected_prefix: tuple) -> np.ndarray | None:
    """The cached images, or None (with a warning naming the file) when it does not match its record."""
    try:
        record = json.loads(_sidecar(cached).read_text())
        images = np.load(cached, mmap_mode="r", allow_pickle=False)
        shape = tuple(images.shape)
        if record.get("format") != CACHE_FORMAT or list(shape) != record.get("shape"):
            problem = f"shape {shape} does not match its record {record.get('shape')}"
        elif images.dtype != np.uint8 or images.ndim != 4 or shape[: len(expected_prefix)] != expected_prefix:
            problem = f"holds {images.dtype} {shape}, expected uint8 {expected_prefix + ('...',)}"
        elif file_digest(cached) != record.get("digest"):
            problem = "its bytes do not match their recorded digest"
        else:
            problem = None
    except (OSError, ValueError, EOFError, json.JSONDecodeError, AttributeError) as error:
        problem = f"unreadable: {(str(error).splitlines() or [type(error).__name__])[0]}"
    if problem is not None:
        warnings.warn(f"dataset cache {cached} is corrupt ({problem}); rebuilding it", RuntimeWarning, stacklevel=3)
        return None
    return np.array(images) if images.nbytes <= MEMMAP_BYTES else images


def _list_images(path: Path) -> list[tuple[str, int, str]]:
    """Sorted (name relative to the root, size in bytes, member name in the source) of every image."""
    with _archive_errors(path):
        return _list_images_unchecked(path)


@contextlib.contextmanager
def _archive_errors(path: Path):
    """Turn a damaged archive's errors (bad header, truncated gzip stream) into one naming the archive."""
    try:
        yield
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, gzip.BadGzipFile) as error:
        if path.is_dir():
            raise
        reason = (str(error).splitlines() or [type(error).__name__])[0]
        raise UnreadableDataError(f"archive {path.resolve()} is damaged or not a {', '.join(ARCHIVE_SUFFIXES)} "
                                  f"archive ({type(error).__name__}: {reason})") from error


def _list_images_unchecked(path: Path) -> list[tuple[str, int, str]]:
    if path.is_dir():
        found = [(p.relative_to(path).as_posix(), p.stat().st_size, p.relative_to(path).as_posix())
                 for p in path.rglob("*") if p.is_file() and _is_image(p.relative_to(path).as_posix())]
    elif _is_archive(path) and path.name.lower().endswith(".zip"):
        with zipfile.ZipFile(path) as archive:
            found = [(info.filename, info.file_size, info.filename) for info in archive.infolist()
                     if _is_image(info.filename)]
    elif _is_archive(path):
        with tarfile.open(path) as archive:
            found = [(member.name, member.size, member.name) for member in archive
                     if member.isfile() and _is_image(member.name)]
    else:
        raise ValueError(f"{path} is neither a folder nor an archive ({', '.join(ARCHIVE_SUFFIXES)})")
    found.sort()
    if not path.is_dir():
        # Archives often wrap everything in one top folder ("train/..."): strip common leading folders
        # so class sub-folders are found the same way as for a directory.
        found = _strip_common_prefix(found)
    return found


def _strip_common_prefix(found: list[tuple[str, int, str]]) -> list[tuple[str, int, str]]:
    parts = [name.split("/") for name, _, _ in found]
    depth = 0
    while all(len(p) > depth + 2 for p in parts) and len({p[depth] for p in parts}) == 1:
        depth += 1
    return [("/".join(p[depth:]), size, member) for p, (_, size, member) in zip(parts, found)]


def _iter_images(path: Path, entries: list[tuple[str, int, str]]):
    """Yield (member name in the source, bytes) in the order of ``entries``."""
    if path.is_dir():
        for _, _, member in entries:
            yield member, (path / member).read_bytes()
    elif path.name.lower().endswith(".zip"):
        with _archive_errors(path), zipfile.ZipFile(path) as archive:
            for _, _, member in entries:
                yield member, archive.read(member)
    else:
        # tar: stream once (gzip is not seekable cheaply), then emit in sorted order.
        position = {member: i for i, (_, _, member) in enumerate(entries)}
        blobs: list[bytes | None] = [None] * len(entries)
        with _archive_errors(path), tarfile.open(path) as archive:
            for info in archive:
                if info.isfile() and info.name in position:
                    blobs[position[info.name]] = archive.extractfile(info).read()
        for (_, _, member), blob in zip(entries, blobs):
            yield member, blob


def _decode(data: bytes, resolution: int | None, channels: int, label: str) -> tuple[np.ndarray, bool]:
    """Decode image bytes to uint8 [C, H, W], center-cropped and resized when ``resolution`` is set.

    Returns the image and whether it is the image at its own size (nothing cropped or resized). An image
    that does not decode raises :class:`UnreadableDataError` naming ``label`` (its file or archive member).
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            image = image.convert("RGB" if channels == 3 else "L")  # loads every pixel: truncation shows here
            unchanged = True
            if resolution is not None:
                width, height = image.size
                side = min(width, height)
                if (width, height) != (side, side):
                    left, top = (width - side) // 2, (height - side) // 2
                    image = image.crop((left, top, left + side, top + side))
                    unchanged = False
                if side != resolution:
                    image = image.resize((resolution, resolution), Image.Resampling.LANCZOS)
                    unchanged = False
            array = np.asarray(image, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:  # SyntaxError: PIL's bad PNG
        reason = ("not an image format PIL recognises" if isinstance(error, UnidentifiedImageError)
                  else (str(error).splitlines() or [type(error).__name__])[0])  # PIL names a BytesIO, not the file
        raise UnreadableDataError(f"{label} is not a readable image ({reason})") from error
    return (array[None] if array.ndim == 2 else array.transpose(2, 0, 1)), unchanged
