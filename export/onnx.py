"""Export a CARL model to ONNX and check it against PyTorch.

The graph has one input ``images`` (float32, NCHW, dynamic batch axis ``batch``, fixed
``input_size`` x ``input_size``) and three outputs ``features``, ``projection`` and
``logits`` (float32, batch first), the three fields of :class:`carlzoo.model.CARLOutput`.

Exporter: ``torch.onnx.export(..., dynamo=True)``, the torch.export-based exporter (the
default since torch 2.9; the TorchScript exporter is deprecated there), with the batch axis
declared through ``dynamic_shapes`` (``torch.export.Dim``), traced at batch 2 so the axis is
not specialised, opset 18, and saved as one self-contained file (no external data). It
exports this ResNet exactly (max abs diff ~1e-6 against PyTorch) on torch 2.11 to 2.14.
``exporter="torchscript"`` selects the legacy exporter (about 4x faster to export, same
graph semantics) for environments where torch.export is unavailable.

``dtype="float16"`` stores the weights as float16 initializers followed by a Cast to float32
(BatchNorm running statistics stay float32), halving the file while inputs, outputs and the
arithmetic stay float32, so every onnxruntime execution provider runs it.

Command line: ``python -m carlzoo.export.onnx MODEL_FOLDER [--opset N] [--dtype float16]``
adds ``model.onnx`` to a model folder written by ``carlzoo.pretrained.save_pretrained`` and
records it in the folder's config.json (:func:`add_onnx`); a folder exported by ``carlzoo
export`` (it holds a README.md model card) is exported again with ``carlzoo export`` instead.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from carlzoo.model import CARLModel
from carlzoo.outputs import atomic_write

__all__ = [
    "DEFAULT_OPSET",
    "MIN_OPSET",
    "OUTPUT_NAMES",
    "check_opset",
    "export_onnx",
    "onnx_parity",
    "add_onnx",
    "main",
]

DEFAULT_OPSET = 18
MIN_OPSET = 18  # torch.onnx (dynamo) writes 18 or newer; it turns an older request into 18
INPUT_NAME = "images"
OUTPUT_NAMES = ("features", "projection", "logits")
_BN_STATS = ("running_mean", "running_var")


class _Outputs(nn.Module):
    """CARLModel -> plain tuple (features, projection, logits), as ONNX outputs need."""

    def __init__(self, model: CARLModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        out = self.model(images)
        return out.features, out.projection, out.logits


def check_opset(opset: int | None) -> int:
    """The opset to export with (``DEFAULT_OPSET`` for None); ``ValueError`` outside
    ``MIN_OPSET`` .. the newest opset of the installed onnx, which the exporter would not
    write as asked."""
    import onnx

    value = DEFAULT_OPSET if opset is None else opset
    newest = onnx.defs.onnx_opset_version()
    if isinstance(value, bool) or not isinstance(value, int) or not MIN_OPSET <= value <= newest:
        raise ValueError(
            f"opset {value!r} cannot be exported: use {MIN_OPSET} to {newest} (the exporter's "
            f"oldest, the installed onnx's newest; default {DEFAULT_OPSET})"
        )
    return value


def _written_opset(model_proto: Any) -> int | None:
    versions = {i.domain or "ai.onnx": i.version for i in model_proto.opset_import}
    return versions.get("ai.onnx")


def _to_fp16_initializers(model_proto: object) -> None:
    """Store float32 initializers (but BN running stats and tiny constants) as float16 + Cast."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    graph = model_proto.graph  # type: ignore[attr-defined]
    casts = []
    for init in list(graph.initializer):
        if init.data_type != onnx.TensorProto.FLOAT or init.name.endswith(_BN_STATS):
            continue
        arr = numpy_helper.to_array(init)
        if arr.size < 16:
            continue
        name = init.name
        half_name = f"{name}__fp16"
        init.CopyFrom(numpy_helper.from_array(arr.astype(np.float16), half_name))
        casts.append(
            helper.make_node(
                "Cast", [half_name], [name], to=onnx.TensorProto.FLOAT, name=f"cast_{half_name}"
            )
        )
    for node in reversed(casts):
        graph.node.insert(0, node)


def export_onnx(
    model: CARLModel,
    path: str | Path,
    *,
    input_size: int,
    opset: int | None = None,
    dtype: str = "float32",
    exporter: str = "dynamo",
) -> Path:
    """Export ``model`` (a copy of it, on the CPU, in eval mode) to ``path``; return ``path``.

    See the module docstring for the graph's names and the exporter. The file is checked
    with ``onnx.checker.check_model(full_check=True)`` before it is renamed into place.
    """
    import onnx

    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype={dtype!r}: expected 'float32' or 'float16'")
    if exporter not in ("dynamo", "torchscript"):
        raise ValueError(f"exporter={exporter!r}: expected 'dynamo' or 'torchscript'")
    if int(input_size) < 1:
        raise ValueError(f"input_size must be >= 1, got {input_size}")
    opset = check_opset(opset)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = _Outputs(copy.deepcopy(model).to("cpu", torch.float32)).eval()
    example = torch.zeros(2, 3, int(input_size), int(input_size))
    log = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(log):
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            program = torch.onnx.export(
                wrapper,
                (example,),
                None,
                input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES),
                dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
                opset_version=opset,
                dynamo=True,
                external_data=False,
                verbose=False,
                optimize=True,
            )
            model_proto = program.model_proto
        else:
            buf = io.BytesIO()
            torch.onnx.export(
                wrapper,
                (example,),
                buf,
                input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES),
                dynamic_axes={n: {0: "batch"} for n in (INPUT_NAME, *OUTPUT_NAMES)},
                opset_version=opset,
                dynamo=False,
            )
            model_proto = onnx.load_from_string(buf.getvalue())
    written = _written_opset(model_proto)
    if written != opset:  # a silent fallback would mislabel the file
        raise ValueError(f"the exporter wrote opset {written}, not the {opset} asked for")
    if dtype == "float16":
        _to_fp16_initializers(model_proto)
    model_proto.doc_string = f"carlzoo CARL encoder ({dtype} weights, {exporter} exporter)"
    onnx.checker.check_model(model_proto, full_check=True)
    data = model_proto.SerializeToString()
    atomic_write(path, lambda p: p.write_bytes(data))
    return path


def _worst(values: list[float], *, largest: bool = True) -> float:
    """max (or min) of ``values``; NaN when any is NaN (Python's max/min would drop it)."""
    if any(math.isnan(v) for v in values):
        return math.nan
    return max(values) if largest else min(values)


@torch.inference_mode()
def onnx_parity(model: CARLModel, onnx_path: str | Path, inputs: Tensor) -> dict[str, Any]:
    """Compare ``onnx_path`` (onnxruntime, CPU) with ``model`` (PyTorch, eval) on ``inputs``.

    Both run on the CPU in float32: a model on a GPU (whose convolutions may use TF32) or in
    another dtype is compared through a CPU float32 copy, so the check measures the export.

    Each output (``features``, ``projection``, ``logits``) is judged on its own scale: its
    ``scaled_diff`` is its max abs difference divided by ``max(1, its largest |value|)``, so
    a large projection does not loosen the limit on the logits. Returns

    * ``max_abs_diff``: the largest absolute difference over the three outputs;
    * ``min_cosine``: the smallest row-wise cosine similarity over the three outputs;
    * ``output_scale``: the largest |output| of PyTorch over the three outputs;
    * ``scaled_diff``: the largest per-output scaled difference, what :func:`parity_failure`
      judges, and ``worst_output``, the output it comes from;
    * ``outputs``: per output name, its ``max_abs_diff``, ``output_scale``, ``scaled_diff``
      and ``min_cosine``;
    * ``non_finite``: the outputs holding NaN or infinite values, as ``"logits (ONNX)"`` or
      ``"logits (PyTorch)"`` (empty when there are none); any fails the check.

    Figures computed from non-finite values are not finite either (NaN wins over the
    others where Python's ``max`` would drop it).
    """
    import onnxruntime as ort

    x = inputs.detach().to("cpu", torch.float32).contiguous()
    p = next(model.parameters())
    if p.device.type != "cpu" or p.dtype != torch.float32:
        model = copy.deepcopy(model).to("cpu", torch.float32)
    was_training = model.training
    model.eval()
    try:
        ref = model(x)
    finally:
        model.train(was_training)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(
        str(onnx_path), sess_options=opts, providers=["CPUExecutionProvider"]
    )
    got = session.run(list(OUTPUT_NAMES), {INPUT_NAME: x.numpy()})
    outputs: dict[str, dict[str, float]] = {}
    non_finite: list[str] = []
    for name, r, g in zip(OUTPUT_NAMES, ref, got, strict=True):
        r = r.float().cpu()
        g = torch.from_numpy(g).float()
        if r.shape != g.shape:
            raise ValueError(
                f"ONNX output {name} has shape {tuple(g.shape)}, PyTorch {tuple(r.shape)}"
            )
        for side, t in (("ONNX", g), ("PyTorch", r)):
            if not bool(torch.isfinite(t).all()):
                non_finite.append(f"{name} ({side})")
        diff = (r - g).abs().max().item() if r.numel() else 0.0
        scale = r.abs().max().item() if r.numel() else 0.0
        cos = torch.nn.functional.cosine_similarity(r.double(), g.double(), dim=1, eps=1e-12)
        outputs[name] = {
            "max_abs_diff": float(diff),
            "output_scale": float(scale),
            "scaled_diff": float(diff / max(1.0, scale)) if not math.isnan(scale) else math.nan,
            "min_cosine": _worst(cos.tolist() or [1.0], largest=False),
        }
    scaled = {name: o["scaled_diff"] for name, o in outputs.items()}
    nan_outputs = [name for name, v in scaled.items() if math.isnan(v)]
    worst = nan_outputs[0] if nan_outputs else max(scaled, key=lambda n: scaled[n])
    return {
        "max_abs_diff": _worst([o["max_abs_diff"] for o in outputs.values()]),
        "min_cosine": _worst([o["min_cosine"] for o in outputs.values()], largest=False),
        "output_scale": _worst([o["output_scale"] for o in outputs.values()]),
        "scaled_diff": _worst(list(scaled.values())),
        "worst_output": worst,
        "outputs": outputs,
        "non_finite": non_finite,
    }


PARITY_TOL = {"float32": 1e-4, "float16": 1e-2}
"""Parity limits by weight dtype. With float16 weights the exporter may fold BatchNorm into
the convolutions before the weights are rounded, so ONNX and the float16-restored PyTorch
model round different numbers (measured: 1.4e-3 of the output scale)."""


def parity_inputs(size: int, n: int = 4) -> Tensor:
    """The random inputs parity checks run on: ``n`` seeded N(0, 1) images of ``size`` px."""
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def parity_failure(res: dict[str, Any], tol: float = 1e-4) -> str | None:
    """Why an :func:`onnx_parity` result fails, or None when it passes.

    Each output's limit is ``tol`` on its max abs difference scaled by ``max(1, its largest
    |value|)``: absolute for outputs of magnitude up to 1, relative for larger ones (the
    projection z of a trained model easily reaches 1e3, where float32 rounding alone is
    ~1e-4), and the worst output (``scaled_diff``) is judged. Every row of every output must
    also keep a cosine similarity >= 1 - 1e-5. NaN or infinite values on either side fail.
    """
    non_finite = list(res.get("non_finite") or [])
    if non_finite:
        return f"non-finite values (NaN or inf) in {', '.join(non_finite)}"
    scaled, cosine = float(res["scaled_diff"]), float(res["min_cosine"])
    if not (math.isfinite(scaled) and math.isfinite(cosine)):
        return f"non-finite parity figures (scaled diff {scaled}, min cosine {cosine})"
    if scaled <= tol and cosine >= 1 - 1e-5:
        return None
    name = res.get("worst_output")
    per = (res.get("outputs") or {}).get(name) if name else None
    if per is not None:
        diff, scale = float(per["max_abs_diff"]), float(per["output_scale"])
        where = f"{name}: "
    else:  # a result from before per-output figures
        diff, scale, where = float(res["max_abs_diff"]), float(res["output_scale"]), ""
    return (
        f"{where}max abs diff {diff:.3g} at output scale {scale:.3g} "
        f"(limit {tol:g} x max(1, scale)), min cosine {cosine:.6f}"
    )


CARD_NAME = "README.md"


def _same_file(a: Path, b: Path) -> bool:
    return a.expanduser().resolve() == b.expanduser().resolve()


def add_onnx(
    directory: str | Path,
    *,
    opset: int | None = None,
    dtype: str = "float32",
    check: bool = True,
    out: str | Path | None = None,
) -> Path:
    """Export ``directory/model.onnx`` (or ``out``) from the folder's model.safetensors and
    config.json.

    With ``check`` the export is compared with PyTorch on a few random inputs
    (:func:`parity_inputs`) and refused (ValueError) when :func:`parity_failure` finds them
    apart, with ``tol`` 1e-4 for float32 and 1e-2 for float16 weights (:data:`PARITY_TOL`).

    Written into the folder itself (``out`` None or ``directory/model.onnx``), the export
    is recorded in config.json's provenance as ``carlzoo export`` records it
    (``onnx_opset``, and ``onnx_parity`` with the check's figures), model.onnx and
    config.json each written atomically, model.onnx first. A folder holding a model card
    (README.md, written by ``carlzoo export``) is refused before any work: the card would
    still describe the folder without this export; export the run again instead.
    """
    from carlzoo.outputs import _write_temp
    from carlzoo.pretrained import CONFIG_NAME, ONNX_NAME, from_pretrained

    directory = Path(directory)
    if dtype not in PARITY_TOL:
        raise ValueError(f"dtype={dtype!r}: expected 'float32' or 'float16'")
    opset = check_opset(opset)
    own = directory / ONNX_NAME
    out = own if out is None else Path(out)
    in_folder = _same_file(out, own)
    if in_folder and (directory / CARD_NAME).exists():
        raise ValueError(
            f"{directory} holds a model card ({CARD_NAME}) that adding {ONNX_NAME} would "
            f"leave describing the folder without it; export the run again with ONNX instead: "
            f"`carlzoo export RUN_DIR --out {directory} --overwrite`"
        )
    model = from_pretrained(directory, backend="torch")
    size = model.config.preprocessing.input_size
    parity: dict[str, Any] | None = None

    def write(tmp: Path) -> None:  # the export is checked before it replaces `out`
        nonlocal parity
        export_onnx(model, tmp, input_size=size, opset=opset, dtype=dtype)
        if check:
            x = parity_inputs(size)
            res = onnx_parity(model, tmp, x)
            failure = parity_failure(res, PARITY_TOL[dtype])
            if failure:
                raise ValueError(f"ONNX export of {directory} differs from PyTorch: {failure}")
            source = f"{len(x)} random N(0, 1) inputs"
            parity = {
                "tol": PARITY_TOL[dtype],
                "real": None,
                "random": {**res, "source": source, "n": int(len(x))},
            }

    if not in_folder:
        return atomic_write(out, write)
    cfg_path = directory / CONFIG_NAME
    onnx_tmp = _write_temp(out, write)
    try:
        data = json.loads(cfg_path.read_text(encoding="utf-8"))  # from_pretrained parsed it
        provenance = dict(data.get("provenance") or {})
        provenance["onnx_opset"] = opset
        if parity is not None:
            provenance["onnx_parity"] = parity
        else:  # figures of an earlier export would not describe this one
            provenance.pop("onnx_parity", None)
        data["provenance"] = provenance
        text = json.dumps(data, indent=2, allow_nan=False) + "\n"
        cfg_tmp = _write_temp(cfg_path, lambda p: p.write_text(text, encoding="utf-8"))
        try:
            os.replace(onnx_tmp, out)
            os.replace(cfg_tmp, cfg_path)
        finally:
            cfg_tmp.unlink(missing_ok=True)
    finally:
        onnx_tmp.unlink(missing_ok=True)
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m carlzoo.export.onnx MODEL_FOLDER``: add model.onnx to a model folder."""
    parser = argparse.ArgumentParser(
        prog="python -m carlzoo.export.onnx",
        description="Add model.onnx to a carlzoo model folder.",
    )
    parser.add_argument("folder", help="model folder (config.json + model.safetensors)")
    parser.add_argument(
        "--opset", type=int, default=None, help=f"{MIN_OPSET} or newer (default {DEFAULT_OPSET})"
    )
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    args = parser.parse_args(argv)
    from carlzoo.registry import ZooError

    try:
        out = add_onnx(args.folder, opset=args.opset, dtype=args.dtype)
    except (ZooError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
