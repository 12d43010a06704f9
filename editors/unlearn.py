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

import hashlib
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

import torch
import torch.nn as nn
from safetensors.torch import load_file, save
from torch.func import functional_call

from kledger.editors.base import EditContext, EditResult, Editor, preserved
from kledger.editors.tokens import encode_pairs
from kledger.editors.sites import Sites, num_layers, sites_for
from kledger.ledger.canonical import canonical_json, sha256_hex
from kledger.ledger.deltas import Delta, LowRankDelta
from kledger.ledger.errors import NumericalError, UsageError
from kledger.ledger.records import FactRequest, load_requests

log = logging.getLogger(__name__)

MODES = ("forget", "learn")
CACHE_VERSION = "kledger-subspace-1"
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


# --------------------------------------------------------------------------------------------
# the pieces (module-level so tests can check them against references)


@dataclass(frozen=True)
class EditedWeight:
    name: str  # parameter name as in model.named_parameters()
    layer: int
    site: str
    transposed: bool  # stored in×out (Conv1D): the logical out×in matrix is the transpose


def default_layers(n: int) -> range:
    """The first quarter of the blocks (⌈n/4⌉): layers 0–7 of SmolLM2-135M's 30."""
    return range(max(1, math.ceil(n / 4)))


def edited_weights(model: nn.Module, cfg: SubspaceConfig) -> list[EditedWeight]:
    """The parameters the config edits, in layer order.

    Assumes a family stores all its MLP projections alike (GPT-2: all Conv1D, Llama: all Linear),
    so ``Sites.mlp_out_transposed`` also describes ``mlp_in``.
    """
    sites = sites_for(model)
    n = num_layers(model)
    layers = default_layers(n) if cfg.layers is None else cfg.layers
    params = dict(model.named_parameters())
    out = []
    for layer in layers:
        if not 0 <= layer < n:
            raise UsageError(f"layers: expected indices in [0, {n}), found {layer}")
        for site in cfg.sites:
            names = [sites.mlp_out_param(layer)] if site == "mlp_out" else sites.mlp_in_params(layer)
            for name in names:
                if name not in params:
                    raise UsageError(f"expected parameter {name!r} in the model, found none")
                out.append(EditedWeight(name, layer, site, sites.mlp_out_transposed))
    return out


class _Facts:
    """Pre-encoded (prompt, answer) pairs in micro-batches, scoring only answer positions."""

    def __init__(self, tok, requests: Sequence[FactRequest], device, batch_size: int) -> None:
        self.batches = []
        for i in range(0, len(requests), batch_size):
            chunk = requests[i : i + batch_size]
            enc, spans = encode_pairs(tok, [r.prompt for r in chunk], [r.target_new for r in chunk], device)
            positions = sorted({p for s, e in spans for p in range(s - 1, e - 1)})
            where = {p: j for j, p in enumerate(positions)}
            rows, kept, ids = [], [], []
            for b, (s, e) in enumerate(spans):
                for p in range(s - 1, e - 1):
                    rows.append(b)
                    kept.append(where[p])
                    ids.append(int(enc["input_ids"][b, p + 1]))
            lengths = torch.tensor([e - s for s, e in spans], dtype=torch.float32, device=device)
            self.batches.append((enc, torch.tensor(positions, device=device), torch.tensor(rows, device=device),
                                 torch.tensor(kept, device=device), torch.tensor(ids, device=device), lengths))
        self.n = len(requests)

    def nll(self, model: nn.Module, overrides: Mapping[str, torch.Tensor], batch) -> torch.Tensor:
        """Per-fact mean per-token NLL of the answer for one micro-batch (keeps the graph)."""
        enc, positions, rows, kept, ids, lengths = batch
        try:
            logits = functional_call(model, dict(overrides), args=(),
                                     kwargs=dict(**enc, logits_to_keep=positions, use_cache=False)).logits
        except TypeError:  # a model class without ``logits_to_keep``: score every position
            logits = functional_call(model, dict(overrides), args=(), kwargs=dict(**enc, use_cache=False)).logits
            logits = logits[:, positions]
        logp = torch.log_softmax(logits.float(), dim=-1)[rows, kept, ids]
        per_fact = torch.zeros(len(lengths), device=logp.device).index_add(0, rows, logp)
        return -per_fact / lengths

    @torch.no_grad()
    def mean_nll(self, model: nn.Module, overrides: Mapping[str, torch.Tensor] | None = None) -> float:
        total = 0.0
        for batch in self.batches:
            total += float(self.nll(model, overrides or {}, batch).sum())
        return total / max(self.n, 1)


def fit_updates(model: nn.Module, facts: _Facts, weights: Sequence[EditedWeight], cfg: SubspaceConfig,
                progress: bool = False) -> dict[str, torch.Tensor]:
    """Fit additive updates T (logical out×in, fp32) on ``facts`` with all else frozen."""
    params = dict(model.named_parameters())
    groups = [list(weights)] if cfg.fit == "joint" else [
        [w for w in weights if w.layer == layer] for layer in dict.fromkeys(w.layer for w in weights)
    ]
    out: dict[str, torch.Tensor] = {}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(groups) * cfg.steps, desc="subspace fit", leave=False)
    for group in groups:
        deltas = {w.name: torch.zeros_like(params[w.name], dtype=torch.float32, requires_grad=True) for w in group}
        opt = torch.optim.Adam(list(deltas.values()), lr=cfg.lr)
        for _ in range(cfg.steps):
            opt.zero_grad(set_to_none=True)
            for batch in facts.batches:  # gradient accumulation over micro-batches
                overrides = {n: params[n].detach() + d.to(params[n].dtype) for n, d in deltas.items()}
                loss = facts.nll(model, overrides, batch).sum() / facts.n
                loss.backward()
            opt.step()
            if bar is not None:
                bar.update(1)
        for w in group:
            t = deltas[w.name].detach().float()
            out[w.name] = t.T.contiguous() if w.transposed else t
    if bar is not None:
        bar.close()
    return out


@dataclass(frozen=True)
class Spectrum:
    """Top singular vectors of a task update and its whole spectrum (float32)."""

    u: torch.Tensor  # out × K
    s: torch.Tensor  # all singular values, descending
    v: torch.Tensor  # in × K


@dataclass(frozen=True)
class Subspace:
    u: torch.Tensor  # out × r, orthonormal columns
    s: torch.Tensor  # r
    v: torch.Tensor  # in × r, orthonormal columns
    energy_kept: float


def spectrum(t: torch.Tensor, max_rank: int) -> Spectrum:
    """SVD of ``t`` (in float64), keeping the top ``max_rank`` vectors and every singular value."""
    u, s, vh = torch.linalg.svd(t.double(), full_matrices=False)
    k = min(max_rank, len(s))
    return Spectrum(u[:, :k].float().contiguous(), s.float().contiguous(), vh[:k].T.float().contiguous())


def truncate(sp: Spectrum, energy: float, max_rank: int) -> Subspace:
    """The smallest rank keeping ``energy`` of the squared singular values (at most max_rank)."""
    s2 = sp.s.double() ** 2
    total = float(s2.sum())
    if total == 0.0:
        return Subspace(sp.u[:, :0], sp.s[:0], sp.v[:, :0], 0.0)
    cum = torch.cumsum(s2, 0) / total
    r = int(torch.searchsorted(cum, torch.tensor(energy - 1e-12, dtype=cum.dtype))) + 1
    r = max(1, min(r, max_rank, sp.u.shape[1]))
    return Subspace(sp.u[:, :r], sp.s[:r], sp.v[:, :r], float(cum[r - 1]))


def truncated_svd(t: torch.Tensor, energy: float, max_rank: int) -> Subspace:
    """Smallest-rank SVD of ``t`` keeping ``energy`` of its squared singular values (≤ max_rank)."""
    return truncate(spectrum(t, max_rank), energy, max_rank)


def model_digest(model: nn.Module) -> str:
    """sha256 over every parameter's name, dtype, shape and bytes (the model as it is now)."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        t = p.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.dtype != torch.bool else t.numpy().tobytes())
    return h.hexdigest()


def task_spectra(model: nn.Module, tok, requests: Sequence[FactRequest], weights: Sequence[EditedWeight],
                 cfg: SubspaceConfig, ctx: EditContext, digest: str | None) -> dict[str, Spectrum]:
    """Fit T on ``requests`` and return each weight's spectrum; cached under ``ctx.cache_dir``.

    The cache key covers the model's parameter bytes (``digest``), the facts, the fit settings
    and the weights, so a hit returns exactly what a fresh fit would (both go through float32
    ``Spectrum`` tensors).
    """
    path = None
    if ctx.cache_dir is not None and digest is not None:
        key = json.dumps({
            "v": CACHE_VERSION, "model": digest, "facts": [[r.prompt, r.target_new] for r in requests],
            "fit": cfg.fit, "steps": cfg.steps, "lr": cfg.lr, "batch_size": cfg.batch_size,
            "max_rank": cfg.max_rank, "weights": [[w.name, w.transposed] for w in weights],
        }, sort_keys=True)
        path = Path(ctx.cache_dir) / "subspace" / f"{hashlib.sha256(key.encode()).hexdigest()}.safetensors"
        if path.is_file():
            try:
                raw = load_file(str(path))
                return {w.name: Spectrum(raw[f"{w.name}::u"], raw[f"{w.name}::s"], raw[f"{w.name}::v"])
                        for w in weights}
            except Exception as exc:  # a damaged cache file is recomputed, never trusted
                log.warning("ignoring unreadable subspace cache %s: %s", path, exc)
    dev = next(model.parameters()).device
    t0 = time.perf_counter()
    task = fit_updates(model, _Facts(tok, requests, dev, cfg.batch_size), weights, cfg, ctx.progress)
    out = {name: spectrum(t, cfg.max_rank) for name, t in task.items()}
    log.info("fitted task subspaces of %d facts in %.1f s", len(requests), time.perf_counter() - t0)
    if path is not None:
        tensors = {}
        for name, sp in out.items():
            tensors.update({f"{name}::u": sp.u.cpu(), f"{name}::s": sp.s.cpu(), f"{name}::v": sp.v.cpu()})
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        with open(tmp, "wb") as fh:
            fh.write(save(tensors))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    return out


def orthogonalise(basis: torch.Tensor, q: torch.Tensor, min_residual: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Gram–Schmidt of ``basis``'s columns against orthonormal ``q``; renormalise each column.

    Returns (new columns, kept mask). Columns whose residual norm (relative to their own norm)
    falls below ``min_residual`` lie (almost) inside span(q) and come back as zero, not kept.
    """
    b = basis.double()
    if q.numel() == 0:
        return basis.clone(), torch.ones(basis.shape[1], dtype=torch.bool)
    qd = q.double()
    r = b - qd @ (qd.T @ b)
    r = r - qd @ (qd.T @ r)  # a second pass ("twice is enough") removes round-off leftovers
    norms = torch.linalg.vector_norm(r, dim=0)
    ref = torch.linalg.vector_norm(b, dim=0).clamp_min(1e-30)
    keep = norms / ref > max(min_residual, 1e-8)
    out = torch.where(keep, r / norms.clamp_min(1e-30), torch.zeros_like(r))
    return out.to(basis.dtype), keep


def to_storage(w: EditedWeight, out_factor: torch.Tensor, in_factor: torch.Tensor, shape) -> LowRankDelta:
    """ΔW = out_factor @ in_factorᵀ (logical out×in) as a LowRankDelta in the parameter's layout."""
    if w.transposed:
        return LowRankDelta(shape=tuple(shape), u=in_factor.contiguous(), v=out_factor.contiguous())
    return LowRankDelta(shape=tuple(shape), u=out_factor.contiguous(), v=in_factor.contiguous())


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
        dev = next(model.parameters()).device
        weights = edited_weights(model, cfg)
        params = dict(model.named_parameters())
        with preserved(model):
            facts = _Facts(tok, requests, dev, cfg.batch_size)
            loss_before = facts.mean_nll(model)
            digest = model_digest(model) if ctx.cache_dir is not None else None
            task = task_spectra(model, tok, requests, weights, cfg, ctx, digest)
            use_retain = cfg.discriminate and bool(retain)
            if cfg.discriminate and not retain:
                log.info("%s: no retain set given; the subspace is not discriminated", self.name)
            retain_facts = _Facts(tok, retain, dev, cfg.batch_size) if retain else None
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
            overrides = {w.name: params[w.name].detach() + tensors[w.name].to_dense().to(params[w.name]) for w in weights}
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
