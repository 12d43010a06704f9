"""UNLEARN / LEARN (arXiv 2408.04140): remove or add knowledge through per-layer weight subspaces.

Our reading of the method (methods.md, "UNLEARN / LEARN"), with the choices the paper leaves open:

1. **Identify.** For every edited weight ``W^l`` (by default the MLP output projections of all
   layers), an additive update ``T^l`` starts at zero on top of the *frozen pretrained* weights
   (the paper's "random initialisation" wording is unclear; additive deltas on the pretrained
   weights are the workable reading) and is fitted with Adam on the next-token loss of the
   answer (mean per-token NLL of ``target_new`` after ``prompt``, teacher-forced) while all other
   weights stay frozen. ``fit="joint"`` fits all ``T^l`` together in one optimisation;
   ``fit="layerwise"`` fits each layer's ``T^l`` alone (the rest of the model frozen, the other
   layers unedited), which costs one fit per layer. ``T^l`` is then cut to its truncated SVD
   ``U Σ Vᵀ`` with the smallest rank whose singular values keep ``energy`` of ``‖T^l‖_F²``
   (at most ``max_rank``).
2. **Discriminate** (``discriminate=True`` and a retain set given). The same fit and SVD on the
   retain set give a basis ``Q^l`` (cut-off ``retain_energy``). The forget basis on ``side``
   (``"left"``: the output space, ``U``; ``"right"``: the input space, ``V``) is orthogonalised
   against ``Q`` (``u' = u − Q Qᵀ u``, applied twice for numerical safety — Gram–Schmidt against
   an orthonormal ``Q``), each column renormalised to unit length (columns that keep less than
   ``min_residual`` of their norm are dropped: they lay inside the retain subspace), and
   ``T'^l = U' Σ Vᵀ`` is rebuilt. Directions the retain knowledge also uses stay in the model.
3. **Edit.** UNLEARN: ``W^l ← W^l − scale · T'^l``; LEARN: ``W^l ← W^l + scale · T'^l`` (``T'``
   is the truncated ``T`` when there is nothing to discriminate against).

The result is one ``EditResult`` for the whole forget/learn set: per edited weight a
``LowRankDelta`` in the parameter's own storage layout (GPT-2's Conv1D stores in×out, so the
factors swap: ``u = V``, ``v = ±scale·U'Σ``; for ``nn.Linear`` ``u = ±scale·U'Σ``, ``v = V``).

What a ledger event records (``EditResult.ensemble``): ``rank_before``/``rank`` (total rank
after the energy cut-off / after discrimination), per edited weight ``layers[i]`` with its
logical ``shape`` (out, in), ``rank_before``, ``rank``, ``retain_rank`` (rank of ``Q``),
``overlap_removed`` (share of the truncated update's energy inside the retain subspace),
``energy_kept`` and ``task_norm``; and ``retain``: the size and sha256 of the retain set given
and the facts used (≤ ``max_retain``), so ``revert --rebase`` can recompute the same edit.

All computation happens on ``torch.func.functional_call`` overrides: the model's parameters
are never written (and ``preserved`` restores them bit for bit regardless).

Defaults, and what was measured (smollm2-135m on CPU; ``bench/unlearn.py``, tables in
``bench/results/unlearn.md``): see the comments on the config fields.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch
import torch.nn as nn

from kledger.editors.base import EditContext, EditResult, Editor, preserved
from kledger.editors.hooks import input_device
from kledger.editors.subspace import Facts, edited_weights, model_digest, orthogonalise, task_spectra, to_storage, truncate
from kledger.ledger.canonical import canonical_json, sha256_hex
from kledger.ledger.deltas import Delta, LowRankDelta
from kledger.ledger.errors import NumericalError, UsageError
from kledger.ledger.records import FactRequest, load_requests

log = logging.getLogger(__name__)

MODES = ("forget", "learn")
SITE_NAMES = ("mlp_out", "mlp_in")


@dataclass(frozen=True)
class SubspaceConfig:
    """Hyper-parameters of UNLEARN (``mode="forget"``) and LEARN (``mode="learn"``)."""

    mode: str = "forget"  # "forget" subtracts T', "learn" adds it; must match the editor
    sites: tuple[str, ...] = ("mlp_out",)  # abstract sites (sites.py): "mlp_out", "mlp_in"
    # None: the first quarter of the blocks (0–7 of 30). Measured windows 0–7 / 8–15 / 16–23 /
    # all 30: 0–7 kept the most other facts at forget rate 1.0 (0.98 vs 0.95 / 0.94 / 0.94).
    layers: tuple[int, ...] | None = None
    fit: str = "joint"  # "joint" (one fit of all T^l) or "layerwise" (one fit per layer)
    steps: int = 10  # Adam steps of the fit (5 / 10 / 20 steps at lr 1e-3 / 1e-3 / 3e-4 ≈ equal)
    lr: float = 1e-3  # Adam learning rate of the fit
    energy: float = 0.9  # rank cut-off: keep this share of ‖T‖_F² (squared singular values)
    # upper bound on the rank per weight (128 measured no better than 64; with scale 0.6: P103 forget
    # rate 0.80 → 0.90 but P140 1.00 → 0.80)
    max_rank: int = 64
    discriminate: bool = True  # orthogonalise against the retain set's basis (when one is given)
    # "left" (output space, the paper's U), "right" (input space, V) or "both". Measured at forget
    # rate ≥ 0.93: both kept 0.98 of other facts, right 0.95, left 0.97 but with perplexity drift.
    side: str = "both"
    retain_energy: float = 0.9  # energy cut-off of the retain basis Q
    min_residual: float = 0.05  # drop forget directions keeping less of their norm after projection
    # W ← W ∓ scale·T'. Forget, 4 splits (P36 ×2 seeds, P103, P30): 0.4 → forget rate 1.00 on all,
    # other facts 0.97–0.98; 0.5 → 1.00, 0.95–0.98; 0.3 → 0.93, 1.00. With 6–10 same-relation facts
    # in the retain set (bench/results/unlearn.md): 0.4 → P36/P140 1.00, P103 0.80, other facts
    # 0.97–1.00; 0.6 → P103 0.90 (6) / 0.80 (10), but P140's same-relation accuracy 0.73 → 0.45.
    scale: float = 0.4
    max_retain: int = 64  # at most this many retain facts (a seeded sample) build Q
    batch_size: int = 32  # facts per forward pass in the fits
    retain_file: str | None = None  # JSON facts to retain (used when the call passes none)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UsageError(f"mode: expected one of {MODES}, found {self.mode!r}")
        if not self.sites or any(s not in SITE_NAMES for s in self.sites):
            raise UsageError(f"sites: expected a non-empty subset of {SITE_NAMES}, found {self.sites!r}")
        if self.fit not in ("joint", "layerwise"):
            raise UsageError(f"fit: expected 'joint' or 'layerwise', found {self.fit!r}")
        if self.side not in ("left", "right", "both"):
            raise UsageError(f"side: expected 'left', 'right' or 'both', found {self.side!r}")
        for name in ("energy", "retain_energy"):
            v = getattr(self, name)
            if not 0.0 < v <= 1.0:
                raise UsageError(f"{name}: expected a value in (0, 1], found {v!r}")
        if not 0.0 <= self.min_residual < 1.0:
            raise UsageError(f"min_residual: expected a value in [0, 1), found {self.min_residual!r}")
        for name in ("steps", "max_rank", "max_retain", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise UsageError(f"{name}: expected a positive integer, found {getattr(self, name)!r}")
        if not self.lr > 0:
            raise UsageError(f"lr: expected a positive learning rate, found {self.lr!r}")
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))
        object.__setattr__(self, "sites", tuple(self.sites))


@dataclass(frozen=True)
class LearnConfig(SubspaceConfig):
    """``SubspaceConfig`` with LEARN's defaults (only the defaults differ)."""

    mode: str = "learn"
    scale: float = 1.0  # W ← W + T': the fit already reaches the facts (see bench/results/unlearn.md)


def compact_request(r: FactRequest) -> dict[str, Any]:
    """``r.to_json()`` without empty fields (``FactRequest.from_json`` reads it back equal)."""
    return {k: v for k, v in r.to_json().items() if v not in (None, [], ())}


def requests_sha256(requests: Sequence[FactRequest]) -> str:
    """sha256 of the canonical JSON of a fact set (order matters, as it does for the fit)."""
    return sha256_hex(canonical_json([r.to_json() for r in requests]))


def retain_record(given: Sequence[FactRequest], used: Sequence[FactRequest], discriminated: bool) -> dict[str, Any]:
    """What an event records of the retain set: size and hash of the set given, and the facts
    used (at most ``max_retain``: passing them back as ``retain`` recomputes the same edit)."""
    return {"given": len(given), "sha256": requests_sha256(given) if given else None,
            "used": [compact_request(r) for r in used], "discriminated": discriminated}


# --------------------------------------------------------------------------------------------


class _SubspaceEditor(Editor):
    mode: ClassVar[str]
    paper = "arXiv 2408.04140"
    config_cls = SubspaceConfig
    input_files = ("retain_file",)

    def compute(self, model: nn.Module, tok, requests: Sequence[FactRequest], ctx: EditContext, *,
                retain: Sequence[FactRequest] = ()) -> list[EditResult]:
        cfg: SubspaceConfig = self.config
        if cfg.mode != self.mode:
            raise UsageError(f"the {self.name!r} editor expects config mode {self.mode!r}, found {cfg.mode!r}")
        requests = list(requests)
        if not requests:
            raise UsageError(f"expected at least one fact to {self.mode}, found none")
        retain = list(retain)
        if not retain and cfg.retain_file:
            retain = load_requests(cfg.retain_file)
        retain_given = retain
        n_retain_given = len(retain)
        if len(retain) > cfg.max_retain:
            retain = random.Random(ctx.seed).sample(retain, cfg.max_retain)
        t0 = time.perf_counter()
        torch.manual_seed(ctx.seed)
        dev = input_device(model)
        weights = edited_weights(model, cfg)
        params = dict(model.named_parameters())
        with preserved(model, [w.name for w in weights]):  # never written; saved anyway, only these
            facts = Facts(tok, requests, dev, cfg.batch_size)
            loss_before = facts.mean_nll(model)
            digest = model_digest(model) if ctx.cache_dir is not None else None
            task = task_spectra(model, tok, requests, weights, cfg, ctx, digest)
            use_retain = cfg.discriminate and bool(retain)
            if cfg.discriminate and not retain:
                log.info("%s: no retain set given; the subspace is not discriminated", self.name)
            retain_facts = Facts(tok, retain, dev, cfg.batch_size) if retain else None
            retain_task = task_spectra(model, tok, retain, weights, cfg, ctx, digest) if use_retain else {}
            sign = -1.0 if self.mode == "forget" else 1.0
            tensors: dict[str, LowRankDelta] = {}
            per_layer = []
            for w in weights:
                sub = truncate(task[w.name], cfg.energy, cfg.max_rank)
                u, s, v = sub.u.to(dev), sub.s.to(dev), sub.v.to(dev)
                entry: dict[str, Any] = {"tensor": w.name, "layer": w.layer, "site": w.site}
                q_rank, overlap = 0, 0.0
                if use_retain:
                    q = truncate(retain_task[w.name], cfg.retain_energy, cfg.max_rank)
                    q_rank = int(q.s.numel())
                    full = (u * s) @ v.T
                    if cfg.side in ("left", "both"):
                        u, keep = orthogonalise(u, q.u.to(dev), cfg.min_residual)
                        u, s, v = u[:, keep], s[keep], v[:, keep]
                    if cfg.side in ("right", "both"):
                        v, keep = orthogonalise(v, q.v.to(dev), cfg.min_residual)
                        u, s, v = u[:, keep], s[keep], v[:, keep]
                    # share of the truncated update's energy inside the retain subspace(s)
                    removed = full
                    if cfg.side in ("left", "both"):
                        removed = removed - q.u.to(dev) @ (q.u.to(dev).T @ removed)
                    if cfg.side in ("right", "both"):
                        removed = removed - (removed @ q.v.to(dev)) @ q.v.to(dev).T
                    overlap = 1.0 - float((removed**2).sum() / (full**2).sum().clamp_min(1e-30))
                rank_before = int(sub.s.numel())
                rank = int(s.numel())
                if rank == 0:  # nothing left outside the retain subspace: one zero direction
                    u = torch.zeros(u.shape[0], 1, device=dev)
                    s = torch.zeros(1, device=dev)
                    v = torch.zeros(v.shape[0], 1, device=dev)
                out_factor = (sign * cfg.scale) * (u * s)
                td = to_storage(w, out_factor.cpu(), v.cpu(), params[w.name].shape)
                tensors[w.name] = td
                entry.update(shape=[int(u.shape[0]), int(v.shape[0])], rank_before=rank_before, rank=rank,
                             retain_rank=q_rank, overlap_removed=round(overlap, 6),
                             energy_kept=round(sub.energy_kept, 6),
                             task_norm=round(float(torch.linalg.vector_norm(task[w.name].s)), 6))
                per_layer.append(entry)
            try:
                delta = Delta(tensors=tensors)
            except NumericalError:
                raise NumericalError(f"{self.name}: the fitted subspace update is not finite (lower lr?)") from None
            overrides = {w.name: _plus(params[w.name], tensors[w.name].to_dense()) for w in weights}
            loss_after = facts.mean_nll(model, overrides)
            metrics: dict[str, Any] = {
                f"{self.mode}_loss_before": round(loss_before, 6),
                f"{self.mode}_loss_after": round(loss_after, 6),
                "n_requests": len(requests),
                "n_retain_given": n_retain_given,
                "n_retain_used": len(retain) if use_retain else 0,
                "discriminated": use_retain,
            }
            if retain_facts is not None:
                metrics["retain_loss_before"] = round(retain_facts.mean_nll(model), 6)
                metrics["retain_loss_after"] = round(retain_facts.mean_nll(model, overrides), 6)
            metrics["time_s"] = round(time.perf_counter() - t0, 3)
        ensemble = {
            "mode": self.mode, "side": cfg.side,
            # total rank over the edited weights: after the energy cut-off, after discrimination
            "rank_before": sum(x["rank_before"] for x in per_layer),
            "rank": sum(x["rank"] for x in per_layer),
            "layers": per_layer,
            "retain": retain_record(retain_given, retain, use_retain),
        }
        return [EditResult(requests=tuple(requests), delta=delta, ensemble=ensemble, metrics=metrics)]


def _plus(w: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """``w + dense`` summed in float32 on ``w``'s device and cast once into ``w``'s dtype (as the
    compositor writes it)."""
    return (w.detach().float() + dense.to(w.device, torch.float32)).to(w.dtype)


class UnlearnEditor(_SubspaceEditor):
    """UNLEARN: subtract the forget set's task subspace, minus what the retain set shares."""

    name = "forget"
    mode = "forget"
    event_type = "forget"  # the ledger event type Workspace appends
    summary = "subtract the forget set's low-rank task subspace (orthogonal to a retain set)"
    config_cls = SubspaceConfig


class LearnEditor(_SubspaceEditor):
    """LEARN: add the learn set's (discriminated) low-rank task subspace."""

    name = "learn"
    mode = "learn"
    event_type = "learn"
    summary = "add the learn set's low-rank task subspace (orthogonal to a retain set)"
    config_cls = LearnConfig
