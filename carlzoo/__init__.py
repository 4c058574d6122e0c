"""carlzoo: a model zoo and feature extractor for CARL encoders.

>>> import carlzoo
>>> model = carlzoo.load("carl-cifar10")          # doctest: +SKIP
>>> emb = model.embed(["cat.jpg", "dog.png"])     # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"


def _add_checkout_subpackages() -> None:
    # The wheel installs training/, export/ and cli/ as carlzoo.training, carlzoo.export and
    # carlzoo.cli. Imported from a source checkout instead (its root first on sys.path, as
    # with `python -m carlzoo.cli` or torchrun run from the repository root), this folder
    # shadows the installed package: let its subpackages be found beside it.
    root = Path(__file__).resolve().parent.parent
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file() or 'name = "carlzoo"' not in pyproject.read_text("utf-8"):
        return
    if all((root / sub / "__init__.py").is_file() for sub in ("training", "export", "cli")):
        __path__.append(str(root))  # noqa: F821 (a package's __path__)


_add_checkout_subpackages()

__all__ = [
    "__version__",
    "CARLModel",
    "CARLOutput",
    "ModelConfig",
    "build_model",
    "load",
    "list_models",
]

if TYPE_CHECKING:
    from carlzoo.model import CARLModel, CARLOutput, ModelConfig, build_model
    from carlzoo.pretrained import OnnxCARL, PretrainedCARL

_MODEL_NAMES = ("CARLModel", "CARLOutput", "ModelConfig", "build_model")


def __getattr__(name: str) -> Any:
    # torch is imported on first use, so `import carlzoo` (and `carlzoo --help`) stays fast.
    if name in _MODEL_NAMES:
        from carlzoo import model

        return getattr(model, name)
    raise AttributeError(f"module 'carlzoo' has no attribute {name!r}")


def load(
    spec: str | os.PathLike[str], device: Any = None, backend: str = "torch", **kwargs: Any
) -> PretrainedCARL | OnnxCARL:
    """Load a zoo model by name, local folder or ``hf-hub:org/repo[@revision]``.

    ``backend="torch"`` gives a :class:`~carlzoo.pretrained.PretrainedCARL`, ``"onnx"`` an
    :class:`~carlzoo.pretrained.OnnxCARL`; see :func:`carlzoo.pretrained.load`.
    """
    from carlzoo.pretrained import load as _load

    return _load(spec, device=device, backend=backend, **kwargs)


def list_models() -> list[str]:
    """Names of the models in the zoo registry."""
    from carlzoo.registry import list_models as _list_models

    return _list_models()
