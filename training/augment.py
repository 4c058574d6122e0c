"""Batched, on-device SimCLR/CARL view augmentation.

CARL (Silva & Ramirez Rivera, 2022, appendix A.3) uses the SimCLR augmentation list (Chen et al.,
2020, appendix A): random resized crop + horizontal flip, colour jitter (p=0.8, random op order),
random grayscale (p=0.2), Gaussian blur (p=0.5, sigma in [0.1, 2.0], kernel ~10% of the image
side), then per-channel normalisation.

:class:`BatchAugment` applies that list to a whole ``(B, 3, H, W)`` batch that already lives on
the accelerator, with every random parameter drawn *per image* on the device. Nothing in the
call synchronises with the host (no ``.item()``, no value-dependent Python branching, no
shape-changing boolean indexing), so it overlaps with the training step and can later be wrapped
by ``torch.compile``. Per-sample choices are made with ``torch.where`` over the whole batch.
Each op reproduces the tensor kernels of ``torchvision.transforms.v2.functional`` for the same
parameters (see ``tests/test_augment.py`` for the tolerances).

:func:`torchvision_transform` builds the classic per-image PIL/CPU pipeline with the same
configuration, used as a baseline and fallback.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from carlzoo.training.bounds import NON_NEGATIVE, POSITIVE, PROBABILITY, Bound, check_fields

if TYPE_CHECKING:
    import PIL.Image

__all__ = [
    "AUGMENT_PRESETS",
    "AugmentConfig",
    "AugmentParams",
    "BatchAugment",
    "blur_kernel_size",
    "torchvision_transform",
]

# Luma weights of torchvision's ``rgb_to_grayscale`` (ITU-R 601-2; torchvision writes 0.2989).
_LUMA = (0.2989, 0.587, 0.114)

# Number of crop candidates drawn per sample (torchvision's RandomResizedCrop retries 10 times).
_CROP_TRIES = 10

# Column layout of the single uniform draw made by ``BatchAugment.sample_params``.
_C_AREA = 0
_C_RATIO = _C_AREA + _CROP_TRIES
_C_TOP = _C_RATIO + _CROP_TRIES
_C_LEFT = _C_TOP + 1
_C_FLIP = _C_LEFT + 1
_C_JITTER = _C_FLIP + 1
_C_FACTORS = _C_JITTER + 1  # brightness, contrast, saturation, hue
_C_ORDER = _C_FACTORS + 4  # 4 keys, argsorted into a random permutation
_C_GRAY = _C_ORDER + 4
_C_BLUR = _C_GRAY + 1
_C_SIGMA = _C_BLUR + 1
_N_UNIFORM = _C_SIGMA + 1

# Jitter op ids used in ``AugmentParams.order`` (same numbering as torchvision's ColorJitter).
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3


@dataclass(frozen=True)
class AugmentConfig:
    """SimCLR-style augmentation hyper-parameters (CARL appendix A.3 / SimCLR appendix A)."""

    crop_scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area fraction
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # aspect ratio w/h, sampled log-uniformly
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel: int = 0  # 0 = odd size about 10% of the output size (at least 3)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def __post_init__(self) -> None:
        check_fields(self, "augment", _AUGMENT_BOUNDS, pairs=_AUGMENT_PAIRS)
        if self.blur_kernel and self.blur_kernel % 2 == 0:
            raise ValueError(
                f"augment.blur_kernel must be odd (or 0: about 10% of the side), "
                f"got {self.blur_kernel}"
            )


_AUGMENT_BOUNDS: dict[str, Bound] = {
    "crop_scale": POSITIVE,
    "crop_ratio": POSITIVE,
    "flip_p": PROBABILITY,
    "jitter_p": PROBABILITY,
    "brightness": NON_NEGATIVE,
    "contrast": NON_NEGATIVE,
    "saturation": NON_NEGATIVE,
    "hue": Bound(0, 0.5),
    "grayscale_p": PROBABILITY,
    "blur_p": PROBABILITY,
    "blur_sigma": POSITIVE,
    "blur_kernel": NON_NEGATIVE,
    "std": POSITIVE,
}
_AUGMENT_PAIRS = ("crop_scale", "crop_ratio", "blur_sigma")  # (low, high) in order


# Presets by output resolution. Colour jitter strength 0.5 (0.4, 0.4, 0.4, 0.1) everywhere, the
# SimCLR CIFAR setting. 32 px (CIFAR-10/100): no Gaussian blur (blur_p=0), the usual CIFAR
# practice since blurring a 32 px image destroys most of its content. 64 px (Tiny ImageNet) and
# 96 px (STL-10): blur with p=0.5 as in SimCLR, kernel about 10% of the side (7 and 9 px).
AUGMENT_PRESETS: dict[int, AugmentConfig] = {
    32: AugmentConfig(blur_p=0.0),
    64: AugmentConfig(blur_p=0.5),
    96: AugmentConfig(blur_p=0.5),
}


def blur_kernel_size(cfg: AugmentConfig, size: int) -> int:
    """Gaussian kernel size for ``size`` px outputs.

    ``cfg.blur_kernel`` if set, else SimCLR's rule: 10% of the side rounded down, made odd as
    ``2 * (k // 2) + 1``, at least 3 (32 px -> 3, 64 px -> 7, 96 px -> 9, 224 px -> 23).
    """
    if cfg.blur_kernel:
        return cfg.blur_kernel
    k = int(0.1 * size)
    return max(3, 2 * (k // 2) + 1)


@dataclass
class AugmentParams:
    """Per-sample augmentation parameters; every field is a tensor with leading dim ``B``.

    Crop boxes are in input pixels (integer-valued floats when sampled, like torchvision).
    ``order[b, k]`` is the jitter op applied at step ``k`` of sample ``b``
    (0 brightness, 1 contrast, 2 saturation, 3 hue).
    """

    top: Tensor  # (B,) float32
    left: Tensor  # (B,) float32
    height: Tensor  # (B,) float32
    width: Tensor  # (B,) float32
    flip: Tensor  # (B,) bool
    jitter: Tensor  # (B,) bool
    brightness: Tensor  # (B,) float32
    contrast: Tensor  # (B,) float32
    saturation: Tensor  # (B,) float32
    hue: Tensor  # (B,) float32
    order: Tensor  # (B, 4) int64
    grayscale: Tensor  # (B,) bool
    blur: Tensor  # (B,) bool
    sigma: Tensor  # (B,) float32

    @classmethod
    def identity(
        cls, n: int, height: int, width: int, *, device: torch.device | str = "cpu"
    ) -> AugmentParams:
        """Full-image crop, every op off and neutral factors (a template for hand-set params)."""
        full = torch.full((n,), 1.0, device=device)
        zero = torch.zeros(n, device=device)
        off = torch.zeros(n, dtype=torch.bool, device=device)
        return cls(
            top=zero.clone(),
            left=zero.clone(),
            height=full * height,
            width=full * width,
            flip=off.clone(),
            jitter=off.clone(),
            brightness=full.clone(),
            contrast=full.clone(),
            saturation=full.clone(),
            hue=zero.clone(),
            order=torch.arange(4, device=device).expand(n, 4).clone(),
            grayscale=off.clone(),
            blur=off.clone(),
            sigma=full.clone(),
        )


def _uniform(u: Tensor, lo: float, hi: float) -> Tensor:
    return u * (hi - lo) + lo


def _col(x: Tensor) -> Tensor:
    """(B,) -> (B, 1, 1, 1) for broadcasting against images."""
    return x.view(-1, 1, 1, 1)


def _fallback_box(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop fallback: central crop clamped to the ratio bounds."""
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _grayscale(x: Tensor) -> Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) luma, same arithmetic as torchvision's rgb_to_grayscale."""
    r, g, b = x.unbind(dim=1)
    return r.mul(_LUMA[0]).add_(g, alpha=_LUMA[1]).add_(b, alpha=_LUMA[2]).unsqueeze(1)


def _adjust_hue(x: Tensor, hue: Tensor) -> Tensor:
    """Per-sample hue shift in HSV space, equivalent to torchvision's tensor ``adjust_hue``.

    ``x`` is (B, 3, H, W) float in [0, 1], ``hue`` is (B,) in [-0.5, 0.5]. Hue is kept in
    sixths: ``h6 = 2 c + (x_{c+1} - x_{c+2}) / (max - min)`` for the channel ``c`` holding
    the maximum (the first one on ties, as torchvision's ``_rgb_to_hsv``), and HSV -> RGB uses
    the closed form ``out_c = max - (max - min) * clamp(min(k, 4 - k), 0, 1)`` with
    ``k = (h6 + n_c) mod 6``, ``n = 5, 3, 1``. The three channels are computed together, so
    the whole op is about 20 kernels; same function as torchvision's ``_rgb_to_hsv`` /
    ``_hsv_to_rgb`` pair up to float rounding (~1e-6).
    """
    maxc, argmax = x.max(dim=1, keepdim=True)  # (B, 1, H, W); first maximum on ties
    crange = maxc - x.amin(dim=1, keepdim=True)
    inv = torch.where(crange == 0, 1.0, crange).reciprocal_()
    # (g - b, b - r, r - g): for channel c, the next channel minus the one after it
    diff = x.roll(-1, dims=1).sub_(x.roll(-2, dims=1)).mul_(inv)
    # Per channel constants made on the device (arange: no host-to-device copy, no sync).
    sextant = torch.arange(0.0, 6.0, 2.0, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    h6 = diff.add_(sextant).gather(1, argmax)  # (B, 1, H, W), in [-1, 5)
    h6 = h6.add_(hue.view(-1, 1, 1, 1) * 6.0)
    offset = torch.arange(5.0, 0.0, -2.0, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    k = (h6 + offset).remainder_(6.0)  # (B, 3, H, W)
    return torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0).mul_(crange).neg_().add_(maxc)


def _gaussian_blur(x: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    """Per-sample separable Gaussian blur with reflect padding (torchvision's gaussian_blur).

    The whole batch is one grouped conv per axis: (1, B*3, H, W) with groups=B*3.
    """
    n, c, height, width = x.shape
    lim = (kernel_size - 1) / (2.0 * math.sqrt(2.0))
    pos = torch.linspace(-lim, lim, steps=kernel_size, dtype=x.dtype, device=x.device)
    kernel = torch.softmax(pos.div(sigma.view(-1, 1)).pow(2).neg(), dim=1)  # (B, k)
    kernel = kernel.view(n, 1, kernel_size).expand(n, c, kernel_size).reshape(n * c, 1, 1, -1)
    pad = kernel_size // 2
    y = F.pad(x, [pad, pad, pad, pad], mode="reflect").reshape(1, n * c, height + 2 * pad, -1)
    y = F.conv2d(y, kernel, groups=n * c)
    y = F.conv2d(y, kernel.view(n * c, 1, kernel_size, 1), groups=n * c)
    return y.view(n, c, height, width)


class BatchAugment:
    """SimCLR/CARL augmentation of a whole batch on its device, parameters drawn per image.

    Order (SimCLR/CARL): random resized crop + horizontal flip (one bilinear ``grid_sample``)
    -> colour jitter (random op order per image) -> random grayscale -> Gaussian blur ->
    normalisation. Everything is float32 in [0, 1] until normalisation, clamped after each
    colour op like torchvision.
    """

    def __init__(self, cfg: AugmentConfig, size: int, *, compile: bool = False) -> None:
        """``compile=True`` runs :meth:`apply` through ``torch.compile`` (whole graph, static
        shapes) in :meth:`__call__`: its elementwise ops fuse into a few kernels. The first call
        of each batch shape compiles (seconds); the parameters are still drawn eagerly."""
        if size < 1:
            raise ValueError(f"size must be positive, got {size}")
        self.cfg = cfg
        self.size = size
        self.blur_kernel = blur_kernel_size(cfg, size)
        if cfg.blur_p > 0 and self.blur_kernel // 2 >= size:
            raise ValueError(f"blur kernel {self.blur_kernel} too large for {size} px outputs")
        self._norm: dict[torch.device, tuple[Tensor, Tensor]] = {}
        self.compiled = compile
        self._apply: Callable[[Tensor, AugmentParams], Tensor] = (
            torch.compile(self.apply, fullgraph=True, dynamic=False) if compile else self.apply
        )

    def __repr__(self) -> str:
        name = type(self).__name__
        compiled = ", compile=True" if self.compiled else ""
        return (
            f"{name}(size={self.size}, blur_kernel={self.blur_kernel}{compiled}, cfg={self.cfg})"
        )

    # ------------------------------------------------------------------ parameters
    def sample_params(
        self,
        n: int,
        height: int,
        width: int,
        *,
        device: torch.device | str,
        generator: torch.Generator | None = None,
    ) -> AugmentParams:
        """Draw per-sample parameters for ``n`` images of ``height`` x ``width`` on ``device``.

        One ``torch.rand`` call supplies all uniforms, so a seeded generator gives bit-identical
        parameters on the same device. Crops follow torchvision's RandomResizedCrop, vectorised:
        10 candidates per sample, the first valid one is kept (argmax over the validity mask),
        torchvision's central fallback where none is valid.
        """
        cfg = self.cfg
        u = torch.rand(n, _N_UNIFORM, device=device, generator=generator)

        # Random resized crop (torchvision semantics, integer boxes).
        area = float(height * width)
        target = area * _uniform(u[:, _C_AREA:_C_RATIO], *cfg.crop_scale)
        log_lo, log_hi = math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1])
        aspect = torch.exp(_uniform(u[:, _C_RATIO:_C_TOP], log_lo, log_hi))
        w = torch.round(torch.sqrt(target * aspect))
        h = torch.round(torch.sqrt(target / aspect))
        valid = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        first = valid.to(torch.int32).argmax(dim=1, keepdim=True)  # first valid (or 0)
        any_valid = valid.any(dim=1)
        w = w.gather(1, first).squeeze(1)
        h = h.gather(1, first).squeeze(1)
        fb_top, fb_left, fb_h, fb_w = _fallback_box(height, width, cfg.crop_ratio)
        w = torch.where(any_valid, w, float(fb_w))
        h = torch.where(any_valid, h, float(fb_h))
        # Uniform integer in [0, size - crop] like torch.randint; clamp guards float rounding.
        top = torch.minimum(torch.floor(u[:, _C_TOP] * (height - h + 1.0)), height - h)
        left = torch.minimum(torch.floor(u[:, _C_LEFT] * (width - w + 1.0)), width - w)
        top = torch.where(any_valid, top, float(fb_top))
        left = torch.where(any_valid, left, float(fb_left))

        # Colour jitter factors (torchvision ColorJitter ranges) and a random order per sample.
        f = u[:, _C_FACTORS : _C_FACTORS + 4]
        brightness = _uniform(f[:, 0], max(0.0, 1.0 - cfg.brightness), 1.0 + cfg.brightness)
        contrast = _uniform(f[:, 1], max(0.0, 1.0 - cfg.contrast), 1.0 + cfg.contrast)
        saturation = _uniform(f[:, 2], max(0.0, 1.0 - cfg.saturation), 1.0 + cfg.saturation)
        hue = _uniform(f[:, 3], -cfg.hue, cfg.hue)
        order = torch.argsort(u[:, _C_ORDER : _C_ORDER + 4], dim=1)

        return AugmentParams(
            top=top,
            left=left,
            height=h,
            width=w,
            flip=u[:, _C_FLIP] < cfg.flip_p,
            jitter=u[:, _C_JITTER] < cfg.jitter_p,
            brightness=brightness,
            contrast=contrast,
            saturation=saturation,
            hue=hue,
            order=order,
            grayscale=u[:, _C_GRAY] < cfg.grayscale_p,
            blur=u[:, _C_BLUR] < cfg.blur_p,
            sigma=_uniform(u[:, _C_SIGMA], *cfg.blur_sigma),
        )

    # ------------------------------------------------------------------ ops
    def _crop_flip(self, x: Tensor, p: AugmentParams) -> Tensor:
        """Crop each box, flip, resize to ``size`` x ``size``: one bilinear ``grid_sample``.

        With ``align_corners=False`` output pixel ``j`` reads input column
        ``left + (j + 0.5) * w / size - 0.5``, exactly what ``resized_crop`` (crop, then
        ``interpolate(bilinear, antialias=False)``) computes. ``interpolate`` only sees the crop
        and so clamps sample positions to the crop's edge pixels; clamping the grid to the
        pixel centres of the box reproduces that (otherwise the outer half-pixel ring would
        blend in pixels from outside the box when upscaling, an error of up to a full pixel
        step there). The clamp also keeps every sample inside the image, so ``padding_mode``
        never matters. Remaining difference: float32 rounding of the grid coordinates, at most
        ~4e-6 on [0, 1] noise images (measured for up- and downscaling, with and without flip).
        """
        n, c, height, width = x.shape
        s = self.size
        top, left, h, w = p.top, p.left, p.height, p.width
        sx = w / width
        sx = torch.where(p.flip, -sx, sx)
        sy = h / height
        tx = (2.0 * left + w) / width - 1.0
        ty = (2.0 * top + h) / height - 1.0
        zero = torch.zeros_like(sx)
        theta = torch.stack((sx, zero, tx, zero, sy, ty), dim=1).view(n, 2, 3)
        grid = F.affine_grid(theta, [n, c, s, s], align_corners=False)
        lo = torch.stack(((2.0 * left + 1.0) / width, (2.0 * top + 1.0) / height), dim=1) - 1.0
        hi = torch.stack(
            ((2.0 * (left + w) - 1.0) / width, (2.0 * (top + h) - 1.0) / height), dim=1
        ).sub(1.0)
        grid = torch.clamp(grid, min=lo.view(n, 1, 1, 2), max=hi.view(n, 1, 1, 2))
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def _jitter(self, x: Tensor, p: AugmentParams) -> Tensor:
        """Colour jitter with a per-sample op order, in 4 passes.

        Brightness, contrast and saturation are all ``clamp(a * x + b * mean(gray) + c * gray)``
        with per-sample (a, b, c), so each pass evaluates that form once with the coefficients of
        the op the sample applies at that step (neutral (1, 0, 0) when jitter is off or the op is
        hue); the coefficients of all 4 steps are worked out up front. Hue is computed for the
        batch and selected with ``torch.where``.
        """
        cfg = self.cfg
        n = x.shape[0]
        use_mean = cfg.contrast > 0
        use_gray = cfg.saturation > 0 or use_mean
        use_hue = cfg.hue > 0
        # (B, 4): the factor of the op each sample applies at each step (hue's: 1).
        by_op = torch.stack(
            (p.brightness, p.contrast, p.saturation, torch.ones_like(p.brightness)), dim=1
        )
        order = p.order
        factor = by_op.gather(1, order)
        on = p.jitter.view(n, 1)
        a, b, c = torch.stack(
            (
                torch.where(on, factor, 1.0),  # a, on x
                torch.where(on & (order == CONTRAST), 1.0 - factor, 0.0),  # b, on mean(gray)
                torch.where(on & (order == SATURATION), 1.0 - factor, 0.0),  # c, on gray
            )
        ).view(3, n, 4, 1, 1, 1).unbind(0)  # each (B, step, 1, 1, 1)
        is_hue = (on & (order == HUE)).view(n, 4, 1, 1, 1)
        for k in range(4):
            y = x * a[:, k]
            if use_gray:
                gray = _grayscale(x)
                if use_mean:
                    y.addcmul_(b[:, k], gray.mean(dim=(1, 2, 3), keepdim=True))
                y.addcmul_(c[:, k], gray)
            y = y.clamp_(0.0, 1.0)
            if use_hue:
                y = torch.where(is_hue[:, k], _adjust_hue(x, p.hue), y)
            x = y
        return x

    def _norm_consts(self, device: torch.device) -> tuple[Tensor, Tensor]:
        # Cached per device: building them each call would be a blocking host-to-device copy.
        consts = self._norm.get(device)
        if consts is None:
            mean = torch.tensor(self.cfg.mean, dtype=torch.float32, device=device)
            std = torch.tensor(self.cfg.std, dtype=torch.float32, device=device)
            consts = (mean.view(1, 3, 1, 1), std.view(1, 3, 1, 1))
            self._norm[device] = consts
        return consts

    def _normalise(self, x: Tensor) -> Tensor:
        mean, std = self._norm_consts(x.device)
        return (x - mean) / std

    def apply(self, images: Tensor, params: AugmentParams) -> Tensor:
        """Augment ``images`` (B, 3, H, W) uint8 or float in [0, 1] with given ``params``.

        Deterministic. Ops whose probability is 0 in the config are skipped entirely (whatever
        their flags in ``params``). Returns (B, 3, size, size) float32, normalised.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected (B, 3, H, W) images, got {tuple(images.shape)}")
        if images.dtype == torch.uint8:
            x = images.to(torch.float32).div_(255.0)
        elif images.is_floating_point():
            x = images.to(torch.float32)
        else:
            raise TypeError(f"expected uint8 or floating point images, got {images.dtype}")
        cfg = self.cfg
        x = self._crop_flip(x, params)
        if cfg.jitter_p > 0:
            x = self._jitter(x, params)
        if cfg.grayscale_p > 0:
            x = torch.where(_col(params.grayscale), _grayscale(x).expand_as(x), x)
        if cfg.blur_p > 0:
            x = torch.where(_col(params.blur), _gaussian_blur(x, params.sigma, self.blur_kernel), x)
        return self._normalise(x)

    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Augment a batch with fresh per-sample parameters drawn on ``images.device``."""
        n, _, height, width = images.shape
        params = self.sample_params(n, height, width, device=images.device, generator=generator)
        # Filled before a compiled apply reads it: a cache that changes under torch.compile's
        # first trace would make it trace again.
        self._norm_consts(images.device)
        return self._apply(images, params)


def torchvision_transform(cfg: AugmentConfig, size: int) -> Callable[[PIL.Image.Image], Tensor]:
    """Classic per-image torchvision v2 pipeline with the same configuration (CPU baseline).

    Accepts a PIL image (or a uint8 CHW tensor) and returns (3, size, size) float32, normalised.
    ``ToImage`` comes first so the ops run on uint8 tensors (torchvision's recommended layout);
    ``ToDtype`` + ``Normalize`` come last.
    """
    from torchvision.transforms import v2

    ops: list[Callable] = [
        v2.ToImage(),
        v2.RandomResizedCrop(size, scale=cfg.crop_scale, ratio=cfg.crop_ratio, antialias=True),
        v2.RandomHorizontalFlip(cfg.flip_p),
        v2.RandomApply(
            [v2.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)],
            p=cfg.jitter_p,
        ),
        v2.RandomGrayscale(cfg.grayscale_p),
    ]
    if cfg.blur_p > 0:
        kernel = blur_kernel_size(cfg, size)
        ops.append(v2.RandomApply([v2.GaussianBlur(kernel, cfg.blur_sigma)], p=cfg.blur_p))
    ops += [
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(cfg.mean), std=list(cfg.std)),
    ]
    return v2.Compose(ops)
