"""The local Hub server against the real huggingface_hub client (no network)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import huggingface_hub
import pytest
from hubserver import LocalHub
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

pytestmark = pytest.mark.filterwarnings(  # raised inside huggingface_hub's LFS upload
    "ignore:Use 'content=<...>':DeprecationWarning"
)

WEIGHTS = bytes(range(256)) * 64  # binary: stored through LFS


@pytest.fixture()
def api(local_hub: LocalHub) -> HfApi:
    return HfApi(endpoint=local_hub.endpoint, token="hf_test_token")


def _folder(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text('{"a": 1}\n')
    (folder / "model.safetensors").write_bytes(WEIGHTS)
    (folder / "sub" / "notes.txt").write_text("hello\n")
    (folder / "README.md").write_text("---\nlibrary_name: carlzoo\ntags: [carl]\n---\n# Card\n")
    return folder


def test_client_uses_local_endpoint(local_hub: LocalHub) -> None:
    assert huggingface_hub.constants.ENDPOINT == local_hub.endpoint
    assert huggingface_hub.constants.HF_HUB_DISABLE_XET
    assert not huggingface_hub.constants.HF_HUB_OFFLINE
    assert huggingface_hub.constants.HF_HOME == os.environ["HF_HOME"]


def test_create_upload_download(local_hub: LocalHub, api: HfApi, tmp_path: Path) -> None:
    repo_id = "test/roundtrip"
    url = api.create_repo(repo_id)
    assert url.repo_id == repo_id
    again = api.create_repo(repo_id, exist_ok=True)  # 409 -> same url
    assert str(again) == str(url)
    with pytest.raises(huggingface_hub.errors.HfHubHTTPError) as err:
        api.create_repo(repo_id)
    assert err.value.response.status_code == 409

    info = api.upload_folder(repo_id=repo_id, folder_path=_folder(tmp_path), commit_message="up")
    sha = info.oid
    assert len(sha) == 40 and local_hub.head(repo_id) == sha
    assert local_hub.is_lfs(repo_id, "model.safetensors")
    assert not local_hub.is_lfs(repo_id, "config.json")
    # the upload went through the LFS batch API and validated the card
    paths = [r.path for r in local_hub.requests]
    assert f"/{repo_id}.git/info/lfs/objects/batch" in paths
    assert "/api/validate-yaml" in paths
    assert all(
        r.authorization == "Bearer hf_test_token"
        for r in local_hub.requests
        if r.path.startswith(f"/api/models/{repo_id}/commit")
    )

    by_branch = hf_hub_download(repo_id, "model.safetensors")
    assert Path(by_branch).read_bytes() == WEIGHTS
    assert f"/snapshots/{sha}/" in by_branch
    by_sha = hf_hub_download(repo_id, "sub/notes.txt", revision=sha)
    assert Path(by_sha).read_text() == "hello\n"

    snap = Path(snapshot_download(repo_id))
    assert snap.name == sha
    assert sorted(str(p.relative_to(snap)) for p in snap.rglob("*") if p.is_file()) == [
        ".gitattributes",
        "README.md",
        "config.json",
        "model.safetensors",
        "sub/notes.txt",
    ]
    assert (snap / "config.json").read_text() == '{"a": 1}\n'

    model = api.model_info(repo_id)
    assert model.sha == sha and model.card_data.library_name == "carlzoo"
    files = {f.path: f for f in api.list_repo_tree(repo_id, recursive=True)}
    assert files["model.safetensors"].lfs.sha256 == hashlib.sha256(WEIGHTS).hexdigest()
    assert files["config.json"].lfs is None

    # a second, unchanged upload is a no-op for the client; a changed file is a new commit
    same = api.upload_folder(repo_id=repo_id, folder_path=tmp_path / "model")
    assert same.oid == sha
    (tmp_path / "model" / "config.json").write_text('{"a": 2}\n')
    changed = api.upload_folder(repo_id=repo_id, folder_path=tmp_path / "model")
    assert changed.oid != sha
    assert Path(hf_hub_download(repo_id, "config.json")).read_text() == '{"a": 2}\n'
    # the old commit still resolves by sha
    assert Path(hf_hub_download(repo_id, "config.json", revision=sha)).read_text() == '{"a": 1}\n'
    assert not local_hub.errors


def test_branches_and_add_repo_files(local_hub: LocalHub, api: HfApi) -> None:
    repo_id = "test/branches"
    main_sha = local_hub.add_repo_files(repo_id, {"a.txt": b"main"})
    dev_sha = local_hub.add_repo_files(repo_id, {"a.txt": b"dev"}, revision="dev")
    assert main_sha != dev_sha and len(dev_sha) == 40
    assert Path(hf_hub_download(repo_id, "a.txt", revision="dev")).read_bytes() == b"dev"
    assert Path(hf_hub_download(repo_id, "a.txt")).read_bytes() == b"main"
    assert Path(hf_hub_download(repo_id, "a.txt", revision=main_sha)).read_bytes() == b"main"
    api.create_branch(repo_id, branch="release/v1", exist_ok=True)
    api.create_branch(repo_id, branch="release/v1", exist_ok=True)  # 409 -> fine
    refs = {b.name: b.target_commit for b in api.list_repo_refs(repo_id).branches}
    assert refs == {"main": main_sha, "dev": dev_sha, "release/v1": main_sha}
    assert Path(hf_hub_download(repo_id, "a.txt", revision="release/v1")).read_bytes() == b"main"
    info = api.upload_file(
        path_or_fileobj=b"rel", path_in_repo="a.txt", repo_id=repo_id, revision="release/v1"
    )
    assert local_hub.head(repo_id, "release/v1") == info.oid
    assert local_hub.read_file(repo_id, "a.txt", "release/v1") == b"rel"


def test_delete_and_recreate_repo(local_hub: LocalHub, api: HfApi) -> None:
    repo_id = "test/deleted"
    local_hub.add_repo_files(repo_id, {"a.txt": b"a"})
    api.delete_repo(repo_id)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info(repo_id)
    api.create_repo(repo_id)
    assert local_hub.list_files(repo_id) == [".gitattributes"]


def test_errors_map_to_client_exceptions(local_hub: LocalHub, api: HfApi) -> None:
    repo_id = "test/errors"
    local_hub.add_repo_files(repo_id, {"x.txt": b"x"})
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("test/does-not-exist", "x.txt")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo_id, "x.txt", revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo_id, "x.txt", revision="0" * 40)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo_id, "missing.txt")
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("test/does-not-exist")
    with pytest.raises(RevisionNotFoundError):
        snapshot_download(repo_id, revision="no-such-branch")
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("test/does-not-exist")
    # a commit on a branch that does not exist
    with pytest.raises(RevisionNotFoundError):
        api.upload_file(
            path_or_fileobj=b"y", path_in_repo="y.txt", repo_id=repo_id, revision="nope"
        )


def test_invalid_card_metadata_is_refused(local_hub: LocalHub, api: HfApi) -> None:
    repo_id = "test/bad-card"
    api.create_repo(repo_id)
    with pytest.raises(ValueError, match="Invalid metadata"):
        api.upload_file(
            path_or_fileobj=b"---\ntags: [a\n---\n", path_in_repo="README.md", repo_id=repo_id
        )
    bad_index = b"---\nmodel-index:\n- name: m\n  results:\n  - metrics: []\n---\n"
    with pytest.raises(ValueError, match="model-index"):
        api.upload_file(path_or_fileobj=bad_index, path_in_repo="README.md", repo_id=repo_id)
    assert local_hub.list_files(repo_id) == [".gitattributes"]


def test_offline_mode_reads_the_cache(local_hub: LocalHub, tmp_path: Path) -> None:
    repo_id = "test/offline"
    sha = local_hub.add_repo_files(repo_id, {"w.safetensors": WEIGHTS, "c.json": b"{}"})
    online = snapshot_download(repo_id)
    script = textwrap.dedent(f"""
        import huggingface_hub as h
        from huggingface_hub import constants, errors
        assert constants.HF_HUB_OFFLINE
        p = h.snapshot_download({repo_id!r})
        assert p == {online!r}, p
        assert h.snapshot_download({repo_id!r}, revision={sha!r}) == p
        f = h.hf_hub_download({repo_id!r}, "w.safetensors", revision={sha!r})
        assert open(f, "rb").read() == bytes(range(256)) * 64
        try:
            h.hf_hub_download({repo_id!r}, "never-downloaded.txt")
        except errors.LocalEntryNotFoundError:
            print("ok")
    """)
    before = len(local_hub.requests)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
    assert len(local_hub.requests) == before  # nothing reached the server


def test_standalone_server_on_free_port() -> None:
    with LocalHub() as hub:
        assert hub.port > 0 and hub.endpoint.endswith(str(hub.port))
        sha = hub.add_repo_files("a/b", {"f.bin": b"\0\1"})
        api = HfApi(endpoint=hub.endpoint)
        assert api.model_info("a/b").sha == sha
        path = hf_hub_download(
            "a/b", "f.bin", endpoint=hub.endpoint, cache_dir=os.environ["HF_HOME"] + "/standalone"
        )
        assert Path(path).read_bytes() == b"\0\1"
    assert hub._server is None
