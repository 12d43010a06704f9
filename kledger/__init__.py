"""kledger: lifelong knowledge editing with a versioned, append-only edit ledger.

The public Python API::

    from kledger import Workspace, FactRequest, init_ledger

    ledger = init_ledger("work", "smollm2-135m")
    ws = Workspace(ledger)
    [ev] = ws.add([FactRequest("The Eiffel Tower is located in the city of", " Rome",
                               subject="The Eiffel Tower")])
    ws.revert(ev.id)

The package holds the one orchestrator — ``kledger.workspace`` (editors meet the ledger there and
only there), ``kledger.rebase``, ``kledger.merging`` and ``kledger.auditing`` — over four
sub-packages installed under this namespace: ``kledger.ledger`` (storage and delta arithmetic;
never runs a model), ``kledger.editors`` (methods that compute deltas), ``kledger.audit``
(measuring models) and ``kledger.cli`` (the ``kledger`` command, a thin layer over this API).

Names are imported on first use, so ``import kledger`` (and the CLI's start-up) stays free of
torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

#: public name → the module that defines it
_EXPORTS = {
    "Workspace": "kledger.workspace", "init_ledger": "kledger.workspace", "compute_edit": "kledger.workspace",
    "FactRequest": "kledger.ledger.records", "Event": "kledger.ledger.records",
    "load_requests": "kledger.ledger.records",
    "Ledger": "kledger.ledger.store",
    "rebase_revert": "kledger.rebase",
    "STRATEGIES": "kledger.merging", "do_merge": "kledger.merging", "prepare_merge": "kledger.merging",
    "run_audit": "kledger.auditing",
}
_RENAMED = {"prepare_merge": "prepare"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kledger' has no attribute {name!r}")
    return getattr(importlib.import_module(module), _RENAMED.get(name, name))
