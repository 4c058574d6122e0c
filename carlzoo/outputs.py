"""Writing embeddings and prototype assignments to .npz, .npy, .csv or .parquet, atomically.

Formats (N embedded images, D dimensions, k = top-k, M skipped images):

``.npz``
    embed: ``embeddings`` float32 (N, D), ``paths`` str (N,), ``skipped`` str (M,),
    ``skipped_errors`` str (M,). assign: ``ids`` int64 (N, k), ``probs`` float32 (N, k),
    ``paths``, ``skipped``, ``skipped_errors``. Loads with ``np.load`` (no pickle).
``.npy``
    embed: the (N, D) float32 array; assign: a structured array with fields ``ids`` int64
    (k,) and ``probs`` float32 (k,). Companions: ``FILE.paths.txt`` (N lines, row order)
    and ``FILE.skipped.txt`` (M lines ``path<TAB>error``; written even when empty, so no
    stale list survives a rerun). The three files are renamed into place together, the .npy
    last: when ``FILE`` exists, its companions are those of the same run.
``.csv``
    embed: header ``path,error,e0..e{D-1}``; assign: ``path,error,top1_id,top1_prob,...``.
    The N embedded images first, in input order, then one row per skipped image with its
    ``error`` and empty values.
``.parquet`` (needs pyarrow)
    Same rows as .csv; columns ``path``, ``error`` (null when embedded) and ``embedding``
    (fixed-size list of float32, null when skipped) or ``ids`` / ``probs`` (lists).

Every file is written to a temp file in the same folder and renamed into place, so a
reader never sees a partial file and a failed run leaves no file behind.
:func:`check_writable` probes the output folder before any work.
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "FORMATS",
    "OutputError",
    "atomic_write",
    "atomic_write_text",
    "atomic_write_safetensors",
    "check_writable",
    "existing_ancestor",
    "output_format",
    "write_embeddings",
    "write_assignments",
    "companion_paths",
]

FORMATS = (".npz", ".npy", ".csv", ".parquet")


class OutputError(ValueError):
    """The output path cannot be written in the asked format. The message is one line."""


def _write_temp(path: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a new temp file next to ``path`` and fsync it; return ``tmp``.

    On any error the temp file is removed.
    """
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temp file next to ``path``, fsync it, rename it onto ``path``.

    On any error the temp file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    tmp = _write_temp(path, write)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _atomic_write_group(files: Sequence[tuple[Path, Callable[[Path], None]]]) -> list[Path]:
    """Write several files that belong together; the last one of ``files`` marks a complete set.

    Every file is first written to a temp file next to it. Only then are the previous files
    removed, the last one first, and the temp files renamed into place, the last one last.
    An interruption (Ctrl-C, power loss) can so leave an incomplete set, the last file
    missing, but never the last file of one run next to another run's files. On any error
    every temp file is removed; an error while the temp files are written leaves the
    previous files as they were.
    """
    temps: list[Path] = []
    try:
        for path, write in files:
            temps.append(_write_temp(path, write))
        for path, _ in reversed(files):
            path.unlink(missing_ok=True)
        for (path, _), tmp in zip(files, temps, strict=True):
            os.replace(tmp, path)
    except BaseException:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
        raise
    return [path for path, _ in files]


def atomic_write_text(path: str | Path, text: str) -> Path:
    """:func:`atomic_write` of ``text`` as UTF-8."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def safetensors_bytes(tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> bytes:
    """``tensors`` and ``metadata`` as safetensors bytes that depend on them alone.

    safetensors writes the header's ``__metadata__`` from a hash map, in an order that
    changes from one call to the next, so the same tensors would hash differently on every
    save. Here the metadata keys are sorted (the header keeps its length and its padding).
    """
    from safetensors.torch import save

    data = save(tensors, metadata=metadata)
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    if "__metadata__" not in header:
        return data
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    if len(text) > n:  # cannot happen for the same content; keep what safetensors wrote
        return data
    return data[:8] + text + b" " * (n - len(text)) + data[8 + n :]


def atomic_write_safetensors(
    path: str | Path, tensors: dict[str, Any], metadata: dict[str, str] | None = None
) -> Path:
    """:func:`atomic_write` of :func:`safetensors_bytes` (torch tensors, str metadata)."""
    data = safetensors_bytes(tensors, metadata)
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _require_pyarrow() -> None:
    try:
        import pyarrow  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise OutputError(
            "writing .parquet needs pyarrow: pip install pyarrow (or write .npz, .npy or .csv)"
        ) from None


def check_writable(path: str | Path) -> None:
    """Raise :class:`OutputError` unless a file can be created in ``path``'s folder.

    Creates and removes a temp file there, so a read-only folder (or one on a read-only or
    full file system) is reported before any work rather than after it.
    """
    path = Path(path)
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=path.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(
            f"output {str(path)!r}: cannot create a file in {str(path.parent)!r}: "
            f"{e.strerror or e}; choose a writable folder"
        ) from None


def existing_ancestor(path: str | Path) -> Path:
    """``path`` when it exists, else the nearest of its parents that does: where the missing
    folders of an output path would be made (a file there means they cannot be)."""
    path = Path(path)
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def output_format(path: str | Path) -> str:
    """The format ("npz", "npy", "csv", "parquet") of ``path`` from its extension.

    Checks everything that can be checked before any work: a known extension, an existing
    parent folder, and pyarrow for .parquet. Raises :class:`OutputError` otherwise.
    """
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in FORMATS:
        raise OutputError(
            f"output {str(path)!r}: unknown extension {ext or '(none)'!r}; use "
            f"one of {', '.join(FORMATS)}"
        )
    if not path.parent.is_dir():
        raise OutputError(f"output {str(path)!r}: folder {str(path.parent)!r} does not exist")
    if path.is_dir():
        raise OutputError(f"output {str(path)!r} is a folder: give a file name")
    if ext == ".parquet":
        _require_pyarrow()
    return ext[1:]


def companion_paths(path: str | Path) -> tuple[Path, Path]:
    """The ``FILE.paths.txt`` and ``FILE.skipped.txt`` written next to a .npy output."""
    path = Path(path)
    return path.with_name(path.name + ".paths.txt"), path.with_name(path.name + ".skipped.txt")


def _str_array(values: Sequence[str]) -> np.ndarray:
    return np.asarray(list(values), dtype=np.str_) if len(values) else np.zeros(0, np.str_)


def _text_lines_writer(lines: Sequence[str]) -> Callable[[Path], None]:
    text = "".join(f"{x}\n" for x in lines)
    return lambda tmp: tmp.write_text(text, encoding="utf-8")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _fmt(v: float) -> str:
    return format(float(v), ".9g")


def _write(
    path: Path,
    fmt: str,
    ids: Sequence[str],
    skipped: Sequence[tuple[str, str]],
    npz: dict[str, np.ndarray],
    npy: np.ndarray,
    header: list[str],
    rows: list[list[str]],
    columns: Callable[[], dict[str, object]],
) -> list[Path]:
    skipped_ids = [s for s, _ in skipped]
    errors = [_one_line(e) for _, e in skipped]
    if fmt == "npz":
        arrays = {
            **npz,
            "paths": _str_array(ids),
            "skipped": _str_array(skipped_ids),
            "skipped_errors": _str_array(errors),
        }

        def write_npz(p: Path) -> None:
            with open(p, "wb") as f:
                np.savez(f, **arrays)

        return [atomic_write(path, write_npz)]
    if fmt == "npy":

        def write_npy(p: Path) -> None:
            with open(p, "wb") as f:
                np.save(f, npy, allow_pickle=False)

        paths_txt, skipped_txt = companion_paths(path)
        lines = [f"{s}\t{e}" for s, e in zip(skipped_ids, errors, strict=True)]
        # The .npy goes last: once it exists, the companions next to it are this run's.
        written = _atomic_write_group(
            [
                (paths_txt, _text_lines_writer(list(ids))),
                (skipped_txt, _text_lines_writer(lines)),
                (path, write_npy),
            ]
        )
        return [written[-1], *written[:-1]]
    if fmt == "csv":
        blank = [""] * (len(header) - 2)

        def write_csv(p: Path) -> None:
            with open(p, "w", newline="", encoding="utf-8") as f:
                w = csv.writer(f)
                w.writerow(header)
                for ident, row in zip(ids, rows, strict=True):
                    w.writerow([ident, "", *row])
                for ident, err in zip(skipped_ids, errors, strict=True):
                    w.writerow([ident, err, *blank])

        return [atomic_write(path, write_csv)]
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        tbl = pa.table(
            {
                "path": pa.array([*ids, *skipped_ids], type=pa.string()),
                "error": pa.array([None] * len(ids) + errors, type=pa.string()),
                **columns(),  # the format's own columns, null for the skipped images
            }
        )
        return [atomic_write(path, lambda p: pq.write_table(tbl, str(p)))]
    raise OutputError(f"unknown output format {fmt!r}")  # pragma: no cover


def write_embeddings(
    path: str | Path,
    ids: Sequence[str],
    embeddings: np.ndarray,
    skipped: Sequence[tuple[str, str]] = (),
) -> list[Path]:
    """Write (N, D) ``embeddings`` of the images ``ids``, and the ``skipped`` (id, error)
    pairs, in the format of ``path``'s extension. Returns the files written.

    Each file is replaced atomically. A .npy output is three files: all are written to temp
    files first, then the previous .npy and its companions are removed and the new files
    renamed into place, the .npy last. An interruption can leave the .npy missing, but never
    a .npy next to another run's ``FILE.paths.txt``. On an error no temp file is left.
    """
    fmt = output_format(path)
    emb = np.ascontiguousarray(np.asarray(embeddings, dtype=np.float32))
    if emb.ndim != 2 or emb.shape[0] != len(ids):
        raise ValueError(f"embeddings must be (N, D) with N = {len(ids)} ids, got {emb.shape}")
    d = emb.shape[1]

    def columns() -> dict[str, object]:
        import pyarrow as pa

        values = pa.array(emb.reshape(-1), type=pa.float32())
        good = pa.FixedSizeListArray.from_arrays(values, d)
        empty = pa.nulls(len(skipped), type=pa.list_(pa.float32(), d))
        return {"embedding": pa.concat_arrays([good, empty])}

    return _write(
        Path(path),
        fmt,
        ids,
        skipped,
        {"embeddings": emb},
        emb,
        ["path", "error", *(f"e{i}" for i in range(d))],
        [[_fmt(v) for v in row] for row in emb] if fmt == "csv" else [],
        columns,
    )


def write_assignments(
    path: str | Path,
    ids: Sequence[str],
    top_ids: np.ndarray,
    top_probs: np.ndarray,
    skipped: Sequence[tuple[str, str]] = (),
) -> list[Path]:
    """Write the top-k prototype ``top_ids`` (N, k) and ``top_probs`` (N, k) of the images
    ``ids``, and the ``skipped`` (id, error) pairs. Returns the files written.

    Written as :func:`write_embeddings` writes: a .npy and its companions are renamed into
    place together, the .npy last, so they never mix two runs.
    """
    fmt = output_format(path)
    tid = np.ascontiguousarray(np.asarray(top_ids, dtype=np.int64))
    tpr = np.ascontiguousarray(np.asarray(top_probs, dtype=np.float32))
    if tid.ndim != 2 or tid.shape != tpr.shape or tid.shape[0] != len(ids):
        raise ValueError(
            f"top_ids and top_probs must both be (N, k) with N = {len(ids)}, got "
            f"{tid.shape} and {tpr.shape}"
        )
    k = tid.shape[1]
    structured = np.zeros(len(ids), dtype=[("ids", np.int64, (k,)), ("probs", np.float32, (k,))])
    structured["ids"], structured["probs"] = tid, tpr
    header = ["path", "error"]
    for j in range(1, k + 1):
        header += [f"top{j}_id", f"top{j}_prob"]
    rows = []
    if fmt == "csv":
        for r_ids, r_probs in zip(tid, tpr, strict=True):
            row: list[str] = []
            for i, p in zip(r_ids, r_probs, strict=True):
                row += [str(int(i)), _fmt(p)]
            rows.append(row)

    def columns() -> dict[str, object]:
        import pyarrow as pa

        n_skip = len(skipped)
        return {
            "ids": pa.array([r.tolist() for r in tid] + [None] * n_skip, type=pa.list_(pa.int64())),
            "probs": pa.array(
                [r.tolist() for r in tpr] + [None] * n_skip, type=pa.list_(pa.float32())
            ),
        }

    return _write(
        Path(path), fmt, ids, skipped, {"ids": tid, "probs": tpr}, structured, header, rows, columns
    )
