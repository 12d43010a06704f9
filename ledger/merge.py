"""Merge arithmetic on deltas: interference between the two sides, TIES, and combining deltas.

The plan (side edits, conflicts) is ``kledger.ledger.mergeplan``; the strategies that use this
arithmetic are ``kledger.merging``:

* ``ties`` — TIES-merging (Yadav et al. 2023, arXiv 2306.01708) applied to the sparse entries that
  both sides touch. Per tensor, each side's sparse task vector τ (the sum of its side edits'
  sparse deltas) is *trimmed* (entries below the side's top-``density`` magnitude quantile are
  zeroed), the sign of every overlapping entry is *elected* (``sign(τ'_ours + τ'_theirs)``) and
  the entry becomes the *disjoint mean* of the trimmed values that agree with it. Entries that only
  one side touches, low-rank and dense deltas are kept as in ``sum``: there is no interference
  to resolve there, and trimming them would only delete edits. The merge event stores the
  correction ``TIES − (τ_ours + τ_theirs)`` on the overlap, so active set + correction = TIES.
* ``combine`` — one delta equal to the sum of several (what a ``resolve`` merge records).

Analysis (``analyse``), before anything is written: overlapping sparse entries and opposite-sign
updates on shared entries (warnings), and interference — for each pair of side edits that touch
a common tensor, ``‖Δ_B k_A‖`` (and relative to ``‖Δ_A k_A‖``) where ``k_A`` are A's keys. Keys
come from the delta's method state (tensors named ``keys``, ``keys::PARAM`` or AlphaEdit's
``keys.<layer>`` — one key per column, or per row); when none are recorded, low-rank deltas fall
back to their input-side factor (the direction the edit responds to; marked ``proxy``), and
otherwise only overlap and cosine are reported.

This module reads deltas only; it imports no editor and runs no model.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any, Callable, Iterable, Sequence

import torch

from kledger.ledger.deltas import Delta, LowRankDelta, SparseDelta, TensorDelta, intersect, sum_deltas
from kledger.ledger.errors import UsageError
from kledger.ledger.mergeplan import MergePlan
from kledger.ledger.records import Event

log = logging.getLogger(__name__)

#: pairwise analysis is skipped (aggregate only) above this many side-edit pairs.
MAX_PAIRS = 20000


# --------------------------------------------------------------------------------------------
# warnings and interference (needs the deltas)

def analyse(plan: MergePlan, load: Callable[[Event], Delta], max_pairs: int = MAX_PAIRS) -> None:
    """Fill ``plan.overlaps`` and ``plan.interference`` from the side edits' deltas."""
    ours = plan.ours_only
    theirs = plan.theirs_only
    if not ours or not theirs:
        return
    do = {e.id: load(e) for e in ours}
    dt = {e.id: load(e) for e in theirs}
    tensors_o: dict[str, list[str]] = {}
    for eid, d in do.items():
        for name in d.tensors:
            tensors_o.setdefault(name, []).append(eid)
    pairs: dict[tuple[str, str], list[str]] = {}
    for tid, d in dt.items():
        for name in d.tensors:
            for oid in tensors_o.get(name, ()):
                pairs.setdefault((oid, tid), []).append(name)
    if len(pairs) > max_pairs:
        plan.notes.append(f"{len(pairs)} edit pairs share tensors; pairwise analysis skipped above {max_pairs}")
        return
    _analyse_pairs(plan, pairs, do, dt)


def _analyse_pairs(plan: MergePlan, pairs: dict, do: dict, dt: dict) -> None:
    for (oid, tid), names in sorted(pairs.items()):
        a, b = do[oid], dt[tid]
        shared = ov = opp = 0
        ab = aa = bb = 0.0
        row_a: list[float] = []
        row_b: list[float] = []
        src = set()
        for name in names:
            ta, tb = a.tensors[name], b.tensors[name]
            if isinstance(ta, SparseDelta) and isinstance(tb, SparseDelta):
                n_shared, n_opp = _sparse_overlap(ta, tb)
                shared += n_shared
                opp += n_opp
                if n_shared:
                    ov += 1
                    plan.overlaps.append({"ours": oid, "theirs": tid, "tensor": name, "shared_entries": n_shared,
                                          "opposite_sign": n_opp})
            ab += ta.inner(tb)
            aa += ta.inner(ta)
            bb += tb.inner(tb)
            for keys_of, own, other, sink in ((a, ta, tb, row_a), (b, tb, ta, row_b)):
                k, how = edit_keys(keys_of, name, own)
                if k is None:
                    continue
                src.add(how)
                sink.append((_apply(other, k).norm().item(), _apply(own, k).norm().item()))
        cos = ab / math.sqrt(aa * bb) if aa > 0 and bb > 0 else 0.0
        rec: dict[str, Any] = {"ours": oid, "theirs": tid, "tensors": len(names), "shared_entries": shared,
                               "opposite_sign": opp, "cosine": round(cos, 4)}
        # ‖Δ_theirs k_ours‖ over our keys (all shared tensors), relative to ‖Δ_ours k_ours‖; and vice versa
        for label, rows in (("theirs_on_our_keys", row_a), ("ours_on_their_keys", row_b)):
            if rows:
                num = math.sqrt(sum(x * x for x, _ in rows))
                den = math.sqrt(sum(y * y for _, y in rows))
                rec[label] = round(num, 6)
                rec[label + "_rel"] = round(num / den, 6) if den > 0 else None
        rec["keys"] = "+".join(sorted(src)) if src else "n/a"
        plan.interference.append(rec)


def _sparse_overlap(a: SparseDelta, b: SparseDelta) -> tuple[int, int]:
    ia, va = a.coalesced
    ib, vb = b.coalesced
    common, pa, pb = intersect(ia, ib)
    if common.numel() == 0:
        return 0, 0
    opp = int(((torch.sign(va[pa]) * torch.sign(vb[pb])) < 0).sum())
    return int(common.numel()), opp


def edit_keys(delta: Delta, name: str, td: TensorDelta) -> tuple[torch.Tensor | None, str]:
    """Input keys of an edit for tensor ``name`` as a (dim × n) matrix, and where they came from.

    ``dim`` is the tensor's input side: ``shape[1]`` (``nn.Linear`` stores out×in) or, for a key
    matrix that only matches ``shape[0]``, ``shape[0]`` (GPT-2's Conv1D stores in×out); the
    returned matrix carries the side in its row count.
    """
    if len(td.shape) != 2:
        return None, "n/a"
    rows, cols = td.shape
    cands = []
    for key, t in delta.state.items():
        base = key.split("::")[0].lower()
        if "key" not in base or t.ndim != 2:
            continue
        if "::" in key and key.split("::", 1)[1] != name:
            continue
        m = re.search(r"\.(\d+)$", key)  # per-layer keys (AlphaEdit's keys.<layer>): that layer's tensors only
        if m and f".{m.group(1)}." not in f".{name}.":
            continue
        cands.append(t.float())
    for t in cands:
        for dim in (cols, rows):
            if t.shape[0] == dim:
                return t, "keys"
            if t.shape[1] == dim:
                return t.T, "keys"
    if isinstance(td, LowRankDelta):
        # the input side of an MLP-out projection is its larger side (intermediate > hidden)
        f = td.v if cols >= rows else td.u
        f = f.float()
        return f / f.norm(dim=0, keepdim=True).clamp_min(1e-12), "proxy"
    return None, "n/a"


def _apply(td: TensorDelta, k: torch.Tensor) -> torch.Tensor:
    """Δ applied to keys on its input side: Δ @ K when K has ``shape[1]`` rows, else Δᵀ @ K."""
    return td.mv(k, transpose=k.shape[0] != td.shape[1])


# --------------------------------------------------------------------------------------------
# TIES

def _side_vectors(deltas: Iterable[Delta]) -> dict[str, tuple[tuple[int, ...], torch.Tensor, torch.Tensor]]:
    """Per tensor: the coalesced sum of a side's sparse deltas (shape, sorted indices, values)."""
    parts: dict[str, list[SparseDelta]] = {}
    for d in deltas:
        for name, td in d.tensors.items():
            if isinstance(td, SparseDelta):
                parts.setdefault(name, []).append(td)
    out = {}
    for name, tds in parts.items():
        shape = tds[0].shape
        out[name] = (shape, *SparseDelta.sum_of(shape, tds).coalesced)
    return out


def _trim_mask(vals: torch.Tensor, density: float) -> torch.Tensor:
    """Entries among the top ``density`` fraction by magnitude (ties at the threshold kept)."""
    n = vals.numel()
    if n == 0 or density >= 1.0:
        return torch.ones(n, dtype=torch.bool)
    k = max(1, math.ceil(density * n))
    thr = torch.topk(vals.abs(), k).values[-1]
    return vals.abs() >= thr


def ties_correction(ours: Sequence[Delta], theirs: Sequence[Delta], density: float) -> tuple[Delta | None, dict]:
    """The correction that turns ``Σ ours + Σ theirs`` into the TIES merge on overlapping entries.

    Trim thresholds are taken over each side's whole sparse task vector for the tensor (TIES
    trims task vectors); election and disjoint mean apply to entries both sides touch.
    """
    if not (0.0 < density <= 1.0):
        raise UsageError(f"expected a TIES density in (0, 1], found {density}")
    vo = _side_vectors(ours)
    vt = _side_vectors(theirs)
    tensors: dict[str, TensorDelta] = {}
    stats = {"tensors": 0, "overlap_entries": 0, "trimmed_entries": 0, "sign_conflicts": 0, "zeroed_entries": 0,
             "density": density}
    for name in sorted(set(vo) & set(vt)):
        shape, io, xo = vo[name]
        _, it, xt = vt[name]
        common, po, pt = intersect(io, it)
        if common.numel() == 0:
            continue
        a, b = xo[po], xt[pt]
        ta = torch.where(_trim_mask(xo, density)[po], a, torch.zeros_like(a))
        tb = torch.where(_trim_mask(xt, density)[pt], b, torch.zeros_like(b))
        elected = torch.sign(ta + tb)
        agree_a = (torch.sign(ta) == elected) & (ta != 0)
        agree_b = (torch.sign(tb) == elected) & (tb != 0)
        count = agree_a.to(torch.float32) + agree_b.to(torch.float32)
        total = torch.where(agree_a, ta, torch.zeros_like(ta)) + torch.where(agree_b, tb, torch.zeros_like(tb))
        merged = torch.where(count > 0, total / count.clamp_min(1.0), torch.zeros_like(total))
        corr = merged - (a + b)
        stats["tensors"] += 1
        stats["overlap_entries"] += int(common.numel())
        stats["trimmed_entries"] += int(((ta == 0) & (a != 0)).sum() + ((tb == 0) & (b != 0)).sum())
        stats["sign_conflicts"] += int((torch.sign(a) * torch.sign(b) < 0).sum())
        stats["zeroed_entries"] += int((merged == 0).sum())
        keep = corr != 0
        if bool(keep.any()):
            tensors[name] = SparseDelta(shape, common[keep].contiguous(), corr[keep].contiguous())
    return (Delta(tensors) if tensors else None), stats


# --------------------------------------------------------------------------------------------
# combining several deltas into one (used by resolve)

def combine(deltas: Sequence[Delta]) -> Delta:
    """One delta equal to the sum of ``deltas``: sparse entries coalesced, low-rank factors
    concatenated, mixed formats of one tensor made dense. State tensors with the same key are
    concatenated (2-D ones side by side when their row counts agree — AlphaEdit's ``keys.<layer>``
    are d×n — else along the first dimension); others are kept from the first delta."""
    groups: dict[str, list[TensorDelta]] = {}
    for d in deltas:
        for name, td in d.tensors.items():
            groups.setdefault(name, []).append(td)
    out = {name: sum_deltas(tds[0].shape, tds) for name, tds in groups.items()}
    state: dict[str, torch.Tensor] = {}
    for d in deltas:
        for k, t in d.state.items():
            if k in state and t.ndim == 2 and state[k].ndim == 2 and state[k].shape[0] == t.shape[0]:
                state[k] = torch.cat([state[k], t], 1)
            elif k in state and state[k].ndim == t.ndim and state[k].shape[1:] == t.shape[1:]:
                state[k] = torch.cat([state[k], t])
            else:
                state.setdefault(k, t)
    return Delta(out, state)
