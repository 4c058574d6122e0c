"""``carlzoo embed`` / ``assign`` / ``list`` / ``info`` (cli/zoo_cmd.py) on real image files."""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from tiny import TINY

from carlzoo import outputs
from carlzoo.cli.zoo_cmd import assign, embed, info, list_cmd
from carlzoo.model import build_model
from carlzoo.pretrained import (
    Preprocessing,
    PretrainedCARL,
    ZooConfig,
    from_pretrained,
    save_pretrained,
)

GOOD = [
    "cmyk.jpg",
    "exif_rotated.jpg",
    "gray.png",
    "palette.png",
    "rgb.jpg",
    "rgba.png",
    "sub/deep16.png",
]
BROKEN = ["text.jpg", "truncated.png"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = build_model(TINY).eval()
    cfg = ZooConfig(TINY, Preprocessing(input_size=16, resize_size=16), name="tiny")
    return save_pretrained(model, tmp_path_factory.mktemp("cli") / "tiny", cfg)


@pytest.fixture(scope="module")
def model(model_dir: Path) -> PretrainedCARL:
    return from_pretrained(model_dir)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Good images of every awkward kind plus two broken files."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)

    def rgb(h: int = 20, w: int = 28) -> np.ndarray:
        return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)

    Image.fromarray(rgb()).save(root / "rgb.jpg", quality=95)
    Image.fromarray(rgb()[..., 0]).save(root / "gray.png")
    Image.fromarray(
        np.dstack([rgb(), rng.integers(0, 256, (20, 28, 1), dtype=np.uint8)]), "RGBA"
    ).save(root / "rgba.png")
    Image.fromarray(rgb()).convert("P", palette=Image.Palette.ADAPTIVE).save(root / "palette.png")
    (root / "sub").mkdir()
    Image.fromarray(rng.integers(0, 65536, (24, 24), dtype=np.uint16)).save(
        root / "sub" / "deep16.png"
    )
    Image.fromarray(rgb()).convert("CMYK").save(root / "cmyk.jpg", quality=95)
    exif = Image.Exif()
    exif[0x0112] = 8
    Image.fromarray(rgb(16, 30)).save(root / "exif_rotated.jpg", exif=exif, quality=95)
    buf = io.BytesIO()
    Image.fromarray(rgb(64, 64)).save(buf, "PNG")
    (root / "truncated.png").write_bytes(buf.getvalue()[:200])
    (root / "text.jpg").write_text("definitely not a JPEG\n")
    (root / "README.txt").write_text("ignored: not an image extension")
    return root


def run(cmd, args: list[str]):
    return CliRunner().invoke(cmd, [*args, "--no-progress"], catch_exceptions=False)


def run_catching(cmd, args: list[str]):
    return CliRunner().invoke(cmd, [*args, "--no-progress"])


def reference(model: PretrainedCARL, images: Path, ids: list[str]) -> np.ndarray:
    return model.embed([images / i for i in ids]).numpy()


# ---- embed --------------------------------------------------------------------------------


def test_embed_npz_rows_and_skipped(
    model_dir: Path, model: PretrainedCARL, images: Path, tmp_path: Path
) -> None:
    out = tmp_path / "emb.npz"
    res = run(
        embed,
        [str(images), "--model", str(model_dir), "--out", str(out), "-b", "3", "--workers", "0"],
    )
    assert res.exit_code == 0, res.output
    with np.load(out) as z:
        assert sorted(z.files) == ["embeddings", "paths", "skipped", "skipped_errors"]
        assert z["paths"].tolist() == GOOD
        assert z["skipped"].tolist() == BROKEN
        errors = z["skipped_errors"].tolist()
        emb = z["embeddings"]
    assert "not an image file" in errors[0]
    assert emb.dtype == np.float32 and emb.shape == (len(GOOD), model.num_features)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(emb, reference(model, images, GOOD), atol=1e-6)
    for name in BROKEN:
        assert f"skipped {images / name}" in res.output  # listed on stderr
    assert f"embedded {len(GOOD)} images" in res.output and "skipped 2 unreadable" in res.output


def test_embed_layer_and_normalize_options(
    model_dir: Path, model: PretrainedCARL, images: Path, tmp_path: Path
) -> None:
    out = tmp_path / "proj.npz"
    res = run(
        embed,
        [
            str(images / "rgb.jpg"),
            str(images / "gray.png"),
            "--model",
            str(model_dir),
            "--out",
            str(out),
            "--layer",
            "projection",
            "--no-normalize",
            "--workers",
            "0",
        ],
    )
    assert res.exit_code == 0, res.output
    with np.load(out) as z:
        assert z["paths"].tolist() == [str(images / "rgb.jpg"), str(images / "gray.png")]
        expected = model.embed(
            [images / "rgb.jpg", images / "gray.png"], layer="projection", normalize=False
        ).numpy()
        np.testing.assert_allclose(z["embeddings"], expected, atol=1e-6)
        assert z["skipped"].shape == (0,)


def test_strict_fails_without_output(model_dir: Path, images: Path, tmp_path: Path) -> None:
    out = tmp_path / "emb.npz"
    res = run_catching(
        embed,
        [str(images), "--model", str(model_dir), "--out", str(out), "--strict", "--workers", "0"],
    )
    assert res.exit_code == 1
    assert "cannot read image" in res.output and "--strict: nothing written" in res.output
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_all_broken_is_an_error(model_dir: Path, images: Path, tmp_path: Path) -> None:
    out = tmp_path / "emb.npz"
    res = run_catching(
        embed,
        [str(images / b) for b in BROKEN]
        + ["--model", str(model_dir), "--out", str(out), "--workers", "0"],
    )
    assert res.exit_code == 1
    assert "none of the 2 images could be read" in res.output
    assert not out.exists()


def test_no_images_and_bad_model_are_clear_errors(model_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    res = run_catching(
        embed,
        [str(tmp_path / "empty"), "--model", str(model_dir), "--out", str(tmp_path / "e.npz")],
    )
    assert res.exit_code == 1 and "no images found in" in res.output
    res = run_catching(
        embed,
        [str(tmp_path / "absent"), "--model", str(model_dir), "--out", str(tmp_path / "e.npz")],
    )
    assert res.exit_code == 1 and "does not exist" in res.output
    _ = Image.new("RGB", (8, 8)).save(tmp_path / "empty" / "x.png")
    res = run_catching(
        embed,
        [str(tmp_path / "empty"), "--model", "carl-cifar100", "--out", str(tmp_path / "e.npz")],
    )
    assert res.exit_code == 1 and "not published yet" in res.output


def test_bad_device_name_is_one_line(model_dir: Path, images: Path, tmp_path: Path) -> None:
    out = tmp_path / "e.npz"
    args = [str(images), "--model", str(model_dir), "--out", str(out), "--device"]
    res = run_catching(embed, [*args, "gpu"])
    assert res.exit_code == 1
    assert res.output.strip() == "Error: device='gpu' is not a device name; use cpu, cuda or cuda:N"
    assert list(tmp_path.iterdir()) == []


def test_npy_csv_formats_read_back(
    model_dir: Path, model: PretrainedCARL, images: Path, tmp_path: Path
) -> None:
    expected = reference(model, images, GOOD)
    npy = tmp_path / "emb.npy"
    assert run(embed, [str(images), "-m", str(model_dir), "-o", str(npy), "-j", "0"]).exit_code == 0
    np.testing.assert_allclose(np.load(npy, allow_pickle=False), expected, atol=1e-6)
    assert (tmp_path / "emb.npy.paths.txt").read_text().splitlines() == GOOD
    skipped = (tmp_path / "emb.npy.skipped.txt").read_text().splitlines()
    assert [line.split("\t")[0] for line in skipped] == BROKEN

    out_csv = tmp_path / "emb.csv"
    assert (
        run(embed, [str(images), "-m", str(model_dir), "-o", str(out_csv), "-j", "0"]).exit_code
        == 0
    )
    with open(out_csv, newline="") as f:
        rows = list(csv.reader(f))
    d = expected.shape[1]
    assert rows[0] == ["path", "error"] + [f"e{i}" for i in range(d)]
    body = rows[1:]
    assert [r[0] for r in body] == GOOD + BROKEN
    assert all(r[1] == "" for r in body[: len(GOOD)])
    assert all(r[1] and r[2:] == [""] * d for r in body[len(GOOD) :])
    got = np.array([[float(v) for v in r[2:]] for r in body[: len(GOOD)]], dtype=np.float32)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "emb.csv",
        "emb.npy",
        "emb.npy.paths.txt",
        "emb.npy.skipped.txt",
    ]  # no temp files


def test_parquet_reads_back_when_pyarrow_is_installed(
    model_dir: Path, model: PretrainedCARL, images: Path, tmp_path: Path
) -> None:
    import pyarrow.parquet as pq  # in the test extra, so this path always runs in CI

    out = tmp_path / "emb.parquet"
    assert run(embed, [str(images), "-m", str(model_dir), "-o", str(out), "-j", "0"]).exit_code == 0
    table = pq.read_table(out).to_pydict()
    assert table["path"] == GOOD + BROKEN
    assert table["error"][: len(GOOD)] == [None] * len(GOOD)
    assert table["embedding"][len(GOOD) :] == [None, None]
    np.testing.assert_allclose(
        np.array(table["embedding"][: len(GOOD)], dtype=np.float32),
        reference(model, images, GOOD),
        atol=1e-6,
    )
    out = tmp_path / "a.parquet"
    assert (
        run(
            assign, [str(images), "-m", str(model_dir), "-o", str(out), "-k", "2", "-j", "0"]
        ).exit_code
        == 0
    )
    table = pq.read_table(out).to_pydict()
    expected = model.assign([images / i for i in GOOD], top_k=2)
    assert table["path"] == GOOD + BROKEN
    assert table["ids"][: len(GOOD)] == expected.ids.tolist()
    assert table["probs"][len(GOOD) :] == [None, None]


def test_parquet_without_pyarrow_fails_before_any_work(
    images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow` raise ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    res = run_catching(
        embed, [str(images), "--model", "no/such/model", "--out", str(tmp_path / "e.parquet")]
    )
    assert res.exit_code == 2
    assert "pip install pyarrow" in res.output and "no/such/model" not in res.output
    assert list(tmp_path.iterdir()) == []


def test_unknown_extension_fails_before_any_work(images: Path, tmp_path: Path) -> None:
    res = run_catching(
        embed, [str(images), "--model", "no/such/model", "--out", str(tmp_path / "e.json")]
    )
    assert res.exit_code == 2
    assert "unknown extension '.json'" in res.output and ".npz, .npy, .csv, .parquet" in res.output
    assert "no/such/model" not in res.output
    res = run_catching(embed, [str(images), "--model", "m", "--out", str(tmp_path / "x" / "e.npz")])
    assert res.exit_code == 2 and "does not exist" in res.output


def test_output_is_atomic_when_the_model_fails_midway(
    model_dir: Path, images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "emb.npz"
    out.write_bytes(b"previous result")
    calls = {"n": 0}
    real_run = PretrainedCARL._run

    def failing(self: PretrainedCARL, x: torch.Tensor):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("device lost")
        return real_run(self, x)

    monkeypatch.setattr(PretrainedCARL, "_run", failing)
    res = run_catching(
        embed, [str(images), "-m", str(model_dir), "-o", str(out), "-b", "2", "-j", "0"]
    )
    assert res.exit_code != 0 and isinstance(res.exception, RuntimeError)
    assert calls["n"] == 2
    assert out.read_bytes() == b"previous result"  # untouched, no partial file
    assert [p.name for p in tmp_path.iterdir()] == ["emb.npz"]


def _unwritable_folder(kind: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A folder where no file can be created, for root and for normal users alike."""
    if kind == "sysfs":  # /sys refuses new files even to root (EACCES, or EROFS when read-only)
        folder = Path("/sys")
        if not folder.is_dir():  # pragma: no cover - not Linux
            pytest.skip("needs Linux /sys")
        try:
            fd, name = tempfile.mkstemp(dir=folder)
        except OSError:
            return folder
        os.close(fd)  # pragma: no cover - a system that lets us write there
        os.unlink(name)  # pragma: no cover
        pytest.skip("/sys is writable here")  # pragma: no cover

    def read_only(*args: object, **kwargs: object) -> tuple[int, str]:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(outputs.tempfile, "mkstemp", read_only)
    return tmp_path


@pytest.mark.parametrize("kind", ["sysfs", "read-only"])
@pytest.mark.parametrize("cmd", [embed, assign])
def test_unwritable_output_folder_fails_before_any_work(
    cmd, kind: str, images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _unwritable_folder(kind, monkeypatch, tmp_path)
    out = folder / "emb.npz"
    res = run_catching(cmd, [str(images), "--model", "no/such/model", "--out", str(out)])
    assert res.exit_code == 2, res.output
    last = res.output.strip().splitlines()[-1]
    assert last.startswith(f"Error: Invalid value for '--out': output {str(out)!r}: cannot create")
    assert last.endswith("; choose a writable folder")
    assert "no/such/model" not in res.output  # the model was never looked at
    assert res.exception is None or isinstance(res.exception, SystemExit)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "cmd, name, failing_fsync",
    [
        (embed, "emb.npz", 1),
        (embed, "emb.npy", 3),  # after both companions were written to their temp files
        (assign, "a.npy", 2),
        (assign, "a.csv", 1),
    ],
)
def test_a_failed_write_after_the_work_is_one_line_and_leaves_the_old_output(
    cmd,
    name: str,
    failing_fsync: int,
    model_dir: Path,
    images: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / name
    previous = {out.name: b"previous result"}
    if out.suffix == ".npy":
        previous.update({f"{name}.paths.txt": b"old\n", f"{name}.skipped.txt": b""})
    for file, data in previous.items():
        (tmp_path / file).write_bytes(data)
    calls = {"n": 0}
    real_fsync = os.fsync

    def disk_full(fd: int) -> None:  # the disk fills up while the output is written
        calls["n"] += 1
        if calls["n"] == failing_fsync:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", disk_full)
    res = run_catching(cmd, [str(images), "-m", str(model_dir), "-o", str(out), "-j", "0"])
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.output
    assert calls["n"] == failing_fsync  # all the work was done: it failed while writing
    assert res.output.strip().splitlines()[-1] == (
        f"Error: cannot write {out}: {os.strerror(errno.ENOSPC)}; choose a writable folder"
    )
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == previous  # no temp files


def _rewrite_npy_interrupted(
    folder: Path, interrupt_at: int | None, monkeypatch: pytest.MonkeyPatch
) -> tuple[bool, int]:
    """Write a .npy output, then rewrite it with Ctrl-C arriving at file-system step
    ``interrupt_at`` (an unlink or a rename; None: never). Returns (interrupted, steps)."""
    folder.mkdir()
    outputs.write_embeddings(
        folder / "emb.npy",
        ["a.png", "b.png", "c.png"],
        np.eye(3, 4, dtype=np.float32),
        [("bad.png", "old error")],
    )
    steps = {"n": 0}

    def interrupting(real):
        def step(*args: object, **kwargs: object) -> None:
            steps["n"] += 1
            if steps["n"] - 1 == interrupt_at:
                raise KeyboardInterrupt
            real(*args, **kwargs)

        return step

    with monkeypatch.context() as m:
        m.setattr(os, "replace", interrupting(os.replace))
        m.setattr(os, "unlink", interrupting(os.unlink))
        try:
            outputs.write_embeddings(
                folder / "emb.npy", ["z.png", "y.png"], np.full((2, 4), 7, np.float32)
            )
        except KeyboardInterrupt:
            return True, steps["n"]
    return False, steps["n"]


def test_an_interrupted_npy_rewrite_never_mixes_two_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C at every unlink or rename of a .npy rewrite: the .npy and FILE.paths.txt next
    to it always come from the same run (or the .npy is missing), and no temp file is left."""
    interrupted, n_steps = _rewrite_npy_interrupted(tmp_path / "clean", None, monkeypatch)
    assert not interrupted and n_steps >= 3
    for k in range(n_steps):
        folder = tmp_path / f"step{k}"
        assert _rewrite_npy_interrupted(folder, k, monkeypatch)[0]
        names = sorted(p.name for p in folder.iterdir())
        assert not [n for n in names if n.startswith(".")], (k, names)  # no temp file
        out = folder / "emb.npy"
        if not out.exists():  # an incomplete set: no result, rather than a wrong one
            continue
        rows = np.load(out)
        paths_txt, skipped_txt = outputs.companion_paths(out)
        pairs = (
            paths_txt.read_text().splitlines(),
            skipped_txt.read_text().splitlines(),
            rows.tolist(),
        )
        old = (["a.png", "b.png", "c.png"], ["bad.png\told error"], np.eye(3, 4).tolist())
        new = (["z.png", "y.png"], [], np.full((2, 4), 7.0).tolist())
        assert pairs in (old, new), (k, pairs)
    clean = tmp_path / "clean"
    assert sorted(p.name for p in clean.iterdir()) == [
        "emb.npy",
        "emb.npy.paths.txt",
        "emb.npy.skipped.txt",
    ]
    assert (clean / "emb.npy.paths.txt").read_text().splitlines() == ["z.png", "y.png"]
    assert (clean / "emb.npy.skipped.txt").read_text() == ""
    np.testing.assert_array_equal(np.load(clean / "emb.npy"), np.full((2, 4), 7, np.float32))


def test_parallel_decoding_gives_the_same_result(
    model_dir: Path, images: Path, tmp_path: Path
) -> None:
    outs = []
    for workers in ("0", "2"):
        out = tmp_path / f"w{workers}.npz"
        res = run(
            embed,
            [str(images), "-m", str(model_dir), "-o", str(out), "-b", "2", "--workers", workers],
        )
        assert res.exit_code == 0, res.output
        outs.append(dict(np.load(out)))
    a, b = outs
    assert a["paths"].tolist() == b["paths"].tolist() == GOOD
    assert a["skipped"].tolist() == b["skipped"].tolist() == BROKEN
    np.testing.assert_array_equal(a["embeddings"], b["embeddings"])


# ---- assign -------------------------------------------------------------------------------


def test_assign_top_k_formats(
    model_dir: Path, model: PretrainedCARL, images: Path, tmp_path: Path
) -> None:
    expected = model.assign([images / i for i in GOOD], top_k=3)
    out = tmp_path / "a.npz"
    assert (
        run(
            assign, [str(images), "-m", str(model_dir), "-o", str(out), "-k", "3", "-j", "0"]
        ).exit_code
        == 0
    )
    with np.load(out) as z:
        assert z["paths"].tolist() == GOOD and z["skipped"].tolist() == BROKEN
        assert z["ids"].dtype == np.int64 and z["ids"].shape == (len(GOOD), 3)
        np.testing.assert_array_equal(z["ids"], expected.ids.numpy())
        np.testing.assert_allclose(z["probs"], expected.probs.numpy(), atol=1e-6)
        assert np.all(np.diff(z["probs"], axis=1) <= 0)

    out_csv = tmp_path / "a.csv"
    assert (
        run(
            assign, [str(images), "-m", str(model_dir), "-o", str(out_csv), "-k", "2", "-j", "0"]
        ).exit_code
        == 0
    )
    with open(out_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["path", "error", "top1_id", "top1_prob", "top2_id", "top2_prob"]
    assert [r["path"] for r in rows] == GOOD + BROKEN
    assert [int(r["top1_id"]) for r in rows[: len(GOOD)]] == expected.ids[:, 0].tolist()
    assert rows[-1]["top1_id"] == "" and rows[-1]["error"]

    npy = tmp_path / "a.npy"
    assert (
        run(
            assign, [str(images), "-m", str(model_dir), "-o", str(npy), "-k", "2", "-j", "0"]
        ).exit_code
        == 0
    )
    arr = np.load(npy, allow_pickle=False)
    assert arr.dtype.names == ("ids", "probs") and arr.shape == (len(GOOD),)
    np.testing.assert_array_equal(arr["ids"], expected.ids[:, :2].numpy())

    res = run_catching(
        assign, [str(images), "-m", str(model_dir), "-o", str(out), "-k", "11", "-j", "0"]
    )
    assert res.exit_code == 2 and "more than the model's 10 prototypes" in res.output


# ---- list / info -----------------------------------------------------------------------------


def test_list_and_info(model_dir: Path) -> None:
    res = run_catching(list_cmd, [])
    assert res.exit_code == 2  # --no-progress is not an option of list
    res = CliRunner().invoke(list_cmd, [])
    assert res.exit_code == 0
    lines = res.output.splitlines()
    assert lines[0].split()[:5] == ["name", "dataset", "input", "backbone", "status"]
    assert any(
        line.startswith("carl-stl10 ") and "96px" in line and "unpublished" in line
        for line in lines
    )
    # bundled in the package, with its measured kNN and linear top-1
    row = ["carl-cifar10", "cifar10", "32px", "resnet18", "unpublished", "yes", "78.2", "83.2"]
    assert any(line.split()[:8] == row for line in lines)
    res = CliRunner().invoke(info, ["carl-cifar100"])
    assert res.exit_code == 0
    assert "repo_id: carlzoo/carl-cifar100" in res.output and "not published yet" in res.output
    res = CliRunner().invoke(info, ["carl-cifar10"])
    assert res.exit_code == 0 and "not published yet" not in res.output
    assert "bundled: " in res.output and "provenance.epochs: 200" in res.output
    res = CliRunner().invoke(info, [str(model_dir)])
    assert res.exit_code == 0
    assert "architecture.num_prototypes: 10" in res.output
    assert "preprocessing.input_size: 16" in res.output
    assert "model.safetensors" in res.output
    res = CliRunner().invoke(info, [str(model_dir / "missing")])
    assert res.exit_code == 1 and "does not exist" in res.output


def test_info_on_a_near_miss_of_a_zoo_name_suggests_it_as_load_does() -> None:
    import carlzoo
    from carlzoo.registry import ZooError

    res = CliRunner().invoke(info, ["carl-cifar"])
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit)
    with pytest.raises(ZooError) as raised:
        carlzoo.load("carl-cifar")
    assert "did you mean 'carl-cifar10'?" in str(raised.value)
    assert res.output.strip() == f"Error: {raised.value}"


def test_info_on_a_hub_repo_labels_the_files_as_cached(local_hub, model_dir: Path) -> None:
    files = {p.name: p.read_bytes() for p in model_dir.iterdir() if p.is_file()}
    local_hub.add_repo_files("test/info-cached-files", files)
    res = CliRunner().invoke(info, ["hf-hub:test/info-cached-files"])
    assert res.exit_code == 0, res.output
    assert "cached files: ['config.json']" in res.output.splitlines()
    assert not any(line.startswith("files:") for line in res.output.splitlines())
    res = CliRunner().invoke(info, ["hf-hub:test/info-cached-files", "--json"])
    report = json.loads(res.output)
    assert report["cached_files"] == ["config.json"] and "files" not in report


def test_demo_runs_on_the_example_images(model_dir: Path, capsys: pytest.CaptureFixture) -> None:
    import importlib.util

    root = Path(__file__).resolve().parents[1] / "examples"
    spec = importlib.util.spec_from_file_location("carlzoo_demo", root / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    assert demo.main(["--model", str(model_dir)]) == 0
    out = capsys.readouterr().out
    names = sorted(p.name for p in (root / "images").iterdir() if p.suffix in (".png", ".jpg"))
    assert 12 <= len(names) <= 24
    assert f"{len(names)} images embedded" in out
    assert "Nearest neighbour by cosine similarity:" in out
    assert "of 10 prototypes used" in out
    assert all(n in out for n in names)
    assert sum(p.stat().st_size for p in (root / "images").iterdir()) < 300_000


def test_onnx_on_a_missing_gpu_warns_in_one_line_and_pins_nothing(tmp_path: Path) -> None:
    from carlzoo.cli.main import main

    example = Path(__file__).resolve().parents[1] / "examples" / "models" / "carl-cifar10-cpu-w8"
    image = example.parents[1] / "images" / "cat_01.png"
    args = ["embed", str(image), "--model", str(example), "--backend", "onnx", "--device", "cuda"]
    res = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "e.npz"), "--no-progress"])
    assert res.exit_code == 0, res.output
    lines = res.stderr.splitlines()
    assert lines[0] == (
        "warning: device='cuda': onnxruntime has no CUDAExecutionProvider here (pip uninstall "
        "onnxruntime, then pip install onnxruntime-gpu); running on the CPU"
    )
    assert len(lines) == 2 and lines[1].startswith("embedded 1 images in ")  # no pin_memory line


def test_report_gives_slow_rates_their_digits(capsys: pytest.CaptureFixture[str]) -> None:
    from carlzoo.cli.zoo_cmd import _report

    _report("embedded", ["a.png"], [], [Path("e.npz")], 2.6)
    _report("embedded", ["a.png"] * 500, [], [Path("e.npz")], 2.0)
    assert capsys.readouterr().err.splitlines() == [
        "embedded 1 images in 2.6s (0.38 img/s) -> e.npz",
        "embedded 500 images in 2.0s (250 img/s) -> e.npz",
    ]
