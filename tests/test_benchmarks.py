"""The benchmark scripts run in their small CPU mode (the figures themselves are not asserted)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_train_throughput_cpu_smoke(tmp_path):
    out = tmp_path / "figures.json"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "train_throughput.py"),
            "--cpu-smoke",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "carlzoo / model-only" in result.stdout
    assert "carlzoo / DataLoader(2 workers)" in result.stdout
    figures = json.loads(out.read_text())["results"]
    assert set(figures) == {"model", "carlzoo", "loader"}
    assert all(v["images_per_s"] > 0 for v in figures.values())
