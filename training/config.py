"""Training configuration: frozen dataclasses hold every default, YAML presets override
them, ``--set section.key=value`` overrides the YAML.

An unknown key is an error that lists the valid ones; the resolved config is saved in
the run folder as ``config.yaml``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from carlzoo.devices import parse_device
from carlzoo.model import ModelConfig
from carlzoo.outputs import atomic_write_text
from carlzoo.training.augment import AugmentConfig, blur_kernel_size
from carlzoo.training.bounds import (
    AT_LEAST_ONE,
    NON_NEGATIVE,
    POSITIVE,
    Bound,
    check_choices,
    check_fields,
)
from carlzoo.training.datasets import DATASETS
from carlzoo.training.dist import DEVICE_HINT

__all__ = [
    "DataConfig",
    "OptimConfig",
    "LossConfig",
    "TrainConfig",
    "ConfigError",
    "load_config",
    "apply_overrides",
    "config_to_dict",
    "flat_config",
    "config_from_dict",
    "save_config",
    "preset_path",
    "PRESETS",
    "preset_names",
]

PRESETS = ("cifar10", "cifar100", "stl10", "tinyimagenet", "imagenet64")
"""The datasets with a recipe of their own name; :func:`preset_names` lists every recipe."""
_CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def preset_names() -> list[str]:
    """Every bundled recipe a bare ``--config NAME`` finds (``cifar10``, ``cifar10_fast``, ...)."""
    return sorted(p.stem for p in _CONFIG_DIR.glob("*.yaml"))


class ConfigError(ValueError):
    """A config file, key or value that cannot be used."""


# Numeric ranges and string choices, checked in each dataclass's __post_init__ (model and
# augment: in theirs).
_DATA_BOUNDS: dict[str, Bound] = {
    "image_size": AT_LEAST_ONE,
    "device_budget_gb": NON_NEGATIVE,
    "workers": NON_NEGATIVE,
    "subset": NON_NEGATIVE,
}
_OPTIM_BOUNDS: dict[str, Bound] = {
    "batch_size": AT_LEAST_ONE,
    "lr": POSITIVE,
    "min_lr": NON_NEGATIVE,
    "warmup_epochs": NON_NEGATIVE,
    "momentum": Bound(0, 1, hi_open=True),
    "weight_decay": NON_NEGATIVE,
    "lars_eta": POSITIVE,
}
_LOSS_BOUNDS: dict[str, Bound] = {
    "kl_start": NON_NEGATIVE,
    "kl_end": NON_NEGATIVE,
    "kl_decay_epochs": NON_NEGATIVE,
}
_TRAIN_BOUNDS: dict[str, Bound] = {
    "epochs": AT_LEAST_ONE,
    "checkpoint_every": NON_NEGATIVE,
    "save_every": AT_LEAST_ONE,
    "log_every": AT_LEAST_ONE,
    "knn_every": NON_NEGATIVE,
    "knn_k": AT_LEAST_ONE,
    "knn_t": POSITIVE,
    "knn_max_train": AT_LEAST_ONE,
    "collapse_floor": NON_NEGATIVE,
    "collapse_patience": AT_LEAST_ONE,
    "seed": Bound(0, 2**63 - 1),  # torch.manual_seed's and numpy's range
}
_DATA_CHOICES = {"dataset": DATASETS, "pipeline": ("device", "dataloader")}
_OPTIM_CHOICES = {"optimizer": ("sgd", "lars", "adamw")}
_TRAIN_CHOICES = {"precision": ("bf16", "fp32")}


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "cifar10"
    root: str = ""
    download: bool = False
    image_size: int = 32  # training crop size
    pipeline: str = "device"  # "device": uint8 data + augmentation on the device; "dataloader"
    device_budget_gb: float = 8.0  # keep the training set on the accelerator up to this size
    workers: int = 8  # DataLoader worker processes for pipeline=dataloader
    subset: int = 0  # use only the first N training images (0: all); for smoke runs

    def __post_init__(self) -> None:
        check_choices(self, "data", _DATA_CHOICES)
        check_fields(self, "data", _DATA_BOUNDS)


@dataclass(frozen=True)
class OptimConfig:
    optimizer: str = "sgd"  # "sgd", "lars" or "adamw"
    batch_size: int = 256  # global batch (split over processes under torchrun)
    lr: float = 0.6  # peak learning rate at batch_size
    min_lr: float = 0.0006
    warmup_epochs: float = 0.0
    momentum: float = 0.9  # SGD / LARS momentum; AdamW's beta1
    weight_decay: float = 5e-4  # AdamW: decoupled (lr x weight_decay per step)
    lars_eta: float = 0.02  # trust coefficient for optimizer=lars

    def __post_init__(self) -> None:
        check_choices(self, "optim", _OPTIM_CHOICES)
        check_fields(self, "optim", _OPTIM_BOUNDS)
        if self.min_lr > self.lr:
            raise ValueError(
                f"optim.min_lr={self.min_lr:g} must not exceed optim.lr={self.lr:g} "
                "(the cosine schedule decays from lr to min_lr)"
            )


@dataclass(frozen=True)
class LossConfig:
    kl_start: float = 4.0  # b in eq. 8
    kl_end: float = 1.5  # a in eq. 8
    kl_decay_epochs: float = 100.0  # E in eq. 8

    def __post_init__(self) -> None:
        check_fields(self, "loss", _LOSS_BOUNDS)


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    epochs: int = 200
    seed: int = 0
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    precision: str = "bf16"  # "bf16" autocast on CUDA; "fp32" everywhere
    channels_last: bool = True
    compile: bool = False  # torch.compile the model
    compile_augment: bool = False  # torch.compile the device pipeline's augmentation
    sync_bn: bool = False  # SyncBatchNorm under torchrun
    checkpoint_every: int = 50  # keep epoch-N checkpoints every N epochs (0: only `last`)
    save_every: int = 1  # epochs between writes of checkpoints/last (the run's end always)
    log_every: int = 50  # steps between progress-bar metric reductions
    knn_every: int = 10  # epochs between kNN monitor evaluations (0: off)
    knn_k: int = 200
    knn_t: float = 0.1
    knn_max_train: int = 50000  # cap on the kNN memory bank size
    collapse_floor: float = 2.0  # effective number of prototypes below which we are collapsed
    collapse_patience: int = 3  # collapsed epochs in a row before training stops

    def __post_init__(self) -> None:
        check_choices(self, "", _TRAIN_CHOICES)
        if self.device != "auto":
            parse_device(self.device, hint=DEVICE_HINT)  # its availability is checked at start
        check_fields(self, "", _TRAIN_BOUNDS)
        if self.optim.warmup_epochs >= self.epochs:
            raise ValueError(
                f"optim.warmup_epochs={self.optim.warmup_epochs:g} must be shorter than "
                f"epochs={self.epochs} (the lr would never reach optim.lr); lower it, e.g. "
                f"--set optim.warmup_epochs={max(self.epochs // 10, 0)}"
            )
        kernel = blur_kernel_size(self.augment, self.data.image_size)
        if self.augment.blur_p > 0 and kernel // 2 >= self.data.image_size:
            raise ValueError(
                f"the blur kernel ({kernel} px, augment.blur_kernel) is too large for "
                f"data.image_size={self.data.image_size}; lower augment.blur_kernel or set "
                "augment.blur_p=0"
            )
        if self.compile_augment and self.data.pipeline != "device":
            raise ValueError(
                "compile_augment=true compiles the augmentation of data.pipeline=device; "
                f"data.pipeline={self.data.pipeline} augments with torchvision in worker "
                "processes: drop one of the two"
            )
        k = self.model.num_prototypes
        if 0 < self.collapse_floor and self.collapse_floor >= k:
            raise ValueError(
                f"collapse_floor={self.collapse_floor:g} must be below model.num_prototypes={k} "
                "(the effective number of prototypes never exceeds K); lower it, or 0 turns the "
                "check off"
            )


_DATACLASSES = (ModelConfig, DataConfig, AugmentConfig, OptimConfig, LossConfig, TrainConfig)


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML / command-line value to the field's declared type."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _build(tp, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} numbers, got {value!r}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args, strict=True))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-6 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
            else:
                if math.isfinite(number):  # the words nan / inf stay strings, as before
                    return number
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    types_ = _field_types(cls)
    unknown = sorted(set(values) - set(types_))
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]}; valid keys under "
            f"{prefix.rstrip('.') or 'the top level'}: {', '.join(sorted(types_))}"
        )
    kwargs = {name: _coerce(v, types_[name], prefix + name) for name, v in values.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from None


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) of a config dataclass."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def flat_config(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config dict (e.g. :func:`config_to_dict`'s) keyed by dotted paths, such as
    ``"optim.lr"``, in the nested order."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            out.update(flat_config(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def config_from_dict(values: dict[str, Any]) -> TrainConfig:
    return _build(TrainConfig, values)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. optim.lr=0.3")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(values: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict:
    """Apply ``section.key=value`` strings (values parsed as YAML) to a nested dict."""
    out = _merge({}, values)
    for item in overrides:
        path, value = _parse_override(item)
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part} is not a section")
        node[path[-1]] = value
    return out


def preset_path(name: str) -> Path:
    """Path of a bundled YAML preset (``cifar10``, ``stl10``, ...)."""
    path = _CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"no preset named {name!r}; presets: {', '.join(preset_names())}")
    return path


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), **updates: Any
) -> TrainConfig:
    """Defaults <- YAML file (or preset name) <- ``overrides`` <- keyword ``updates``.

    ``updates`` are nested dicts keyed like the YAML (``data={"root": "/data"}``).
    """
    values: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        # A bare name is a preset unless a file of that name exists: a run folder called
        # cifar10 (--out cifar10) must not hide the cifar10 recipe.
        if isinstance(path, str) and not p.suffix and p.name == path and not p.is_file():
            p = preset_path(path)
        elif not p.suffix and not p.exists():
            p = preset_path(str(path))
        if not p.is_file():
            what = "a folder, not a YAML file" if p.is_dir() else "not found"
            raise ConfigError(f"config file {p} {what}; presets: {', '.join(preset_names())}")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: expected a mapping at the top level")
        values = loaded
    values = apply_overrides(values, overrides)
    values = _merge(values, updates)
    return config_from_dict(values)


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically."""
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    atomic_write_text(path, text)
