import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import carlzoo

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {"carlzoo": "carlzoo", "carlzoo/training": "training", "carlzoo/export": "export",
                "carlzoo/cli": "cli"}


def _source_copy(dest: Path) -> Path:
    """The files a build reads, without the build/ folder an earlier in-tree build leaves."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, dest / name)
    for folder in PACKAGE_DIRS.values():
        shutil.copytree(ROOT / folder, dest / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def _source_of(name: str) -> Path:
    """The source file a wheel member comes from (package-dir mapping of pyproject.toml)."""
    for prefix in sorted(PACKAGE_DIRS, key=len, reverse=True):
        if name.startswith(prefix + "/"):
            return ROOT / PACKAGE_DIRS[prefix] / name[len(prefix) + 1:]
    raise AssertionError(f"{name} is outside the carlzoo packages")


def test_wheel_installs_only_carlzoo_names(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--wheel-dir",
            str(tmp_path / "wheel"),
            str(_source_copy(tmp_path / "src")),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = (tmp_path / "wheel").glob("carlzoo-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    dist_info = f"carlzoo-{carlzoo.__version__}.dist-info"
    assert tops == {"carlzoo", dist_info}
    for module in (
        "carlzoo/training/loss.py",
        "carlzoo/export/__init__.py",
        "carlzoo/cli/main.py",
        "carlzoo/training/configs/cifar10.yaml",
        "carlzoo/export/templates/model_card.md",
        "carlzoo/models/README.md",
        f"{dist_info}/licenses/LICENSE",
    ):
        assert module in names
    # Nothing but the sources: no leftovers of earlier builds, no stray files.
    stale = [n for n in names if not n.startswith(dist_info) and not _source_of(n).is_file()]
    assert stale == []


def test_a_source_checkout_imports_its_own_subpackages(tmp_path):
    # From the repository root (`python -m carlzoo.cli`, torchrun), the checkout's carlzoo/
    # shadows any installed copy: carlzoo.training and the others must come from it too.
    src = _source_copy(tmp_path / "src")
    code = ("import carlzoo.training, carlzoo.export, carlzoo.cli.main as m; "
            "print(carlzoo.training.__file__); print(carlzoo.export.__file__); print(m.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=src, check=True, capture_output=True,
                         text=True, timeout=120).stdout.split()
    assert [Path(p).relative_to(src).parts[0] for p in out] == ["training", "export", "cli"]


def test_every_importable_source_folder_is_a_listed_package():
    # setuptools ships package data only from the packages it is told about, and warns that
    # an importable folder missing from the list ("Package would be ignored") will be dropped.
    from setuptools.config.pyprojecttoml import read_configuration

    config = read_configuration(ROOT / "pyproject.toml", expand=False)["tool"]["setuptools"]
    listed = set(config["packages"])
    found = set()
    for package, folder in config["package-dir"].items():
        for path in [ROOT / folder, *(ROOT / folder).rglob("*")]:
            parts = path.relative_to(ROOT / folder).parts
            importable = all(p.isidentifier() and p != "__pycache__" for p in parts)
            if path.is_dir() and importable:
                found.add(".".join([package, *parts]))
    assert found - listed == set()


def test_runtime_does_not_import_training():
    code = (
        "import sys, carlzoo, carlzoo.model; "
        "bad = [m for m in sys.modules if m.startswith('carlzoo.training')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_cli_startup_does_not_import_torch():
    code = (
        "import sys, carlzoo.cli.main; "
        "assert 'torch' not in sys.modules, 'carlzoo --help must not import torch'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_the_source_distribution_holds_the_tests_benchmarks_and_demo(tmp_path):
    tracked = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-z"], check=True, capture_output=True, text=True
    ).stdout.strip("\0").split("\0")
    src = tmp_path / "src"
    for name in tracked:  # the checkout as committed, without venvs, data or build leftovers
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, src / name)
    code = "import sys; from setuptools import build_meta as b; print(b.build_sdist(sys.argv[1]))"
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "dist")], cwd=src, check=True,
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    sdist = tmp_path / "dist" / out.stdout.strip().splitlines()[-1]
    with tarfile.open(sdist) as tar:
        names = {m.name.split("/", 1)[1] for m in tar.getmembers() if m.isfile()}
    needed = {
        n for n in tracked
        if n.startswith(("tests/", "benchmarks/", "examples/", "carlzoo/", "training/"))
        or n in ("Makefile", "MODEL_CARD.md", "pyproject.toml", "README.md", "LICENSE")
    }  # fmt: skip
    assert sorted(needed - names) == []
    assert [n for n in names if "__pycache__" in n or n.endswith(".pyc")] == []
