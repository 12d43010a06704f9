"""``kledger.audit``: measuring models — drift, probes, the auditor, thresholds and reports.

Everything here measures a model it is given (materialised from the ledger by
``kledger.ledger.compose``) and records what it found as ``audit`` events
(``kledger.audit.events``: the schema, in one place). Nothing here computes an edit.

Modules, in import order (each imports only those above it):

* ``events``      the audit-event schema: kinds, configs, readers and writers;
* ``thresholds``  what each threshold bounds, the measured defaults, the recorded ones;
* ``drift``       weight-level drift of edited tensors (‖W−W₀‖, σ₁ growth);
* ``figures``     the function-level figures (perplexity, KL, retention) and the per-edit pulse;
* ``probes``      the probe set: default material, building it from the base model, storage;
* ``auditor``     audits of ledger versions and ``blame`` by bisection;
* ``report``      an HTML/PNG report read back from the ledger.
"""

from __future__ import annotations

import importlib

#: the package's public names → the module that defines them (imported on first use, so that
#: ``kledger.audit.events`` and ``kledger.audit.thresholds`` stay importable without torch)
_EXPORTS = {
    "Auditor": "auditor", "AuditResult": "auditor", "BlameResult": "auditor",
    "AUDIT_VERSION": "events",
    "PULSE_THRESHOLDS": "figures", "answers_hold": "figures", "edit_probes": "figures", "greedy_answers": "figures",
    "kl_to_base": "figures", "last_logprobs": "figures", "measure": "figures", "perplexity": "figures",
    "pulse": "figures",
    "ProbeSet": "probes", "build_probes": "probes", "find_or_build": "probes", "latest_probes_event": "probes",
    "load_probes": "probes",
    "DEFAULT_THRESHOLDS": "thresholds", "THRESHOLDS": "thresholds", "crossed": "thresholds",
    "parse_threshold": "thresholds", "record_thresholds": "thresholds", "stored_thresholds": "thresholds",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kledger.audit' has no attribute {name!r}")
    return getattr(importlib.import_module(f"kledger.audit.{module}"), name)
