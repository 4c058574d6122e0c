"""The zoo registry: which named CARL models exist, where they live and how to check them.

Each entry pins a Hub repository (``carlzoo/<name>``), a revision (a 40-hex commit sha once
published, ``None`` before) and the sha256 of every file, so that ``carlzoo.load(name)``
never loads bytes it has not checked. ``status`` is ``"published"`` only for entries whose
revision and hashes are filled in; until then ``load(name)`` explains how to train the
model locally.

A model folder bundled inside the package (``carlzoo/models/<name>/``) is used offline,
in preference to the Hub, after its files' sha256 are checked against the entry.

This module imports neither torch nor huggingface_hub, so ``carlzoo list`` stays fast.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "ZooError",
    "ZooEntry",
    "REGISTRY",
    "BUNDLED_DIR",
    "list_models",
    "get_entry",
    "did_you_mean",
    "bundled_path",
    "registry_table",
    "sha256_file",
    "pinned_sha256",
    "mismatch_message",
    "verify_files",
    "unpublished_message",
]

BUNDLED_DIR = Path(__file__).resolve().parent / "models"
"""Folder of model folders shipped inside the package (``carlzoo/models/<name>/``)."""

COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")
"""A full git commit sha, as the registry pins and the Hub cache names snapshot folders."""
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
"""A Hub repository id, ``org/name``."""
SHA256 = re.compile(r"^[0-9a-f]{64}$")
"""A hex sha256, as the registry pins and the Hub cache names LFS blobs."""
_STATUSES = ("published", "unpublished")


class ZooError(ValueError):
    """A model cannot be found, fetched, checked or loaded. The message is one line."""


@dataclass(frozen=True)
class ZooEntry:
    """One named model of the zoo."""

    name: str
    repo_id: str  # Hub repository, "carlzoo/<name>"
    dataset: str  # training set, e.g. "cifar10"
    input_size: int  # model input (square), pixels
    revision: str | None = None  # pinned 40-hex commit sha; None while unpublished
    files: dict[str, str] = field(default_factory=dict)  # file name -> sha256 (hex)
    metrics: dict[str, Any] = field(default_factory=dict)  # measured values only
    status: str = "unpublished"
    backbone: str = "resnet18"
    description: str = ""

    def __post_init__(self) -> None:
        if self.status not in _STATUSES:
            raise ValueError(
                f"registry entry {self.name}: status={self.status!r}, "
                f"expected one of {list(_STATUSES)}"
            )
        if self.revision is not None and not COMMIT_SHA.match(self.revision):
            raise ValueError(
                f"registry entry {self.name}: revision must be a 40-hex commit "
                f"sha, got {self.revision!r}"
            )
        for fname, digest in self.files.items():
            if not SHA256.match(digest):
                raise ValueError(
                    f"registry entry {self.name}: sha256 of {fname} must be "
                    f"64 lowercase hex digits, got {digest!r}"
                )
        if self.status == "published" and (
            self.revision is None or not {"config.json", "model.safetensors"} <= set(self.files)
        ):
            raise ValueError(
                f"registry entry {self.name}: a published entry needs a revision "
                "and the sha256 of config.json and model.safetensors"
            )


def _entry(
    name: str, dataset: str, input_size: int, description: str, backbone: str = "resnet18"
) -> ZooEntry:
    return ZooEntry(
        name=name,
        repo_id=f"carlzoo/{name}",
        dataset=dataset,
        input_size=input_size,
        backbone=backbone,
        description=description,
    )


# Nothing is on the Hub yet: every entry is "unpublished" with revision None. Publishing a
# model means filling in revision, files (sha256 of each file in the Hub repository at that
# revision), metrics (measured values only) and status="published".
#
# carl-cifar10 ships inside the package (carlzoo/models/carl-cifar10/): `files` pins the
# bundled folder as `carlzoo export` printed it. The run: training/configs/cifar10_fast.yaml,
# 200 epochs on one H100 (benchmarks/gpu_cifar10.py, the WebP copy of CIFAR-10), measured
# again on the lossless CIFAR-10 test split (benchmarks/RESULTS.md, "GPU runs").
_CARL_CIFAR10 = dataclasses.replace(
    _entry("carl-cifar10", "cifar10", 32, "CARL ResNet-18 (CIFAR stem) on CIFAR-10"),
    files={
        "README.md": "68524dc678717c3a4d8ff3bd79c69b3177930ae5cd41d9cd202476a243dd9e28",
        "config.json": "331e5f0bf8a3299db7a106ea036e8db83940238bc4daadae06278ae94d56b13a",
        "metrics.json": "b72ae9edcc84af737cd50ee9dd58b4cae0cd39451591baa3fb2017350f70efe5",
        "model.safetensors": "ca1a9111f9e3850473d6371a4fdb436bd6b3f80f329eaef8cad3239697152a26",
        "training_config.json": "5b3acf72ea7c582a408ef7d44c4d51484d33d5a9363db64078fdcbb506aeacad",
    },
    metrics={"knn_top1": 78.16, "linear_top1": 83.17, "epochs": 200},
)

REGISTRY: dict[str, ZooEntry] = {
    e.name: e
    for e in (
        _CARL_CIFAR10,
        _entry("carl-cifar100", "cifar100", 32, "CARL ResNet-18 (CIFAR stem) on CIFAR-100"),
        _entry("carl-stl10", "stl10", 96, "CARL ResNet-18 on STL-10 (unlabelled + train)"),
        _entry("carl-tinyimagenet", "tinyimagenet", 64, "CARL ResNet-18 on Tiny ImageNet"),
        _entry("carl-imagenet64", "imagenet64", 64, "CARL ResNet-50 on ImageNet 64x64", "resnet50"),
    )
}


def list_models() -> list[str]:
    """Names of the models in the zoo registry, sorted."""
    return sorted(REGISTRY)


def get_entry(name: str) -> ZooEntry:
    """The registry entry of ``name``; a :class:`ZooError` naming close matches otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ZooError(
            f"unknown zoo model {name!r}: {did_you_mean(name)}known models: "
            f"{', '.join(list_models())}"
        ) from None


def did_you_mean(name: str) -> str:
    """``"did you mean 'carl-cifar10'? "`` for the closest zoo name, or ``""``."""
    close = difflib.get_close_matches(name, list(REGISTRY), n=1)
    return f"did you mean {close[0]!r}? " if close else ""


def bundled_path(name: str) -> Path | None:
    """``BUNDLED_DIR/<name>`` when the package ships that model folder, else None."""
    path = BUNDLED_DIR / name
    return path if (path / "config.json").is_file() else None


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


def pinned_sha256(entry: ZooEntry, fname: str, path: str | Path, *, source: str) -> str:
    """The sha256 ``entry`` pins for ``fname``; ZooError naming ``path`` when it pins none."""
    expected = entry.files.get(fname)
    if expected is None:
        raise ZooError(
            f"{entry.name}: the registry pins no sha256 for {fname}, so the {source} copy "
            f"at {path} is not loaded; add its hash to the registry entry or load the "
            "folder by path"
        )
    return expected


def mismatch_message(
    entry: ZooEntry,
    fname: str,
    path: str | Path,
    *,
    source: str,
    expected: str,
    actual: str,
    advice: str,
) -> str:
    """The one-line message for a file whose sha256 is not the pinned one; ``advice`` ends it."""
    return (
        f"{entry.name}: sha256 mismatch for {fname} from the {source} ({path}): "
        f"expected {expected}, got {actual}; {advice}"
    )


def verify_files(
    entry: ZooEntry,
    folder: str | Path,
    filenames: list[str],
    *,
    source: str,
    advice: str = "the file is corrupt or not the published one: delete it and fetch it again",
) -> None:
    """Check ``folder/<f>`` against ``entry.files[f]`` for each ``f``; ZooError on any problem.

    ``source`` says where the files came from (used in messages), e.g. "bundled folder";
    ``advice`` ends the message of a sha256 mismatch and says what to do.
    """
    folder = Path(folder)
    for fname in filenames:
        if not (folder / fname).is_file():
            hint = "; use backend='torch'" if fname == "model.onnx" else ""
            raise ZooError(f"{entry.name}: {fname} is missing from the {source} {folder}{hint}")
    for fname in filenames:
        path = folder / fname
        expected = pinned_sha256(entry, fname, path, source=source)
        actual = sha256_file(path)
        if actual != expected:
            raise ZooError(
                mismatch_message(
                    entry,
                    fname,
                    path,
                    source=source,
                    expected=expected,
                    actual=actual,
                    advice=advice,
                )
            )


def unpublished_message(name: str) -> str:
    """The one-line explanation given for a registry model that is not published yet."""
    entry = get_entry(name)
    preset = entry.dataset
    return (
        f"zoo model {name!r} is not published yet (no pinned Hub revision and no bundled "
        f"copy); train and load it locally: `carlzoo train --config {preset} --data-root DATA "
        f"--out runs/{name}`, then `carlzoo export runs/{name} --out models/{name}`, then "
        f'`carlzoo.load("models/{name}")`'
    )


def _fmt_metric(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.1f}"
    return "-" if value is None else str(value)


def registry_table() -> list[dict[str, str]]:
    """One row per model for ``carlzoo list``: all values are display strings."""
    rows = []
    for name in list_models():
        e = REGISTRY[name]
        rows.append(
            {
                "name": name,
                "dataset": e.dataset,
                "input": f"{e.input_size}px",
                "backbone": e.backbone,
                "status": e.status,
                "bundled": "yes" if bundled_path(name) else "no",
                "knn_top1": _fmt_metric(e.metrics.get("knn_top1")),
                "linear_top1": _fmt_metric(e.metrics.get("linear_top1")),
                "repo": e.repo_id,
                "revision": e.revision[:12] if e.revision else "-",
            }
        )
    return rows
