"""``carlzoo push`` refuses what must not be published, before any request to the Hub: files
that are not part of an exported model folder (a ``.env``), an incomplete or corrupt folder,
and a private push into an existing public repository."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from hubserver import LocalHub
from tiny import MODEL_FILES, cli_error

from carlzoo.cli.export_cmd import push
from carlzoo.export.repo import export_model

pytestmark = [
    pytest.mark.filterwarnings(  # raised inside huggingface_hub's LFS upload
        "ignore:Use 'content=<...>':DeprecationWarning"
    ),
    pytest.mark.usefixtures("one_thread"),
]


@pytest.fixture(scope="module")
def exported(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder written by `carlzoo export` (with model.onnx); tests push copies of it."""
    out = tmp_path_factory.mktemp("push_out") / "carl-tiny"
    export_model(run_dir, out)
    return out


@pytest.fixture(scope="module")
def exported_no_onnx(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("push_out_no_onnx") / "carl-tiny"
    export_model(run_dir, out, onnx=False)
    return out


@pytest.fixture
def folder(exported: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "carl-tiny"
    shutil.copytree(exported, dst)
    return dst


def _cli(args: list[str]):
    return CliRunner().invoke(push, args, catch_exceptions=False)


def _refused(local_hub: LocalHub, folder: Path, repo_id: str, *extra: str) -> str:
    """Push ``folder``; assert it is refused in one line and nothing reached the Hub."""
    before = len(local_hub.requests)
    msg = cli_error(_cli([str(folder), "--repo-id", repo_id, "--token", "hf_test", *extra]))
    assert len(local_hub.requests) == before, local_hub.requests[before:]
    return msg


def _pushed(folder: Path, repo_id: str, *extra: str) -> str:
    result = _cli([str(folder), "--repo-id", repo_id, "--token", "hf_test", "--json", *extra])
    assert result.exit_code == 0, result.output
    return re.search(r"commit ([0-9a-f]{40})", result.output).group(1)


# ---- F4: only the model-folder files are ever uploaded ---------------------------------------


@pytest.mark.parametrize(
    "extra",
    [".env", ".DS_Store", ".cache/huggingface/x", "notes.txt", "sub/x.bin"],
)
def test_a_folder_with_other_files_is_refused_before_any_request(
    folder: Path, local_hub: LocalHub, extra: str
) -> None:
    path = folder / extra
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("HF_TOKEN=hf_secret\n")
    msg = _refused(local_hub, folder, "test/other-files")
    top = extra.split("/")[0] + ("/" if "/" in extra else "")
    assert f"{folder} holds {top}, not part of an exported model folder" in msg
    assert ("a hidden file may hold secrets" in msg) == extra.startswith(".")
    assert "move them out of the folder" in msg


def test_a_file_that_appears_after_the_checks_is_not_uploaded(
    folder: Path, local_hub: LocalHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import HfApi

    real_create_repo = HfApi.create_repo

    def create_repo_then_a_secret_appears(self: HfApi, *args: object, **kwargs: object):
        (folder / ".env").write_text("HF_TOKEN=hf_secret\n")  # e.g. an editor's or a tool's
        return real_create_repo(self, *args, **kwargs)

    monkeypatch.setattr(HfApi, "create_repo", create_repo_then_a_secret_appears)
    repo_id = "test/late-secret"
    sha = _pushed(folder, repo_id)
    assert (folder / ".env").is_file()
    assert set(local_hub.list_files(repo_id)) == MODEL_FILES | {".gitattributes"}
    assert local_hub.head(repo_id) == sha


# ---- F5: an incomplete or corrupt folder is refused -------------------------------------------


@pytest.mark.parametrize("name", ["README.md", "training_config.json", "metrics.json"])
def test_an_incomplete_folder_is_refused(folder: Path, local_hub: LocalHub, name: str) -> None:
    (folder / name).unlink()
    msg = _refused(local_hub, folder, "test/incomplete")
    assert f"{folder} is not an exported model folder (missing {name})" in msg
    assert "carlzoo export" in msg


def test_truncated_weights_are_refused(folder: Path, local_hub: LocalHub) -> None:
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    msg = _refused(local_hub, folder, "test/truncated")
    assert f"{folder} does not load: corrupt weights file {weights}" in msg
    assert f"`carlzoo export RUN_DIR --out {folder} --overwrite`" in msg


def test_a_truncated_onnx_file_is_refused(folder: Path, local_hub: LocalHub) -> None:
    path = folder / "model.onnx"
    path.write_bytes(path.read_bytes()[:5000])
    msg = _refused(local_hub, folder, "test/truncated-onnx")
    assert f"{folder} does not load: cannot load ONNX model {path}" in msg


def test_an_onnx_file_of_other_weights_is_refused(folder: Path, local_hub: LocalHub) -> None:
    from safetensors.torch import load_file, save_file

    weights = folder / "model.safetensors"
    state = load_file(str(weights))
    state["backbone.conv1.weight"] = state["backbone.conv1.weight"] * 1.5
    save_file(state, str(weights), metadata={"format": "pt"})
    msg = _refused(local_hub, folder, "test/other-weights")
    assert f"{folder / 'model.onnx'} does not reproduce model.safetensors" in msg


def test_a_card_without_front_matter_is_refused(folder: Path, local_hub: LocalHub) -> None:
    (folder / "README.md").write_text("# my model\n")
    msg = _refused(local_hub, folder, "test/no-card")
    assert f"{folder / 'README.md'} is not a model card" in msg


def test_truncated_metadata_is_refused(folder: Path, local_hub: LocalHub) -> None:
    (folder / "metrics.json").write_text('{"measured": ')
    msg = _refused(local_hub, folder, "test/metrics")
    assert f"cannot read {folder / 'metrics.json'}" in msg


def test_model_onnx_must_match_what_config_json_records(
    folder: Path, exported_no_onnx: Path, local_hub: LocalHub, tmp_path: Path
) -> None:
    # Exported with ONNX, model.onnx deleted: config.json and the card still claim it.
    (folder / "model.onnx").unlink()
    msg = _refused(local_hub, folder, "test/onnx-missing")
    assert f"config.json records an ONNX export (opset 18) but {folder} has no model.onnx" in msg
    # Exported with --no-onnx, model.onnx added later: config.json and the card deny it.
    late = tmp_path / "late"
    shutil.copytree(exported_no_onnx, late)
    assert json.loads((late / "config.json").read_text())["provenance"]["onnx_opset"] is None
    from carlzoo.export.onnx import export_onnx
    from carlzoo.pretrained import from_pretrained

    export_onnx(from_pretrained(late), late / "model.onnx", input_size=16, exporter="torchscript")
    msg = _refused(local_hub, late, "test/onnx-unrecorded")
    assert f"{late / 'model.onnx'} is not recorded in config.json" in msg
    # The same folder without model.onnx is complete, and is published.
    (late / "model.onnx").unlink()
    _pushed(late, "test/no-onnx")
    assert "model.onnx" not in local_hub.list_files("test/no-onnx")


# ---- F15: --private never publishes into a public repository ------------------------------------


def test_private_push_to_an_existing_public_repo_is_refused(
    folder: Path, local_hub: LocalHub
) -> None:
    from huggingface_hub import HfApi

    repo_id = "test/public-already"
    head = local_hub.add_repo_files(repo_id, {"notes.md": b"public"})
    msg = cli_error(_cli([str(folder), "--repo-id", repo_id, "--token", "t", "--private"]))
    assert msg == (
        f"Error: --private: the existing repository {repo_id} is public, so the model would "
        "be public; make the repository private on the Hub (Settings) first, or push without "
        "--private"
    )
    assert local_hub.head(repo_id) == head  # nothing was committed
    # A new repository is created private, and a private one takes the push.
    _pushed(folder, "test/private-new", "--private")
    assert HfApi().repo_info("test/private-new").private is True
    _pushed(folder, "test/private-new", "--private")


def test_private_push_when_the_hub_does_not_say_it_is_private_is_refused(
    folder: Path, local_hub: LocalHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    from types import SimpleNamespace

    from huggingface_hub import HfApi

    repo_id = "test/visibility-unknown"
    head = local_hub.add_repo_files(repo_id, {"notes.md": b"?"})
    monkeypatch.setattr(HfApi, "repo_info", lambda self, *a, **k: SimpleNamespace(private=None))
    msg = cli_error(_cli([str(folder), "--repo-id", repo_id, "--token", "t", "--private"]))
    assert f"the existing repository {repo_id} does not say it is private" in msg
    assert local_hub.head(repo_id) == head


# ---- --revision must name a branch, checked before the repository is created -------------------


@pytest.mark.parametrize(
    ("revision", "why"),
    [
        ("", "it is empty"),
        ("my branch", "it contains a space"),
        ("v1..v2", "it contains '..'"),
        ("feat:x", "it contains ':'"),
        ("release/", "git does not allow that name"),
        ("-f", "git does not allow that name"),
        ("HEAD", "git does not allow that name"),
        ("x/.hidden", "a part of it starts with '.' or ends with '.lock'"),
        ("refs/heads/dev", "it is a full ref; give the branch name alone"),
        ("0123456789abcdef0123456789abcdef01234567",
         "it is a commit sha, and a push goes to a branch"),
    ],
)
def test_a_revision_that_is_not_a_branch_name_is_refused_before_any_request(
    folder: Path, local_hub: LocalHub, revision: str, why: str
) -> None:
    repo_id = "test/bad-revision"
    msg = _refused(local_hub, folder, repo_id, "--revision", revision)
    assert msg == (
        f"Error: --revision {revision!r} is not a branch name ({why}); use one such as main or v1"
    )


def test_a_branch_name_with_a_slash_is_pushed(folder: Path, local_hub: LocalHub) -> None:
    sha = _pushed(folder, "test/slash-branch", "--revision", "release/v1")
    assert local_hub.head("test/slash-branch", "release/v1") == sha


def test_a_complete_folder_is_still_published(folder: Path, local_hub: LocalHub) -> None:
    repo_id = "test/complete"
    sha = _pushed(folder, repo_id)
    assert local_hub.head(repo_id) == sha
    assert set(local_hub.list_files(repo_id)) == MODEL_FILES | {".gitattributes"}
    for name in MODEL_FILES:
        assert local_hub.read_file(repo_id, name) == (folder / name).read_bytes()


def test_the_commit_names_the_folder_also_when_it_is_given_as_dot(
    folder: Path, local_hub: LocalHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(folder)
    sha = _pushed(Path("."), "test/dot")
    assert local_hub._revision("model", "test/dot", sha).title == "Upload carl-tiny with carlzoo"
