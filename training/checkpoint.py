"""Training checkpoints as safetensors: no pickle anywhere, atomic writes.

One file holds the model weights (``model.*``), the optimiser state (``optim.*``
tensors, with param groups and scalars as JSON metadata), RNG state (``rng.*``) and the
epoch, step, config and metrics as JSON metadata.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from carlzoo.outputs import atomic_write_safetensors

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "read_checkpoint_meta",
    "split_optimizer_state",
    "join_optimizer_state",
]

FORMAT = "carlzoo-checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt or of another format."""


@dataclass
class Checkpoint:
    model: dict[str, Tensor]
    optimizer: dict[str, Any] | None = None
    epoch: int = 0  # epochs completed
    step: int = 0  # optimiser steps completed
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    rng: dict[str, Tensor] = field(default_factory=dict)


def split_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """An optimiser ``state_dict`` as (tensors, JSON-able rest)."""
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, Tensor):
                tensors[f"optim.state.{idx}.{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def join_optimizer_state(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        idx, key = name[len("optim.state.") :].split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    for idx, entry in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(entry)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(path: str | Path, ckpt: Checkpoint) -> None:
    """Write ``ckpt`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v for k, v in ckpt.model.items()}
    meta: dict[str, Any] = {
        "format": FORMAT,
        "epoch": ckpt.epoch,
        "step": ckpt.step,
        "config": ckpt.config,
        "metrics": ckpt.metrics,
    }
    if ckpt.optimizer is not None:
        opt_tensors, meta["optimizer"] = split_optimizer_state(ckpt.optimizer)
        tensors.update(opt_tensors)
    tensors.update({f"rng.{k}": v for k, v in ckpt.rng.items()})
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    # atomic_write also gives the file the usual umask mode: safetensors alone creates 0600.
    metadata = {"carlzoo": json.dumps(meta)}
    atomic_write_safetensors(path, tensors, metadata)


def read_checkpoint_meta(path: str | Path) -> dict[str, Any]:
    """The JSON metadata of a checkpoint (epoch, step, config, metrics, ...), read from the
    file's header without loading its tensors."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            raw_meta = (f.metadata() or {}).get("carlzoo")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"checkpoint {path} is not a readable safetensors file ({e})"
        ) from None
    return _parse_meta(path, raw_meta)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`."""
    path = Path(path)
    meta = read_checkpoint_meta(path)
    try:
        tensors = load_file(str(path), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"checkpoint {path} is not a readable safetensors file ({e})"
        ) from None
    model = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    rng = {k[4:]: v for k, v in tensors.items() if k.startswith("rng.")}
    optimizer = None
    if "optimizer" in meta:
        opt_tensors = {k: v for k, v in tensors.items() if k.startswith("optim.")}
        optimizer = join_optimizer_state(opt_tensors, meta["optimizer"])
    return Checkpoint(
        model=model,
        optimizer=optimizer,
        epoch=int(meta["epoch"]),
        step=int(meta["step"]),
        config=meta.get("config", {}),
        metrics=meta.get("metrics", {}),
        rng=rng,
    )


def _parse_meta(path: Path, raw_meta: str | None) -> dict[str, Any]:
    if raw_meta is None:
        raise CheckpointError(
            f"checkpoint {path} has no carlzoo metadata; expected a file written by `carlzoo train`"
        )
    try:
        meta = json.loads(raw_meta)
    except json.JSONDecodeError:
        raise CheckpointError(f"checkpoint {path} has corrupt metadata") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"checkpoint {path} has format {meta.get('format')!r}, expected {FORMAT!r}"
        )
    return meta
