"""Quantize a GGUF with llama.cpp's own quantizer (through llama-cpp-python), optionally with an imatrix.

Contract:
- `quantize_gguf(src_gguf, dst_gguf, qtype="Q4_K_M", imatrix=None, n_threads=None) -> QuantizeResult`
  calls `llama_model_quantize` with `llama_model_quantize_default_params()` and the `LLAMA_FTYPE_*`
  named by `QUANT_TYPES[qtype]`; writes `dst_gguf` atomically (a temp file renamed on success).
- `qtype` is case-insensitive; an unknown name is a one-line `ConfigError` listing the known ones.
- `imatrix` (optional) is an importance-matrix file as written by llama.cpp's `llama-imatrix`: the
  GGUF format (`<tensor>.in_sum2` + `<tensor>.counts`) or the legacy `.dat` format. Values are
  normalised the way llama.cpp's quantize tool does (sums / counts) and handed to llama.cpp through
  `llama_model_quantize_params.imatrix` (an array of {name, data, size} ended by a null name). Builds
  of llama-cpp-python whose params struct lacks that typed field get a one-line `DependencyError`.
- The source is validated first (`scan_gguf`): a truncated/corrupt file is a one-line `ModelDirError`.
"""

from __future__ import annotations

import ctypes
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from minigpt4_local.backends.gguf_file import scan_gguf
from minigpt4_local.backends.llama_ctx import default_threads, llama_cpp_module
from minigpt4_local.errors import ConfigError, DependencyError, ModelDirError

# User-facing type name -> llama.cpp file type constant (llama_cpp.LLAMA_FTYPE_*).
QUANT_TYPES: dict[str, str] = {
    "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "Q6_K": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "Q5_K_M": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "Q5_K_S": "LLAMA_FTYPE_MOSTLY_Q5_K_S",
    "Q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0",
    "Q5_1": "LLAMA_FTYPE_MOSTLY_Q5_1",
    "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "Q4_K_S": "LLAMA_FTYPE_MOSTLY_Q4_K_S",
    "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "Q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1",
    "Q3_K_L": "LLAMA_FTYPE_MOSTLY_Q3_K_L",
    "Q3_K_M": "LLAMA_FTYPE_MOSTLY_Q3_K_M",
    "Q3_K_S": "LLAMA_FTYPE_MOSTLY_Q3_K_S",
    "Q2_K": "LLAMA_FTYPE_MOSTLY_Q2_K",
    "F16": "LLAMA_FTYPE_MOSTLY_F16",
    "BF16": "LLAMA_FTYPE_MOSTLY_BF16",
    "F32": "LLAMA_FTYPE_ALL_F32",
}


@dataclass
class QuantizeResult:
    path: Path
    qtype: str
    src_bytes: int
    dst_bytes: int
    seconds: float
    imatrix_entries: int  # 0 = quantized without an importance matrix
    tensor_types: dict[str, int]  # GGML type name -> number of tensors of that type in the output


def normalise_qtype(qtype: str) -> str:
    name = qtype.strip().upper()
    if name not in QUANT_TYPES:
        raise ConfigError(f"unknown quantization type {qtype!r}; choose one of {', '.join(QUANT_TYPES)}")
    return name


# --------------------------------------------------------------------------------------------------
# importance matrix


def _read_gguf_imatrix(path: Path) -> dict[str, np.ndarray]:
    header = scan_gguf(path)
    groups: dict[str, dict[str, np.ndarray]] = {}
    for name, info in header.tensors.items():
        for suffix in (".in_sum2", ".counts"):
            if name.endswith(suffix):
                if info.ggml_type != 0:
                    raise ModelDirError(f"{path}: imatrix tensor {name} is not F32")
                count = info.nbytes // 4
                values = np.fromfile(path, dtype="<f4", count=count, offset=info.offset)
                groups.setdefault(name[: -len(suffix)], {})[suffix] = values
    out = {}
    for name, g in groups.items():
        if set(g) != {".in_sum2", ".counts"}:
            raise ModelDirError(f"{path}: imatrix entry {name} lacks its sums or counts")
        sums, counts = g[".in_sum2"], g[".counts"]
        per = sums.reshape(len(counts), -1)  # one row of sums per expert (1 for dense models)
        safe = np.where(counts > 0, counts, 1.0)[:, None]
        out[name] = np.where(counts[:, None] > 0, per / safe, 1.0).astype(np.float32).reshape(-1)
    return out


def _read_legacy_imatrix(path: Path) -> dict[str, np.ndarray]:
    data = path.read_bytes()
    pos = 0

    def take(fmt: str) -> int:
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise ModelDirError(f"{path}: truncated imatrix file")
        (value,) = struct.unpack_from(fmt, data, pos)
        pos += size
        return value

    n_entries = take("<i")
    if n_entries < 1:
        raise ModelDirError(f"{path}: empty imatrix file")
    out = {}
    for _ in range(n_entries):
        length = take("<i")
        name = data[pos : pos + length].decode("utf-8", errors="replace")
        pos += length
        ncall, nval = take("<i"), take("<i")
        if nval < 1 or pos + 4 * nval > len(data):
            raise ModelDirError(f"{path}: truncated imatrix entry {name!r}")
        sums = np.frombuffer(data, dtype="<f4", count=nval, offset=pos).astype(np.float32)
        pos += 4 * nval
        out[name] = sums / ncall if ncall > 0 else sums
    return out


def load_imatrix(path: str | Path) -> dict[str, np.ndarray]:
    """tensor name -> per-column importance (float32), from a GGUF or legacy llama.cpp imatrix file."""
    path = Path(path)
    if not path.is_file():
        raise ModelDirError(f"{path}: imatrix file not found")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    entries = _read_gguf_imatrix(path) if magic == b"GGUF" else _read_legacy_imatrix(path)
    for name, values in entries.items():
        if not np.isfinite(values).all():
            raise ModelDirError(f"{path}: imatrix entry {name} has NaN/Inf values")
    return entries


def _imatrix_param(lib: object, entries: dict[str, np.ndarray]) -> tuple[object, list[object]]:
    """ctypes array for params.imatrix plus the Python objects that must outlive the call."""
    entry_type = getattr(lib, "llama_model_imatrix_data", None)
    if entry_type is None:
        raise DependencyError(
            "this llama-cpp-python build cannot pass an importance matrix to the quantizer "
            "(needs a release whose llama_model_quantize_params has a typed imatrix field)"
        )
    keep: list[object] = []
    array = (entry_type * (len(entries) + 1))()  # zero-initialised: the last entry's null name ends it
    for i, (name, values) in enumerate(entries.items()):
        buf = np.ascontiguousarray(values, dtype=np.float32)
        raw_name = name.encode()
        keep.extend([buf, raw_name])
        array[i].name = raw_name
        array[i].data = buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        array[i].size = buf.size
    keep.append(array)
    return ctypes.cast(array, ctypes.POINTER(entry_type)), keep


# --------------------------------------------------------------------------------------------------


def _type_histogram(path: Path) -> dict[str, int]:
    from gguf.constants import GGMLQuantizationType

    hist: dict[str, int] = {}
    for info in scan_gguf(path).tensors.values():
        name = GGMLQuantizationType(info.ggml_type).name
        hist[name] = hist.get(name, 0) + 1
    return hist


def quantize_gguf(
    src_gguf: str | Path,
    dst_gguf: str | Path,
    qtype: str = "Q4_K_M",
    imatrix: str | Path | None = None,
    n_threads: int | None = None,
) -> QuantizeResult:
    """Write `dst_gguf`, the `qtype` quantization of `src_gguf` (see module docstring)."""
    src, dst = Path(src_gguf), Path(dst_gguf)
    name = normalise_qtype(qtype)
    scan_gguf(src)  # one-line error for a missing/truncated source before llama.cpp reads it
    entries = load_imatrix(imatrix) if imatrix is not None else {}
    lib = llama_cpp_module()
    params = lib.llama_model_quantize_default_params()
    params.ftype = getattr(lib, QUANT_TYPES[name])
    params.nthread = n_threads or default_threads()
    keep: list[object] = []
    if entries:
        params.imatrix, keep = _imatrix_param(lib, entries)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".partial")
    start = time.perf_counter()
    try:
        code = lib.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if code != 0:
            raise ModelDirError(
                f"llama.cpp could not quantize {src} to {name} (code {code}); set MINIGPT4_LLAMA_LOG=1 to see why"
            )
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
        del keep  # the imatrix buffers were only needed during the call
    return QuantizeResult(
        path=dst,
        qtype=name,
        src_bytes=src.stat().st_size,
        dst_bytes=dst.stat().st_size,
        seconds=time.perf_counter() - start,
        imatrix_entries=len(entries),
        tensor_types=_type_histogram(dst),
    )
