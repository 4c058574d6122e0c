"""Dataset readers that turn every supported dataset into in-memory uint8 arrays.

Every reader returns an :class:`ImageArrays` holding ``(N, H, W, 3)`` uint8 RGB images and,
where the split is labelled, ``(N,)`` int64 labels. The training code moves these arrays to the
GPU once and does augmentation there, so nothing here depends on torch.

Supported names are listed in :data:`DATASETS`; see :func:`load_split`.
"""

from __future__ import annotations

import importlib
import io
import logging
import pickle
import re
import shutil
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from carlzoo.images import (
    IMAGE_EXTENSIONS,
    MAX_PIXELS,
    BadImage,
    read_image,
    resize_crop,
    to_rgb,
)

__all__ = [
    "DATASETS",
    "DEFAULT_IMAGE_SIZE",
    "FOLDER_DATASETS",
    "IMAGE_EXTENSIONS",
    "NUM_CLASSES",
    "SPLITS",
    "DatasetError",
    "ImageArrays",
    "load_split",
]

log = logging.getLogger(__name__)

DATASETS: tuple[str, ...] = (
    "cifar10",
    "cifar100",
    "stl10",
    "tinyimagenet",
    "imagenet64",
    "imagefolder",
    "folder",
    "npz",
)
SPLITS: tuple[str, ...] = ("pretrain", "train", "test")
# Images of any size, so load_split needs an image_size for them.
FOLDER_DATASETS: tuple[str, ...] = ("imagefolder", "folder")
DEFAULT_IMAGE_SIZE: dict[str, int] = {
    "cifar10": 32,
    "cifar100": 32,
    "stl10": 96,
    "tinyimagenet": 64,
    "imagenet64": 64,
}
NUM_CLASSES: dict[str, int] = {
    "cifar10": 10,
    "cifar100": 100,
    "stl10": 10,
    "tinyimagenet": 200,
    "imagenet64": 1000,
}


class DatasetError(ValueError):
    """A dataset is missing, malformed or asked for in a way that is not supported."""


@dataclass
class ImageArrays:
    """One split held in memory.

    ``images`` is ``(N, H, W, 3)`` uint8 RGB and C-contiguous; ``labels`` is ``(N,)`` int64 or
    ``None`` for an unlabelled split; ``classes`` holds the class names when they are known.
    """

    images: np.ndarray
    labels: np.ndarray | None
    classes: list[str] | None

    def __post_init__(self) -> None:
        images = self.images
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(
                f"images must be (N, H, W, 3) uint8, got {images.shape} {images.dtype}"
            )
        self.images = np.ascontiguousarray(images)
        if self.labels is not None:
            labels = self.labels
            if labels.shape != (images.shape[0],) or labels.dtype != np.int64:
                raise ValueError(
                    f"labels must be ({images.shape[0]},) int64, got {labels.shape} {labels.dtype}"
                )

    def __len__(self) -> int:
        return int(self.images.shape[0])


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------


def load_split(
    name: str,
    root: str | Path,
    split: str,
    *,
    download: bool = False,
    image_size: int | None = None,
) -> ImageArrays:
    """Load one split of a dataset into memory.

    ``split`` is ``"pretrain"`` (the self-supervised pool: ``unlabeled`` + ``train`` without
    labels for stl10, the labelled ``train`` split for everything else), ``"train"`` or
    ``"test"``. ``download`` fetches cifar10, cifar100, stl10 and tinyimagenet into ``root`` when
    their files are missing (it is ignored for local formats). ``image_size`` is required for
    ``imagefolder`` and ``folder``; for the other datasets it defaults to the native size and any
    other value resizes the images (shorter side to ``image_size``, then a centre crop).
    ``root`` may also be an ``.npz`` array file for any named dataset (see ``npz``).
    """
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise DatasetError(f"{name}: unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    if image_size is not None and (
        isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0
    ):
        raise DatasetError(f"{name}: image_size must be a positive integer, got {image_size!r}")
    root = Path(root).expanduser()
    # A named dataset may also come as an array file (x_train, y_train, x_test, y_test, plain
    # or encoded): e.g. `--dataset cifar10 --data-root cifar10.npz`. Runs then record the
    # dataset's real name rather than "npz".
    is_npz = root.suffix == ".npz" and name not in FOLDER_DATASETS
    if not is_npz and root.is_file() and name not in (*FOLDER_DATASETS, "npz"):
        # e.g. the downloaded archive itself
        holds = (
            f"{_RELEASES[name].folder} (the unpacked release)"
            if name in _RELEASES
            else "train_data_batch_1..10.npz and val_data.npz"  # imagenet64
        )
        raise DatasetError(
            f"{name}: {root} is a file; point --data-root at the folder that holds {holds} "
            "or at an .npz file of arrays"
        )
    loader = _LOADERS["npz"] if is_npz else _LOADERS[name]
    data = loader(name, root, split, download, image_size)
    if name == "stl10" and loader is _LOADERS["npz"] and split == "pretrain":
        data = ImageArrays(data.images, None, data.classes)
    log.debug("%s/%s from %s: %d images of %s", name, split, root, len(data), data.images.shape)
    return data


# --------------------------------------------------------------------------------------------
# Locating releases and downloading them
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Release:
    title: str  # human name used in messages
    folder: str  # folder the official archive unpacks into
    marker: str  # a file inside ``folder`` that shows the release is there
    url: str | None = None
    md5: str | None = None


_RELEASES: dict[str, _Release] = {
    "cifar10": _Release(
        "CIFAR-10",
        "cifar-10-batches-py",
        "data_batch_1",
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "c58f30108f718f92721af3b95e74349a",
    ),
    "cifar100": _Release(
        "CIFAR-100",
        "cifar-100-python",
        "train",
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "eb9058c3a382ffc7106e4002c42a8d85",
    ),
    "stl10": _Release(
        "STL-10",
        "stl10_binary",
        "train_X.bin",
        "http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz",
        "91f7769df0f17e558f3565bffb0c7dfb",
    ),
    "tinyimagenet": _Release(
        "Tiny ImageNet",
        "tiny-imagenet-200",
        "wnids.txt",
        "http://cs231n.stanford.edu/tiny-imagenet-200.zip",
        "90528d7ca1a48142e341f4ef8d21d0de",
    ),
}


def _download_archive(url: str, root: Path, md5: str) -> Path:
    """Download one archive into ``root``, md5-checked; returns its path (torchvision's
    downloader, imported only here, downloads again a file that fails the check)."""
    from torchvision.datasets.utils import download_url

    download_url(url, str(root), md5=md5)
    return root / Path(url).name


def _unpack(archive: Path, root: Path, folder: str) -> None:
    """Unpack ``archive`` into a temporary folder in ``root`` and rename the release's
    ``folder`` into place only once all of it is there: an unpacking cut short (Ctrl-C, a
    full disk) leaves no part of a release that would later pass for a whole one."""
    from torchvision.datasets.utils import extract_archive

    tmp = Path(tempfile.mkdtemp(prefix=f".{folder}.unpacking.", dir=root))
    try:
        extract_archive(str(archive), str(tmp))
        if not (tmp / folder).is_dir():
            raise ValueError(f"{archive.name} holds no {folder} folder")
        (tmp / folder).rename(root / folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _locate(name: str, root: Path, download: bool) -> Path:
    """Return the folder holding the official release, downloading it if asked to."""
    rel = _RELEASES[name]
    for candidate in (root / rel.folder, root):
        if (candidate / rel.marker).is_file():
            return candidate
    expected = root / rel.folder / rel.marker
    if not download:
        raise DatasetError(
            f"{name}: no {rel.title} found under {root} (expected {expected}); pass --download "
            f"to fetch it or point --data-root at the folder that holds {rel.folder}"
        )
    if (root / rel.folder).exists():  # not ours to replace: it may hold the user's files
        raise DatasetError(
            f"{name}: {root / rel.folder} exists but holds no complete {rel.title} release "
            f"({rel.marker} is missing); delete it and run again with --download"
        )
    assert rel.url is not None and rel.md5 is not None
    log.info("%s: downloading %s into %s", name, rel.url, root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        _unpack(_download_archive(rel.url, root, rel.md5), root, rel.folder)
    except (OSError, RuntimeError, ValueError, EOFError, tarfile.TarError,
            zipfile.BadZipFile) as exc:
        raise DatasetError(
            f"{name}: downloading {rel.url} into {root} failed ({exc}); check the network or "
            f"fetch the archive by hand and unpack it into {root}"
        ) from exc
    if not expected.is_file():
        raise DatasetError(
            f"{name}: downloaded {rel.url} into {root} but {expected} is still missing"
        )
    return root / rel.folder


def _require_file(name: str, path: Path) -> Path:
    if not path.is_file():
        rel = _RELEASES.get(name)
        if rel is None:
            raise DatasetError(f"{name}: {path} is missing (expected this file to be there)")
        raise DatasetError(
            f"{name}: {path} is missing (expected the complete {rel.title} release to be "
            f"there); delete {path.parent} and run again with --download, or unpack the "
            "release there again"
        )
    return path


# --------------------------------------------------------------------------------------------
# Restricted unpickling (CIFAR)
# --------------------------------------------------------------------------------------------

# Globals that numpy needs to rebuild arrays, dtypes and scalars from a pickle. Nothing else is
# resolved, so a downloaded pickle cannot call arbitrary code.
_SAFE_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }
)


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the numpy globals needed to rebuild arrays."""

    def __init__(self, file: Any, source: Path) -> None:
        super().__init__(file, encoding="bytes")
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _SAFE_GLOBALS:
            raise DatasetError(
                f"{self._source}: refuses to unpickle global {module}.{name} (only numpy array "
                "globals are allowed in dataset pickles)"
            )
        if module.startswith(("numpy.core.", "numpy._core.")):
            # numpy 2 moved numpy.core to numpy._core (old pickles name the former, new ones the
            # latter); prefer numpy._core and fall back for numpy 1.x.
            sub = module.split(".", 2)[2]
            try:
                return getattr(importlib.import_module(f"numpy._core.{sub}"), name)
            except (ImportError, AttributeError):
                module = f"numpy.core.{sub}"
        return getattr(importlib.import_module(module), name)


def _safe_unpickle(path: Path) -> Any:
    """Load a pickle with :class:`_RestrictedUnpickler`; any failure becomes DatasetError."""
    try:
        with path.open("rb") as fh:
            return _RestrictedUnpickler(fh, path).load()
    except DatasetError:
        raise
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
        OSError,
    ) as exc:
        raise DatasetError(f"{path}: not a readable pickle ({type(exc).__name__}: {exc})") from exc


# --------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100
# --------------------------------------------------------------------------------------------


def _cifar_batch(
    name: str, path: Path, label_key: bytes, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR pickle into (N, 32, 32, 3) images and (N,) labels."""
    obj = _safe_unpickle(_require_file(name, path))
    expect = f"a dict with b'data' (N, 3072) uint8 and {label_key!r} (N ints)"
    if not isinstance(obj, dict) or b"data" not in obj or label_key not in obj:
        raise DatasetError(f"{name}: {path} is not a CIFAR batch (expected {expect})")
    data = obj[b"data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise DatasetError(f"{name}: {path} b'data' is malformed (expected {expect})")
    if data.shape[1] != 3072:
        raise DatasetError(
            f"{name}: {path} b'data' has shape {data.shape} (expected (N, 3072) uint8)"
        )
    labels = _as_labels(name, path, obj[label_key], data.shape[0], 0, num_classes)
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, labels


def _cifar_names(name: str, path: Path, key: bytes, num_classes: int) -> list[str]:
    obj = _safe_unpickle(_require_file(name, path))
    names = obj.get(key) if isinstance(obj, dict) else None
    if not isinstance(names, list) or len(names) != num_classes:
        raise DatasetError(
            f"{name}: {path} is malformed (expected {key!r}: a list of {num_classes} names)"
        )
    return _names_text(name, path, names, repr(key))


def _names_text(name: str, path: Path, names: Sequence[Any], where: str) -> list[str]:
    """Class names as text; a byte string that is not UTF-8 is a DatasetError naming ``path``."""
    try:
        return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]
    except UnicodeDecodeError as exc:
        raise DatasetError(
            f"{name}: {path} {where} holds a class name that is not UTF-8 text ({exc.reason} at "
            f"byte {exc.start} of {exc.object[:40]!r}); the file is damaged or not this dataset"
        ) from None


def _load_cifar(
    name: str, root: Path, split: str, download: bool, image_size: int | None
) -> ImageArrays:
    folder = _locate(name, root, download)
    if name == "cifar10":
        files = [f"data_batch_{i}" for i in range(1, 6)] if split != "test" else ["test_batch"]
        meta, names_key, label_key = "batches.meta", b"label_names", b"labels"
    else:
        files = ["train"] if split != "test" else ["test"]
        meta, names_key, label_key = "meta", b"fine_label_names", b"fine_labels"
    num_classes = NUM_CLASSES[name]
    classes = _cifar_names(name, folder / meta, names_key, num_classes)
    parts = [_cifar_batch(name, folder / f, label_key, num_classes) for f in files]
    images = _concat([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    images = _maybe_resize(images, image_size)
    return ImageArrays(images, labels, classes)


# --------------------------------------------------------------------------------------------
# STL-10
# --------------------------------------------------------------------------------------------

_STL_IMAGE_BYTES = 3 * 96 * 96


def _stl_images(name: str, path: Path) -> np.ndarray:
    """Memory-map an STL-10 ``*_X.bin`` as a (N, 96, 96, 3) view (no copy yet)."""
    size = _require_file(name, path).stat().st_size
    if size == 0 or size % _STL_IMAGE_BYTES:
        raise DatasetError(
            f"{name}: {path} is truncated or not an STL-10 image file ({size} bytes is not a "
            f"positive multiple of 3*96*96={_STL_IMAGE_BYTES})"
        )
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    # Stored column-major: per image 3 planes of 96x96 with x varying slowest.
    return raw.reshape(-1, 3, 96, 96).transpose(0, 3, 2, 1)


def _stl_labels(name: str, path: Path, count: int) -> np.ndarray:
    raw = np.fromfile(_require_file(name, path), dtype=np.uint8)
    return _as_labels(name, path, raw, count, 1, NUM_CLASSES[name])


def _load_stl10(
    name: str, root: Path, split: str, download: bool, image_size: int | None
) -> ImageArrays:
    folder = _locate(name, root, download)
    names_file = _require_file(name, folder / "class_names.txt")
    classes = _read_lines(names_file)
    if len(classes) != NUM_CLASSES[name]:
        raise DatasetError(
            f"{name}: {names_file} lists {len(classes)} classes (expected {NUM_CLASSES[name]})"
        )
    if split == "pretrain":
        views = [
            _stl_images(name, folder / "unlabeled_X.bin"),
            _stl_images(name, folder / "train_X.bin"),
        ]
        images = _concat(views)
        labels = None
    else:
        prefix = "train" if split == "train" else "test"
        view = _stl_images(name, folder / f"{prefix}_X.bin")
        labels = _stl_labels(name, folder / f"{prefix}_y.bin", view.shape[0])
        images = _concat([view])
    images = _maybe_resize(images, image_size)
    return ImageArrays(images, labels, classes)


# --------------------------------------------------------------------------------------------
# Tiny ImageNet
# --------------------------------------------------------------------------------------------


def _load_tinyimagenet(
    name: str, root: Path, split: str, download: bool, image_size: int | None
) -> ImageArrays:
    folder = _locate(name, root, download)
    wnids_file = folder / "wnids.txt"
    wnids = _read_lines(wnids_file)
    if len(wnids) != NUM_CLASSES[name] or len(set(wnids)) != len(wnids):
        raise DatasetError(
            f"{name}: {wnids_file} lists {len(wnids)} ids (expected {NUM_CLASSES[name]} unique)"
        )
    index = {w: i for i, w in enumerate(wnids)}
    words: dict[str, str] = {}
    words_file = folder / "words.txt"
    if words_file.is_file():
        for line in words_file.read_text(encoding="utf-8", errors="replace").splitlines():
            wnid, _, text = line.partition("\t")
            if wnid in index:
                words[wnid] = text.split(",")[0].strip() or wnid
    classes = [words.get(w, w) for w in wnids]

    paths: list[Path] = []
    labels: list[int] = []
    if split == "test":
        ann = _require_file(name, folder / "val" / "val_annotations.txt")
        for lineno, line in enumerate(
            ann.read_text(encoding="utf-8", errors="replace").splitlines(), 1
        ):
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) < 2 or fields[1] not in index:
                raise DatasetError(
                    f"{name}: {ann} line {lineno} is malformed (expected 'filename<TAB>wnid...' "
                    "with a wnid from wnids.txt)"
                )
            paths.append(folder / "val" / "images" / fields[0])
            labels.append(index[fields[1]])
    else:
        for wnid in wnids:
            class_dir = folder / "train" / wnid / "images"
            if not class_dir.is_dir():
                raise DatasetError(f"{name}: {class_dir} is missing (expected the train images)")
            files = _list_images(class_dir, recursive=False)
            paths.extend(files)
            labels.extend([index[wnid]] * len(files))
    if not paths:
        raise DatasetError(f"{name}: no images found for split {split!r} under {folder}")
    size = image_size or DEFAULT_IMAGE_SIZE[name]
    images = _decode_images(name, paths, size)
    return ImageArrays(images, np.asarray(labels, dtype=np.int64), classes)


# --------------------------------------------------------------------------------------------
# Downsampled ImageNet 64x64
# --------------------------------------------------------------------------------------------

_IMAGENET64_HELP = (
    "log in at https://image-net.org/download-images.php, download "
    '"Imagenet64x64 (npz)" (both train parts and val) and unpack it into'
)
_IMAGENET64_BATCH = re.compile(r"train_data_batch_(\d+)\.npz$")


def _imagenet64_files(name: str, root: Path, split: str, download: bool) -> list[Path]:
    subdirs = (
        sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if root.is_dir()
        else []
    )
    dirs = [root, *subdirs]
    batches: list[tuple[int, Path]] = []
    if split == "test":
        found = [d / "val_data.npz" for d in dirs if (d / "val_data.npz").is_file()]
        expected = root / "val_data.npz"
    else:
        for p in (p for d in dirs for p in d.glob("train_data_batch_*.npz")):
            if not (m := _IMAGENET64_BATCH.fullmatch(p.name)):
                raise DatasetError(
                    f"{name}: {p} is not one of train_data_batch_1..10.npz (a renamed copy?); "
                    f"move it out of {p.parent}"
                )
            batches.append((int(m.group(1)), p))
        found = [p for _, p in sorted(batches)]
        expected = root / "train_data_batch_1.npz"
    if not found:
        if download:
            raise DatasetError(
                f"{name}: ImageNet64 cannot be downloaded automatically (no {expected}); "
                f"{_IMAGENET64_HELP} {root}"
            )
        raise DatasetError(
            f"{name}: no ImageNet64 found under {root} (expected {expected}); it cannot be "
            f"downloaded automatically: {_IMAGENET64_HELP} {root}"
        )
    if split == "test":
        if len(found) > 1:
            raise DatasetError(f"{name}: several val_data.npz under {root}: {found}; keep one")
        return found
    numbers = [n for n, _ in batches]
    if sorted(numbers) != list(range(1, 11)):
        missing = sorted(set(range(1, 11)) - set(numbers))
        raise DatasetError(
            f"{name}: expected train_data_batch_1..10.npz under {root}, found batches "
            f"{sorted(numbers)} (missing {missing}); unpack both train parts of "
            '"Imagenet64x64 (npz)" and remove duplicates'
        )
    return found


# What reading a damaged zip member raises: zlib.error for corrupt deflate data and
# NotImplementedError for a compression method that a flipped header bit names.
_DAMAGED_ZIP = (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _npz_array(name: str, path: Path, npz: Any, key: str) -> np.ndarray:
    if key not in npz.files:
        more = f", ... ({len(npz.files)} in all)" if len(npz.files) > 8 else ""
        keys = ", ".join(npz.files[:8]) + more
        raise DatasetError(f"{name}: {path} has no key {key!r} (keys: {keys})")
    try:
        value = npz[key]
    except _DAMAGED_ZIP as exc:
        raise DatasetError(
            f"{name}: {path} key {key!r} is unreadable ({_first_line(exc)}); the file is "
            "damaged: copy or download it again"
        ) from exc
    if not isinstance(value, np.ndarray):  # numpy returns a member that is not .npy as bytes
        raise DatasetError(f"{name}: {path} key {key!r} is not an array (.npy) member")
    return value


def _open_npz(name: str, path: Path) -> Any:
    # np.load would return an array for a .npy file, call any other file "pickled" and open
    # any zip (e.g. a folder of JPEGs) as an archive of arrays.
    not_npz = f"{name}: {path} is not an .npz file (a zip of named arrays, as np.savez writes)"
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        raise DatasetError(not_npz) from None
    if not any(m.endswith(".npy") for m in members):
        raise DatasetError(f"{not_npz}; this zip holds no .npy arrays")
    try:
        return np.load(path, allow_pickle=False)
    except _DAMAGED_ZIP as exc:
        raise DatasetError(
            f"{name}: {path} is not a readable .npz file ({_first_line(exc)})"
        ) from exc


def _load_imagenet64(
    name: str, root: Path, split: str, download: bool, image_size: int | None
) -> ImageArrays:
    files = _imagenet64_files(name, root, split, download)
    # First pass reads only the (small) labels so the image array can be allocated once.
    label_parts = []
    for path in files:
        with _open_npz(name, path) as npz:
            raw = _npz_array(name, path, npz, "labels")
            label_parts.append(_as_labels(name, path, raw, None, 1, NUM_CLASSES[name]))
    total = sum(len(p) for p in label_parts)
    images = np.empty((total, 64, 64, 3), dtype=np.uint8)
    start = 0
    for path, labels in zip(files, label_parts, strict=True):
        with _open_npz(name, path) as npz:
            data = _npz_array(name, path, npz, "data")
        n = len(labels)
        if data.dtype != np.uint8 or data.shape != (n, 12288):
            raise DatasetError(
                f"{name}: {path} key 'data' has shape {data.shape} {data.dtype} (expected "
                f"({n}, 12288) uint8 to match {n} labels)"
            )
        images[start : start + n] = data.reshape(n, 3, 64, 64).transpose(0, 2, 3, 1)
        start += n
        log.debug("%s: read %s (%d images)", name, path, n)
    images = _maybe_resize(images, image_size)
    return ImageArrays(images, np.concatenate(label_parts), None)


# --------------------------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------------------------


def _require_size(name: str, image_size: int | None) -> int:
    if image_size is None:
        raise DatasetError(f"{name}: image_size is required (pass --image-size)")
    return image_size


def _load_imagefolder(
    name: str, root: Path, split: str, download: bool, image_size: int | None
) -> ImageArrays:
    size = _require_size(name, image_size)
    names = ("test", "val") if split == "test" else ("train",)
    split_dir = next((root / n for n in names if (root / n).is_dir()), None)
    if split_dir is None:
        raise DatasetError(
            f"{name}: no folder for split {split!r} under {root} (expected "
            f"{' or '.join(str(root / n) for n in names)} holding <class_name>/<images>)"
        )

    def class_dirs(d: Path) -> list[str]:
        return sorted(p.name for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))

    # Labels follow the train folder's classes so train and test agree on the indices.
    train_dir = root / "train"
    classes = class_dirs(train_dir if train_dir.is_dir() else split_dir)
    index = {c: i for i, c in enumerate(classes)}
    paths: list[Path] = []
    labels: list[int] = []
    for cls in class_dirs(split_dir):
        if cls not in index:
            raise DatasetError(
                f"{name}: class folder {split_dir / cls} has no counterpart in {train_dir}"
            )
        files = _list_images(split_dir / cls, recursive=True)
        paths.extend(files)
        labels.extend([index[cls]] * len(files))
    if not paths:
        raise DatasetError(
            f"{name}: no images under {split_dir} (expected {split_dir}/<class_name>/<image> with "
            f"extensions {' '.join(IMAGE_EXTENSIONS)})"
        )
    images = _decode_images(name, paths, size)
    return ImageArrays(images, np.asarray(labels, dtype=np.int64), classes)


def _load_folder(
    name: str, root: Path, split: str, download: bool, image_size: int | None
) -> ImageArrays:
    size = _require_size(name, image_size)
    if not root.is_dir():
        raise DatasetError(f"{name}: {root} is not a folder (expected a folder of images)")
    paths = _list_images(root, recursive=True)
    if not paths:
        raise DatasetError(
            f"{name}: no images under {root} (extensions {' '.join(IMAGE_EXTENSIONS)})"
        )
    return ImageArrays(_decode_images(name, paths, size), None, None)


def _list_images(folder: Path, *, recursive: bool) -> list[Path]:
    """Image files in ``folder`` (optionally recursive), sorted, hidden files skipped."""
    it = folder.rglob("*") if recursive else folder.iterdir()
    files = [
        p
        for p in it
        if p.suffix.lower() in IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        and p.is_file()
    ]
    return sorted(files)


def _read_image(name: str, path: Path, size: int) -> np.ndarray:
    """Decode like ``carlzoo embed`` does (EXIF upright, alpha on white), then resize + crop."""
    try:
        rgb = read_image(path, min_side=size)
    except BadImage as exc:
        raise DatasetError(f"{name}: cannot decode image {path} ({exc.reason})") from None
    return np.asarray(resize_crop(rgb, size, size), dtype=np.uint8)


def _run_chunks(n: int, work: Callable[[int, int], None], chunk: int = 256) -> None:
    """Run ``work(start, stop)`` over ``range(n)`` in chunks on a thread pool."""
    if n <= chunk:
        work(0, n)
        return
    with ThreadPoolExecutor() as pool:
        futures: list[Future[None]] = [
            pool.submit(work, s, min(s + chunk, n)) for s in range(0, n, chunk)
        ]
        try:
            for fut in futures:
                fut.result()
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise


def _decode_images(name: str, paths: Sequence[Path], size: int) -> np.ndarray:
    """Decode images into a (N, size, size, 3) uint8 array using a thread pool."""
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)

    def work(start: int, stop: int) -> None:
        for i in range(start, stop):
            out[i] = _read_image(name, paths[i], size)

    log.info("%s: decoding %d images at %dx%d", name, len(paths), size, size)
    _run_chunks(len(paths), work)
    return out


def _maybe_resize(images: np.ndarray, image_size: int | None) -> np.ndarray:
    """Return ``images`` unchanged at native size, else resize + centre-crop each image."""
    if image_size is None or images.shape[1:3] == (image_size, image_size):
        return images
    out = np.empty((images.shape[0], image_size, image_size, 3), dtype=np.uint8)

    def work(start: int, stop: int) -> None:
        for i in range(start, stop):
            out[i] = np.asarray(resize_crop(Image.fromarray(images[i]), image_size, image_size))

    log.info("resizing %d images from %s to %d", images.shape[0], images.shape[1:3], image_size)
    _run_chunks(images.shape[0], work)
    return out


# --------------------------------------------------------------------------------------------
# npz
# --------------------------------------------------------------------------------------------


def _load_npz(
    name: str, root: Path, split: str, download: bool, image_size: int | None
) -> ImageArrays:
    if not root.is_file():
        what = "is a folder" if root.is_dir() else "does not exist"
        raise DatasetError(
            f"{name}: {root} {what} (expected the path of an .npz file with x_train, y_train, "
            "x_test, y_test)"
        )
    part = "test" if split == "test" else "train"
    xk, yk = f"x_{part}", f"y_{part}"
    with _open_npz(name, root) as npz:
        if xk not in npz.files and f"{part}_bytes" in npz.files:
            # Encoded variant: {part}_bytes holds every image file back to back and
            # {part}_off (N + 1,) the offsets (e.g. a WebP copy small enough to ship).
            x = _decode_encoded(
                name,
                root,
                _npz_array(name, root, npz, f"{part}_bytes"),
                _npz_array(name, root, npz, f"{part}_off"),
            )
        else:
            x = _npz_array(name, root, npz, xk)
        y = _npz_array(name, root, npz, yk)
        names = _npz_array(name, root, npz, "class_names") if "class_names" in npz.files else None
    if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != np.uint8:
        hint = (
            "; it looks like NCHW, transpose it to NHWC" if x.ndim == 4 and x.shape[1] == 3 else ""
        )
        raise DatasetError(
            f"{name}: {root} key {xk!r} has shape {x.shape} {x.dtype} (expected (N, H, W, 3) "
            f"uint8{hint})"
        )
    classes: list[str] | None = None
    if names is not None:
        if names.ndim != 1 or names.dtype.kind not in "US":
            raise DatasetError(
                f"{name}: {root} key 'class_names' has shape {names.shape} {names.dtype} "
                "(expected a 1-D array of strings)"
            )
        classes = _names_text(name, root, names.tolist(), "key 'class_names'")
    labels = _as_labels(name, root, y, x.shape[0], 0, len(classes) if classes else None, key=yk)
    images = _maybe_resize(np.ascontiguousarray(x), image_size)
    return ImageArrays(images, labels, classes)


def _decode_encoded(name: str, path: Path, data: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Decode images stored as concatenated files (``data[off[i]:off[i + 1]]``)."""
    if data.dtype != np.uint8 or data.ndim != 1 or offsets.ndim != 1 or len(offsets) < 2:
        raise DatasetError(
            f"{name}: {path} encoded images need a 1-D uint8 bytes array and 1-D offsets "
            f"(got {data.shape} {data.dtype} and {offsets.shape})"
        )
    if offsets.dtype.kind not in "iu":
        raise DatasetError(
            f"{name}: {path} image offsets are {offsets.dtype}; they must be integers"
        )
    offsets = offsets.astype(np.int64)  # np.diff of unsigned offsets would wrap around
    if offsets[0] != 0 or offsets[-1] != len(data) or np.any(np.diff(offsets) <= 0):
        raise DatasetError(f"{name}: {path} has inconsistent image offsets")

    def decode(i: int) -> np.ndarray:
        try:
            with Image.open(io.BytesIO(data[offsets[i] : offsets[i + 1]].tobytes())) as img:
                w, h = img.size
                if w * h > MAX_PIXELS:
                    raise DatasetError(
                        f"{name}: {path} image {i} is {w}x{h}, over the limit of {MAX_PIXELS} "
                        "pixels (decompression-bomb guard)"
                    )
                return np.asarray(to_rgb(img), dtype=np.uint8)
        except DatasetError:
            raise
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise DatasetError(f"{name}: {path} image {i} cannot be decoded ({exc})") from exc

    first = decode(0)
    out = np.empty((len(offsets) - 1, *first.shape), dtype=np.uint8)
    out[0] = first

    def work(start: int, stop: int) -> None:
        for i in range(max(start, 1), stop):
            img = decode(i)
            if img.shape != first.shape:
                raise DatasetError(
                    f"{name}: {path} image {i} is {img.shape}, image 0 is {first.shape}"
                )
            out[i] = img

    _run_chunks(len(out), work, chunk=1024)
    return out


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


def _as_labels(
    name: str,
    path: Path,
    raw: Any,
    count: int | None,
    base: int,
    num_classes: int | None,
    *,
    key: str = "labels",
) -> np.ndarray:
    """Validate labels (``base``-based ints) and return them 0-based as int64."""
    expected = f"({count if count is not None else 'N'},) integers"
    if num_classes is not None:
        expected += f" in {base}..{base + num_classes - 1}"
    try:
        arr = np.asarray(raw)
    except (ValueError, TypeError):  # ragged: e.g. a list holding a list
        raise DatasetError(
            f"{name}: {path} {key} are not a flat sequence of numbers (expected {expected})"
        ) from None
    if (
        arr.ndim != 1
        or (arr.size and arr.dtype.kind not in "iu")
        or (count is not None and arr.shape[0] != count)
    ):
        raise DatasetError(
            f"{name}: {path} {key} have shape {arr.shape} {arr.dtype} (expected {expected})"
        )
    labels = arr.astype(np.int64) - base
    if labels.size and (
        labels.min() < 0 or (num_classes is not None and labels.max() >= num_classes)
    ):
        raise DatasetError(
            f"{name}: {path} {key} range {labels.min() + base}..{labels.max() + base} "
            f"(expected {expected})"
        )
    return labels


def _read_lines(path: Path) -> list[str]:
    """Non-empty, stripped lines of a text file."""
    text = path.read_text(encoding="utf-8", errors="replace")
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


def _concat(parts: Sequence[np.ndarray]) -> np.ndarray:
    """Concatenate (possibly strided or memory-mapped) image arrays into one contiguous array."""
    total = sum(p.shape[0] for p in parts)
    out = np.empty((total, *parts[0].shape[1:]), dtype=np.uint8)
    start = 0
    for p in parts:
        out[start : start + p.shape[0]] = p
        start += p.shape[0]
    return out


_Loader = Callable[[str, Path, str, bool, int | None], ImageArrays]
_LOADERS: dict[str, _Loader] = {
    "cifar10": _load_cifar,
    "cifar100": _load_cifar,
    "stl10": _load_stl10,
    "tinyimagenet": _load_tinyimagenet,
    "imagenet64": _load_imagenet64,
    "imagefolder": _load_imagefolder,
    "folder": _load_folder,
    "npz": _load_npz,
}
