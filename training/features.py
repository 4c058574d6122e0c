"""Features of a frozen encoder over an array of uint8 images, batched, on any device."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from carlzoo.devices import parse_device
from carlzoo.images import resize_crop_box
from carlzoo.model import CARLModel

__all__ = ["normalize_uint8", "extract_features"]


def normalize_uint8(
    x: Tensor, mean: Sequence[float], std: Sequence[float], size: int | None = None
) -> Tensor:
    """(B, 3, H, W) uint8 -> normalised float32, at ``size`` x ``size`` when given.

    Images of another size are resized as carlzoo's models preprocess (``resize_crop``):
    the shorter side to ``size``, bicubic with antialiasing (torch's match of PIL's filter),
    rounded to 8 bits again as a PIL image is, then the centre crop.
    """
    x = x.float().div_(255.0)
    height, width = x.shape[-2:]
    if size is not None and (height, width) != (size, size):
        nh, nw, top, left = resize_crop_box(height, width, size, size)
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
        x = x.clamp_(0.0, 1.0).mul_(255.0).round_().div_(255.0)
        x = x[..., top : top + size, left : left + size]
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


@torch.no_grad()
def extract_features(
    model: CARLModel,
    images: np.ndarray | Tensor,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    size: int | None = None,
    batch_size: int = 512,
    layer: str = "backbone",
    device: torch.device | str | None = None,
    channels_last: bool = False,
    amp: bool = False,
) -> Tensor:
    """Features (N, F) float32 on the CPU of (N, H, W, 3) uint8 images.

    ``layer`` is "backbone" (the features probes use), "projection" (z) or "logits".
    The model is put in eval mode (and on ``device``, when given) for the call; its mode and
    device are restored afterwards.
    """
    if layer not in ("backbone", "projection", "logits"):
        raise ValueError(f"layer={layer!r}: expected backbone, projection or logits")
    was_device = next(model.parameters()).device
    device = parse_device(device) if device is not None else was_device
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    was_training = model.training
    model.eval().to(device)
    out = []
    try:
        for start in range(0, images.shape[0], batch_size):
            x = images[start : start + batch_size].to(device).permute(0, 3, 1, 2)  # (b, 3, H, W)
            x = normalize_uint8(x, mean, std, size)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(
                device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"
            ):
                feats = model.forward_features(x)
                if layer != "backbone":
                    feats = model.forward_head(feats)
                    if layer == "logits":
                        feats = model.prototype_logits(feats)
            out.append(feats.float().cpu())
    finally:
        model.train(was_training).to(was_device)
    if not out:
        cfg = model.model_config
        width = {"backbone": model.num_features, "projection": cfg.proj_dim,
                 "logits": cfg.num_prototypes}[layer]
        return torch.zeros(0, width)
    return torch.cat(out)
