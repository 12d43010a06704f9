"""Audits of ledger versions: measure a materialised model on the stored probe set, judge it
against thresholds, and find the edits responsible by bisection over the event sequence.

The figures and their definitions are in ``kledger.audit.figures``; thresholds in
``kledger.audit.thresholds``; what the ledger records of an audit in ``kledger.audit.events``.

Audits take no lock: they read through short read-only connections and only the final
``Ledger.append`` of the audit event holds the write lock.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.nn as nn

from kledger.audit.drift import DriftTracker
from kledger.audit.figures import BATCH_TOKENS, edit_probes, measure
from kledger.audit.probes import ProbeSet
from kledger.audit.thresholds import ALL_PARTS, COST, DEFAULT_THRESHOLDS, PARTS, crossed
from kledger.ledger.compose import DEFAULT_CHUNK, apply_deltas
from kledger.ledger.deltas import Delta
from kledger.ledger.errors import UsageError
from kledger.ledger.records import DELTA_EVENT_TYPES, Event


# --- ledger-level audits --------------------------------------------------------------------
@dataclass
class AuditResult:
    version: Event
    metrics: dict[str, Any]
    details: dict[str, Any]
    thresholds: dict[str, float | None]
    crossed: list[str]
    active: int
    excluded: tuple[str, ...] = ()
    seconds: float = 0.0

    @property
    def healthy(self) -> bool:
        return not self.crossed

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version.id, "seq": self.version.seq, "healthy": self.healthy,
                "crossed": list(self.crossed), "thresholds": dict(self.thresholds), "metrics": dict(self.metrics),
                "details": dict(self.details), "active_edits": self.active, "excluded": list(self.excluded),
                "seconds": round(self.seconds, 3)}


@dataclass
class BlameResult:
    culprits: list[dict[str, Any]] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)
    after_revert: dict[str, Any] | None = None
    fixed: bool = False
    seconds: float = 0.0

    def revert_commands(self) -> list[str]:
        return [c["revert"] for c in self.culprits if c.get("revert")]

    def to_json(self) -> dict[str, Any]:
        return {"culprits": self.culprits, "steps": self.steps, "after_revert": self.after_revert,
                "fixed": self.fixed, "revert_commands": self.revert_commands(), "seconds": round(self.seconds, 3)}


class Auditor:
    """Audits ledger versions on one loaded BASE model, switching between versions in place.

    The model must be the freshly loaded base. Each version is written as base + Σ its active
    deltas with ``compose.apply_deltas`` (the same fp32 accumulation as ``materialise``, so the
    audited model is bit-identical to an export), after restoring every tensor an earlier version
    touched from a cached copy of its base value — the base is loaded once, however many versions
    a bisection visits. Deltas are cached per event. ``drift_cache``: the file of base σ₁ figures
    (``drift.cache_file``) shared with the per-edit drift of ``kledger add``.
    """

    def __init__(self, ledger, model: nn.Module, tok, probes: ProbeSet,
                 thresholds: Mapping[str, float | None] | None = None, batch_tokens: int = BATCH_TOKENS,
                 on_measure: Callable[[], None] | None = None, drift_cache: str | Path | None = None,
                 chunk: int = DEFAULT_CHUNK) -> None:
        self.ledger, self.model, self.tok, self.probes = ledger, model, tok, probes
        self.thresholds = dict(DEFAULT_THRESHOLDS if thresholds is None else thresholds)
        self.batch_tokens = batch_tokens
        self.chunk = chunk  # sum ``chunk`` deltas at a time, as ``materialise`` does with the same chunk
        self.on_measure = on_measure  # test hook: runs just before each measurement
        self._params = dict(model.named_parameters())
        self._base: dict[str, torch.Tensor] = {}
        self._written: set[str] = set()
        self._deltas: dict[str, Delta] = {}
        self.drift = DriftTracker(lambda n: self._base[n], cache=drift_cache)
        self.measurements = 0

    # --- model state ---------------------------------------------------------------------
    def _delta(self, ev: Event) -> Delta:
        d = self._deltas.get(ev.id)
        if d is None:
            d = self._deltas[ev.id] = self.ledger.load_delta(ev)
        return d

    @torch.no_grad()
    def set_state(self, events: Sequence[Event]) -> list[str]:
        """Make the model base + Σ deltas of ``events``; returns the tensors written."""
        deltas = [self._delta(e) for e in events]
        names = {n for d in deltas for n in d.tensors}
        for n in names - set(self._params):
            raise UsageError(f"a delta names parameter {n!r}, which the model does not have")
        for n in names:
            if n not in self._base:
                self._base[n] = self._params[n].detach().clone()
        for n in self._written:
            self._params[n].copy_(self._base[n])
        self._written = set(apply_deltas(self.model, deltas, chunk=self.chunk)) if deltas else set()
        return sorted(self._written)

    def restore(self) -> None:
        self.set_state([])

    def weight_figures(self) -> dict[str, dict[str, float]]:
        return {n: self.drift.figures(n, self._params[n]) for n in sorted(self._written)}

    # --- measuring -----------------------------------------------------------------------
    def measure_state(self, events: Sequence[Event], parts: Iterable[str] = ALL_PARTS) -> tuple[dict, dict]:
        parts = set(parts)
        self.set_state(events)
        if self.on_measure is not None:
            self.on_measure()
        self.measurements += 1
        m, d = measure(self.model, self.tok, self.probes, edit_probes(events) if "edits" in parts else (),
                       parts=parts - {"weights"}, batch_tokens=self.batch_tokens)
        if "weights" in parts:
            t0 = time.perf_counter()
            w = self.weight_figures()
            self.drift.save()
            # tensors beside the model (the edit memory) are zero in the base: no relative figures
            m["weight_rel"] = max((f["cum_rel"] for f in w.values() if "cum_rel" in f), default=0.0)
            m["sv_growth"] = max((f["sv_growth"] for f in w.values() if "sv_growth" in f), default=1.0)
            m["edited_tensors"] = len(w)
            d["weights"] = w
            m["seconds"]["weights"] = round(time.perf_counter() - t0, 3)
        return m, d

    def audit(self, version: Event, exclude: Iterable[str] = (), parts: Iterable[str] = ALL_PARTS) -> AuditResult:
        t0 = time.perf_counter()
        exclude = tuple(exclude)
        active = [e for e in self.ledger.active(version) if e.id not in exclude]
        m, d = self.measure_state(active, parts)
        return AuditResult(version, m, d, dict(self.thresholds), crossed(m, self.thresholds), len(active),
                           exclude, time.perf_counter() - t0)

    # --- blame ---------------------------------------------------------------------------
    def sequence(self, version: Event) -> list[Event]:
        """The events that change the active set in ``version``'s history, in sequence order."""
        g = self.ledger.graph.nodes()
        ids = [i for i in self.ledger.ancestors(version) if g[i].type in DELTA_EVENT_TYPES + ("revert",)]
        ids.sort(key=lambda i: g[i].seq)
        events = {e.id: e for e in self.ledger.events(types=list(DELTA_EVENT_TYPES) + ["revert"])}
        return [events[i] for i in ids]

    def blame(self, version: Event, result: AuditResult | None = None, max_culprits: int = 3,
              progress: Callable[[str], None] | None = None) -> BlameResult:
        """Bisect ``version``'s event sequence for the first event after which a threshold that
        ``version`` crosses is crossed; exclude it and check; repeat up to ``max_culprits``.

        Like ``git bisect`` this assumes that once crossed, a threshold stays crossed as events are
        added. Midpoints measure only the cheapest crossed figure (weights, then perplexity, KL,
        fact retention, edit retention: on smollm2-135m about 0, 19, 35, 45 and 45+ s at 200
        edits on the busy 2-core machine); each culprit is then confirmed by measuring every
        crossed figure of ``version`` without it.
        """
        t0 = time.perf_counter()
        out = BlameResult()
        if result is None:
            result = self.audit(version)
        if result.healthy:
            out.fixed = True
            out.seconds = time.perf_counter() - t0
            return out
        all_parts = {PARTS[n] for n in result.crossed}
        still = list(result.crossed)
        seq = self.sequence(version)
        excluded: list[str] = []

        def active_after(k: int) -> list[Event]:
            if k == 0:
                return []
            return [e for e in self.ledger.active(seq[k - 1]) if e.id not in excluded]

        def bad(k: int, target: str) -> bool:
            m, _ = self.measure_state(active_after(k), {PARTS[target]})
            hit = crossed(m, {target: self.thresholds[target]})
            out.steps.append({"after": seq[k - 1].id if k else None, "index": k, "metric": target,
                              "value": m.get(target), "crossed": bool(hit), "excluded": list(excluded)})
            if progress:
                progress(f"bisect: after {'base' if k == 0 else seq[k - 1].id} ({k}/{len(seq)}): {target}"
                         f" {m.get(target)} {'crossed' if hit else 'within'}")
            return bool(hit)

        while len(out.culprits) < max_culprits and still:
            target = min(still, key=lambda n: COST[PARTS[n]])
            lo, hi = 0, len(seq)  # state lo is within the threshold (the base), state hi crosses it
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if bad(mid, target):
                    hi = mid
                else:
                    lo = mid
            if hi == 0:
                break
            culprit = seq[hi - 1]
            entry = {"id": culprit.id, "seq": culprit.seq, "type": culprit.type, "describe": culprit.describe(),
                     "index": hi, "of": len(seq), "metric": target}
            if culprit.type not in DELTA_EVENT_TYPES or culprit.id not in {e.id for e in self.ledger.active(version)}:
                entry["note"] = ("this event is not an active edit at the audited version; "
                                 "inspect it with `kledger show`")
                out.culprits.append(entry)
                break
            entry["revert"] = f"kledger revert {culprit.id}"
            excluded.append(culprit.id)
            out.culprits.append(entry)
            after = self.audit(version, exclude=excluded, parts=all_parts)
            still = list(after.crossed)
            out.after_revert = {"excluded": list(excluded), "crossed": still,
                                "metrics": {n: after.metrics.get(n) for n in result.crossed}}
            if progress:
                progress(f"without {', '.join(excluded)}: "
                         f"{'crossed ' + ', '.join(still) if still else 'within thresholds'}")
            if not still:
                out.fixed = True
                break
            seq = [e for e in seq if e.id not in excluded]
        self.restore()
        out.seconds = time.perf_counter() - t0
        return out
