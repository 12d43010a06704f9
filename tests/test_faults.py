"""Faults: tampered rows and objects, SIGKILL during appends, concurrent writers, a busy lock."""

from __future__ import annotations

import os
import random
import select
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import FAKE_MODEL, append_edit, rewrite_chain, tensor_delta, sql
from kledger.ledger.deltas import Delta
from kledger.ledger.errors import IntegrityError, KledgerError, LedgerBusyError
from kledger.ledger.store import Ledger, row_hash

WRITER = str(Path(__file__).with_name("_writer.py"))
MODEL = FAKE_MODEL


def delta(i: int) -> Delta:
    g = torch.Generator().manual_seed(i)
    return Delta({"w": tensor_delta("sparse", (8, 8), g, nnz=4), "b": tensor_delta("dense", (8,), g)})


@pytest.fixture(scope="module")
def deltas_dir(tmp_path_factory) -> Path:
    """Real small delta objects for the writer subprocesses (sparse, low-rank, dense, with state)."""
    d = tmp_path_factory.mktemp("deltas")
    g = torch.Generator().manual_seed(7)
    for i in range(200):
        td = tensor_delta(("sparse", "lowrank", "dense")[i % 3], (8, 8), g, nnz=5, rank=2)
        (d / f"{i:03d}.safetensors").write_bytes(Delta({"w": td}, {"keys": torch.randn(3, 4, generator=g)}).to_bytes())
    return d


@pytest.fixture
def ledger(tmp_path) -> Ledger:
    L = Ledger.create(tmp_path, MODEL)
    for i in range(4):
        append_edit(L, delta(i), f"fact {i}")
    L.revert("HEAD~2")
    assert L.verify().ok and L.count() == 6
    return L




def assert_bad(ledger: Ledger, seq: int, *words: str):
    rep = ledger.verify()
    assert not rep.ok and rep.bad_row == seq, rep.to_json()
    assert f"row {seq}" in rep.problem
    for w in words:
        assert w in rep.problem, rep.problem
    return rep


# --- tampering ----------------------------------------------------------------------------
def test_changed_row_is_reported(ledger):
    sql(ledger, """UPDATE events SET request = '{"prompt":"fact 1","target_new":" EVIL"}' WHERE seq = 2""")
    assert_bad(ledger, 2, "hash")


@pytest.mark.parametrize("column,value", [("message", "'rewritten'"), ("created_at", "'2000-01-01'"),
                                          ("delta_bytes", "delta_bytes + 1"), ("type", "'merge'"),
                                          ("hash", "repeat('a', 64)")])
def test_any_changed_column_is_reported(ledger, column, value):
    sql(ledger, f"UPDATE events SET {column} = {value} WHERE seq = 3")
    assert_bad(ledger, 3)


def test_rehashed_row_breaks_the_chain_at_the_next_row(ledger):
    ev = ledger.get_seq(2)
    body = ev.body() | {"message": "quietly rewritten"}
    h = row_hash(body)  # a consistent hash for the changed row ...
    sql(ledger, "UPDATE events SET message = ?, hash = ?, id = ? WHERE seq = 2", ["quietly rewritten", h, h[:12]])
    assert ledger.get_seq(2).hash == h
    assert_bad(ledger, 3, "chain")  # ... but row 3 still links to the old hash


def test_rewritten_prev_hash_is_reported(ledger):
    ev = ledger.get_seq(2)
    body = ev.body() | {"prev_hash": "1" * 64}
    h = row_hash(body)
    sql(ledger, "UPDATE events SET prev_hash = ?, hash = ?, id = ? WHERE seq = 2", ["1" * 64, h, h[:12]])
    assert_bad(ledger, 2, "prev_hash")


def test_deleted_row_is_reported(ledger):
    sql(ledger, "DELETE FROM events WHERE seq = 2")
    assert_bad(ledger, 3, "sequence number 2")


def _object_path(ledger: Ledger, seq: int) -> tuple[Path, str]:
    ev = ledger.get_seq(seq)
    p = ledger.objects.path(ev.delta_sha256)
    assert p.is_file()
    return p, ev.delta_sha256


def test_missing_object_is_reported(ledger):
    p, sha = _object_path(ledger, 2)
    p.unlink()
    assert_bad(ledger, 2, "missing object")
    with pytest.raises(KledgerError):
        ledger.load_delta(ledger.get_seq(2))
    assert ledger.verify(check_objects=False).ok  # rows alone are still intact


def test_corrupted_object_is_reported(ledger):
    p, sha = _object_path(ledger, 3)
    assert not os.stat(p).st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)  # objects are read-only
    data = bytearray(p.read_bytes())
    data[-3] ^= 0x40  # a value in the data section: still parses, different content
    os.chmod(p, 0o644)
    p.write_bytes(bytes(data))
    assert_bad(ledger, 3, "corrupted")
    with pytest.raises(IntegrityError):
        ledger.load_delta(ledger.get_seq(3))
    p.write_bytes(bytes(data[:-10]))  # truncated
    assert_bad(ledger, 3)
    with pytest.raises(IntegrityError):
        ledger.load_delta(ledger.get_seq(3))


def test_orphan_object_and_temp_file_are_listed_but_not_errors(ledger):
    sha, _ = ledger.objects.put(delta(99).to_bytes())
    tmp = ledger.objects.root / "ab" / ".tmp-leftover"
    tmp.parent.mkdir(exist_ok=True)
    tmp.write_bytes(b"half an object")
    rep = ledger.verify()
    assert rep.ok and rep.orphans == [sha] and rep.temp_files == [str(tmp)]
    assert rep.rows == 6 and rep.objects_checked == 4


# --- subprocess helpers -------------------------------------------------------------------
def spawn(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, WRITER, "--wait", *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
                            env={**os.environ, **(env or {})})


def wait_ready(p: subprocess.Popen, timeout: float = 60.0) -> None:
    ready, _, _ = select.select([p.stdout], [], [], timeout)
    assert ready, "writer did not start"
    line = p.stdout.readline()
    assert line.strip() == "ready", (line, p.stderr.read() if p.poll() is not None else "")


def go(p: subprocess.Popen) -> None:
    p.stdin.write("go\n")
    p.stdin.flush()


def committed(out: str) -> list[tuple[int, str]]:
    return [(int(s), i) for s, i in (line.split() for line in out.splitlines() if line.strip())]


# --- SIGKILL during appends ---------------------------------------------------------------
def test_sigkill_during_appends_leaves_a_valid_ledger(tmp_path, deltas_dir):
    L = Ledger.create(tmp_path, MODEL)
    seed = int(os.environ.get("KLEDGER_FAULT_SEED") or random.randrange(2**32))  # rerun a failure with it
    rng = random.Random(seed)
    trials, by_writers, stats = 6, 0, []
    procs: list[subprocess.Popen] = []

    def writer(trial: int) -> subprocess.Popen:  # each trial its own objects, so every kill can hit a put
        procs.append(spawn(str(L.root), str(deltas_dir), "loop", "30", env={"WRITER_OFFSET": str(30 * trial)}))
        return procs[-1]

    nxt = writer(0)
    try:
        for trial in range(trials):
            p = nxt
            wait_ready(p)
            nxt = writer(trial + 1) if trial + 1 < trials else None  # imports meanwhile
            before = L.count()
            go(p)
            time.sleep(rng.uniform(0.05, 1.0))
            p.send_signal(signal.SIGKILL)
            out, err = p.communicate(timeout=30)
            assert p.returncode == -signal.SIGKILL, err
            rep = L.verify()
            stats.append((len(committed(out)), rep.rows - before, len(rep.orphans), len(rep.temp_files)))
            assert rep.ok, (seed, trial, rep.to_json())  # no row without its object, chain intact
            ids = {e.id: e.seq for e in L.events()}
            for seq, eid in committed(out):  # what the writer saw committed is durable
                assert ids.get(eid) == seq, (seed, trial)
            assert rep.rows >= before + len(committed(out))
            by_writers += rep.rows - before
            # a new append (with an object) still works, and the ledger stays valid
            ev = L.append("add", request={"prompt": f"after kill {trial}", "target_new": " y"}, delta=delta(trial))
            assert L.head() == ev and L.load_delta(ev).tensors.keys() == {"w", "b"}
            assert L.verify().ok
    finally:
        for q in procs:
            if q.poll() is None:
                q.kill()
                q.communicate()
    print(f"KLEDGER_FAULT_SEED={seed} (committed, rows, orphans, temp files) per kill: {stats}")
    assert by_writers > 0, f"the writers never got to append; the kills tested nothing (seed {seed})"
    assert [e.seq for e in L.events(newest_first=False)] == list(range(L.count()))


# --- concurrency --------------------------------------------------------------------------
def test_two_writers_append_every_event_exactly_once(tmp_path, deltas_dir):
    L = Ledger.create(tmp_path, MODEL)
    n = 8
    ps = [spawn(str(L.root), str(deltas_dir), str(n), f"writer{k}", env={"WRITER_OFFSET": str(100 * k)})
          for k in range(2)]
    try:
        for p in ps:
            wait_ready(p)
        for p in ps:
            go(p)
        reads = 0
        while any(p.poll() is None for p in ps):  # readers keep working while writers write
            assert L.count() >= 1
            reads += 1
            time.sleep(0.05)
        outs = [p.communicate(timeout=60) for p in ps]
    finally:
        for p in ps:
            if p.poll() is None:
                p.kill()
    for p, (out, err) in zip(ps, outs):
        assert p.returncode == 0, err
        assert len(committed(out)) == n
    assert L.count() == 1 + 2 * n
    rep = L.verify()
    assert rep.ok and rep.orphans == [] and rep.objects_checked == 2 * n and rep.temp_files == []
    evs = L.events(newest_first=False)
    assert len({e.delta_sha256 for e in evs[1:]}) == 2 * n
    assert [e.seq for e in evs] == list(range(1 + 2 * n))
    for prev, e in zip(evs, evs[1:]):  # the head was read under the lock: a straight history
        assert e.parent == prev.id and e.prev_hash == prev.hash
    ids = {e.id: e.seq for e in evs}
    for out, _ in outs:
        seqs = [seq for seq, eid in committed(out)]
        assert all(ids[eid] == seq for seq, eid in committed(out)) and seqs == sorted(seqs)
    assert len(L.active()) == 2 * n


def test_busy_lock_fails_fast_and_readers_still_work(tmp_path, deltas_dir):
    L = Ledger.create(tmp_path, MODEL)
    L.append("add", request={"prompt": "one", "target_new": " x"}, delta=delta(1))
    p = spawn(str(L.root), str(deltas_dir), "1", env={"KLEDGER_LOCK_TIMEOUT": "0.5"})
    try:
        wait_ready(p)
        with L.write_lock():
            t0 = time.monotonic()
            go(p)
            out, err = p.communicate(timeout=60)
            elapsed = time.monotonic() - t0
            assert [e.seq for e in L.events()] == [1, 0]  # reading needs no write lock
            assert L.head().seq == 1
            with pytest.raises(LedgerBusyError):  # and in-process appends wait, then give up too
                L.append("audit", message="x", lock_timeout=0.2)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == LedgerBusyError.exit_code == 75, err
    assert "LedgerBusyError" in err and "write lock" in err and out.strip() == ""
    assert 0.5 <= elapsed < 15
    assert L.count() == 2
    # once the lock is free, appends go through
    L.append("add", request={"prompt": "two", "target_new": " x"}, delta=delta(2))
    assert L.count() == 3 and L.verify().ok


def test_consistently_rewritten_chain_is_caught_by_an_anchor(tmp_path):
    """Rewriting a row and re-hashing every later row passes plain verify; an anchor catches it."""
    from kledger.ledger.store import Ledger as _Ledger

    led = _Ledger.create(tmp_path, {"fingerprint": "x"})
    for i in range(3):
        led.append("audit", metrics={"i": i})
    anchor = led.events(limit=1)[0].hash
    rewrite_chain(led, 1, "metrics", {"i": 99})
    assert led.verify().ok  # consistent rewrite: the chain alone cannot tell
    rep = led.verify(anchor=anchor)
    assert not rep.ok and "anchor" in rep.problem
