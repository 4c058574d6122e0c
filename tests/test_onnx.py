"""carlzoo.export.onnx and the onnx backend: graph contract, parity, OnnxCARL == PretrainedCARL."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from tiny import SIZE, TINY

from carlzoo.cli.zoo_cmd import assign, embed
from carlzoo.export import onnx as onnx_export
from carlzoo.export.onnx import add_onnx, export_onnx, main, onnx_parity
from carlzoo.model import CARLModel, build_model
from carlzoo.pretrained import (
    OnnxCARL,
    Preprocessing,
    PretrainedCARL,
    ZooConfig,
    ZooError,
    _onnx_device,
    _onnx_providers,
    from_pretrained,
    load,
    save_pretrained,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model() -> CARLModel:
    torch.manual_seed(0)
    m = build_model(TINY)
    m.train()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        m(torch.randn(16, 3, SIZE, SIZE) * 1.5 + 0.3)
    return m.eval()


@pytest.fixture(scope="module")
def folder(model: CARLModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model folder with model.onnx from the default (dynamo) exporter: exported once."""
    out = save_pretrained(
        model,
        tmp_path_factory.mktemp("onnx") / "tiny",
        ZooConfig(TINY, Preprocessing(input_size=SIZE, resize_size=SIZE)),
    )
    export_onnx(model, out / "model.onnx", input_size=SIZE)
    return out


def test_graph_contract(folder: Path) -> None:
    proto = onnx.load(str(folder / "model.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    [inp] = proto.graph.input
    assert inp.name == "images"
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert isinstance(dims[0], str) and dims[0]  # symbolic (dynamic) batch axis
    assert dims[1:] == [3, SIZE, SIZE]
    assert [o.name for o in proto.graph.output] == ["features", "projection", "logits"]
    out_dims = {
        o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim]
        for o in proto.graph.output
    }
    assert out_dims["features"][1:] == [32] and out_dims["logits"][1:] == [10]
    assert all(not init.external_data for init in proto.graph.initializer)  # one file
    assert {p.name for p in folder.iterdir()} == {"config.json", "model.safetensors", "model.onnx"}


@pytest.mark.parametrize("batch", [1, 7])
def test_parity_with_pytorch_on_any_batch_size(model: CARLModel, folder: Path, batch: int) -> None:
    x = torch.randn(batch, 3, SIZE, SIZE)
    res = onnx_parity(model, folder / "model.onnx", x)
    assert set(res) == {"max_abs_diff", "min_cosine", "output_scale", "scaled_diff"}
    assert res["max_abs_diff"] < 1e-4
    assert res["scaled_diff"] == res["max_abs_diff"] / max(1.0, res["output_scale"])
    assert res["min_cosine"] > 1 - 1e-6


def test_onnx_backend_agrees_with_torch(folder: Path, tmp_path: Path) -> None:
    pt = from_pretrained(folder)
    ox = load(str(folder), backend="onnx")
    assert isinstance(ox, OnnxCARL) and isinstance(pt, PretrainedCARL)
    assert ox.config == pt.config
    x = torch.randn(5, 3, SIZE, SIZE)
    for layer in ("backbone", "projection"):
        for normalize in (True, False):
            torch.testing.assert_close(
                ox.embed(x, layer=layer, normalize=normalize),
                pt.embed(x, layer=layer, normalize=normalize),
                atol=1e-4,
                rtol=0,
            )
    a, b = ox.assign(x, top_k=3), pt.assign(x, top_k=3)
    torch.testing.assert_close(a.probabilities, b.probabilities, atol=1e-4, rtol=0)
    torch.testing.assert_close(a.probabilities.sum(1), torch.ones(5))
    assert torch.equal(a.ids[:, 0], b.ids[:, 0])
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30, 3), np.uint8))
    img.save(tmp_path / "x.png")
    torch.testing.assert_close(ox.embed(tmp_path / "x.png"), pt.embed(img), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="expected 16x16 images"):
        ox.embed(torch.randn(1, 3, 32, 32))


def test_cli_backends_agree(folder: Path, tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    root.mkdir()
    rng = np.random.default_rng(1)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), np.uint8)).save(root / f"{i}.png")
    outs = {}
    for backend in ("torch", "onnx"):
        out = tmp_path / f"{backend}.npz"
        res = CliRunner().invoke(
            embed,
            [
                str(root),
                "-m",
                str(folder),
                "-o",
                str(out),
                "--backend",
                backend,
                "-j",
                "0",
                "--no-progress",
            ],
        )
        assert res.exit_code == 0, res.output
        outs[backend] = np.load(out)["embeddings"]
    np.testing.assert_allclose(outs["onnx"], outs["torch"], atol=1e-4)
    res = CliRunner().invoke(
        assign,
        [
            str(root),
            "-m",
            str(folder),
            "-o",
            str(tmp_path / "a.npz"),
            "--backend",
            "onnx",
            "-j",
            "0",
            "--no-progress",
            "-k",
            "2",
        ],
    )
    assert res.exit_code == 0, res.output
    assert np.load(tmp_path / "a.npz")["ids"].shape == (5, 2)


def test_missing_onnx_file_says_how_to_export(model: CARLModel, tmp_path: Path) -> None:
    out = save_pretrained(model, tmp_path / "m", ZooConfig(TINY, Preprocessing(SIZE, SIZE)))
    with pytest.raises(
        ZooError,
        match=f"no model.onnx in {out}: add one with `python -m carlzoo.export.onnx {out}`",
    ):
        load(str(out), backend="onnx")
    (out / "model.onnx").write_bytes(b"not onnx")
    with pytest.raises(ZooError, match=f"cannot load ONNX model {out / 'model.onnx'}"):
        load(str(out), backend="onnx")


def test_the_opset_asked_for_is_the_opset_written(
    model: CARLModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = export_onnx(model, tmp_path / "m20.onnx", input_size=SIZE, opset=20)
    written = onnx.load(str(path)).opset_import
    assert [i.version for i in written if i.domain in ("", "ai.onnx")] == [20]
    with pytest.raises(ValueError, match=r"^opset 17 cannot be exported: use 18 to"):
        export_onnx(model, tmp_path / "m17.onnx", input_size=SIZE, opset=17)
    # Were the range check to let 17 through, torch.onnx would quietly write opset 18.
    monkeypatch.setattr(onnx_export, "check_opset", lambda opset: opset)
    with pytest.raises(ValueError, match="the exporter wrote opset 18, not the 17 asked for"):
        export_onnx(model, tmp_path / "m17.onnx", input_size=SIZE, opset=17)
    assert not (tmp_path / "m17.onnx").exists()


def test_both_backends_refuse_a_device_they_cannot_use(folder: Path) -> None:
    with pytest.raises(ZooError, match=r"^device='gpu' is not a device name; use cpu, cuda or"):
        load(str(folder), device="gpu")
    with pytest.raises(ZooError, match=r"device='gpu' is not supported by the onnx backend"):
        load(str(folder), device="gpu", backend="onnx")
    with pytest.raises(ZooError, match=r"device='mps' is not supported by the onnx backend"):
        load(str(folder), device="mps", backend="onnx")


def test_add_onnx_command_and_fp16_weights(
    model: CARLModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``python -m carlzoo.export.onnx FOLDER``; float16 storage via the torchscript exporter."""
    out = save_pretrained(model, tmp_path / "m", ZooConfig(TINY, Preprocessing(SIZE, SIZE)))
    half = tmp_path / "half.onnx"
    export_onnx(model, half, input_size=SIZE, dtype="float16", exporter="torchscript")
    proto = onnx.load(str(half))
    types = {i.name: i.data_type for i in proto.graph.initializer}
    assert any(t == onnx.TensorProto.FLOAT16 for t in types.values())
    assert all(
        t != onnx.TensorProto.FLOAT16
        for n, t in types.items()
        if n.endswith(("running_mean", "running_var"))
    )
    [inp] = proto.graph.input
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # inputs stay float32
    x = torch.randn(3, 3, SIZE, SIZE)
    res = onnx_parity(model, half, x)
    assert res["max_abs_diff"] < 5e-2 and res["min_cosine"] > 0.999

    # The command adds a checked model.onnx to the folder (the faster exporter, for speed).
    real_export = onnx_export.export_onnx

    def fast_export(*args: object, **kwargs: object) -> Path:
        return real_export(*args, **{**kwargs, "exporter": "torchscript"})

    monkeypatch.setattr(onnx_export, "export_onnx", fast_export)
    assert main([str(out)]) == 0
    assert (out / "model.onnx").is_file()
    assert not list(out.glob(".*tmp"))
    assert onnx_parity(model, out / "model.onnx", x)["max_abs_diff"] < 1e-4
    assert main([str(tmp_path / "nothing")]) == 1


def test_export_is_atomic_and_validates_arguments(
    model: CARLModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "m.onnx"
    with pytest.raises(ValueError, match="dtype='int8'"):
        export_onnx(model, path, input_size=SIZE, dtype="int8")
    with pytest.raises(ValueError, match="exporter='magic'"):
        export_onnx(model, path, input_size=SIZE, exporter="magic")

    def broken_checker(*args: object, **kwargs: object) -> None:
        raise onnx.checker.ValidationError("bad graph")

    monkeypatch.setattr(onnx.checker, "check_model", broken_checker)
    with pytest.raises(onnx.checker.ValidationError):
        export_onnx(model, path, input_size=SIZE, exporter="torchscript")
    assert list(tmp_path.iterdir()) == []


def test_add_onnx_refuses_an_export_that_differs(
    model: CARLModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = save_pretrained(model, tmp_path / "m", ZooConfig(TINY, Preprocessing(SIZE, SIZE)))
    real_export = onnx_export.export_onnx

    def wrong_model(m: CARLModel, path: Path, **kwargs: object) -> Path:
        torch.manual_seed(1)
        return real_export(build_model(TINY).eval(), path, **{**kwargs, "exporter": "torchscript"})

    monkeypatch.setattr(onnx_export, "export_onnx", wrong_model)
    with pytest.raises(ValueError, match="differs from PyTorch"):
        add_onnx(out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]


def test_onnx_providers_name_the_gpu_asked_for() -> None:
    both = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    cuda1 = [("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]
    assert _onnx_providers(_onnx_device("cuda:1"), both) == cuda1
    assert _onnx_providers(_onnx_device("cuda"), both)[0] == (
        "CUDAExecutionProvider",
        {"device_id": 0},
    )
    assert _onnx_device(0) == torch.device("cuda", 0)  # an int is a CUDA index, as in torch
    assert _onnx_providers(_onnx_device("cuda"), ["CPUExecutionProvider"]) == [
        "CPUExecutionProvider"
    ]
    assert _onnx_providers(_onnx_device(None), both) == ["CPUExecutionProvider"]


@pytest.mark.parametrize("listed", [True, False])
def test_onnx_backend_says_so_when_cuda_runs_on_the_cpu(
    folder: Path, monkeypatch: pytest.MonkeyPatch, listed: bool
) -> None:
    """onnxruntime-gpu lists CUDAExecutionProvider even when its CUDA libraries do not load,
    and then runs the session on the CPU; the CPU package does not list it at all."""
    import onnxruntime as ort

    if listed:
        monkeypatch.setattr(
            ort,
            "get_available_providers",
            lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"],
        )
    why = "could not start its CUDAExecutionProvider" if listed else "has no CUDAExecutionProvider"
    with pytest.warns(UserWarning, match=f"^device='cuda:1': onnxruntime {why}") as seen:
        gpu = load(str(folder), device="cuda:1", backend="onnx")
    assert [w.filename for w in seen] == [__file__]  # the caller's line, not carlzoo's
    assert gpu.providers == ["CPUExecutionProvider"]
    assert "CUDA" not in repr(gpu)
    x = torch.rand(2, 3, SIZE, SIZE)
    torch.testing.assert_close(gpu.embed(x), load(str(folder), backend="onnx").embed(x))


def test_parity_is_measured_against_a_cpu_float32_copy(model: CARLModel, tmp_path: Path) -> None:
    """A model elsewhere than the CPU in float32 (a GPU, whose convolutions may use TF32, or
    here float64) is checked through a float32 copy: the figures measure the export alone."""
    path = export_onnx(model, tmp_path / "m.onnx", input_size=SIZE)
    x = torch.rand(3, 3, SIZE, SIZE)
    wide = build_model(TINY)
    wide.load_state_dict(model.state_dict())
    wide = wide.double().train()
    assert onnx_parity(wide, path, x) == onnx_parity(model, path, x)
    assert next(wide.parameters()).dtype == torch.float64 and wide.training  # left as it was
