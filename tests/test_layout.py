"""The layering the code is built on, checked on the source: who may import whom.

* ``ledger/`` (``kledger.ledger``) stores events and does arithmetic on deltas: it imports no
  editor, no audit code, no orchestrator, and never runs a model (no transformers, no forward pass);
* editors never touch the ledger store;
* nothing outside ``cli/`` imports ``kledger.cli``.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"ledger": "kledger.ledger", "editors": "kledger.editors", "audit": "kledger.audit",
            "kledger": "kledger", "cli": "kledger.cli"}


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def _modules(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("folder", sorted(PACKAGES))
def test_nothing_outside_cli_imports_the_cli(folder):
    if folder == "cli":
        return
    for path in _modules(folder):
        bad = sorted(m for m in _imports(path) if m == "kledger.cli" or m.startswith("kledger.cli."))
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_the_ledger_never_runs_a_model_nor_imports_the_layers_above():
    above = ("kledger.editors", "kledger.audit", "kledger.workspace", "kledger.editing", "kledger.rebase", "kledger.merging",
             "kledger.auditing", "kledger.cli", "transformers")
    for path in _modules("ledger"):
        bad = sorted(m for m in _imports(path) if m.startswith(above))
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"transformers|\.logits|forward\(", text), f"{path.relative_to(ROOT)} runs a model"


def test_editors_never_touch_the_ledger_store():
    for path in _modules("editors"):
        bad = sorted(m for m in _imports(path) if m.startswith(("kledger.ledger.store", "kledger.ledger.graph",
                                                                "kledger.ledger.rows", "kledger.workspace", "kledger.editing",
                                                                "kledger.audit")))
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"
