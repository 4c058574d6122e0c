"""Publish an exported model folder to the Hugging Face Hub and pin it for the registry.

:func:`push_model` creates the repository if needed (and the branch), uploads the folder as
one commit that makes the branch mirror the folder (files no longer in it are deleted;
``.gitattributes`` is kept), then checks that the commit holds exactly the local files
(LFS sha256 or git blob id of each) and returns the commit sha and the sha256 of every file:
what ``carlzoo/registry.py`` pins. :func:`registry_snippet` prints that entry as Python.

Refused before any network call, in one line: no token (neither ``token`` nor ``HF_TOKEN``
nor a saved login), a ``revision`` that is not a git branch name, and a folder that is not a
complete ``carlzoo export`` folder: it must hold config.json, model.safetensors, README.md
(the card), training_config.json and metrics.json, and model.onnx exactly when config.json
records an ONNX export (``provenance.onnx_opset``); nothing else (no hidden file such as
``.env``, no other file or folder: only these files are ever uploaded); and it must load
with :func:`carlzoo.pretrained.from_pretrained` (torch on the CPU, and onnx when model.onnx
is there, whose outputs must match PyTorch's as ``carlzoo export`` checked them). With
``private=True`` an existing public repository is refused before anything is uploaded.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from carlzoo.pretrained import ZooConfig, read_config
from carlzoo.registry import REPO_ID, ZooError, sha256_file

__all__ = [
    "PushError",
    "PushResult",
    "resolve_token",
    "push_model",
    "local_file_hashes",
    "registry_entry",
    "registry_snippet",
]

_REQUIRED = (  # what `carlzoo export` writes, model.onnx aside
    "config.json",
    "model.safetensors",
    "README.md",
    "training_config.json",
    "metrics.json",
)
_ONNX = "model.onnx"
_ALLOWED = frozenset((*_REQUIRED, _ONNX))
_REEXPORT = "export it again with `carlzoo export RUN_DIR --out {dir} --overwrite`"


class PushError(ValueError):
    """A push that cannot start or did not complete; the message is one line."""


@dataclass(frozen=True)
class PushResult:
    repo_id: str
    revision: str  # the branch pushed to
    commit_sha: str  # the commit the registry pins
    files: dict[str, str] = field(default_factory=dict)  # file name -> sha256
    commit_url: str = ""
    deleted: tuple[str, ...] = ()  # files the branch held that the commit removed


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def resolve_token(token: str | None = None) -> str | None:
    """``token``, else ``HF_TOKEN``, else the saved ``hf auth login`` token; no network."""
    if token:
        return token
    from huggingface_hub import get_token

    return get_token()


def _file_ids(path: Path) -> tuple[str, str]:
    """(sha256, git blob id) of one file, read once."""
    sha = hashlib.sha256()
    blob = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            sha.update(chunk)
            blob.update(chunk)
    return sha.hexdigest(), blob.hexdigest()


def _model_files(root: Path) -> list[str]:
    """The model-folder files in ``root`` (names, sorted): what is hashed and uploaded."""
    return sorted(p.name for p in root.iterdir() if p.name in _ALLOWED and p.is_file())


def local_file_hashes(model_dir: str | Path) -> dict[str, str]:
    """sha256 of every model-folder file in ``model_dir`` (names, sorted)."""
    root = Path(model_dir)
    return {rel: sha256_file(root / rel) for rel in _model_files(root)}


def _reexport(model_dir: Path) -> str:
    return _REEXPORT.format(dir=model_dir)


def _check_model_dir(model_dir: Path) -> ZooConfig:
    """The cheap checks of the folder (no loading): its files and config.json."""
    if not model_dir.is_dir():
        raise PushError(
            f"{model_dir} is not a folder; export a model first with "
            "`carlzoo export RUN_DIR --out MODEL_DIR`"
        )
    missing = [f for f in _REQUIRED if not (model_dir / f).is_file()]
    if missing:
        raise PushError(
            f"{model_dir} is not an exported model folder (missing "
            f"{', '.join(missing)}); create it with `carlzoo export`"
        )
    others = sorted(
        p.name + ("/" if p.is_dir() else "")
        for p in model_dir.iterdir()
        if p.name not in _ALLOWED or not p.is_file()
    )
    if others:
        hidden = any(n.startswith(".") for n in others)
        raise PushError(
            f"{model_dir} holds {', '.join(others)}, not part of an exported model folder"
            f"{' (a hidden file may hold secrets)' if hidden else ''}; move them out of the "
            f"folder: push publishes exactly the files `carlzoo export` writes"
        )
    cfg = _config(model_dir)
    opset = cfg.provenance.get("onnx_opset")
    has_onnx = (model_dir / _ONNX).is_file()
    if has_onnx and opset is None:
        raise PushError(
            f"{model_dir / _ONNX} is not recorded in config.json (provenance onnx_opset is "
            f"null), so config.json and README.md say the model has no ONNX export; "
            f"{_reexport(model_dir)}, or remove {_ONNX}"
        )
    if opset is not None and not has_onnx:
        raise PushError(
            f"config.json records an ONNX export (opset {opset}) but {model_dir} has no "
            f"{_ONNX}; {_reexport(model_dir)} (with --no-onnx for a model without it)"
        )
    for name in ("training_config.json", "metrics.json"):
        try:
            json.loads((model_dir / name).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise PushError(
                f"cannot read {model_dir / name}: {_one_line(e)}; {_reexport(model_dir)}"
            ) from None
    card = model_dir / "README.md"
    try:
        from carlzoo.export.card import parse_front_matter

        meta = parse_front_matter(card.read_text(encoding="utf-8"))
    except Exception as e:  # yaml raises several types
        raise PushError(f"cannot read the model card {card}: {_one_line(e)}") from None
    if not meta:
        raise PushError(
            f"{card} is not a model card (no YAML front matter); {_reexport(model_dir)}"
        )
    return cfg


def _check_model_loads(model_dir: Path, cfg: ZooConfig) -> None:
    """Load the folder as ``carlzoo.load`` would (torch on the CPU; onnx too when model.onnx
    is there) and compare the two on :func:`carlzoo.export.onnx.parity_inputs` with the
    limit ``carlzoo export`` used; PushError (one line) when it does not load or they differ."""
    from carlzoo.export.onnx import PARITY_TOL, onnx_parity, parity_failure, parity_inputs
    from carlzoo.pretrained import from_pretrained

    try:
        model = from_pretrained(model_dir, device="cpu", backend="torch")
        if (model_dir / _ONNX).is_file():
            from_pretrained(model_dir, backend="onnx")
            res = onnx_parity(model, model_dir / _ONNX, parity_inputs(cfg.preprocessing.input_size))
            dtype = cfg.provenance.get("weights_dtype")
            failure = parity_failure(res, PARITY_TOL.get(str(dtype), PARITY_TOL["float32"]))
            if failure:
                raise PushError(
                    f"{model_dir / _ONNX} does not reproduce model.safetensors ({failure}); "
                    f"{_reexport(model_dir)}"
                )
    except PushError:
        raise
    except Exception as e:  # ZooError, onnxruntime's and torch's own errors alike
        why = " ".join(str(e).split()) if isinstance(e, ZooError) else _one_line(e)
        raise PushError(f"{model_dir} does not load: {why}; {_reexport(model_dir)}") from None


def _config(model_dir: Path) -> ZooConfig:
    """The folder's parsed config.json; PushError (one line) when it is not a valid one."""
    try:
        return read_config(model_dir)
    except ZooError as e:
        raise PushError(f"{e}; export the model again with `carlzoo export`") from None


_SHA = re.compile(r"[0-9a-f]{40}")
_REF_BAD = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]")


def _branch_problem(branch: str) -> str | None:
    """Why ``branch`` cannot name a git branch on the Hub (git check-ref-format), or None."""
    if not branch:
        return "it is empty"
    if branch.startswith("refs/"):
        return "it is a full ref; give the branch name alone"
    if _SHA.fullmatch(branch):
        return "it is a commit sha, and a push goes to a branch"
    bad = _REF_BAD.search(branch)
    if bad:
        char = "a space" if bad.group() == " " else repr(bad.group())
        return f"it contains {char}"
    for part, why in (("..", "'..'"), ("@{", "'@{'"), ("//", "'//'")):
        if part in branch:
            return f"it contains {why}"
    if branch in ("@", "HEAD") or branch.startswith(("-", "/")) or branch.endswith(("/", ".")):
        return "git does not allow that name"
    if any(c.startswith(".") or c.endswith(".lock") for c in branch.split("/")):
        return "a part of it starts with '.' or ends with '.lock'"
    return None


def push_model(
    model_dir: str | Path,
    repo_id: str,
    *,
    revision: str | None = None,
    private: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
    endpoint: str | None = None,
) -> PushResult:
    """Upload ``model_dir`` to ``repo_id`` (branch ``revision``, default main) as one commit.

    ``private`` creates a new repository as private and refuses an existing public one.
    """
    model_dir = Path(model_dir)
    cfg = _check_model_dir(model_dir)
    if not REPO_ID.match(repo_id):
        raise PushError(f"--repo-id {repo_id!r} is not of the form ORG/NAME")
    branch = "main" if revision is None else revision
    why = _branch_problem(branch)
    if why:
        raise PushError(
            f"--revision {branch!r} is not a branch name ({why}); use one such as main or v1"
        )
    tok = resolve_token(token)
    if not tok:
        raise PushError(
            "no Hugging Face token: pass --token, set HF_TOKEN or log in with "
            "`hf auth login` (a token with write access to the repository)"
        )
    _check_model_loads(model_dir, cfg)
    names = _model_files(model_dir)
    ids = {name: _file_ids(model_dir / name) for name in names}
    files = {name: sha for name, (sha, _) in ids.items()}
    blob_ids = {name: blob for name, (_, blob) in ids.items()}

    from huggingface_hub import HfApi

    api = HfApi(token=tok, endpoint=endpoint)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        visibility = api.repo_info(repo_id).private if private else True
    except Exception as e:  # network and Hub errors alike: one line, no traceback
        raise PushError(
            f"push of {model_dir} to {repo_id}@{branch} failed: {_one_line(e)}"
        ) from None
    if visibility is not True:  # create_repo(exist_ok=True) leaves an existing repo as it is
        state = "is public" if visibility is False else "does not say it is private"
        raise PushError(
            f"--private: the existing repository {repo_id} {state}, so the model would be "
            "public; make the repository private on the Hub (Settings) first, or push "
            "without --private"
        )
    try:
        if branch != "main":
            api.create_branch(repo_id, branch=branch, exist_ok=True)
        before = _branch_files(api, repo_id, branch)
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=model_dir,
            revision=branch,
            commit_message=commit_message or f"Upload {model_dir.resolve().name} with carlzoo",
            allow_patterns=names,  # never a file that appeared after the checks (a .env)
            delete_patterns="*",
        )
        sha = info.oid
        remote = _tree(api, repo_id, sha)
    except Exception as e:  # network and Hub errors alike: one line, no traceback
        raise PushError(
            f"push of {model_dir} to {repo_id}@{branch} failed: {_one_line(e)}"
        ) from None
    extra = sorted(set(remote) - set(files) - {".gitattributes"})
    missing = sorted(set(files) - set(remote))
    if extra or missing:
        raise PushError(
            f"commit {sha} of {repo_id} does not mirror {model_dir}: missing "
            f"{missing or 'none'}, unexpected {extra or 'none'}"
        )
    for name, f in remote.items():
        if name not in files:
            continue
        ok = f.lfs.sha256 == files[name] if f.lfs is not None else f.blob_id == blob_ids[name]
        if not ok:
            raise PushError(
                f"commit {sha} of {repo_id} holds a different {name} than "
                f"{model_dir / name}; push again"
            )
    return PushResult(
        repo_id=repo_id,
        revision=branch,
        commit_sha=sha,
        files=files,
        commit_url=str(getattr(info, "commit_url", "")),
        deleted=tuple(sorted(before - set(files) - {".gitattributes"})),
    )


def _tree(api: Any, repo_id: str, revision: str) -> dict[str, Any]:
    """The files of ``revision`` by path (folders left out)."""
    tree = api.list_repo_tree(repo_id, revision=revision, recursive=True)
    return {f.path: f for f in tree if hasattr(f, "blob_id")}


def _branch_files(api: Any, repo_id: str, branch: str) -> set[str]:
    """The files on ``branch`` (none on a new repository's empty main)."""
    from huggingface_hub.utils import EntryNotFoundError, RevisionNotFoundError

    try:
        return set(_tree(api, repo_id, branch))
    except (RevisionNotFoundError, EntryNotFoundError):
        return set()


def registry_entry(
    result: PushResult, model_dir: str | Path, name: str | None = None
) -> dict[str, Any]:
    """The ``ZooEntry`` fields for ``carlzoo/registry.py`` as a plain dict."""
    cfg = _config(Path(model_dir))
    metrics = {
        k: v
        for k, v in cfg.metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    dataset = str(cfg.provenance.get("dataset") or "")
    backbone = cfg.architecture.backbone
    return {
        "name": name or cfg.name or result.repo_id.split("/", 1)[1],
        "repo_id": result.repo_id,
        "dataset": dataset,
        "input_size": cfg.preprocessing.input_size,
        "revision": result.commit_sha,
        "files": dict(result.files),
        "metrics": metrics,
        "status": "published",
        "backbone": backbone,
        "description": f"CARL {backbone} on {dataset}" if dataset else f"CARL {backbone}",
    }


def _py(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value)  # a valid Python string literal too
    return repr(value)


def registry_snippet(entry: dict[str, Any]) -> str:
    """``ZooEntry(...)`` source text for an entry dict (see :func:`registry_entry`)."""
    lines = ["ZooEntry("]
    for key, value in entry.items():
        if isinstance(value, dict) and value:
            lines.append(f"    {key}={{")
            lines += [f"        {_py(k)}: {_py(v)}," for k, v in value.items()]
            lines.append("    },")
        else:
            lines.append(f"    {key}={_py(value)},")
    lines.append(")")
    return "\n".join(lines)
