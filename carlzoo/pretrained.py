"""Pretrained CARL models: the on-disk model folder, loading by name / folder / Hub, inference.

A model folder holds::

    config.json         {"format": "carlzoo/1", "name", "architecture", "preprocessing",
                         "provenance", "metrics"}
    model.safetensors   the CARLModel state dict (float32, or float16 with BN stats float32)
    model.onnx          optional: the same model for onnxruntime (see carlzoo.export.onnx)

:func:`save_pretrained` and :func:`from_pretrained` are exact inverses. Loading never
unpickles: weights come from safetensors or ONNX only.

:func:`load` takes a zoo name (see :mod:`carlzoo.registry`; a bundled copy inside the
package is used offline after a sha256 check, else the pinned Hub revision is downloaded
through huggingface_hub and every file is sha256-checked), a local folder, or
``hf-hub:org/repo[@revision]`` (downloaded, not hash-pinned; an LFS file is checked against
the sha256 its cached blob is named after). A Hub file that fails its check, a config.json
that is not JSON text, or weights that do not decode, are downloaded once more over
the cached blob and checked again: a plain download would re-link the corrupt blob. Offline,
the error names the blob to delete.

With ``backend="onnx"`` the folder must hold ``model.onnx``; when it does not, the error
says how to add one (``python -m carlzoo.export.onnx FOLDER``). One exception: a zoo model
bundled without ``model.onnx`` (the package ships float16 safetensors only, to stay small)
gets it exported from its sha256-checked weights on first use, checked against PyTorch, and
kept in the carlzoo cache (``$CARLZOO_CACHE``, else ``$XDG_CACHE_HOME/carlzoo``, else
``~/.cache/carlzoo``) under the hashes of its config and weights, with the export's own
sha256, which is checked on every load (a damaged export is made again). The model uses
the bundled, checked config.json.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from carlzoo import registry
from carlzoo.devices import missing_device, parse_device
from carlzoo.images import ImageTransform, read_image
from carlzoo.model import CARLModel, ModelConfig
from carlzoo.outputs import _umask, atomic_write_safetensors, atomic_write_text
from carlzoo.registry import ZooError

__all__ = [
    "FORMAT",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "ONNX_NAME",
    "ZooError",
    "Preprocessing",
    "ZooConfig",
    "Assignment",
    "PretrainedCARL",
    "OnnxCARL",
    "save_pretrained",
    "from_pretrained",
    "read_config",
    "load",
    "cache_root",
]

FORMAT = "carlzoo/1"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
ONNX_NAME = "model.onnx"
BACKENDS = ("torch", "onnx")
LAYERS = ("backbone", "projection")
_HUB_PREFIX = "hf-hub:"
_BN_STATS = ("running_mean", "running_var")


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preprocessing:
    """Evaluation preprocessing: resize the shorter side, centre crop, normalise."""

    input_size: int = 32  # model input (square)
    resize_size: int = 32  # shorter side resized to this, then centre crop input_size
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def __post_init__(self) -> None:
        from carlzoo.images import INTERPOLATIONS

        for name in ("mean", "std"):
            value = tuple(float(v) for v in getattr(self, name))
            if len(value) != 3:
                raise ValueError(f"preprocessing.{name} needs 3 values (R, G, B), got {value}")
            object.__setattr__(self, name, value)
        if any(s <= 0 for s in self.std):
            raise ValueError(f"preprocessing.std must be > 0, got {self.std}")
        if int(self.input_size) < 1 or int(self.resize_size) < int(self.input_size):
            raise ValueError(
                "preprocessing needs 1 <= input_size <= resize_size, got "
                f"input_size={self.input_size}, resize_size={self.resize_size}"
            )
        object.__setattr__(self, "input_size", int(self.input_size))
        object.__setattr__(self, "resize_size", int(self.resize_size))
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"preprocessing.interpolation={self.interpolation!r}: expected "
                f"one of {sorted(INTERPOLATIONS)}"
            )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Preprocessing:
        _check_keys("preprocessing", values, cls)
        return cls(**values)

    def make_transform(self) -> ImageTransform:
        """The PIL -> normalised (3, S, S) float32 tensor transform."""
        return ImageTransform(
            self.input_size, self.resize_size, self.interpolation, self.mean, self.std
        )


def _check_keys(section: str, values: Any, cls: type) -> None:
    if not isinstance(values, dict):
        raise ValueError(f"{section} must be a JSON object, got {type(values).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {section} keys {unknown}; valid keys: {sorted(known)}")


@dataclass(frozen=True)
class ZooConfig:
    """Everything in a model folder's config.json."""

    architecture: ModelConfig
    preprocessing: Preprocessing
    name: str | None = None
    provenance: dict = field(default_factory=dict)  # dataset, epochs, recipe, code_version...
    metrics: dict = field(default_factory=dict)  # measured values only, e.g. knn_top1

    def to_dict(self) -> dict[str, Any]:
        """The config.json contents (JSON-serialisable), with ``"format": "carlzoo/1"``."""
        return {
            "format": FORMAT,
            "name": self.name,
            "architecture": self.architecture.to_dict(),
            "preprocessing": self.preprocessing.to_dict(),
            "provenance": dict(self.provenance),
            "metrics": dict(self.metrics),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ZooConfig:
        """Parse config.json contents; ZooError on a wrong format or unknown keys."""
        if not isinstance(d, dict):
            raise ZooError(f"config must be a JSON object, got {type(d).__name__}")
        fmt = d.get("format")
        if fmt != FORMAT:
            raise ZooError(f"config format {fmt!r} is not supported (expected {FORMAT!r})")
        known = {"format", "name", "architecture", "preprocessing", "provenance", "metrics"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ZooError(f"unknown config keys {unknown}; valid keys: {sorted(known)}")
        if "architecture" not in d:
            raise ZooError("config has no 'architecture'")
        try:
            arch = d["architecture"]
            _check_keys("architecture", arch, ModelConfig)
            return cls(
                architecture=ModelConfig(**arch),  # keys checked just above
                preprocessing=Preprocessing.from_dict(d.get("preprocessing") or {}),
                name=d.get("name"),
                provenance=dict(d.get("provenance") or {}),
                metrics=dict(d.get("metrics") or {}),
            )
        except (TypeError, ValueError) as e:
            raise ZooError(" ".join(str(e).split())) from None


# --------------------------------------------------------------------------------------------
# Inference (shared by the torch and ONNX backends)
# --------------------------------------------------------------------------------------------


class Assignment(NamedTuple):
    ids: Tensor  # (N, top_k) long: prototype ids, most probable first
    probs: Tensor  # (N, top_k) float: their probabilities
    probabilities: Tensor  # (N, K) float: the full assignment (softmax of the logits)


ImageInput = Tensor | np.ndarray | Image.Image | str | os.PathLike | Sequence[Any]
_INPUTS = (
    "give a (N, 3, S, S) float tensor, a PIL image, a uint8 array (H, W, 3) or (N, H, W, 3), "
    "a path, or a list of these"
)


def _array_image(a: np.ndarray) -> Image.Image:
    """A uint8 image array, channels last: (H, W) gray, (H, W, 3) RGB or (H, W, 4) RGBA."""
    if a.dtype != np.uint8:
        raise ValueError(
            f"expected uint8 image arrays (0..255), got {a.dtype}; convert to uint8, or pass a "
            "float tensor already normalised"
        )
    if a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4)):
        return Image.fromarray(np.ascontiguousarray(a))
    raise ValueError(
        f"expected an image array of shape (H, W), (H, W, 3) or (H, W, 4), channels last, got "
        f"{a.shape}"
    )


class _Inference:
    """``embed`` and ``assign`` over any input; subclasses provide ``_run``."""

    config: ZooConfig
    transform: Callable[[Image.Image], Tensor]
    default_batch_size = 256

    def _run(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # pragma: no cover
        raise NotImplementedError

    @property
    def input_size(self) -> int:
        return self.config.preprocessing.input_size

    def _check_tensor(self, x: Tensor) -> Tensor:
        if x.dim() == 3:
            x = x.unsqueeze(0)
        s = self.input_size
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(
                f"expected images as a (N, 3, {s}, {s}) tensor, got shape {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise ValueError(
                f"expected a float tensor already normalised, got {x.dtype}; pass "
                "PIL images or paths, or apply model.transform first"
            )
        if tuple(x.shape[2:]) != (s, s):
            raise ValueError(
                f"expected {s}x{s} images (config.preprocessing.input_size), got "
                f"{tuple(x.shape[2:])}; use model.transform to prepare images"
            )
        return x

    def _load_one(self, item: Any) -> Tensor:
        """One list element -> a (n, 3, S, S) tensor."""
        if isinstance(item, Tensor):
            return self._check_tensor(item)
        if isinstance(item, np.ndarray):
            item = _array_image(item)
        if isinstance(item, Image.Image):
            return self.transform(item).unsqueeze(0)
        if isinstance(item, (str, os.PathLike)):
            img = read_image(item, min_side=self.config.preprocessing.resize_size)
            return self.transform(img).unsqueeze(0)
        raise TypeError(f"cannot embed a value of type {type(item).__name__}: {_INPUTS}")

    def _batches(self, x: Any, batch_size: int) -> Iterator[Tensor]:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if isinstance(x, Tensor):
            x = self._check_tensor(x)
            if x.shape[0] == 0:
                raise ValueError("no images given")
            for i in range(0, x.shape[0], batch_size):
                yield x[i : i + batch_size]
            return
        if isinstance(x, (Image.Image, str, os.PathLike)) or (
            isinstance(x, np.ndarray) and x.ndim in (2, 3)
        ):
            items = [x]
        elif isinstance(x, np.ndarray) and (x.ndim != 4 or x.shape[3] not in (3, 4)):
            raise ValueError(
                f"expected a uint8 image array (H, W, 3) or a batch (N, H, W, 3), channels last, "
                f"got {x.shape}"
            )
        else:
            try:
                items = list(x)
            except TypeError:
                kind = type(x).__name__
                raise TypeError(f"cannot embed a value of type {kind}: {_INPUTS}") from None
        if not items:
            raise ValueError("no images given")
        for i in range(0, len(items), batch_size):
            yield torch.cat([self._load_one(it) for it in items[i : i + batch_size]])

    def forward_all(
        self, x: ImageInput, batch_size: int | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(features, projection, logits) as float32 CPU tensors for any accepted input."""
        size = self.default_batch_size if batch_size is None else batch_size
        outs = [self._run(b) for b in self._batches(x, size)]
        return tuple(torch.cat([o[i] for o in outs]) for i in range(3))  # type: ignore[return-value]

    def embed(
        self,
        x: ImageInput,
        layer: str = "backbone",
        normalize: bool = True,
        batch_size: int | None = None,
    ) -> Tensor:
        """Embeddings (N, D) float32 on the CPU.

        ``x``: a (N, 3, S, S) float tensor already normalised (or one (3, S, S) image), a PIL
        image, a uint8 array (H, W, 3) or batch (N, H, W, 3) such as CIFAR's, a path, or a
        list of these (decoded with :func:`carlzoo.images.read_image`; images and arrays go
        through ``self.transform``, the model's preprocessing). ``layer``: "backbone"
        (the features linear probes and kNN use) or "projection" (z). ``normalize``: L2-
        normalise each row.
        """
        if layer not in LAYERS:
            raise ValueError(f"layer={layer!r}: expected one of {list(LAYERS)}")
        features, projection, _ = self.forward_all(x, batch_size)
        emb = features if layer == "backbone" else projection
        return F.normalize(emb, dim=1) if normalize else emb

    def assign(self, x: ImageInput, top_k: int = 1, batch_size: int | None = None) -> Assignment:
        """Prototype assignment: the ``top_k`` most probable prototypes of each image.

        ``probabilities`` is the softmax of the prototype logits (rows sum to 1).
        """
        k = self.config.architecture.num_prototypes
        if not 1 <= top_k <= k:
            raise ValueError(f"top_k must be in 1..{k} (the number of prototypes), got {top_k}")
        _, _, logits = self.forward_all(x, batch_size)
        p = torch.softmax(logits.float(), dim=1)
        probs, ids = torch.topk(p, top_k, dim=1)
        return Assignment(ids.long(), probs, p)


class PretrainedCARL(_Inference, CARLModel):
    """A CARL model with its config and preprocessing, in eval mode (torch backend)."""

    def __init__(self, config: ZooConfig) -> None:
        CARLModel.__init__(self, config.architecture)
        self.config = config
        self.transform = config.preprocessing.make_transform()
        self.eval()

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @torch.inference_mode()
    def _run(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        dev = self.device
        out = self(x.to(dev, dtype=torch.float32, non_blocking=True))
        return tuple(t.float().cpu() for t in out)  # type: ignore[return-value]


class OnnxCARL(_Inference):
    """The same interface as :class:`PretrainedCARL`, running ``model.onnx`` in onnxruntime."""

    OUTPUTS = ("features", "projection", "logits")

    def __init__(self, onnx_path: str | Path, config: ZooConfig, device: Any = None) -> None:
        import onnxruntime as ort

        self.config = config
        self.transform = config.preprocessing.make_transform()
        self.onnx_path = Path(onnx_path)
        dev = _onnx_device(device)
        available = ort.get_available_providers()
        requested = _onnx_providers(dev, available)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        try:
            with warnings.catch_warnings():  # a provider that fails to start is said below
                warnings.simplefilter("ignore")
                self.session = ort.InferenceSession(
                    str(self.onnx_path), sess_options=opts, providers=requested
                )
        except Exception as e:  # onnxruntime raises its own exception types
            raise ZooError(f"cannot load ONNX model {self.onnx_path}: {_one_line(e)}") from None
        # What the session runs on, which is not always what was asked for: onnxruntime
        # falls back to the CPU when the CUDA provider's libraries do not load.
        self.providers: list[str] = self.session.get_providers()
        if dev.type == "cuda" and "CUDAExecutionProvider" not in self.providers:
            why = (
                "could not start its CUDAExecutionProvider (CUDA or cuDNN libraries missing or "
                "of another version than onnxruntime-gpu was built for)"
                if "CUDAExecutionProvider" in available
                else "has no CUDAExecutionProvider here (pip uninstall onnxruntime, then pip "
                "install onnxruntime-gpu)"
            )
            _warn_caller(f"device={str(dev)!r}: onnxruntime {why}; running on the CPU")
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        if inputs != ["images"] or not set(self.OUTPUTS) <= set(outputs):
            raise ZooError(
                f"{self.onnx_path} is not a carlzoo ONNX export: inputs {inputs}, "
                f"outputs {outputs} (expected input 'images' and outputs "
                f"{list(self.OUTPUTS)}); re-export it with carlzoo.export.onnx"
            )

    def __repr__(self) -> str:
        return f"OnnxCARL({str(self.onnx_path)!r}, providers={self.providers})"

    def _run(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        arr = x.detach().to("cpu", torch.float32).contiguous().numpy()
        outs = self.session.run(list(self.OUTPUTS), {"images": arr})
        return tuple(torch.from_numpy(o).float() for o in outs)  # type: ignore[return-value]


def _onnx_device(device: Any) -> torch.device:
    """The CPU or a CUDA device, parsed from what the caller passed (None: the CPU)."""
    try:
        dev = parse_device("cpu" if device is None else device)
    except ValueError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ZooError(
            f"device={str(device)!r} is not supported by the onnx backend: use 'cpu' or 'cuda'"
        )
    return dev


def _onnx_providers(
    dev: torch.device, available: list[str]
) -> list[str | tuple[str, dict[str, Any]]]:
    """onnxruntime's providers for ``dev``: CUDA on the GPU it names when onnxruntime has it."""
    if dev.type != "cuda" or "CUDAExecutionProvider" not in available:
        return ["CPUExecutionProvider"]
    return [("CUDAExecutionProvider", {"device_id": dev.index or 0}), "CPUExecutionProvider"]


def _warn_caller(message: str) -> None:
    """``warnings.warn`` attributed to the first caller outside this package."""
    package = str(Path(__file__).resolve().parent)
    frame, level = sys._getframe(1), 2
    while frame.f_back is not None and frame.f_code.co_filename.startswith(package):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, stacklevel=level)


# --------------------------------------------------------------------------------------------
# Saving and loading a model folder
# --------------------------------------------------------------------------------------------


def _one_line(e: BaseException | str) -> str:
    text = str(e).strip().splitlines()
    return " ".join(text[0].split()) if text else type(e).__name__


def _resolve_device(device: Any) -> torch.device:
    try:
        dev = parse_device("cpu" if device is None else device)
    except ValueError as e:
        raise ZooError(str(e)) from None
    why = missing_device(dev)
    if why is not None:
        also = "one of them or " if torch.cuda.is_available() else ""
        raise ZooError(f"device={str(device)!r} requested but {why}; use {also}device='cpu'")
    return dev


def save_pretrained(
    model: CARLModel, directory: str | Path, config: ZooConfig, *, dtype: str = "float32"
) -> Path:
    """Write ``config.json`` and ``model.safetensors`` into ``directory`` (created if needed).

    ``dtype="float16"`` stores floating weights as float16 (restored to float32 on load),
    keeping BatchNorm running statistics in float32. Each file is written atomically
    (temp + rename). ``config.architecture`` must equal ``model.model_config``;
    ``provenance["weights_dtype"]`` is set to ``dtype``. A ``model.onnx`` already in the
    folder is removed, since it would no longer match the weights.
    """
    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype={dtype!r}: expected 'float32' or 'float16'")
    if not isinstance(model, CARLModel):
        raise TypeError(f"save_pretrained expects a CARLModel, got {type(model).__name__}")
    if config.architecture != model.model_config:
        raise ValueError(
            "config.architecture does not match the model's model_config: "
            f"{config.architecture} vs {model.model_config}"
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, Tensor] = {}
    for name, t in model.state_dict().items():
        t = t.detach().to("cpu")
        if dtype == "float16" and t.is_floating_point() and not name.endswith(_BN_STATS):
            t = t.to(torch.float16)
        elif t.is_floating_point():
            t = t.to(torch.float32)
        tensors[name] = t.contiguous().clone()
    provenance = {**config.provenance, "weights_dtype": dtype}
    cfg = dataclasses.replace(config, provenance=provenance)
    meta = {"format": "pt", "carlzoo_format": FORMAT, "dtype": dtype}
    stale_onnx = directory / ONNX_NAME
    if stale_onnx.exists():
        stale_onnx.unlink()
    atomic_write_safetensors(directory / WEIGHTS_NAME, tensors, meta)
    text = json.dumps(cfg.to_dict(), indent=2, sort_keys=False) + "\n"
    atomic_write_text(directory / CONFIG_NAME, text)
    return directory


def read_config(directory: str | Path) -> ZooConfig:
    """Parse ``directory/config.json``; ZooError naming the path on any problem."""
    directory = Path(directory)
    if not directory.exists():
        raise ZooError(f"model folder {directory} does not exist")
    if not directory.is_dir():
        raise ZooError(
            f"{directory} is not a folder: a model folder holds config.json and model.safetensors"
        )
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise ZooError(
            f"no {CONFIG_NAME} in {directory}: not a carlzoo model folder (make one "
            "with `carlzoo export` or carlzoo.pretrained.save_pretrained)"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ZooError(f"cannot read {path}: {_one_line(e)}") from None
    try:
        data = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:  # damaged: not JSON text
        raise _CorruptConfig(f"cannot read {path}: {_one_line(e)}", _one_line(e)) from None
    try:
        return ZooConfig.from_dict(data)
    except ZooError as e:  # JSON, but not a config this carlzoo reads: as written, not damaged
        raise ZooError(f"{path}: {e}") from None


class _CorruptFile(ZooError):
    """A model file that cannot be used as it is; ``why`` says why, without its path."""

    fname = ""
    what = ""  # "weights file", "config file": how messages name it

    def __init__(self, message: str, why: str = "") -> None:
        super().__init__(message)
        self.why = why or message


class _CorruptConfig(_CorruptFile):
    """config.json is not JSON text (a config that parses but does not validate is not
    damaged: it is what was written, e.g. a newer format)."""

    fname, what = CONFIG_NAME, "config file"


class _CorruptWeights(_CorruptFile):
    """model.safetensors cannot be decoded (as opposed to: it does not fit the architecture)."""

    fname, what = WEIGHTS_NAME, "weights file"


def _load_state(path: Path, model: CARLModel) -> None:
    from safetensors import safe_open

    if not path.is_file():
        raise ZooError(f"no {WEIGHTS_NAME} in {path.parent}: the model folder is incomplete")
    try:
        state: dict[str, Tensor] = {}
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                state[key] = f.get_tensor(key)
    except Exception as e:  # safetensors raises SafetensorError and others on corrupt files
        why = _one_line(e)
        raise _CorruptWeights(f"corrupt weights file {path}: {why}", why) from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ZooError(
            f"{path} does not match the architecture in {CONFIG_NAME}: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected "
            f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    for key, ref in expected.items():
        t = state[key]
        if t.shape != ref.shape:
            raise ZooError(
                f"{path}: tensor {key} has shape {tuple(t.shape)}, the architecture "
                f"in {CONFIG_NAME} needs {tuple(ref.shape)}"
            )
        if t.dtype != ref.dtype:
            state[key] = t.to(ref.dtype)
    model.load_state_dict(state, strict=True)


def from_pretrained(
    directory: str | Path, device: Any = None, backend: str = "torch"
) -> PretrainedCARL | OnnxCARL:
    """Load a model folder written by :func:`save_pretrained` (and, for ONNX, export_onnx).

    ``backend="torch"`` reads model.safetensors into a :class:`PretrainedCARL` on ``device``
    (default CPU); ``backend="onnx"`` runs model.onnx in onnxruntime (:class:`OnnxCARL`).
    """
    if backend not in BACKENDS:
        raise ZooError(f"backend={backend!r}: expected one of {list(BACKENDS)}")
    directory = Path(directory).expanduser()
    config = read_config(directory)
    if backend == "onnx":
        onnx_path = directory / ONNX_NAME
        if not onnx_path.is_file():
            if (directory / "README.md").is_file():  # a `carlzoo export --no-onnx` folder
                how = (
                    "export its run again without --no-onnx (`carlzoo export RUN --out "
                    f"{directory} --overwrite`)"
                )
            else:
                how = f"add one with `python -m carlzoo.export.onnx {directory}`"
            raise ZooError(f"no {ONNX_NAME} in {directory}: {how}, or use backend='torch'")
        return OnnxCARL(onnx_path, config, device)
    dev = _resolve_device(device)
    model = PretrainedCARL(config)
    _load_state(directory / WEIGHTS_NAME, model)
    return model.to(dev).eval()


# --------------------------------------------------------------------------------------------
# load(spec)
# --------------------------------------------------------------------------------------------


def _needed_files(backend: str) -> list[str]:
    return [CONFIG_NAME, ONNX_NAME if backend == "onnx" else WEIGHTS_NAME]


def _hf_hub_download(
    repo_id: str,
    fname: str,
    revision: str | None,
    *,
    cache_dir: Any,
    token: Any,
    force_download: bool = False,
) -> Path:
    """``huggingface_hub.hf_hub_download`` of one file, as carlzoo (its user agent)."""
    from huggingface_hub import hf_hub_download

    from carlzoo import __version__

    return Path(
        hf_hub_download(
            repo_id,
            fname,
            revision=revision,
            cache_dir=cache_dir,
            token=token,
            force_download=force_download,
            library_name="carlzoo",
            library_version=__version__,
        )
    )


def _hub_file(
    repo_id: str,
    fname: str,
    revision: str | None,
    *,
    cache_dir: Any,
    token: Any,
    label: str,
) -> Path:
    """Download one file of one revision into the HF cache; return its snapshot path."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return _hf_hub_download(repo_id, fname, revision, cache_dir=cache_dir, token=token)
    except LocalEntryNotFoundError:
        raise ZooError(
            f"{label}: {fname} is not in the Hugging Face cache and the Hub "
            "cannot be reached (offline, HF_HUB_OFFLINE=1, or no network); "
            "load it once online, or load a local folder"
        ) from None
    except RepositoryNotFoundError:
        raise ZooError(
            f"{label}: repository {repo_id} not found (or it is private or gated: pass token=...)"
        ) from None
    except RevisionNotFoundError:
        raise ZooError(f"{label}: revision {revision!r} not found in {repo_id}") from None
    except EntryNotFoundError:
        hint = (
            "; export the run with ONNX (`carlzoo export RUN --out DIR`) and push it, or use"
            " backend='torch'"
            if fname == ONNX_NAME
            else ""
        )
        raise ZooError(
            f"{label}: {repo_id} has no {fname} at revision {revision or 'main'}{hint}"
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise ZooError(f"{label}: cannot download {fname} from {repo_id}: {_one_line(e)}") from None


def _hub_download(
    repo_id: str,
    filenames: list[str],
    revision: str | None,
    *,
    cache_dir: Any,
    token: Any,
    label: str,
) -> Path:
    """Download ``filenames`` of one revision into the HF cache; return their folder."""
    folder: Path | None = None
    rev = revision
    for fname in filenames:
        path = _hub_file(repo_id, fname, rev, cache_dir=cache_dir, token=token, label=label)
        if folder is None:
            folder = path.parent
            if registry.COMMIT_SHA.match(folder.name):
                rev = folder.name  # pin the rest to the commit the first file came from
        elif path.parent != folder:
            raise ZooError(
                f"{label}: files of {repo_id} came from different revisions "
                f"({folder.name}, {path.parent.name}); pin a commit sha"
            )
    assert folder is not None
    return folder


def _download_again(
    repo_id: str, fname: str, revision: str | None, blob: Path, *, cache_dir: Any, token: Any
) -> str | None:
    """Download ``fname`` again over its cached blob; None when done, else what to do instead.

    A plain download re-links the blob already in the cache (``blobs/<etag>``), corrupt or
    not, so only ``force_download=True`` repairs it. ``blob`` is named in the advice.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return (
            "HF_HUB_OFFLINE=1 is set, so it cannot be downloaded again: delete the cached "
            f"file {blob} and load once online"
        )
    try:
        _hf_hub_download(
            repo_id, fname, revision, cache_dir=cache_dir, token=token, force_download=True
        )
    except Exception as e:  # huggingface_hub wraps the network error in a ValueError
        why = _one_line(e.__cause__ if e.__cause__ is not None else e)
        return (
            f"downloading it again failed ({why}): delete the cached file {blob} and load "
            "again once the Hub can be reached"
        )
    return None


def _expected_sha256(entry: registry.ZooEntry | None, path: Path, label: str) -> str | None:
    """What ``path``'s sha256 must be: the registry's pin for a zoo model, else the sha256 its
    cached blob is named after when it is an LFS blob; None when there is nothing to check."""
    if entry is not None:
        return registry.pinned_sha256(entry, path.name, path, source=f"Hub download {label}")
    name = path.resolve().name
    return name if registry.SHA256.match(name) else None


def _corrupt_cache_message(
    entry: registry.ZooEntry | None,
    label: str,
    path: Path,
    expected: str,
    actual: str,
    advice: str,
) -> str:
    blob = path.resolve()
    if entry is not None:
        return registry.mismatch_message(
            entry,
            path.name,
            blob,
            source=f"Hub download {label}",
            expected=expected,
            actual=actual,
            advice=advice,
        )
    return (
        f"{label}: {path.name} in the Hugging Face cache ({blob}) is corrupt: its sha256 is "
        f"{actual}, not {expected} (the sha256 its blob is named after); {advice}"
    )


def _load_from_hub(
    repo_id: str,
    revision: str | None,
    device: Any,
    backend: str,
    *,
    cache_dir: Any,
    token: Any,
    label: str,
    entry: registry.ZooEntry | None = None,
) -> PretrainedCARL | OnnxCARL:
    """Download the files ``backend`` needs from the Hub, check them and load them.

    Each file is hashed once: against the registry's pin for a zoo model (``entry``), else,
    for an LFS file, against the sha256 its cached blob is named after. A file that fails
    its check, or a config.json or weights that were not hashed and do not parse or decode,
    are downloaded once more over the cached blob (``force_download=True``) and checked
    again; a ZooError naming the blob (``path.resolve()``) is raised only when that fails or
    is impossible (offline).
    """
    needed = _needed_files(backend)
    folder = _hub_download(repo_id, needed, revision, cache_dir=cache_dir, token=token, label=label)
    rev = folder.name if registry.COMMIT_SHA.match(folder.name) else revision
    hashed: set[str] = set()
    for fname in needed:
        path = folder / fname
        expected = _expected_sha256(entry, path, label)
        if expected is None:
            continue
        hashed.add(fname)
        actual = registry.sha256_file(path)
        if actual == expected:
            continue
        blob = path.resolve()
        advice = _download_again(repo_id, fname, rev, blob, cache_dir=cache_dir, token=token)
        if advice is None:
            actual = registry.sha256_file(path)
            if actual == expected:
                continue
            served = "the registry pins" if entry is not None else "its LFS pointer names"
            advice = f"downloading it again gave the same: the Hub does not serve the file {served}"
        raise ZooError(_corrupt_cache_message(entry, label, path, expected, actual, advice))
    downloaded_again: set[str] = set()
    while True:  # each file is downloaded again at most once, so this ends
        try:
            return from_pretrained(folder, device, backend)
        except _CorruptFile as e:
            fname, why = e.fname, e.why
            blob = (folder / fname).resolve()
            corrupt = f"{label}: corrupt {e.what} {blob}"
            if fname in hashed:  # the very file the Hub serves: downloading cannot help
                raise ZooError(
                    f"{corrupt}, although its sha256 is the expected one: the file on the Hub "
                    f"is broken ({why})"
                ) from None
            if fname in downloaded_again:
                raise ZooError(
                    f"{corrupt} even after downloading it again: the file on the Hub is broken "
                    f"({why})"
                ) from None
            advice = _download_again(repo_id, fname, rev, blob, cache_dir=cache_dir, token=token)
            if advice is not None:
                raise ZooError(f"{corrupt} ({why}); {advice}") from None
            downloaded_again.add(fname)


def _parse_hub_spec(spec: str, revision: str | None) -> tuple[str, str | None]:
    body = spec[len(_HUB_PREFIX) :]
    repo_id, at, rev = body.partition("@")
    if not registry.REPO_ID.match(repo_id) or (at and not rev):
        raise ZooError(
            f"{spec!r} is not a valid Hub spec: write hf-hub:org/repo or hf-hub:org/repo@revision"
        )
    if rev and revision and rev != revision:
        raise ZooError(
            f"{spec!r} names revision {rev!r} but revision={revision!r} was also given: give one"
        )
    return repo_id, rev or revision


_BUNDLED_ADVICE = (
    "the bundled file is corrupt or not the published one: reinstall carlzoo "
    "(pip install --force-reinstall carlzoo)"
)


def _load_zoo(
    name: str, device: Any, backend: str, revision: str | None, cache_dir: Any, token: Any
) -> PretrainedCARL | OnnxCARL:
    entry = registry.get_entry(name)
    needed = _needed_files(backend)
    bundled = registry.bundled_path(name)
    if revision is not None and revision != entry.revision:
        if entry.status == "published" and entry.revision is not None:
            raise ZooError(
                f"{name} is pinned to revision {entry.revision}; to load another "
                f"revision use 'hf-hub:{entry.repo_id}@{revision}' (not hash-checked)"
            )
        if bundled is None:
            raise ZooError(registry.unpublished_message(name))
        raise ZooError(
            f"revision={revision!r} does not apply to {name}: it has no Hub repository yet "
            "and is loaded from the copy bundled in the package; load it without revision="
        )
    if bundled is not None:
        source = "bundled folder"
        if backend == "onnx" and not (bundled / ONNX_NAME).is_file():
            weights = [CONFIG_NAME, WEIGHTS_NAME]
            registry.verify_files(entry, bundled, weights, source=source, advice=_BUNDLED_ADVICE)
            config = read_config(bundled)  # the checked config, never a cached copy
            return OnnxCARL(_bundled_onnx(entry, bundled, config), config, device)
        registry.verify_files(entry, bundled, needed, source=source, advice=_BUNDLED_ADVICE)
        return from_pretrained(bundled, device, backend)
    if entry.status != "published" or entry.revision is None:
        raise ZooError(registry.unpublished_message(name))
    label = f"{name} ({entry.repo_id}@{entry.revision[:12]})"
    for fname in needed:
        if fname not in entry.files:
            raise ZooError(
                f"{label}: the registry pins no sha256 for {fname}, so it is not "
                "downloaded" + (": use backend='torch'" if fname == ONNX_NAME else "")
            )
    return _load_from_hub(
        entry.repo_id,
        entry.revision,
        device,
        backend,
        cache_dir=cache_dir,
        token=token,
        label=label,
        entry=entry,
    )


def cache_root() -> Path:
    """carlzoo's own cache: ``$CARLZOO_CACHE``, else ``$XDG_CACHE_HOME/carlzoo``, else
    ``~/.cache/carlzoo`` (Hub downloads stay in the Hugging Face cache)."""
    if os.environ.get("CARLZOO_CACHE"):
        return Path(os.environ["CARLZOO_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "carlzoo"


ONNX_SHA256_NAME = ONNX_NAME + ".sha256"
"""In an ONNX cache folder: the sha256 of its model.onnx, recorded when it was exported."""


def _onnx_cache_folder(entry: registry.ZooEntry) -> Path:
    """``cache_root()/onnx/<name>-<key>``, the key hashing both config.json's and the weights'
    pinned sha256: a release that changes either gets a folder of its own."""
    pins = f"{entry.files[CONFIG_NAME]}\n{entry.files[WEIGHTS_NAME]}\n".encode()
    return cache_root() / "onnx" / f"{entry.name}-{hashlib.sha256(pins).hexdigest()[:16]}"


def _cached_onnx_problem(folder: Path) -> str | None:
    """None when ``folder/model.onnx`` has the sha256 recorded at its export, else what is
    wrong with it (the folder may be missing, half-removed or tampered with)."""
    try:
        recorded = (folder / ONNX_SHA256_NAME).read_text(encoding="ascii").split()
        actual = registry.sha256_file(folder / ONNX_NAME)
    except (OSError, UnicodeDecodeError) as e:
        return f"unreadable: {_one_line(e)}"
    if not recorded or recorded[0] != actual:
        want = recorded[0] if recorded else "nothing"
        return f"its sha256 is {actual}, its export recorded {want}"
    return None


def _install_folder(tmp: Path, folder: Path) -> None:
    """Rename the finished export ``tmp`` to ``folder``, unless ``folder`` already holds a
    complete, verified export (another process finished first): then ``tmp`` is left for the
    caller to remove. A ``folder`` that fails verification is moved aside and removed first.
    """
    for _ in range(5):
        if _cached_onnx_problem(folder) is None:
            return
        if folder.exists():  # incomplete or damaged: move it aside in one step, then remove it
            trash = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old.", dir=folder.parent))
            try:
                os.rename(folder, trash / folder.name)
            except FileNotFoundError:  # another process moved it first
                pass
            finally:
                shutil.rmtree(trash, ignore_errors=True)
        try:
            os.rename(tmp, folder)
            return
        except OSError as e:  # another process renamed its export into place meanwhile
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
    raise OSError(f"{folder} keeps being replaced by other processes")


def _bundled_onnx(entry: registry.ZooEntry, bundled: Path, config: ZooConfig) -> Path:
    """``model.onnx`` exported from ``bundled``'s checked weights, kept in carlzoo's cache.

    The folder (:func:`_onnx_cache_folder`) is written once: the export is compared with
    PyTorch (``carlzoo.export.onnx.add_onnx``) in a temporary folder, its sha256 recorded
    there (``model.onnx.sha256``), and the folder renamed into place only then. The sha256 is
    checked on every load; a model.onnx that fails the check is exported again.
    """
    folder = _onnx_cache_folder(entry)
    problem = _cached_onnx_problem(folder)
    if problem is None:
        return folder / ONNX_NAME
    from carlzoo.export.onnx import add_onnx

    log = logging.getLogger("carlzoo")
    if folder.exists():
        log.warning(
            "%s: the cached %s in %s is damaged (%s); exporting it again",
            entry.name,
            ONNX_NAME,
            folder,
            problem,
        )
    else:
        log.warning(
            "%s: model.onnx is not bundled; exporting it from model.safetensors into %s (once)",
            entry.name,
            folder,
        )
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    except OSError as e:
        raise ZooError(
            f"{entry.name}: cannot create the ONNX cache folder {folder.parent} ({_one_line(e)});"
            " set CARLZOO_CACHE to a writable folder or use backend='torch'"
        ) from None
    try:
        shutil.copyfile(bundled / CONFIG_NAME, tmp / CONFIG_NAME)  # for people; never read
        dtype = config.provenance.get("weights_dtype", "float32")
        onnx_dtype = dtype if dtype in ("float32", "float16") else "float32"
        add_onnx(bundled, dtype=onnx_dtype, out=tmp / ONNX_NAME)
        digest = registry.sha256_file(tmp / ONNX_NAME)
        atomic_write_text(tmp / ONNX_SHA256_NAME, f"{digest}  {ONNX_NAME}\n")
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would shut other users out
        _install_folder(tmp, folder)
    except Exception as e:
        if _cached_onnx_problem(folder) is None:  # another process finished first
            return folder / ONNX_NAME
        raise ZooError(
            f"{entry.name}: model.onnx is not bundled and exporting it from model.safetensors "
            f"failed ({_one_line(e)}); use backend='torch'"
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder / ONNX_NAME


def load(
    spec: str | os.PathLike[str],
    device: Any = None,
    backend: str = "torch",
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    token: str | bool | None = None,
) -> PretrainedCARL | OnnxCARL:
    """Load a pretrained CARL model.

    ``spec`` is a zoo name (``carlzoo.list_models()``), a local model folder, or
    ``hf-hub:org/repo[@revision]``. Zoo names use the bundled copy when the package ships
    one, else the pinned Hub revision through huggingface_hub (HF_HOME, HF_HUB_OFFLINE=1 and
    ``cache_dir`` / ``token`` apply); every file is sha256-checked against the registry and a
    mismatch is a :class:`ZooError`. Hub specs are downloaded without hash pinning.
    ``backend``: "torch" (:class:`PretrainedCARL`) or "onnx" (:class:`OnnxCARL`).
    """
    if backend not in BACKENDS:
        raise ZooError(f"backend={backend!r}: expected one of {list(BACKENDS)}")
    if not isinstance(spec, (str, os.PathLike)):
        raise ZooError(f"model spec must be a string or path, got {type(spec).__name__}")
    text = os.fspath(spec)
    if not text.strip():
        raise ZooError(
            "model spec is empty: give a zoo name (carlzoo.list_models()), a model folder or "
            "hf-hub:org/repo"
        )
    if isinstance(spec, str) and text.startswith(_HUB_PREFIX):
        repo_id, rev = _parse_hub_spec(text, revision)
        label = f"hf-hub:{repo_id}" + (f"@{rev}" if rev else "")
        return _load_from_hub(
            repo_id, rev, device, backend, cache_dir=cache_dir, token=token, label=label
        )
    if isinstance(spec, str) and text in registry.REGISTRY:
        return _load_zoo(text, device, backend, revision, cache_dir, token)
    path = Path(text).expanduser()
    if path.exists():
        if revision is not None:
            raise ZooError(
                f"revision={revision!r} applies to Hub models, not to the local folder {path}"
            )
        return from_pretrained(path, device, backend)
    if os.sep in text or "/" in text or text.startswith((".", "~")):
        hub = registry.REPO_ID.match(text)
        hint = f" (for a Hub repository write 'hf-hub:{text}')" if hub else ""
        raise ZooError(f"model folder {text} does not exist{hint}")
    raise ZooError(
        f"{text!r} is not a zoo model, a local folder or hf-hub:org/repo[@revision]: "
        f"{registry.did_you_mean(text)}zoo models: {', '.join(registry.list_models())}"
    )
