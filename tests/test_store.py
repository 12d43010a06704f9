"""The append-only ledger: creation, lookup, hash chain, refs, revert rules, immutability."""

from __future__ import annotations

import tempfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kledger.ledger import rows as rows_mod
from kledger.ledger import store as store_mod
from kledger.ledger.deltas import Delta
from kledger.ledger.errors import NotFoundError, StateError, UsageError
from kledger.ledger.store import DB_NAME, DIRNAME, GENESIS, Ledger, find_ledger, row_hash

from conftest import FAKE_MODEL, append_edit, tensor_delta

MODEL = FAKE_MODEL


def small_delta(i: int, kind: str | None = None) -> Delta:
    g = torch.Generator().manual_seed(1000 + i)
    td = tensor_delta(kind or ("sparse", "lowrank", "dense")[i % 3], (6, 4), g)
    return Delta({"layer.weight": td}, {"keys": torch.randn(2, generator=g)})


def add(ledger: Ledger, i: int, **kw):
    return append_edit(ledger, kw.pop("delta", small_delta(i)), f"fact {i}", **kw)


@pytest.fixture
def ledger(fake_ledger) -> Ledger:
    return fake_ledger


def rows(ledger: Ledger) -> list[dict]:
    return [e.to_json() for e in ledger.events(newest_first=False)]


def objects(ledger: Ledger) -> dict[str, bytes]:
    return {sha: ledger.objects.path(sha).read_bytes() for sha in ledger.objects}


# --- create / open ------------------------------------------------------------------------
def test_create_writes_init_row(tmp_path):
    L = Ledger.create(tmp_path, MODEL, message="hello")
    assert (tmp_path / DIRNAME / DB_NAME).is_file() and (tmp_path / DIRNAME / "HEAD").read_text() == "main\n"
    assert L.count() == 1 and L.schema_version() == store_mod.SCHEMA_VERSION
    init = L.get_seq(0)
    assert (init.seq, init.type, init.parent, init.branch, init.message) == (0, "init", None, "main", "hello")
    assert init.prev_hash == GENESIS and init.id == init.hash[:12] and row_hash(init.body()) == init.hash
    assert L.base_model() == MODEL and L.head() == init and L.active() == []
    with pytest.raises(StateError):
        Ledger.create(tmp_path, MODEL)
    assert L.count() == 1


def test_find_ledger_walks_up_and_honours_kledger_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("KLEDGER_DIR", raising=False)
    project = tmp_path / "project"
    L = Ledger.create(project, MODEL)
    deep = project / "a" / "b" / "c"
    deep.mkdir(parents=True)
    root = (project / DIRNAME).resolve()
    assert find_ledger(cwd=deep).resolve() == root
    assert Ledger.open(cwd=deep).get_seq(0) == L.get_seq(0)
    monkeypatch.chdir(deep)
    assert find_ledger().resolve() == root
    # nothing above an unrelated folder
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with pytest.raises(NotFoundError, match="run `kledger init"):
        find_ledger(cwd=elsewhere)
    # KLEDGER_DIR (the project folder or the .kledger folder itself) wins over the cwd
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("KLEDGER_DIR", str(project))
    assert find_ledger().resolve() == root
    monkeypatch.setenv("KLEDGER_DIR", str(project / DIRNAME))
    assert Ledger.open().count() == 1
    monkeypatch.setenv("KLEDGER_DIR", str(elsewhere))
    with pytest.raises(NotFoundError):
        find_ledger()
    # an explicit path wins over KLEDGER_DIR
    assert find_ledger(project).resolve() == root


# --- append and read back -----------------------------------------------------------------
def test_append_returns_what_a_later_read_gives(ledger):
    d = small_delta(1, "lowrank")
    ev = ledger.append(
        "add", request={"prompt": "Où est la Tour Eiffel ?", "target_new": " Rome", "rephrase_prompts": ["a", "b"]},
        method="kne", config={"lr": 0.1, "tiny": 1e-300, "layers": [1, 2], "nested": {"b": None, "a": True}},
        ensemble={"members": 3}, metrics={"loss": 0.123456789012345, "n": 7}, message="ü ✓", delta=d,
    )
    later = ledger.get(ev.id)
    assert later.to_json() == ev.to_json()
    assert ledger.get_seq(ev.seq).to_json() == ev.to_json()
    assert ledger.events(limit=1)[0].to_json() == ev.to_json()
    assert ledger.head().to_json() == ev.to_json()
    assert ev.seq == 1 and ev.parent == ledger.get_seq(0).id and ev.delta_bytes == len(d.to_bytes())
    back = ledger.load_delta(later)
    assert torch.equal(back.tensors["layer.weight"].u, d.tensors["layer.weight"].u)
    assert [e.id for e in ledger.active()] == [ev.id]
    with pytest.raises(StateError):
        ledger.load_delta(ledger.get_seq(0))


def test_hash_chain_links_every_row(ledger):
    for i in range(4):
        add(ledger, i)
    ledger.append("audit", message="note", metrics={"drift": 0.0})
    ledger.revert("HEAD~1")
    evs = ledger.events(newest_first=False)
    assert [e.seq for e in evs] == list(range(7))
    prev = GENESIS
    for e in evs:
        assert e.prev_hash == prev
        assert e.hash == row_hash(e.body()) and len(e.hash) == 64
        assert e.id == e.hash[:12]
        prev = e.hash
    assert len({e.id for e in evs}) == len(evs)
    # model events chain through parent; the audit note hangs off the head but is not a head
    assert evs[5].type == "audit" and evs[5].parent == evs[4].id
    assert evs[6].type == "revert" and evs[6].parent == evs[4].id and evs[6].target == evs[3].id
    assert [e.id for e in ledger.active()] == [evs[1].id, evs[2].id, evs[4].id]
    rep = ledger.verify()
    assert rep.ok and rep.rows == 7 and rep.objects_checked == 4 and rep.orphans == [] and rep.temp_files == []


def test_bad_appends_are_refused_and_append_nothing(ledger):
    add(ledger, 0)
    before = rows(ledger)
    with pytest.raises(UsageError):
        ledger.append("frobnicate")
    with pytest.raises(UsageError):
        ledger.append("add", metrics={"loss": float("nan")})
    with pytest.raises(UsageError):
        ledger.append("add", config={"f": object()})
    with pytest.raises(UsageError):
        ledger.append("add", branch="HEAD")
    with pytest.raises(UsageError):
        ledger.append("add", branch="-bad name")
    with pytest.raises(NotFoundError):
        ledger.append("add", branch="nosuchbranch")
    assert rows(ledger) == before


# --- refs ---------------------------------------------------------------------------------
def test_resolve_refs(ledger):
    init = ledger.get_seq(0)
    evs = [add(ledger, i) for i in range(4)]
    ledger.append("audit", message="audits are not model versions")
    assert ledger.resolve("HEAD") == evs[-1] == ledger.resolve(None) == ledger.resolve("main")
    assert ledger.resolve("HEAD~1") == evs[2] == ledger.resolve("HEAD~") == ledger.resolve("main~1")
    assert ledger.resolve("HEAD~4") == init
    assert ledger.resolve("HEAD~0") == evs[-1]
    for e in evs:
        assert ledger.resolve(e.id) == e
        assert ledger.resolve(e.id[:6]) == e
        assert ledger.resolve(e.hash) == e
        assert ledger.get(e.id.upper()) == e
    assert ledger.resolve(evs[2].id + "~2") == evs[0]
    with pytest.raises(NotFoundError, match="ancestors"):
        ledger.resolve("HEAD~5")
    for bad in ("ffff0000ffff", "zzzz", "ab", ""):
        with pytest.raises(NotFoundError):
            ledger.get(bad)
    with pytest.raises(NotFoundError):
        ledger.resolve("nosuchthing")
    # a long ref must match the full hash, not only the 12-digit id
    e = evs[1]
    wrong = e.hash[:20] + ("0" if e.hash[20] != "0" else "1") + e.hash[21:]
    with pytest.raises(NotFoundError):
        ledger.get(wrong)


def test_ambiguous_prefix_is_an_error(ledger, monkeypatch):
    # Fix the clock so the next row's hash can be predicted, then search a message that makes
    # its id share a 4-digit prefix with an existing event.
    fixed = "2024-01-01T00:00:00.000000+00:00"
    monkeypatch.setattr(rows_mod, "now", lambda: fixed)  # the one clock rows are stamped with
    evs = [add(ledger, i, delta=None) for i in range(8)]
    prefixes = {e.id[:4]: e for e in [ledger.get_seq(0), *evs]}
    head = evs[-1]
    for k in range(2_000_000):
        body = {
            "seq": head.seq + 1, "type": "audit", "parent": head.id, "parents": [], "branch": "main",
            "created_at": fixed, "request": None, "method": None, "config": None, "ensemble": None,
            "metrics": None, "target": None, "message": f"m{k}", "delta_sha256": None, "delta_bytes": None,
            "prev_hash": head.hash,
        }
        h = row_hash(body)
        if h[:4] in prefixes:
            break
    else:  # pragma: no cover
        pytest.skip("no colliding prefix found")
    twin = ledger.append("audit", message=f"m{k}")
    assert twin.hash == h
    other = prefixes[h[:4]]
    with pytest.raises(UsageError, match="ambiguous"):
        ledger.get(h[:4])
    with pytest.raises(UsageError, match="ambiguous"):
        ledger.resolve(h[:4])
    assert ledger.get(twin.id) == twin and ledger.get(other.id) == other


# --- revert -------------------------------------------------------------------------------
def test_revert_rules_and_failed_reverts_append_nothing(ledger):
    a = add(ledger, 0)
    b = add(ledger, 1)
    r = ledger.revert(a.id)
    assert (r.type, r.target, r.parent, r.seq) == ("revert", a.id, b.id, 3)
    assert [e.id for e in ledger.active()] == [b.id]
    assert [e.id for e in ledger.active("HEAD~1")] == [a.id, b.id]
    assert [e.id for e in ledger.active(a.id)] == [a.id]
    audit = ledger.append("audit", message="note")
    before_rows, before_objs = rows(ledger), objects(ledger)
    failures = [
        ("ffffffffffff", NotFoundError, "found none"),
        (a.id, StateError, f"already reverted by {r.id}"),
        (a.id[:6], StateError, f"already reverted by {r.id}"),
        (ledger.get_seq(0).id, StateError, "init"),
        (r.id, StateError, "revert"),
        (audit.id, StateError, "audit"),
        ("HEAD~9", NotFoundError, "ancestors"),
    ]
    for ref, exc, msg in failures:
        with pytest.raises(exc, match=msg):
            ledger.revert(ref)
        assert rows(ledger) == before_rows and objects(ledger) == before_objs
    r2 = ledger.revert(b.id)
    assert ledger.active() == [] and ledger.count() == len(before_rows) + 1
    assert ledger.verify().ok
    with pytest.raises(StateError, match=f"already reverted by {r2.id}"):
        ledger.revert(b.id)


def test_expect_head_mismatch_appends_nothing(ledger):
    a = add(ledger, 0)
    stale = ledger.get_seq(0).id
    before = rows(ledger)
    with pytest.raises(StateError, match="moved"):
        add(ledger, 1, expect_head=stale)
    with pytest.raises(StateError, match="moved"):
        add(ledger, 2, delta=None, expect_head=stale)
    assert rows(ledger) == before
    b = add(ledger, 3, expect_head=a.id)
    assert b.parent == a.id and ledger.count() == 3
    rep = ledger.verify()
    assert rep.ok  # the refused edit's object may be left over, but only as an orphan
    assert len(rep.orphans) <= 1


def test_check_hook_runs_under_the_lock_and_can_refuse(ledger):
    seen = []

    def check(L, head):
        seen.append(head.id)
        raise StateError("refused by check")

    with pytest.raises(StateError, match="refused by check"):
        add(ledger, 0, check=check)
    assert seen == [ledger.get_seq(0).id] and ledger.count() == 1


# --- immutability property ----------------------------------------------------------------
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.sampled_from(["sparse", "lowrank", "dense", "none", "same"]), st.integers(0, 50)),
        st.tuples(st.just("revert"), st.integers(0, 30)),
        st.tuples(st.just("audit"), st.integers(0, 5)),
        st.tuples(st.just("stale"), st.integers(0, 5)),
    ),
    min_size=1, max_size=6,
)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(OPS)
def test_no_existing_row_or_object_ever_changes(ops):
    with tempfile.TemporaryDirectory() as tmp:
        L = Ledger.create(tmp, MODEL)
        model_active: list[str] = []  # our own model of the active set
        reverted: set[str] = set()
        for op in ops:
            old_rows, old_objs = rows(L), objects(L)
            ok = True
            if op[0] == "add":
                kind, seed = op[1], op[2]
                delta = None if kind == "none" else small_delta(0 if kind == "same" else seed, None if kind == "same" else kind)
                ev = add(L, seed, delta=delta)
                if delta is not None:
                    model_active.append(ev.id)
            elif op[0] == "revert":
                target = old_rows[op[1] % len(old_rows)]
                should_work = target["id"] in model_active
                try:
                    L.revert(target["id"])
                except (StateError, NotFoundError) as exc:
                    ok = False
                    assert not should_work, exc
                    if target["id"] in reverted:
                        assert "already reverted by" in str(exc)
                else:
                    assert should_work
                    model_active.remove(target["id"])
                    reverted.add(target["id"])
            elif op[0] == "audit":
                L.append("audit", metrics={"k": op[1]})
            else:  # a writer whose view of the head is stale
                ok = False
                with pytest.raises(StateError):
                    add(L, op[1], expect_head="0" * 12)
            new_rows, new_objs = rows(L), objects(L)
            assert new_rows[: len(old_rows)] == old_rows
            assert len(new_rows) == len(old_rows) + (1 if ok else 0)
            for sha, data in old_objs.items():
                assert new_objs[sha] == data
            if op[0] == "revert" or op is ops[-1]:
                assert [e.id for e in L.active()] == model_active
        rep = L.verify()
        assert rep.ok and rep.rows == len(rows(L)), rep.problem
