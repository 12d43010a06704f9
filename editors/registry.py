"""The one explicit editor registry: method name → editor class (imported lazily).

Variants such as BLUE are config fields of their method, not separate entries.
"""

from __future__ import annotations

import importlib

from kledger.ledger.errors import UsageError

#: name → "module:Class". Add new methods here.
EDITORS: dict[str, "str | type"] = {
    "kne": "kledger.editors.kne:KNEEditor",
    "forget": "kledger.editors.unlearn:UnlearnEditor",
    "learn": "kledger.editors.unlearn:LearnEditor",
    "memit": "kledger.editors.memit:MEMITEditor",
    "alphaedit": "kledger.editors.alphaedit:AlphaEditEditor",
    "ultraedit": "kledger.editors.ultraedit:UltraEditEditor",
    "memory": "kledger.editors.memory:MemoryEditor",
}


#: the method ``kledger add`` and ``Workspace.add`` use unless told otherwise (bench/results/lifelong.md)
DEFAULT_METHOD = "memory"


def editor_class(name: str):
    if name not in EDITORS:
        raise UsageError(f"expected a method in {sorted(EDITORS)}, found {name!r}")
    entry = EDITORS[name]
    if not isinstance(entry, str):  # a class registered directly (plugins, tests)
        return entry
    module, cls = entry.split(":")
    return getattr(importlib.import_module(module), cls)
