"""KNE steps 1–2: the candidate tensors, and the ensemble selected from per-entry scores."""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn

from kledger.editors.sites import early_window, num_layers, sites_for
from kledger.ledger.errors import UsageError


def candidate_params(
    model: nn.Module, layers: Sequence[int] | None = None, exclude: Sequence[int] = (), window: str = "all"
) -> dict[str, tuple[int, nn.Parameter]]:
    """Candidate tensors: name → (layer, parameter), every MLP weight matrix of the given layers
    (None: the ``window``, "all" layers or the "early" ``sites.early_window``) minus ``exclude``
    (negative indices count from the end)."""
    sites = sites_for(model)
    n = num_layers(model)
    if layers is None:
        layers = early_window(n) if window == "early" else None
    for layer in list(layers or ()) + list(exclude):
        if not (-n <= layer < n):
            raise UsageError(f"layers: expected indices in [-{n}, {n}), found {layer}")
    dropped = {x % n for x in exclude}
    chosen = [x % n for x in (range(n) if layers is None else layers) if x % n not in dropped]
    if not chosen:
        raise UsageError(f"expected at least one candidate layer, found none (layers={layers}, exclude={exclude})")
    out: dict[str, tuple[int, nn.Parameter]] = {}
    for layer in chosen:
        for name in sites.mlp_in_params(layer) + [sites.mlp_out_param(layer)]:
            out[name] = (layer, model.get_parameter(name))
    return out


def _top_entries(scores: dict[str, torch.Tensor], n: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Exact top-``n`` entries over the pooled flat ``scores`` → name → sorted flat indices.

    A quantile estimated on a random sample gives a threshold below the n-th largest score; only
    entries above it are ranked exactly (avoids a top-k over tens of millions of entries).
    """
    names = list(scores)
    sizes = [scores[k].numel() for k in names]
    total = sum(sizes)
    if n >= total:
        return {k: torch.arange(scores[k].numel()) for k in names}
    thr = None
    k_sample = min(total, 1 << 20)
    if total > 4 * k_sample:
        sample = torch.cat([
            scores[k][torch.randint(0, s, (max(1, math.ceil(k_sample * s / total)),), generator=gen)]
            for k, s in zip(names, sizes)
        ])
        q = 1.0 - 1.3 * n / total - 5.0 / math.sqrt(sample.numel())
        if q > 0:
            kth = max(1, int(q * sample.numel()))
            thr = float(sample.kthvalue(kth).values)
    cand_idx, cand_sc, cand_t = [], [], []
    for t, k in enumerate(names):
        s = scores[k]
        idx = torch.nonzero(s >= thr).squeeze(1) if thr is not None else torch.arange(s.numel())
        cand_idx.append(idx)
        cand_sc.append(s[idx])
        cand_t.append(torch.full((idx.numel(),), t, dtype=torch.int32))
    if sum(x.numel() for x in cand_idx) < n:  # sample was unlucky: rank everything
        cand_idx = [torch.arange(scores[k].numel()) for k in names]
        cand_sc = [scores[k] for k in names]
        cand_t = [torch.full((scores[k].numel(),), t, dtype=torch.int32) for t, k in enumerate(names)]
    sc, ix, tt = torch.cat(cand_sc), torch.cat(cand_idx), torch.cat(cand_t)
    top = torch.topk(sc, n, sorted=False).indices
    ix, tt = ix[top], tt[top]
    out = {}
    for t, k in enumerate(names):
        sel = ix[tt == t]
        if sel.numel():
            out[k] = torch.sort(sel).values
    return out


def select_ensemble(
    scores: dict[str, torch.Tensor], layer_of: dict[str, int], mode: str, budget: int, gen: torch.Generator
) -> dict[str, torch.Tensor]:
    """Ensemble entries (name → sorted flat indices) from per-entry scores.

    ``global``: the top ``budget`` entries over all pooled scores. ``per_layer``: the budget is
    split over the candidate layers in proportion to their sizes (largest remainders first), and
    each layer keeps its top entries pooled over its tensors.
    """
    if mode == "global":
        return _top_entries(scores, budget, gen)
    layers = sorted(set(layer_of.values()))
    size = {l: sum(scores[k].numel() for k in scores if layer_of[k] == l) for l in layers}
    total = sum(size.values())
    exact = {l: budget * size[l] / total for l in layers}
    quota = {l: int(math.floor(exact[l])) for l in layers}
    for l in sorted(layers, key=lambda l: (quota[l] - exact[l], l))[: budget - sum(quota.values())]:
        quota[l] += 1
    out: dict[str, torch.Tensor] = {}
    for l in layers:
        if quota[l]:
            out.update(_top_entries({k: v for k, v in scores.items() if layer_of[k] == l}, quota[l], gen))
    return out
