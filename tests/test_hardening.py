"""Hardening found by an attack run (issue 13): nothing a command does may lose or silently
corrupt a ledger. One test (or a few) per numbered finding; each failed on the code before its fix."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from conftest import (FAKE_MODEL, Params, append_edit, invoke, new_ledger, run_cli as run, run_on, sparse_delta,
                      sql, weights)
from kledger.ledger.deltas import Delta, LowRankDelta, SparseDelta
from kledger.ledger.errors import IntegrityError, KledgerError, NumericalError, UsageError
from kledger.ledger.store import Ledger

PROMPT = "The Eiffel Tower is located in the city of"


def _add(led, *extra, target=" Rome"):
    return run(["--json", "add", PROMPT, target, "--subject", "The Eiffel Tower", "--method", "kne", "--set", "max_steps=2",
                *extra], led)


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


# --- 3. every row a command uses is hash-checked -----------------------------------------------


def _swap_deltas(L: Ledger, a, b) -> None:
    sql(L, "UPDATE events SET delta_sha256 = ? WHERE seq = ?", [b.delta_sha256, a.seq])
    sql(L, "UPDATE events SET delta_sha256 = ? WHERE seq = ?", [a.delta_sha256, b.seq])


def test_swapped_delta_hashes_are_refused_by_materialise_and_revert(fake_ledger):
    L = fake_ledger
    a = append_edit(L, sparse_delta("a", [0, 1], [1.0, 2.0]), "fact a")
    b = append_edit(L, sparse_delta("a", [5], [7.0]), "fact b")
    _swap_deltas(L, a, b)
    assert not L.verify().ok
    with pytest.raises(IntegrityError, match=f"row {a.seq} .*event {a.id}"):
        weights(L)
    with pytest.raises(IntegrityError, match=f"event {a.id}"):
        L.revert(a.id)
    with pytest.raises(IntegrityError, match=f"event {a.id}"):
        L.load_delta(L.get(a.id))
    r = run_on(L, "revert", b.id)
    assert r.exit_code == 4 and b.id in r.output, r.output
    assert L.count() == 3  # nothing was appended


def test_changed_revert_target_is_refused(fake_ledger):
    L = fake_ledger
    a = append_edit(L, sparse_delta("a", [0], [1.0]), "fact a")
    b = append_edit(L, sparse_delta("a", [5], [7.0]), "fact b")
    rv = L.revert(a.id)
    sql(L, "UPDATE events SET target = ? WHERE seq = ?", [b.id, rv.seq])  # now it seems to revert b
    with pytest.raises(IntegrityError, match=f"row {rv.seq}"):
        weights(L)


# --- 4. nothing non-finite is ever materialised; verify decodes every object ---------------------
def test_overflowing_sums_are_refused(fake_ledger):
    L = fake_ledger
    append_edit(L, sparse_delta("a", [3], [3e38]), "big 1")
    append_edit(L, sparse_delta("a", [3], [3e38]), "big 2")
    with pytest.raises(NumericalError, match="a"):
        weights(L)
    L2 = new_ledger(L.root.parent / "two")
    u = torch.zeros(6, 1)
    u[0, 0] = 1e20
    v = torch.zeros(8, 1)
    v[0, 0] = 1e20
    append_edit(L2, Delta({"a": LowRankDelta((6, 8), u, v)}), "rank one")
    with pytest.raises(NumericalError, match="not finite"):
        weights(L2)


def _raw_delta(name: str, shape, indices, values) -> bytes:
    """A delta object that skips ``Delta``'s validation (as a forger would write it)."""
    from safetensors.torch import save

    meta = {"kledger_delta": "1", "tensors": json.dumps({name: {"format": "sparse", "shape": list(shape)}})}
    return save({f"{name}::indices": torch.tensor(indices, dtype=torch.int64),
                 f"{name}::values": torch.tensor(values, dtype=torch.float32)}, metadata=meta)


@pytest.mark.parametrize("indices, values, word", [([100], [1.0], "outside"), ([1], [float("inf")], "NaN or Inf")])
def test_verify_decodes_every_object(fake_ledger, indices, values, word):
    L = fake_ledger
    ev = append_edit(L, _raw_delta("a", (6, 8), indices, values), "forged")
    rep = L.verify()
    assert not rep.ok and rep.bad_row == ev.seq and word in rep.problem, rep.problem
    assert L.verify(check_objects=False).ok


# --- 2. snapshots are bound to the ledger, and verify checks them --------------------------------
def _snap_ledger(tmp_path):
    from conftest import SHAPES

    L = new_ledger(tmp_path)
    for i, (name, idx) in enumerate((("a", [1, 2]), ("b", [3]), ("a", [7]))):
        append_edit(L, sparse_delta(name, idx, [1.0 + i] * len(idx)), f"fact {i}")
    return L


def _mat(L, **kw):
    from kledger.ledger.compose import materialise

    m = Params()
    materialise(L, m, "HEAD", chunk=2, **kw)
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def test_a_tampered_snapshot_never_changes_the_model_and_verify_reports_it(tmp_path):
    from safetensors.torch import load, save

    L = _snap_ledger(tmp_path)
    exact = _mat(L, snapshots=False)
    _mat(L)  # writes (and records) the snapshot of the first 2 events
    (path,) = (L.cache_dir / "snapshots").glob("*.safetensors")
    assert L.verify().ok
    tensors = load(path.read_bytes())
    tensors["a"] = tensors["a"] + 1.0  # a touched tensor changed
    tensors["zz"] = torch.ones(3)  # and one no event touches
    data = save(tensors, metadata=__import__("safetensors").safe_open(str(path), "pt").metadata())
    path.write_bytes(data)
    path.with_suffix(".sha256").write_text(__import__("hashlib").sha256(data).hexdigest() + "\n")
    rep = L.verify()
    assert not rep.ok and "snapshot" in rep.problem and path.name in rep.problem, rep.to_json()
    r = run_on(L, "verify")
    assert r.exit_code == 4 and path.name in r.output
    got = _mat(L)
    assert all(torch.equal(got[k], exact[k]) for k in exact)


def test_verify_says_it_does_not_recompute_snapshots_unless_deep(tmp_path):
    L = _snap_ledger(tmp_path)
    _mat(L)
    rep = L.verify()
    assert rep.ok and rep.snapshots_checked == 1 and rep.snapshots_recomputed == 0
    r = run_on(L, "verify")
    assert r.exit_code == 0 and "verify --deep" in r.output


def test_verify_deep_recomputes_snapshots(tmp_path):
    from safetensors.torch import load, save

    L = _snap_ledger(tmp_path)
    _mat(L)
    rep = L.verify(deep_model=Params())
    assert rep.ok and rep.snapshots_recomputed == 1, rep.to_json()
    # forged with the ledger's own record updated too: only recomputing finds it
    (path,) = (L.cache_dir / "snapshots").glob("*.safetensors")
    tensors = load(path.read_bytes())
    tensors["a"] = tensors["a"] * 2
    data = save(tensors, metadata=__import__("safetensors").safe_open(str(path), "pt").metadata())
    path.write_bytes(data)
    rec = L.snapshot_record(path.name) | {"sha256": __import__("hashlib").sha256(data).hexdigest()}
    sql(L, "UPDATE snapshots SET record = ?", [json.dumps(rec)])
    assert L.verify().ok
    rep = L.verify(deep_model=Params())
    assert not rep.ok and "differs" in rep.problem


# --- 5. branch names never hide event ids; revert/show say what a ref resolved to --------------
@pytest.mark.parametrize("name", ["e5d6bf950df7", "beef", "BEEF12", "HEAD", "", " ", "a~1", "a^", "a..b", "/a", "a/",
                                  "a b", "tab\tx", "-x"])
def test_branch_names_that_could_hide_a_ref_are_refused(fake_ledger, name):
    with pytest.raises(UsageError):
        fake_ledger.create_branch(name)
    assert fake_ledger.count() == 1


def test_revert_and_show_say_which_event_a_ref_resolved_to(fake_ledger):
    L = fake_ledger
    a = append_edit(L, sparse_delta("a", [0], [1.0]), "fact a")
    append_edit(L, sparse_delta("a", [1], [1.0]), "fact b")
    r = run_on(L, "show", "HEAD~1")
    assert r.exit_code == 0 and f"HEAD~1 → {a.id}" in r.output.splitlines()[0], r.output
    r = run_on(L, "revert", "HEAD~1")
    assert r.exit_code == 0 and f"HEAD~1 → {a.id}" in r.output, r.output
    r = run_on(L, "--json", "revert", "HEAD~1")  # HEAD~1 is now the second add
    assert json.loads(r.output)["resolved"]["ref"] == "HEAD~1"


# --- 7. a damaged database is an integrity failure, not "busy" -----------------------------------
@pytest.mark.parametrize("damage", ["garbage", "truncate", "flip"])
def test_a_damaged_database_exits_4_not_75(fake_ledger, damage):
    L = fake_ledger
    for i in range(3):
        append_edit(L, sparse_delta("a", [i], [1.0]), f"fact {i}")
    data = bytearray(L.db_path.read_bytes())
    if damage == "garbage":
        data = bytearray(b"not a database at all" * 100)
    elif damage == "truncate":
        data = data[: len(data) // 3]
    else:
        import random

        rnd = random.Random(0)
        for _ in range(200):
            data[rnd.randrange(4096, len(data))] ^= 0xFF
    L.db_path.write_bytes(bytes(data))
    for args in (["log"], ["verify"], ["status"]):
        r = run_on(L, *args)
        assert r.exit_code in (0, 4), (args, r.exit_code, r.output)
        if damage != "flip":
            assert r.exit_code == 4 and "ledger.duckdb" in r.output, (args, r.output)


# --- 9. KLEDGER_DEBUG shows the traceback and keeps the exit code -------------------------------
def test_debug_keeps_the_exit_code(fake_ledger, monkeypatch):
    L = fake_ledger
    a = append_edit(L, sparse_delta("a", [0], [1.0]), "fact a")
    sql(L, "UPDATE events SET message = 'x' WHERE seq = ?", [a.seq])
    monkeypatch.setenv("KLEDGER_DEBUG", "1")
    r = invoke(["--ledger", str(L.root), "revert", a.id])
    assert r.exit_code == 4 and "Traceback" in r.output and "IntegrityError" in r.output, r.output


# --- 12. input validation: one-line usage errors, nothing recorded ------------------------------
@pytest.mark.parametrize("args", [["log", "-n", "-1"], ["log", "-n", "99999999999999999999"], ["show", ""],
                                  ["show", "   "], ["branch", "a\udcff"], ["revert", "\udcff"]])
def test_bad_arguments_are_usage_errors(fake_ledger, args):
    r = invoke(["--ledger", str(fake_ledger.root), *args])
    assert r.exit_code == 2 and r.output.count("rror: ") == 1, r.output  # one error line (click adds usage)
    assert "Traceback" not in r.output and fake_ledger.count() == 1


def test_a_huge_head_file_is_not_echoed(fake_ledger):
    (fake_ledger.root / "HEAD").write_text("x" * 100_000)
    r = invoke(["--ledger", str(fake_ledger.root), "status"])
    assert r.exit_code != 0 and len(r.output) < 400, len(r.output)


@pytest.mark.parametrize("record, word", [({"prompt": "p q", "target_new": "x", "subject": 5}, "subject"),
                                          ({"prompt": 5, "target_new": "x"}, "prompt"),
                                          ({"prompt": "p", "target_new": ["x"]}, "target"),
                                          ({"prompt": "p", "target_new": "x", "rephrase_prompts": [1]}, "rephrase"),
                                          ({"prompt": "p \udcff", "target_new": "x"}, "UTF-8")])
def test_wrong_field_types_in_records_are_usage_errors(tmp_path, record, word):
    from kledger.ledger.records import load_requests

    f = tmp_path / "facts.json"
    f.write_text(json.dumps([record]))
    with pytest.raises(UsageError, match=word):
        load_requests(str(f))


def test_add_limit_must_not_be_negative(led, tmp_path):
    f = tmp_path / "facts.json"
    f.write_text(json.dumps([{"prompt": PROMPT, "target_new": " Rome"}] * 2))
    r = run(["add", "--from-file", str(f), "--limit", "-1"], led)
    assert r.exit_code == 2 and Ledger.open(led).count() == 1


# --- 10. links inside .kledger/ are refused, never followed ------------------------------------
def test_a_linked_lock_file_or_object_folder_is_refused(fake_ledger, tmp_path):
    L = fake_ledger
    outside = tmp_path / "outside.txt"
    outside.write_text("precious")
    (L.root / "write.lock").unlink(missing_ok=True)
    (L.root / "write.lock").symlink_to(outside)
    with pytest.raises(IntegrityError, match="write.lock"):
        append_edit(L, sparse_delta("a", [0], [1.0]), "fact")
    assert outside.read_text() == "precious" and L.count() == 1
    rep = L.verify()
    assert not rep.ok and "write.lock" in rep.problem
    (L.root / "write.lock").unlink()
    d = sparse_delta("a", [1], [2.0])
    sha = __import__("hashlib").sha256(d.to_bytes()).hexdigest()
    far = tmp_path / "far"
    far.mkdir()
    (L.objects.root / sha[:2]).symlink_to(far, target_is_directory=True)
    with pytest.raises(IntegrityError, match="link"):
        append_edit(L, d, "fact")
    assert list(far.iterdir()) == [] and L.count() == 1
    assert "link" in L.verify().problem


# --- 8. the tokenizer is part of the base model's identity --------------------------------------
def test_a_changed_tokenizer_is_refused(tmp_path, tiny_llama_dir):
    from kledger.ledger.errors import ModelMismatchError
    from kledger.workspace import Workspace, init_ledger

    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    ledger = init_ledger(tmp_path, str(model))
    assert ledger.base_model()["tokenizer_fingerprint"]
    Workspace(ledger).load_base()
    tj = json.loads((model / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    vocab["Paris"], vocab["Rome"] = vocab["Rome"], vocab["Paris"]
    (model / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(ModelMismatchError, match="tokenizer"):
        Workspace(ledger).load_base()


# --- 6. a batch stopped part-way says what it recorded; a moved head is retryable (75) ----------
def test_a_moved_head_is_a_retryable_conflict(fake_ledger):
    L = fake_ledger
    head = L.head().id
    append_edit(L, sparse_delta("a", [0], [1.0]), "other writer")
    with pytest.raises(KledgerError) as info:
        append_edit(L, sparse_delta("a", [1], [1.0]), "mine", expect_head=head)
    assert info.value.exit_code == 75 and "moved" in str(info.value)


@pytest.mark.parametrize("stop, code", [(KeyboardInterrupt, 130), (IntegrityError("boom"), 4)])
def test_a_batch_stopped_part_way_reports_what_it_recorded(led, tmp_path, monkeypatch, stop, code):
    from kledger.workspace import Workspace

    def add(self, requests, on_event=None, **kw):
        ev = append_edit(self.ledger, None, "recorded first")
        on_event(ev)
        raise stop

    monkeypatch.setattr(Workspace, "add", add)
    f = tmp_path / "facts.json"
    f.write_text(json.dumps([{"prompt": PROMPT, "target_new": " Rome"}] * 3))
    r = invoke(["--ledger", str(led), "add", "--from-file", str(f), "--method", "kne"])
    ev = Ledger.open(led).head()
    assert r.exit_code == code and f"after recording 1 event(s): {ev.id}" in r.output, r.output
    assert "nothing was recorded" not in r.output


def test_a_prompt_longer_than_the_context_is_a_usage_error(led):
    """Issue 13.11: a prompt past the model's context is refused (exit 2) before any work."""
    from conftest import run_cli

    long_prompt = "The Eiffel Tower " * 200  # the tiny model's context is 64 positions
    r = run_cli(["add", long_prompt.strip(), " Rome", "--subject", "Eiffel Tower"], led)
    assert r.exit_code == 2 and "context of 64 tokens" in r.output
    r = run_cli(["generate", long_prompt.strip()], led)
    assert r.exit_code == 2 and "context of 64 tokens" in r.output
    r = run_cli(["--json", "log"], led)
    assert r.output.count('"type": "add"') == 0


def test_from_file_skips_facts_that_are_already_active_edits(led, tmp_path):
    """Issue 13.6: re-running a batch that stopped part-way does not record its facts twice."""
    import json

    from conftest import run_cli
    from kledger.ledger.store import Ledger

    facts = tmp_path / "facts.json"
    rec = [{"prompt": "The Eiffel Tower is located in", "target_new": "Rome", "subject": "The Eiffel Tower"},
           {"prompt": "Alice plays", "target_new": "piano", "subject": "Alice"}]
    facts.write_text(json.dumps(rec[:1]))
    fast = ["--method", "kne", "--set", "max_steps=2"]
    assert run_cli(["add", "--from-file", str(facts), *fast], led).exit_code == 0
    n = Ledger.open(led).count()
    facts.write_text(json.dumps(rec))
    r = run_cli(["--json", "add", "--from-file", str(facts), *fast], led)
    assert r.exit_code == 0, r.output
    assert Ledger.open(led).count() == n + 1  # only Alice
    r = run_cli(["add", "--from-file", str(facts), "--allow-duplicate", *fast], led)
    assert r.exit_code == 0 and Ledger.open(led).count() == n + 3


def test_optional_string_config_fields_take_plain_strings():
    """Regression: ``--set retain_file=facts.json`` (a ``str | None`` field) was refused with "expected a
    value of type str | None": PEP 604 unions were not read as Optional, so the string went to json.loads."""
    from kledger.editors.base import make_config
    from kledger.editors.ultraedit import UltraEditConfig
    from kledger.editors.unlearn import SubspaceConfig as UnlearnConfig

    assert make_config(UnlearnConfig, {"retain_file": "facts.json"}).retain_file == "facts.json"
    cfg = make_config(UltraEditConfig, {"preserve_facts": "known.json", "facts_weight": "5000"})
    assert cfg.preserve_facts == "known.json" and cfg.facts_weight == 5000.0
    assert make_config(UnlearnConfig, {"retain_file": "null"}).retain_file is None
    assert make_config(UltraEditConfig, {"layers": "[3, 4]"}).layers == (3, 4)
