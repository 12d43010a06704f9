"""CLI tests through click's CliRunner: the tour, bad inputs, faults and exit codes."""

from __future__ import annotations

import dataclasses
import json
import shutil

import duckdb
import pytest
import torch

from conftest import invoke, run_cli as run  # the `led` fixture is in conftest too
from kledger.editors import registry
from kledger.editors.base import Editor, EditResult
from kledger.ledger.deltas import Delta, SparseDelta
from kledger.ledger.store import Ledger

PROMPT = "The Eiffel Tower is located in the city of"


class _NaNEditor(Editor):
    """A broken editor: returns a delta with NaN values (must never be recorded)."""

    name, summary, paper = "nan", "test-only broken editor", "-"

    @dataclasses.dataclass(frozen=True)
    class config_cls:  # noqa: N801
        pass

    def compute(self, model, tok, requests, ctx):
        name = next(n for n, _ in model.named_parameters())
        return [EditResult(tuple(requests), Delta({name: SparseDelta((1,), torch.tensor([0]), torch.tensor([float("nan")]))}), {}, {})]




def _add(led, *extra, target=" Rome"):
    return run(["--json", "add", PROMPT, target, "--subject", "The Eiffel Tower", "--method", "kne", "--set", "max_steps=40",
                *extra], led)


def count(led) -> int:
    return Ledger.open(led).count()


def test_tour_add_log_show_revert_export(led, tmp_path):
    r = _add(led)
    assert r.exit_code == 0, r.output
    added = json.loads(r.output)
    assert len(added) == 1 and added[0]["type"] == "add"
    eid = added[0]["id"]
    r = run(["--json", "log"], led)
    log = json.loads(r.output)
    assert [e["type"] for e in log] == ["add", "init"] and log[0]["id"] == eid
    r = run(["--json", "show", eid[:6]], led)
    shown = json.loads(r.output)
    assert shown["method"] == "kne" and shown["request"]["target_new"] == " Rome"
    assert shown["delta"] and all(d["format"] == "sparse" for d in shown["delta"].values())
    assert shown["ensemble"] and shown["metrics"] and shown["active_at_head"] is True
    r = run(["--json", "revert", eid], led)
    assert r.exit_code == 0 and json.loads(r.output)["target"] == eid
    r = run(["--json", "verify"], led)
    assert r.exit_code == 0 and json.loads(r.output)["ok"]
    out = tmp_path / "export"
    r = run(["--json", "export", str(out), "--at", "HEAD~1"], led)
    assert r.exit_code == 0, r.output
    prov = json.loads((out / "kledger.json").read_text())
    assert prov["active_events"] == [eid]
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(out))
    assert m.config.model_type == "llama"


def test_revert_restores_base_exactly_through_cli(led, tiny_llama_dir):
    a = json.loads(_add(led).output)[0]["id"]
    b = json.loads(_add(led, target=" London").output)[0]["id"]
    assert run(["revert", a], led).exit_code == 0
    from kledger import Workspace
    from kledger.ledger.compose import apply_deltas

    ws = Workspace(Ledger.open(led), device="cpu")
    at_head, _, _ = ws.model_at("HEAD")
    only_b, _, _ = ws.load_base()
    apply_deltas(only_b, [ws.ledger.load_delta(ws.ledger.get(b))])
    for (n, p), (_, q) in zip(at_head.named_parameters(), only_b.named_parameters()):
        assert torch.equal(p, q), n
    assert run(["revert", b], led).exit_code == 0
    base, _, _ = ws.load_base()
    head, _, _ = ws.model_at("HEAD")
    for (n, p), (_, q) in zip(head.named_parameters(), base.named_parameters()):
        assert torch.equal(p, q), n


@pytest.mark.parametrize(
    "args, code, needle",
    [
        (["add", "", " Rome"], 2, "prompt must be a non-empty"),
        (["add", PROMPT, "  "], 2, "target must be a non-empty"),
        (["add", PROMPT, " Rome", "--subject", "Big Ben"], 2, "must occur in the prompt"),
        (["add", PROMPT, " Rome", "--method", "nosuch"], 2, "expected a method in"),
        (["add", PROMPT, " Rome", "--set", "nosuchfield=1"], 2, "unknown config field"),
        (["add", PROMPT], 2, "expected PROMPT and TARGET"),
        (["add", "--from-file", "/nonexistent.json"], 2, "found no file"),
        (["revert", "abcdef123456"], 1, "found none"),
        (["show", "zz"], 1, "expected an event id"),
        (["generate", PROMPT, "--at", "HEAD~5"], 1, "ancestors"),
    ],
)
def test_bad_input_is_one_line_with_exit_code_and_records_nothing(led, args, code, needle):
    before = count(led)
    r = run(args, led)
    assert r.exit_code == code, r.output
    assert needle in r.output and "Traceback" not in r.output
    assert count(led) == before


def test_revert_twice_is_an_error(led):
    eid = json.loads(_add(led).output)[0]["id"]
    assert run(["revert", eid], led).exit_code == 0
    n = count(led)
    r = run(["revert", eid], led)
    assert r.exit_code == 1 and "already reverted" in r.output
    assert count(led) == n


def test_revert_init_is_an_error(led):
    init_id = Ledger.open(led).get_seq(0).id
    r = run(["revert", init_id], led)
    assert r.exit_code == 1 and "expected an edit event" in r.output


def test_unknown_model_and_alias(tmp_path):
    r = run(["init", "--model", str(tmp_path / "missing"), "--dir", str(tmp_path / "w")])
    assert r.exit_code == 1 and "found no folder" in r.output
    r = run(["init", "--model", "no-such-alias", "--dir", str(tmp_path / "w")])
    assert r.exit_code == 1 and "aliases" in r.output


def test_model_with_other_fingerprint_is_refused(led, tmp_path, tiny_llama_dir):
    from conftest import build_tiny

    other = build_tiny(tmp_path / "other", "llama", seed=1)
    before = count(led)
    r = run(["add", PROMPT, " Rome", "--model", str(other)], led)
    assert r.exit_code == 1 and "fingerprint" in r.output
    assert count(led) == before
    # the same folder under another path is the same model: accepted
    copy = tmp_path / "copy"
    shutil.copytree(tiny_llama_dir, copy)
    r = run(["add", PROMPT, " Rome", "--method", "kne", "--set", "max_steps=2", "--model", str(copy)], led)
    assert r.exit_code == 0, r.output


def test_nan_delta_is_refused_and_nothing_recorded(led, monkeypatch):
    monkeypatch.setitem(registry.EDITORS, "nan", _NaNEditor)
    before = count(led)
    objects_before = sorted(Ledger.open(led).objects)
    r = run(["add", PROMPT, " Rome", "--method", "nan"], led)
    assert r.exit_code == 1 and "NaN" in r.output
    assert count(led) == before and sorted(Ledger.open(led).objects) == objects_before


def test_tampered_row_and_objects_fail_verify_with_exit_4(led):
    eid = json.loads(_add(led).output)[0]["id"]
    ledger = Ledger.open(led)
    assert run(["verify"], led).exit_code == 0
    obj = ledger.objects.path(ledger.get(eid).delta_sha256)
    data = obj.read_bytes()
    obj.chmod(0o644)
    obj.write_bytes(data[:-4] + b"\0\0\0\0")
    r = run(["verify"], led)
    assert r.exit_code == 4 and "row 1" in r.output and "corrupted" in r.output
    r = run(["export", str(led / "out")], led)
    assert r.exit_code == 4
    obj.unlink()
    r = run(["verify"], led)
    assert r.exit_code == 4 and "missing object" in r.output
    obj.write_bytes(data)
    assert run(["verify"], led).exit_code == 0
    con = duckdb.connect(str(ledger.db_path))
    con.execute("UPDATE events SET request = replace(request, 'Rome', 'Oslo') WHERE seq = 1")
    con.close()
    r = run(["verify"], led)
    assert r.exit_code == 4 and "row 1" in r.output and "changed" in r.output


def test_lock_busy_gives_exit_75_and_readers_keep_working(led, monkeypatch):
    monkeypatch.setenv("KLEDGER_LOCK_TIMEOUT", "0.3")
    eid = json.loads(_add(led).output)[0]["id"]
    ledger = Ledger.open(led)
    with ledger.write_lock():
        r = run(["--json", "log"], led)  # readers do not need the write lock
        assert r.exit_code == 0 and len(json.loads(r.output)) == 2
        r = run(["revert", eid], led)
        assert r.exit_code == 75 and "lock" in r.output
    assert ledger.count() == 2


def test_from_file_one_event_per_fact(led, tmp_path):
    facts = [
        {"prompt": PROMPT, "target_new": "Rome", "subject": "The Eiffel Tower", "ground_truth": "Paris",
         "rephrase_prompt": "Where is the Eiffel Tower? In the city of", "locality_prompt": "The capital of France is",
         "locality_ground_truth": "Paris"},
        {"prompt": "The mother tongue of Danielle Darrieux is", "target_new": "English", "subject": "Danielle Darrieux",
         "ground_truth": "French"},
    ]
    f = tmp_path / "facts.json"
    f.write_text(json.dumps(facts))
    r = run(["--json", "add", "--from-file", str(f), "--method", "kne", "--set", "max_steps=5"], led)
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert [e["request"]["target_new"] for e in out] == [" Rome", " English"]
    assert out[0]["request"]["target_true"] == " Paris"
    # sequential: the second edit's parent is the first
    ledger = Ledger.open(led)
    assert ledger.get(out[1]["id"]).parent == out[0]["id"]


def test_help_lists_methods_with_paper_links():
    r = invoke(["add", "--help"])
    assert r.exit_code == 0 and "kne:" in r.output and "arxiv.org" in r.output


def test_no_ledger_found_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KLEDGER_DIR", raising=False)
    r = invoke(["log"])
    assert r.exit_code == 1 and "kledger init" in r.output


def test_the_command_in_process_leaves_environment_and_logging_alone(led):
    """`cli` run inside another program (CliRunner here) changes neither the process environment
    nor the logging configuration; only the `kledger` program (`main`) sets those up."""
    import logging
    import os

    env = dict(os.environ)
    root = logging.getLogger()
    before = (list(root.handlers), root.level, logging.getLogger("transformers").level,
              logging.getLogger("kledger").level)
    r = run(["log"], led)
    assert r.exit_code == 0, r.output
    assert dict(os.environ) == env
    assert (list(root.handlers), root.level, logging.getLogger("transformers").level,
            logging.getLogger("kledger").level) == before
