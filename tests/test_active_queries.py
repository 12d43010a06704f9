"""The SQL query paths that keep `log`, `show`, `status` and `revert` fast on long ledgers.

``active_among``, ``active_count`` and ``is_ancestor`` find the ancestors of a version as runs
of rows in SQL and read only the rows that can change an event's state. Here they are checked
against the plain definitions (``active`` = ``graph.live(ancestors(ref))`` over the whole graph) on
random histories with branches, forks from old events, merges that supersede events, reverts of
merges, audits, and events whose parent is not the previous one on their branch. Also: the
torch-free delta summary of ``show`` and the constant-memory checks of ``verify``.
"""

from __future__ import annotations

import random

import duckdb
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kledger.ledger.deltas import Delta, DenseDelta, LowRankDelta, SparseDelta
from kledger.ledger.errors import StateError
from kledger.ledger.records import DELTA_EVENT_TYPES
from kledger.ledger import graph, verify
from kledger.ledger.store import Ledger
from conftest import FAKE_MODEL, rewrite_chain

MODEL = FAKE_MODEL
_G = torch.Generator().manual_seed(0)
BLOBS = [Delta({"w": SparseDelta((4, 4), torch.tensor([i % 16, (i + 5) % 16]), torch.randn(2, generator=_G))}).to_bytes()
         for i in range(8)]


def _check(L: Ledger, refs) -> None:
    """Every query path agrees with the plain definitions at every ref in ``refs``: runs of rows
    (``WINDOW`` = -1), whole windows (a huge ``WINDOW``), and the row walk that replaces runs
    for very tangled histories (``_ancestry`` giving up)."""
    all_events = L.events(newest_first=False)
    ids = [e.id for e in all_events]
    expected = {r.id: ({e.id for e in L.active(r)}, L.ancestors(r)) for r in refs}
    orig_window, orig_ancestry = graph.WINDOW, graph.Graph._ancestry
    try:
        for window, give_up in ((-1, False), (10**9, False), (-1, True)):
            graph.WINDOW = window
            if give_up:
                graph.Graph._ancestry = lambda self, con, ev, lo=0, max_runs=256: None
            for ref in refs:
                want, anc = expected[ref.id]
                with L.session():
                    assert L.active_among(ids, ref) == want
                    assert L.active_among(all_events, ref) == want
                    assert L.active_count(ref) == len(want)
                    assert L.active_refs(ref) == [(e.id, e.delta_sha256) for e in L.active(ref)]
                    for e in all_events:
                        assert L.active_among([e.id], ref) == ({e.id} & want), (e, window, give_up)
                        assert L.is_ancestor(e, ref) == (e.id in anc), (e, ref, window, give_up)
    finally:
        graph.WINDOW, graph.Graph._ancestry = orig_window, orig_ancestry


op = st.tuples(st.sampled_from(["add", "add", "add", "revert", "branch", "merge", "audit", "odd_parent",
                                "revert_any"]),
               st.integers(0, 1000), st.integers(0, 1000))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(op, min_size=3, max_size=18))
def test_sql_paths_match_the_full_graph(tmp_path_factory, ops):
    L = Ledger.create(tmp_path_factory.mktemp("anc"), MODEL)
    branches = ["main"]
    nb = 0
    for kind, a, b in ops:
        br = branches[a % len(branches)]
        head = L.branch_head(br)
        if kind == "add":
            L.append("add", request={"prompt": f"p{a}", "target_new": " t"}, method="fake",
                     delta=BLOBS[b % len(BLOBS)], branch=br)
        elif kind == "odd_parent":  # a parent that is not the branch's previous event
            anc = sorted(L.ancestors(head), key=lambda i: L.get(i).seq)
            L.append("add", request={"prompt": f"q{a}", "target_new": " t"}, method="fake",
                     delta=BLOBS[b % len(BLOBS)], branch=br, parent=anc[b % len(anc)])
        elif kind == "audit":
            L.append("audit", metrics={"a": a}, branch=br)
        elif kind == "branch":
            nb += 1
            anc = sorted(L.ancestors(head), key=lambda i: L.get(i).seq)
            at = anc[b % len(anc)]  # fork from any ancestor, not only the head
            L.append("branch", branch=f"b{nb}", parent=at, message=f"branch b{nb} at {at}")
            branches.append(f"b{nb}")
        elif kind == "merge":
            other = branches[b % len(branches)]
            theirs = L.branch_head(other)
            live = [e.id for e in L.active(head)] + [e.id for e in L.active(theirs)]
            rnd = random.Random(a * 1000 + b)
            sup = sorted(set(rnd.sample(live, min(len(live), rnd.randint(0, 2)))))
            L.append("merge", branch=br, parent=head.id, parents=[head.id, theirs.id],
                     config={"supersedes": sup}, delta=BLOBS[a % len(BLOBS)] if a % 3 else None)
        elif kind in ("revert", "revert_any"):
            cands = [e for e in L.events(newest_first=False) if e.type in DELTA_EVENT_TYPES]
            if kind == "revert":
                cands = [e for e in cands if e.id in {x.id for x in L.active(head)}]
            if not cands:
                continue
            target = cands[b % len(cands)]
            live = {e.id for e in L.active(head)}
            if target.id in live:
                L.revert(target.id, branch=br)
            else:  # the check under the write lock must refuse, for the right reason
                words = "already reverted" if target.id in L.ancestors(head) else "not in the history"
                with pytest.raises(StateError, match=words):
                    L.revert(target.id, branch=br)
    events = L.events(newest_first=False)
    refs = [L.branch_head(b) for b in branches] + [events[i] for i in range(0, len(events), 3)]
    _check(L, refs)


def test_revert_of_a_superseding_merge_restores(tmp_path):
    """An old edit superseded by a merge is inactive; reverting the merge brings it back."""
    L = Ledger.create(tmp_path, MODEL)
    old = L.append("add", request={"prompt": "old", "target_new": " t"}, delta=BLOBS[0])
    for i in range(30):
        L.append("add", request={"prompt": f"p{i}", "target_new": " t"}, delta=BLOBS[1 + i % 7])
    L.append("branch", branch="side", parent=L.head().id, message="branch side")
    side = L.append("add", request={"prompt": "side", "target_new": " t"}, delta=BLOBS[3], branch="side")
    merge = L.append("merge", parent=L.head().id, parents=[L.head().id, side.id], config={"supersedes": [old.id]},
                     delta=BLOBS[4])
    assert L.active_among([old.id, side.id, merge.id]) == {side.id, merge.id}
    assert L.active_count() == 32 and L.is_ancestor(side) and L.is_ancestor(old)
    assert not L.is_ancestor(side, "main~1")
    with pytest.raises(StateError, match="already reverted"):
        L.revert(old.id)
    L.revert(merge.id)
    assert L.active_among([old.id, side.id, merge.id]) == {old.id, side.id}
    assert L.active_count() == 32 == len(L.active())
    elsewhere = L.append("add", request={"prompt": "elsewhere", "target_new": " t"}, delta=BLOBS[5], branch="side")
    with pytest.raises(StateError, match="not in the history"):
        L.revert(elsewhere.id)  # on main
    assert L.active_among([elsewhere.id]) == set() and L.active_among([elsewhere.id], "side") == {elsewhere.id}


# --- show: the delta summary without torch --------------------------------------------------
@pytest.mark.parametrize("plain_work", [2_000_000, 0])  # plain Python, and numpy for big deltas
def test_delta_summary_matches_delta_summary(tmp_path, monkeypatch, plain_work):
    from kledger.ledger import deltainfo, deltas

    monkeypatch.setattr(deltainfo, "_PLAIN_WORK", plain_work)
    g = torch.Generator().manual_seed(3)
    d = Delta({
        "s": SparseDelta((7, 9), torch.tensor([3, 60, 3, 11]), torch.randn(4, generator=g)),  # a repeated index
        "e": SparseDelta((7, 9), torch.zeros(0, dtype=torch.int64), torch.zeros(0)),
        "l": LowRankDelta((7, 9), torch.randn(7, 3, generator=g), torch.randn(9, 3, generator=g)),
        "l1": LowRankDelta((576, 1536), torch.randn(576, 1, generator=g), torch.randn(1536, 1, generator=g)),
        "d": DenseDelta((5, 2), torch.randn(5, 2, generator=g)),
    }, {"keys": torch.randn(2, 3, generator=g)})
    L = Ledger.create(tmp_path, MODEL)
    ev = L.append("add", request={"prompt": "x", "target_new": " y"}, delta=d)
    got, want = L.delta_summary(ev), L.load_delta(ev).summary()
    assert got.keys() == want.keys()
    for name in want:
        w, s = dict(want[name]), dict(got[name])
        # float64 sums here vs float32 in torch: 3e-5 relative apart on the 884,736-entry matrix
        assert s.pop("fro_norm") == pytest.approx(w.pop("fro_norm"), rel=1e-4, abs=1e-12)
        assert s == w, name
    assert deltainfo.FORMAT_VERSION == deltas.FORMAT_VERSION


def test_delta_summary_refuses_malformed_objects():
    from kledger.ledger.deltainfo import summary_from_bytes
    from kledger.ledger.errors import IntegrityError

    good = BLOBS[0]
    for bad in (b"", good[:20], good[:8] + b"{not json" + good[17:], good[:-4]):
        with pytest.raises(IntegrityError):
            summary_from_bytes(bad)


# --- verify: constant memory -----------------------------------------------------------------
def test_verify_lists_exactly_the_orphans(tmp_path):
    L = Ledger.create(tmp_path, MODEL)
    used = [L.append("add", request={"prompt": f"p{i}", "target_new": " t"}, delta=BLOBS[i]).delta_sha256
            for i in range(5)]
    orphans = sorted(L.objects.put(Delta({"w": DenseDelta((2,), torch.tensor([float(i), 1.0]))}).to_bytes())[0]
                     for i in range(6))
    rep = L.verify()
    assert rep.ok and rep.orphans == orphans and not set(used) & set(orphans)


def test_verify_reports_a_parent_that_is_not_an_earlier_event(tmp_path):
    """A row whose parent names no earlier row, with every hash recomputed (so only the parent
    check can see it), is reported at that row."""
    L = Ledger.create(tmp_path, MODEL)
    for i in range(4):
        L.append("add", request={"prompt": f"p{i}", "target_new": " t"}, delta=BLOBS[i])
    rewrite_chain(L, 2, "parent", "0123456789ab")  # names no row
    rep = L.verify()
    assert not rep.ok and rep.bad_row == 2 and "is not an earlier event" in rep.problem, rep.to_json()


# --- heads older than the newest rows, long id lists -------------------------------------------
def test_heads_and_lookups_past_the_newest_rows(tmp_path):
    """Branch heads are looked for among the newest 2,048 rows first: a branch whose head is
    older must still be found (by the full scan), for reads and for appends."""
    L = Ledger.create(tmp_path, MODEL)
    L.append("branch", branch="side", parent=L.head().id, message="branch side")
    side = L.append("add", request={"prompt": "side", "target_new": " t"}, delta=BLOBS[0], branch="side")
    mains = L.append_many([{"type": "add", "request": {"prompt": f"p{i}", "target_new": " t"},
                            "delta": BLOBS[1 + i % 7]} for i in range(2100)])
    assert L.branch_head("side") == side and L.head() == mains[-1]
    nxt = L.append("add", request={"prompt": "side 2", "target_new": " t"}, delta=BLOBS[2], branch="side")
    assert nxt.parent == side.id and L.branch_head("side") == nxt
    ids = [e.id for e in mains]  # more than 1,000 ids: one semi-join instead of IN lists
    assert [e.id for e in L.events_by_ids(list(reversed(ids)))] == ids
    assert L.active_count() == 2100 and L.active_count("side") == 2
    assert [e.seq for e in L.events(branch="side", upto=side.seq)] == [side.seq, side.seq - 1]
    assert [e.seq for e in L.events(since=nxt.seq - 3, newest_first=False)] == [nxt.seq - 2, nxt.seq - 1, nxt.seq]


def test_verify_batches_jump_a_gap_wider_than_a_batch(tmp_path):
    L = Ledger.create(tmp_path, MODEL)
    for i in range(5):
        L.append("audit", metrics={"i": i})
    con = duckdb.connect(str(L.db_path))
    con.execute("DELETE FROM events WHERE seq BETWEEN 2 AND 4")
    con.close()
    assert [ev.seq for ev, _ in verify.batches(L, batch=2)] == [0, 1, 5]
    rep = L.verify()
    assert not rep.ok and rep.bad_row == 5 and "a row is missing" in rep.problem
