"""Hardening found by an attack run (issue 13): nothing a command does may lose or silently
corrupt a ledger. One test (or a few) per numbered finding; each failed on the code before its fix."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import duckdb
import pytest
import torch

from conftest import (FAKE_MODEL, Params, append_edit, invoke, new_ledger, run_cli as run, run_on, sparse_delta,
                      weights)
from kledger.ledger.deltas import Delta, LowRankDelta, SparseDelta
from kledger.ledger.errors import IntegrityError, KledgerError, NumericalError, UsageError
from kledger.ledger.store import Ledger

PROMPT = "The Eiffel Tower is located in the city of"


def _add(led, *extra, target=" Rome"):
    return run(["--json", "add", PROMPT, target, "--subject", "The Eiffel Tower", "--set", "max_steps=2", *extra], led)


def _tree(path: Path) -> dict:
    """Every file under ``path`` with its bytes (what must survive a refused command)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# --- 1. export --force never removes what it did not write ------------------------------------
def test_export_force_never_removes_a_ledger_its_objects_the_base_model_or_the_cwd(led, tiny_llama_dir, tmp_path,
                                                                                   monkeypatch):
    assert _add(led).exit_code == 0
    ledger_files, model_files = _tree(led), _tree(tiny_llama_dir)
    monkeypatch.chdir(tmp_path)
    for target in (led, led / ".kledger", led / ".kledger" / "objects", led / ".kledger" / "cache",
                   tiny_llama_dir, tmp_path):
        r = invoke(["--ledger", str(led), "export", str(target), "--force"])
        assert r.exit_code == 2, (target, r.output)
        assert "kledger: error:" in r.output and str(target.name) in r.output, r.output
        assert _tree(led) == ledger_files and _tree(tiny_llama_dir) == model_files
    # a folder that carries kledger.json but holds a ledger is refused as well
    (led / "kledger.json").write_text("{}")
    assert invoke(["--ledger", str(led), "export", str(led), "--force"]).exit_code == 2
    assert _tree(led / ".kledger") == {k[len(".kledger/"):]: v for k, v in ledger_files.items()}


def test_export_force_replaces_only_a_previous_export_and_a_failed_export_keeps_it(led, tmp_path, monkeypatch):
    assert _add(led).exit_code == 0
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    r = run(["export", str(other), "--force"], led)
    assert r.exit_code == 2 and "kledger.json" in r.output and (other / "keep.txt").read_text() == "mine"
    out = tmp_path / "exp"
    assert run(["export", str(out)], led).exit_code == 0
    first = _tree(out)
    assert run(["export", str(out), "--at", "HEAD~1", "--force"], led).exit_code == 0
    assert json.loads((out / "kledger.json").read_text())["active_events"] == []

    import kledger.ledger.compose as compose

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(compose, "_write_export", boom)
    second = _tree(out)
    r = run(["export", str(out), "--force"], led)
    assert r.exit_code == 1 and "disk full" in r.output
    assert _tree(out) == second != first
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".exp")] == []
