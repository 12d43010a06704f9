"""bench/lifelong.py's bookkeeping: the time per edit of a run that was stopped and resumed."""

from __future__ import annotations

import importlib.util
import json
import pathlib

BENCH = pathlib.Path(__file__).resolve().parent.parent / "bench" / "lifelong.py"


def _bench():
    spec = importlib.util.spec_from_file_location("lifelong_bench", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_spent_counts_every_logged_batch_and_carries_an_older_run_over(tmp_path):
    L = _bench()
    run = tmp_path / "new"
    run.mkdir()
    assert L._spent(run, 0) == 0.0  # a new run: an empty carry-over line
    with open(run / "batches.jsonl", "a") as fh:
        for edits, s in ((10, 5.0), (20, 6.0), (30, 7.0)):
            fh.write(json.dumps({"edits": edits, "s": s}) + "\n")
    assert L._spent(run, 30) == 18.0 and L._spent(run, 20) == 11.0
    old = tmp_path / "old"  # from before the log: its audited windows are carried over once
    old.mkdir()
    (old / "rows.jsonl").write_text(json.dumps({"edits": 100, "edit_s_window": 250.0}) + "\n")
    assert L._spent(old, 130) == 250.0
    assert json.loads((old / "batches.jsonl").read_text())["from"] == "audited windows"
    assert L._spent(old, 130) == 250.0  # not carried twice


def test_sampled_facts_leave_out_the_probe_subjects_by_default_and_when_set():
    from kledger.audit.probes import probe_subjects

    L = _bench()
    assert L.sampled_facts_exclude("ultraedit", {}) == probe_subjects()  # the default samples facts
    assert L.sampled_facts_exclude("ultraedit", {"facts_weight": "5000"}) == probe_subjects()
    assert L.sampled_facts_exclude("ultraedit", {"facts_weight": "0"}) is None
    assert L.sampled_facts_exclude("ultraedit", {"preserve_facts": "f.json"}) is None
    assert L.sampled_facts_exclude("memit", {}) is None
