"""UltraEdit's arithmetic (``editors/ultraedit.py``): the lifelong normaliser's sufficient statistics,
the editor state read back from earlier events, and the ridge solve with its preservation factor."""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from kledger.ledger.errors import UsageError


@dataclass
class GradStats:
    """Sufficient statistics of gradient rows: count, Σg, Σg² (float64, per dimension)."""

    count: torch.Tensor
    total: torch.Tensor
    sq: torch.Tensor

    @classmethod
    def zeros(cls, dim: int) -> "GradStats":
        z = torch.zeros(dim, dtype=torch.float64)
        return cls(torch.zeros(1, dtype=torch.float64), z, z.clone())

    @classmethod
    def of(cls, G: torch.Tensor) -> "GradStats":
        G = G.double().cpu()
        return cls(torch.tensor([float(G.shape[0])], dtype=torch.float64), G.sum(0), (G * G).sum(0))

    def __add__(self, other: "GradStats") -> "GradStats":
        return GradStats(self.count + other.count, self.total + other.total, self.sq + other.sq)

    def normalise(self, G: torch.Tensor, prior: float, eps: float) -> torch.Tensor:
        """``(G − m) / sqrt(s² + ε)`` with m, s² shrunk toward (0, pooled mean square) by ``prior`` rows."""
        n = float(self.count)
        pooled = float(self.sq.sum()) / max(n * self.sq.numel(), 1.0)
        mean = self.total / (n + prior)
        var = (self.sq + prior * pooled) / (n + prior) - mean * mean
        var = var.clamp_min(0) + eps * max(pooled, 1e-30)
        return (G.double().cpu() - mean) / var.sqrt()


def _state_stats(states: Sequence[Mapping[str, torch.Tensor]], layer: int, dim: int) -> GradStats:
    total = GradStats.zeros(dim)
    for j, st in enumerate(states):
        if f"gsum.{layer}" not in st:
            continue
        s = GradStats(st[f"gcount.{layer}"].double(), st[f"gsum.{layer}"].double(), st[f"gsq.{layer}"].double())
        if s.total.shape != (dim,):
            raise UsageError(f"history state {j}: expected gsum.{layer} of shape ({dim},), found {tuple(s.total.shape)}")
        total = total + s
    return total


def _history_keys(states: Sequence[Mapping[str, torch.Tensor]], layer: int, dim: int,
                  device: torch.device | str = "cpu") -> torch.Tensor | None:
    """``Σ K_e K_eᵀ`` over earlier events' keys (float64, on ``device``: the layer's), added event by
    event in ledger order; the sum of the longest prefix seen before comes from ``GRAM_MEMO``."""
    mats = [st[f"keys.{layer}"] for st in states if f"keys.{layer}" in st]
    for K in mats:
        if K.ndim != 2 or K.shape[0] != dim:
            raise UsageError(f"history state: expected keys.{layer} of shape ({dim}, n), found {tuple(K.shape)}")
    if not mats:
        return None
    return GRAM_MEMO.gram(layer, mats, dim).to(device)  # a fresh tensor: the memo keeps its own copy


class GramMemo:
    """The running ``Σ K_e K_eᵀ`` of one layer's history, so a batch adds only the new events' keys.

    Key histories grow by every turn's rows (65,000 rows a layer after the 1,000-edit stream with the
    defaults: recomputing the sum cost about 23 s a batch there). The memo keeps, per layer, weak
    references to the key matrices it summed and their sum (float64, on the CPU); a call whose matrices
    start with those same objects (the ``Workspace`` reuses each event's state) adds the rest. Every path
    adds the events one by one in order, so a hit and a miss give bit-identical sums: a cache of a pure
    function, not editor state. Sums larger than ``max_bytes`` are not kept."""

    def __init__(self, max_bytes: int = 1 << 30) -> None:
        self.max_bytes = max_bytes
        self._entries: dict[int, tuple[tuple[weakref.ref, ...], torch.Tensor]] = {}
        self.hits = 0

    def gram(self, layer: int, mats: Sequence[torch.Tensor], dim: int) -> torch.Tensor:
        refs, H = self._entries.get(layer, ((), None))
        n = len(refs)
        if H is not None and H.shape == (dim, dim) and n <= len(mats) and all(r() is m for r, m in zip(refs, mats)):
            H = H.clone()
            self.hits += 1
        else:
            H, n = torch.zeros(dim, dim, dtype=torch.float64), 0
        for K in mats[n:]:
            K = K.to("cpu", torch.float64)
            H.addmm_(K, K.T)
        if H.numel() * H.element_size() <= self.max_bytes:
            self._entries[layer] = (tuple(weakref.ref(m) for m in mats), H.clone())
        else:
            self._entries.pop(layer, None)
        return H

    def clear(self) -> None:
        self._entries.clear()


GRAM_MEMO = GramMemo()


def ridge_factors(K: torch.Tensor, V: torch.Tensor, lam: float, H: torch.Tensor | None, mu: float,
                  chol: torch.Tensor | None = None) -> torch.Tensor:
    """``M = S⁻¹Kᵀ`` (in×rows, float64) with ``S = KᵀK + μH + λI``, so that ``ΔW = Vᵀ Mᵀ``.

    Without history the push-through identity ``(KᵀK + λI)⁻¹Kᵀ = Kᵀ(KKᵀ + λI)⁻¹`` keeps the
    solve rows×rows. With history, ``A = μH + λI`` is factorised once (``chol``, see
    ``history_factor``, which may also hold ``λ_c C0``) and Woodbury's identity gives ``S⁻¹Kᵀ = A⁻¹Kᵀ (I + K A⁻¹ Kᵀ)⁻¹``."""
    K = K.double()
    eye = torch.eye(K.shape[0], dtype=torch.float64, device=K.device)
    if chol is None and (H is None or mu == 0):
        return K.T @ torch.linalg.inv(K @ K.T + lam * eye)
    if chol is None:
        chol = history_factor(H, lam, mu)
    AinvKt = chol_solve(chol.to(K.device), K.T.contiguous())
    return AinvKt @ torch.linalg.inv(eye + K @ AinvKt)


def chol_solve(L: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``A⁻¹B`` from the lower Cholesky factor ``L`` of ``A``, as two triangular solves: unlike
    ``torch.cholesky_solve``, which copies the in×in factor into a column-major buffer at every
    call (0.5 GiB a layer for an 8192-wide MLP), these read ``L`` in place."""
    y = torch.linalg.solve_triangular(L, B, upper=False)
    return torch.linalg.solve_triangular(L.mT, y, upper=True)


def history_factor(H: torch.Tensor | None, lam: float, mu: float, C0: torch.Tensor | None = None,
                   lam_c: float = 0.0, Ce: torch.Tensor | None = None, lam_e: float = 0.0) -> torch.Tensor:
    """Cholesky factor of ``A = μH + λ_c C0 + λ_e C_ent + λI`` (float64, on the device of
    ``H``/``C0``), shared by every turn of a batch."""
    ref = H if H is not None else C0
    if C0 is not None and lam_c:  # A starts as the float64 copy of C0, scaled in place: one in×in buffer
        A = C0.to(ref.device, torch.float64, copy=True).mul_(lam_c)
    else:
        A = torch.zeros(ref.shape[0], ref.shape[0], dtype=torch.float64, device=ref.device)
    A.diagonal().add_(lam)
    if H is not None and mu:
        A.add_(H.to(ref.device, torch.float64), alpha=mu)
    if Ce is not None and lam_e:
        A.add_(Ce.to(ref.device), alpha=lam_e)  # widened element-wise: no float64 copy of C_ent
    return torch.linalg.cholesky(A, out=A)  # factorised in its own buffer (LAPACK's potrf is in place)
