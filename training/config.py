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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from carlzoo.model import ModelConfig
from carlzoo.outputs import atomic_write_text
from carlzoo.training.augment import AugmentConfig

__all__ = [
    "DataConfig",
    "OptimConfig",
    "LossConfig",
    "TrainConfig",
    "ConfigError",
    "load_config",
    "apply_overrides",
    "config_to_dict",
    "config_from_dict",
    "save_config",
    "preset_path",
    "PRESETS",
]

PRESETS = ("cifar10", "cifar100", "stl10", "tinyimagenet", "imagenet64")
_CONFIG_DIR = Path(__file__).resolve().parent / "configs"


class ConfigError(ValueError):
    """A config file, key or value that cannot be used."""


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "cifar10"
    root: str = ""
    download: bool = False
    image_size: int = 32  # training crop size
    pipeline: str = "device"  # "device": uint8 data + augmentation on the device; "dataloader"
    device_budget_gb: float = 8.0  # keep the training set on the accelerator up to this size
    workers: int = 8  # DataLoader workers for pipeline=dataloader and for the kNN monitor
    subset: int = 0  # use only the first N training images (0: all); for smoke runs


@dataclass(frozen=True)
class OptimConfig:
    optimizer: str = "sgd"  # "sgd" or "lars"
    batch_size: int = 256  # global batch (split over processes under torchrun)
    lr: float = 0.6  # peak learning rate at batch_size
    min_lr: float = 0.0006
    warmup_epochs: float = 0.0
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lars_eta: float = 0.02  # trust coefficient for optimizer=lars


@dataclass(frozen=True)
class LossConfig:
    kl_start: float = 4.0  # b in eq. 8
    kl_end: float = 1.5  # a in eq. 8
    kl_decay_epochs: float = 100.0  # E in eq. 8


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
    compile: bool = False
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
        if self.optim.min_lr > self.optim.lr:
            raise ValueError(
                f"optim.min_lr={self.optim.min_lr:g} must not exceed optim.lr={self.optim.lr:g} "
                "(the cosine schedule decays from lr to min_lr)"
            )
        if self.save_every < 1:
            raise ValueError(f"save_every must be >= 1, got {self.save_every}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.optim.warmup_epochs >= self.epochs:
            raise ValueError(
                f"optim.warmup_epochs={self.optim.warmup_epochs:g} must be shorter than "
                f"epochs={self.epochs} (the lr would never reach optim.lr); lower it, e.g. "
                f"--set optim.warmup_epochs={max(self.epochs // 10, 0)}"
            )


_DATACLASSES = (ModelConfig, DataConfig, AugmentConfig, OptimConfig, LossConfig, TrainConfig)
_CHOICES = {
    ("data", "pipeline"): ("device", "dataloader"),
    ("optim", "optimizer"): ("sgd", "lars"),
    ("", "precision"): ("bf16", "fp32"),
}


@dataclass(frozen=True)
class _Bound:
    """The interval a numeric config value (or each number of a list value) must lie in."""

    lo: float
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False

    def holds(self, value: float) -> bool:
        above = value > self.lo if self.lo_open else value >= self.lo
        below = value < self.hi if self.hi_open else value <= self.hi
        return above and below

    def __str__(self) -> str:
        if self.hi == math.inf:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        left, right = "(" if self.lo_open else "[", ")" if self.hi_open else "]"
        return f"in {left}{self.lo:g}, {self.hi:g}{right}"


_POSITIVE = _Bound(0, lo_open=True)
_NON_NEGATIVE = _Bound(0)
_AT_LEAST_ONE = _Bound(1)
_PROBABILITY = _Bound(0, 1)
# Checked when a config is loaded, so a bad value is refused before a run folder exists
# rather than failing (or silently misbehaving) mid-run. epochs, save_every and the model
# section check themselves in __post_init__.
_BOUNDS: dict[tuple[str, str], _Bound] = {
    ("data", "image_size"): _AT_LEAST_ONE,
    ("data", "device_budget_gb"): _NON_NEGATIVE,
    ("data", "workers"): _NON_NEGATIVE,
    ("data", "subset"): _NON_NEGATIVE,
    ("optim", "batch_size"): _AT_LEAST_ONE,
    ("optim", "lr"): _POSITIVE,
    ("optim", "min_lr"): _NON_NEGATIVE,
    ("optim", "warmup_epochs"): _NON_NEGATIVE,
    ("optim", "momentum"): _Bound(0, 1, hi_open=True),
    ("optim", "weight_decay"): _NON_NEGATIVE,
    ("optim", "lars_eta"): _POSITIVE,
    ("loss", "kl_start"): _NON_NEGATIVE,
    ("loss", "kl_end"): _NON_NEGATIVE,
    ("loss", "kl_decay_epochs"): _NON_NEGATIVE,
    ("augment", "crop_scale"): _POSITIVE,
    ("augment", "crop_ratio"): _POSITIVE,
    ("augment", "flip_p"): _PROBABILITY,
    ("augment", "jitter_p"): _PROBABILITY,
    ("augment", "brightness"): _NON_NEGATIVE,
    ("augment", "contrast"): _NON_NEGATIVE,
    ("augment", "saturation"): _NON_NEGATIVE,
    ("augment", "hue"): _Bound(0, 0.5),
    ("augment", "grayscale_p"): _PROBABILITY,
    ("augment", "blur_p"): _PROBABILITY,
    ("augment", "blur_sigma"): _POSITIVE,
    ("augment", "blur_kernel"): _NON_NEGATIVE,
    ("augment", "std"): _POSITIVE,
    ("", "checkpoint_every"): _NON_NEGATIVE,
    ("", "log_every"): _AT_LEAST_ONE,
    ("", "knn_every"): _NON_NEGATIVE,
    ("", "knn_k"): _AT_LEAST_ONE,
    ("", "knn_t"): _POSITIVE,
    ("", "knn_max_train"): _AT_LEAST_ONE,
    ("", "collapse_floor"): _NON_NEGATIVE,
    ("", "collapse_patience"): _AT_LEAST_ONE,
}
# (lo, hi) pairs that must be in order
_PAIRS = {("augment", "crop_scale"), ("augment", "crop_ratio"), ("augment", "blur_sigma")}


def _check_bounds(section: str, name: str, value: Any) -> None:
    key = f"{section}.{name}" if section else name
    bound = _BOUNDS.get((section, name))
    if bound is not None:
        numbers = value if isinstance(value, tuple) else (value,)
        if not all(bound.holds(v) for v in numbers):
            shown = list(value) if isinstance(value, tuple) else value
            each = "each number of " if isinstance(value, tuple) else ""
            raise ConfigError(f"{each}{key} must be {bound}, got {shown}")
    if (section, name) in _PAIRS and value[0] > value[1]:
        raise ConfigError(f"{key} must be [low, high] with low <= high, got {list(value)}")


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
    for (section, name), choices in _CHOICES.items():
        if prefix.rstrip(".") == section and name in kwargs and kwargs[name] not in choices:
            raise ConfigError(f"{prefix}{name}={kwargs[name]!r}: expected one of {list(choices)}")
    for name, value in kwargs.items():
        _check_bounds(prefix.rstrip("."), name, value)
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
        raise ConfigError(f"no preset named {name!r}; presets: {', '.join(PRESETS)}")
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
        if not p.suffix and not p.exists():
            p = preset_path(str(path))
        if not p.is_file():
            raise ConfigError(f"config file {p} not found; presets: {', '.join(PRESETS)}")
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
