"""Tests for carlzoo.training.augment (CPU, seeded, fast)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from PIL import Image

from carlzoo.training.augment import (
    AUGMENT_PRESETS,
    AugmentConfig,
    AugmentParams,
    BatchAugment,
    blur_kernel_size,
    torchvision_transform,
)

OFF = AugmentConfig(flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)
# Tolerance against torchvision's kernels on [0, 1] floats. Measured: resized_crop (+hflip)
# <= 4e-6 (float32 rounding of grid coordinates; noise images are the worst case), colour ops
# and blur <= 2e-6 (hue uses a closed-form HSV round trip), grayscale ~1e-7.
TOL = 1e-5
N_DRAWS = 20000


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Float images in [0, 1]: half smooth noise, half quantised (grays, ties, saturated)."""
    g = _gen(seed)
    x = torch.rand(n, 3, h, w, generator=g)
    x[::2] = (x[::2] * 4).round() / 4  # many equal channels / exact 0 and 1
    if n > 1:
        x[1] = x[1, :1]  # one fully gray image
    return x


def _unnormalise(out: torch.Tensor, cfg: AugmentConfig) -> torch.Tensor:
    mean = torch.tensor(cfg.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std).view(1, 3, 1, 1)
    return out * std + mean


def _rate_tol(p: float, n: int) -> float:
    """Five binomial standard deviations of an observed rate."""
    return 5.0 * math.sqrt(p * (1.0 - p) / n)


# --------------------------------------------------------------------------- parameters


@pytest.fixture(scope="module")
def draws() -> AugmentParams:
    aug = BatchAugment(AugmentConfig(), 32)
    return aug.sample_params(N_DRAWS, 96, 128, device="cpu", generator=_gen(1))


def test_params_shapes_dtypes(draws: AugmentParams) -> None:
    for f in dataclasses.fields(draws):
        t = getattr(draws, f.name)
        assert t.shape[0] == N_DRAWS and t.device.type == "cpu", f.name
    assert draws.order.shape == (N_DRAWS, 4) and draws.order.dtype == torch.long
    for name in ("flip", "jitter", "grayscale", "blur"):
        assert getattr(draws, name).dtype == torch.bool


def test_crop_boxes(draws: AugmentParams) -> None:
    top, left, h, w = draws.top, draws.left, draws.height, draws.width
    for t in (top, left, h, w):  # integer boxes, like torchvision
        assert torch.equal(t, t.round())
    assert (h >= 1).all() and (w >= 1).all()
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= 96).all() and (left + w <= 128).all()
    # Area fraction in crop_scale up to rounding of h and w (sides >= 25 px -> < 4% each way).
    frac = h * w / (96 * 128)
    assert frac.min() >= 0.08 * 0.96 and frac.max() <= 1.0
    assert frac.min() < 0.085 and frac.max() > 0.97  # spans the range
    # Aspect ratio within crop_ratio up to the same rounding; log-uniform draws span it.
    ratio = w / h
    assert ratio.min() >= 0.75 * 0.96 and ratio.max() <= 4 / 3 * 1.04
    assert ratio.min() < 0.77 and ratio.max() > 1.30
    # Positions are spread over the free range (mean position ~ half of it).
    rel = top / (96 - h).clamp(min=1)
    assert abs(rel[h < 90].mean().item() - 0.5) < 0.02


def test_crop_distribution_matches_torchvision(draws: AugmentParams) -> None:
    """Same area / ratio statistics as torchvision's first-valid-of-10 rejection sampler."""
    torch.manual_seed(0)
    rrc = T.RandomResizedCrop(32)
    ref = [rrc.make_params([torch.empty(3, 96, 128)]) for _ in range(1000)]
    ref_frac = torch.tensor([r["height"] * r["width"] / (96 * 128) for r in ref])
    ref_logr = torch.tensor([math.log(r["width"] / r["height"]) for r in ref])
    frac = draws.height * draws.width / (96 * 128)
    logr = torch.log(draws.width / draws.height)
    for ours, theirs in ((frac, ref_frac), (logr, ref_logr)):
        se = math.sqrt(ours.var() / len(ours) + theirs.var() / len(theirs))
        assert abs(ours.mean() - theirs.mean()) < 5 * se


def test_crop_fallback_matches_torchvision() -> None:
    # 4 x 200: no candidate can fit, torchvision falls back to a central crop clamped to 4/3.
    aug = BatchAugment(AugmentConfig(), 8)
    p = aug.sample_params(64, 4, 200, device="cpu", generator=_gen(2))
    ref = T.RandomResizedCrop(8).make_params([torch.empty(3, 4, 200)])
    for name, key in (("top", "top"), ("left", "left"), ("height", "height"), ("width", "width")):
        assert (getattr(p, name) == ref[key]).all(), name


@pytest.mark.parametrize(
    ("name", "p"), [("flip", 0.5), ("jitter", 0.8), ("grayscale", 0.2), ("blur", 0.5)]
)
def test_bernoulli_rates(draws: AugmentParams, name: str, p: float) -> None:
    rate = getattr(draws, name).float().mean().item()
    assert abs(rate - p) < _rate_tol(p, N_DRAWS)


def test_factor_ranges(draws: AugmentParams) -> None:
    for name, lo, hi in (
        ("brightness", 0.6, 1.4),
        ("contrast", 0.6, 1.4),
        ("saturation", 0.6, 1.4),
        ("hue", -0.1, 0.1),
        ("sigma", 0.1, 2.0),
    ):
        t = getattr(draws, name)
        assert t.min() >= lo and t.max() <= hi, name
        assert t.min() < lo + 0.01 * (hi - lo) and t.max() > hi - 0.01 * (hi - lo), name
        assert abs(t.mean().item() - (lo + hi) / 2) < 0.01 * (hi - lo), name


def test_jitter_order_is_uniform_permutation(draws: AugmentParams) -> None:
    assert torch.equal(draws.order.sort(dim=1).values, torch.arange(4).expand(N_DRAWS, 4))
    for k in range(4):
        counts = torch.bincount(draws.order[:, k], minlength=4).float() / N_DRAWS
        assert (counts - 0.25).abs().max() < _rate_tol(0.25, N_DRAWS)


def test_zero_strength_factors_are_neutral() -> None:
    cfg = AugmentConfig(brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)
    p = BatchAugment(cfg, 8).sample_params(100, 8, 8, device="cpu", generator=_gen())
    assert (p.brightness == 1).all() and (p.contrast == 1).all() and (p.saturation == 1).all()
    assert (p.hue == 0).all()


def test_samples_get_different_params() -> None:
    aug = BatchAugment(AugmentConfig(), 16)
    p = aug.sample_params(32, 32, 32, device="cpu", generator=_gen(3))
    for name in ("brightness", "contrast", "saturation", "hue", "sigma"):
        assert getattr(p, name).unique().numel() == 32, name
    boxes = torch.stack((p.top, p.left, p.height, p.width), dim=1)
    assert boxes.unique(dim=0).shape[0] > 25
    # Identical images in, different views out.
    x = _images(1, 32, 32).expand(32, -1, -1, -1)
    out = aug(x, generator=_gen(3))
    assert (out[1:] - out[:1]).flatten(1).abs().amax(dim=1).min() > 1e-3


# --------------------------------------------------------------------------- pipeline


@pytest.mark.parametrize(("size", "h", "w"), [(32, 32, 32), (32, 40, 56), (96, 64, 72)])
def test_output_shape_dtype_range(size: int, h: int, w: int) -> None:
    cfg = AUGMENT_PRESETS[size]
    x = torch.randint(0, 256, (8, 3, h, w), dtype=torch.uint8, generator=_gen())
    out = BatchAugment(cfg, size)(x, generator=_gen(4))
    assert out.shape == (8, 3, size, size) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    x01 = _unnormalise(out, cfg)
    assert x01.min() >= -1e-5 and x01.max() <= 1 + 1e-5


def test_identity_when_everything_off() -> None:
    x = _images(4, 24, 24)
    # Full-image box via params.
    aug = BatchAugment(OFF, 24)
    out = aug.apply(x, AugmentParams.identity(4, 24, 24))
    torch.testing.assert_close(_unnormalise(out, OFF), x, atol=TOL, rtol=0)
    # Full-image box via sampling: scale (1, 1) and ratio (1, 1) on a square image.
    cfg = dataclasses.replace(OFF, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))
    out = BatchAugment(cfg, 24)(x, generator=_gen())
    torch.testing.assert_close(_unnormalise(out, cfg), x, atol=TOL, rtol=0)
    ref = TF.normalize(x, list(OFF.mean), list(OFF.std))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_zero_probability_ops_are_skipped() -> None:
    x = _images(4, 16, 16)
    p = AugmentParams.identity(4, 16, 16)
    p.jitter[:] = True
    p.brightness[:] = 0.5
    p.grayscale[:] = True
    p.blur[:] = True
    out = BatchAugment(OFF, 16).apply(x, p)
    torch.testing.assert_close(_unnormalise(out, OFF), x, atol=TOL, rtol=0)


def _boxes_params(boxes: list[tuple[int, int, int, int]], h: int, w: int) -> AugmentParams:
    p = AugmentParams.identity(len(boxes), h, w)
    b = torch.tensor(boxes, dtype=torch.float32)
    p.top, p.left, p.height, p.width = b.unbind(dim=1)
    return p


@pytest.mark.parametrize("size", [8, 32, 64])
@pytest.mark.parametrize("flip", [False, True])
def test_crop_flip_matches_torchvision_resized_crop(size: int, flip: bool) -> None:
    h, w = 37, 45
    boxes = [(0, 0, 37, 45), (3, 5, 9, 9), (10, 2, 20, 30), (1, 1, 36, 44), (5, 7, 30, 11)]
    x = torch.rand(len(boxes), 3, h, w, generator=_gen(5))  # noise: worst case for rounding
    p = _boxes_params(boxes, h, w)
    p.flip[:] = flip
    out = _unnormalise(BatchAugment(OFF, size).apply(x, p), OFF)
    for i, box in enumerate(boxes):
        ref = TF.resized_crop(x[i], *box, size=[size, size], antialias=False)
        if flip:
            ref = TF.horizontal_flip(ref)
        torch.testing.assert_close(out[i], ref, atol=TOL, rtol=0)


def test_flip_mixed_in_batch() -> None:
    x = _images(4, 20, 20)
    p = AugmentParams.identity(4, 20, 20)
    p.flip = torch.tensor([True, False, True, False])
    out = _unnormalise(BatchAugment(dataclasses.replace(OFF, flip_p=0.5), 20).apply(x, p), OFF)
    torch.testing.assert_close(out[0::2], x[0::2].flip(-1), atol=1e-6, rtol=0)
    torch.testing.assert_close(out[1::2], x[1::2], atol=1e-6, rtol=0)


JITTER_ONLY = dataclasses.replace(OFF, jitter_p=0.8)
_TV_OPS = {
    "brightness": TF.adjust_brightness,
    "contrast": TF.adjust_contrast,
    "saturation": TF.adjust_saturation,
    "hue": TF.adjust_hue,
}


@pytest.mark.parametrize(("name", "values"), [
    ("brightness", [0.0, 0.6, 1.0, 1.4, 2.5, 0.9]),
    ("contrast", [0.0, 0.6, 1.0, 1.4, 2.5, 0.9]),
    ("saturation", [0.0, 0.6, 1.0, 1.4, 2.5, 0.9]),
    ("hue", [-0.5, -0.1, 0.0, 0.1, 0.37, 0.5]),
])  # fmt: skip
def test_single_colour_op_matches_torchvision(name: str, values: list[float]) -> None:
    n = len(values)
    x = _images(n, 16, 16, seed=6)
    p = AugmentParams.identity(n, 16, 16)
    p.jitter[:] = True
    setattr(p, name, torch.tensor(values))
    p.order = torch.randperm(4, generator=_gen()).expand(n, 4).clone()
    out = _unnormalise(BatchAugment(JITTER_ONLY, 16).apply(x, p), OFF)
    for i, v in enumerate(values):
        torch.testing.assert_close(out[i], _TV_OPS[name](x[i], v), atol=TOL, rtol=0)


def test_jitter_random_order_matches_torchvision() -> None:
    n = 24
    aug = BatchAugment(JITTER_ONLY, 16)
    x = _images(n, 16, 16, seed=7)
    p = aug.sample_params(n, 16, 16, device="cpu", generator=_gen(7))
    crop = AugmentParams.identity(n, 16, 16)
    p.top, p.left, p.height, p.width = crop.top, crop.left, crop.height, crop.width
    assert p.order.unique(dim=0).shape[0] > 5 and not p.jitter.all() and p.jitter.any()
    out = _unnormalise(aug.apply(x, p), OFF)
    factors = {k: getattr(p, k) for k in _TV_OPS}
    names = list(_TV_OPS)
    for i in range(n):
        ref = x[i]
        if p.jitter[i]:
            for op in p.order[i].tolist():
                ref = _TV_OPS[names[op]](ref, factors[names[op]][i].item())
        torch.testing.assert_close(out[i], ref, atol=TOL, rtol=0)


def test_grayscale_matches_torchvision() -> None:
    x = _images(6, 16, 16, seed=8)
    p = AugmentParams.identity(6, 16, 16)
    p.grayscale = torch.tensor([True, False, True, True, False, True])
    out = _unnormalise(BatchAugment(dataclasses.replace(OFF, grayscale_p=0.2), 16).apply(x, p), OFF)
    for i in range(6):
        ref = TF.rgb_to_grayscale(x[i], num_output_channels=3) if p.grayscale[i] else x[i]
        torch.testing.assert_close(out[i], ref, atol=TOL, rtol=0)


@pytest.mark.parametrize(("size", "kernel"), [(32, 0), (64, 0), (20, 5)])
def test_blur_matches_torchvision(size: int, kernel: int) -> None:
    cfg = dataclasses.replace(OFF, blur_p=0.5, blur_kernel=kernel)
    aug = BatchAugment(cfg, size)
    k = aug.blur_kernel
    sigmas = [0.1, 0.5, 1.0, 1.7, 2.0, 1.3]
    x = _images(len(sigmas), size, size, seed=9)
    p = AugmentParams.identity(len(sigmas), size, size)
    p.blur = torch.tensor([True, True, True, True, True, False])
    p.sigma = torch.tensor(sigmas)
    out = _unnormalise(aug.apply(x, p), cfg)
    for i, s in enumerate(sigmas):
        ref = TF.gaussian_blur(x[i], [k, k], [s, s]) if p.blur[i] else x[i]
        torch.testing.assert_close(out[i], ref, atol=TOL, rtol=0)


def test_full_pipeline_matches_torchvision_composition() -> None:
    """Every op on, per-sample params: same as torchvision's functional ops in SimCLR order."""
    cfg = AugmentConfig(jitter_p=0.8, grayscale_p=0.5, blur_p=0.5)
    aug = BatchAugment(cfg, 24)
    x = _images(12, 30, 34, seed=10)
    p = aug.sample_params(12, 30, 34, device="cpu", generator=_gen(10))
    out = _unnormalise(aug.apply(x, p), cfg)
    names = list(_TV_OPS)
    for i in range(12):
        box = [int(p.top[i]), int(p.left[i]), int(p.height[i]), int(p.width[i])]
        ref = TF.resized_crop(x[i], *box, size=[24, 24], antialias=False)
        if p.flip[i]:
            ref = TF.horizontal_flip(ref)
        if p.jitter[i]:
            for op in p.order[i].tolist():
                ref = _TV_OPS[names[op]](ref, getattr(p, names[op])[i].item())
        if p.grayscale[i]:
            ref = TF.rgb_to_grayscale(ref, num_output_channels=3)
        if p.blur[i]:
            k = aug.blur_kernel
            ref = TF.gaussian_blur(ref, [k, k], [p.sigma[i].item()] * 2)
        torch.testing.assert_close(out[i], ref, atol=TOL, rtol=0)


def test_seeded_generator_is_deterministic() -> None:
    aug = BatchAugment(AugmentConfig(), 32)
    x = torch.randint(0, 256, (32, 3, 36, 36), dtype=torch.uint8, generator=_gen())
    a = aug(x, generator=_gen(11))
    b = aug(x, generator=_gen(11))
    c = aug(x, generator=_gen(12))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    # __call__ == sample_params + apply with the same stream.
    p = aug.sample_params(32, 36, 36, device="cpu", generator=_gen(11))
    assert torch.equal(aug.apply(x, p), a)


def test_uint8_and_float_inputs_agree() -> None:
    aug = BatchAugment(AugmentConfig(blur_p=0.5), 32)
    x = torch.randint(0, 256, (16, 3, 40, 40), dtype=torch.uint8, generator=_gen())
    p = aug.sample_params(16, 40, 40, device="cpu", generator=_gen(13))
    torch.testing.assert_close(aug.apply(x, p), aug.apply(x.float() / 255, p), atol=1e-6, rtol=0)
    # float64 input is accepted and computed in float32.
    out = aug.apply(x.double() / 255, p)
    assert out.dtype == torch.float32
    with pytest.raises(TypeError):
        aug.apply(x.to(torch.int32), p)


# --------------------------------------------------------------------------- config


def test_presets() -> None:
    assert set(AUGMENT_PRESETS) == {32, 64, 96}
    assert AUGMENT_PRESETS[32].blur_p == 0.0
    assert AUGMENT_PRESETS[64].blur_p == 0.5 and AUGMENT_PRESETS[96].blur_p == 0.5


def test_blur_kernel_size() -> None:
    cfg = AugmentConfig()
    assert [blur_kernel_size(cfg, s) for s in (16, 32, 64, 96, 224)] == [3, 3, 7, 9, 23]
    assert blur_kernel_size(dataclasses.replace(cfg, blur_kernel=5), 96) == 5
    with pytest.raises(ValueError):
        blur_kernel_size(dataclasses.replace(cfg, blur_kernel=4), 96)


@pytest.mark.parametrize("size", [32, 96])
def test_torchvision_transform(size: int) -> None:
    cfg = AUGMENT_PRESETS[size]
    tf = torchvision_transform(cfg, size)
    has_blur = any(isinstance(t, T.RandomApply) and isinstance(t.transforms[0], T.GaussianBlur)
                   for t in tf.transforms)  # fmt: skip
    assert has_blur == (cfg.blur_p > 0)
    torch.manual_seed(0)
    img = Image.fromarray(torch.randint(0, 256, (40, 50, 3), dtype=torch.uint8).numpy())
    out = tf(img)
    assert isinstance(out, torch.Tensor)
    assert out.shape == (3, size, size) and out.dtype == torch.float32
    x01 = _unnormalise(out[None], cfg)
    assert x01.min() >= -1e-5 and x01.max() <= 1 + 1e-5
