"""The subspace pieces of UNLEARN / LEARN (``kledger.editors.unlearn``): the edited weights,
the fit of additive task updates, their SVD and energy cut-off, and Gram–Schmidt against a
retain basis. Module-level so tests can check each against a reference.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import torch
import torch.nn as nn
from safetensors.torch import load_file, save
from torch.func import functional_call

from kledger.editors.base import EditContext
from kledger.editors.hooks import input_device
from kledger.editors.sites import num_layers, sites_for
from kledger.editors.tokens import encode_pairs
from kledger.ledger.deltas import LowRankDelta
from kledger.ledger.errors import UsageError
from kledger.ledger.records import FactRequest

if TYPE_CHECKING:
    from kledger.editors.unlearn import SubspaceConfig

log = logging.getLogger(__name__)

CACHE_VERSION = "kledger-subspace-1"


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


class Facts:
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


def fit_updates(model: nn.Module, facts: Facts, weights: Sequence[EditedWeight], cfg: SubspaceConfig,
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
                # W + T summed in float32 and cast once (the gradient reaches T through the cast)
                overrides = {n: (params[n].detach().float() + d).to(params[n].dtype) for n, d in deltas.items()}
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
    dev = input_device(model)
    t0 = time.perf_counter()
    task = fit_updates(model, Facts(tok, requests, dev, cfg.batch_size), weights, cfg, ctx.progress)
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
