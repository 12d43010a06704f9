"""Describe a stored delta object without torch: what ``kledger show`` prints about a delta.

``Delta.summary()`` needs the tensors as torch tensors, and importing torch costs seconds; read
commands must start fast. This module reads the safetensors layout itself (an 8-byte header
length, a JSON header, raw little-endian data) and computes the same figures in plain Python
(``array`` + ``math.fsum``) for the usual small deltas, with numpy (~0.1 s to import) only for
big ones. Norms are summed in float64 (``Delta.summary`` works in float32), so the last digits
can differ from it; a low-rank delta's norm comes from the factors' Gram matrices
(``‖U Vᵀ‖²_F = Σ (UᵀU) ∘ (VᵀV)``) without forming the matrix.
"""

from __future__ import annotations

import json
import math
import operator
import sys
from array import array
from typing import Any

from kledger.ledger.errors import IntegrityError

FORMAT_VERSION = "1"  # the ``kledger_delta`` metadata version written by ``Delta.to_bytes``

#: safetensors dtype → (array typecode or None, numpy dtype)
_DTYPES = {"F64": ("d", "<f8"), "F32": ("f", "<f4"), "F16": (None, "<f2"), "BF16": (None, None),
           "I64": ("q", "<i8"), "I32": ("i", "<i4"), "I16": ("h", "<i2"), "I8": ("b", "i1"), "U8": ("B", "u1")}
#: above this many multiply-adds, numpy does the arithmetic
_PLAIN_WORK = 2_000_000


class _Tensor:
    def __init__(self, name: str, dtype: str, shape: list[int], data: memoryview) -> None:
        self.name, self.dtype, self.shape, self.data = name, dtype, shape, data
        self.size = math.prod(shape)

    def plain(self) -> array | None:
        """The values as a flat ``array`` (None: a dtype ``array`` lacks)."""
        code = _DTYPES[self.dtype][0]
        if code is None:
            return None
        a = array(code)
        a.frombytes(self.data)
        if sys.byteorder != "little":  # pragma: no cover
            a.byteswap()
        return a

    def numpy(self):
        import numpy as np

        if self.dtype == "BF16":  # numpy has no bfloat16: widen to float32 by shifting the bits
            return (np.frombuffer(self.data, dtype="<u2").astype(np.uint32) << 16).view(np.float32).reshape(self.shape)
        return np.frombuffer(self.data, dtype=_DTYPES[self.dtype][1]).reshape(self.shape)


def read_header(data: bytes) -> tuple[dict[str, Any], int]:
    """``(header JSON object, its length n)`` of a safetensors blob (the tensor bytes start at
    ``8 + n``), with IntegrityError if malformed. Shared with ``kledger.ledger.deltas``."""
    if len(data) < 8:
        raise IntegrityError(f"malformed delta object: {len(data)} bytes is shorter than a safetensors header")
    n = int.from_bytes(data[:8], "little")
    if n <= 0 or 8 + n > len(data):
        raise IntegrityError(f"malformed delta object: header length {n} exceeds file size {len(data)}")
    try:
        header = json.loads(data[8 : 8 + n])
    except ValueError as exc:
        raise IntegrityError(f"malformed delta object header: {exc}") from None
    if not isinstance(header, dict):
        raise IntegrityError(f"malformed delta object header: expected a JSON object, found {type(header).__name__}")
    return header, n


def _tensors(data: bytes) -> tuple[dict[str, Any], dict[str, _Tensor]]:
    """``(metadata, {name: tensor})`` of a safetensors blob, with IntegrityError if malformed."""
    header, n = read_header(data)
    meta = header.pop("__metadata__", None) or {}
    body = memoryview(data)[8 + n :]
    out = {}
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], [int(s) for s in info["shape"]], info["data_offsets"]
        except (KeyError, TypeError, ValueError) as exc:
            raise IntegrityError(f"malformed delta object: bad header entry for {name}: {exc}") from None
        if dtype not in _DTYPES:
            raise IntegrityError(f"malformed delta object: unknown dtype {dtype!r} for {name}")
        if not 0 <= begin <= end <= len(body):
            raise IntegrityError(f"malformed delta object: {name} lies outside the data")
        t = _Tensor(name, dtype, shape, body[begin:end])
        width = 2 if dtype in ("F16", "BF16", "I16") else 1 if dtype in ("I8", "U8") else 4 if dtype in ("F32", "I32") else 8
        if t.size * width != end - begin:
            raise IntegrityError(f"malformed delta object: {name} has {end - begin} bytes for shape {shape} of {dtype}")
        out[name] = t
    return meta, out


def _sumsq(t: _Tensor) -> float:
    a = t.plain() if t.size <= _PLAIN_WORK else None
    if a is not None:
        return math.fsum(map(operator.mul, a, a))
    v = t.numpy().astype("float64").reshape(-1)
    return float(v @ v)


def _sparse_sumsq(idx_t: _Tensor, val_t: _Tensor, n: int) -> tuple[int, float]:
    """(nnz, Σ of squares of the dense matrix): entries at one index add up, as in ``to_dense``."""
    if idx_t.dtype != "I64":
        raise IntegrityError(f"malformed delta object: sparse indices of dtype {idx_t.dtype}, expected I64")
    if idx_t.size != val_t.size:
        raise IntegrityError(f"malformed delta object: {idx_t.size} sparse indices for {val_t.size} values")
    idx, vals = idx_t.plain(), val_t.plain()
    if idx_t.size <= _PLAIN_WORK and idx is not None and vals is not None:
        if idx and (min(idx) < 0 or max(idx) >= n):
            raise IntegrityError(f"malformed delta object: sparse indices outside [0, {n})")
        if len(set(idx)) != len(idx):
            acc: dict[int, float] = {}
            for i, v in zip(idx, vals):
                acc[i] = acc.get(i, 0.0) + v
            vals = array("d", acc.values())
        return len(idx), math.fsum(map(operator.mul, vals, vals))
    import numpy as np

    i, v = idx_t.numpy().reshape(-1).astype(np.int64), val_t.numpy().reshape(-1).astype(np.float64)
    if i.size and (i.min() < 0 or i.max() >= n):
        raise IntegrityError(f"malformed delta object: sparse indices outside [0, {n})")
    uniq, inv = np.unique(i, return_inverse=True)
    if uniq.size != i.size:
        v = np.bincount(inv, weights=v, minlength=uniq.size)
    return int(i.size), float(v @ v)


def _lowrank_sumsq(u_t: _Tensor, v_t: _Tensor, shape: list[int]) -> tuple[int, float]:
    if len(u_t.shape) != 2 or len(v_t.shape) != 2 or u_t.shape[1] != v_t.shape[1] \
            or [u_t.shape[0], v_t.shape[0]] != shape:
        raise IntegrityError(f"malformed delta object: factors {u_t.shape} and {v_t.shape} for a {shape} delta")
    r = u_t.shape[1]
    u, v = u_t.plain(), v_t.plain()
    if u is not None and v is not None and (shape[0] + shape[1]) * r * r <= _PLAIN_WORK:
        uc = [u[j::r] for j in range(r)]  # the factors' columns (row-major storage)
        vc = [v[j::r] for j in range(r)]
        total = []
        for a in range(r):
            for b in range(a, r):
                gu = math.fsum(map(operator.mul, uc[a], uc[b]))
                gv = math.fsum(map(operator.mul, vc[a], vc[b]))
                total.append(gu * gv * (1 if a == b else 2))
        return r, math.fsum(total)
    import numpy as np

    un, vn = u_t.numpy().astype(np.float64), v_t.numpy().astype(np.float64)
    return r, float(np.sum((un.T @ un) * (vn.T @ vn)))


def summary_from_bytes(data: bytes) -> dict[str, dict[str, Any]]:
    """Per edited tensor: ``format``, ``shape``, ``nnz`` (sparse) or ``rank`` (low-rank), and
    ``fro_norm`` — the keys and meaning of ``Delta.summary()``."""
    meta_json, raw = _tensors(data)
    if meta_json.get("kledger_delta") != FORMAT_VERSION or "tensors" not in meta_json:
        raise IntegrityError(f"expected kledger delta metadata version {FORMAT_VERSION}, found {meta_json!r}")
    try:
        meta = json.loads(meta_json["tensors"])
    except (TypeError, ValueError) as exc:
        raise IntegrityError(f"malformed delta object: tensor metadata is not JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise IntegrityError(f"expected a JSON object of tensor entries, found {type(meta).__name__}")
    out: dict[str, dict[str, Any]] = {}
    try:
        for name in sorted(meta):
            m = meta[name]
            if not isinstance(m, dict) or "format" not in m or not isinstance(m.get("shape"), list):
                raise IntegrityError(f"expected {{format, shape}} metadata for {name}, found {m!r}")
            shape = [int(s) for s in m["shape"]]
            d: dict[str, Any] = {"format": m["format"], "shape": shape}
            if m["format"] == "sparse":
                d["nnz"], norm2 = _sparse_sumsq(raw[f"{name}::indices"], raw[f"{name}::values"], math.prod(shape))
            elif m["format"] == "lowrank":
                d["rank"], norm2 = _lowrank_sumsq(raw[f"{name}::u"], raw[f"{name}::v"], shape)
            elif m["format"] == "dense":
                dense = raw[f"{name}::dense"]
                if dense.shape != shape:
                    raise IntegrityError(f"malformed delta object: dense values {dense.shape} for a {shape} delta")
                norm2 = _sumsq(dense)
            else:
                raise IntegrityError(f"unknown delta format {m['format']!r} for {name}")
            if not math.isfinite(norm2):
                raise IntegrityError(f"malformed delta object: {name} holds NaN or Inf values")
            d["fro_norm"] = math.sqrt(max(norm2, 0.0))
            out[name] = d
    except KeyError as exc:
        raise IntegrityError(f"malformed delta object: missing tensor {exc}") from None
    except (ValueError, OverflowError) as exc:  # math.fsum on inf - inf, or overflowing sums
        raise IntegrityError(f"malformed delta object: NaN or Inf values ({exc})") from None
    return out
