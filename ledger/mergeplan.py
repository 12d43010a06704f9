"""The merge plan: side edits, the merged active set, and fact conflicts (no torch needed).

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

Hard conflicts: the same fact (subject + relation template, i.e. the prompt with the subject
replaced by ``{}``; or the same prompt when there is no subject) edited to different targets on
the two sides; the merge stops unless every such fact is given a side. The same fact edited to
the same target on both sides is a warning (``sum`` applies it twice). Warnings that need the
deltas (overlaps, interference) are in ``kledger.ledger.merge``; the strategies in
``kledger.merging``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from kledger.ledger.errors import UsageError
from kledger.ledger.records import Event
from kledger.ledger.store import Ledger


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
