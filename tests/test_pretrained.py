"""carlzoo.pretrained and carlzoo.registry: model folders, load(spec), embed/assign, the Hub."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pickle
import re
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from tiny import SIZE, TINY

import carlzoo
from carlzoo import registry
from carlzoo.images import ImageTransform
from carlzoo.model import CARLModel, build_model
from carlzoo.pretrained import (
    Assignment,
    Preprocessing,
    PretrainedCARL,
    ZooConfig,
    ZooError,
    from_pretrained,
    load,
    read_config,
    save_pretrained,
)
from carlzoo.registry import ZooEntry, sha256_file

PRE = Preprocessing(input_size=SIZE, resize_size=SIZE, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(seed: int = 0) -> CARLModel:
    """A tiny CARL model in eval mode with non-trivial BatchNorm running statistics."""
    torch.manual_seed(seed)
    model = build_model(TINY)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, SIZE, SIZE) * 2 + 0.5)
    return model.eval()


def outputs(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return tuple(model.eval()(x))


@pytest.fixture(scope="module")
def model() -> CARLModel:
    return tiny_model()


@pytest.fixture(scope="module")
def folder(model: CARLModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = ZooConfig(
        TINY, PRE, name="tiny", provenance={"dataset": "cifar10"}, metrics={"knn_top1": 12.5}
    )
    return save_pretrained(model, tmp_path_factory.mktemp("zoo") / "tiny", cfg)


@pytest.fixture(scope="module")
def loaded(folder: Path) -> PretrainedCARL:
    return from_pretrained(folder)


def image_files(root: Path, n: int = 5, size: int = 24) -> list[Path]:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = root / f"img_{i}.png"
        Image.fromarray(rng.integers(0, 256, (size, size + 4 * i, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


# ---- save / load round trip ----------------------------------------------------------------


def test_round_trip_float32_gives_identical_outputs(
    model: CARLModel, folder: Path, loaded: PretrainedCARL
) -> None:
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    x = torch.randn(4, 3, SIZE, SIZE)
    for a, b in zip(outputs(model, x), outputs(loaded, x), strict=True):
        assert torch.equal(a, b)
    assert not loaded.training
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_config_json_contents_and_round_trip(folder: Path, loaded: PretrainedCARL) -> None:
    data = json.loads((folder / "config.json").read_text())
    assert data["format"] == "carlzoo/1"
    assert data["name"] == "tiny"
    assert data["architecture"] == TINY.to_dict()
    assert data["preprocessing"] == {
        "input_size": 16,
        "resize_size": 16,
        "interpolation": "bicubic",
        "mean": [0.5, 0.4, 0.3],
        "std": [0.2, 0.25, 0.3],
    }
    assert data["provenance"] == {"dataset": "cifar10", "weights_dtype": "float32"}
    assert data["metrics"] == {"knn_top1": 12.5}
    cfg = ZooConfig.from_dict(data)
    assert cfg == loaded.config
    assert ZooConfig.from_dict(cfg.to_dict()) == cfg
    assert read_config(folder) == cfg


def test_round_trip_float16_stores_half_weights_and_fp32_bn_stats(
    model: CARLModel, tmp_path: Path
) -> None:
    cfg = ZooConfig(TINY, PRE)
    out = save_pretrained(model, tmp_path / "half", cfg, dtype="float16")
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        dtypes = {k: f.get_tensor(k).dtype for k in f.keys()}
    assert dtypes["backbone.conv1.weight"] == torch.float16
    assert dtypes["prototypes.weight"] == torch.float16
    assert dtypes["backbone.bn1.running_mean"] == torch.float32
    assert dtypes["head.layers.1.running_var"] == torch.float32
    assert dtypes["backbone.bn1.num_batches_tracked"] == torch.int64
    half = from_pretrained(out)
    assert half.config.provenance["weights_dtype"] == "float16"
    # Known answer: the loaded float32 weights are exactly the float16-rounded originals.
    for key, value in model.state_dict().items():
        got = half.state_dict()[key]
        assert got.dtype == value.dtype, key
        expected = (
            value
            if key.endswith(("running_mean", "running_var")) or not value.is_floating_point()
            else value.half().float()
        )
        assert torch.equal(got, expected), key
    x = torch.randn(4, 3, SIZE, SIZE)
    for a, b in zip(outputs(model, x), outputs(half, x), strict=True):
        torch.testing.assert_close(a, b, atol=5e-2, rtol=5e-2)
    assert (out / "model.safetensors").stat().st_size < 0.6 * sum(
        t.numel() * t.element_size() for t in model.state_dict().values()
    )


def test_saved_weights_are_the_same_bytes_every_time(model: CARLModel, tmp_path: Path) -> None:
    # safetensors orders the header's metadata by a hash map, differently from call to
    # call; the pins of a zoo model need the same weights to give the same file.
    cfg = ZooConfig(TINY, PRE)
    blobs = {
        (save_pretrained(model, tmp_path / str(i), cfg) / "model.safetensors").read_bytes()
        for i in range(8)
    }
    assert len(blobs) == 1
    with safe_open(str(tmp_path / "0" / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"carlzoo_format": "carlzoo/1", "dtype": "float32", "format": "pt"}
    blob = blobs.pop()
    n = int.from_bytes(blob[:8], "little")
    assert blob[8 : 8 + n].index(b'"carlzoo_format"') < blob[8 : 8 + n].index(b'"dtype"')
    torch.testing.assert_close(from_pretrained(tmp_path / "0").state_dict(), model.state_dict())


def test_save_rejects_mismatched_config_and_removes_stale_onnx(
    model: CARLModel, tmp_path: Path
) -> None:
    other = dataclasses.replace(TINY, num_prototypes=12)
    with pytest.raises(ValueError, match="does not match"):
        save_pretrained(model, tmp_path / "x", ZooConfig(other, PRE))
    with pytest.raises(ValueError, match="dtype"):
        save_pretrained(model, tmp_path / "x", ZooConfig(TINY, PRE), dtype="bfloat16")
    (tmp_path / "y").mkdir()
    (tmp_path / "y" / "model.onnx").write_bytes(b"old")
    save_pretrained(model, tmp_path / "y", ZooConfig(TINY, PRE))
    assert sorted(p.name for p in (tmp_path / "y").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]


def test_save_is_atomic_when_writing_fails(
    model: CARLModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(self: Path, data: bytes) -> int:  # the weights' write stops half-way
        with open(self, "wb") as f:
            f.write(data[: len(data) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_bytes", boom)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(model, tmp_path / "m", ZooConfig(TINY, PRE))
    assert list((tmp_path / "m").iterdir()) == []


def test_loading_never_unpickles(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("unpickling during load")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    assert isinstance(load(str(folder)), PretrainedCARL)


def test_a_pickled_checkpoint_is_refused_as_corrupt(
    model: CARLModel, folder: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "pickled"
    bad.mkdir()
    (bad / "config.json").write_bytes((folder / "config.json").read_bytes())
    torch.save(model.state_dict(), bad / "model.safetensors")
    with pytest.raises(ZooError, match=f"corrupt weights file {bad / 'model.safetensors'}"):
        from_pretrained(bad)


# ---- folder errors ------------------------------------------------------------------------


def _copy_folder(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_folder_errors_name_the_path(folder: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ZooError, match=f"model folder {missing} does not exist"):
        from_pretrained(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ZooError, match=f"no config.json in {empty}: not a carlzoo model folder"):
        from_pretrained(empty)

    truncated = _copy_folder(folder, tmp_path / "truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ZooError, match="corrupt weights file .*truncated/model.safetensors"):
        from_pretrained(truncated)

    no_weights = _copy_folder(folder, tmp_path / "no_weights")
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(ZooError, match=f"no model.safetensors in {no_weights}"):
        from_pretrained(no_weights)

    bad_json = _copy_folder(folder, tmp_path / "bad_json")
    (bad_json / "config.json").write_text("{not json")
    with pytest.raises(ZooError, match="cannot read .*bad_json/config.json"):
        from_pretrained(bad_json)


def test_config_errors(folder: Path, tmp_path: Path) -> None:
    data = json.loads((folder / "config.json").read_text())
    cases = [
        ({**data, "format": "carlzoo/9"}, "config format 'carlzoo/9' is not supported"),
        ({**data, "extra": 1}, r"unknown config keys \['extra'\]"),
        (
            {**data, "architecture": {**data["architecture"], "depth": 3}},
            r"unknown architecture keys \['depth'\]",
        ),
        (
            {**data, "architecture": {**data["architecture"], "width": 8.0}},
            r"model\.width must be an integer, got 8\.0",
        ),
        (
            {**data, "architecture": {**data["architecture"], "num_prototypes": 10.5}},
            r"model\.num_prototypes must be an integer, got 10\.5",
        ),
        (
            {**data, "preprocessing": {**data["preprocessing"], "resize_size": 8}},
            "input_size <= resize_size",
        ),
        (
            {**data, "preprocessing": {**data["preprocessing"], "interpolation": "cubic"}},
            "interpolation='cubic'",
        ),
    ]
    for i, (d, message) in enumerate(cases):
        f = _copy_folder(folder, tmp_path / f"c{i}")
        (f / "config.json").write_text(json.dumps(d))
        with pytest.raises(ZooError, match=message) as info:
            from_pretrained(f)
        assert str(f / "config.json") in str(info.value)
        assert "\n" not in str(info.value)


def test_weights_that_do_not_match_the_architecture(folder: Path, tmp_path: Path) -> None:
    f = _copy_folder(folder, tmp_path / "wide")
    data = json.loads((f / "config.json").read_text())
    data["architecture"]["num_prototypes"] = 11
    (f / "config.json").write_text(json.dumps(data))
    with pytest.raises(ZooError, match=r"prototypes.weight has shape \(10, 16\).*needs \(11, 16\)"):
        from_pretrained(f)
    data["architecture"]["num_prototypes"] = 10
    data["architecture"]["backbone"] = "resnet34"
    (f / "config.json").write_text(json.dumps(data))
    with pytest.raises(ZooError, match="does not match the architecture in config.json: missing"):
        from_pretrained(f)


# ---- embed / assign -------------------------------------------------------------------------


def test_embed_shapes_layers_and_normalize(loaded: PretrainedCARL) -> None:
    x = torch.randn(5, 3, SIZE, SIZE)
    feats, proj, logits = outputs(loaded, x)
    e = loaded.embed(x)
    assert e.shape == (5, loaded.num_features) and e.dtype == torch.float32
    torch.testing.assert_close(e.norm(dim=1), torch.ones(5))
    torch.testing.assert_close(e, torch.nn.functional.normalize(feats, dim=1))
    raw = loaded.embed(x, normalize=False)
    torch.testing.assert_close(raw, feats)
    p = loaded.embed(x, layer="projection", normalize=False)
    assert p.shape == (5, TINY.proj_dim)
    torch.testing.assert_close(p, proj)
    assert loaded.embed(x[0]).shape == (1, loaded.num_features)  # one (3, S, S) image
    # batching does not change the answer
    torch.testing.assert_close(loaded.embed(x, batch_size=2), e)
    with pytest.raises(ValueError, match="layer='logits'"):
        loaded.embed(x, layer="logits")


def test_assign_topk_and_probabilities(loaded: PretrainedCARL) -> None:
    x = torch.randn(6, 3, SIZE, SIZE)
    a = loaded.assign(x, top_k=3)
    assert isinstance(a, Assignment)
    assert a.ids.shape == (6, 3) and a.ids.dtype == torch.long
    assert a.probs.shape == (6, 3)
    assert a.probabilities.shape == (6, TINY.num_prototypes)
    torch.testing.assert_close(a.probabilities.sum(1), torch.ones(6))
    assert torch.all(a.probs[:, :-1] >= a.probs[:, 1:])  # most probable first
    torch.testing.assert_close(a.probs, a.probabilities.gather(1, a.ids))
    _, _, logits = outputs(loaded, x)
    assert torch.equal(a.ids[:, 0], logits.argmax(1))
    one = loaded.assign(x)
    assert one.ids.shape == (6, 1) and torch.equal(one.ids[:, 0], a.ids[:, 0])
    for bad in (0, TINY.num_prototypes + 1):
        with pytest.raises(ValueError, match="top_k must be in 1..10"):
            loaded.assign(x, top_k=bad)


def test_embed_accepts_paths_pil_and_lists_consistently(
    loaded: PretrainedCARL, tmp_path: Path
) -> None:
    paths = image_files(tmp_path)
    images = [Image.open(p) for p in paths]
    tensors = torch.stack([loaded.transform(im) for im in images])
    ref = loaded.embed(tensors)
    torch.testing.assert_close(loaded.embed(paths), ref)
    torch.testing.assert_close(loaded.embed([str(p) for p in paths]), ref)
    torch.testing.assert_close(loaded.embed(images, batch_size=2), ref)
    torch.testing.assert_close(loaded.embed(paths[1]), ref[1:2])
    torch.testing.assert_close(loaded.embed(images[2]), ref[2:3])
    mixed = loaded.embed([paths[0], images[1], tensors[2]])
    torch.testing.assert_close(mixed, ref[:3])
    assert torch.equal(loaded.assign(paths, top_k=2).ids, loaded.assign(tensors, top_k=2).ids)


def test_embed_accepts_uint8_arrays_through_the_same_preprocessing(
    loaded: PretrainedCARL,
) -> None:
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, (4, 20, 26, 3), dtype=np.uint8)  # resized and cropped to 16
    ref = loaded.embed([Image.fromarray(a) for a in batch])
    torch.testing.assert_close(loaded.embed(batch), ref)
    torch.testing.assert_close(loaded.embed(list(batch), batch_size=3), ref)
    torch.testing.assert_close(loaded.embed(batch[1]), ref[1:2], rtol=1e-4, atol=1e-5)
    gray, rgba = batch[0, ..., 0], rng.integers(0, 256, (18, 18, 4), dtype=np.uint8)
    torch.testing.assert_close(
        loaded.embed([gray, rgba]), loaded.embed([Image.fromarray(gray), Image.fromarray(rgba)])
    )
    pil = [Image.fromarray(a) for a in batch]
    assert torch.equal(loaded.assign(batch, top_k=2).ids, loaded.assign(pil, top_k=2).ids)


def test_embed_input_errors(loaded: PretrainedCARL, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"expected 16x16 images .* got \(32, 32\)"):
        loaded.embed(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match=r"expected images as a \(N, 3, 16, 16\) tensor"):
        loaded.embed(torch.randn(2, 1, 16, 16))
    with pytest.raises(ValueError, match="expected a float tensor already normalised"):
        loaded.embed(torch.zeros(2, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="no images given"):
        loaded.embed([])
    with pytest.raises(TypeError, match="cannot embed a value of type int: give a"):
        loaded.embed([3])
    with pytest.raises(TypeError, match="cannot embed a value of type int: give a"):
        loaded.embed(3)
    with pytest.raises(ValueError, match=r"expected uint8 image arrays \(0..255\), got float64"):
        loaded.embed(np.random.default_rng(0).random((16, 16, 3)))
    with pytest.raises(ValueError, match=r"a batch \(N, H, W, 3\), channels last, got \(2, 3, 16"):
        loaded.embed(np.zeros((2, 3, 16, 16), np.uint8))
    with pytest.raises(ValueError, match=r"got \(16,\)"):
        loaded.embed(np.zeros(16, np.uint8))
    with pytest.raises(ValueError, match=r"cannot transform an empty image \(0x0\)"):
        loaded.embed(Image.new("RGB", (0, 0)))
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        loaded.embed([Image.new("RGB", (16, 16))], batch_size=0)
    from carlzoo.images import BadImage

    with pytest.raises(BadImage, match=f"cannot read image {tmp_path / 'gone.png'}: no such"):
        loaded.embed(tmp_path / "gone.png")


def test_an_empty_batch_says_no_images_given(loaded: PretrainedCARL) -> None:
    for empty in ([], torch.zeros(0, 3, SIZE, SIZE), np.zeros((0, SIZE, SIZE, 3), np.uint8)):
        with pytest.raises(ValueError, match="^no images given$"):
            loaded.embed(empty)
        with pytest.raises(ValueError, match="^no images given$"):
            loaded.assign(empty)


def test_transform_matches_the_documented_preprocessing() -> None:
    pre = Preprocessing(
        input_size=8,
        resize_size=12,
        interpolation="bilinear",
        mean=(0.1, 0.2, 0.3),
        std=(0.5, 0.25, 0.125),
    )
    tf = pre.make_transform()
    assert isinstance(tf, ImageTransform)
    # Known answer: a constant image is (c / 255 - mean) / std everywhere.
    out = tf(Image.new("RGB", (40, 30), (255, 51, 0)))
    assert out.shape == (3, 8, 8) and out.dtype == torch.float32
    expected = torch.tensor([(1 - 0.1) / 0.5, (0.2 - 0.2) / 0.25, (0 - 0.3) / 0.125])
    torch.testing.assert_close(out, expected.view(3, 1, 1).expand(3, 8, 8))
    # Geometry: shorter side to 12 (bilinear), long side rounded, centre crop 8.
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8))
    ref = img.resize((20, 12), Image.Resampling.BILINEAR).crop((6, 2, 14, 10))
    arr = np.asarray(ref, dtype=np.float32).transpose(2, 0, 1) / 255.0
    arr = (arr - np.array(pre.mean, np.float32)[:, None, None]) / np.array(pre.std, np.float32)[
        :, None, None
    ]
    torch.testing.assert_close(tf(img), torch.from_numpy(arr))
    # Grayscale input becomes three equal channels before normalisation.
    gray = tf(Image.new("L", (12, 12), 128))
    v = 128 / 255
    torch.testing.assert_close(
        gray[:, 0, 0], torch.tensor([(v - 0.1) / 0.5, (v - 0.2) / 0.25, (v - 0.3) / 0.125])
    )


def test_default_transform_is_the_training_normalisation() -> None:
    tf = Preprocessing().make_transform()
    x = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    expected = (torch.from_numpy(x).permute(2, 0, 1).float() / 255 - mean) / std
    torch.testing.assert_close(tf(Image.fromarray(x)), expected)


# ---- registry -------------------------------------------------------------------------------

NAMES = ["carl-cifar10", "carl-cifar100", "carl-imagenet64", "carl-stl10", "carl-tinyimagenet"]


def test_registry_names_and_entries() -> None:
    assert registry.list_models() == NAMES
    assert carlzoo.list_models() == NAMES
    for name in NAMES:
        e = registry.get_entry(name)
        assert e.repo_id == f"carlzoo/{name}"
        assert e.status == "unpublished" and e.revision is None
        # only the bundled carl-cifar10 has measured metrics (tests/test_bundled_model.py)
        assert (e.metrics == {}) == (name != "carl-cifar10")
    assert registry.get_entry("carl-stl10").input_size == 96
    rows = registry.registry_table()
    assert [r["name"] for r in rows] == NAMES
    assert rows[0]["status"] == "unpublished" and rows[0]["repo"] == "carlzoo/carl-cifar10"
    with pytest.raises(ZooError, match="did you mean 'carl-cifar10'"):
        registry.get_entry("carl-cifar1")
    with pytest.raises(ValueError, match="40-hex"):
        ZooEntry("x", "o/x", "d", 32, revision="main")
    with pytest.raises(ValueError, match="published entry needs"):
        ZooEntry("x", "o/x", "d", 32, status="published")


def test_unpublished_name_explains_how_to_train_locally(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(registry, "BUNDLED_DIR", tmp_path)
    with pytest.raises(ZooError) as info:
        carlzoo.load("carl-cifar100")
    msg = str(info.value)
    assert "'carl-cifar100' is not published yet" in msg
    assert "carlzoo train --config cifar100" in msg and "--out runs/carl-cifar100" in msg
    assert "carlzoo export runs/carl-cifar100 --out models/carl-cifar100" in msg
    assert 'carlzoo.load("models/carl-cifar100")' in msg
    assert "\n" not in msg


def _bundle(folder: Path, bundle_dir: Path, name: str) -> Path:
    bundle_dir.mkdir(exist_ok=True)
    return _copy_folder(folder, bundle_dir / name)


def _pin(monkeypatch: pytest.MonkeyPatch, name: str, files: dict[str, str], **kw: object) -> None:
    entry = dataclasses.replace(registry.REGISTRY[name], files=files, **kw)
    monkeypatch.setitem(registry.REGISTRY, name, entry)


def test_bundled_folder_is_loaded_after_hash_check(
    folder: Path, loaded: PretrainedCARL, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = _bundle(folder, tmp_path / "models", "carl-cifar10")
    monkeypatch.setattr(registry, "BUNDLED_DIR", tmp_path / "models")
    hashes = {f: sha256_file(bundle / f) for f in ("config.json", "model.safetensors")}
    _pin(monkeypatch, "carl-cifar10", hashes)
    assert registry.bundled_path("carl-cifar10") == bundle
    assert registry.registry_table()[0]["bundled"] == "yes"
    m = carlzoo.load("carl-cifar10")
    x = torch.randn(2, 3, SIZE, SIZE)
    assert torch.equal(m.embed(x), loaded.embed(x))

    # A tampered bundled file is refused, never loaded silently.
    data = bytearray((bundle / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (bundle / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ZooError, match="sha256 mismatch for model.safetensors from the bundled"):
        carlzoo.load("carl-cifar10")


def test_bundled_folder_without_pinned_hashes_is_refused(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _bundle(folder, tmp_path / "models", "carl-stl10")
    monkeypatch.setattr(registry, "BUNDLED_DIR", tmp_path / "models")
    with pytest.raises(ZooError, match="pins no sha256 for config.json"):
        carlzoo.load("carl-stl10")
    _pin(monkeypatch, "carl-stl10", {"config.json": "0" * 64, "model.safetensors": "1" * 64})
    with pytest.raises(ZooError, match="sha256 mismatch for config.json"):
        carlzoo.load("carl-stl10")
    # backend="onnx" without a bundled model.onnx checks the weights it would export from.
    with pytest.raises(ZooError, match="sha256 mismatch for config.json"):
        carlzoo.load("carl-stl10", backend="onnx")


def test_revision_of_a_model_not_on_the_hub_says_why_it_does_not_apply(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _bundle(folder, tmp_path / "models", "carl-cifar10")
    monkeypatch.setattr(registry, "BUNDLED_DIR", tmp_path / "models")
    with pytest.raises(ZooError) as info:
        carlzoo.load("carl-cifar10", revision="main")
    msg = str(info.value)
    assert msg.startswith("revision='main' does not apply to carl-cifar10")
    assert "the copy bundled in the package" in msg and "load it without revision=" in msg
    assert "pinned to revision None" not in msg and "\n" not in msg
    with pytest.raises(ZooError) as info:
        carlzoo.load("carl-stl10", revision="abc")  # neither bundled nor published
    assert str(info.value) == registry.unpublished_message("carl-stl10")


def _bundle_and_pin(folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``folder`` bundled as carl-cifar10 (no model.onnx), pinned, with a cache of its own."""
    bundle = _bundle(folder, tmp_path / "models", "carl-cifar10")
    monkeypatch.setattr(registry, "BUNDLED_DIR", tmp_path / "models")
    monkeypatch.setenv("CARLZOO_CACHE", str(tmp_path / "cache"))
    _pin(monkeypatch, "carl-cifar10",
         {f: sha256_file(bundle / f) for f in ("config.json", "model.safetensors")})
    return bundle


def test_bundled_model_without_onnx_gets_it_exported_once_into_the_cache(
    model: CARLModel, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import carlzoo.export.onnx as onnx_mod
    from carlzoo.pretrained import OnnxCARL, cache_root

    bundle = _bundle_and_pin(folder, tmp_path, monkeypatch)
    assert cache_root() == tmp_path / "cache"
    umask = os.umask(0o022)
    try:
        m = carlzoo.load("carl-cifar10", backend="onnx")
    finally:
        os.umask(umask)
    assert isinstance(m, OnnxCARL)
    [cached] = list((tmp_path / "cache" / "onnx").iterdir())  # no temp left
    assert cached.name.startswith("carl-cifar10-")
    assert m.onnx_path == cached / "model.onnx"
    assert sorted(p.name for p in cached.iterdir()) == [
        "config.json",
        "model.onnx",
        "model.onnx.sha256",
    ]
    recorded = (cached / "model.onnx.sha256").read_text().split()
    assert recorded == [sha256_file(cached / "model.onnx"), "model.onnx"]
    # Made for a shared CARLZOO_CACHE: as open as the umask allows, not mkdtemp's 0700.
    assert stat.S_IMODE(cached.stat().st_mode) == 0o755
    assert stat.S_IMODE((cached / "model.onnx").stat().st_mode) == 0o644
    assert sorted(p.name for p in bundle.iterdir()) == ["config.json", "model.safetensors"]
    x = torch.randn(3, 3, SIZE, SIZE)
    torch.testing.assert_close(m.embed(x), carlzoo.load("carl-cifar10").embed(x), atol=1e-4,
                               rtol=1e-4)

    # Later loads reuse the cached export; exporting again would fail here.
    def no_export(*args: object, **kwargs: object) -> None:
        raise AssertionError("exported twice")

    monkeypatch.setattr(onnx_mod, "add_onnx", no_export)
    assert carlzoo.load("carl-cifar10", backend="onnx").onnx_path == cached / "model.onnx"


def test_onnx_cache_of_a_bundled_model_uses_the_bundled_config(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = _bundle_and_pin(folder, tmp_path, monkeypatch)
    carlzoo.load("carl-cifar10", backend="onnx")  # exported for this config.json

    # A release with the same weights and a corrected config.json (other normalisation).
    cfg = json.loads((bundle / "config.json").read_text())
    cfg["preprocessing"].update(mean=[0.1, 0.1, 0.1], std=[0.9, 0.9, 0.9])
    (bundle / "config.json").write_text(json.dumps(cfg))
    _pin(monkeypatch, "carl-cifar10",
         {f: sha256_file(bundle / f) for f in ("config.json", "model.safetensors")})
    onnx_model = carlzoo.load("carl-cifar10", backend="onnx")
    torch_model = carlzoo.load("carl-cifar10")
    assert onnx_model.config == torch_model.config
    assert onnx_model.config.preprocessing.mean == (0.1, 0.1, 0.1)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (20, 20, 3), dtype=np.uint8) for _ in range(3)]
    torch.testing.assert_close(onnx_model.embed(images), torch_model.embed(images), atol=1e-4,
                               rtol=1e-4)
    assert len(list((tmp_path / "cache" / "onnx").iterdir())) == 2  # one folder per release


def test_a_damaged_onnx_export_in_the_cache_is_made_again(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from carlzoo.export.onnx import add_onnx

    _bundle_and_pin(folder, tmp_path, monkeypatch)
    path = carlzoo.load("carl-cifar10", backend="onnx").onnx_path
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    expected = carlzoo.load("carl-cifar10").embed(x)
    other = save_pretrained(tiny_model(seed=5), tmp_path / "other", ZooConfig(TINY, PRE))
    add_onnx(other, check=False)  # another model's export, as valid an ONNX file as ours
    good = path.read_bytes()

    def swapped() -> None:
        path.write_bytes((other / "model.onnx").read_bytes())

    def truncated() -> None:
        path.write_bytes(good[: len(good) // 2])

    def unrecorded() -> None:  # a folder left by an interrupted or older carlzoo
        (path.parent / "model.onnx.sha256").unlink()

    for damage in (swapped, truncated, unrecorded):
        damage()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="carlzoo"):
            m = carlzoo.load("carl-cifar10", backend="onnx")
        warned = [r.getMessage() for r in caplog.records if "exporting it again" in r.getMessage()]
        assert len(warned) == 1 and "\n" not in warned[0], (damage.__name__, caplog.text)
        assert f"the cached model.onnx in {path.parent} is damaged" in warned[0]
        assert m.onnx_path == path
        torch.testing.assert_close(m.embed(x), expected, atol=1e-4, rtol=1e-4)
        assert (path.parent / "model.onnx.sha256").read_text().split()[0] == sha256_file(path)
        assert [p.name for p in path.parent.parent.iterdir()] == [path.parent.name]


def test_an_onnx_export_another_process_finished_first_is_kept(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    import carlzoo.export.onnx as onnx_mod

    _bundle_and_pin(folder, tmp_path, monkeypatch)
    real_add_onnx = onnx_mod.add_onnx
    theirs: dict[str, object] = {}

    def racing(directory: Path, *, out: Path, **kwargs: object) -> Path:
        real_add_onnx(directory, out=out, **kwargs)  # ours, in our temporary folder
        # Meanwhile another process renames its complete export into the final folder.
        tmp = Path(out).parent
        final = tmp.parent / tmp.name[1:].rsplit(".", 1)[0]
        other = tmp.parent / "other-process"
        other.mkdir()
        for name in ("config.json", "model.onnx"):
            shutil.copyfile(tmp / name, other / name)
        digest = sha256_file(other / "model.onnx")
        (other / "model.onnx.sha256").write_text(f"{digest}  model.onnx\n")
        os.rename(other, final)
        theirs.update(path=final / "model.onnx", inode=(final / "model.onnx").stat().st_ino)
        return Path(out)

    monkeypatch.setattr(onnx_mod, "add_onnx", racing)
    m = carlzoo.load("carl-cifar10", backend="onnx")
    assert m.onnx_path == theirs["path"]
    assert m.onnx_path.stat().st_ino == theirs["inode"]  # theirs kept, not replaced by ours
    assert [p.name for p in m.onnx_path.parent.parent.iterdir()] == [m.onnx_path.parent.name]


def test_failed_onnx_export_of_a_bundled_model_is_one_line_and_leaves_nothing(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import carlzoo.export.onnx as onnx_mod

    bundle = _bundle(folder, tmp_path / "models", "carl-cifar10")
    monkeypatch.setattr(registry, "BUNDLED_DIR", tmp_path / "models")
    monkeypatch.setenv("CARLZOO_CACHE", str(tmp_path / "cache"))
    _pin(monkeypatch, "carl-cifar10",
         {f: sha256_file(bundle / f) for f in ("config.json", "model.safetensors")})

    def broken(directory: Path, *, out: Path, **kwargs: object) -> None:
        Path(out).write_bytes(b"half")  # a half-written export where it was asked to go
        raise ValueError("ONNX export differs from PyTorch:\nmax abs diff 3")

    monkeypatch.setattr(onnx_mod, "add_onnx", broken)
    with pytest.raises(ZooError) as info:
        carlzoo.load("carl-cifar10", backend="onnx")
    msg = str(info.value)
    assert "\n" not in msg and "model.onnx is not bundled" in msg
    assert "differs from PyTorch" in msg and "use backend='torch'" in msg
    assert list((tmp_path / "cache" / "onnx").iterdir()) == []
    assert sorted(p.name for p in bundle.iterdir()) == ["config.json", "model.safetensors"]


def test_load_spec_errors(folder: Path) -> None:
    with pytest.raises(ZooError, match="did you mean 'carl-cifar10'"):
        load("carl-cifar")
    with pytest.raises(ZooError, match="model folder runs/none does not exist"):
        load("runs/none")
    with pytest.raises(ZooError, match="write 'hf-hub:carlzoo/carl-x'"):
        load("carlzoo/carl-x")
    with pytest.raises(ZooError, match="backend='jax'"):
        load(str(folder), backend="jax")
    with pytest.raises(ZooError, match="model spec is empty: give a zoo name"):
        load("")  # not the current folder
    with pytest.raises(ZooError, match="revision='abc' applies to Hub models"):
        load(str(folder), revision="abc")
    with pytest.raises(ZooError, match="not a valid Hub spec"):
        load("hf-hub:just-a-name")
    with pytest.raises(ZooError, match="names revision 'a' but revision='b'"):
        load("hf-hub:org/name@a", revision="b")
    if not torch.cuda.is_available():
        with pytest.raises(ZooError, match="requested but CUDA is not available"):
            load(str(folder), device="cuda")
    assert isinstance(load(Path(folder)), PretrainedCARL)  # a Path works too


@pytest.mark.parametrize("gpus", [1, 2])
def test_a_gpu_index_the_machine_lacks_is_one_line(folder, monkeypatch, gpus):
    from carlzoo.devices import missing_cuda
    from carlzoo.training.dist import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    names = "cuda:0" if gpus == 1 else "cuda:0 to cuda:1"
    has = re.escape(f"this machine has {gpus} CUDA device{'s' if gpus > 1 else ''} ({names})")
    with pytest.raises(ZooError, match=rf"^device='cuda:5' requested but {has}; use one of"):
        load(str(folder), device="cuda:5")
    with pytest.raises(ValueError, match=rf"^device='cuda:{gpus}' asked for, but {has}; use"):
        resolve_device(f"cuda:{gpus}")
    assert missing_cuda(torch.device("cuda", gpus - 1)) is None
    assert missing_cuda(torch.device("cuda")) is None and missing_cuda(torch.device("cpu")) is None


# ---- the Hub (tests/hubserver.py through the real huggingface_hub client) -----------------


def _folder_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def _gets(hub: object, since: int, fname: str) -> int:
    return sum(
        r.method == "GET" and r.path.endswith(f"/{fname}") for r in hub.requests[since:]
    )


def test_load_hf_hub_spec_at_a_commit(local_hub, folder: Path, loaded: PretrainedCARL) -> None:
    sha = local_hub.add_repo_files("test/tiny-hub", _folder_files(folder))
    x = torch.randn(3, 3, SIZE, SIZE)
    for spec in (f"hf-hub:test/tiny-hub@{sha}", "hf-hub:test/tiny-hub"):
        m = load(spec)
        assert isinstance(m, PretrainedCARL)
        assert torch.equal(m.embed(x), loaded.embed(x))
    assert torch.equal(load("hf-hub:test/tiny-hub", revision=sha).embed(x), loaded.embed(x))
    with pytest.raises(ZooError, match="repository test/absent not found"):
        load("hf-hub:test/absent")
    with pytest.raises(ZooError, match="revision 'nope' not found in test/tiny-hub"):
        load("hf-hub:test/tiny-hub@nope")
    with pytest.raises(ZooError, match="has no model.onnx at revision"):
        load(f"hf-hub:test/tiny-hub@{sha}", backend="onnx")
    from click.testing import CliRunner

    from carlzoo.cli.zoo_cmd import info

    res = CliRunner().invoke(info, [f"hf-hub:test/tiny-hub@{sha}"])
    assert res.exit_code == 0, res.output
    assert "architecture.width: 4" in res.output and "metrics:" in res.output


def test_load_registry_name_from_the_hub_checks_hashes(
    local_hub, folder: Path, loaded: PretrainedCARL, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(registry, "BUNDLED_DIR", tmp_path / "no-bundle")
    files = _folder_files(folder)
    sha = local_hub.add_repo_files("carlzoo-test/carl-tinyimagenet", files)
    local_hub.add_repo_files("carlzoo-test/carl-tinyimagenet", {"config.json": b"{}"})  # newer
    hashes = {f: sha256_file(folder / f) for f in files}
    _pin(
        monkeypatch,
        "carl-tinyimagenet",
        hashes,
        revision=sha,
        status="published",
        repo_id="carlzoo-test/carl-tinyimagenet",
    )
    x = torch.randn(3, 3, SIZE, SIZE)
    m = carlzoo.load("carl-tinyimagenet")  # the pinned commit, not main
    assert torch.equal(m.embed(x), loaded.embed(x))
    with pytest.raises(ZooError, match="pinned to revision"):
        carlzoo.load("carl-tinyimagenet", revision="main")

    # A downloaded file whose sha256 differs from the registry is refused.
    _pin(
        monkeypatch,
        "carl-tinyimagenet",
        {**hashes, "model.safetensors": "ab" * 32},
        revision=sha,
        status="published",
        repo_id="carlzoo-test/carl-tinyimagenet",
    )
    n = len(local_hub.requests)
    with pytest.raises(
        ZooError,
        match="sha256 mismatch for model.safetensors from the Hub download carl-tinyimagenet",
    ) as info:
        carlzoo.load("carl-tinyimagenet")
    msg = str(info.value)
    assert "expected abab" in msg and "\n" not in msg
    # Downloaded again once (the cached copy might have been the corrupt one), then refused.
    assert "downloading it again gave the same: the Hub does not serve the file the registry " \
        "pins" in msg
    assert _gets(local_hub, n, "model.safetensors") == 1


def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """What HF_HUB_OFFLINE=1 sets when huggingface_hub is imported."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def test_corrupt_hub_cache_of_a_zoo_model_is_downloaded_again(
    local_hub, folder: Path, loaded: PretrainedCARL, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(registry, "BUNDLED_DIR", tmp_path / "no-bundle")
    files = _folder_files(folder)
    sha = local_hub.add_repo_files("carlzoo-test/carl-imagenet64", files)
    _pin(
        monkeypatch,
        "carl-imagenet64",
        {f: sha256_file(folder / f) for f in files},
        revision=sha,
        status="published",
        repo_id="carlzoo-test/carl-imagenet64",
    )
    cache = tmp_path / "cache"
    carlzoo.load("carl-imagenet64", cache_dir=cache)
    [link] = list(cache.rglob("snapshots/*/model.safetensors"))
    blob = link.resolve()
    assert blob != link and blob.parent.name == "blobs"
    good = blob.read_bytes()
    bad = good[:-1] + bytes([good[-1] ^ 1])
    x = torch.randn(2, 3, SIZE, SIZE)
    # Deleting the snapshot link (what the error used to advise) re-links the corrupt blob.
    for delete_link in (False, True):
        blob.write_bytes(bad)
        if delete_link:
            link.unlink()
        n = len(local_hub.requests)
        m = carlzoo.load("carl-imagenet64", cache_dir=cache)
        assert torch.equal(m.embed(x), loaded.embed(x))
        assert blob.read_bytes() == good  # repaired in place
        assert _gets(local_hub, n, "model.safetensors") == 1  # downloaded again, once

    # Offline nothing can be downloaded again: the error names the blob to delete.
    blob.write_bytes(bad)
    _offline(monkeypatch)
    n = len(local_hub.requests)
    with pytest.raises(ZooError, match="sha256 mismatch for model.safetensors") as info:
        carlzoo.load("carl-imagenet64", cache_dir=cache)
    msg = str(info.value)
    assert f"({blob})" in msg and f"delete the cached file {blob} and load once online" in msg
    assert "HF_HUB_OFFLINE=1" in msg and "\n" not in msg
    assert len(local_hub.requests) == n


def test_published_zoo_weights_that_do_not_decode_name_the_blob(
    local_hub, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(registry, "BUNDLED_DIR", tmp_path / "no-bundle")
    files = _folder_files(folder)
    files["model.safetensors"] = files["model.safetensors"][:100]  # broken on the Hub itself
    sha = local_hub.add_repo_files("carlzoo-test/carl-stl10", files)
    hashes = {f: hashlib.sha256(data).hexdigest() for f, data in files.items()}
    _pin(monkeypatch, "carl-stl10", hashes, revision=sha, status="published",
         repo_id="carlzoo-test/carl-stl10")
    cache = tmp_path / "cache"
    n = len(local_hub.requests)
    with pytest.raises(ZooError, match="corrupt weights file .*blobs") as info:
        carlzoo.load("carl-stl10", cache_dir=cache)
    assert "its sha256 is the expected one: the file on the Hub is broken" in str(info.value)
    assert _gets(local_hub, n, "model.safetensors") == 1  # not downloaded again: no use


def test_corrupt_lfs_blob_of_a_hub_spec_is_downloaded_again(
    local_hub, folder: Path, loaded: PretrainedCARL, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    sha = local_hub.add_repo_files("test/tiny-corrupt-lfs", _folder_files(folder))
    assert local_hub.is_lfs("test/tiny-corrupt-lfs", "model.safetensors")
    spec, cache = f"hf-hub:test/tiny-corrupt-lfs@{sha}", tmp_path / "cache"
    load(spec, cache_dir=cache)
    [link] = list(cache.rglob("snapshots/*/model.safetensors"))
    blob = link.resolve()
    good = blob.read_bytes()
    assert blob.name == sha256_file(blob)  # an LFS blob is named after its sha256
    x = torch.randn(2, 3, SIZE, SIZE)
    flipped = good[:-1] + bytes([good[-1] ^ 0x40])  # still decodes, to other weights
    for bad in (flipped, good[: len(good) // 2]):
        blob.write_bytes(bad)
        n = len(local_hub.requests)
        assert torch.equal(load(spec, cache_dir=cache).embed(x), loaded.embed(x))
        assert blob.read_bytes() == good
        assert _gets(local_hub, n, "model.safetensors") == 1

    blob.write_bytes(flipped)
    _offline(monkeypatch)
    with pytest.raises(ZooError, match=r"model.safetensors in the Hugging Face cache \(") as info:
        load(spec, cache_dir=cache)
    msg = str(info.value)
    assert f"({blob}) is corrupt: its sha256 is {sha256_file(blob)}, not {blob.name}" in msg
    assert f"delete the cached file {blob} and load once online" in msg and "\n" not in msg


def _no_lfs_repo(local_hub: object, repo_id: str, files: dict[str, bytes]) -> str:
    import hubserver

    with pytest.MonkeyPatch.context() as mp:  # plain git files: blobs named by git sha1, not sha256
        mp.setattr(hubserver, "_wants_lfs", lambda *args: False)
        return local_hub.add_repo_files(repo_id, files)


def _cached_git_file(
    local_hub, folder: Path, repo_id: str, name: str, tmp_path: Path
) -> tuple[str, str, Path, Path]:
    """``folder`` pushed to ``repo_id`` as plain git files and loaded once by its Hub spec:
    (commit sha, spec, cache folder, the cached blob of ``name``)."""
    sha = _no_lfs_repo(local_hub, repo_id, _folder_files(folder))
    assert not local_hub.is_lfs(repo_id, name)
    spec, cache = f"hf-hub:{repo_id}@{sha}", tmp_path / "cache"
    load(spec, cache_dir=cache)
    [link] = list(cache.rglob(f"snapshots/*/{name}"))
    return sha, spec, cache, link.resolve()


def test_undecodable_weights_of_a_hub_spec_are_downloaded_again(
    local_hub, folder: Path, loaded: PretrainedCARL, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    sha, spec, cache, blob = _cached_git_file(
        local_hub, folder, "test/tiny-no-lfs", "model.safetensors", tmp_path
    )
    good = blob.read_bytes()
    blob.write_bytes(good[: len(good) // 2])
    x = torch.randn(2, 3, SIZE, SIZE)
    n = len(local_hub.requests)
    assert torch.equal(load(spec, cache_dir=cache).embed(x), loaded.embed(x))
    assert blob.read_bytes() == good and _gets(local_hub, n, "model.safetensors") == 1

    blob.write_bytes(good[: len(good) // 2])
    _offline(monkeypatch)
    with pytest.raises(ZooError, match=f"corrupt weights file {re.escape(str(blob))} ") as info:
        load(spec, cache_dir=cache)
    assert f"delete the cached file {blob} and load once online" in str(info.value)


def test_corrupt_cached_config_of_a_hub_spec_is_downloaded_again(
    local_hub, folder: Path, loaded: PretrainedCARL, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    sha, spec, cache, blob = _cached_git_file(
        local_hub, folder, "test/tiny-bad-config", "config.json", tmp_path
    )
    good = blob.read_bytes()
    x = torch.randn(2, 3, SIZE, SIZE)
    blob.write_bytes(b'{"trunc')  # damaged: not JSON text
    n = len(local_hub.requests)
    assert torch.equal(load(spec, cache_dir=cache).embed(x), loaded.embed(x))
    assert blob.read_bytes() == good  # repaired in place
    assert _gets(local_hub, n, "config.json") == 1  # downloaded again, once

    # JSON that is not a config this carlzoo reads (another format) is as written, not
    # damaged: no download, the format is named
    blob.write_bytes(json.dumps({**json.loads(good), "format": "x"}).encode())
    n = len(local_hub.requests)
    with pytest.raises(ZooError) as info:
        load(spec, cache_dir=cache)
    assert "config format 'x' is not supported (expected 'carlzoo/1')" in str(info.value)
    assert "broken" not in str(info.value) and _gets(local_hub, n, "config.json") == 0
    blob.write_bytes(good)

    blob.write_bytes(b'{"trunc')
    _offline(monkeypatch)
    n = len(local_hub.requests)
    with pytest.raises(ZooError) as info:
        load(spec, cache_dir=cache)
    msg = str(info.value)
    assert msg.startswith(f"hf-hub:test/tiny-bad-config@{sha}: corrupt config file {blob} (")
    assert "Unterminated string" in msg and "\n" not in msg
    assert f"delete the cached file {blob} and load once online" in msg
    assert len(local_hub.requests) == n


def test_a_config_broken_on_the_hub_is_downloaded_once_more_then_refused(
    local_hub, folder: Path, tmp_path: Path
) -> None:
    files = {**_folder_files(folder), "config.json": b'{"trunc'}
    sha = _no_lfs_repo(local_hub, "test/tiny-broken-config", files)
    n = len(local_hub.requests)
    with pytest.raises(ZooError) as info:
        load(f"hf-hub:test/tiny-broken-config@{sha}", cache_dir=tmp_path / "cache")
    msg = str(info.value)
    assert "corrupt config file" in msg and "even after downloading it again" in msg
    assert "the file on the Hub is broken" in msg and "\n" not in msg
    assert _gets(local_hub, n, "config.json") == 2  # the download, then once more


def test_offline_load_from_the_cache(
    local_hub, folder: Path, loaded: PretrainedCARL, tmp_path: Path
) -> None:
    files = _folder_files(folder)
    sha = local_hub.add_repo_files("test/tiny-offline", files)
    cache = tmp_path / "hf-cache"
    load(f"hf-hub:test/tiny-offline@{sha}", cache_dir=cache)  # online: fills the cache
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    expected = loaded.embed(x)
    np.save(tmp_path / "x.npy", x.numpy())
    hashes = {f: sha256_file(folder / f) for f in files}
    script = textwrap.dedent(f"""
        import dataclasses, json, numpy, torch
        from carlzoo import registry
        from carlzoo.pretrained import ZooError, load
        x = torch.from_numpy(numpy.load({str(tmp_path / "x.npy")!r}))
        out = {{}}
        out["hub"] = load("hf-hub:test/tiny-offline@{sha}", cache_dir={str(cache)!r}).embed(
            x).tolist()
        registry.BUNDLED_DIR = registry.Path({str(tmp_path / "none")!r})
        registry.REGISTRY["carl-cifar10"] = dataclasses.replace(
            registry.REGISTRY["carl-cifar10"], repo_id="test/tiny-offline", revision="{sha}",
            files={hashes!r}, status="published")
        out["zoo"] = load("carl-cifar10", cache_dir={str(cache)!r}).embed(x).tolist()
        try:
            load("hf-hub:test/never-downloaded", cache_dir={str(cache)!r})
        except ZooError as e:
            out["error"] = str(e)
        print(json.dumps(out))
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}
    n_requests = len(local_hub.requests)
    res = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    torch.testing.assert_close(torch.tensor(out["hub"]), expected)
    torch.testing.assert_close(torch.tensor(out["zoo"]), expected)
    assert "is not in the Hugging Face cache and the Hub cannot be reached" in out["error"]
    assert len(local_hub.requests) == n_requests  # nothing reached the server
