"""Every command's --json output has a documented shape: docs/schemas/<command>.schema.json (JSON
Schema 2020-12), checked here against real output (issue 14)."""

from __future__ import annotations

import json
import pathlib

import pytest

from conftest import add_fact, append_edit, invoke, sparse_delta
from kledger.cli.main import COMMANDS

jsonschema = pytest.importorskip("jsonschema")
DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs" / "schemas"


def _check(command: str, output: str):
    data = json.loads(output)
    schema = json.loads((DOCS / f"{command}.schema.json").read_text())
    jsonschema.Draft202012Validator(schema).validate(data)
    return data


def test_a_valid_schema_per_command():
    assert sorted(p.name.removesuffix(".schema.json") for p in DOCS.glob("*.schema.json")) == sorted(COMMANDS)
    for p in DOCS.glob("*.schema.json"):
        jsonschema.Draft202012Validator.check_schema(json.loads(p.read_text()))


def test_ledger_commands_match_their_schemas(fake_ledger):
    L = fake_ledger

    def run(*args):
        r = invoke([*args, "--json", "--ledger", L.root], catch_exceptions=False)
        assert r.exit_code == 0, r.output
        return _check(args[0], r.output)

    e1 = append_edit(L, sparse_delta("a", [1], [0.5]), "The sky is", " green")
    append_edit(L, sparse_delta("b", [2], [0.5]), "The grass is", " red")
    assert len(run("log")) == 3
    run("show", "HEAD")
    run("status")
    run("verify")
    run("revert", e1.id)
    run("tag", "v1", "HEAD~1")
    assert run("tags")[0]["tag"] == "v1"
    assert run("diff", "v1", "HEAD")["only_a"][0]["id"] == e1.id
    run("diff", "v1", "--name-only")
    run("branch", "side")
    run("switch", "side")
    add_fact(L, "Alice", "Paris", sparse_delta("a", [5], [1.0]))
    run("switch", "main")
    run("branches")
    run("merge", "side", "--dry-run")
    run("merge", "side")


def test_model_commands_match_their_schemas(led, tmp_path):
    from kledger.ledger.deltas import Delta, LowRankDelta
    from kledger.ledger.store import Ledger

    import torch

    def run(*args):
        r = invoke([*args, "--json", "--ledger", led], catch_exceptions=False)
        assert r.exit_code == 0, r.output
        return _check(args[0], r.output)

    r = invoke(["init", "--model", Ledger.open(led).base_model()["path"], "--dir", tmp_path / "other", "--json",
                "--dtype", "bfloat16"], catch_exceptions=False)
    base = _check("init", r.output)["base_model"]
    assert base["dtype"] == "bfloat16"
    for p in DOCS.glob("*.schema.json"):  # every schema documents every field init records
        documented = json.loads(p.read_text()).get("$defs", {}).get("base_model", {}).get("properties")
        assert documented is None or set(base) <= set(documented), (p.name, sorted(set(base) - set(documented)))
    run("add", "The Eiffel Tower is located in the city of", " Rome", "--method", "kne", "--set", "max_steps=2")
    run("generate", "The sky is", "-n", "2")
    run("export", tmp_path / "full")
    L = Ledger.open(led)
    run("revert", "HEAD")
    g = torch.Generator().manual_seed(0)
    append_edit(L, Delta({"model.layers.0.mlp.down_proj.weight": LowRankDelta(
        (32, 64), torch.randn(32, 2, generator=g), torch.randn(64, 2, generator=g))}), "The sky is", " green")
    run("export", tmp_path / "adapter", "--format", "peft")
