"""Device names, parsed in one place so that a name torch does not know is refused in one line."""

from __future__ import annotations

import torch

__all__ = ["parse_device"]


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
