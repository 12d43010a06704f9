"""Branches, the merge active-set semantics, and the `sum` merge (no model needed).

Ledgers here are created with a placeholder base model record and hand-made deltas on a small
module with parameters ``a`` (6×8) and ``b`` (5×4), so each example costs milliseconds.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kledger.ledger.compose import materialise
from kledger.ledger.deltas import Delta, SparseDelta
from kledger.ledger.errors import StateError
from kledger.ledger.mergeplan import plan_merge
from kledger.ledger.store import Ledger
from kledger.merging import do_merge

from conftest import SHAPES, Params, new_ledger, sparse_delta as sparse, tensor_delta, weights
from conftest import add_fact as add, run_on as run


def lowrank(name: str, seed: int) -> Delta:
    return Delta({name: tensor_delta("lowrank", SHAPES[name], torch.Generator().manual_seed(seed))})


def equal(w1, w2) -> bool:
    return w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)


# --------------------------------------------------------------------------------------------
def test_branch_switch_and_listing(tmp_path):
    L = new_ledger(tmp_path)
    e1 = add(L, "Alice", "Paris", sparse("a", [1, 2], [0.5, -0.5]))
    r = run(L, "branch", "legal")
    assert r.exit_code == 0, r.output
    assert L.current_branch() == "main"
    bev = L.branch_head("legal")
    assert bev.type == "branch" and bev.parent == e1.id
    assert run(L, "branch", "legal").exit_code == 1  # exists already
    assert run(L, "switch", "legal").exit_code == 0
    assert L.current_branch() == "legal"
    e2 = add(L, "Bob", "Rome", sparse("a", [3], [1.0]))
    assert e2.branch == "legal" and e2.parent == bev.id
    assert [e.id for e in L.active("legal")] == [e1.id, e2.id]
    assert [e.id for e in L.active("main")] == [e1.id]
    r = run(L, "--json", "branches")
    import json

    rows = {b["branch"]: b for b in json.loads(r.output)}
    assert rows["legal"]["current"] and rows["legal"]["head"] == e2.id and rows["main"]["head"] == e1.id
    # --at an older version
    assert run(L, "branch", "old", "--at", "main~1").exit_code == 0
    assert L.active("old") == []
    assert run(L, "switch", "nope").exit_code == 1
    # log --all lists every branch's events
    out = run(L, "log", "--all").output
    assert e2.id in out and e1.id in out


def test_one_sided_revert_survives_sum_merge(tmp_path):
    """Three-way semantics: an edit of the common history reverted on one side stays reverted."""
    L = new_ledger(tmp_path)
    x = add(L, "Alice", "Paris", sparse("a", [0, 1], [1.0, 2.0]))
    run(L, "branch", "side")
    run(L, "switch", "side")
    L.revert(x.id)
    y = add(L, "Bob", "Rome", lowrank("b", 1))
    run(L, "switch", "main")
    z = add(L, "Carol", "Oslo", sparse("a", [5], [3.0]))
    r = run(L, "merge", "side")
    assert r.exit_code == 0, r.output
    assert [e.id for e in L.active()] == [y.id, z.id]
    m = L.head()
    assert m.type == "merge" and m.parents == (z.id, L.branch_head("side").id) and m.delta_sha256 is None
    # the same edit reverted on both sides leaves once; merging again changes nothing
    n = L.count()
    assert "up to date" in run(L, "merge", "side").output and L.count() == n


def test_revert_of_merged_edit_and_superseded(tmp_path):
    L = new_ledger(tmp_path)
    base = add(L, "Alice", "Paris", sparse("a", [0], [1.0]))
    run(L, "branch", "t")
    o = add(L, "Bob", "Rome", sparse("a", [1], [1.0]))
    L.set_current_branch("t")
    t = add(L, "Bob", "Berlin", sparse("a", [2], [1.0]))
    L.set_current_branch("main")
    # conflict on Bob: keep theirs -> our Bob edit is superseded by the merge
    r = run(L, "merge", "t", "--theirs", "Bob")
    assert r.exit_code == 0, r.output
    assert [e.id for e in L.active()] == [base.id, t.id]
    with pytest.raises(StateError, match="already reverted"):
        L.revert(o.id)
    # a merged-in edit can be reverted like any other
    L.revert(t.id)
    assert [e.id for e in L.active()] == [base.id]


# --------------------------------------------------------------------------------------------
# hypothesis: random histories on two branches

SUBJECTS = ["Alice", "Bob", "Carol", "Dan", "Eve", "Fay"]
op = st.tuples(
    st.sampled_from(["ours", "theirs"]),
    st.sampled_from(["sparse", "lowrank", "revert"]),
    st.integers(0, 5),  # subject / revert pick
    st.integers(0, 10_000),  # seed
)


def _build(tmp_path, ops, disjoint: bool):
    """main gets two common edits, then `side` branches off; ops add/revert on either branch.
    With ``disjoint`` the two sides edit different subjects (no hard conflicts). Runs of ops on
    one branch are written with ``append_many`` (fast); the live sets are also simulated here
    and checked against ``Ledger.active``."""
    L = new_ledger(tmp_path)
    common = L.append_many([
        {"type": "add", "request": _req("Zed", "Lima"), "method": "fake", "delta": sparse("a", [7, 8], [0.25, -0.5])},
        {"type": "add", "request": _req("Yan", "Kiev"), "method": "fake", "delta": lowrank("a", 99)},
    ])
    L.create_branch("side")
    live = {"main": [e.id for e in common], "side": [e.id for e in common]}
    pending: list = []
    cur = None

    def flush():
        if pending:
            evs = L.append_many(pending, branch=cur)
            for it, ev in zip(pending, evs):
                if it["type"] == "revert":
                    live[cur].remove(it["target"])
                else:
                    live[cur].append(ev.id)
            pending.clear()

    for side, kind, pick, seed in ops:
        br = "main" if side == "ours" else "side"
        if br != cur:
            flush()
            cur = br
        g = torch.Generator().manual_seed(seed)
        if kind == "revert":
            pending_reverts = {it["target"] for it in pending if it["type"] == "revert"}
            cands = [i for i in live[br] if i not in pending_reverts]
            if cands:
                pending.append({"type": "revert", "target": cands[pick % len(cands)]})
            continue
        subjects = SUBJECTS[:3] if (disjoint and br == "main") else SUBJECTS[3:] if disjoint else SUBJECTS
        subj = subjects[pick % len(subjects)]
        target = ["Paris", "Rome", "Oslo"][seed % 3]
        if kind == "sparse":
            name = ["a", "b"][seed % 2]
            n = SHAPES[name][0] * SHAPES[name][1]
            idx = torch.randperm(n, generator=g)[: 1 + seed % 6]
            d = Delta({name: SparseDelta(SHAPES[name], idx, torch.randn(idx.numel(), generator=g))})
        else:
            d = lowrank(["a", "b"][seed % 2], seed)
        pending.append({"type": "add", "request": _req(subj, target), "method": "fake", "delta": d})
    flush()
    with L.session():
        for br in ("main", "side"):
            assert [e.id for e in L.active(br)] == live[br]
    return L


def _req(subject: str, target: str) -> dict:
    return {"prompt": f"{subject} lives in", "subject": subject, "target_new": " " + target}


def _merge(L: Ledger, into: str, other: str, keep_into=(), keep_other=()):
    """Library path of `kledger merge` (the CLI is exercised in the other tests)."""
    L.set_current_branch(into)
    plan = plan_merge(L, L.branch_head(into), L.branch_head(other), keep_into, keep_other)
    if plan.up_to_date:
        return None
    return do_merge(L, plan, "sum", branch=other)[0]


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(op, max_size=8))
def test_merging_a_branch_with_itself_changes_nothing(tmp_path_factory, ops):
    L = _build(tmp_path_factory.mktemp("self"), ops, disjoint=False)
    for br in ("main", "side"):
        w0, n = weights(L, br), L.count()
        assert _merge(L, br, br) is None
        assert L.count() == n and equal(weights(L, br), w0)
    # merged once (conflicts: keep ours), merging the same branch again changes nothing either
    plan = plan_merge(L, L.branch_head("main"), L.branch_head("side"))
    ev = _merge(L, "main", "side", keep_into=[c.fact for c in plan.conflicts])
    assert ev is None or ev.type == "merge"
    w1, n = weights(L), L.count()
    assert _merge(L, "main", "side") is None
    assert L.count() == n and equal(weights(L), w1)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(op, max_size=8), flip=st.booleans())
def test_sum_merge_is_order_independent(tmp_path_factory, ops, flip):
    root = tmp_path_factory.mktemp("order")
    L1 = _build(root / "one", ops, disjoint=False)
    shutil.copytree(root / "one", root / "two")
    L2 = Ledger(root / "two" / ".kledger")
    # resolve every hard conflict the same way in both directions (keep branch "main" or "side")
    plan = plan_merge(L1, L1.branch_head("main"), L1.branch_head("side"))
    keep_main = [c.fact for c in plan.conflicts if flip]
    keep_side = [c.fact for c in plan.conflicts if not flip]
    _merge(L1, "main", "side", keep_main, keep_side)  # None when already up to date
    _merge(L2, "side", "main", keep_side, keep_main)
    with L1.session(), L2.session():
        assert [e.id for e in L1.active()] == [e.id for e in L2.active()]
    # same active list in sequence order -> the compositor performs the same fp32 operations
    assert equal(weights(L1), weights(L2))


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(op, max_size=6), strategy=st.sampled_from(["sum", "ties", "resolve"]),
       t1=st.sampled_from(["Paris", "Rome"]), dry=st.booleans())
def test_hard_conflict_never_merges_silently(tmp_path_factory, ops, strategy, t1, dry):
    L = _build(tmp_path_factory.mktemp("conflict"), ops, disjoint=True)
    add(L, "Mona", t1, sparse("a", [3], [1.0]), branch="main")
    add(L, "Mona", "Tokyo", sparse("b", [3], [-1.0]), branch="side")
    n, w0 = L.count(), weights(L, "main")
    L.set_current_branch("main")
    r = run(L, "merge", "side", "--strategy", strategy, *(["--dry-run"] if dry else []))
    assert r.exit_code != 0 and "conflict" in r.output.lower()
    assert L.count() == n and equal(weights(L, "main"), w0)


def test_dry_run_writes_nothing_and_json(tmp_path):
    L = new_ledger(tmp_path)
    add(L, "Alice", "Paris", sparse("a", [0, 1, 2], [1.0, -1.0, 0.5]))
    run(L, "branch", "t")
    add(L, "Bob", "Rome", sparse("a", [1, 2, 3], [1.0, 1.0, 1.0]))
    L.set_current_branch("t")
    add(L, "Carol", "Oslo", sparse("a", [2, 3, 4], [-2.0, 1.0, 1.0]))
    L.set_current_branch("main")
    before = sorted(p.name for p in (L.root / "objects").rglob("*"))
    n = L.count()
    for strat in ("sum", "ties", "resolve"):
        r = run(L, "--json", "merge", "t", "--dry-run", "--strategy", strat)
        assert r.exit_code == 0, r.output
    import json

    data = json.loads(r.output)
    assert data["dry_run"] and not data["conflicts"]
    assert data["overlaps"] == [{"ours": data["ours_edits"][0], "theirs": data["theirs_edits"][0], "tensor": "a",
                                 "shared_entries": 2, "opposite_sign": 1}]
    assert L.count() == n and sorted(p.name for p in (L.root / "objects").rglob("*")) == before
    text = run(L, "merge", "t", "--dry-run").output
    assert "opposite-sign" in text and "interference" in text


def test_snapshot_prefix_is_used_bit_exact_and_checked(tmp_path):
    from kledger.ledger.compose import find_snapshot

    def mat(L, chunk=2, **kw):
        m = Params()
        with L.session():
            materialise(L, m, "HEAD", chunk=chunk, **kw)
        return {k: v.detach().clone() for k, v in m.state_dict().items()}

    L = new_ledger(tmp_path)
    evs = [add(L, s, "Paris", d) for s, d in (("Alice", lowrank("a", 1)), ("Bob", sparse("a", [1, 2], [1.0, 2.0])),
                                               ("Carol", lowrank("b", 2)))]
    snaps = L.cache_dir / "snapshots"
    assert not snaps.exists() or not list(snaps.glob("*.safetensors"))
    mat(L, snapshots=False)  # neither reads nor writes snapshots
    assert not snaps.exists() or not list(snaps.glob("*.safetensors"))
    mat(L)  # 3 active events, chunk 2: the sums after the first 2 are kept
    assert [p.name[:8] for p in snaps.glob("*.safetensors")] == ["00000002"]
    late = add(L, "Dan", "Rome", lowrank("a", 3))
    add(L, "Eve", "Oslo", sparse("b", [0], [0.5]))
    L.revert(late.id)  # after the snapshot: the snapshot still applies
    with L.session():
        ids = [e.id for e in L.active()]
    assert find_snapshot(L, ids, 2)[0] == 2
    assert find_snapshot(L, ids, 4) is None  # made with another chunk: never mixed
    with_snap = mat(L)
    assert equal(with_snap, mat(L, snapshots=False))  # bit for bit, not just close
    L.revert(evs[0].id)  # inside the snapshot: no longer a prefix, so it is not used
    with L.session():
        assert find_snapshot(L, [e.id for e in L.active()], 2) is None
    # at most KEEP_SNAPSHOTS files stay
    for i in range(6):
        add(L, f"S{i}", "X", lowrank("a", 10 + i))
        mat(L)
    from kledger.ledger.compose import KEEP_SNAPSHOTS

    assert 1 <= len(list(snaps.glob("*.safetensors"))) <= KEEP_SNAPSHOTS
    # a damaged snapshot file is never used, and the result is still right
    L2 = new_ledger(tmp_path / "two")
    add(L2, "Alice", "Paris", lowrank("a", 1))
    add(L2, "Bob", "Paris", lowrank("b", 2))
    exact = mat(L2, snapshots=False)
    mat(L2)
    (path,) = (L2.cache_dir / "snapshots").glob("*.safetensors")
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.chmod(0o644)
    path.write_bytes(bytes(data))
    with L2.session():
        assert find_snapshot(L2, [e.id for e in L2.active()], 2) is None
    assert equal(mat(L2), exact)

