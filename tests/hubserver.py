"""A small Hugging Face Hub-compatible HTTP server for the test suite.

No machine that runs these tests reaches the real Hub, so the tests run the real
``huggingface_hub`` client against this server: stdlib ``http.server`` in a daemon thread on
``127.0.0.1``. Point the client at it by setting ``HF_ENDPOINT`` *before* ``huggingface_hub``
is imported (``tests/conftest.py`` does this and provides the session fixture ``local_hub``).

    with LocalHub() as hub:                               # or hub.start() / hub.stop()
        sha = hub.add_repo_files("org/name", {"config.json": b"{}"})
        ...  # hf_hub_download(..., endpoint=hub.endpoint)

What it emulates (checked against the huggingface_hub 2.4 client source):

* downloads: ``HEAD``/``GET /{repo}/resolve/{rev}/{path}`` with ``X-Repo-Commit``, ``ETag`` (the
  git blob sha1) and, for LFS files, ``X-Linked-Etag`` (sha256) and ``X-Linked-Size``; single
  ``Range`` requests; 404 errors carrying ``X-Error-Code`` ``RepoNotFound`` /
  ``RevisionNotFound`` / ``EntryNotFound`` (the latter with ``X-Repo-Commit``), which the client
  maps to ``RepositoryNotFoundError`` / ``RevisionNotFoundError`` / ``EntryNotFoundError``;
* ``GET /api/{models,datasets}/{repo}[/revision/{rev}]`` (``sha``, ``siblings``, ``cardData``),
  ``GET .../tree/{rev}[/{path}]?recursive=`` and ``GET .../refs``;
* uploads: ``POST /api/repos/create`` (409 with ``url`` when the repo exists; a new repo starts
  with a ``.gitattributes`` commit, as on the Hub), ``POST /api/repos/delete``,
  ``POST .../branch/{name}``, ``POST .../preupload/{rev}`` (LFS for the Hub's default
  ``.gitattributes`` suffixes, binary samples and files >= 10 MiB; ``oid`` of the current file so
  the client skips unchanged files), the LFS batch API ``POST /{repo}.git/info/lfs/objects/batch``
  with basic ``PUT`` transfer and ``verify`` (contents are checked against their sha256), and
  ``POST .../commit/{rev}`` (NDJSON: ``header``, ``file``, ``lfsFile``, ``deletedFile``,
  ``deletedFolder``; ``parentCommit`` is enforced);
* ``POST /api/validate-yaml``: the README front matter must be a YAML mapping; ``tags`` /
  ``datasets`` must be strings or lists of strings and ``model-index`` must have the shape the
  Hub documents (name, results with task.type, dataset name/type, metrics type/value). Missing
  front matter gives the Hub's warning;
* ``GET /api/agent-harnesses``: huggingface_hub 2.x fetches this registry from ``HF_ENDPOINT``
  the first time it builds a user agent; the server answers with an empty registry.

What it does not emulate: authentication and permissions (any token, or none, is accepted;
private repos are readable by everyone), Xet storage (set ``HF_HUB_DISABLE_XET=1`` so the client
uses LFS), pagination (every listing is one page), CDN redirects for LFS files (they are served
directly from ``/resolve``), LFS pointer files in git (only their blob ids are computed), tags,
pull requests and ``create_pr``, multipart LFS uploads, ``.gitignore`` handling, Spaces,
persistence (everything lives in memory and is lost on ``stop()``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import socket
import threading
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NamedTuple
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

__all__ = ["LocalHub", "Request", "pick_free_port", "LFS_SUFFIXES"]

# The Hub's default .gitattributes for new repos (the suffix rules of it).
LFS_SUFFIXES: tuple[str, ...] = (
    ".7z", ".arrow", ".bin", ".bz2", ".ckpt", ".ftz", ".gz", ".h5", ".joblib", ".mlmodel",
    ".model", ".msgpack", ".npy", ".npz", ".onnx", ".ot", ".parquet", ".pb", ".pickle", ".pkl",
    ".pt", ".pth", ".rar", ".safetensors", ".tar", ".tflite", ".tgz", ".wasm", ".xz", ".zip",
    ".zst",
)  # fmt: skip
LFS_MIN_SIZE = 10 * 1024 * 1024  # the Hub stores files from 10 MiB up in LFS
_REPO_TYPES = {"models": "model", "datasets": "dataset"}
_URL_PREFIX = {"model": "", "dataset": "datasets/"}
_SHA1 = re.compile(r"[0-9a-f]{40}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_EPOCH = "2024-01-01T00:00:00.000Z"


def pick_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (bind to port 0, read it, release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return (
        f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()
    )


def _gitattributes() -> bytes:
    lines = [f"*{s} filter=lfs diff=lfs merge=lfs -text" for s in LFS_SUFFIXES]
    return ("\n".join(lines) + "\n").encode()


def _wants_lfs(path: str, size: int, sample: bytes) -> bool:
    return path.endswith(LFS_SUFFIXES) or size >= LFS_MIN_SIZE or b"\0" in sample


@dataclass(frozen=True)
class _File:
    sha256: str
    size: int
    lfs: bool

    @property
    def pointer(self) -> bytes:
        return _lfs_pointer(self.sha256, self.size)

    def blob_id(self, data: bytes) -> str:
        """git blob sha1 of what git holds: the content, or the LFS pointer."""
        return _git_blob_id(self.pointer if self.lfs else data)


@dataclass(frozen=True)
class _Commit:
    sha: str
    parent: str | None
    files: Mapping[str, _File]
    title: str


@dataclass
class _Repo:
    repo_type: str
    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, _Commit] = field(default_factory=dict)

    def resolve(self, revision: str) -> _Commit | None:
        if revision in self.branches:
            return self.commits[self.branches[revision]]
        return self.commits.get(revision) if _SHA1.fullmatch(revision) else None


class Request(NamedTuple):
    """One request the server received (for tests that check what the client sent)."""

    method: str
    path: str
    authorization: str | None
    status: int  # the status the server answered with


class _HubError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers = headers or {}


class LocalHub:
    """An in-memory Hub on ``127.0.0.1``; see the module docstring for what it emulates.

    ``port=0`` picks a free port when the server starts. ``requests`` logs every request,
    ``errors`` the tracebacks of server bugs (answered with 500).
    """

    def __init__(self, port: int = 0, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = port
        self.requests: list[Request] = []
        self.errors: list[str] = []  # tracebacks of server bugs (answered with 500)
        self._repos: dict[tuple[str, str], _Repo] = {}
        self._blobs: dict[str, bytes] = {}  # sha256 -> content (git and LFS files alike)
        self._lfs: set[str] = set()  # sha256 of objects uploaded through the LFS API
        self._counter = 0
        self._lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle ---------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:PORT``: the value for ``HF_ENDPOINT``."""
        return f"http://{self.host}:{self.port}"

    def start(self) -> LocalHub:
        if self._server is not None:
            return self
        server = ThreadingHTTPServer((self.host, self.port), _Handler)
        server.daemon_threads = True
        server.hub = self  # type: ignore[attr-defined]
        self.port = int(server.server_address[1])
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name=f"LocalHub:{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- direct access for tests ---------------------------------------------------------
    def add_repo_files(
        self,
        repo_id: str,
        files: dict[str, bytes],
        revision: str = "main",
        repo_type: str = "model",
        message: str = "Add files",
    ) -> str:
        """Commit ``files`` to branch ``revision`` (repo and branch created when missing).

        Returns the new 40-hex commit sha.
        """
        with self._lock:
            repo = self._repos.get((repo_type, repo_id)) or self._create_repo(
                repo_type, repo_id, False
            )
            if revision not in repo.branches:
                repo.branches[revision] = repo.branches["main"]
            changes: dict[str, _File | None] = {}
            for path, data in files.items():
                changes[path] = self._store(data, _wants_lfs(path, len(data), data[:512]))
            return self._commit(repo, revision, changes, message)

    def head(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> str:
        """Commit sha that ``revision`` points to."""
        with self._lock:
            return self._revision(repo_type, repo_id, revision).sha

    def read_file(
        self, repo_id: str, path: str, revision: str = "main", repo_type: str = "model"
    ) -> bytes:
        with self._lock:
            return self._blobs[self._file(repo_type, repo_id, revision, path).sha256]

    def list_files(
        self, repo_id: str, revision: str = "main", repo_type: str = "model"
    ) -> list[str]:
        with self._lock:
            return sorted(self._revision(repo_type, repo_id, revision).files)

    def is_lfs(
        self, repo_id: str, path: str, revision: str = "main", repo_type: str = "model"
    ) -> bool:
        with self._lock:
            return self._file(repo_type, repo_id, revision, path).lfs

    # ---- state (call with the lock held) ---------------------------------------------------
    def _repo(self, repo_type: str, repo_id: str) -> _Repo:
        repo = self._repos.get((repo_type, repo_id))
        if repo is None:
            raise _HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    def _revision(self, repo_type: str, repo_id: str, revision: str) -> _Commit:
        commit = self._repo(repo_type, repo_id).resolve(revision)
        if commit is None:
            raise KeyError(f"{repo_id}: no revision {revision!r}")
        return commit

    def _file(self, repo_type: str, repo_id: str, revision: str, path: str) -> _File:
        commit = self._repo(repo_type, repo_id).resolve(revision)
        if commit is None or path not in commit.files:
            raise KeyError(f"{repo_id}@{revision}: no file {path!r}")
        return commit.files[path]

    def _store(self, data: bytes, lfs: bool) -> _File:
        sha = hashlib.sha256(data).hexdigest()
        self._blobs[sha] = data
        return _File(sha, len(data), lfs and len(data) > 0)

    def _create_repo(self, repo_type: str, repo_id: str, private: bool) -> _Repo:
        repo = _Repo(repo_type, repo_id, private)
        self._repos[(repo_type, repo_id)] = repo
        self._commit(
            repo, "main", {".gitattributes": self._store(_gitattributes(), False)}, "initial commit"
        )
        return repo

    def _commit(
        self,
        repo: _Repo,
        branch: str,
        changes: Mapping[str, _File | None],
        title: str,
        deleted_folders: tuple[str, ...] = (),
    ) -> str:
        parent = repo.branches.get(branch)
        files = dict(repo.commits[parent].files) if parent else {}
        for folder in deleted_folders:
            prefix = folder.rstrip("/") + "/"
            files = {p: f for p, f in files.items() if not p.startswith(prefix)}
        for path, entry in changes.items():
            if entry is None:
                files.pop(path, None)
            else:
                files[path] = entry
        self._counter += 1
        listing = "\n".join(f"{p} {f.sha256} {int(f.lfs)}" for p, f in sorted(files.items()))
        sha = hashlib.sha1(
            f"{repo.repo_id}\n{parent}\n{title}\n{self._counter}\n{listing}".encode()
        ).hexdigest()
        repo.commits[sha] = _Commit(sha, parent, files, title)
        repo.branches[branch] = sha
        return sha

    def _entry_json(self, path: str, f: _File) -> dict[str, Any]:
        out: dict[str, Any] = {
            "type": "file",
            "oid": f.blob_id(self._blobs[f.sha256]),
            "size": f.size,
            "path": path,
        }
        if f.lfs:
            out["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": len(f.pointer)}
        return out

    def _card_data(self, commit: _Commit) -> dict[str, Any] | None:
        readme = commit.files.get("README.md")
        if readme is None:
            return None
        front, _ = _front_matter(self._blobs[readme.sha256].decode("utf-8", "replace"))
        try:
            data = yaml.safe_load(front) if front is not None else None
        except yaml.YAMLError:
            return None
        return data if isinstance(data, dict) else None

    def _url(self, repo: _Repo) -> str:
        return f"{self.endpoint}/{_URL_PREFIX[repo.repo_type]}{repo.repo_id}"


def _front_matter(text: str) -> tuple[str | None, str]:
    """(YAML front matter or None, the rest) of a model card."""
    m = re.match(r"\A---[ \t]*\r?\n(.*?)^---[ \t]*$", text, re.S | re.M)
    if m is None:
        return None, text
    return m.group(1), text[m.end() :]


def _yaml_errors(content: str) -> tuple[list[str], list[str]]:
    """(errors, warnings) for a README, a subset of the Hub's metadata checks."""
    front, _ = _front_matter(content)
    if front is None:
        return [], ["empty or missing yaml metadata in repo card"]
    try:
        meta = yaml.safe_load(front)
    except yaml.YAMLError as e:
        return [f"Invalid YAML in README.md front matter: {str(e).splitlines()[0]}"], []
    if meta is None:
        return [], ["empty or missing yaml metadata in repo card"]
    if not isinstance(meta, dict):
        return ["README.md front matter must be a YAML mapping"], []
    errors: list[str] = []
    for key in ("tags", "datasets", "language", "license"):
        value = meta.get(key)
        if value is None:
            continue
        items = value if isinstance(value, list) else [value]
        if not all(isinstance(v, str) for v in items):
            errors.append(f'"{key}" must be a string or a list of strings')
    if "model-index" in meta:
        errors.extend(_model_index_errors(meta["model-index"]))
    return errors, []


def _model_index_errors(index: Any) -> list[str]:
    bad = '"model-index"'
    if not isinstance(index, list) or not index:
        return [f"{bad} must be a non-empty list"]
    errors: list[str] = []
    for i, model in enumerate(index):
        where = f"{bad}[{i}]"
        if not isinstance(model, dict) or not isinstance(model.get("name"), str):
            errors.append(f"{where} must be a mapping with a string name")
            continue
        results = model.get("results")
        if not isinstance(results, list):
            errors.append(f"{where}.results must be a list")
            continue
        for j, res in enumerate(results):
            w = f"{where}.results[{j}]"
            if not isinstance(res, dict):
                errors.append(f"{w} must be a mapping")
                continue
            task = res.get("task")
            if not isinstance(task, dict) or not isinstance(task.get("type"), str):
                errors.append(f"{w}.task.type is required")
            dataset = res.get("dataset")
            if dataset is not None and not (
                isinstance(dataset, dict)
                and isinstance(dataset.get("name"), str)
                and isinstance(dataset.get("type"), str)
            ):
                errors.append(f"{w}.dataset needs a string name and type")
            metrics = res.get("metrics")
            if not isinstance(metrics, list) or not metrics:
                errors.append(f"{w}.metrics must be a non-empty list")
                continue
            for k, metric in enumerate(metrics):
                if not (
                    isinstance(metric, dict)
                    and isinstance(metric.get("type"), str)
                    and "value" in metric
                    and isinstance(metric["value"], (int, float, str))
                ):
                    errors.append(f"{w}.metrics[{k}] needs a string type and a value")
    return errors


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "LocalHub/1"

    @property
    def hub(self) -> LocalHub:
        return self.server.hub  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass  # quiet: the request log is LocalHub.requests

    # ---- plumbing ------------------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802
        self._dispatch("GET")

    def do_HEAD(self) -> None:  # noqa: N802
        self._dispatch("HEAD")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._dispatch("PUT")

    def do_DELETE(self) -> None:  # noqa: N802
        self._dispatch("DELETE")

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _json_body(self, body: bytes) -> Any:
        try:
            return json.loads(body or b"{}")
        except ValueError:
            raise _HubError(400, "request body is not valid JSON") from None

    def _send(
        self,
        status: int,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> None:
        self._status = status
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(
        self,
        obj: Any,
        status: int = 200,
        headers: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> None:
        self._send(status, json.dumps(obj).encode(), headers, content_type)

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        self._status = 0
        body = self._read_body() if method in ("POST", "PUT", "DELETE") else b""
        parts = [unquote(p) for p in url.path.split("/")[1:]]
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        try:
            with self.hub._lock:
                self._route(method, parts, query, body)
        except _HubError as e:
            headers = dict(e.headers)
            if e.code:
                headers["X-Error-Code"] = e.code
            headers["X-Error-Message"] = e.message
            self._send_json({"error": e.message}, e.status, headers)
        except Exception as e:  # a bug in the server: answer, and keep the traceback for tests
            self.hub.errors.append(traceback.format_exc())
            self._send_json({"error": f"LocalHub internal error: {e!r}"}, 500)
        finally:
            self.hub.requests.append(
                Request(method, url.path, self.headers.get("Authorization"), self._status)
            )

    def _route(self, method: str, p: list[str], query: dict[str, str], body: bytes) -> None:
        n = len(p)
        if p[:1] == ["api"]:
            if p == ["api", "agent-harnesses"] and method == "GET":
                return self._send_json({"standardEnvVars": [], "harnesses": {}})
            if p == ["api", "repos", "create"] and method == "POST":
                return self._create_repo(self._json_body(body))
            if p == ["api", "repos", "delete"] and method in ("POST", "DELETE"):
                return self._delete_repo(self._json_body(body))
            if p == ["api", "validate-yaml"] and method == "POST":
                return self._validate_yaml(self._json_body(body))
            if n >= 4 and p[1] in _REPO_TYPES:
                repo = self.hub._repo(_REPO_TYPES[p[1]], f"{p[2]}/{p[3]}")
                action, rest = (p[4] if n > 4 else None), p[5:]
                if action is None and method == "GET":
                    return self._repo_info(repo, "main")
                if action == "revision" and rest and method == "GET":
                    return self._repo_info(repo, rest[0])
                if action == "tree" and rest and method == "GET":
                    return self._tree(repo, rest[0], "/".join(rest[1:]), query)
                if action == "refs" and method == "GET":
                    return self._refs(repo)
                if action == "branch" and rest and method == "POST":
                    return self._create_branch(repo, "/".join(rest), self._json_body(body))
                if action == "preupload" and rest and method == "POST":
                    return self._preupload(repo, rest[0], self._json_body(body))
                if action == "commit" and rest and method == "POST":
                    return self._create_commit(repo, rest[0], body, query)
        if p[:1] == ["lfs-objects"] and n >= 2:
            if n == 2 and method == "PUT":
                return self._lfs_put(p[1], body)
            if n == 3 and p[2] == "verify" and method == "POST":
                return self._lfs_verify(p[1], self._json_body(body))
        repo_type = "dataset" if p[:1] == ["datasets"] else "model"
        q = p[1:] if repo_type == "dataset" else p
        if len(q) == 6 and q[1].endswith(".git") and q[2:] == ["info", "lfs", "objects", "batch"]:
            self.hub._repo(repo_type, f"{q[0]}/{q[1][:-4]}")
            if method == "POST":
                return self._lfs_batch(self._json_body(body))
        if len(q) >= 5 and q[2] == "resolve" and method in ("GET", "HEAD"):
            repo = self.hub._repo(repo_type, f"{q[0]}/{q[1]}")
            return self._resolve(repo, q[3], "/".join(q[4:]))
        raise _HubError(404, f"LocalHub does not emulate {method} {'/'.join(p)}")

    def _commit_of(self, repo: _Repo, revision: str) -> _Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise _HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    # ---- repos and branches -------------------------------------------------------------
    def _create_repo(self, payload: dict[str, Any]) -> None:
        repo_type = payload.get("type") or "model"
        if repo_type not in _URL_PREFIX:
            raise _HubError(400, f"LocalHub does not emulate repos of type {repo_type!r}")
        name, org = payload.get("name"), payload.get("organization")
        if not isinstance(name, str) or not isinstance(org, str) or not name or not org:
            raise _HubError(400, "LocalHub needs repo ids of the form namespace/name")
        repo_id = f"{org}/{name}"
        existing = self.hub._repos.get((repo_type, repo_id))
        if existing is not None:
            return self._send_json(
                {"error": "You already created this model repo", "url": self.hub._url(existing)},
                409,
            )
        private = payload.get("private") is True or payload.get("visibility") == "private"
        repo = self.hub._create_repo(repo_type, repo_id, private)
        self._send_json({"url": self.hub._url(repo), "name": repo_id, "id": repo_id})

    def _delete_repo(self, payload: dict[str, Any]) -> None:
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization')}/{payload.get('name')}"
        self.hub._repo(repo_type, repo_id)
        del self.hub._repos[(repo_type, repo_id)]
        self._send(200)

    def _create_branch(self, repo: _Repo, branch: str, payload: dict[str, Any]) -> None:
        if branch in repo.branches:
            raise _HubError(409, f"Reference already exists: refs/heads/{branch}")
        start = self._commit_of(repo, payload.get("startingPoint") or "main")
        repo.branches[branch] = start.sha
        self._send(200)

    def _repo_info(self, repo: _Repo, revision: str) -> None:
        commit = self._commit_of(repo, revision)
        info: dict[str, Any] = {
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "private": repo.private,
            "sha": commit.sha,
            "lastModified": _EPOCH,
            "createdAt": _EPOCH,
            "disabled": False,
            "gated": False,
            "tags": [],
            "siblings": [{"rfilename": path} for path in sorted(commit.files)],
        }
        card = self.hub._card_data(commit)
        if card is not None:
            info["cardData"] = card
            for key in ("library_name", "pipeline_tag"):
                if isinstance(card.get(key), str):
                    info[key] = card[key]
        self._send_json(info)

    def _refs(self, repo: _Repo) -> None:
        branches = [
            {"name": b, "ref": f"refs/heads/{b}", "targetCommit": sha}
            for b, sha in sorted(repo.branches.items())
        ]
        self._send_json({"branches": branches, "converts": [], "tags": [], "pullRequests": []})

    def _tree(self, repo: _Repo, revision: str, path: str, query: dict[str, str]) -> None:
        commit = self._commit_of(repo, revision)
        recursive = query.get("recursive", "false").lower() in ("1", "true")
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        under = {p: f for p, f in commit.files.items() if p.startswith(prefix)}
        if prefix and not under:
            raise _HubError(
                404,
                f"{path} does not exist on {revision}",
                "EntryNotFound",
                {"X-Repo-Commit": commit.sha},
            )
        entries: dict[str, dict[str, Any]] = {}
        for full, f in sorted(under.items()):
            rel = full[len(prefix) :].split("/")
            for depth in range(1, len(rel)):  # the folders on the way
                folder = prefix + "/".join(rel[:depth])
                if depth > 1 and not recursive:
                    break
                entries.setdefault(
                    folder,
                    {
                        "type": "directory",
                        "size": 0,
                        "path": folder,
                        "oid": hashlib.sha1(f"tree {commit.sha} {folder}".encode()).hexdigest(),
                    },
                )
            if recursive or len(rel) == 1:
                entries[full] = self.hub._entry_json(full, f)
        self._send_json([entries[k] for k in sorted(entries)])

    def _validate_yaml(self, payload: dict[str, Any]) -> None:
        content = payload.get("content")
        if not isinstance(content, str):
            raise _HubError(400, "validate-yaml needs a string 'content'")
        errors, warnings = _yaml_errors(content)
        messages = {
            "errors": [{"message": m} for m in errors],
            "warnings": [{"message": m} for m in warnings],
        }
        self._send_json(messages, 400 if errors else 200)

    # ---- uploads --------------------------------------------------------------------------
    def _preupload(self, repo: _Repo, revision: str, payload: dict[str, Any]) -> None:
        commit = self._commit_of(repo, revision)
        out = []
        for item in payload.get("files", []):
            path, size = item["path"], int(item["size"])
            try:
                sample = base64.b64decode(item.get("sample", ""))
            except (binascii.Error, ValueError):
                raise _HubError(400, f"{path}: sample is not base64") from None
            lfs = _wants_lfs(path, size, sample)
            current = commit.files.get(path)
            oid = None
            if current is not None:
                oid = (
                    current.sha256
                    if current.lfs
                    else current.blob_id(self.hub._blobs[current.sha256])
                )
            out.append(
                {
                    "path": path,
                    "uploadMode": "lfs" if lfs else "regular",
                    "shouldIgnore": False,
                    "oid": oid,
                }
            )
        self._send_json({"files": out, "commitOid": commit.sha})

    def _lfs_batch(self, payload: dict[str, Any]) -> None:
        if payload.get("operation") != "upload":
            raise _HubError(400, "LocalHub emulates only LFS uploads")
        objects = []
        for obj in payload.get("objects", []):
            oid, size = obj.get("oid"), obj.get("size")
            if not isinstance(oid, str) or not _SHA256.fullmatch(oid) or not isinstance(size, int):
                objects.append(
                    {
                        "oid": str(oid),
                        "size": size or 0,
                        "error": {"code": 422, "message": "invalid oid or size"},
                    }
                )
                continue
            entry: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if oid not in self.hub._lfs:
                base = f"{self.hub.endpoint}/lfs-objects/{oid}"
                entry["actions"] = {
                    "upload": {"href": base, "header": {}},
                    "verify": {"href": f"{base}/verify", "header": {}},
                }
            objects.append(entry)
        self._send_json(
            {"transfer": "basic", "objects": objects}, content_type="application/vnd.git-lfs+json"
        )

    def _lfs_put(self, oid: str, body: bytes) -> None:
        if hashlib.sha256(body).hexdigest() != oid:
            raise _HubError(400, f"uploaded content does not match LFS oid {oid}")
        self.hub._blobs[oid] = body
        self.hub._lfs.add(oid)
        self._send(200)

    def _lfs_verify(self, oid: str, payload: dict[str, Any]) -> None:
        if oid not in self.hub._lfs or payload.get("size") != len(self.hub._blobs[oid]):
            raise _HubError(404, f"LFS object {oid} was not uploaded (or has another size)")
        self._send_json({"message": "verified"})

    def _create_commit(
        self, repo: _Repo, revision: str, body: bytes, query: dict[str, str]
    ) -> None:
        if query.get("create_pr") in ("1", "true"):
            raise _HubError(400, "LocalHub does not emulate pull requests (create_pr)")
        if revision not in repo.branches:
            raise _HubError(
                404, f"Invalid rev id: {revision} (commits go to a branch)", "RevisionNotFound"
            )
        try:
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        except ValueError:
            raise _HubError(400, "commit payload is not NDJSON") from None
        if not lines or lines[0].get("key") != "header":
            raise _HubError(400, "commit payload must start with a header line")
        header = lines[0].get("value", {})
        parent = header.get("parentCommit")
        if parent is not None and parent != repo.branches[revision]:
            raise _HubError(412, f"parentCommit {parent} is not the head of {revision}")
        head = repo.commits[repo.branches[revision]]
        changes: dict[str, _File | None] = {}
        folders: list[str] = []
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value", {})
            path = value.get("path")
            if not isinstance(path, str) or not path or path.startswith("/"):
                raise _HubError(400, f"invalid path in commit operation {line!r}")
            if key == "file":
                try:
                    data = base64.b64decode(value.get("content", ""), validate=True)
                except (binascii.Error, ValueError):
                    raise _HubError(400, f"{path}: content is not base64") from None
                changes[path] = self.hub._store(data, False)
            elif key == "lfsFile":
                oid = value.get("oid")
                if oid not in self.hub._lfs:
                    raise _HubError(400, f"{path}: LFS object {oid} was never uploaded")
                changes[path] = _File(oid, len(self.hub._blobs[oid]), True)
            elif key == "deletedFile":
                if path not in head.files and path not in changes:
                    raise _HubError(
                        404, f"A file with this name doesn't exist: {path}", "EntryNotFound"
                    )
                changes[path] = None
            elif key == "deletedFolder":
                folders.append(path)
            else:
                raise _HubError(400, f"LocalHub does not emulate commit operation {key!r}")
        title = str(header.get("summary") or "commit")
        sha = self.hub._commit(repo, revision, changes, title, tuple(folders))
        self._send_json(
            {
                "success": True,
                "commitOid": sha,
                "pullRequestUrl": None,
                "commitUrl": f"{self.hub._url(repo)}/commit/{sha}",
                "hookOutput": "",
            }
        )

    # ---- downloads ------------------------------------------------------------------------
    def _resolve(self, repo: _Repo, revision: str, path: str) -> None:
        commit = self._commit_of(repo, revision)
        f = commit.files.get(path)
        if f is None:
            raise _HubError(
                404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit.sha}
            )
        data = self.hub._blobs[f.sha256]
        headers = {
            "X-Repo-Commit": commit.sha,
            "ETag": f'"{f.blob_id(data)}"',
            "Accept-Ranges": "bytes",
            "Cache-Control": "no-cache",
        }
        if f.lfs:
            headers["X-Linked-Etag"] = f'"{f.sha256}"'
            headers["X-Linked-Size"] = str(f.size)
        status = 200
        rng = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", "").strip())
        if rng and (rng.group(1) or rng.group(2)) and data:
            if rng.group(1):
                start = int(rng.group(1))
                end = min(int(rng.group(2)), len(data) - 1) if rng.group(2) else len(data) - 1
            else:
                start, end = max(len(data) - int(rng.group(2)), 0), len(data) - 1
            if start > end:
                raise _HubError(
                    416,
                    f"range {self.headers['Range']} is not satisfiable",
                    headers={"Content-Range": f"bytes */{len(data)}"},
                )
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data, status = data[start : end + 1], 206
        self._send(status, data, headers, content_type="application/octet-stream")


if __name__ == "__main__":  # a manual server: HF_ENDPOINT=http://127.0.0.1:PORT hf ...
    import sys

    with LocalHub(int(sys.argv[1]) if len(sys.argv) > 1 else 0) as hub:
        print(f"LocalHub on {hub.endpoint} (Ctrl-C to stop)", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
