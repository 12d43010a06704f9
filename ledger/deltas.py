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
from dataclasses import dataclass, field
from typing import Container, Iterable, Mapping

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from kledger.ledger.canonical import sha256_hex
from kledger.ledger.errors import IntegrityError, NumericalError, UsageError
from kledger.ledger.kinds import (  # noqa: F401  (the kinds are part of this module's API)
    KIND_OF, KINDS, DenseDelta, LowRankDelta, SparseDelta, TensorDelta, intersect, sum_deltas,
)

FORMAT_VERSION = "1"


@dataclass(frozen=True)
class Delta:
    """A set of tensor deltas keyed by parameter name, plus optional method state tensors."""

    tensors: Mapping[str, TensorDelta]
    state: Mapping[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, td in self.tensors.items():
            if not isinstance(td, KINDS):
                raise UsageError(f"{name}: expected a SparseDelta, LowRankDelta or DenseDelta, found {type(td).__name__}")
            td.validate(name)

    # --- introspection -------------------------------------------------------------------
    def summary(self) -> dict:
        """JSON-able description: per tensor its format, shape, size (nnz or rank) and norm."""
        return {name: {"format": td.kind, "shape": list(td.shape), **td.size(), "fro_norm": td.fro_norm()}
                for name, td in sorted(self.tensors.items())}

    # --- serialisation -------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        tensors: dict[str, torch.Tensor] = {}
        meta: dict[str, dict] = {}
        for name, td in sorted(self.tensors.items()):
            if "::" in name:
                raise UsageError(f"parameter names must not contain '::', found {name!r}")
            meta[name] = {"format": td.kind, "shape": list(td.shape)}
            tensors.update(td.to_tensors(name))
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
                kind = KIND_OF.get(m["format"])
                if kind is None:
                    raise IntegrityError(f"unknown delta format {m['format']!r} for {name}")
                tensors[name] = kind.from_tensors(name, tuple(int(s) for s in m["shape"]), raw)
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
        return Delta({name: td.scaled(factor) for name, td in self.tensors.items()}, dict(self.state))


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
    groups: dict[str, dict[type, list]] = {}
    for delta, sign in zip(deltas, signs):
        for name, td in delta.tensors.items():
            if name in params and tuple(td.shape) != tuple(params[name].shape):
                raise UsageError(
                    f"{name}: expected a delta of the tensor's shape {tuple(params[name].shape)}, found"
                    f" {td.kind} of shape {tuple(td.shape)}"
                )
            groups.setdefault(name, {}).setdefault(type(td), []).append((td, sign))
    out: dict[str, torch.Tensor] = {}
    for name, by_kind in groups.items():
        if name not in params:
            raise UsageError(f"delta names parameter {name!r}, which the model does not have")
        base = params[name]
        if name in owned and base.dtype == torch.float32:
            acc = base.detach()
        else:
            acc = base.detach().to(torch.float32).clone()
        for kind in KINDS:  # a fixed order: the same sums bit for bit whatever order deltas come in
            if kind in by_kind:
                kind.add_into(acc, by_kind[kind])
        out[name] = acc
    return out
