"""Read a training run back: the model and config of a run folder or checkpoint file, and
its per-epoch log."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from carlzoo.model import CARLModel, build_model
from carlzoo.training.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from carlzoo.training.config import TrainConfig, config_from_dict

__all__ = ["find_checkpoint", "load_run", "read_metrics"]


def read_metrics(path: str | Path, last_epoch: int | None = None) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``, one per epoch, in epoch order, up to ``last_epoch``.

    The last line of an epoch wins, so a resumed run counts each epoch once; lines that are
    not a JSON record with an integer epoch (one cut short by a kill) are skipped. A missing
    file gives [].
    """
    path = Path(path)
    if not path.is_file():
        return []
    by_epoch: dict[int, dict[str, Any]] = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("epoch"), int):
            if 1 <= rec["epoch"] and (last_epoch is None or rec["epoch"] <= last_epoch):
                by_epoch[rec["epoch"]] = rec
    return [by_epoch[e] for e in sorted(by_epoch)]


def find_checkpoint(path: str | Path) -> Path:
    """``path`` itself if it is a file, else ``path/checkpoints/last.safetensors``."""
    path = Path(path)
    if path.is_file():
        return path
    candidate = path / "checkpoints" / "last.safetensors"
    if path.is_dir() and candidate.is_file():
        return candidate
    if path.is_dir():
        raise CheckpointError(
            f"{path} holds no checkpoint (expected {candidate}); train first "
            "with `carlzoo train --out` or pass a .safetensors checkpoint"
        )
    raise CheckpointError(f"{path} not found; expected a run folder or a checkpoint file")


def load_run(path: str | Path) -> tuple[CARLModel, TrainConfig, Checkpoint]:
    """The trained model (eval mode, CPU), its resolved config and the checkpoint record."""
    ckpt_path = find_checkpoint(path)
    ckpt = load_checkpoint(ckpt_path)
    try:
        cfg = config_from_dict(ckpt.config)
    except ValueError as e:
        raise CheckpointError(f"checkpoint {ckpt_path} carries an unusable config: {e}") from None
    model = build_model(cfg.model)
    try:
        model.load_state_dict(ckpt.model)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise CheckpointError(
            f"checkpoint {ckpt_path} does not match its config: {first}"
        ) from None
    return model.eval(), cfg, ckpt
