"""Tests for carlzoo.training.datasets: tiny files in each official layout, built in tmp_path."""

from __future__ import annotations

import os
import pickle
import shutil
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from carlzoo.images import ImageTransform, read_image
from carlzoo.training import datasets as ds
from carlzoo.training.datasets import (
    DATASETS,
    DEFAULT_IMAGE_SIZE,
    NUM_CLASSES,
    DatasetError,
    ImageArrays,
    load_split,
)

# --------------------------------------------------------------------------------------------
# Builders for the official formats
# --------------------------------------------------------------------------------------------


class _Py2StylePickler(pickle._Pickler):
    """Writes bytes and str as Python 2 ``str`` opcodes, like the official CIFAR pickles."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj: bytes | str) -> None:
        data = obj.encode("latin-1") if isinstance(obj, str) else obj
        n = len(data)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + data)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str
    dispatch[str] = _save_py2_str


def _py2_pickle(obj: object, path: Path) -> None:
    import io

    buf = io.BytesIO()
    _Py2StylePickler(buf, protocol=2).dump(obj)
    # The official files were written by numpy 1.x, whose arrays name numpy.core.multiarray.
    path.write_bytes(buf.getvalue().replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))


def _cifar_data(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3072), dtype=np.uint8)


def _make_cifar10(root: Path, n: int = 3) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i in range(1, 6):
        data = _cifar_data(n, i)
        _py2_pickle(
            {b"data": data, b"labels": [(i + j) % 10 for j in range(n)]}, folder / f"data_batch_{i}"
        )
    test = _cifar_data(2, 99)
    test[0, :] = 0
    test[0, 1024 + 5 * 32 + 7] = 200  # G plane, row 5, column 7
    _py2_pickle({b"data": test, b"labels": [9, 0]}, folder / "test_batch")
    names = [f"class{c}".encode() for c in range(10)]
    _py2_pickle({b"label_names": names, b"num_vis": 3072}, folder / "batches.meta")
    return folder


def _make_stl10(root: Path, n_train: int = 2, n_test: int = 3, n_unl: int = 4) -> Path:
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("test", n_test), ("unlabeled", n_unl)):
        rng.integers(0, 256, size=n * 3 * 96 * 96, dtype=np.uint8).tofile(
            folder / f"{prefix}_X.bin"
        )
        if prefix != "unlabeled":
            np.arange(1, n + 1, dtype=np.uint8).tofile(folder / f"{prefix}_y.bin")
    names = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
    (folder / "class_names.txt").write_text("\n".join(names) + "\n")
    return folder


def _solid(color: tuple[int, int, int], size: tuple[int, int] = (64, 64)) -> Image.Image:
    return Image.new("RGB", size, color)


def _make_tinyimagenet(root: Path) -> Path:
    folder = root / "tiny-imagenet-200"
    wnids = [f"n{i:08d}" for i in range(200)]
    (folder / "val" / "images").mkdir(parents=True)
    (folder / "wnids.txt").write_text("\n".join(wnids) + "\n")
    words = [f"{w}\tthing {i}, other name" for i, w in enumerate(reversed(wnids))]
    (folder / "words.txt").write_text("\n".join(["n99999999\tunused"] + words) + "\n")
    colors = {0: (255, 0, 0), 1: (0, 255, 0)}
    for i, w in enumerate(wnids):
        images = folder / "train" / w / "images"
        images.mkdir(parents=True)
        if i in colors:
            for k in range(2):
                _solid(colors[i]).save(images / f"{w}_{k}.JPEG", quality=95)
    _solid((0, 0, 255)).save(folder / "val" / "images" / "val_0.JPEG", quality=95)
    _solid((255, 0, 0)).save(folder / "val" / "images" / "val_1.JPEG", quality=95)
    (folder / "val" / "val_annotations.txt").write_text(
        f"val_0.JPEG\t{wnids[7]}\t0\t0\t10\t10\nval_1.JPEG\t{wnids[0]}\t1\t2\t30\t40\n"
    )
    return folder


# --------------------------------------------------------------------------------------------
# Registry / argument checks
# --------------------------------------------------------------------------------------------


def test_registry_constants() -> None:
    names = "cifar10 cifar100 stl10 tinyimagenet imagenet64 imagefolder folder npz"
    assert DATASETS == tuple(names.split())
    sizes = dict(cifar10=32, cifar100=32, stl10=96, tinyimagenet=64, imagenet64=64)
    assert DEFAULT_IMAGE_SIZE == sizes
    assert NUM_CLASSES["tinyimagenet"] == 200 and NUM_CLASSES["imagenet64"] == 1000


def test_unknown_name_and_split(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="unknown dataset 'mnist'.*cifar10.*npz"):
        load_split("mnist", tmp_path, "train")
    with pytest.raises(DatasetError, match="unknown split 'val'.*pretrain, train, test"):
        load_split("cifar10", tmp_path, "val")


def test_image_arrays_contract() -> None:
    arr = ImageArrays(np.zeros((2, 4, 4, 3), np.uint8), np.array([0, 1]), ["a", "b"])
    assert len(arr) == 2
    with pytest.raises(ValueError):
        ImageArrays(np.zeros((2, 4, 4), np.uint8), None, None)


# --------------------------------------------------------------------------------------------
# CIFAR
# --------------------------------------------------------------------------------------------


def test_cifar10_train_test_pretrain(tmp_path: Path) -> None:
    folder = _make_cifar10(tmp_path)
    train = load_split("cifar10", tmp_path, "train")
    assert train.images.shape == (15, 32, 32, 3) and train.images.dtype == np.uint8
    assert train.images.flags["C_CONTIGUOUS"]
    assert train.labels is not None and train.labels.dtype == np.int64
    assert train.labels[:3].tolist() == [1, 2, 3] and train.labels[-3:].tolist() == [5, 6, 7]
    assert train.classes == [f"class{c}" for c in range(10)]
    # Planar rows: value at R-plane index (row*32 + col) is pixel (row, col, 0).
    raw1 = _cifar_data(3, 1)
    assert train.images[1, 3, 30, 0] == raw1[1, 3 * 32 + 30]
    assert train.images[2, 31, 0, 2] == raw1[2, 2048 + 31 * 32]

    pretrain = load_split("cifar10", tmp_path, "pretrain")
    np.testing.assert_array_equal(pretrain.images, train.images)
    np.testing.assert_array_equal(pretrain.labels, train.labels)

    test = load_split("cifar10", folder, "test")  # root may be the release folder itself
    assert test.images.shape == (2, 32, 32, 3)
    assert test.labels is not None and test.labels.tolist() == [9, 0]
    assert test.images[0, 5, 7, 1] == 200
    assert int(test.images[0].sum()) == 200  # nothing transposed or shifted


def test_cifar100(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    data = _cifar_data(4, 3)
    fine = [0, 99, 42, 7]
    batch = {b"data": data, b"fine_labels": fine, b"coarse_labels": [0, 1, 2, 3]}
    _py2_pickle(batch, folder / "train")
    # A pickle written by today's numpy with the default protocol also loads.
    (folder / "test").write_bytes(pickle.dumps(batch))
    names = [f"fine{c}".encode() for c in range(100)]
    _py2_pickle({b"fine_label_names": names, b"coarse_label_names": []}, folder / "meta")
    for split in ("train", "test"):
        out = load_split("cifar100", tmp_path, split)
        assert out.images.shape == (4, 32, 32, 3)
        assert out.labels is not None and out.labels.tolist() == fine
        assert out.classes is not None and out.classes[99] == "fine99"
        assert out.images[3, 10, 20, 1] == data[3, 1024 + 10 * 32 + 20]


def test_cifar_resize(tmp_path: Path) -> None:
    _make_cifar10(tmp_path)
    out = load_split("cifar10", tmp_path, "test", image_size=16)
    assert out.images.shape == (2, 16, 16, 3)


def test_cifar_missing_root_mentions_download(tmp_path: Path) -> None:
    root = tmp_path / "nowhere"
    with pytest.raises(DatasetError) as info:
        load_split("cifar10", root, "train")
    msg = str(info.value)
    assert str(root / "cifar-10-batches-py" / "data_batch_1") in msg
    assert "--download" in msg and "\n" not in msg


def _release_archive(make: Callable[[Path], Path], dest: Path) -> Path:
    """``dest``: a .tar.gz of the fake release ``make`` writes, laid out as the official one."""
    staging = dest.parent / f".{dest.name}.staging"
    folder = make(staging)
    with tarfile.open(dest, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    shutil.rmtree(staging)
    return dest


def _fake_downloads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Path, str]]:
    """Make ``_download_archive`` write a fake CIFAR-10 release archive; returns its calls."""
    calls: list[tuple[str, Path, str]] = []

    def fake_download(url: str, root: Path, md5: str) -> Path:
        calls.append((url, root, md5))
        return _release_archive(_make_cifar10, root / "cifar-10-python.tar.gz")

    monkeypatch.setattr(ds, "_download_archive", fake_download)
    return calls


def test_cifar_download_only_when_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fake_downloads(monkeypatch)
    out = load_split("cifar10", tmp_path, "test", download=True)
    assert len(out) == 2
    assert calls == [
        (
            "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
            tmp_path,
            "c58f30108f718f92721af3b95e74349a",
        )
    ]
    load_split("cifar10", tmp_path, "test", download=True)
    assert len(calls) == 1  # files present: no second download


def test_an_unpacking_cut_short_leaves_no_release_that_passes_for_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torchvision.datasets.utils as tv_utils

    calls = _fake_downloads(monkeypatch)

    def disk_full(archive: str, to: str) -> None:  # the marker is out, the rest is not
        (Path(to) / "cifar-10-batches-py").mkdir()
        (Path(to) / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"part")
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(tv_utils, "extract_archive", disk_full)
        with pytest.raises(DatasetError, match=r"failed \(\[Errno 28\] No space left on device"):
            load_split("cifar10", tmp_path, "test", download=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar-10-python.tar.gz"]
    out = load_split("cifar10", tmp_path, "test", download=True)  # the next run completes it
    assert len(out) == 2 and len(calls) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "cifar-10-batches-py", "cifar-10-python.tar.gz"
    ]  # fmt: skip


def test_a_release_folder_without_its_marker_is_not_replaced_by_a_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _fake_downloads(monkeypatch)
    mine = tmp_path / "cifar-10-batches-py" / "notes.txt"
    mine.parent.mkdir()
    mine.write_text("kept")
    with pytest.raises(DatasetError) as info:
        load_split("cifar10", tmp_path, "test", download=True)
    assert str(info.value) == (
        f"cifar10: {mine.parent} exists but holds no complete CIFAR-10 release (data_batch_1 is "
        "missing); delete it and run again with --download"
    )
    assert calls == [] and mine.read_text() == "kept"


def test_a_release_missing_a_file_says_how_to_fetch_it_again(tmp_path: Path) -> None:
    folder = _make_cifar10(tmp_path)
    (folder / "test_batch").unlink()
    with pytest.raises(DatasetError) as info:
        load_split("cifar10", tmp_path, "test")
    assert str(info.value) == (
        f"cifar10: {folder / 'test_batch'} is missing (expected the complete CIFAR-10 release "
        f"to be there); delete {folder} and run again with --download, or unpack the release "
        "there again"
    )


def test_malformed_cifar_labels_and_names_name_the_file(tmp_path: Path) -> None:
    folder = _make_cifar10(tmp_path)
    meta = folder / "batches.meta"
    names = [f"class{c}".encode() for c in range(9)] + [b"\xff\xfe"]
    _py2_pickle({b"label_names": names, b"num_vis": 3072}, meta)
    with pytest.raises(DatasetError) as info:
        load_split("cifar10", tmp_path, "test")
    assert str(info.value).startswith(
        f"cifar10: {meta} b'label_names' holds a class name that is not UTF-8 text ("
    )
    assert "\n" not in str(info.value)
    _py2_pickle({b"label_names": names[:9] + [b"class9"], b"num_vis": 3072}, meta)
    batch = folder / "data_batch_3"
    _py2_pickle({b"data": _cifar_data(3, 3), b"labels": [1, 2, [3]]}, batch)
    with pytest.raises(DatasetError) as info:
        load_split("cifar10", tmp_path, "train")
    assert str(info.value) == (
        f"cifar10: {batch} labels are not a flat sequence of numbers (expected (3,) integers "
        "in 0..9)"
    )


def test_a_damaged_compressed_npz_member_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (8, 4, 4, 3), dtype=np.uint8)
    y = np.arange(8) % 2
    np.savez_compressed(path, x_train=x, y_train=y, x_test=x[:2], y_test=y[:2])
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("x_train.npy")
    raw = bytearray(path.read_bytes())
    # the member's data follow its 30-byte local header, name and extra field
    at = info.header_offset
    name_len, extra_len = struct.unpack("<HH", raw[at + 26 : at + 30])
    raw[at + 30 + name_len + extra_len] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(DatasetError) as err:
        load_split("npz", path, "train")
    msg = str(err.value)
    assert msg.startswith(f"npz: {path} key 'x_train' is unreadable (") and "\n" not in msg
    assert msg.endswith("the file is damaged: copy or download it again")


def test_download_failure_is_dataset_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(url: str, root: Path, md5: str) -> None:
        raise OSError("network unreachable")

    monkeypatch.setattr(ds, "_download_archive", failing)
    with pytest.raises(DatasetError, match="stl10_binary.tar.gz.*network unreachable"):
        load_split("stl10", tmp_path, "train", download=True)


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_refuses_globals(tmp_path: Path) -> None:
    folder = _make_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    (folder / "test_batch").write_bytes(
        pickle.dumps({b"data": _Evil(marker), b"labels": [0]}, protocol=2)
    )
    with pytest.raises(DatasetError, match=r"refuses to unpickle global (posix|nt|os)\.system"):
        load_split("cifar10", tmp_path, "test")
    assert not marker.exists()


def test_cifar_malformed_batches(tmp_path: Path) -> None:
    folder = _make_cifar10(tmp_path)
    _py2_pickle({b"labels": [0, 1]}, folder / "test_batch")
    with pytest.raises(DatasetError, match="test_batch.*b'data'"):
        load_split("cifar10", tmp_path, "test")
    _py2_pickle({b"data": np.zeros((2, 3000), np.uint8), b"labels": [0, 1]}, folder / "test_batch")
    with pytest.raises(DatasetError, match=r"test_batch.*\(N, 3072\)"):
        load_split("cifar10", tmp_path, "test")
    _py2_pickle({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, folder / "test_batch")
    with pytest.raises(DatasetError, match="test_batch"):
        load_split("cifar10", tmp_path, "test")
    good = (folder / "data_batch_2").read_bytes()
    (folder / "data_batch_2").write_bytes(good[: len(good) // 2])
    with pytest.raises(DatasetError, match="data_batch_2.*not a readable pickle"):
        load_split("cifar10", tmp_path, "train")
    (folder / "data_batch_4").unlink()
    (folder / "data_batch_2").write_bytes(good)
    with pytest.raises(DatasetError, match="data_batch_4 is missing"):
        load_split("cifar10", tmp_path, "train")


# --------------------------------------------------------------------------------------------
# STL-10
# --------------------------------------------------------------------------------------------


def test_stl10_column_major_and_labels(tmp_path: Path) -> None:
    folder = _make_stl10(tmp_path)
    # Independent check of the layout: byte (image n, channel c, column x, row y).
    raw = np.zeros(2 * 3 * 96 * 96, np.uint8)
    n, c, row, col = 1, 2, 5, 70
    raw[n * 27648 + c * 9216 + col * 96 + row] = 222
    raw.tofile(folder / "train_X.bin")
    train = load_split("stl10", tmp_path, "train")
    assert train.images.shape == (2, 96, 96, 3) and train.images.dtype == np.uint8
    assert train.images.flags["C_CONTIGUOUS"]
    assert train.images[n, row, col, c] == 222 and int(train.images.sum()) == 222
    assert train.labels is not None and train.labels.tolist() == [0, 1]  # 1-based on disk
    assert train.classes is not None and train.classes[0] == "airplane"

    test = load_split("stl10", folder, "test")
    assert test.images.shape == (3, 96, 96, 3)
    assert test.labels is not None and test.labels.tolist() == [0, 1, 2]


def test_stl10_pretrain_is_unlabeled_plus_train(tmp_path: Path) -> None:
    _make_stl10(tmp_path)
    pre = load_split("stl10", tmp_path, "pretrain")
    unl = np.fromfile(tmp_path / "stl10_binary" / "unlabeled_X.bin", np.uint8)
    unl = unl.reshape(-1, 3, 96, 96).transpose(0, 3, 2, 1)
    train = load_split("stl10", tmp_path, "train")
    assert pre.labels is None
    assert pre.images.shape == (6, 96, 96, 3)
    np.testing.assert_array_equal(pre.images[:4], unl)
    np.testing.assert_array_equal(pre.images[4:], train.images)


def test_stl10_truncated_and_bad_labels(tmp_path: Path) -> None:
    folder = _make_stl10(tmp_path)
    x = folder / "train_X.bin"
    x.write_bytes(x.read_bytes()[:-100])
    with pytest.raises(DatasetError, match="train_X.bin is truncated"):
        load_split("stl10", tmp_path, "train")
    np.zeros(3 * 27648, np.uint8).tofile(folder / "test_X.bin")
    np.array([1, 2], np.uint8).tofile(folder / "test_y.bin")
    with pytest.raises(DatasetError, match=r"test_y.bin.*\(3,\)"):
        load_split("stl10", tmp_path, "test")
    np.array([1, 2, 11], np.uint8).tofile(folder / "test_y.bin")
    with pytest.raises(DatasetError, match="test_y.bin.*1..10"):
        load_split("stl10", tmp_path, "test")


# --------------------------------------------------------------------------------------------
# Tiny ImageNet
# --------------------------------------------------------------------------------------------


def test_tinyimagenet(tmp_path: Path) -> None:
    _make_tinyimagenet(tmp_path)
    train = load_split("tinyimagenet", tmp_path, "train")
    assert train.images.shape == (4, 64, 64, 3) and train.images.dtype == np.uint8
    assert train.labels is not None and train.labels.tolist() == [0, 0, 1, 1]
    assert np.abs(train.images[0].astype(int) - [255, 0, 0]).max() <= 3
    assert np.abs(train.images[3].astype(int) - [0, 255, 0]).max() <= 3
    assert train.classes is not None and len(train.classes) == 200
    assert train.classes[0] == "thing 199" and train.classes[199] == "thing 0"

    test = load_split("tinyimagenet", tmp_path, "test")  # reads val with its annotations
    assert test.labels is not None and test.labels.tolist() == [7, 0]
    assert np.abs(test.images[0].astype(int) - [0, 0, 255]).max() <= 3

    small = load_split("tinyimagenet", tmp_path, "test", image_size=32)
    assert small.images.shape == (2, 32, 32, 3)


def test_tinyimagenet_bad_annotation(tmp_path: Path) -> None:
    folder = _make_tinyimagenet(tmp_path)
    (folder / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn12345678\t0\t0\t1\t1\n")
    with pytest.raises(DatasetError, match="val_annotations.txt line 1"):
        load_split("tinyimagenet", tmp_path, "test")


# --------------------------------------------------------------------------------------------
# ImageNet 64x64
# --------------------------------------------------------------------------------------------


def _imagenet64_batch(path: Path, n: int, seed: int, first_label: int) -> np.ndarray:
    data = np.random.default_rng(seed).integers(0, 256, size=(n, 12288), dtype=np.uint8)
    labels = [first_label + i for i in range(n)]
    np.savez(path, data=data, labels=labels, mean=np.zeros(12288))
    return data


def test_imagenet64_subfolders(tmp_path: Path) -> None:
    train_dir = tmp_path / "Imagenet64_train_npz"
    val_dir = tmp_path / "Imagenet64_val_npz"
    train_dir.mkdir()
    val_dir.mkdir()
    batches = {
        i: _imagenet64_batch(train_dir / f"train_data_batch_{i}.npz", 2, i, i) for i in range(1, 11)
    }
    val = _imagenet64_batch(val_dir / "val_data.npz", 3, 0, 998)

    train = load_split("imagenet64", tmp_path, "pretrain")
    assert train.images.shape == (20, 64, 64, 3) and train.images.dtype == np.uint8
    assert train.classes is None
    # batches are ordered numerically (1, 2, ..., 10), labels are made 0-based
    assert train.labels is not None and train.labels[:4].tolist() == [0, 1, 1, 2]
    assert train.labels[-2:].tolist() == [9, 10]
    assert train.images[19, 63, 1, 2] == batches[10][1, 2 * 4096 + 63 * 64 + 1]
    assert train.images[2, 0, 40, 0] == batches[2][0, 40]

    test = load_split("imagenet64", tmp_path, "test")
    assert test.labels is not None and test.labels.tolist() == [997, 998, 999]
    assert test.images[1, 10, 20, 1] == val[1, 4096 + 10 * 64 + 20]


def test_imagenet64_missing_and_download(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no ImageNet64 found.*image-net.org"):
        load_split("imagenet64", tmp_path, "train")
    with pytest.raises(DatasetError, match="cannot be downloaded automatically.*Imagenet64x64"):
        load_split("imagenet64", tmp_path, "test", download=True)
    for i in range(1, 6):
        _imagenet64_batch(tmp_path / f"train_data_batch_{i}.npz", 1, i, 1)
    with pytest.raises(DatasetError, match=r"missing \[6, 7, 8, 9, 10\]"):
        load_split("imagenet64", tmp_path, "train")


def test_imagenet64_ignores_hidden_folders_and_refuses_renamed_batches(tmp_path: Path) -> None:
    for i in range(1, 11):
        _imagenet64_batch(tmp_path / f"train_data_batch_{i}.npz", 2, i, i)
    hidden = tmp_path / ".ipynb_checkpoints"
    hidden.mkdir()
    _imagenet64_batch(hidden / "train_data_batch_7.npz", 2, 7, 7)  # an editor's copy
    assert load_split("imagenet64", tmp_path, "train").images.shape[0] == 20
    stray = tmp_path / "train_data_batch_1 (1).npz"  # a second download of batch 1
    _imagenet64_batch(stray, 2, 1, 1)
    with pytest.raises(DatasetError) as info:
        load_split("imagenet64", tmp_path, "train")
    assert str(info.value) == (
        f"imagenet64: {stray} is not one of train_data_batch_1..10.npz (a renamed copy?); "
        f"move it out of {tmp_path}"
    )


def test_imagenet64_bad_shape(tmp_path: Path) -> None:
    np.savez(tmp_path / "val_data.npz", data=np.zeros((2, 100), np.uint8), labels=[1, 2])
    with pytest.raises(DatasetError, match=r"val_data.npz key 'data'.*\(2, 12288\) uint8"):
        load_split("imagenet64", tmp_path, "test")


# --------------------------------------------------------------------------------------------
# imagefolder / folder
# --------------------------------------------------------------------------------------------


def _bands(width: int = 60, height: int = 20) -> Image.Image:
    """Three vertical bands red | green | blue."""
    arr = np.zeros((height, width, 3), np.uint8)
    third = width // 3
    arr[:, :third, 0] = 255
    arr[:, third : 2 * third, 1] = 255
    arr[:, 2 * third :, 2] = 255
    return Image.fromarray(arr)


def _make_imagefolder(root: Path) -> None:
    for split in ("train", "val"):
        (root / split / "dog").mkdir(parents=True)
        (root / split / "cat" / "nested").mkdir(parents=True)
    _bands().save(root / "train" / "dog" / "a.png")
    _solid((10, 20, 30), (30, 40)).save(root / "train" / "cat" / "b.PNG")
    _solid((0, 0, 0)).convert("L").save(root / "train" / "cat" / "nested" / "c.bmp")
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    _solid((1, 2, 3), (16, 16)).save(root / "val" / "dog" / "d.png")


def test_imagefolder_resize_and_labels(tmp_path: Path) -> None:
    _make_imagefolder(tmp_path)
    train = load_split("imagefolder", tmp_path, "train", image_size=16)
    assert train.images.shape == (3, 16, 16, 3) and train.images.dtype == np.uint8
    assert train.classes == ["cat", "dog"]
    assert train.labels is not None and train.labels.tolist() == [0, 0, 1]
    # 60x20 -> 48x16 (shorter side 16) -> centre 16x16 crop = the green band
    assert train.images[2, 8, 8].tolist() == [0, 255, 0]
    # 30x40 solid colour survives the resize; grayscale becomes RGB
    assert train.images[0, 0, 0].tolist() == [10, 20, 30]
    assert train.images[1].max() == 0

    test = load_split("imagefolder", tmp_path, "test", image_size=16)  # "val" accepted
    assert test.classes == ["cat", "dog"]
    assert test.labels is not None and test.labels.tolist() == [1]
    assert test.images[0, 3, 3].tolist() == [1, 2, 3]


def test_imagefolder_errors(tmp_path: Path) -> None:
    _make_imagefolder(tmp_path)
    with pytest.raises(DatasetError, match="image_size is required"):
        load_split("imagefolder", tmp_path, "train")
    bad = tmp_path / "train" / "dog" / "broken.jpg"
    bad.write_bytes(b"definitely not a jpeg")
    with pytest.raises(DatasetError, match="cannot decode image .*broken.jpg"):
        load_split("imagefolder", tmp_path, "train", image_size=8)
    with pytest.raises(DatasetError, match="no folder for split 'train'"):
        load_split("imagefolder", tmp_path / "empty", "train", image_size=8)


def test_folder_is_unlabelled_and_recursive(tmp_path: Path) -> None:
    _make_imagefolder(tmp_path)
    for split in ("pretrain", "train", "test"):
        out = load_split("folder", tmp_path, split, image_size=12)
        assert out.images.shape == (4, 12, 12, 3)
        assert out.labels is None and out.classes is None


def test_folder_images_are_decoded_as_embedding_decodes_them(tmp_path: Path) -> None:
    # Stored 40x20: left half red, right half blue; EXIF orientation 6 shows it turned 90
    # degrees clockwise, so upright it is 20x40 with red on top and blue below.
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :20, 0] = 255
    stored[:, 20:, 2] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    rgba = np.zeros((16, 16, 4), np.uint8)  # fully transparent black
    rgba[:8, :, :] = (0, 255, 0, 255)  # opaque green top half
    Image.fromarray(rgba, "RGBA").save(tmp_path / "transparent.png")

    out = load_split("folder", tmp_path, "train", image_size=16)
    rotated, transparent = out.images  # sorted by file name
    assert rotated[0, 13].argmax() == 0 and rotated[0, 13, 0] > 200  # red on top
    assert rotated[15, 2].argmax() == 2 and rotated[15, 2, 2] > 200  # blue below
    assert transparent[0, 0].tolist() == [0, 255, 0]
    assert transparent[15, 0].tolist() == [255, 255, 255]  # alpha composited on white

    transform = ImageTransform(16, 16, "bicubic", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    for name, pixels in zip(("rotated.jpg", "transparent.png"), out.images, strict=True):
        embedded = transform(read_image(tmp_path / name, min_side=16)).numpy()
        np.testing.assert_array_equal(pixels.transpose(2, 0, 1), np.round(embedded * 255))


def test_decoding_many_images_uses_pool(tmp_path: Path) -> None:
    # more images than one chunk so the thread-pool path runs, ordering must be preserved
    for i in range(300):
        _solid((i % 256, 0, 0), (8, 8)).save(tmp_path / f"img_{i:03d}.png")
    out = load_split("folder", tmp_path, "train", image_size=8)
    assert out.images[:, 0, 0, 0].tolist() == [i % 256 for i in range(300)]


# --------------------------------------------------------------------------------------------
# npz
# --------------------------------------------------------------------------------------------


def test_npz_roundtrip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x_train = rng.integers(0, 256, size=(5, 8, 10, 3), dtype=np.uint8)
    x_test = rng.integers(0, 256, size=(2, 8, 10, 3), dtype=np.uint8)
    path = tmp_path / "data.npz"
    np.savez(
        path,
        x_train=x_train,
        y_train=np.array([0, 1, 2, 1, 0]),
        x_test=x_test,
        y_test=np.array([2, 2], np.int32),
        class_names=np.array(["a", "b", "c"]),
    )
    train = load_split("npz", path, "train")
    np.testing.assert_array_equal(train.images, x_train)
    assert train.labels is not None and train.labels.dtype == np.int64
    assert train.labels.tolist() == [0, 1, 2, 1, 0]
    assert train.classes == ["a", "b", "c"]
    test = load_split("npz", path, "test")
    np.testing.assert_array_equal(test.images, x_test)
    assert load_split("npz", path, "pretrain").labels is not None
    assert load_split("npz", path, "test", image_size=4).images.shape == (2, 4, 4, 3)


def test_npz_errors(tmp_path: Path) -> None:
    path = tmp_path / "data.npz"
    x = np.zeros((2, 8, 8, 3), np.uint8)
    np.savez(path, x_train=x, y_train=np.array([0, 1]))
    with pytest.raises(DatasetError, match="no key 'x_test'"):
        load_split("npz", path, "test")
    np.savez(path, x_train=np.zeros((2, 3, 8, 8), np.uint8), y_train=np.array([0, 1]))
    with pytest.raises(DatasetError, match=r"'x_train'.*\(N, H, W, 3\) uint8.*NCHW"):
        load_split("npz", path, "train")
    np.savez(path, x_train=x.astype(np.float32), y_train=np.array([0, 1]))
    with pytest.raises(DatasetError, match=r"'x_train'.*float32.*\(N, H, W, 3\) uint8"):
        load_split("npz", path, "train")
    np.savez(path, x_train=x, y_train=np.array([0, 1, 2]))
    with pytest.raises(DatasetError, match=r"y_train.*\(2,\)"):
        load_split("npz", path, "train")
    np.savez(path, x_train=x, y_train=np.array([0, 1]), class_names=np.array([{}], dtype=object))
    with pytest.raises(DatasetError, match="class_names"):
        load_split("npz", path, "train")
    with pytest.raises(DatasetError, match="does not exist"):
        load_split("npz", tmp_path / "missing.npz", "train")
    (tmp_path / "junk.npz").write_bytes(b"garbage")
    np.save(tmp_path / "array.npy", x)  # one array, not an archive of named arrays
    for bad in ("junk.npz", "array.npy"):
        with pytest.raises(DatasetError, match=f"{bad} is not an .npz file \\(a zip of named"):
            load_split("npz", tmp_path / bad, "train")
    with zipfile.ZipFile(tmp_path / "images.zip", "w") as archive:  # a zip, but of JPEGs
        archive.writestr("train/0.JPEG", b"\xff\xd8")
    with pytest.raises(DatasetError, match=r"images.zip is not an .npz .*holds no .npy arrays"):
        load_split("npz", tmp_path / "images.zip", "train")
    with zipfile.ZipFile(path, "w") as archive:  # a member named .npy that is not one
        archive.writestr("x_train.npy", b"not an array")
        archive.writestr("y_train.npy", _npy_bytes(np.array([0, 1])))
    with pytest.raises(DatasetError, match=r"data.npz key 'x_train' is not an array \(.npy\)"):
        load_split("npz", path, "train")
    np.savez(path, **{f"k{i}": np.zeros(1) for i in range(20)})
    with pytest.raises(DatasetError, match=r"keys: k0, k1, .*, k7, \.\.\. \(20 in all\)\)$"):
        load_split("npz", path, "train")


@pytest.mark.parametrize(
    ("name", "holds"),
    [
        ("cifar10", "cifar-10-batches-py (the unpacked release)"),
        ("tinyimagenet", "tiny-imagenet-200 (the unpacked release)"),
        ("imagenet64", "train_data_batch_1..10.npz and val_data.npz"),
    ],
)
def test_a_named_dataset_given_a_file_says_what_to_point_at(tmp_path, name, holds):
    archive = tmp_path / "release.tar.gz"  # e.g. the downloaded archive itself
    archive.write_bytes(b"\x1f\x8b")
    with pytest.raises(DatasetError) as info:
        load_split(name, archive, "train")
    assert str(info.value) == (
        f"{name}: {archive} is a file; point --data-root at the folder that holds {holds} "
        "or at an .npz file of arrays"
    )


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL warns first
def test_npz_with_encoded_images(tmp_path):
    import io as _io

    rng = np.random.default_rng(3)
    imgs = rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    blobs = []
    for img in imgs:
        buf = _io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")  # lossless, so pixels round-trip
        blobs.append(np.frombuffer(buf.getvalue(), dtype=np.uint8))
    off = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
    path = tmp_path / "enc.npz"
    np.savez(
        path,
        train_bytes=np.concatenate(blobs),
        train_off=off,
        y_train=np.arange(5),
        test_bytes=np.concatenate(blobs[:2]),
        test_off=off[:3],
        y_test=np.arange(2),
    )
    train = load_split("npz", path, "train")
    assert np.array_equal(train.images, imgs)
    assert list(train.labels) == [0, 1, 2, 3, 4]
    assert np.array_equal(load_split("npz", path, "test").images, imgs[:2])
    bad = tmp_path / "bad.npz"
    np.savez(
        bad, train_bytes=np.concatenate(blobs), train_off=off[::-1].copy(), y_train=np.arange(5)
    )
    with pytest.raises(DatasetError, match="offsets"):
        load_split("npz", bad, "train")
    np.savez(bad, train_bytes=np.concatenate(blobs), train_off=off.astype(np.float64),
             y_train=np.arange(5))
    with pytest.raises(DatasetError, match="offsets are float64; they must be integers"):
        load_split("npz", bad, "train")
    # PNG headers that claim huge images: refused from the header, before any decoding.
    for side, message in ((10_000, r"image 1 is 10000x10000, over the limit"),
                          (30_000, r"image 1 cannot be decoded \(Image size")):
        header = _png_header(side, side)
        np.savez(bad, train_bytes=np.concatenate([blobs[0], header]),
                 train_off=np.array([0, len(blobs[0]), len(blobs[0]) + len(header)]),
                 y_train=np.arange(2))
        with pytest.raises(DatasetError, match=message):
            load_split("npz", bad, "train")


def _png_header(width: int, height: int) -> np.ndarray:
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")
    return np.frombuffer(png, dtype=np.uint8)


def _npy_bytes(array: np.ndarray) -> bytes:
    import io as _io

    buf = _io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def test_named_dataset_from_an_npz_file(tmp_path):
    rng = np.random.default_rng(4)
    x = rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    path = tmp_path / "c10.npz"
    np.savez(path, x_train=x, y_train=np.arange(6) % 3, x_test=x[:2], y_test=np.arange(2))
    train = load_split("cifar10", path, "train")
    assert np.array_equal(train.images, x) and list(train.labels) == [0, 1, 2, 0, 1, 2]
    assert np.array_equal(load_split("cifar10", path, "test").images, x[:2])
    assert load_split("stl10", path, "pretrain").labels is None
    with pytest.raises(DatasetError, match="missing.npz"):
        load_split("cifar100", tmp_path / "missing.npz", "train")
