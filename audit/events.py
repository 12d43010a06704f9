"""The audit-event schema: what ``audit`` events record, in one place.

Measurements are never part of the model: they are appended as events of type ``audit`` whose
``config["kind"]`` says what they hold. Every reader and writer of audit events goes through
this module.

==============  ==============================================================  ===========
kind            config                                                          carries
==============  ==============================================================  ===========
``probes``      ``probes`` (sha256 of the probe set object), ``summary``         the probe
                                                                                set object
``thresholds``  ``thresholds``: every threshold after the change (latest wins)  –
``audit``       ``audit_version``, ``probes``, ``thresholds``, ``version`` (the   –
                audited event id); the figures are the event's ``metrics``
``blame``       ``version``, ``probes``, ``thresholds``, ``audit`` (the audit    –
                event it follows); ``metrics`` is ``BlameResult.to_json()``
==============  ==============================================================  ===========

Audit and blame events have ``parent`` = the audited version, on its branch.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

from kledger.ledger.records import Event

#: Bump when the definition of a recorded figure changes (see ``kledger.audit.figures``).
AUDIT_VERSION = 1
KINDS = ("probes", "thresholds", "audit", "blame")


def config_of(ev: Event) -> Mapping[str, Any]:
    """An audit event's config (``{}`` when it is not a mapping)."""
    return ev.config if isinstance(ev.config, Mapping) else {}


def is_kind(ev: Event, kind: str) -> bool:
    return ev.type == "audit" and config_of(ev).get("kind") == kind


def of_kind(events: Iterable[Event], kind: str) -> list[Event]:
    return [e for e in events if is_kind(e, kind)]


def latest(ledger, kind: str, where: Callable[[Event], bool] | None = None) -> Event | None:
    """The newest audit event of ``kind`` (that satisfies ``where``), or None."""
    for ev in ledger.events(types=["audit"]):
        if is_kind(ev, kind) and (where is None or where(ev)):
            return ev
    return None


def history(ledger, kind: str, versions: Iterable[str]) -> list[Event]:
    """Audit events of ``kind`` about any of ``versions``, oldest first."""
    versions = set(versions)
    return [e for e in of_kind(ledger.events(types=["audit"], newest_first=False), kind)
            if config_of(e).get("version") in versions]


def record_probes(ledger, data: bytes, sha256: str, summary: Mapping[str, Any], message: str,
                  parent: str | None = None) -> Event:
    return ledger.append("audit", config={"kind": "probes", "probes": sha256, "summary": dict(summary)},
                         message=message, delta=data, parent=parent)


def record_thresholds(ledger, thresholds: Mapping[str, float | None], message: str) -> Event:
    return ledger.append("audit", config={"kind": "thresholds", "thresholds": dict(thresholds)}, message=message)


def record_audit(ledger, version: Event, probes: str, thresholds: Mapping[str, float | None],
                 metrics: Mapping[str, Any], message: str) -> Event:
    return ledger.append(
        "audit", config={"kind": "audit", "audit_version": AUDIT_VERSION, "probes": probes,
                         "thresholds": dict(thresholds), "version": version.id},
        metrics=dict(metrics), parent=version.id, branch=version.branch, message=message)


def record_blame(ledger, version: Event, probes: str, thresholds: Mapping[str, float | None],
                 audit: str | None, metrics: Mapping[str, Any], message: str) -> Event:
    return ledger.append(
        "audit", config={"kind": "blame", "version": version.id, "probes": probes, "thresholds": dict(thresholds),
                         "audit": audit},
        metrics=dict(metrics), parent=version.id, branch=version.branch, message=message)
