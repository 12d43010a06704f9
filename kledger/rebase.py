"""Rebase-revert (``kledger revert EVENT --rebase``): remove an edit as if it had never happened.

Plain ``revert`` subtracts the event's delta exactly, but every later edit was computed on a
model that contained it: AlphaEdit projects later updates away from the keys it accumulated,
sequential MEMIT/KNE solve against the weights as they were. Rebase-revert therefore

1. checks that EVENT is active on the current branch and that every later active edit can be
   recomputed (an ``add``/``forget``/``learn`` event of a registered method; a merge between
   EVENT and the head stops it: rebasing across merges is not supported);
2. materialises the branch as it would be without EVENT and the later edits (the earlier active
   edits), then recomputes each later edit in sequence order with its recorded method and
   config (``make_config`` from the stored JSON), the method state of the new history
   (``EditContext.history``) and the same per-event granularity, writing each new delta into the
   working model before the next, exactly like ``add``;
3. only then appends: a revert of EVENT, a revert of every later edit, and the recomputed
   events (``metrics.rebased_from`` names the event each one replaces). Each append expects the
   previous head, so a concurrent writer makes it stop instead of interleaving.

The result equals a ledger that never had EVENT, up to the determinism of the editors (every
method here is seeded and deterministic on CPU).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

from kledger.ledger.errors import StateError
from kledger.ledger.mergeplan import requests_of
from kledger.ledger.records import DELTA_EVENT_TYPES, Event, FactRequest
from kledger.ledger.store import Ledger

log = logging.getLogger(__name__)

RECOMPUTABLE = ("add", "forget", "learn")


def retain_of(ev: Event) -> list[FactRequest]:
    """The retain facts a forget/learn event used (recorded in ``ensemble.retain.used``)."""
    retain = (ev.ensemble or {}).get("retain") if isinstance(ev.ensemble, Mapping) else None
    used = retain.get("used") if isinstance(retain, Mapping) else None
    return [FactRequest.from_json(r) for r in used or [] if isinstance(r, Mapping)]


@dataclass
class RebasePlan:
    target: Event
    head: Event
    prefix: list[str]  # active ids before the target (kept as they are)
    later: list[Event]  # active edits after the target (recomputed)


@dataclass
class RebaseResult:
    reverts: list[Event] = field(default_factory=list)
    added: list[Event] = field(default_factory=list)
    recomputed: int = 0
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {"reverted": [e.target for e in self.reverts], "revert_events": [e.id for e in self.reverts],
                "added": [e.id for e in self.added], "recomputed": self.recomputed,
                "seconds": round(self.seconds, 3)}


def plan_rebase(ledger: Ledger, target_ref: str) -> RebasePlan:
    with ledger.session():
        return _plan_rebase(ledger, target_ref)


def _plan_rebase(ledger: Ledger, target_ref: str) -> RebasePlan:
    from kledger.editors.registry import EDITORS  # the editors (and torch): only when rebasing
    from kledger.editing import recompute_config

    head = ledger.head()
    target = ledger.resolve(target_ref)
    if target.type not in DELTA_EVENT_TYPES:
        raise StateError(f"expected an edit event (add/merge/forget/learn) to revert, found a {target.type} event"
                         f" {target.id}")
    anc = ledger.ancestors(head)
    if target.id not in anc:
        raise StateError(f"event {target.id} is not in the history of branch {ledger.current_branch()!r}")
    live = ledger.graph.live(anc)
    if target.id not in live:
        by = ledger.graph.reverted_by(head, target.id)
        raise StateError(f"event {target.id} is already reverted" + (f" by {by}" if by else ""))
    g = ledger.graph.nodes()
    merges = [i for i in anc if g[i].seq > target.seq and g[i].type == "merge"]
    if merges or target.type == "merge":
        raise StateError(f"expected no merge between {target.id} and the head, found {(merges or [target.id])[0]};"
                         " rebasing across merges is not supported (use plain revert)")
    prefix = [i for i in live if g[i].seq < target.seq]
    later = ledger.events_by_ids([i for i in live if g[i].seq > target.seq])
    for ev in later:
        if ev.type not in RECOMPUTABLE or not ev.method or ev.method not in EDITORS or not requests_of(ev):
            raise StateError(f"expected every later edit to be recomputable (an add/forget/learn event of a"
                             f" registered method with its requests), found {ev.type} event {ev.id}"
                             f" (method {ev.method!r})")
        recompute_config(ev)  # its input files must still be the ones it was computed with: fail before any work
    return RebasePlan(target, head, prefix, later)


def rebase_revert(ledger: Ledger, target_ref: str, *, device: str = "auto", progress: bool = False,
                  message: str | None = None, model_tok=None, stats_corpus: str | None = None,
                  device_map: str | None = None) -> RebaseResult:
    """Revert ``target_ref`` and recompute every later active edit as if it had never happened.

    ``model_tok``: an already loaded *base* model and tokenizer to use (it is modified).
    ``device_map``: split the model across devices, as ``Workspace(device_map=...)``.
    """
    from kledger.ledger.compose import apply_deltas
    from kledger.editing import compute_edit, method_states, recompute_config, with_inputs, write_exact
    from kledger.workspace import Workspace

    t0 = time.perf_counter()
    plan = plan_rebase(ledger, target_ref)
    ws = Workspace(ledger, device=device, device_map=device_map)
    if model_tok is None:
        model, tok, prefix_events = ws.model_with(plan.prefix)
    else:
        model, tok = model_tok
        prefix_events = ledger.events_by_ids(plan.prefix)
        if prefix_events:
            apply_deltas(model, [ledger.load_delta(e) for e in prefix_events])
    new: list[tuple[Event, Any, float]] = []  # (replaced event, result, seconds)
    prefix_states: dict[str, list[dict]] = {}  # method state of the kept earlier edits, per method
    new_states: dict[str, list[dict]] = {}  # ... and of the recomputed ones
    written = [ledger.load_delta(e) for e in prefix_events]  # the active list as it will be, in order
    for ev in plan.later:
        if ev.method not in prefix_states:
            prefix_states[ev.method] = method_states(ledger, ev.method, prefix_events)
        hist = prefix_states[ev.method] + new_states.get(ev.method, [])
        reqs = [FactRequest.from_json(r) for r in requests_of(ev)]
        t1 = time.perf_counter()
        extra = {"retain": retain_of(ev)} if ev.type in ("forget", "learn") else {}
        results = compute_edit(ledger, model, tok, ev.method, recompute_config(ev), reqs, hist, progress=progress,
                               stats_corpus=stats_corpus, **extra)
        dt = time.perf_counter() - t1
        for res in results:
            apply_deltas(model, [res.delta])
            written.append(res.delta)
            new_states.setdefault(ev.method, []).append(dict(res.delta.state))
            new.append((ev, res, dt / max(len(results), 1)))
        write_exact(model, written, ws.base_value)  # as Workspace.add does after each batch
    # every edit is computed: now write
    out = RebaseResult(recomputed=len(plan.later))
    head = plan.head.id
    for e in [plan.target, *plan.later]:
        rv = ledger.append("revert", target=e.id, request=e.request, method=e.method, expect_head=head,
                           message=(message or f"revert {plan.target.id} --rebase") if e is plan.target
                           else f"rebase: recompute {e.id} without {plan.target.id}")
        out.reverts.append(rv)
        head = rv.id
    for old, res, dt in new:
        metrics = dict(res.metrics)
        metrics.setdefault("time_s", round(dt, 4))
        metrics["rebased_from"] = old.id
        req_json: Any = [r.to_json() for r in res.requests]
        if len(req_json) == 1 and not isinstance(old.request, list):
            req_json = req_json[0]
        ev = ledger.append(old.type, request=req_json, method=old.method, config=old.config,
                           ensemble=with_inputs(res.ensemble, (old.ensemble or {}).get("inputs") or {}), metrics=metrics, delta=res.delta, expect_head=head,
                           message=old.message)
        out.added.append(ev)
        head = ev.id
    out.seconds = time.perf_counter() - t0
    return out
