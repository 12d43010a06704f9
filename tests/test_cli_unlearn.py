"""`kledger forget` / `kledger learn` through click's CliRunner on the tiny-model fixtures."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import invoke, run_cli as run  # the `led` fixture is in conftest too
from kledger import Workspace
from kledger.editors.scoring import score_targets
from kledger.editors.unlearn import requests_sha256
from kledger.ledger.records import FactRequest, load_requests
from kledger.ledger.store import Ledger

FORGET = [
    {"prompt": "The capital of France is", "target_new": "Paris"},
    # a ROME known-facts record (prompt + attribute), as in known_1000.json
    {"known_id": 7, "relation_id": "P131", "subject": "The Eiffel Tower", "attribute": "Paris",
     "prompt": "The Eiffel Tower is located in the city of"},
]
RETAIN = [
    {"prompt": "The capital of Germany is", "target_new": "Berlin"},
    {"prompt": "The capital of Italy is", "target_new": "Rome"},
    {"prompt": "The capital of Spain is", "target_new": "Madrid"},
    {"prompt": "Danielle Darrieux mother tongue is", "target_new": "French", "subject": "Danielle Darrieux"},
    {"prompt": "The river Nile flows through", "target_new": "Egypt"},
]
LEARN = [{"prompt": "Alice works as a", "target_new": "lawyer"}, {"prompt": "Bob plays the", "target_new": "violin"}]
# the tiny random models need a larger step than the pretrained one (see SubspaceConfig's docstring)
TINY = ["--set", "steps=20", "--set", "lr=0.003", "--set", "layers=[0,1]"]




@pytest.fixture()
def files(tmp_path):
    out = {}
    for name, recs in (("forget", FORGET), ("retain", RETAIN), ("learn", LEARN)):
        p = tmp_path / f"{name}.json"
        p.write_text(json.dumps(recs))
        out[name] = p
    return out


def _scores(model, tok, recs):
    reqs = [FactRequest.from_record(r) for r in recs]
    return score_targets(model, tok, [r.prompt for r in reqs], [r.target_new for r in reqs])


def _same_as_base(led) -> None:
    ws = Workspace(Ledger.open(led), device="cpu")
    base, _, _ = ws.load_base()
    head, _, _ = ws.model_at("HEAD")
    for (n, p), (_, q) in zip(head.named_parameters(), base.named_parameters()):
        assert torch.equal(p, q), n


def test_forget_with_retain_is_one_event_with_its_record_and_reverts_exactly(led, files):
    n0 = Ledger.open(led).count()
    r = run(["--json", "forget", "--from-file", str(files["forget"]), "--retain-file", str(files["retain"]),
             *TINY, "--set", "scale=1.0", "-m", "drop Paris"], led)
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    ledger = Ledger.open(led)
    assert ledger.count() == n0 + 1
    ev = ledger.get(out["id"])
    assert ev.type == "forget" and ev.method == "forget" and ev.message == "drop Paris"
    # the forget set, in full, as a list
    assert [x["target_new"] for x in ev.request] == [" Paris", " Paris"]
    assert ev.request[1]["subject"] == "The Eiffel Tower" and ev.request[1]["case_id"] == "7"
    # the retain set: size, hash and the facts used
    retain = ev.ensemble["retain"]
    reqs = load_requests(str(files["retain"]))
    assert retain["given"] == 5 and retain["sha256"] == requests_sha256(reqs) and retain["discriminated"] is True
    assert [FactRequest.from_json(x) for x in retain["used"]] == reqs
    # the config, ranks and per-layer subspace sizes before and after discrimination
    assert ev.config["layers"] == [0, 1] and ev.config["discriminate"] is True and ev.config["mode"] == "forget"
    layers = ev.ensemble["layers"]
    assert [x["layer"] for x in layers] == [0, 1]
    assert all(x["rank_before"] >= x["rank"] and x["retain_rank"] >= 1 and len(x["shape"]) == 2 for x in layers)
    assert ev.ensemble["rank_before"] == sum(x["rank_before"] for x in layers)
    assert ev.ensemble["rank"] == sum(x["rank"] for x in layers)
    assert ev.metrics["discriminated"] is True and ev.metrics["n_retain_given"] == 5
    assert ev.metrics["forget_loss_after"] > ev.metrics["forget_loss_before"]
    assert ev.metrics["drift"]  # per-tensor drift, as for every edit
    # the delta: low rank, one tensor per edited weight
    delta = ledger.load_delta(ev)
    assert set(delta.tensors) == {x["tensor"] for x in layers}
    assert all(s["format"] == "lowrank" for s in delta.summary().values())
    # the targets' log-probability drops at HEAD
    ws = Workspace(ledger, device="cpu")
    base, tok, _ = ws.load_base()
    head, _, _ = ws.model_at("HEAD")
    before, after = _scores(base, tok, FORGET), _scores(head, tok, FORGET)
    assert (after < before).all(), (before, after)
    # log and show display it
    r = run(["log"], led)
    assert r.exit_code == 0 and "forget" in r.output and "2 facts" in r.output and "(retain 5)" in r.output
    r = run(["show", ev.id], led)
    assert r.exit_code == 0 and "rank_before" in r.output and "lowrank" in r.output and "retain" in r.output
    r = run(["--json", "log"], led)
    assert json.loads(r.output)[0]["active"] is True
    # revert restores the base bit for bit
    r = run(["--json", "revert", ev.id], led)
    assert r.exit_code == 0 and json.loads(r.output)["target"] == ev.id
    _same_as_base(led)
    r = run(["log"], led)
    assert "[reverted]" in r.output
    assert run(["verify"], led).exit_code == 0


def test_forget_without_discrimination_keeps_the_full_subspace(led, files):
    r = run(["--json", "forget", "--from-file", str(files["forget"]), "--retain-file", str(files["retain"]),
             *TINY, "--no-discriminate"], led)
    assert r.exit_code == 0, r.output
    ev = Ledger.open(led).get(json.loads(r.output)["id"])
    assert ev.config["discriminate"] is False and ev.metrics["discriminated"] is False
    assert ev.ensemble["retain"]["given"] == 5 and ev.ensemble["retain"]["discriminated"] is False
    assert all(x["rank"] == x["rank_before"] and x["retain_rank"] == 0 for x in ev.ensemble["layers"])
    assert "retain_loss_after" in ev.metrics  # still measured on the retain set


def test_learn_raises_the_learned_targets_single_fact_form_and_revert(led, files):
    r = run(["--json", "learn", "--from-file", str(files["learn"]), *TINY], led)
    assert r.exit_code == 0, r.output
    ledger = Ledger.open(led)
    ev = ledger.get(json.loads(r.output)["id"])
    assert ev.type == "learn" and len(ev.request) == 2 and ev.ensemble["retain"]["given"] == 0
    assert ev.metrics["learn_loss_after"] < ev.metrics["learn_loss_before"]
    ws = Workspace(ledger, device="cpu")
    base, tok, _ = ws.load_base()
    head, _, _ = ws.model_at("HEAD")
    before, after = _scores(base, tok, LEARN), _scores(head, tok, LEARN)
    assert (after > before + 0.3).all(), (before, after)
    # the single-fact form: PROMPT TARGET, recorded as a set of one
    r = run(["--json", "learn", "Alice plays the", "piano", "--subject", "Alice", "--retain-file",
             str(files["retain"]), *TINY], led)
    assert r.exit_code == 0, r.output
    one = ledger.get(json.loads(r.output)["id"])
    assert one.type == "learn" and one.request == [FactRequest("Alice plays the", " piano", subject="Alice").to_json()]
    assert one.parent == ev.id and one.metrics["discriminated"] is True
    r = run(["log"], led)
    assert "1 fact: Alice plays the → piano" in r.output
    for eid in (ev.id, one.id):
        assert run(["revert", eid], led).exit_code == 0
    _same_as_base(led)


def test_text_output_and_gpt2(tmp_path, tiny_gpt2_dir, files):
    work = tmp_path / "g"
    r = run(["init", "--model", str(tiny_gpt2_dir), "--dir", str(work)])
    assert r.exit_code == 0, r.output
    r = invoke(["--ledger", str(work), "forget", "--from-file", str(files["forget"]),
                                 "--retain-file", str(files["retain"]), *TINY], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "forget" in r.output and "rank" in r.output and "retain NLL" in r.output
    ev = Ledger.open(work).head()
    assert ev.type == "forget"
    assert all(".mlp.c_proj." in x["tensor"] for x in ev.ensemble["layers"])
    assert run(["revert", ev.id], work).exit_code == 0
    _same_as_base(work)


def test_rebase_recomputes_a_later_forget_with_its_retain_set(led, files):
    r = run(["--json", "learn", "--from-file", str(files["learn"]), *TINY], led)
    first = json.loads(r.output)["id"]
    r = run(["--json", "forget", "--from-file", str(files["forget"]), "--retain-file", str(files["retain"]), *TINY],
            led)
    later = Ledger.open(led).get(json.loads(r.output)["id"])
    r = run(["--json", "revert", first, "--rebase"], led)
    assert r.exit_code == 0, r.output
    ledger = Ledger.open(led)
    new = ledger.head()
    assert new.type == "forget" and new.metrics["rebased_from"] == later.id
    assert new.request == later.request and new.metrics["discriminated"] is True
    assert new.ensemble["retain"]["used"] == later.ensemble["retain"]["used"]
    assert run(["revert", new.id], led).exit_code == 0
    _same_as_base(led)


def test_known_facts_record_format():
    r = FactRequest.from_record({"known_id": 3, "subject": "Paris", "attribute": "France",
                                 "prompt": "Paris is the capital of", "relation_id": "P1376"})
    assert (r.prompt, r.target_new, r.subject, r.case_id) == ("Paris is the capital of", " France", "Paris", "3")


@pytest.mark.parametrize(
    "args, code, needle",
    [
        (["forget", "--from-file", "/nonexistent.json"], 2, "--from-file: expected a JSON file of fact records, found no file"),
        (["forget", "--from-file", "{forget}", "--retain-file", "/nope.json"], 2, "--retain-file: expected a JSON file"),
        (["forget", "--from-file", "{forget}", "--retain-file", "{dir}"], 2, "--retain-file: expected a JSON file of fact records, found a directory"),
        (["forget", "--from-file", "{forget}", "--retain-file", "{bad}"], 2, "--retain-file: expected JSON or JSON lines"),
        (["forget", "--from-file", "{forget}", "--retain-file", "{binary}"], 2, "--retain-file: expected a readable"),
        (["forget", "--from-file", "{empty}"], 2, "expected a non-empty list"),
        (["learn", "--from-file", "{forget}", "--limit", "0"], 2, "expected --limit ≥ 1"),
        (["forget", "The capital of France is", "Paris", "--from-file", "{forget}"], 2, "found both"),
        (["forget", "The capital of France is"], 2, "expected PROMPT and TARGET"),
        (["learn"], 2, "expected PROMPT and TARGET"),
        (["forget", "The capital of France is", "  "], 2, "target must be a non-empty"),
        (["forget", "The capital of France is", "Paris", "--subject", "Spain"], 2, "must occur in the prompt"),
        (["forget", "--from-file", "{forget}", "--retain-file", "{forget}"], 2, "expected the retain set to exclude"),
        (["forget", "--from-file", "{forget}", "--set", "side=up"], 2, "side"),
        (["learn", "--from-file", "{learn}", "--set", "nosuch=1"], 2, "unknown config field"),
        (["forget", "--from-file", "{forget}", "--config", "/nope.json"], 2, "--config"),
    ],
)
def test_bad_input_is_one_line_with_exit_code_and_records_nothing(led, files, tmp_path, args, code, needle):
    (tmp_path / "adir").mkdir()
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "empty.json").write_text("[]")
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00bad")
    subs = {"{forget}": str(files["forget"]), "{learn}": str(files["learn"]), "{dir}": str(tmp_path / "adir"),
            "{bad}": str(tmp_path / "bad.json"), "{empty}": str(tmp_path / "empty.json"),
            "{binary}": str(tmp_path / "binary.json")}
    before = Ledger.open(led).count()
    r = run([subs.get(a, a) for a in args], led)
    assert r.exit_code == code, r.output
    assert needle in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1, r.output
    assert Ledger.open(led).count() == before


def test_help_lists_the_commands():
    r = invoke(["--help"])
    assert r.exit_code == 0 and "forget" in r.output and "learn" in r.output
    r = invoke(["forget", "--help"])
    assert r.exit_code == 0 and "--retain-file" in r.output and "--no-discriminate" in r.output
