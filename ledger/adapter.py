"""Deltas as LoRA factors: the arithmetic behind ``kledger export --format peft``.

A low-rank delta ``ΔW = u vᵀ`` is already a LoRA pair. The active low-rank deltas of one tensor are
concatenated (``L = [u₁ … uₙ]``, ``R = [v₁ … vₙ]ᵀ``, summed rank ``Σ rᵢ``), so ``L @ R`` is their
sum exactly. When the summed rank exceeds the tensor's smaller dimension (where it can be cut
without loss) or a ``max_rank``, the product is re-factored by SVD (through the QR factors of
``L`` and ``Rᵀ``: the full matrix is never formed) and truncated; the relative Frobenius error of
the truncation is reported. Sparse and dense deltas have no exact low-rank form: they are refused
unless ``lossy``, which factors their (dense) sum by SVD and reports the error.

Factors are in the tensor's storage layout (rows × cols of the stored weight); mapping them onto a
module's ``lora_A``/``lora_B`` (and GPT-2's transposed Conv1D) is the caller's business.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch

from kledger.ledger.deltas import Delta
from kledger.ledger.errors import UsageError
from kledger.ledger.kinds import LowRankDelta


@dataclass(frozen=True)
class Factors:
    """``ΔW ≈ left @ right`` for one tensor: ``left`` rows×k, ``right`` k×cols (fp32)."""

    left: torch.Tensor
    right: torch.Tensor
    summed_rank: int  # Σ ranks of the low-rank deltas (or min(rows, cols) for sparse/dense ones)
    rel_error: float  # ‖ΔW − left @ right‖_F / ‖ΔW‖_F (0 when nothing was cut)
    kinds: tuple[str, ...]  # the delta kinds that went in

    @property
    def rank(self) -> int:
        return int(self.left.shape[1])

    def to_json(self) -> dict:
        return {"rank": self.rank, "summed_rank": self.summed_rank, "rel_error": self.rel_error,
                "kinds": list(self.kinds)}


def lora_factors(deltas: Iterable[Delta], *, max_rank: int | None = None, lossy: bool = False,
                 names: Mapping[str, str] | None = None) -> dict[str, Factors]:
    """Per tensor name, LoRA factors of the sum of ``deltas``' tensor deltas.

    ``names``: optional {tensor name: event id} of a sparse/dense contributor, for the refusal
    message. Raises ``UsageError`` for sparse/dense deltas unless ``lossy``."""
    if max_rank is not None and max_rank < 1:
        raise UsageError(f"expected --max-rank of at least 1, found {max_rank}")
    groups: dict[str, list] = {}
    for delta in deltas:
        for name, td in delta.tensors.items():
            if len(td.shape) != 2:
                raise UsageError(f"{name}: expected a 2-D weight for a LoRA adapter, found shape {tuple(td.shape)}")
            groups.setdefault(name, []).append(td)
    out: dict[str, Factors] = {}
    for name, tds in sorted(groups.items()):
        kinds = tuple(sorted({td.kind for td in tds}))
        rows, cols = (int(s) for s in tds[0].shape)
        cap = min(rows, cols) if max_rank is None else min(rows, cols, max_rank)
        lowrank = [td for td in tds if isinstance(td, LowRankDelta)]
        other = [td for td in tds if not isinstance(td, LowRankDelta)]
        if other and not lossy:
            who = f" (event {names[name]})" if names and name in names else ""
            raise UsageError(
                f"{name}: expected only low-rank deltas for a LoRA adapter, found {other[0].kind}{who}; a {other[0].kind}"
                " delta (KNE's are sparse) has no exact LoRA form: export the full model (--format full), or pass"
                " --lossy to compress it by SVD (the relative error is reported)")
        if other:
            dense = torch.zeros(rows, cols, dtype=torch.float32)
            for td in tds:
                dense += td.to_dense().float().reshape(rows, cols)
            out[name] = _truncate_dense(dense, cap, kinds)
            continue
        left = torch.cat([td.u.float() for td in lowrank], dim=1)
        right_t = torch.cat([td.v.float() for td in lowrank], dim=1)  # cols × Σr
        summed = int(left.shape[1])
        if summed <= cap:
            out[name] = Factors(left.contiguous(), right_t.T.contiguous(), summed, 0.0, kinds)
        else:
            out[name] = _truncate_product(left, right_t, cap, summed, kinds)
    return out


def _split(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, k: int, summed: int, kinds) -> Factors:
    total = float((s * s).sum())
    dropped = float((s[k:] * s[k:]).sum())
    err = math.sqrt(dropped / total) if total > 0 else 0.0
    root = s[:k].sqrt()
    return Factors((u[:, :k] * root).contiguous(), (root[:, None] * vh[:k]).contiguous(), summed, err, kinds)


def _truncate_product(left: torch.Tensor, right_t: torch.Tensor, k: int, summed: int, kinds) -> Factors:
    """SVD of ``left @ right_tᵀ`` without forming it: QR of each factor, SVD of the small core."""
    ql, rl = torch.linalg.qr(left.double())
    qr_, rr = torch.linalg.qr(right_t.double())
    u, s, vh = torch.linalg.svd(rl @ rr.T, full_matrices=False)
    f = _split(ql @ u, s, vh @ qr_.T, k, summed, kinds)
    return Factors(f.left.float(), f.right.float(), summed, f.rel_error, kinds)


def _truncate_dense(dense: torch.Tensor, k: int, kinds) -> Factors:
    u, s, vh = torch.linalg.svd(dense.double(), full_matrices=False)
    f = _split(u, s, vh, k, min(dense.shape), kinds)
    return Factors(f.left.float(), f.right.float(), f.summed_rank, f.rel_error, kinds)
