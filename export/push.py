"""Publish an exported model folder to the Hugging Face Hub and pin it for the registry.

:func:`push_model` creates the repository if needed (and the branch), uploads the folder as
one commit that makes the branch mirror the folder (files no longer in it are deleted;
``.gitattributes`` is kept), then checks that the commit holds exactly the local files
(LFS sha256 or git blob id of each) and returns the commit sha and the sha256 of every file:
what ``carlzoo/registry.py`` pins. :func:`registry_snippet` prints that entry as Python.

No token (neither ``token`` nor ``HF_TOKEN`` nor a saved login) is an error raised before
any network call.
"""

from __future__ import annotations

import hashlib
import json
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

_REQUIRED = ("config.json", "model.safetensors")


class PushError(ValueError):
    """A push that cannot start or did not complete; the message is one line."""


@dataclass(frozen=True)
class PushResult:
    repo_id: str
    revision: str  # the branch pushed to
    commit_sha: str  # the commit the registry pins
    files: dict[str, str] = field(default_factory=dict)  # file name -> sha256
    commit_url: str = ""


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
    """Files under ``root`` as relative posix paths, sorted; hidden files and folders skipped."""
    out = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and not any(part.startswith(".") for part in rel.split("/")):
            out.append(rel)
    return out


def local_file_hashes(model_dir: str | Path) -> dict[str, str]:
    """sha256 of every file in ``model_dir`` (relative posix paths, sorted; hidden skipped)."""
    root = Path(model_dir)
    return {rel: sha256_file(root / rel) for rel in _model_files(root)}


def _check_model_dir(model_dir: Path) -> None:
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
    _config(model_dir)


def _config(model_dir: Path) -> ZooConfig:
    """The folder's parsed config.json; PushError (one line) when it is not a valid one."""
    try:
        return read_config(model_dir)
    except ZooError as e:
        raise PushError(f"{e}; export the model again with `carlzoo export`") from None


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
    """Upload ``model_dir`` to ``repo_id`` (branch ``revision``, default main) as one commit."""
    model_dir = Path(model_dir)
    _check_model_dir(model_dir)
    if not REPO_ID.match(repo_id):
        raise PushError(f"--repo-id {repo_id!r} is not of the form ORG/NAME")
    branch = revision or "main"
    tok = resolve_token(token)
    if not tok:
        raise PushError(
            "no Hugging Face token: pass --token, set HF_TOKEN or log in with "
            "`hf auth login` (a token with write access to the repository)"
        )
    ids = {name: _file_ids(model_dir / name) for name in _model_files(model_dir)}
    files = {name: sha for name, (sha, _) in ids.items()}
    blob_ids = {name: blob for name, (_, blob) in ids.items()}

    from huggingface_hub import HfApi

    api = HfApi(token=tok, endpoint=endpoint)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if branch != "main":
            api.create_branch(repo_id, branch=branch, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=model_dir,
            revision=branch,
            commit_message=commit_message or f"Upload {model_dir.name} with carlzoo",
            delete_patterns="*",
        )
        sha = info.oid
        remote = {
            f.path: f
            for f in api.list_repo_tree(repo_id, revision=sha, recursive=True)
            if hasattr(f, "blob_id")
        }
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
    )


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
