"""Finding and decoding images robustly, and turning them into model inputs.

``find_images`` expands files and folders into a sorted list of ``(path, id)``;
``read_image`` decodes one file into an 8-bit RGB PIL image whatever its mode (grayscale,
RGBA, palette, 16-bit, CMYK), honouring EXIF orientation, and raises :class:`BadImage`
(one line, naming the file) for anything it cannot decode; :class:`ImageTransform` is the
deterministic evaluation preprocessing (resize the shorter side, centre crop, normalise).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_PIXELS",
    "INTERPOLATIONS",
    "BadImage",
    "ImageInputError",
    "find_images",
    "read_image",
    "to_rgb",
    "resize_crop_box",
    "resize_crop",
    "ImageTransform",
    "ImageFiles",
    "collate_images",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")

MAX_PIXELS = 89_478_485
"""Decompression-bomb guard: images with more pixels than this are refused (PIL's default
``Image.MAX_IMAGE_PIXELS``, about 9459 x 9459). Override per call with ``max_pixels``.

Pillow's own guard still applies first: ``Image.open`` refuses images over
2 x ``PIL.Image.MAX_IMAGE_PIXELS`` (about 179M pixels by default), so a ``max_pixels`` above
that needs ``PIL.Image.MAX_IMAGE_PIXELS`` raised as well (or set to None). carlzoo leaves
it alone: it is process-wide state, shared with the rest of the program."""

INTERPOLATIONS: dict[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


class BadImage(ValueError):
    """One file could not be decoded as an image. ``path`` names it; the message is one line."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = " ".join(str(reason).split())  # one line
        super().__init__(f"cannot read image {self.path}: {self.reason}")


class ImageInputError(ValueError):
    """An input path given to :func:`find_images` is missing or yields clashing ids."""


def _is_hidden(parts: Iterable[str]) -> bool:
    return any(p.startswith(".") for p in parts)


def find_images(inputs: Sequence[str | Path] | str | Path) -> list[tuple[Path, str]]:
    """Expand files and folders into ``[(path, id), ...]``.

    A folder is searched recursively for files with an image extension
    (``IMAGE_EXTENSIONS``, any case), hidden files and folders skipped, sorted by id; the id
    is the path relative to that folder, with ``/`` separators. A file given directly is
    kept whatever its extension, with the path as given as its id. Inputs keep their order;
    a file reached twice is listed once. Two different files with the same id raise
    :class:`ImageInputError` (pass their common parent folder instead).
    """
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    out: list[tuple[Path, str]] = []
    seen_ids: dict[str, Path] = {}
    seen_files: set[Path] = set()
    for item in inputs:
        root = Path(item)
        if root.is_dir():
            found = [
                (p, p.relative_to(root).as_posix())
                for p in root.rglob("*")
                if p.suffix.lower() in IMAGE_EXTENSIONS
                and not _is_hidden(p.relative_to(root).parts)
                and p.is_file()
            ]
            found.sort(key=lambda t: t[1])
        elif root.is_file():
            found = [(root, str(item))]
        else:
            raise ImageInputError(
                f"input {str(item)!r} does not exist: give image files or folders of images"
            )
        for path, ident in found:
            resolved = path.resolve()
            if resolved in seen_files:
                continue
            if ident in seen_ids:
                raise ImageInputError(
                    f"two inputs give the same id {ident!r} ({seen_ids[ident]} and {path}): "
                    "pass their common parent folder instead"
                )
            seen_files.add(resolved)
            seen_ids[ident] = path
            out.append((path, ident))
    return out


def _white_composite(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL image to 8-bit RGB.

    Alpha (RGBA, LA, PA, palette with transparency) is composited on white; 16-bit and 32-bit
    integer gray (``I;16*``, ``I``) are scaled from 0..65535 to 0..255; float gray (``F``) is
    read as 0..1 when its maximum is <= 1, else as 0..255; CMYK, YCbCr, LAB, HSV and 1-bit
    go through PIL's conversion.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
        return _white_composite(img)
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(img).astype(np.float64)
        a = np.clip(a, 0, 65535) / 257.0
        return Image.fromarray(np.round(a).astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        a = np.asarray(img).astype(np.float64)
        a = np.nan_to_num(a, nan=0.0)
        if a.size and a.max() <= 1.0:
            a = a * 255.0
        return Image.fromarray(np.round(np.clip(a, 0, 255)).astype(np.uint8), "L").convert("RGB")
    return img.convert("RGB")


def _pillow_limit_hint(limit: int) -> str:
    """What to do when Pillow's own guard refused an image that ``limit`` would allow."""
    pillow = Image.MAX_IMAGE_PIXELS
    if pillow is None or limit <= 2 * pillow:
        return ""
    return (
        f"; max_pixels={limit} is above Pillow's own limit (2 x PIL.Image.MAX_IMAGE_PIXELS = "
        f"{2 * pillow}), which refuses the image first: raise PIL.Image.MAX_IMAGE_PIXELS as "
        "well (or set it to None)"
    )


def read_image(
    path: str | Path, *, max_pixels: int | None = None, min_side: int | None = None
) -> Image.Image:
    """Decode ``path`` into an 8-bit RGB PIL image (see :func:`to_rgb`), upright per EXIF.

    ``max_pixels`` (default :data:`MAX_PIXELS`) refuses decompression bombs before decoding.
    Pillow refuses images over 2 x ``PIL.Image.MAX_IMAGE_PIXELS`` (about 179M pixels by
    default) before this check, so a ``max_pixels`` above that needs
    ``PIL.Image.MAX_IMAGE_PIXELS`` raised too (or set to None); the error says so.
    ``min_side``, when given, lets the JPEG decoder downscale by 1/2..1/8 while keeping the
    shorter side >= ``min_side`` (as training does), which makes large photos much faster.
    Raises :class:`BadImage` for missing, truncated, oversized or non-image files.
    """
    limit = MAX_PIXELS if max_pixels is None else max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
                if w * h > limit:
                    raise BadImage(
                        path,
                        f"{w}x{h} = {w * h} pixels is over the limit of "
                        f"{limit} (decompression-bomb guard)",
                    )
                if min_side is not None and img.format == "JPEG" and min(w, h) > min_side:
                    scale = min_side / min(w, h)
                    img.draft(None, (math.ceil(w * scale), math.ceil(h * scale)))
                img.load()
                try:
                    upright = ImageOps.exif_transpose(img)
                except Exception:  # a corrupt EXIF block: keep the pixels as stored
                    upright = img
                rgb = to_rgb(upright)
                if rgb is img:
                    rgb = img.copy()
        return rgb
    except BadImage:
        raise
    except Image.DecompressionBombError as exc:
        why = str(exc).rstrip(".") + _pillow_limit_hint(limit)
        raise BadImage(path, f"decompression-bomb guard: {why}") from None
    except FileNotFoundError:
        raise BadImage(path, "no such file") from None
    except IsADirectoryError:
        raise BadImage(path, "is a folder, not an image file") from None
    except Image.UnidentifiedImageError:
        raise BadImage(path, "not an image file (unknown format)") from None
    except (
        OSError,
        ValueError,
        SyntaxError,
        EOFError,
        TypeError,
        KeyError,
        IndexError,
        ZeroDivisionError,
        MemoryError,
    ) as exc:
        raise BadImage(path, f"{type(exc).__name__}: {exc}") from None


def resize_crop_box(
    height: int, width: int, resize_size: int, input_size: int
) -> tuple[int, int, int, int]:
    """``(height, width, top, left)`` of :func:`resize_crop`: the image's size once its
    shorter side is ``resize_size`` (the longer one rounded), and the corner of the centre
    ``input_size`` x ``input_size`` crop in it. An image without pixels has no such box."""
    if min(height, width) < 1:
        raise ValueError(f"cannot resize an empty image ({width}x{height})")
    r, s = resize_size, input_size
    scale = r / min(height, width)
    nh, nw = max(r, round(height * scale)), max(r, round(width * scale))
    return nh, nw, (nh - s) // 2, (nw - s) // 2


def resize_crop(
    img: Image.Image,
    resize_size: int,
    input_size: int,
    resample: Image.Resampling = Image.Resampling.BICUBIC,
) -> Image.Image:
    """Shorter side to ``resize_size``, then the centre ``input_size`` x ``input_size`` crop."""
    s = input_size
    w, h = img.size
    nh, nw, top, left = resize_crop_box(h, w, resize_size, s)
    if (w, h) != (nw, nh):
        img = img.resize((nw, nh), resample)
    if (nw, nh) != (s, s):
        img = img.crop((left, top, left + s, top + s))
    return img


class ImageTransform:
    """PIL image -> normalised float32 tensor (3, S, S): the evaluation preprocessing.

    Resize so the shorter side is ``resize_size`` (``interpolation``; the long side is
    rounded), centre-crop ``input_size`` x ``input_size``, scale to 0..1, subtract ``mean``
    and divide by ``std`` per channel. An image already ``resize_size`` square is not
    resampled. Non-RGB images go through :func:`to_rgb` first. Picklable (used by DataLoader
    workers).
    """

    def __init__(
        self,
        input_size: int,
        resize_size: int,
        interpolation: str,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        if interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"interpolation={interpolation!r}: expected one of {sorted(INTERPOLATIONS)}"
            )
        self.input_size = int(input_size)
        self.resize_size = int(resize_size)
        self.interpolation = interpolation
        self.mean = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
        self.std = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)

    def resize_crop(self, img: Image.Image) -> Image.Image:
        """The geometric part: shorter side to ``resize_size``, centre crop ``input_size``."""
        return resize_crop(
            img, self.resize_size, self.input_size, INTERPOLATIONS[self.interpolation]
        )

    def __call__(self, img: Image.Image) -> Any:
        import torch

        if not isinstance(img, Image.Image):
            raise TypeError(f"transform expects a PIL image, got {type(img).__name__}")
        if 0 in img.size:
            raise ValueError(f"cannot transform an empty image ({img.size[0]}x{img.size[1]})")
        arr = np.asarray(self.resize_crop(to_rgb(img)), dtype=np.float32)  # (S, S, 3)
        arr = (arr.transpose(2, 0, 1) / np.float32(255.0) - self.mean) / self.std
        return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))

    def __repr__(self) -> str:
        return (
            f"ImageTransform(input_size={self.input_size}, resize_size={self.resize_size}, "
            f"interpolation={self.interpolation!r}, mean={self.mean.ravel().tolist()}, "
            f"std={self.std.ravel().tolist()})"
        )


class ImageFiles:
    """A map-style dataset over image files for ``torch.utils.data.DataLoader``.

    ``dataset[i]`` is ``(i, tensor, None)`` for a decodable file and ``(i, None, reason)``
    for one that is not, so one bad file never stops a run; :func:`collate_images` batches
    these. Needs no torch import until an item is transformed.
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        transform: Any,
        min_side: int | None = None,
        max_pixels: int | None = None,
    ) -> None:
        self.paths = [Path(p) for p in paths]
        self.transform = transform
        self.min_side = min_side
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, Any, str | None]:
        try:
            img = read_image(self.paths[i], min_side=self.min_side, max_pixels=self.max_pixels)
            return i, self.transform(img), None
        except BadImage as e:
            return i, None, e.reason
        except Exception as e:  # a transform failure on an odd image: skip that file only
            return i, None, " ".join(f"{type(e).__name__}: {e}".split())


def collate_images(
    items: Sequence[tuple[int, Any, str | None]],
) -> tuple[list[int], Any, list[tuple[int, str]]]:
    """Batch :class:`ImageFiles` items: ``(indices, stacked tensor or None, failures)``.

    ``failures`` holds ``(index, reason)`` for the files that could not be decoded.
    """
    import torch

    good = [(i, t) for i, t, err in items if err is None]
    failures = [(i, err) for i, t, err in items if err is not None]
    batch = torch.stack([t for _, t in good]) if good else None
    return [i for i, _ in good], batch, failures
