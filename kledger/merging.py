"""Merging branches: the merge strategies, as a registry of small objects, and the merge event.

``STRATEGIES`` maps each strategy's name to an object that declares, once, its help text and its
options (``Option``: name, type, default, help); the ``merge`` command builds its ``--strategy``
choice and its options from them. Semantics of the merged active set and of conflicts are in
``kledger.ledger.mergeplan``, the delta arithmetic in ``kledger.ledger.merge``.

* ``sum`` — no delta of its own: the weights are ``base + Σ`` active deltas, exactly what the
  compositor computes. Because the active list is sorted by sequence number, merging A into B
  and B into A give bit-identical weights.
* ``ties`` — TIES-merging on the sparse entries both sides touch; the merge event stores the
  correction from the sum to TIES (``kledger.ledger.merge.ties_correction``).
* ``resolve`` — re-solves the union of the side requests of batch-solving methods
  (``Editor.batch_solve``) with the method's own solve, from the merged active set without those
  edits; the merge event supersedes them and carries the new delta.

This module imports neither torch nor the editors until a merge is computed (``kledger branch``,
``switch`` and ``branches`` import it to list the strategies).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

from kledger.ledger.canonical import canonical_json
from kledger.ledger.errors import StateError, UsageError
from kledger.ledger.records import Event, FactRequest

if TYPE_CHECKING:
    from kledger.ledger.mergeplan import MergePlan
    from kledger.ledger.store import Ledger


@dataclass(frozen=True)
class Option:
    """A strategy option: the keyword ``do_merge`` takes (``--name`` on the command line)."""

    name: str
    type: type
    default: Any
    help: str
    is_file: bool = False  # a path to an existing file


@dataclass
class Outcome:
    """What a strategy adds to the merge event."""

    delta: Any = None  # a Delta, or None (sum)
    method: str | None = None
    request: Any = None
    supersedes: tuple[str, ...] = ()  # taken out of the active set besides the conflicts' losers
    config: dict | None = None
    metrics: dict | None = None
    details: dict | None = None  # returned to the caller (printed by the command)


class Strategy:
    name: ClassVar[str]
    help: ClassVar[str]
    options: ClassVar[tuple[Option, ...]] = ()

    def run(self, ledger: "Ledger", plan: "MergePlan", *, device: str, progress: bool, **options: Any) -> Outcome:
        raise NotImplementedError


class Sum(Strategy):
    name = "sum"
    help = "add the deltas (exact, cheap)"

    def run(self, ledger, plan, *, device, progress, **options) -> Outcome:
        return Outcome()


class Ties(Strategy):
    name = "ties"
    help = "trim and sign-elect overlapping sparse entries"
    #: TIES keeps the top 20% magnitudes of each task vector in the paper (k = 20); so do we
    options = (Option("density", float, 0.2, "ties: fraction of each side's sparse entries kept by magnitude."),)

    def run(self, ledger, plan, *, device, progress, density: float, **options) -> Outcome:
        from kledger.ledger.merge import ties_correction

        load = ledger.load_delta
        delta, stats = ties_correction([load(e) for e in plan.kept("ours")], [load(e) for e in plan.kept("theirs")],
                                       density)
        return Outcome(delta, config={"density": density}, metrics={"ties": stats}, details={"ties": stats})


class Resolve(Strategy):
    name = "resolve"
    help = "re-solve all facts in one batch"
    options = (Option("stats_corpus", str, None,
                      "resolve: the key-statistics corpus the edits were made with, if not the default.", True),)

    def run(self, ledger, plan, *, device, progress, stats_corpus: str | None = None, device_map: str | None = None,
            **options) -> Outcome:
        delta, info = resolve(ledger, plan, device=device, progress=progress, stats_corpus=stats_corpus,
                              device_map=device_map)
        return Outcome(delta, info["method"], info["requests"] or None, tuple(info["recomputed"]),
                       config={"methods": info["methods"]}, metrics={"resolve": info["metrics"]},
                       details={"resolve": {k: v for k, v in info.items() if k != "requests"}})


#: the strategies by name, in the order the command lists them
STRATEGIES: dict[str, Strategy] = {s.name: s for s in (Sum(), Resolve(), Ties())}


def strategy(name: str) -> Strategy:
    if name not in STRATEGIES:
        raise UsageError(f"expected a strategy in {tuple(STRATEGIES)}, found {name!r}")
    return STRATEGIES[name]


def all_options() -> list[Option]:
    """Every strategy's options (the ``merge`` command offers them all)."""
    return [o for s in STRATEGIES.values() for o in s.options]


def prepare(ledger: "Ledger", branch: str, choose_ours: Sequence[str] = (), choose_theirs: Sequence[str] = ()
            ) -> "MergePlan":
    """The plan of merging ``branch`` into the current branch, with the conflicts' chosen sides
    and the analysis of the side edits' deltas (overlaps, interference)."""
    from kledger.ledger.merge import analyse
    from kledger.ledger.mergeplan import plan_merge

    with ledger.session():  # one read-only connection for the whole plan
        plan = plan_merge(ledger, ledger.head(), ledger.resolve(branch), choose_ours, choose_theirs)
    analyse(plan, ledger.load_delta)
    return plan


def do_merge(ledger: "Ledger", plan: "MergePlan", strategy_name: str = "sum", *, branch: str,
             message: str | None = None, device: str = "auto", progress: bool = False,
             device_map: str | None = None, **options: Any) -> tuple[Event, dict]:
    """Append the merge event for ``plan`` with the strategy; returns it and the strategy's details.

    ``options``: the strategies' options (``all_options``); those of other strategies are ignored.
    ``device_map``: where a strategy that loads the model (``resolve``) splits it across devices."""
    s = strategy(strategy_name)
    known = {o.name for o in all_options()}
    unknown = sorted(set(options) - known)
    if unknown:
        raise UsageError(f"unknown merge options {unknown}; expected some of {sorted(known)}")
    if plan.unresolved:
        raise StateError(f"expected no unresolved hard conflicts, found {len(plan.unresolved)}")
    _refuse_shared_memory_slots(plan)
    own = {o.name: o.default if options.get(o.name) is None else options[o.name] for o in s.options}
    dropped = plan.dropped()
    t0 = time.perf_counter()
    out = s.run(ledger, plan, device=device, progress=progress, device_map=device_map, **own)
    config: dict[str, Any] = {"strategy": s.name, "theirs": branch, "theirs_head": plan.theirs.id,
                              "supersedes": dropped + list(out.supersedes),
                              "choices": {c.fact: c.choice for c in plan.conflicts}} | (out.config or {})
    metrics: dict[str, Any] = {"ours_edits": len(plan.ours_only), "theirs_edits": len(plan.theirs_only),
                               "conflicts": len(plan.conflicts), "duplicates": len(plan.duplicates),
                               "overlapping_pairs": len({(o["ours"], o["theirs"]) for o in plan.overlaps})}
    metrics |= (out.metrics or {}) | {"time_s": round(time.perf_counter() - t0, 4)}
    ev = ledger.append("merge", parent=plan.ours.id, parents=[plan.ours.id, plan.theirs.id], config=config,
                       metrics=metrics, delta=out.delta, method=out.method, request=out.request,
                       expect_head=plan.ours.id, message=message or f"merge {branch} ({s.name})")
    return ev, dict(out.details or {})


def _refuse_shared_memory_slots(plan: "MergePlan") -> None:
    """Both sides wrote entries into the same slots of an edit memory (each branch filled its own free
    slots): summed, those entries would be garbage. Refused, whatever the strategy."""
    from kledger.editors.gate import is_memory_tensor

    shared = sorted({(o["ours"], o["theirs"]) for o in plan.overlaps if is_memory_tensor(o["tensor"])})
    if shared:
        pairs = ", ".join(f"{a[:8]}/{b[:8]}" for a, b in shared[:3])
        raise StateError(f"expected the two sides' edit-memory entries in different slots, found {len(shared)} pairs"
                         f" in the same slots (ours/theirs: {pairs}); revert one side's memory edits and add"
                         " those facts again after the merge")


def _batch_solves(method: str | None) -> bool:
    from kledger.editors.registry import EDITORS, editor_class

    return bool(method) and method in EDITORS and editor_class(method).batch_solve


def resolve(ledger: "Ledger", plan: "MergePlan", *, device: str, progress: bool,
            stats_corpus: str | None = None, device_map: str | None = None) -> tuple[Any, dict]:
    """Re-solve the union of both sides' batch-method requests in one solve per method+config,
    starting from the merged active set without those edits (so edits of other methods and
    both sides' reverts are already in the model)."""
    from kledger.ledger.compose import apply_deltas
    from kledger.ledger.merge import combine
    from kledger.ledger.mergeplan import requests_of
    from kledger.editing import compute_edit, method_states, recompute_config
    from kledger.workspace import Workspace

    side = sorted(plan.kept("ours") + plan.kept("theirs"), key=lambda e: e.seq)
    groups: dict[tuple[str, str], list[Event]] = {}
    kept_sum = []
    for ev in side:
        if ev.type == "add" and _batch_solves(ev.method):
            groups.setdefault((ev.method, canonical_json(ev.config or {})), []).append(ev)
        else:
            kept_sum.append(ev.id)
    info: dict[str, Any] = {"recomputed": [], "methods": [], "method": None, "requests": [], "kept_as_sum": kept_sum,
                            "metrics": {}}
    if not groups:
        info["note"] = "no side edit of a batch-solving method; resolve equals sum"
        return None, info
    # per group: its config; every event's input files are checked against its record before any work
    configs = {key: [recompute_config(e) for e in evs][0] for key, evs in groups.items()}
    recomputed = {e.id for g in groups.values() for e in g}
    drop = set(plan.dropped())
    start = [i for i in plan.merged_live if i not in recomputed and i not in drop]
    model, tok, start_events = Workspace(ledger, device=device, device_map=device_map).model_with(start)
    deltas = []
    done: dict[str, list[dict]] = {}
    t0 = time.perf_counter()
    per_group = []
    for (method, ckey), evs in groups.items():
        reqs: list[FactRequest] = []
        for e in evs:
            for r in requests_of(e):
                fr = FactRequest.from_json(r)
                if fr not in reqs:
                    reqs.append(fr)
        states = method_states(ledger, method, start_events) + done.get(method, [])
        results = compute_edit(ledger, model, tok, method, configs[(method, ckey)], reqs, states, progress=progress,
                               stats_corpus=stats_corpus)
        d = combine([r.delta for r in results])
        apply_deltas(model, [d])
        deltas.append(d)
        done.setdefault(method, []).append(dict(d.state))
        info["requests"].extend(r.to_json() for r in reqs)
        info["methods"].append({"method": method, "events": [e.id for e in evs], "requests": len(reqs)})
        per_group.append([dict(r.metrics) for r in results])
    info["recomputed"] = [e.id for e in side if e.id in recomputed]
    info["method"] = info["methods"][0]["method"] if len(info["methods"]) == 1 else None
    info["metrics"] = {"solve_s": round(time.perf_counter() - t0, 3), "results": per_group}
    return combine(deltas), info
