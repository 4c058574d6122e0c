"""Shared test set-up: the Hugging Face client points at a local Hub server, never the network.

carlzoo's own cache (``CARLZOO_CACHE``) is a temporary folder too.

huggingface_hub reads ``HF_ENDPOINT``, ``HF_HUB_DISABLE_XET``, ``HF_HUB_OFFLINE`` and ``HF_HOME``
when it is imported, so they are set here, at import time, before any test module (or carlzoo)
can import it. The session fixture ``local_hub`` starts :class:`hubserver.LocalHub` on the
port chosen here; it stops by itself at the end of the session.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile

from hubserver import LocalHub, pick_free_port

if "huggingface_hub" in sys.modules:  # pragma: no cover - a plugin imported it first
    raise RuntimeError(
        "huggingface_hub was imported before tests/conftest.py could point it at the local Hub "
        "server; run pytest without plugins that import it (or set HF_ENDPOINT yourself)"
    )

HUB_PORT = pick_free_port()
HUB_ENDPOINT = f"http://127.0.0.1:{HUB_PORT}"
HF_HOME = tempfile.mkdtemp(prefix="carlzoo-test-hf-home-")
atexit.register(shutil.rmtree, HF_HOME, ignore_errors=True)
CARLZOO_CACHE = tempfile.mkdtemp(prefix="carlzoo-test-cache-")  # ONNX exported on first use
atexit.register(shutil.rmtree, CARLZOO_CACHE, ignore_errors=True)

# Anything that would send the client elsewhere, use a real token or a shared cache goes.
for _var in (
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "HF_TOKEN_PATH",
    "HF_HUB_CACHE",
    "HUGGINGFACE_HUB_CACHE",
    "HF_ASSETS_CACHE",
    "HF_XET_CACHE",
    "HUGGINGFACE_CO_STAGING",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_OIDC_RESOURCE",
    "HF_DEBUG",
):
    os.environ.pop(_var, None)
os.environ.update(
    {
        "HF_ENDPOINT": HUB_ENDPOINT,
        "HF_HOME": HF_HOME,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
        "CARLZOO_CACHE": CARLZOO_CACHE,
    }
)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def local_hub():
    """A running :class:`hubserver.LocalHub` at ``HF_ENDPOINT`` (shared by the whole session).

    Tests share its state: use repo ids of their own (e.g. ``f"test/{request.node.name}"``).
    """
    hub = LocalHub(port=HUB_PORT)
    hub.start()
    try:
        yield hub
    finally:
        hub.stop()
    if hub.errors:  # a bug in the server itself: fail loudly rather than hide it behind a 500
        raise AssertionError(
            f"LocalHub answered {len(hub.errors)} request(s) with an internal "
            f"error; the first:\n{hub.errors[0]}"
        )


@pytest.fixture
def one_thread():
    """torch on one thread for the test: tiny models only lose time to threads on 2 cores.

    Modules of tiny-model tests opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory):
    """A one-epoch run of the real training entry point on a tiny synthetic npz dataset
    (``run_dir.parent / "tiny.npz"``), shared by the export and push tests: copy it before
    changing it."""
    import numpy as np

    from carlzoo.training.config import load_config
    from carlzoo.training.train import train

    root = tmp_path_factory.mktemp("export_run")
    rng = np.random.default_rng(0)
    data = root / "tiny.npz"
    np.savez(
        data,
        x_train=rng.integers(0, 256, (64, 16, 16, 3), dtype=np.uint8),
        y_train=rng.integers(0, 10, 64),
        x_test=rng.integers(0, 256, (16, 16, 16, 3), dtype=np.uint8),
        y_test=rng.integers(0, 10, 16),
    )
    cfg = load_config(
        None,
        overrides=[
            "data.dataset=npz",
            f"data.root={data}",
            "data.image_size=16",
            "model.width=4",
            "model.num_prototypes=10",
            "optim.batch_size=16",
            "epochs=1",
            "knn_every=0",
            "device=cpu",
            "precision=fp32",
            "channels_last=false",
        ],
    )
    train(cfg, root / "run", progress=False)
    return root / "run"
