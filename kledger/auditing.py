"""Audits of a ledger version, as the ``kledger audit`` command and scripts run them.

The measuring lives in ``kledger.audit``; this module only wires it to the ledger: it finds or
records the probe set, audits a version on the base model it is given, appends the ``audit`` (and
``blame``) events, and writes the report. Loading the model is the caller's (``Workspace.load_base``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from kledger.audit import events as E
from kledger.audit.auditor import Auditor, AuditResult, BlameResult
from kledger.audit.drift import cache_file
from kledger.audit.probes import PROBES_VERSION, ProbeSet, describe_sources, find_or_build
from kledger.audit.thresholds import THRESHOLDS
from kledger.editors.models import cache_dir
from kledger.ledger.records import Event
from kledger.ledger.store import Ledger

def probe_set(ledger: Ledger, model, tok, probes_file: str | None = None,
              note: Callable[[str], None] | None = None) -> tuple[ProbeSet, Event, bool]:
    """The ledger's probe set (built from the base ``model`` and recorded if there is none yet, or
    if ``probes_file`` differs from the latest): (probes, its event, recorded now?)."""
    base = ledger.base_model()
    cache = cache_dir() / "probes" / f"default-{base['fingerprint'][:16]}-v{PROBES_VERSION}.safetensors"
    probes, pev, built = find_or_build(ledger, model, tok, probes_file, base_info=base, cache=cache)
    if built and note:
        note(f"recorded {describe_sources(probes)} as event {pev.id}")
    return probes, pev, built


def previous_audit(ledger: Ledger, version: Event, probes_sha: str) -> Event | None:
    """The latest recorded audit, on the same probe set, of ``version`` or one of its ancestors."""
    anc = ledger.ancestors(version)
    return E.latest(ledger, "audit", where=lambda ev: E.config_of(ev).get("probes") == probes_sha
                    and E.config_of(ev).get("version") in anc)


@dataclass
class AuditRun:
    """One audit of a version: the measurement, what was recorded, and the report."""

    version: Event
    result: AuditResult
    metrics: dict[str, Any]  # the figures as recorded (the result's, plus status and details)
    thresholds: dict[str, float | None]
    probes: ProbeSet
    probes_event: Event
    probes_built: bool
    previous: Event | None = None
    event: Event | None = None
    blame: BlameResult | None = None
    report: Path | None = None

    @property
    def healthy(self) -> bool:
        return self.result.healthy

    @property
    def status(self) -> str:
        return "healthy" if self.healthy else "threshold crossed: " + ", ".join(self.result.crossed)

    def to_json(self) -> dict[str, Any]:
        prev = self.previous
        return {
            "event": self.event.id if self.event else None, "version": self.version.id, "healthy": self.healthy,
            "crossed": self.result.crossed, "metrics": self.metrics, "thresholds": self.thresholds,
            "probes": {"sha256": self.probes_event.delta_sha256, "event": self.probes_event.id,
                       "recorded_now": self.probes_built, **self.probes.summary()},
            "previous": {"event": prev.id, "metrics": {n: (prev.metrics or {}).get(n) for n in THRESHOLDS}}
            if prev else None,
            "blame": self.blame.to_json() if self.blame else None, "report": str(self.report) if self.report else None,
        }


def run_audit(ledger: Ledger, model, tok, version: Event, thresholds: Mapping[str, float | None], *,
              probes_file: str | None = None, record: bool = True, blame: bool = False, max_culprits: int = 3,
              report_dir: str | Path | None = None, note: Callable[[str], None] | None = None,
              bisect_note: Callable[[str], None] | None = None, load_s: float = 0.0) -> AuditRun:
    """Audit ``version`` on ``model`` (the freshly loaded base), record it, blame and report.

    ``record``: append the ``audit`` (and ``blame``) events; ``blame``: bisect for the edits
    responsible when a threshold is crossed; ``note``/``bisect_note``: progress messages.
    """
    t0 = time.perf_counter() - load_s
    note = note or (lambda msg: None)
    th = dict(thresholds)
    note("preparing the probe set")
    probes, pev, built = probe_set(ledger, model, tok, probes_file, note)
    fp = ledger.base_model()["fingerprint"]
    auditor = Auditor(ledger, model, tok, probes, th, drift_cache=cache_file(cache_dir() / "drift", fp))
    note(f"measuring {version.id}")
    res = auditor.audit(version)
    res.metrics["seconds"]["load"] = round(load_s, 3)
    prev = previous_audit(ledger, version, pev.delta_sha256)
    metrics = dict(res.metrics) | {
        "healthy": res.healthy, "crossed": res.crossed, "active_edits": res.active,
        "lost_edits": res.details.get("lost_edits", []), "lost_facts": res.details.get("lost_facts", [])[:20],
        "weights": res.details.get("weights", {}), "previous": prev.id if prev else None,
        "total_s": round(time.perf_counter() - t0, 3),
    }
    run = AuditRun(version, res, metrics, th, probes, pev, built, prev)
    if record:
        run.event = E.record_audit(ledger, version, pev.delta_sha256, th, metrics,
                                   f"audit {version.id}: {run.status}")
    if blame and not res.healthy:
        note("bisecting for the responsible edits")
        run.blame = auditor.blame(version, res, max_culprits=max_culprits, progress=bisect_note)
        if record:
            culprits = ", ".join(c["id"] for c in run.blame.culprits) or "none found"
            E.record_blame(ledger, version, pev.delta_sha256, th, run.event.id if run.event else None,
                           run.blame.to_json(), f"blame {version.id}: {culprits}")
    if report_dir:
        from kledger.audit.report import write_report

        run.report = write_report(ledger, report_dir, version, thresholds=th,
                                  current={"metrics": metrics, "crossed": res.crossed, "healthy": res.healthy},
                                  blame=run.blame.to_json() if run.blame else None,
                                  previous=prev.metrics if prev else None)
    return run
