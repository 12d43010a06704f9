"""Files an editor's config names (``Editor.input_files``: UltraEdit's ``preserve_facts``, UNLEARN's
``retain_file``) are recorded with each event by absolute path and sha256, and a recompute
(``revert --rebase``, ``merge --strategy resolve``) reads that path, from any working directory, and
refuses a file whose content changed."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli
from kledger.editing import input_digests, make_editor, recompute_config
from kledger.ledger.canonical import file_sha256
from kledger.ledger.errors import StateError, UsageError
from kledger.ledger.records import FactRequest

REQS = [
    FactRequest("The Eiffel Tower is located in the city of", "Rome", subject="The Eiffel Tower"),
    FactRequest("Danielle Darrieux mother tongue", "English", subject="Danielle Darrieux"),
    FactRequest("Steve Jobs founded", "Microsoft", subject="Steve Jobs"),
]
FACTS = [{"prompt": "The Eiffel Tower is in", "attribute": "Paris"}, ["Bob Jones plays", " tennis"]]
CFG = dict(lr=2.0, ridge=1e-2, max_turns=2, stats_tokens=128, preserve_weight=1.0, facts_weight=10.0,
           preserve_facts="facts.json")


def _workspace(path, model_dir):
    from kledger import Workspace, init_ledger

    return Workspace(init_ledger(path, str(model_dir)), device="cpu")


def test_input_digests_name_the_absolute_path_and_refuse_a_missing_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    editor = make_editor("ultraedit", CFG)
    with pytest.raises(UsageError, match=r"expected a file at preserve_facts='facts.json', found none"):
        input_digests(editor)
    (tmp_path / "facts.json").write_text(json.dumps(FACTS))
    got = input_digests(editor)
    assert got == {"preserve_facts": {"path": str(tmp_path / "facts.json"),
                                      "sha256": file_sha256(tmp_path / "facts.json")}}
    assert input_digests(make_editor("ultraedit", {})) == {}  # nothing named, nothing recorded


def test_rebase_reads_the_recorded_path_and_refuses_a_changed_file(tmp_path, tiny_llama_dir, monkeypatch):
    """Edits made with a relative ``preserve_facts`` in one directory are recomputed by a rebase run
    from another (before the fix: the relative path was looked up again and not found), and a
    rebase refuses — before any work, nothing appended — once the file's content changed."""
    work = tmp_path / "work"
    work.mkdir()
    facts = work / "facts.json"
    facts.write_text(json.dumps(FACTS))
    monkeypatch.chdir(work)
    ws = _workspace(tmp_path / "led", tiny_llama_dir)
    evs = ws.add(REQS, method="ultraedit", overrides=CFG)
    rec = {"path": str(facts), "sha256": file_sha256(facts)}
    assert all(e.ensemble["inputs"] == {"preserve_facts": rec} for e in evs)
    assert evs[0].config["preserve_facts"] == "facts.json"  # the config as given; the record resolves it
    assert recompute_config(evs[2])["preserve_facts"] == str(facts)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    facts.write_text(json.dumps(FACTS[:1]))
    n_events = len(ws.ledger.events())
    r = run_cli(["--device", "cpu", "revert", evs[1].id, "--rebase"], tmp_path / "led")
    assert r.exit_code != 0
    assert f"event {evs[2].id} was computed with preserve_facts='{facts}'" in r.output
    assert f"found content with sha256 {file_sha256(facts)[:16]}" in r.output
    assert len(ws.ledger.events()) == n_events
    facts.unlink()
    with pytest.raises(StateError, match="found no file: restore that file"):
        recompute_config(evs[2])

    facts.write_text(json.dumps(FACTS))  # restored: the rebase runs from this other directory
    r = run_cli(["--json", "--device", "cpu", "revert", evs[1].id, "--rebase"], tmp_path / "led")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output[r.output.index("{"):])
    assert out["recomputed"] == 1
    [new] = ws.ledger.events_by_ids(out["added"])
    assert new.ensemble["inputs"] == {"preserve_facts": rec} and new.metrics["rebased_from"] == evs[2].id


def test_a_config_recorded_before_facts_weight_is_recomputed_without_known_facts(tmp_path, tiny_llama_dir):
    """``facts_weight`` came with a default of 5000 (sampled facts); an event whose recorded config predates
    the field was computed without it, so a recompute reads it as 0 (``Editor.recorded_defaults``)."""
    import dataclasses

    ws = _workspace(tmp_path / "led", tiny_llama_dir)
    [ev] = ws.add(REQS[:1], method="ultraedit", overrides=dict(lr=2.0, ridge=1e-2, max_turns=1, facts_weight=0.0))
    assert ev.config["facts_weight"] == 0.0
    old = dataclasses.replace(ev, config={k: v for k, v in ev.config.items() if k != "facts_weight"})
    assert recompute_config(old)["facts_weight"] == 0.0
    now = dataclasses.replace(ev, config=dict(ev.config, facts_weight=5000.0))
    assert recompute_config(now)["facts_weight"] == 5000.0


@pytest.mark.parametrize("method, absent, meant", [
    ("memit", ("mpes_steps", "norm_anchor", "norm_penalty"), {"mpes_steps": -1, "norm_anchor": False}),
    ("alphaedit", ("mpes_steps", "norm_anchor"), {"mpes_steps": -1, "norm_anchor": False}),
    ("kne", ("window",), {"window": "all"}),
])
def test_fields_added_with_new_defaults_recompute_old_events_as_they_were(method, absent, meant):
    """MPES / NAS became MEMIT's and AlphaEdit's defaults, the early window KNE's: an event recorded before
    those fields existed is recomputed with what it was computed with, one recorded after keeps its value."""
    import dataclasses

    from kledger.editors.base import config_to_json
    from kledger.editors.registry import editor_class
    from kledger.ledger.records import Event

    cfg = config_to_json(editor_class(method).config_cls())
    fields = {f.name for f in dataclasses.fields(Event)}
    base = {f: None for f in fields}
    ev = Event(**{**base, "method": method, "config": {k: v for k, v in cfg.items() if k not in absent}})
    got = recompute_config(ev)
    assert {k: got[k] for k in meant} == meant
    assert {k: recompute_config(dataclasses.replace(ev, config=cfg))[k] for k in meant} == {k: cfg[k] for k in meant}
    assert all(cfg[k] != v for k, v in meant.items())  # the defaults did change
