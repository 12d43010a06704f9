"""Weight deltas: sparse COO, low-rank factors, dense; safetensors (de)serialisation; apply.

A ``Delta`` maps parameter names (as in ``model.state_dict()``, in the parameter's own storage
layout — GPT-2's Conv1D weights are in×out) to one tensor delta each:

* ``SparseDelta``: flat int64 ``indices`` into the row-major tensor and fp32 ``values``.
* ``LowRankDelta``: factors ``u`` (rows×r) and ``v`` (cols×r), ΔW = u @ vᵀ.
* ``DenseDelta``: a full fp32 tensor.

On disk a delta is one safetensors file: ``NAME::indices``/``NAME::values``,
``NAME::u``/``NAME::v`` or ``NAME::dense``; ``__metadata__`` holds, per tensor, its format and
dense shape as JSON (safetensors metadata is str→str). Extra named tensors (``state::...``) carry
method state such as AlphaEdit's edited keys; they never touch the model.
"""

from __future__ import annotations

import json
import math
import operator
from dataclasses import dataclass, field
from typing import Container, Iterable, Mapping

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from kledger.ledger.canonical import sha256_hex
from kledger.ledger.errors import IntegrityError, NumericalError, UsageError

FORMAT_VERSION = "1"


@dataclass(frozen=True)
class SparseDelta:
    shape: tuple[int, ...]
    indices: torch.Tensor  # int64, flat, unique
    values: torch.Tensor  # float32

    kind = "sparse"

    def to_dense(self) -> torch.Tensor:
        out = torch.zeros(math.prod(self.shape), dtype=torch.float32, device=self.values.device)
        out.index_add_(0, self.indices.to(out.device), self.values.float())
        return out.view(self.shape)

    @property
    def nnz(self) -> int:
        return int(self.indices.numel())


@dataclass(frozen=True)
class LowRankDelta:
    shape: tuple[int, int]
    u: torch.Tensor  # rows × r
    v: torch.Tensor  # cols × r

    kind = "lowrank"

    def to_dense(self) -> torch.Tensor:
        return self.u.float() @ self.v.float().T

    @property
    def rank(self) -> int:
        return int(self.u.shape[1])


@dataclass(frozen=True)
class DenseDelta:
    shape: tuple[int, ...]
    values: torch.Tensor

    kind = "dense"

    def to_dense(self) -> torch.Tensor:
        return self.values.float()


TensorDelta = SparseDelta | LowRankDelta | DenseDelta


@dataclass(frozen=True)
class Delta:
    """A set of tensor deltas keyed by parameter name, plus optional method state tensors."""

    tensors: Mapping[str, TensorDelta]
    state: Mapping[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, td in self.tensors.items():
            _validate(name, td)

    # --- introspection -------------------------------------------------------------------
    def summary(self) -> dict:
        """JSON-able description: per tensor its format, shape and size (nnz or rank)."""
        out = {}
        for name, td in sorted(self.tensors.items()):
            d = {"format": td.kind, "shape": list(td.shape)}
            if isinstance(td, SparseDelta):
                d["nnz"] = td.nnz
            elif isinstance(td, LowRankDelta):
                d["rank"] = td.rank
            d["fro_norm"] = float(torch.linalg.vector_norm(td.to_dense()).item())
            out[name] = d
        return out

    # --- serialisation -------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        tensors: dict[str, torch.Tensor] = {}
        meta: dict[str, dict] = {}
        for name, td in sorted(self.tensors.items()):
            if "::" in name:
                raise UsageError(f"parameter names must not contain '::', found {name!r}")
            meta[name] = {"format": td.kind, "shape": list(td.shape)}
            if isinstance(td, SparseDelta):
                tensors[f"{name}::indices"] = td.indices.detach().to("cpu", torch.int64).contiguous()
                tensors[f"{name}::values"] = td.values.detach().to("cpu", torch.float32).contiguous()
            elif isinstance(td, LowRankDelta):
                tensors[f"{name}::u"] = td.u.detach().to("cpu", torch.float32).contiguous()
                tensors[f"{name}::v"] = td.v.detach().to("cpu", torch.float32).contiguous()
            else:
                tensors[f"{name}::dense"] = td.values.detach().to("cpu", torch.float32).contiguous()
        for key, t in sorted(self.state.items()):
            tensors[f"state::{key}"] = t.detach().cpu().contiguous()
        # safetensors refuses tensors that share memory (e.g. u is v for a symmetric update)
        seen: set[int] = set()
        for key, t in tensors.items():
            ptr = t.untyped_storage().data_ptr()
            if t.numel() and ptr in seen:
                tensors[key] = t.clone()
            seen.add(ptr)
        metadata = {"kledger_delta": FORMAT_VERSION, "tensors": json.dumps(meta, sort_keys=True)}
        return _canonical_header(st_save(tensors, metadata=metadata))

    @classmethod
    def from_bytes(cls, data: bytes, expected_sha256: str | None = None) -> "Delta":
        if expected_sha256 is not None:
            found = sha256_hex(data)
            if found != expected_sha256:
                raise IntegrityError(f"delta object hash mismatch: expected {expected_sha256}, found {found}")
        try:
            meta_json = _read_metadata(data)
            raw = st_load(data)
        except IntegrityError:
            raise
        except Exception as exc:  # safetensors raises several types for malformed input
            raise IntegrityError(f"malformed delta object: {exc}") from None
        if meta_json.get("kledger_delta") != FORMAT_VERSION or "tensors" not in meta_json:
            raise IntegrityError(
                f"expected kledger delta metadata version {FORMAT_VERSION}, found {meta_json!r}"
            )
        tensors: dict[str, TensorDelta] = {}
        try:
            meta = json.loads(meta_json["tensors"])
            if not isinstance(meta, dict):
                raise IntegrityError(f"expected a JSON object of tensor entries, found {type(meta).__name__}")
            for name, m in meta.items():
                if not isinstance(m, dict) or "format" not in m or not isinstance(m.get("shape"), list):
                    raise IntegrityError(f"expected {{format, shape}} metadata for {name}, found {m!r}")
                shape = tuple(int(s) for s in m["shape"])
                if m["format"] == "sparse":
                    tensors[name] = SparseDelta(shape, raw[f"{name}::indices"], raw[f"{name}::values"])
                elif m["format"] == "lowrank":
                    tensors[name] = LowRankDelta(shape, raw[f"{name}::u"], raw[f"{name}::v"])  # type: ignore[arg-type]
                elif m["format"] == "dense":
                    tensors[name] = DenseDelta(shape, raw[f"{name}::dense"])
                else:
                    raise IntegrityError(f"unknown delta format {m['format']!r} for {name}")
            state = {k[len("state::"):]: v for k, v in raw.items() if k.startswith("state::")}
            # validation (shapes, index ranges, NaN/Inf) runs in the constructor: a stored object
            # that fails it is corrupt, so it is reported as an integrity error like any other
            return cls(tensors, state)
        except KeyError as exc:
            raise IntegrityError(f"malformed delta object: missing tensor {exc}") from None
        except (UsageError, NumericalError, ValueError, TypeError) as exc:
            raise IntegrityError(f"malformed delta object: {exc}") from None

    # --- algebra -------------------------------------------------------------------------
    def scaled(self, factor: float) -> "Delta":
        out: dict[str, TensorDelta] = {}
        for name, td in self.tensors.items():
            if isinstance(td, SparseDelta):
                out[name] = SparseDelta(td.shape, td.indices, td.values * factor)
            elif isinstance(td, LowRankDelta):
                out[name] = LowRankDelta(td.shape, td.u * factor, td.v)
            else:
                out[name] = DenseDelta(td.shape, td.values * factor)
        return Delta(out, dict(self.state))


def _canonical_header(data: bytes) -> bytes:
    """Rewrite the safetensors JSON header with sorted keys (padded to 8 bytes with spaces).

    safetensors writes ``__metadata__`` in hash-map order, which varies from call to call; the
    object's content address must depend only on the delta, so the header is made canonical.
    """
    n = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8 : 8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + data[8 + n :]


def _read_metadata(data: bytes) -> dict:
    from kledger.ledger.deltainfo import read_header

    return read_header(data)[0].get("__metadata__") or {}


def _validate(name: str, td: TensorDelta) -> None:
    if isinstance(td, (SparseDelta, LowRankDelta, DenseDelta)):
        try:
            dims = [operator.index(s) for s in td.shape]
        except TypeError:
            dims = [-1]
        if any(s < 0 for s in dims):
            raise UsageError(f"{name}: expected a shape of non-negative ints, found {td.shape!r}")
    if isinstance(td, SparseDelta):
        if td.indices.ndim != 1 or td.values.ndim != 1 or td.indices.numel() != td.values.numel():
            raise UsageError(
                f"{name}: expected 1-D indices and values of equal length, found"
                f" {tuple(td.indices.shape)} and {tuple(td.values.shape)}"
            )
        if td.indices.dtype != torch.int64:
            raise UsageError(f"{name}: expected int64 indices, found {td.indices.dtype}")
        n = math.prod(td.shape)
        if td.indices.numel() and (int(td.indices.min()) < 0 or int(td.indices.max()) >= n):
            raise UsageError(f"{name}: expected indices in [0, {n}), found out-of-range entries")
        values = td.values
    elif isinstance(td, LowRankDelta):
        if len(td.shape) != 2 or td.u.ndim != 2 or td.v.ndim != 2:
            raise UsageError(f"{name}: low-rank deltas need a 2-D shape and 2-D factors")
        if td.u.shape[0] != td.shape[0] or td.v.shape[0] != td.shape[1] or td.u.shape[1] != td.v.shape[1]:
            raise UsageError(
                f"{name}: expected u {td.shape[0]}×r and v {td.shape[1]}×r, found"
                f" {tuple(td.u.shape)} and {tuple(td.v.shape)}"
            )
        values = torch.cat([td.u.reshape(-1), td.v.reshape(-1)])
    elif isinstance(td, DenseDelta):
        if tuple(td.values.shape) != tuple(td.shape):
            raise UsageError(f"{name}: expected dense values of shape {td.shape}, found {tuple(td.values.shape)}")
        values = td.values
    else:
        raise UsageError(f"{name}: expected a SparseDelta, LowRankDelta or DenseDelta, found {type(td).__name__}")
    if values.numel() and not bool(torch.isfinite(values).all()):
        raise NumericalError(f"{name}: delta contains NaN or Inf values; nothing was recorded")


def accumulate(
    params: Mapping[str, torch.Tensor], deltas: Iterable[Delta], signs: Iterable[float] | None = None,
    owned: Container[str] = (),
) -> dict[str, torch.Tensor]:
    """Sum many deltas per tensor in fp32: returns {name: base_fp32 + Σ sign·Δ}.

    Grouped per tensor: every low-rank factor of one tensor is concatenated and applied with one
    matmul, every sparse entry with one ``index_add_``, so the cost grows with the total delta
    size, not with a Python step per event. Only tensors that some delta touches are returned.
    ``owned``: names whose tensor in ``params`` is the caller's own fp32 scratch, added to in
    place instead of copied (same result, bit for bit; saves one copy of each such tensor).
    """
    deltas = list(deltas)
    signs = [1.0] * len(deltas) if signs is None else list(signs)
    groups: dict[str, dict[str, list]] = {}
    for delta, sign in zip(deltas, signs):
        for name, td in delta.tensors.items():
            if name in params and tuple(td.shape) != tuple(params[name].shape):
                raise UsageError(
                    f"{name}: expected a delta of the tensor's shape {tuple(params[name].shape)}, found"
                    f" {td.kind} of shape {tuple(td.shape)}"
                )
            g = groups.setdefault(name, {"sparse_i": [], "sparse_v": [], "u": [], "v": [], "dense": []})
            if isinstance(td, SparseDelta):
                g["sparse_i"].append(td.indices)
                g["sparse_v"].append(td.values.float() * sign if sign != 1.0 else td.values.float())
            elif isinstance(td, LowRankDelta):
                g["u"].append(td.u.float() * sign if sign != 1.0 else td.u.float())
                g["v"].append(td.v.float())
            else:
                g["dense"].append(td.values.float() * sign if sign != 1.0 else td.values.float())
    out: dict[str, torch.Tensor] = {}
    for name, g in groups.items():
        if name not in params:
            raise UsageError(f"delta names parameter {name!r}, which the model does not have")
        base = params[name]
        dev = base.device
        if name in owned and base.dtype == torch.float32:
            acc = base.detach()
        else:
            acc = base.detach().to(torch.float32).clone()
        shape = tuple(acc.shape)
        flat = acc.view(-1)
        if g["sparse_i"]:
            idx = torch.cat([i.to(dev) for i in g["sparse_i"]])
            val = torch.cat([v.to(dev) for v in g["sparse_v"]])
            flat.index_add_(0, idx, val)
        if g["u"]:
            u = torch.cat([x.to(dev) for x in g["u"]], dim=1)
            v = torch.cat([x.to(dev) for x in g["v"]], dim=1)
            if (u.shape[0], v.shape[0]) != shape:
                raise UsageError(f"{name}: low-rank delta of shape {(u.shape[0], v.shape[0])} for a tensor of shape {shape}")
            acc.addmm_(u, v.T)
        for d in g["dense"]:
            if tuple(d.shape) != shape:
                raise UsageError(f"{name}: dense delta of shape {tuple(d.shape)} for a tensor of shape {shape}")
            acc.add_(d.to(dev))
        out[name] = acc
    return out
