"""carlzoo.images: finding image files and decoding every kind of image robustly."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from carlzoo.images import (
    BadImage,
    ImageFiles,
    ImageInputError,
    ImageTransform,
    collate_images,
    find_images,
    read_image,
    to_rgb,
)


def _touch_png(path: Path, color: tuple[int, int, int] = (10, 20, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), color).save(path, format="PNG")
    return path


# ---- find_images ---------------------------------------------------------------------------


def test_find_images_recursive_sorted_relative_ids(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    for rel in (
        "b.png",
        "a.JPG",
        "sub/c.jpeg",
        "sub/deeper/d.WebP",
        "e.bmp",
        "f.tif",
        "g.TIFF",
        "sub/z.png",
    ):
        _touch_png(root / rel)
    (root / "notes.txt").write_text("not an image")
    (root / "model.onnx").write_bytes(b"x")
    _touch_png(root / ".hidden.png")
    _touch_png(root / ".cache" / "h.png")
    found = find_images([root])
    assert [i for _, i in found] == [
        "a.JPG",
        "b.png",
        "e.bmp",
        "f.tif",
        "g.TIFF",
        "sub/c.jpeg",
        "sub/deeper/d.WebP",
        "sub/z.png",
    ]
    assert all(p == root / i for p, i in found)
    assert find_images(root) == found  # a single path works too


def test_find_images_files_keep_their_path_and_order(tmp_path: Path) -> None:
    a = _touch_png(tmp_path / "x" / "one.png")
    b = tmp_path / "odd.dat"
    b.write_bytes(b"anything")  # an explicit file is kept whatever its extension
    folder = tmp_path / "y"
    _touch_png(folder / "two.png")
    found = find_images([str(b), folder, str(a), str(a)])
    assert found == [(b, str(b)), (folder / "two.png", "two.png"), (a, str(a))]


def test_find_images_errors(tmp_path: Path) -> None:
    with pytest.raises(ImageInputError, match="input '.*missing' does not exist"):
        find_images([tmp_path / "missing"])
    _touch_png(tmp_path / "a" / "same.png")
    _touch_png(tmp_path / "b" / "same.png")
    with pytest.raises(ImageInputError, match="same id 'same.png'.*common parent folder"):
        find_images([tmp_path / "a", tmp_path / "b"])
    assert len(find_images([tmp_path])) == 2
    (tmp_path / "empty").mkdir()
    assert find_images([tmp_path / "empty"]) == []


# ---- read_image: every mode ----------------------------------------------------------------


def _save(img: Image.Image, path: Path, **kw: object) -> Path:
    img.save(path, **kw)
    return path


def test_rgb_and_grayscale(tmp_path: Path) -> None:
    rgb = read_image(_save(Image.new("RGB", (5, 3), (1, 2, 3)), tmp_path / "rgb.png"))
    assert rgb.mode == "RGB" and rgb.size == (5, 3) and rgb.getpixel((0, 0)) == (1, 2, 3)
    gray = read_image(_save(Image.new("L", (5, 3), 77), tmp_path / "gray.jpg", quality=100))
    assert gray.mode == "RGB" and gray.getpixel((2, 1)) == (77, 77, 77)
    bw = read_image(_save(Image.new("1", (4, 4), 1), tmp_path / "bw.bmp"))
    assert bw.getpixel((0, 0)) == (255, 255, 255)


def test_rgba_is_composited_on_white(tmp_path: Path) -> None:
    img = Image.new("RGBA", (2, 1))
    img.putpixel((0, 0), (200, 0, 0, 0))  # fully transparent -> white
    img.putpixel((1, 0), (0, 0, 200, 255))  # opaque -> itself
    out = read_image(_save(img, tmp_path / "rgba.png"))
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 0)) == (0, 0, 200)
    half = Image.new("LA", (1, 1), (0, 128))  # black at ~50% alpha -> mid gray
    v = read_image(_save(half, tmp_path / "la.png")).getpixel((0, 0))
    assert v[0] == v[1] == v[2] and 125 <= v[0] <= 128


def test_palette_with_and_without_transparency(tmp_path: Path) -> None:
    p = Image.new("P", (2, 1))
    p.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    p.putpixel((0, 0), 0)
    p.putpixel((1, 0), 1)
    out = read_image(_save(p, tmp_path / "pal.png"))
    assert out.getpixel((0, 0)) == (255, 0, 0) and out.getpixel((1, 0)) == (0, 255, 0)
    p.info["transparency"] = 0  # palette index 0 transparent -> white
    out = read_image(_save(p, tmp_path / "pal_t.png", transparency=0))
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 0)) == (0, 255, 0)


def test_16_bit_gray_is_scaled_to_8_bit(tmp_path: Path) -> None:
    a = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    path = _save(Image.fromarray(a), tmp_path / "deep.png")
    assert Image.open(path).mode.startswith("I")
    out = read_image(path)
    assert out.mode == "RGB"
    assert [out.getpixel((i, 0)) for i in range(3)] == [(0, 0, 0), (100, 100, 100), (255, 255, 255)]
    tif = read_image(_save(Image.fromarray(a), tmp_path / "deep.tif"))
    assert [tif.getpixel((i, 0))[0] for i in range(3)] == [0, 100, 255]


def test_float_gray_and_cmyk(tmp_path: Path) -> None:
    f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), mode="F")
    assert [to_rgb(f).getpixel((i, 0))[0] for i in range(3)] == [0, 128, 255]
    cmyk = Image.new("CMYK", (2, 2), (0, 0, 0, 0))  # no ink = white
    out = read_image(_save(cmyk, tmp_path / "cmyk.jpg", quality=100))
    assert out.mode == "RGB" and all(c >= 250 for c in out.getpixel((0, 0)))
    cyan = read_image(_save(Image.new("CMYK", (2, 2), (255, 0, 0, 0)), tmp_path / "c.tif"))
    assert cyan.getpixel((0, 0)) == (0, 255, 255)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    img = Image.new("RGB", (4, 2), (0, 0, 0))
    img.putpixel((0, 0), (255, 0, 0))  # top-left marker
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = _save(img, tmp_path / "rot.png", exif=exif)
    out = read_image(path)
    assert out.size == (2, 4)
    assert out.getpixel((1, 0)) == (255, 0, 0)  # top-left moved to top-right
    assert out.getpixel((0, 0)) == (0, 0, 0)


def test_decompression_bomb_guard(tmp_path: Path) -> None:
    path = _save(Image.new("RGB", (100, 100)), tmp_path / "big.png")
    with pytest.raises(BadImage, match=r"100x100 = 10000 pixels is over the limit of 9999") as e:
        read_image(path, max_pixels=9999)
    assert e.value.path == str(path)
    assert read_image(path, max_pixels=10000).size == (100, 100)


def _png_header(path: Path, width: int, height: int) -> Path:
    """A PNG whose IHDR claims ``width`` x ``height`` (its pixel data is not there)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunks = chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunks)
    return path


def test_max_pixels_above_pillows_own_limit_says_to_raise_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    huge = _png_header(tmp_path / "huge.png", 14000, 14000)  # 196M pixels: over Pillow's 179M
    pillow_limit = Image.MAX_IMAGE_PIXELS
    with pytest.raises(BadImage) as e:
        read_image(huge, max_pixels=300_000_000)
    msg = str(e.value)
    assert msg.startswith(f"cannot read image {huge}: ") and "\n" not in msg
    assert "max_pixels=300000000 is above Pillow's own limit" in msg
    assert "raise PIL.Image.MAX_IMAGE_PIXELS as well (or set it to None)" in msg
    assert Image.MAX_IMAGE_PIXELS == pillow_limit  # never changed behind the caller's back

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    path = _save(Image.new("RGB", (100, 100)), tmp_path / "small.png")  # 10000 > 2 x 1000
    with pytest.raises(BadImage, match=r"Pillow's own limit \(2 x PIL\.Image\.MAX_IMAGE_PIXELS"):
        read_image(path)  # the default MAX_PIXELS is above Pillow's lowered limit too
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    assert read_image(path).size == (100, 100)
    with pytest.raises(BadImage, match="over the limit of 9999"):
        read_image(path, max_pixels=9999)


def test_broken_files_raise_bad_image_naming_the_file(tmp_path: Path) -> None:
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    text = tmp_path / "text.jpg"
    text.write_text("this is not a jpeg")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    for path, reason in [
        (truncated, "truncated|Truncated|broken"),
        (text, "not an image file"),
        (empty, "not an image file"),
        (tmp_path / "gone.png", "no such file"),
        (tmp_path, "is a folder"),
    ]:
        with pytest.raises(BadImage, match=reason) as e:
            read_image(path)
        assert str(e.value).startswith(f"cannot read image {path}: ")
        assert "\n" not in str(e.value)


def test_jpeg_draft_keeps_the_shorter_side(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8))
    path = _save(img, tmp_path / "big.jpg", quality=90)
    small = read_image(path, min_side=32)
    assert min(small.size) >= 32 and small.size[0] < 640  # decoded at a reduced scale
    assert small.size[0] / small.size[1] == pytest.approx(640 / 480, rel=0.02)
    assert read_image(path).size == (640, 480)


# ---- batching with failures ------------------------------------------------------------------


def test_image_files_dataset_carries_failures(tmp_path: Path) -> None:
    good = [_touch_png(tmp_path / f"{i}.png", (i * 40, 0, 0)) for i in range(3)]
    bad = tmp_path / "bad.png"
    bad.write_text("nope")
    tf = ImageTransform(4, 4, "bicubic", (0, 0, 0), (1, 1, 1))
    ds = ImageFiles([good[0], bad, good[1], good[2]], tf)
    assert len(ds) == 4
    idx, batch, failures = collate_images([ds[i] for i in range(4)])
    assert idx == [0, 2, 3]
    assert batch.shape == (3, 3, 4, 4) and batch.dtype == torch.float32
    torch.testing.assert_close(batch[:, 0, 0, 0], torch.tensor([0, 40, 80]) / 255)
    assert failures == [(1, "not an image file (unknown format)")]
    assert collate_images([ds[1]]) == ([], None, [(1, failures[0][1])])


@pytest.mark.parametrize("size", [(0, 5), (5, 0), (0, 0)])
def test_resize_crop_refuses_an_empty_image(size: tuple[int, int]) -> None:
    from carlzoo.images import resize_crop

    w, h = size
    with pytest.raises(ValueError, match=rf"^cannot resize an empty image \({w}x{h}\)$"):
        resize_crop(Image.new("RGB", size), 36, 32)


def test_transform_resize_crop_geometry() -> None:
    tf = ImageTransform(16, 20, "bicubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert tf.resize_crop(Image.new("RGB", (40, 80))).size == (16, 16)
    assert tf.resize_crop(Image.new("RGB", (20, 20))).size == (16, 16)
    out = tf(Image.new("RGBA", (30, 30), (0, 0, 0, 0)))  # transparent -> white -> +1
    torch.testing.assert_close(out, torch.ones(3, 16, 16))
    with pytest.raises(ValueError, match="interpolation='cubic'"):
        ImageTransform(16, 16, "cubic", (0, 0, 0), (1, 1, 1))
    with pytest.raises(TypeError, match="expects a PIL image"):
        tf(np.zeros((16, 16, 3)))
