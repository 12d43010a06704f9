"""`kledger add --method memit|alphaedit [--blue]` through the CLI on tiny GPT-2 and Llama models."""

from __future__ import annotations

import json

import pytest

from conftest import invoke, run_cli as run
from kledger.ledger.store import Ledger

PROMPT = "The Eiffel Tower is located in the city of"
SUBJECT = "The Eiffel Tower"
FAST = ["--set", "layers=[0,1]", "--set", "stats_tokens=256", "--set", "stats_seq_len=16",
        "--set", "n_prefixes=2", "--set", "prefix_tokens=3", "--set", "v_steps=8"]


@pytest.fixture()
def led(tmp_path, tiny_dir):
    """Like conftest's ``led``, over both tiny models."""
    work = tmp_path / "work"
    work.mkdir()
    assert run(["init", "--model", str(tiny_dir), "--dir", str(work)]).exit_code == 0
    return work


@pytest.mark.parametrize("method", ["memit", "alphaedit"])
def test_add_locate_method_plain_and_blue_then_revert(led, method):
    r = run(["--json", "add", PROMPT, " Rome", "--subject", SUBJECT, "--method", method, *FAST], led)
    assert r.exit_code == 0, r.output
    plain = json.loads(r.output)[0]
    assert plain["method"] == method
    assert plain["metrics"]["stats_hit"] is False  # first edit computes the key statistics

    r = run(["--json", "add", PROMPT, " London", "--subject", SUBJECT, "--method", method, "--blue", *FAST], led)
    assert r.exit_code == 0, r.output
    blue = json.loads(r.output)[0]
    assert blue["metrics"]["stats_hit"] is True  # ... and the second one reuses them
    shown = json.loads(run(["--json", "show", blue["id"]], led).output)
    assert shown["config"]["blue"] is True
    assert shown["ensemble"]["z_layers"] == [0, 1]  # BLUE: v* at each boundary layer
    assert all(d["format"] == "lowrank" for d in shown["delta"].values())

    for eid in (blue["id"], plain["id"]):
        assert run(["revert", eid], led).exit_code == 0
    assert json.loads(run(["--json", "verify"], led).output)["ok"]


def test_blue_flag_needs_a_locate_method(led):
    n = Ledger.open(led).count()
    r = run(["add", PROMPT, " Rome", "--subject", SUBJECT, "--method", "kne", "--blue"], led)
    assert r.exit_code == 2 and "--blue: expected a locate-then-edit method" in r.output
    assert Ledger.open(led).count() == n


def test_help_lists_methods_with_summary_and_paper_link():
    r = invoke(["add", "--help"])
    assert r.exit_code == 0
    for name in ("kne", "memit", "alphaedit"):
        line = next(l for l in r.output.splitlines() if l.strip().startswith(name + ":"))
        assert "https://arxiv.org/abs/" in line, line
