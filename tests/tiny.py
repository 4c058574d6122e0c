"""Small shared test inputs: the tiny network and the random ``.npz`` datasets tests train on."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from carlzoo.model import ModelConfig

TINY = ModelConfig(width=4, num_prototypes=10, proj_hidden_dim=32, proj_dim=16)
SIZE = 16

# `carlzoo train --set` overrides for a 16 px, width-4 run on the CPU with a 5-NN monitor.
TINY_TRAIN_SETS = (
    "model.width=4",
    "model.num_prototypes=10",
    "data.image_size=16",
    "optim.batch_size=16",
    "device=cpu",
    "knn_k=5",
)


def set_args(*overrides: str) -> list[str]:
    """``["--set", a, "--set", b, ...]`` for the command line."""
    return [arg for kv in overrides for arg in ("--set", kv)]


def random_npz(
    path: Path, n: int, *, size: int, classes: int, n_test: int, seed: int = 0
) -> Path:
    """An ``.npz`` dataset of ``n`` random uint8 images; the test split is the first ``n_test``."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    y = rng.integers(0, classes, n)
    np.savez(path, x_train=x, y_train=y, x_test=x[:n_test], y_test=y[:n_test])
    return path

# The files `carlzoo export` writes into a model folder.
MODEL_FILES = frozenset(
    {
        "README.md",
        "config.json",
        "metrics.json",
        "model.onnx",
        "model.safetensors",
        "training_config.json",
    }
)


def cli_error(result) -> str:
    """The one line a click command that failed on bad input printed (exit status 1)."""
    assert result.exit_code == 1, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]
