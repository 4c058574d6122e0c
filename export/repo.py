"""Export a training run as a model folder ready for the Hub (``carlzoo export``).

:func:`export_model` reads a run folder (or one checkpoint file) written by ``carlzoo train``
and writes a folder that :func:`carlzoo.pretrained.from_pretrained` loads::

    config.json            ZooConfig: architecture, preprocessing, provenance, metrics
    model.safetensors      the weights (float32, or float16 with BN statistics in float32)
    model.onnx             the same network for onnxruntime (unless onnx=False)
    README.md              the model card (carlzoo.export.card)
    training_config.json   the resolved training configuration
    metrics.json           the measured results and where they come from

Everything is written into a temporary folder next to ``out_dir`` and renamed into place at
the end, so a failed export (bad checkpoint, ONNX parity failure, ...) leaves nothing
behind (nor the missing folders above ``out_dir`` it made), and an existing ``out_dir`` is
replaced only with ``overwrite=True`` and only when it holds nothing but the files an export
writes (a folder of other files given by mistake is refused). Non-finite numbers in the
published JSON (a probe's NaN) are written as null. The temporary
folders of exports to the same name that were killed (their process no longer runs on this
host) are removed when the next export starts. ``out_dir`` may not be the source run, the
checkpoint's folder, a folder holding either, or the current folder or one of its parents.

Checks before the rename: the folder is loaded back with ``from_pretrained`` and must give
the checkpoint's outputs (float32: within 1e-6; float16: finite, the rounding error is
recorded),
and the ONNX graph must match PyTorch within ``parity_tol`` (default 1e-4 for float32 and
1e-2 for float16 weights, see ``carlzoo.export.onnx.PARITY_TOL``; scaled by the
output magnitude when it exceeds 1; see :func:`check_parity`) on random inputs and on real
images: a few test images of the run's dataset when it can be loaded, else images from
``examples/images`` when present.

The published training configuration keeps only the last component of ``data.root`` (a
local path). Only numbers measured on the exported checkpoint enter ``config.json``,
``metrics.json`` and the card: the kNN monitor result of the checkpoint's own epoch (its
record in the checkpoint, else in ``metrics.jsonl``) and the results in every
``RUN_DIR/eval*.json`` (written by ``carlzoo probe --out``, one result or a list of them)
whose ``model_epoch`` and ``model_step`` are the checkpoint's; the others are left out with
a warning (:attr:`ExportResult.warnings`), as is a result under the run's own dataset name
whose ``cross_domain`` is true (measured on other data than the run's training data, e.g.
another .npz file). Results with settings other than ``carlzoo probe``'s defaults (the kNN
monitor's ``knn_k`` and ``knn_t``, and its bank when smaller than the train split, included)
get their own metric key (``knn_k5_top1``, ``knn_bank50000_top1``,
``linear_projection_top1``); a probe result with the monitor's settings replaces the
monitor's, and two results with the same key and different values are refused.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import shutil
import socket
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from carlzoo.export.card import DATASET_TITLES, CardContext, Result, render_model_card
from carlzoo.export.onnx import (
    PARITY_TOL,
    check_opset,
    export_onnx,
    onnx_parity,
    parity_failure,
    parity_inputs,
)
from carlzoo.outputs import existing_ancestor
from carlzoo.registry import sha256_file

__all__ = [
    "ExportError",
    "ExportResult",
    "RunRecords",
    "export_model",
    "read_run_records",
    "read_evaluations",
    "read_evaluation_files",
    "select_evaluations",
    "detect_recipe",
    "real_parity_images",
    "check_parity",
    "EXAMPLE_IMAGES",
]

EXAMPLE_IMAGES = Path(__file__).resolve().parents[1] / "examples" / "images"
"""Fallback images for the parity check (present in a source checkout that has them)."""

_DTYPES = ("float32", "float16")
_EVAL_METRICS = ("top1", "top5", "acc", "purity", "nmi", "ari")
_HARDWARE_KEYS = ("hardware", "device_name", "gpu_name", "gpu")
_IGNORED_RECIPE_KEYS = {"data.root", "data.download"}
_FILES = {
    "config.json": "architecture, preprocessing, provenance and measured metrics (ZooConfig)",
    "model.safetensors": "the weights: backbone, projection head and prototypes",
    "model.onnx": "the same network for onnxruntime: input `images` (N, 3, S, S) float32, "
    "outputs `features`, `projection`, `logits`",
    "training_config.json": "the resolved training configuration of the run",
    "metrics.json": "the measured results, where each comes from, and the last epoch's record",
    "README.md": "this model card",
}


# `carlzoo probe`'s defaults (training/evaluate.py run_probe and DEFAULT_EPOCHS): a result
# measured with other settings gets them in its metric key, its name and its command.
_PROBE_DEFAULTS: dict[str, Any] = {
    "layer": "backbone",
    "k": 200,
    "t": 0.1,
    "seed": 0,
    "batch_size": 256,
    "weight_decay": 1e-4,
}
_DEFAULT_EPOCHS: dict[str, int] = {"semi1": 60, "semi10": 30, "finetune": 30}
_DISTINGUISHING: dict[str, tuple[str, ...]] = {  # the settings that change a protocol's number
    "knn": ("layer", "k", "t"),
    "linear": ("layer", "weight_decay"),  # and seed, when the weight decay was chosen
    "semi1": ("layer", "epochs", "seed", "batch_size"),
    "semi10": ("layer", "epochs", "seed", "batch_size"),
    "finetune": ("layer", "epochs", "seed", "batch_size"),
    "cluster": (),
}
_FLAGS = {
    "layer": "--layer",
    "k": "--k",
    "t": "--t",
    "epochs": "--epochs",
    "seed": "--seed",
    "batch_size": "--batch-size",
    "weight_decay": "--weight-decay",
}
_OUTPUT_NAMES = ("features", "projection", "logits")


class ExportError(ValueError):
    """An export that cannot be done; the message is one line and names the input."""


@dataclass(frozen=True)
class ExportResult:
    out_dir: Path
    files: dict[str, str]  # file name -> sha256
    metrics: dict[str, float]  # measured values (config.json "metrics")
    parity: dict[str, Any] | None  # {"random": {...}, "real": {...} | None}
    roundtrip_max_abs_diff: float  # reloaded folder vs the checkpoint's model
    warnings: tuple[str, ...] = ()  # one line each: results left out, stale folders removed


@dataclass(frozen=True)
class RunRecords:
    """What ``metrics.jsonl`` says about the epochs up to the exported checkpoint."""

    records: list[dict[str, Any]] = field(default_factory=list)  # one per epoch, in order
    train_time_s: float | None = None
    hardware: str | None = None
    knn: dict[str, Any] | None = None  # the checkpoint epoch's record, when it has knn_top1


def _one_line(e: BaseException | str) -> str:
    text = " ".join(str(e).split())
    return text or type(e).__name__


# ---- reading the run ---------------------------------------------------------------------


def _run_dir(source: Path, ckpt_path: Path) -> Path:
    if source.is_dir():
        return source
    return ckpt_path.parent.parent if ckpt_path.parent.name == "checkpoints" else ckpt_path.parent


def read_run_records(
    run_dir: str | Path, last_epoch: int, fallback: dict[str, Any] | None = None
) -> RunRecords:
    """Per-epoch records of ``run_dir/metrics.jsonl`` up to ``last_epoch`` (the last record
    of each epoch wins, so a resumed run counts each epoch once). Unreadable lines (a run
    killed mid-write) are skipped. ``fallback`` (the checkpoint's own record) is used when
    the file is missing.

    ``knn`` is the record of epoch ``last_epoch`` itself (the checkpoint's own record when
    ``fallback`` is that epoch's, else the file's) when it holds a kNN result, else None: a
    kNN result of another epoch was measured on other weights. ``train_time_s`` is the sum
    of the epoch times only when every epoch 1..``last_epoch`` has one, else None.
    """
    from carlzoo.training.run import read_metrics

    path = Path(run_dir) / "metrics.jsonl"
    records = read_metrics(path, last_epoch)
    own = fallback if fallback and fallback.get("epoch") == last_epoch else None
    if not path.is_file() and fallback and isinstance(fallback.get("epoch"), int):
        records = [fallback]
    timed = {
        r["epoch"]: float(r["epoch_time_s"]) for r in records if _finite(r.get("epoch_time_s"))
    }
    complete = last_epoch >= 1 and set(timed) >= set(range(1, last_epoch + 1))
    hardware = None
    for rec in reversed(records):
        for key in _HARDWARE_KEYS:
            if isinstance(rec.get(key), str) and rec[key]:
                hardware = rec[key]
                break
        if hardware:
            break
    if own is None:
        own = next((r for r in records if r.get("epoch") == last_epoch), None)
    knn = own if own is not None and _finite(own.get("knn_top1")) else None
    train_time = float(sum(timed[e] for e in range(1, last_epoch + 1))) if complete else None
    return RunRecords(records, train_time, hardware, knn)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def read_evaluation_files(run_dir: str | Path) -> list[tuple[Path, dict[str, Any]]]:
    """(file, result) for the results in every ``run_dir/eval*.json`` (each one object or a
    list; ``eval.json`` first, then by name); [] when there is none."""
    paths = sorted(
        (p for p in Path(run_dir).glob("eval*.json") if p.is_file()),
        key=lambda p: (p.name != "eval.json", p.name),
    )
    out: list[tuple[Path, dict[str, Any]]] = []
    for path in paths:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise ExportError(
                f"{path} is not valid JSON ({_one_line(e)}); fix or remove it "
                "(it is written by `carlzoo probe --out`)"
            ) from None
        items = data if isinstance(data, list) else [data]
        if not all(
            isinstance(d, dict)
            and isinstance(d.get("protocol"), str)
            and isinstance(d.get("dataset"), str)
            for d in items
        ):
            raise ExportError(
                f"{path}: expected a `carlzoo probe --out` result (an object with "
                "protocol, dataset, top1, ...) or a list of them"
            )
        out += [(path, d) for d in items]
    return out


def read_evaluations(run_dir: str | Path) -> list[dict[str, Any]]:
    """The results in every ``run_dir/eval*.json`` (see :func:`read_evaluation_files`)."""
    return [ev for _, ev in read_evaluation_files(run_dir)]


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def select_evaluations(
    items: Sequence[tuple[Path, dict[str, Any]]],
    epoch: int,
    step: int,
    model: str = "RUN_DIR",
    dataset: str | None = None,
) -> tuple[list[tuple[Path, dict[str, Any]]], list[str]]:
    """(the results measured on the checkpoint of ``epoch`` and ``step``, one warning line
    for each other result): a result names the checkpoint it measured in ``model_epoch`` and
    ``model_step``; one without them was measured on an unknown checkpoint.

    ``dataset``: the run's dataset (None: not checked). A result on it whose ``cross_domain``
    is true (``carlzoo probe`` on other data than the run's training data, e.g. another .npz
    file) is left out too: it is not the model's metric on its training dataset.
    """
    kept: list[tuple[Path, dict[str, Any]]] = []
    warnings: list[str] = []
    for path, ev in items:
        e, s = ev.get("model_epoch"), ev.get("model_step")
        what = f"{path}: left out its {ev['protocol']} result on {ev['dataset']}"
        again = f"measure it again with `{_probe_command(model, ev, _settings_of(ev))}`"
        if ev.get("cross_domain") is True and ev["dataset"] == dataset:
            warnings.append(
                f"{what}: it was measured on other data than the run's training data under the "
                f"same dataset name (cross_domain is true), so it cannot be published as the "
                f"model's metric on {dataset}"
            )
        elif not (_int(e) and _int(s)):
            warnings.append(
                f"{what}: it records no model_epoch/model_step, so it was measured on an "
                f"unknown checkpoint; {again}"
            )
        elif (e, s) != (epoch, step):
            warnings.append(
                f"{what}: it was measured on the checkpoint of epoch {e} (step {s}), not on "
                f"the exported one (epoch {epoch}, step {step}); {again}"
            )
        else:
            kept.append((path, ev))
    return kept, warnings


def _settings_of(ev: dict[str, Any]) -> dict[str, Any]:
    """The settings of ``ev`` that change its number and differ from `carlzoo probe`'s
    defaults, in a fixed order (empty for default settings)."""
    protocol = ev["protocol"]
    settings = dict(ev["settings"]) if isinstance(ev.get("settings"), dict) else {}
    keys = _DISTINGUISHING.get(protocol, ("layer",))
    if protocol == "linear" and isinstance(settings.get("weight_decay_selection"), dict):
        # `--weight-decay auto`: chosen on held-out training rows that the seed draws
        settings["weight_decay"] = "auto"
        keys = (*keys, "seed")
    out: dict[str, Any] = {}
    for key in keys:
        if key not in settings:
            continue
        default = _DEFAULT_EPOCHS.get(protocol) if key == "epochs" else _PROBE_DEFAULTS[key]
        if settings[key] != default:
            out[key] = settings[key]
    return out


def _setting_parts(settings: dict[str, Any]) -> list[str]:
    """``{"layer": "projection", "k": 5}`` -> ``["projection", "k5"]`` (metric keys, files)."""
    parts = []
    for key, v in settings.items():
        text = f"{v:g}" if isinstance(v, float) else str(v)
        prefix = {"layer": "", "batch_size": "bs", "epochs": "ep", "weight_decay": "wd"}.get(
            key, key
        )
        parts.append(re.sub(r"[^A-Za-z0-9.+-]", "_", prefix + text))
    return parts


def _eval_file(protocol: str, dataset: str, settings: dict[str, Any]) -> str:
    """The file `carlzoo probe --out` should write a result to: ``eval-knn-cifar10.json``."""
    return "-".join(["eval", protocol, dataset, *_setting_parts(settings)]) + ".json"


def _probe_command(model: str, ev: dict[str, Any], settings: dict[str, Any]) -> str:
    """The `carlzoo probe` command that measures ``ev`` again, with its non-default settings."""
    protocol, ds = ev["protocol"], ev["dataset"]
    flags = "".join(
        f" {_FLAGS[k]} {f'{v:g}' if isinstance(v, float) else v}" for k, v in settings.items()
    )
    all_settings = ev.get("settings") if isinstance(ev.get("settings"), dict) else {}
    if all_settings.get("resize") is True:
        flags += " --resize"
    return (
        f"carlzoo probe --model {model} --dataset {ds} --data-root DATA --protocol {protocol}"
        f"{flags} --out RUN_DIR/{_eval_file(protocol, ds, settings)}"
    )


def _probe_model(run_dir: Path, ckpt_path: Path) -> str:
    """How the card's `carlzoo probe --model` names the exported checkpoint."""
    if ckpt_path.parent.name == "checkpoints" and ckpt_path.parent.parent == run_dir:
        if ckpt_path.name == "last.safetensors":
            return "RUN_DIR"
        return f"RUN_DIR/checkpoints/{ckpt_path.name}"
    return f"RUN_DIR/{ckpt_path.name}"


def _portable_evaluation(ev: dict[str, Any]) -> dict[str, Any]:
    """A probe result as published: the probed run or folder is this model, not a local path."""
    model = ev.get("model")
    if not isinstance(model, str):
        return ev
    if ev.get("model_source") == "run":  # eval.json of a run holds that run's results
        return {**ev, "model": "this model"}
    if Path(model).expanduser().exists():  # a local model folder: its name only
        return {**ev, "model": Path(model).name}
    return ev


def detect_recipe(cfg: Any) -> tuple[str | None, dict[str, Any]]:
    """(``training/configs/<recipe>.yaml``, changed keys): of the recipes for the run's dataset
    (``cifar10.yaml``, ``cifar10_fast.yaml``, ...), the one the run changes least."""
    from carlzoo.training.config import (
        PRESETS,
        config_to_dict,
        flat_config,
        load_config,
        preset_path,
    )

    dataset = cfg.data.dataset
    if dataset not in PRESETS:
        return None, {}
    ours = flat_config(config_to_dict(cfg))
    best: tuple[str, dict[str, Any]] | None = None
    for path in sorted(preset_path(dataset).parent.glob(f"{dataset}*.yaml")):
        recipe = load_config(path)
        if recipe.data.dataset != dataset:  # cifar100.yaml next to cifar10.yaml
            continue
        base = flat_config(config_to_dict(recipe))
        changes = {
            k: v for k, v in ours.items() if base.get(k) != v and k not in _IGNORED_RECIPE_KEYS
        }
        if best is None or len(changes) < len(best[1]):
            best = (f"training/configs/{path.name}", changes)
    return best if best is not None else (None, {})


def _train_command(recipe: str | None, changes: dict[str, Any]) -> str:
    if recipe is None:  # training_config.json is JSON, hence YAML: it is a complete recipe
        return "carlzoo train --config training_config.json --data-root DATA --out RUN_DIR"
    sets = " ".join(f"--set {k}={_cli_value(v)}" for k, v in changes.items())
    preset = Path(recipe).stem
    return f"carlzoo train --config {preset} --data-root DATA --out RUN_DIR {sets}".rstrip()


def _cli_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_cli_value(x) for x in v) + "]"
    return str(v)


def _results(
    cfg: Any,
    records: RunRecords,
    evaluations: Sequence[tuple[Path, dict[str, Any]]],
    command: str,
    model: str = "RUN_DIR",
) -> list[Result]:
    """Measured results (probe results first) and "not measured" rows for the basic ones.

    ``evaluations``: (file, result) measured on the exported checkpoint. Two results with
    the same metric key (protocol, dataset and distinguishing settings) and different
    values are an ExportError; the same value twice is listed once.
    """
    dataset = cfg.data.dataset
    out: list[Result] = []
    seen: dict[str, tuple[Path, float]] = {}
    for path, ev in evaluations:
        protocol, ds = ev["protocol"], ev["dataset"]
        settings = ev.get("settings") if isinstance(ev.get("settings"), dict) else {}
        distinct = _settings_of(ev)
        shown = dict.fromkeys([*(k for k in ("k", "t", "layer") if k in settings), *distinct])
        detail = ", ".join(f"{k}={settings.get(k, distinct.get(k))}" for k in shown)
        source = f"`carlzoo probe --protocol {protocol}`" + (f" ({detail})" if detail else "")
        cmd = _probe_command(model, ev, distinct)
        if isinstance(ev.get("command"), str):  # measured by a script, not `carlzoo probe`
            words = ev["command"].split()
            script = next((w for w in words if w.endswith(".py")), words[0] if words else "")
            source, cmd = f"`{script}` ({protocol})", ev["command"]
        for metric in _EVAL_METRICS:
            if not _finite(ev.get(metric)):
                continue
            r = Result(protocol, metric, ds, float(ev[metric]), "test", source, cmd, distinct)
            key = _metric_key(r, dataset)
            if key in seen:
                first, value = seen[key]
                if value == r.value:
                    continue
                raise ExportError(
                    f"{first} and {path} hold two different {r.label} results on {ds} for "
                    f"this checkpoint ({value:g} and {r.value:g}, metric {key}); remove the "
                    "one that should not be published"
                )
            seen[key] = (path, float(ev[metric]))
            out.append(r)
    # The monitor ran on the backbone features with the run's k and t: other values than
    # `carlzoo probe`'s give it their own key, as does a bank of knn_max_train images drawn
    # from a larger train split (`knn_bank` in its record; the probe uses the whole split).
    # A probe result with the same settings (the same key) replaces it.
    monitor = _settings_of(
        {"protocol": "knn", "settings": {"layer": "backbone", "k": cfg.knn_k, "t": cfg.knn_t}}
    )
    bank = records.knn.get("knn_bank") if records.knn is not None else None
    if _int(bank):
        monitor["bank"] = int(bank)
    probed_knn = any(
        r.protocol == "knn" and r.dataset == dataset and r.settings == monitor for r in out
    )
    if records.knn is not None and not probed_knn:
        rec = records.knn
        source = (
            f"kNN monitor of `carlzoo train` at epoch {rec['epoch']} (k={cfg.knn_k}, "
            f"t={cfg.knn_t}, at most {cfg.knn_max_train} training images)"
        )
        for metric in ("top1", "top5"):
            if _finite(rec.get(f"knn_{metric}")):
                value = float(rec[f"knn_{metric}"])
                out.append(Result("knn", metric, dataset, value, "test", source, command, monitor))
    for protocol in ("knn", "linear"):
        if not any(
            r.protocol == protocol and r.dataset == dataset and r.metric == "top1" for r in out
        ):
            out.append(Result(protocol, "top1", dataset, None))
    return out


def _metric_key(r: Result, dataset: str) -> str:
    """``knn_top1``; ``knn_k5_top1`` or ``linear_projection_top1`` for other settings than
    `carlzoo probe`'s defaults; ``cifar100_linear_top1`` on another dataset than the run's."""
    key = "_".join([r.protocol, *_setting_parts(r.settings), r.metric])
    return key if r.dataset == dataset else f"{r.dataset}_{key}"


# ---- parity ------------------------------------------------------------------------------


def real_parity_images(cfg: Any, preprocessing: Any, n: int = 8) -> tuple[Tensor, str] | None:
    """(normalised images, where they come from): test images of the run's dataset, else
    ``examples/images``; None when neither is available."""
    from PIL import Image

    transform = preprocessing.make_transform()
    d = cfg.data
    try:
        from carlzoo.training.datasets import FOLDER_DATASETS, load_split

        size = d.image_size if d.dataset in FOLDER_DATASETS else None
        split = load_split(d.dataset, d.root, "test", image_size=size)
        if len(split):
            arrays = split.images[:n]
            x = torch.stack([transform(Image.fromarray(np.asarray(a))) for a in arrays])
            return x, f"{len(arrays)} images of the {d.dataset} test split"
    except Exception:  # the dataset is elsewhere now or unreadable: use the fallback
        pass
    if EXAMPLE_IMAGES.is_dir():
        from carlzoo.images import BadImage, find_images, read_image

        tensors = []
        for path, _ in find_images(EXAMPLE_IMAGES)[:n]:
            try:
                tensors.append(transform(read_image(path)))
            except BadImage:
                continue
        if tensors:
            return torch.stack(tensors), f"{len(tensors)} bundled example images"
    return None


def check_parity(
    model: Any,
    onnx_path: str | Path,
    random_inputs: Tensor,
    real: tuple[Tensor, str] | None,
    tol: float = 1e-4,
) -> dict[str, Any]:
    """ONNX vs PyTorch on random and real inputs; ExportError when they differ.

    The verdict is :func:`carlzoo.export.onnx.parity_failure` with limit ``tol``.
    """
    out: dict[str, Any] = {"tol": tol, "real": None}
    checks = [("random", random_inputs, f"{len(random_inputs)} random N(0, 1) inputs")]
    if real is not None:
        checks.append(("real", real[0], real[1]))
    for key, x, source in checks:
        res = onnx_parity(model, onnx_path, x)
        out[key] = {**res, "source": source, "n": int(len(x))}
        failure = parity_failure(res, tol)
        if failure:
            raise ExportError(
                f"ONNX parity check failed on {source}: {failure}; the ONNX graph does not "
                "reproduce the model, so nothing was written (retry with another --opset, "
                "or --no-onnx)"
            )
    return out


# ---- export ------------------------------------------------------------------------------


def _json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float (a probe's NaN, say) as None: JSON has no NaN."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _write_json(path: Path, obj: Any) -> None:
    text = json.dumps(_json_safe(obj), indent=2, allow_nan=False)
    path.write_text(text + "\n", encoding="utf-8")


@torch.inference_mode()
def _outputs(model: Any, x: Tensor) -> tuple[Tensor, ...]:
    model.eval()
    return tuple(t.float() for t in model(x))


def export_model(
    source: str | Path,
    out_dir: str | Path,
    *,
    onnx: bool = True,
    opset: int | None = None,
    dtype: str = "float32",
    overwrite: bool = False,
    name: str | None = None,
    parity_tol: float | None = None,
    real_images: Sequence[str | Path] | None = None,
) -> ExportResult:
    """Export the run folder or checkpoint ``source`` to the model folder ``out_dir``.

    ``real_images``: image files for the parity check instead of the run's dataset.
    Raises :class:`ExportError` (one line) on bad input or a failed check; nothing is
    written then.
    """
    from carlzoo import __version__
    from carlzoo.pretrained import Preprocessing, ZooConfig, from_pretrained, save_pretrained
    from carlzoo.registry import ZooError
    from carlzoo.training.checkpoint import CheckpointError
    from carlzoo.training.config import config_to_dict
    from carlzoo.training.run import find_checkpoint, load_run

    if dtype not in _DTYPES:
        raise ExportError(f"--dtype {dtype!r}: expected one of {', '.join(_DTYPES)}")
    used_opset = None
    if onnx:
        try:
            used_opset = check_opset(opset)
        except ValueError as e:
            raise ExportError(f"--{e}") from None  # "--opset 0 cannot be exported: ..."
    source, given_out = Path(source).expanduser(), Path(out_dir).expanduser()
    out_dir = given_out.resolve()  # "." / ".." / symlinks: the folder that would be replaced
    _check_not_current_folder(given_out, out_dir)
    try:
        ckpt_path = find_checkpoint(source)
    except CheckpointError as e:
        raise ExportError(_one_line(e)) from None
    run_dir = _run_dir(source, ckpt_path)
    _check_out_outside_run(given_out, out_dir, run_dir, ckpt_path)
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"--out {given_out} exists and is not a folder; choose another path")
    if out_dir.exists() and not overwrite:
        raise ExportError(
            f"--out {given_out} already exists; pass --overwrite to replace it or "
            "choose another folder"
        )
    if out_dir.exists():
        _check_replaceable(given_out, out_dir)
    parent = existing_ancestor(out_dir.parent)  # missing folders above --out are made
    if not parent.is_dir():
        raise ExportError(
            f"--out {given_out}: {parent} is a file, not a folder; choose another path"
        )
    try:
        model, cfg, ckpt = load_run(source)
    except CheckpointError as e:
        raise ExportError(_one_line(e)) from None
    records = read_run_records(run_dir, ckpt.epoch, ckpt.metrics)
    probe_model = _probe_model(run_dir, ckpt_path)
    found = read_evaluation_files(run_dir)
    kept, warnings = select_evaluations(
        found, int(ckpt.epoch), int(ckpt.step), probe_model, cfg.data.dataset
    )
    kept = [(path, _portable_evaluation(ev)) for path, ev in kept]
    evaluations = [ev for _, ev in kept]
    recipe, changes = detect_recipe(cfg)
    command = _train_command(recipe, changes)
    results = _results(cfg, records, kept, command, probe_model)
    dataset = cfg.data.dataset
    metrics = {
        _metric_key(r, dataset): round(float(r.value), 6)
        for r in results
        if r.measured and r.value is not None
    }
    size = int(cfg.data.image_size)
    try:
        pre = Preprocessing(
            input_size=size,
            resize_size=size,
            interpolation="bicubic",
            mean=tuple(cfg.augment.mean),
            std=tuple(cfg.augment.std),
        )
    except ValueError as e:
        raise ExportError(
            f"{ckpt_path}: unusable preprocessing in its config: {_one_line(e)}"
        ) from None
    train_cfg = config_to_dict(cfg)
    if train_cfg["data"].get("root"):  # a local path: publish only its last component
        train_cfg["data"]["root"] = Path(str(train_cfg["data"]["root"])).name
    provenance: dict[str, Any] = {
        "dataset": dataset,
        "dataset_title": DATASET_TITLES.get(dataset, dataset),
        "epochs": int(ckpt.epoch),
        "epochs_planned": int(cfg.epochs),
        "steps": int(ckpt.step),
        "checkpoint": ckpt_path.name,
        "recipe": recipe,
        "recipe_changes": changes,
        "train_time_s": records.train_time_s,
        "hardware": records.hardware,
        "code_version": __version__,
        "training_config": train_cfg,
        "onnx_opset": None,
    }
    model_name = name or out_dir.name
    zoo_cfg = ZooConfig(
        architecture=cfg.model,
        preprocessing=pre,
        name=model_name,
        provenance=provenance,
        metrics=metrics,
    )

    made = [d for d in (out_dir.parent, *out_dir.parent.parents) if not d.exists()]
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        _remove_empty(made)
        raise ExportError(
            f"--out {given_out}: cannot create {out_dir.parent} ({e.strerror or e}); choose "
            "another path"
        ) from None
    warnings += _remove_stale_staging(out_dir)
    staging = out_dir.parent / (
        f".{out_dir.name}.export-{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    )
    folder = staging / out_dir.name
    random_x = parity_inputs(size)
    done = False
    try:
        staging.mkdir()
        save_pretrained(model, folder, zoo_cfg, dtype=dtype)
        try:
            reloaded = from_pretrained(folder, backend="torch")
        except ZooError as e:
            raise ExportError(f"the exported folder does not load back: {_one_line(e)}") from None
        ref, got = _outputs(model, random_x), _outputs(reloaded, random_x)
        _check_finite(ref, got, reloaded, ckpt_path, dtype)
        roundtrip = max(float((a - b).abs().max()) for a, b in zip(ref, got, strict=True))
        if dtype == "float32" and roundtrip > 1e-6:
            raise ExportError(
                f"the exported weights do not reproduce {ckpt_path}: max abs diff {roundtrip:.3g}"
            )
        parity = None
        if onnx:
            if real_images is not None:
                from carlzoo.images import read_image

                tf = pre.make_transform()
                real = (
                    torch.stack([tf(read_image(p)) for p in real_images]),
                    f"{len(real_images)} given images",
                )
            else:
                real = real_parity_images(cfg, pre)
            try:
                export_onnx(
                    reloaded, folder / "model.onnx", input_size=size, opset=used_opset, dtype=dtype
                )
            except Exception as e:  # torch.onnx raises many types; name it in one line
                raise ExportError(
                    f"ONNX export (opset {used_opset}) failed: "
                    f"{type(e).__name__}: {_one_line(e)[:300]}"
                ) from None
            try:
                tol = PARITY_TOL[dtype] if parity_tol is None else parity_tol
                parity = check_parity(reloaded, folder / "model.onnx", random_x, real, tol)
            except ExportError:
                raise
            except Exception as e:  # onnxruntime cannot run the file
                raise ExportError(
                    f"ONNX parity check could not run: {type(e).__name__}: {_one_line(e)[:300]}"
                ) from None
            provenance["onnx_opset"] = used_opset
        # config.json also records the export checks (the weights are unchanged)
        extra: dict[str, Any] = {"onnx_opset": provenance["onnx_opset"]}
        if parity is not None:
            extra["onnx_parity"] = parity
        if dtype == "float16":
            extra["float16_max_abs_diff"] = roundtrip
        cfg_path = folder / "config.json"
        cfg_dict = json.loads(cfg_path.read_text(encoding="utf-8"))
        cfg_dict["provenance"].update(extra)
        _write_json(cfg_path, cfg_dict)
        _write_json(folder / "training_config.json", train_cfg)
        _write_json(
            folder / "metrics.json",
            {
                "measured": metrics,
                "results": [asdict(r) for r in results],
                "knn_monitor": records.knn,
                "evaluations": evaluations,
                "last_epoch": records.records[-1] if records.records else ckpt.metrics,
                "float16_max_abs_diff": roundtrip if dtype == "float16" else None,
            },
        )
        present = sorted(p.name for p in folder.iterdir() if p.is_file()) + ["README.md"]
        files = {
            f: _FILES.get(f, "written by carlzoo.pretrained.save_pretrained")
            for f in dict.fromkeys(present)
        }
        ctx = CardContext(
            name=model_name,
            dataset=dataset,
            architecture=cfg.model.to_dict(),
            num_features=int(model.num_features),
            preprocessing=pre.to_dict(),
            training=train_cfg,
            epochs_completed=int(ckpt.epoch),
            steps=int(ckpt.step),
            results=results,
            files=files,
            weights_dtype=dtype,
            train_time_s=records.train_time_s,
            hardware=records.hardware,
            recipe=recipe,
            recipe_changes=changes,
            parity=parity,
            onnx_opset=provenance["onnx_opset"],
            carlzoo_version=__version__,
            probe_model=probe_model,
        )
        (folder / "README.md").write_text(render_model_card(ctx), encoding="utf-8")
        hashes = {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file()}
        _replace_dir(folder, out_dir, overwrite)
        done = True
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if not done:  # nor the folders above --out this export made
            _remove_empty(made)
    return ExportResult(given_out, hashes, metrics, parity, roundtrip, tuple(warnings))


def _check_replaceable(given: Path, out_dir: Path) -> None:
    """Refuse to replace an ``out_dir`` that holds more than an exported model folder does
    (``--overwrite`` must not delete a folder of other files given by mistake)."""
    other = sorted(p.name for p in out_dir.iterdir() if p.name not in _FILES)
    if other:
        shown = ", ".join(other[:3]) + (f" and {len(other) - 3} more" if len(other) > 3 else "")
        raise ExportError(
            f"--out {given} holds {shown}, which no model export writes; --overwrite replaces "
            "only a model folder: choose another folder, or move those out first"
        )


def _remove_empty(folders: list[Path]) -> None:
    """Remove ``folders`` (deepest first) that are still empty."""
    for d in folders:
        try:
            d.rmdir()
        except OSError:
            return


def _check_not_current_folder(given: Path, out_dir: Path) -> None:
    """Refuse an ``out_dir`` (resolved) that is the current folder or one of its parents."""
    try:
        cwd = Path.cwd().resolve()
    except OSError:  # the current folder was removed: nothing to protect
        return
    if out_dir == cwd or out_dir in cwd.parents:
        what = "the current folder" if out_dir == cwd else "a parent of the current folder"
        raise ExportError(
            f"--out {given} is {what} ({out_dir}); the export replaces --out, so choose a new "
            "folder for the model, e.g. --out models/NAME"
        )


def _check_out_outside_run(given: Path, out_dir: Path, run_dir: Path, ckpt_path: Path) -> None:
    """Refuse an ``out_dir`` (resolved) that is, or holds, the run or the checkpoint's folder:
    replacing it would delete what is being exported."""
    protected = {
        run_dir.resolve(): "the source run folder",
        ckpt_path.resolve().parent: "the checkpoint's folder",
    }
    for folder, what in protected.items():
        if out_dir == folder or out_dir in folder.parents:
            how = "is" if out_dir == folder else "contains"
            raise ExportError(
                f"--out {given} {how} {what} {folder}; the export replaces --out, so choose a "
                "folder outside the run, e.g. --out models/NAME"
            )


def _check_finite(
    ref: tuple[Tensor, ...], got: tuple[Tensor, ...], reloaded: Any, ckpt_path: Path, dtype: str
) -> None:
    """ExportError when the checkpoint or the exported (e.g. float16) weights give NaN/inf."""
    bad = [n for n, t in zip(_OUTPUT_NAMES, ref, strict=False) if not bool(t.isfinite().all())]
    if bad:
        raise ExportError(
            f"{ckpt_path} gives non-finite {'/'.join(bad)} on random inputs (a diverged "
            "run?); export a checkpoint from before it diverged"
        )
    bad = [n for n, t in zip(_OUTPUT_NAMES, got, strict=False) if not bool(t.isfinite().all())]
    if not bad:
        return
    params = [
        name
        for name, t in reloaded.state_dict().items()
        if t.is_floating_point() and not bool(t.isfinite().all())
    ]
    where = ""
    if params:
        more = f" and {len(params) - 1} more" if len(params) > 1 else ""
        where = f" ({params[0]}{more} beyond the {dtype} range)"
    raise ExportError(
        f"--dtype {dtype}: the exported weights give non-finite {'/'.join(bad)} on random "
        f"inputs{where}; nothing was written: export with --dtype float32"
    )


def _host() -> str:
    """This host's name as it may appear in a file name."""
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())[:64] or "host"


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid > 0  # another user's process (or an impossible pid: not ours to judge)
    return True


def _remove_stale_staging(out_dir: Path) -> list[str]:
    """Remove the staging folders of killed exports to ``out_dir`` (same name, this host,
    process not running); one line for each removed folder."""
    pattern = re.compile(
        rf"\.{re.escape(out_dir.name)}\.export-(?:(?P<host>.+)-)?(?P<pid>\d+)-[0-9a-f]{{8}}"
    )
    removed: list[str] = []
    try:
        candidates = list(out_dir.parent.glob(f".{glob.escape(out_dir.name)}.export-*"))
    except OSError:
        return removed
    for path in candidates:
        m = pattern.fullmatch(path.name)
        if m is None or not path.is_dir() or path.is_symlink():
            continue
        if m["host"] is not None and m["host"] != _host():
            continue  # another host's export on a shared folder: its process is not ours
        pid = int(m["pid"])
        if _pid_running(pid):
            continue
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            removed.append(
                f"removed {path}: the temporary folder of an export (pid {pid}) that was killed"
            )
    return removed


def _replace_dir(new: Path, target: Path, overwrite: bool) -> None:
    """Rename ``new`` onto ``target``; an existing ``target`` is moved aside first and
    removed only once the new folder is in place."""
    old = None
    if target.exists():
        if not overwrite:  # appeared while exporting
            raise ExportError(f"--out {target} appeared while exporting; pass --overwrite")
        old = new.parent / f"{target.name}.old"
        os.replace(target, old)
    try:
        os.replace(new, target)
    except OSError:
        if old is not None:
            os.replace(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
