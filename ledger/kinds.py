"""The three kinds of tensor delta, each with its own storage, validation and arithmetic.

* ``SparseDelta``: flat int64 ``indices`` into the row-major tensor and fp32 ``values``
  (entries at a repeated index add up);
* ``LowRankDelta``: factors ``u`` (rows×r) and ``v`` (cols×r), ΔW = u @ vᵀ;
* ``DenseDelta``: a full fp32 tensor.

Callers (``deltas.accumulate``, ``merge``, ``kledger.audit.drift``) never branch on the kind: each
kind carries ``to_dense``, ``fro_norm``, ``scaled``, ``mv``, ``inner``, ``cross``, ``add_into`` and
``sum_of`` (see ``_Kind``). A ``Delta`` (``kledger.ledger.deltas``) maps parameter names to them.
"""

from __future__ import annotations

import functools
import math
import operator
from dataclasses import dataclass
from typing import ClassVar, Mapping, Sequence

import torch

from kledger.ledger.errors import NumericalError, UsageError


class _Kind:
    """What every tensor-delta kind provides (``SparseDelta``, ``LowRankDelta``, ``DenseDelta``).

    Each kind knows its own storage (``to_tensors``/``from_tensors``), validation, dense form,
    norm, scaling and products, so callers never branch on the kind:

    * ``to_dense()``         the fp32 tensor ΔW;
    * ``fro_norm()``         ‖ΔW‖_F without forming ΔW where the kind allows;
    * ``scaled(f)``          f·ΔW, same kind;
    * ``mv(k, transpose)``   ΔW k (or ΔWᵀ k) for a 2-D delta and keys k (dim × n), added into ``out``;
    * ``at(flat)``           ΔW's entries at flat row-major indices;
    * ``inner(other)``       ⟨ΔW, ΔW'⟩_F;
    * ``cross(w, w0)``       ⟨w − w0, ΔW⟩_F, or None where only the dense route works;
    * ``add_into(acc, parts)`` (classmethod) acc += Σ sign·ΔW over many deltas of this kind at once;
    * ``sum_of(shape, tds)`` (classmethod) one delta of this kind equal to the sum of ``tds``.

    ``implicit``: whether ``mv`` and ``cross`` avoid forming the dense matrix.
    """

    kind: ClassVar[str]
    implicit: ClassVar[bool] = True
    shape: tuple[int, ...]

    def _values(self, name: str) -> torch.Tensor:  # pragma: no cover - every kind defines it
        """Check the kind's own invariants; return every stored value (for the NaN/Inf check)."""
        raise NotImplementedError

    def validate(self, name: str) -> None:
        try:
            dims = [operator.index(s) for s in self.shape]
        except TypeError:
            dims = [-1]
        if any(s < 0 for s in dims):
            raise UsageError(f"{name}: expected a shape of non-negative ints, found {self.shape!r}")
        values = self._values(name)
        if values.numel() and not bool(torch.isfinite(values).all()):
            raise NumericalError(f"{name}: delta contains NaN or Inf values; nothing was recorded")

    def size(self) -> dict[str, int]:
        """The kind's size figure for summaries (``nnz`` or ``rank``; none for dense)."""
        return {}

    def fro_norm(self) -> float:
        return float(torch.linalg.vector_norm(self.to_dense()))

    def at(self, flat: torch.Tensor) -> torch.Tensor:
        return self.to_dense().reshape(-1)[flat]

    def inner(self, other: "TensorDelta") -> float:
        if isinstance(other, SparseDelta):  # sparse products never densify: let the sparse side lead
            return other.inner(self)  # type: ignore[arg-type]
        return float((self.to_dense() * other.to_dense()).sum())

    def cross(self, w: torch.Tensor, w0: torch.Tensor) -> float | None:
        return None

    def mv(self, k: torch.Tensor, transpose: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
        d = self.to_dense().to(k.device)
        res = d.T @ k if transpose else d @ k
        return res if out is None else out.add_(res)

    def to_dense(self) -> torch.Tensor:  # pragma: no cover - every kind defines it
        raise NotImplementedError


def _signed(t: torch.Tensor, sign: float) -> torch.Tensor:
    t = t.float()
    return t * sign if sign != 1.0 else t


@dataclass(frozen=True)
class SparseDelta(_Kind):
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

    @functools.cached_property
    def coalesced(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Sorted unique indices and their summed fp32 values (computed once per delta)."""
        idx, inv = torch.unique(self.indices, sorted=True, return_inverse=True)
        vals = torch.zeros(idx.numel(), dtype=torch.float32, device=self.values.device)
        vals.index_add_(0, inv, self.values.float())
        return idx, vals

    def size(self) -> dict[str, int]:
        return {"nnz": self.nnz}

    def fro_norm(self) -> float:
        return float(torch.linalg.vector_norm(self.coalesced[1]))

    def scaled(self, factor: float) -> "SparseDelta":
        return SparseDelta(self.shape, self.indices, self.values * factor)

    def at(self, flat: torch.Tensor) -> torch.Tensor:
        idx, vals = self.coalesced
        common, pa, pb = intersect(flat, idx)
        out = torch.zeros(flat.numel(), dtype=torch.float32)
        out[pa] = vals[pb]
        return out

    def inner(self, other: "TensorDelta") -> float:
        ia, va = self.coalesced
        if isinstance(other, SparseDelta):
            ib, vb = other.coalesced
            _, pa, pb = intersect(ia, ib)
            return float((va[pa] * vb[pb]).sum())
        return float((va * other.at(ia)).sum())

    def cross(self, w: torch.Tensor, w0: torch.Tensor) -> float:
        idx = self.indices.to(w.device)
        d = (w.reshape(-1)[idx] - w0.reshape(-1)[idx]).double()
        return float((d * self.values.to(w.device, torch.float64)).sum())

    def mv(self, k: torch.Tensor, transpose: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
        rows, cols = self.shape
        idx = self.indices.to(k.device)
        r, c = idx // cols, idx % cols
        vals = self.values.to(k.device, torch.float32)[:, None]
        if out is None:
            out = torch.zeros(cols if transpose else rows, k.shape[1], device=k.device)
        out = out.contiguous()
        return out.index_add_(0, c, vals * k[r]) if transpose else out.index_add_(0, r, vals * k[c])

    def to_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {f"{name}::indices": self.indices.detach().to("cpu", torch.int64).contiguous(),
                f"{name}::values": self.values.detach().to("cpu", torch.float32).contiguous()}

    @classmethod
    def from_tensors(cls, name: str, shape: tuple[int, ...], raw: Mapping[str, torch.Tensor]) -> "SparseDelta":
        return cls(shape, raw[f"{name}::indices"], raw[f"{name}::values"])

    def _values(self, name: str) -> torch.Tensor:
        if self.indices.ndim != 1 or self.values.ndim != 1 or self.indices.numel() != self.values.numel():
            raise UsageError(
                f"{name}: expected 1-D indices and values of equal length, found"
                f" {tuple(self.indices.shape)} and {tuple(self.values.shape)}"
            )
        if self.indices.dtype != torch.int64:
            raise UsageError(f"{name}: expected int64 indices, found {self.indices.dtype}")
        n = math.prod(self.shape)
        if self.indices.numel() and (int(self.indices.min()) < 0 or int(self.indices.max()) >= n):
            raise UsageError(f"{name}: expected indices in [0, {n}), found out-of-range entries")
        return self.values

    @classmethod
    def add_into(cls, acc: torch.Tensor, parts: Sequence[tuple["SparseDelta", float]]) -> None:
        dev = acc.device
        idx = torch.cat([td.indices.to(dev) for td, _ in parts])
        val = torch.cat([_signed(td.values, sign).to(dev) for td, sign in parts])
        acc.view(-1).index_add_(0, idx, val)

    @classmethod
    def sum_of(cls, shape: tuple[int, ...], tds: Sequence["SparseDelta"]) -> "SparseDelta":
        cat = SparseDelta(shape, torch.cat([t.indices for t in tds]), torch.cat([t.values.float() for t in tds]))
        return SparseDelta(shape, *cat.coalesced)


@dataclass(frozen=True)
class LowRankDelta(_Kind):
    shape: tuple[int, int]
    u: torch.Tensor  # rows × r
    v: torch.Tensor  # cols × r

    kind = "lowrank"

    def to_dense(self) -> torch.Tensor:
        return self.u.float() @ self.v.float().T

    @property
    def rank(self) -> int:
        return int(self.u.shape[1])

    def size(self) -> dict[str, int]:
        return {"rank": self.rank}

    def fro_norm(self) -> float:
        u, v = self.u.float(), self.v.float()
        # ‖u vᵀ‖²_F = tr((uᵀu)(vᵀv))
        return math.sqrt(max(float(((u.T @ u) * (v.T @ v)).sum()), 0.0))

    def scaled(self, factor: float) -> "LowRankDelta":
        return LowRankDelta(self.shape, self.u * factor, self.v)

    def at(self, flat: torch.Tensor) -> torch.Tensor:
        r, c = flat // self.shape[1], flat % self.shape[1]
        return (self.u.float()[r] * self.v.float()[c]).sum(1)

    def inner(self, other: "TensorDelta") -> float:
        if isinstance(other, LowRankDelta):
            return float(((self.u.float().T @ other.u.float()) * (self.v.float().T @ other.v.float())).sum())
        return super().inner(other)

    def cross(self, w: torch.Tensor, w0: torch.Tensor) -> float | None:
        if w.ndim != 2:
            return None
        u, v = self.u.to(w.device, torch.float32), self.v.to(w.device, torch.float32)
        return float(((w @ v - w0 @ v) * u).sum())  # ⟨w − w0, u vᵀ⟩ = Σ ((w − w0) v) ∘ u

    def mv(self, k: torch.Tensor, transpose: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
        u, v = self.u.to(k.device, torch.float32), self.v.to(k.device, torch.float32)
        res = v @ (u.T @ k) if transpose else u @ (v.T @ k)
        return res if out is None else out.add_(res)

    def to_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {f"{name}::u": self.u.detach().to("cpu", torch.float32).contiguous(),
                f"{name}::v": self.v.detach().to("cpu", torch.float32).contiguous()}

    @classmethod
    def from_tensors(cls, name: str, shape: tuple[int, ...], raw: Mapping[str, torch.Tensor]) -> "LowRankDelta":
        return cls(shape, raw[f"{name}::u"], raw[f"{name}::v"])  # type: ignore[arg-type]

    def _values(self, name: str) -> torch.Tensor:
        if len(self.shape) != 2 or self.u.ndim != 2 or self.v.ndim != 2:
            raise UsageError(f"{name}: low-rank deltas need a 2-D shape and 2-D factors")
        if self.u.shape[0] != self.shape[0] or self.v.shape[0] != self.shape[1] or self.u.shape[1] != self.v.shape[1]:
            raise UsageError(
                f"{name}: expected u {self.shape[0]}×r and v {self.shape[1]}×r, found"
                f" {tuple(self.u.shape)} and {tuple(self.v.shape)}"
            )
        return torch.cat([self.u.reshape(-1), self.v.reshape(-1)])

    @classmethod
    def add_into(cls, acc: torch.Tensor, parts: Sequence[tuple["LowRankDelta", float]]) -> None:
        dev = acc.device
        u = torch.cat([_signed(td.u, sign).to(dev) for td, sign in parts], dim=1)
        v = torch.cat([td.v.float().to(dev) for td, _ in parts], dim=1)
        acc.addmm_(u, v.T)

    @classmethod
    def sum_of(cls, shape: tuple[int, ...], tds: Sequence["LowRankDelta"]) -> "LowRankDelta":
        return LowRankDelta(shape, torch.cat([t.u.float() for t in tds], 1),  # type: ignore[arg-type]
                            torch.cat([t.v.float() for t in tds], 1))


@dataclass(frozen=True)
class DenseDelta(_Kind):
    shape: tuple[int, ...]
    values: torch.Tensor

    kind = "dense"
    implicit = False

    def to_dense(self) -> torch.Tensor:
        return self.values.float()

    def scaled(self, factor: float) -> "DenseDelta":
        return DenseDelta(self.shape, self.values * factor)

    def to_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {f"{name}::dense": self.values.detach().to("cpu", torch.float32).contiguous()}

    @classmethod
    def from_tensors(cls, name: str, shape: tuple[int, ...], raw: Mapping[str, torch.Tensor]) -> "DenseDelta":
        return cls(shape, raw[f"{name}::dense"])

    def _values(self, name: str) -> torch.Tensor:
        if tuple(self.values.shape) != tuple(self.shape):
            raise UsageError(f"{name}: expected dense values of shape {self.shape}, found {tuple(self.values.shape)}")
        return self.values

    @classmethod
    def add_into(cls, acc: torch.Tensor, parts: Sequence[tuple["DenseDelta", float]]) -> None:
        for td, sign in parts:
            acc.add_(_signed(td.values, sign).to(acc.device))

    @classmethod
    def sum_of(cls, shape: tuple[int, ...], tds: Sequence["TensorDelta"]) -> "DenseDelta":
        acc = torch.zeros(shape, dtype=torch.float32)
        for t in tds:
            acc += t.to_dense()
        return DenseDelta(shape, acc)


TensorDelta = SparseDelta | LowRankDelta | DenseDelta
#: the kinds, in the order ``accumulate`` adds them to a tensor (sparse, low rank, dense)
KINDS: tuple[type, ...] = (SparseDelta, LowRankDelta, DenseDelta)
#: a kind by its ``format`` name on disk
KIND_OF = {k.kind: k for k in KINDS}


def intersect(ia: torch.Tensor, ib: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Common values of two sorted unique index tensors, and their positions in each."""
    if ia.numel() == 0 or ib.numel() == 0:
        e = torch.zeros(0, dtype=torch.int64)
        return e, e, e
    pos = torch.searchsorted(ib, ia).clamp(max=ib.numel() - 1)
    hit = ib[pos] == ia
    pa = torch.nonzero(hit).flatten()
    return ia[pa], pa, pos[pa]


def sum_deltas(shape: tuple[int, ...], tds: Sequence[TensorDelta]) -> TensorDelta:
    """One tensor delta equal to the sum of ``tds``: of their kind when they share one, else dense."""
    kinds = {type(t) for t in tds}
    cls = kinds.pop() if len(kinds) == 1 else DenseDelta
    return cls.sum_of(shape, tds)
