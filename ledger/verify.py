"""``verify``: recompute the hash chain over every row, check every object, list orphans.

Memory stays constant however long the ledger: rows are read in batches of ``seq`` ranges (one
short connection each, so writers can append while a long verify runs), each batch with where its
rows' parents are (looked up in SQL, instead of a set of every id seen so far), and the objects
rows refer to are merged with the object store's listing as two sorted streams.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

import duckdb

from kledger.ledger.deltainfo import summary_from_bytes
from kledger.ledger.errors import KledgerError
from kledger.ledger.records import EVENT_TYPES, Event
from kledger.ledger.rows import GENESIS, PARENT, SELECT, row_problem, to_event

if TYPE_CHECKING:
    from kledger.ledger.store import Ledger


@dataclass
class VerifyReport:
    rows: int = 0
    objects_checked: int = 0
    bad_row: int | None = None  # seq of the first bad row
    problem: str | None = None
    orphans: list[str] = field(default_factory=list)
    temp_files: list[str] = field(default_factory=list)
    snapshots_checked: int = 0  # cache/snapshots files whose bytes match the ledger's record
    snapshots_recomputed: int = 0  # … also recomputed from the base and the deltas (``deep``)
    pending_snapshots: list[str] = field(default_factory=list)  # recorded by the next append
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.problem is None

    def to_json(self) -> dict:
        return {
            "ok": self.ok, "rows": self.rows, "objects_checked": self.objects_checked,
            "bad_row": self.bad_row, "problem": self.problem, "orphans": self.orphans,
            "temp_files": self.temp_files, "snapshots_checked": self.snapshots_checked,
            "snapshots_recomputed": self.snapshots_recomputed, "pending_snapshots": self.pending_snapshots,
            "seconds": round(self.seconds, 3),
            "rows_per_s": round(self.rows / self.seconds, 1) if self.seconds else None,
        }


def verify(ledger: "Ledger", *, check_objects: bool = True, progress: Callable[[int], None] | None = None,
           anchor: str | None = None, deep_model: Any = None) -> VerifyReport:
    """Stream every row in order: recompute hashes and the chain, check objects, list orphans.

    A chain rewritten consistently from some row on (every later hash recomputed) is only
    detectable against a hash kept outside the ledger: ``anchor`` is such a row hash (from an
    earlier ``kledger log --json``, an export's ``kledger.json``, a nightly audit log); the
    verified chain must contain it, which pins every row up to the anchor.

    Derived data: every snapshot in ``cache/snapshots`` must hash to what the ledger recorded
    for it (``Ledger.record_snapshot``); its values are recomputed from the base weights and the
    deltas only with ``deep_model`` (a freshly loaded base model: ``kledger verify --deep``).
    """
    rep = VerifyReport()
    t0 = time.perf_counter()
    prev_hash = GENESIS
    expected_seq = 0
    try:
        for ev, parent_ok in batches(ledger):
            rep.rows += 1
            if progress:
                progress(1)
            problem = _row_problem(ev, parent_ok, expected_seq, prev_hash)
            if problem is None and check_objects and ev.delta_sha256:
                try:
                    data = ledger.objects.get(ev.delta_sha256)
                    if len(data) != ev.delta_bytes:
                        problem = f"delta object has {len(data)} bytes, the row records {ev.delta_bytes}"
                    else:  # decoded, not only hashed: shapes, dtypes, indices in range, finite values
                        summary_from_bytes(data)
                    rep.objects_checked += 1
                except KledgerError as exc:
                    problem = str(exc)
            if problem:
                rep.bad_row, rep.problem = ev.seq, f"row {ev.seq} (event {ev.id}): {problem}"
                break
            prev_hash = ev.hash
            expected_seq += 1
    except duckdb.Error as exc:
        rep.problem = f"ledger database unreadable: {exc}"
    if rep.ok and anchor is not None:
        anchor = anchor.strip().lower()
        with ledger._connect() as con:
            hit = con.execute("SELECT seq FROM events WHERE hash = ?", [anchor]).fetchone()
        if hit is None:
            rep.problem = (f"expected the anchor hash {anchor[:16]}… in the verified chain, found no such row"
                           " (the history was rewritten, or the anchor belongs to another ledger)")
    if rep.ok:
        # both sorted by hash: a merge of two streams, not a set of every referenced object
        refs = referenced_objects(ledger)
        ref = next(refs, None)
        for sha in ledger.objects:
            while ref is not None and ref < sha:
                ref = next(refs, None)
            if ref != sha:
                rep.orphans.append(sha)
    if rep.ok:
        links = _links(ledger)
        if links:
            rep.problem = (f"expected no links inside {ledger.root}, found {len(links)}: {', '.join(links[:3])}"
                           " (kledger refuses to read or write through them)")
    if rep.ok:
        _check_snapshots(ledger, rep, deep_model)
    rep.temp_files = [str(p) for p in ledger.objects.temp_files()]
    rep.seconds = time.perf_counter() - t0
    return rep


def _row_problem(ev: Event, parent_ok: bool, expected_seq: int, prev_hash: str) -> str | None:
    if ev.seq != expected_seq:
        return f"expected sequence number {expected_seq}, found {ev.seq} (a row is missing)"
    if ev.prev_hash != prev_hash:
        return "prev_hash does not match the previous row's hash (chain broken)"
    own = row_problem(ev)
    if own:
        return own
    if ev.type not in EVENT_TYPES:
        return f"unknown event type {ev.type!r}"
    if ev.parent and not parent_ok:
        return f"parent {ev.parent} is not an earlier event"
    return None


def batches(ledger: "Ledger", batch: int = 2000) -> Iterator[tuple[Event, bool]]:
    """Every row in sequence order with whether its parent (if any) is an earlier row; one
    short connection per batch, so writers can append while a long verify runs."""
    last = -1
    sql = f"{SELECT} WHERE seq >= ? AND seq < ? ORDER BY seq"
    while True:
        with ledger._connect() as con:
            # a range of seq, not ``seq > last LIMIT n``: DuckDB then reads only the column
            # segments of these rows (zone maps), so time and memory per batch stay constant
            rows = con.execute(sql, [last + 1, last + 1 + batch]).fetchall()
            if not rows:  # a gap of a whole batch (rows missing): go on from the next row
                nxt = con.execute("SELECT min(seq) FROM events WHERE seq > ?", [last]).fetchone()[0]
                if nxt is None:
                    return
                rows = con.execute(sql, [nxt, nxt + batch]).fetchall()
            # where this batch's parents are (a semi-join built on the batch's parent ids only)
            wanted = sorted({r[PARENT] for r in rows if r[PARENT]})
            found = dict(con.execute(
                "SELECT id, min(seq) FROM events WHERE id IN (SELECT unnest(?::VARCHAR[])) GROUP BY id",
                [wanted]).fetchall()) if wanted else {}
        for r in rows:
            p = r[PARENT]
            yield to_event(r), not p or found.get(p, r[0]) < r[0]
        last = rows[-1][0]


def referenced_objects(ledger: "Ledger", groups: int = 16) -> Iterator[str]:
    """The delta objects rows refer to, sorted, without duplicates: read one range of hash
    prefixes at a time (1/16 of them per connection), so memory does not grow with the ledger."""
    hexdigits = "0123456789abcdef"
    for i in range(groups):
        lo = hexdigits[i * 16 // groups]
        hi = hexdigits[(i + 1) * 16 // groups] if i + 1 < groups else "g"
        with ledger._connect() as con:
            page = [r[0] for r in con.execute(
                "SELECT DISTINCT delta_sha256 FROM events WHERE delta_sha256 >= ? AND delta_sha256 < ? ORDER BY 1",
                [lo, hi]).fetchall()]
        yield from page


def _check_snapshots(ledger: "Ledger", rep: VerifyReport, deep_model: Any = None) -> None:
    """Each snapshot file: recorded in the ledger, its bytes hash to the record, its header
    matches; with ``deep_model`` its values are recomputed (``compose.recompute_snapshot``)."""
    import hashlib
    import json

    from kledger.ledger.deltainfo import read_header

    folder = ledger.cache_dir / "snapshots"
    if not folder.is_dir():
        return
    for path in sorted(folder.glob("*.safetensors")):
        where = f"cache/snapshots/{path.name}"
        if path.is_symlink():
            rep.problem = f"{where}: a link inside the ledger (refused)"
            return
        rec = ledger.snapshot_record(path.name)
        if rec is None:
            if path.with_name(path.name + ".pending").is_file():
                rep.pending_snapshots.append(path.name)
                continue
            rep.problem = f"{where}: a snapshot the ledger has no record of (delete it; it is rebuilt)"
            return
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            head = fh.read(8)
            h.update(head)
            n = int.from_bytes(head, "little") if len(head) == 8 else 0
            first = fh.read(min(n, 100 << 20))
            h.update(first)
            for block in iter(lambda: fh.read(16 << 20), b""):
                h.update(block)
        if h.hexdigest() != rec.get("sha256"):
            rep.problem = (f"{where}: expected the content hash {str(rec.get('sha256'))[:16]}… the ledger recorded,"
                           f" found {h.hexdigest()[:16]}… (the cache file was changed; delete it)")
            return
        try:
            header, _ = read_header(head + first)
        except KledgerError as exc:
            rep.problem = f"{where}: {exc}"
            return
        meta = header.pop("__metadata__", None) or {}
        if meta.get("ids_sha256") != rec.get("ids_sha256") or sorted(header) != sorted(rec.get("tensors") or header):
            rep.problem = f"{where}: expected the events and tensors the ledger recorded, found others"
            return
        rep.snapshots_checked += 1
        if deep_model is not None:
            from kledger.ledger.compose import recompute_snapshot

            problem = recompute_snapshot(ledger, deep_model, path)
            if problem:
                rep.problem = f"{where}: {problem}"
                return
            rep.snapshots_recomputed += 1


def _links(ledger: "Ledger") -> list[str]:
    """Links anywhere inside the ledger folder (not followed)."""
    import os

    found = []
    for dirpath, dirnames, filenames in os.walk(ledger.root):  # os.walk does not follow links
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            if os.path.islink(p):
                found.append(os.path.relpath(p, ledger.root))
    return sorted(found)
