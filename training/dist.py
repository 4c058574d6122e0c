"""A small opt-in layer over torch.distributed.

Every helper falls back to the single-process answer when no process group is
initialised, so the same training code runs on one CPU process and under torchrun.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from carlzoo.devices import missing_device, parse_device

__all__ = [
    "is_distributed",
    "rank",
    "local_rank",
    "world_size",
    "is_main_process",
    "all_reduce_sum",
    "all_reduce_min_max",
    "differentiable_all_reduce_sum",
    "init_from_env",
    "DEVICE_HINT",
    "resolve_device",
    "barrier",
    "destroy",
]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0)) if is_distributed() else 0


def is_main_process() -> bool:
    return rank() == 0


def all_reduce_sum(x: Tensor) -> Tensor:
    """Sum of ``x`` over all processes (no gradient); ``x`` itself with no process group."""
    if not is_distributed():
        return x
    x = x.clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def all_reduce_min_max(x: Tensor) -> tuple[Tensor, Tensor]:
    """Element-wise minimum and maximum of ``x`` over all processes: equal where they agree."""
    if not is_distributed():
        return x, x
    lo, hi = x.clone(), x.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    return lo, hi


def differentiable_all_reduce_sum(x: Tensor) -> Tensor:
    """Sum over processes whose backward sums the incoming gradients over processes too.

    With DDP averaging gradients over W processes, a loss computed from this global sum
    on every rank gets exactly the gradient of the single-process loss on the global
    batch: each rank receives W times its own share, and DDP divides by W.
    """
    if not is_distributed():
        return x
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(x, op=dist.ReduceOp.SUM)


DEVICE_HINT = "auto, cpu, cuda or cuda:N"  # the names resolve_device accepts


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` / None: this process's CUDA device when there is one, else the CPU.

    A bare ``"cuda"`` means this process's GPU (``LOCAL_RANK`` under torchrun).
    """
    name = "auto" if device is None else str(device)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank())
        return torch.device("cpu")
    resolved = parse_device(name, hint=DEVICE_HINT)
    why = missing_device(resolved)
    if why is not None:
        raise ValueError(
            f"device={name!r} asked for, but {why}; use the CPU (--set device=cpu when "
            "training, --device cpu elsewhere) or a GPU this machine has"
        )
    if resolved.type == "cuda" and resolved.index is None:
        resolved = torch.device("cuda", local_rank())
    return resolved


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def init_from_env(device_type: str) -> bool:
    """Initialise the default process group when launched by torchrun.

    Returns True when a process group is (now) initialised. nccl on CUDA, gloo on CPU.
    """
    if is_distributed():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "RANK" not in os.environ:
        return False
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
    return True


def destroy() -> None:
    if is_distributed():
        dist.destroy_process_group()
