"""Device names, parsed in one place so that a name torch does not know is refused in one line."""

from __future__ import annotations

import torch

__all__ = ["parse_device", "missing_cuda", "missing_device"]


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


def missing_device(device: torch.device) -> str | None:
    """Why ``device`` cannot be used on this machine, as a phrase for an error message; None
    when it can. CUDA as :func:`missing_cuda` says; any other type but the CPU is tried with
    one small computation (``mps`` on a Mac passes, on Linux it does not)."""
    if device.type == "cuda":
        return missing_cuda(device)
    if device.type == "cpu":
        return None
    if device.type == "meta":
        return "meta tensors hold no data, so nothing can be computed on them"
    try:
        (torch.ones(2, device=device) + 1).sum().item()
    except Exception as e:  # NotImplementedError, AssertionError, RuntimeError, ImportError
        return f"this torch cannot compute on {device.type} ({type(e).__name__})"
    return None
