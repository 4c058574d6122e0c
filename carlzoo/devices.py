"""Device names, parsed in one place so that a name torch does not know is refused in one line."""

from __future__ import annotations

import torch

__all__ = ["parse_device", "missing_cuda"]


def parse_device(
    device: str | int | torch.device, *, hint: str = "cpu, cuda or cuda:N"
) -> torch.device:
    """``torch.device(device)``, raising ``ValueError`` that names the value and ``hint``
    (the names the caller accepts) for a name torch cannot parse, e.g. ``"gpu"``."""
    if isinstance(device, torch.device):
        return device
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={device!r} is not a device name; use {hint}") from None


def missing_cuda(device: torch.device) -> str | None:
    """Why the CUDA ``device`` cannot be used on this machine (no CUDA, or no GPU of that
    index), as a phrase for an error message; None when it can (or it is not CUDA)."""
    if device.type != "cuda":
        return None
    if not torch.cuda.is_available():
        return "CUDA is not available"
    n = torch.cuda.device_count()
    if device.index is not None and device.index >= n:
        names = "cuda:0" if n == 1 else f"cuda:0 to cuda:{n - 1}"
        return f"this machine has {n} CUDA device{'s' if n != 1 else ''} ({names})"
    return None
