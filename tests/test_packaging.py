import subprocess
import sys
import zipfile
from pathlib import Path

import carlzoo

ROOT = Path(__file__).resolve().parents[1]


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
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("carlzoo-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"carlzoo", f"carlzoo-{carlzoo.__version__}.dist-info"}
    for module in (
        "carlzoo/training/loss.py",
        "carlzoo/export/__init__.py",
        "carlzoo/cli/main.py",
        "carlzoo/training/configs/cifar10.yaml",
        "carlzoo/export/templates/model_card.md",
        "carlzoo/models/README.md",
    ):
        assert module in names


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
