"""Merging branches: the merge plan, conflict detection, and the ``sum`` / ``ties`` strategies.

Vocabulary. ``ours`` is the current branch head, ``theirs`` the head being merged in. With
``A = ancestors(ours)`` and ``B = ancestors(theirs)`` (parent and merge-parent links), the
*side edits* of ours are the delta events live at ours (``Ledger.active``) that are not in ``B``,
and symmetrically for theirs. There is no need to pick one merge-base event: ``A ∩ B`` is the
common history, and everything the store computes is a function of event sets.

Active-set semantics of a merge (implemented once, in ``kledger.ledger.graph.live``):

* The merge event has ``parent = ours`` and ``parents = [ours, theirs]``; the merged version's
  active set is taken over ``A ∪ B``: every edit of either side, minus every revert of either
  side. That is the three-way sum ``W_base + (W_ours − W_base) + (W_theirs − W_base)``: an edit
  of the common history that one side reverted stays reverted (a change made on one side
  survives the merge, as in git), an edit reverted on both sides leaves once, and an edit in the
  common history counts once (so merging a branch into itself, or merging twice, changes nothing).
* ``config["supersedes"]`` of the merge event lists events that the merge takes out of the active
  set: the losing side of a hard conflict (``--ours``/``--theirs``) and, for ``resolve``, the
  side edits it recomputed. Reverting a merge that carries a delta brings them back.

Strategies:

* ``sum`` — no delta of its own: the weights are ``base + Σ`` active deltas, exactly what the
  compositor computes. Because the active list is sorted by sequence number, merging A into B
  and B into A give bit-identical weights.
* ``ties`` — TIES-merging (Yadav et al. 2023, arXiv 2306.01708) applied to the sparse entries that
  both sides touch. Per tensor, each side's sparse task vector τ (the sum of its side edits'
  sparse deltas) is *trimmed* (entries below the side's top-``density`` magnitude quantile are
  zeroed), the sign of every overlapping entry is *elected* (``sign(τ'_ours + τ'_theirs)``) and
  the entry becomes the *disjoint mean* of the trimmed values that agree with it. Entries that only
  one side touches, low-rank and dense deltas are kept as in ``sum``: there is no interference
  to resolve there, and trimming them would only delete edits. The merge event stores the
  correction ``TIES − (τ_ours + τ_theirs)`` on the overlap, so active set + correction = TIES.
* ``resolve`` — recomputes the union of the side requests with the method's own batch solve
  from the merge's starting point; it needs the editors and lives in ``kledger.cli.branch``.

Conflict detection (``analyse``), before anything is written:

* hard conflict — the same fact (subject + relation template, i.e. the prompt with the subject
  replaced by ``{}``; or the same prompt when there is no subject) edited to different targets on
  the two sides; the merge stops unless every such fact is given a side;
* warnings — the same fact edited to the same target on both sides (``sum`` applies it twice),
  overlapping sparse entries, and opposite-sign updates on shared entries;
* interference — for each pair of side edits that touch a common tensor, ``‖Δ_B k_A‖`` (and
  relative to ``‖Δ_A k_A‖``) where ``k_A`` are A's keys. Keys come from the delta's method
  state (tensors named ``keys``, ``keys::PARAM`` or AlphaEdit's ``keys.<layer>`` — one key per
  column, or per row); when none
  are recorded, low-rank deltas fall back to their input-side factor (the direction the edit
  responds to; marked ``proxy``), and otherwise only overlap and cosine are reported.

This module reads the ledger and deltas only; it imports no editor.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from kledger.ledger.deltas import Delta, LowRankDelta, SparseDelta, TensorDelta, intersect, sum_deltas
from kledger.ledger.errors import UsageError
from kledger.ledger.records import Event
from kledger.ledger.store import Ledger

log = logging.getLogger(__name__)

STRATEGIES = ("sum", "resolve", "ties")
#: TIES keeps the top 20% magnitudes of each task vector in the paper (k = 20); we use the same.
DEFAULT_DENSITY = 0.2
#: pairwise analysis is skipped (aggregate only) above this many side-edit pairs.
MAX_PAIRS = 20000


# --------------------------------------------------------------------------------------------
# facts

def requests_of(ev: Event) -> list[dict]:
    """The fact requests an event records (one dict, a list of them, or none)."""
    r = ev.request
    if isinstance(r, Mapping):
        return [dict(r)]
    if isinstance(r, list):
        return [dict(x) for x in r if isinstance(x, Mapping)]
    return []


def fact_key(req: Mapping[str, Any]) -> tuple[str, str]:
    """(subject, relation template) — or ("", prompt) when the request names no subject."""
    prompt = " ".join(str(req.get("prompt", "")).split())
    subject = req.get("subject")
    if subject:
        subject = " ".join(str(subject).split())
        return subject, prompt.replace(subject, "{}", 1)
    return "", prompt


def _target(req: Mapping[str, Any]) -> str:
    return " ".join(str(req.get("target_new", "")).split())


# --------------------------------------------------------------------------------------------
# the plan

@dataclass
class Conflict:
    subject: str
    relation: str
    ours: list[tuple[str, str]]  # (event id, target)
    theirs: list[tuple[str, str]]
    choice: str | None = None  # "ours" | "theirs" | None (unresolved)

    @property
    def fact(self) -> str:
        return self.relation.replace("{}", self.subject) if self.subject else self.relation

    def matches(self, sel: str) -> bool:
        s = " ".join(sel.split())
        if s.lower() in {self.subject.lower(), self.relation.lower(), self.fact.lower()}:
            return True
        h = s.lower()
        return len(h) >= 4 and all(c in "0123456789abcdef" for c in h) and any(
            eid.startswith(h) for eid, _ in self.ours + self.theirs)

    def losers(self) -> list[str]:
        if self.choice == "ours":
            return [e for e, _ in self.theirs]
        if self.choice == "theirs":
            return [e for e, _ in self.ours]
        return []

    def to_json(self) -> dict:
        return {"fact": self.fact, "subject": self.subject, "relation": self.relation,
                "ours": [{"event": e, "target": t} for e, t in self.ours],
                "theirs": [{"event": e, "target": t} for e, t in self.theirs], "choice": self.choice}


@dataclass
class MergePlan:
    ours: Event
    theirs: Event
    ours_only: list[Event]  # side edits (live delta events not in the other side's history)
    theirs_only: list[Event]
    merged_live: list[str]  # active ids of the merged version before anything is superseded
    ours_live: list[str]
    conflicts: list[Conflict] = field(default_factory=list)
    duplicates: list[dict] = field(default_factory=list)
    overlaps: list[dict] = field(default_factory=list)  # per pair and tensor
    interference: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def up_to_date(self) -> bool:
        """Nothing to merge: the merged active set would equal ours."""
        return self.merged_live == self.ours_live

    @property
    def unresolved(self) -> list[Conflict]:
        return [c for c in self.conflicts if c.choice is None]

    def dropped(self) -> list[str]:
        """Side edits the merge takes out (the losing side of resolved hard conflicts)."""
        out: dict[str, None] = {}
        for c in self.conflicts:
            for e in c.losers():
                out[e] = None
        return list(out)

    def kept(self, side: str) -> list[Event]:
        drop = set(self.dropped())
        evs = self.ours_only if side == "ours" else self.theirs_only
        return [e for e in evs if e.id not in drop]

    def to_json(self) -> dict:
        return {
            "ours": self.ours.id, "theirs": self.theirs.id, "up_to_date": self.up_to_date,
            "ours_edits": [e.id for e in self.ours_only], "theirs_edits": [e.id for e in self.theirs_only],
            "conflicts": [c.to_json() for c in self.conflicts], "duplicates": self.duplicates,
            "dropped": self.dropped(), "overlaps": self.overlaps, "interference": self.interference,
            "notes": self.notes,
        }


def plan_merge(ledger: Ledger, ours: Event, theirs: Event,
               choose_ours: Sequence[str] = (), choose_theirs: Sequence[str] = ()) -> MergePlan:
    """Side edits, merged active set and hard conflicts (with the user's per-fact choices)."""
    with ledger.session():
        return _plan(ledger, ours, theirs, choose_ours, choose_theirs)


def _plan(ledger: Ledger, ours: Event, theirs: Event, choose_ours: Sequence[str], choose_theirs: Sequence[str]
          ) -> MergePlan:
    anc_o = ledger.ancestors(ours)
    anc_t = ledger.ancestors(theirs)
    ours_live = ledger.graph.live(anc_o)
    theirs_live = ledger.graph.live(anc_t)
    merged = ledger.graph.live(anc_o | anc_t)
    only_o = [i for i in ours_live if i not in anc_t]
    only_t = [i for i in theirs_live if i not in anc_o]
    evs = {e.id: e for e in ledger.events_by_ids(only_o + only_t)} if (only_o or only_t) else {}
    plan = MergePlan(ours, theirs, [evs[i] for i in only_o], [evs[i] for i in only_t], merged, ours_live)
    merged_set = set(merged)
    lost_o = [i for i in ours_live if i not in merged_set]
    if lost_o:
        plan.notes.append(f"{len(lost_o)} of our edits are reverted on their side and leave with the merge: "
                          + ", ".join(lost_o[:10]) + (" …" if len(lost_o) > 10 else ""))
    _find_conflicts(plan)
    _apply_choices(plan, choose_ours, choose_theirs)
    return plan


def _find_conflicts(plan: MergePlan) -> None:
    by_key: dict[tuple[str, str], dict[str, list[tuple[str, str]]]] = {}
    skipped = 0
    for side, evs in (("ours", plan.ours_only), ("theirs", plan.theirs_only)):
        for ev in evs:
            if ev.type != "add":
                skipped += ev.type in ("forget", "learn")
                continue
            for req in requests_of(ev):
                by_key.setdefault(fact_key(req), {"ours": [], "theirs": []})[side].append((ev.id, _target(req)))
    for (subject, relation), sides in sorted(by_key.items()):
        if not sides["ours"] or not sides["theirs"]:
            continue
        to = {t for _, t in sides["ours"]}
        tt = {t for _, t in sides["theirs"]}
        if to == tt and len(to) == 1:
            plan.duplicates.append({"fact": relation.replace("{}", subject) if subject else relation,
                                    "target": next(iter(to)), "ours": [e for e, _ in sides["ours"]],
                                    "theirs": [e for e, _ in sides["theirs"]]})
        else:
            plan.conflicts.append(Conflict(subject, relation, sides["ours"], sides["theirs"]))
    if skipped:
        plan.notes.append(f"{skipped} forget/learn side events are not checked for fact conflicts")


def _apply_choices(plan: MergePlan, choose_ours: Sequence[str], choose_theirs: Sequence[str]) -> None:
    for side, sels in (("ours", choose_ours), ("theirs", choose_theirs)):
        for sel in sels:
            hits = [c for c in plan.conflicts if c.matches(sel)]
            if not hits:
                known = "; ".join(c.fact for c in plan.conflicts) or "none"
                raise UsageError(f"--{side} {sel!r}: expected a conflicting fact (subject, prompt or event id),"
                                 f" found no conflict that matches; conflicts: {known}")
            for c in hits:
                if c.choice not in (None, side):
                    raise UsageError(f"fact {c.fact!r} is chosen both --ours and --theirs")
                c.choice = side
    drop = set(plan.dropped())
    for ev in plan.ours_only + plan.theirs_only:
        if ev.id in drop and len(requests_of(ev)) > 1:
            plan.notes.append(f"event {ev.id} is dropped as a whole, with its {len(requests_of(ev))} facts")


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


def ties_correction(ours: Sequence[Delta], theirs: Sequence[Delta], density: float = DEFAULT_DENSITY
                    ) -> tuple[Delta | None, dict]:
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
