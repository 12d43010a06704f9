"""The append-only ledger: a DuckDB table of events with a hash chain, plus the object store.

On disk (``.kledger/``)::

    ledger.duckdb      events (insert-only) and schema_version
    objects/ab/cd….safetensors   content-addressed deltas (immutable)
    HEAD               the current branch name (a working-copy pointer, like git's HEAD)
    write.lock         OS lock held only around an append
    cache/             derived, rebuildable data (key statistics, …)

Rows are never updated or deleted. ``hash = sha256(prev_hash ‖ canonical_json(body) ‖
delta_sha256)``; ``verify`` recomputes the chain. DuckDB lets one process hold the file
read-write, so connections are short: readers open read-only and retry briefly while a writer
appends; a writer takes ``write.lock`` (bounded wait, then ``LedgerBusyError``) only for the
append itself, never while an edit is computed.

``Ledger`` is the handle: connections, the lock, appends, reverts. The table's schema, row codec
and plain queries are in ``kledger.ledger.rows``; refs and branches in ``kledger.ledger.refs`` and
snapshot records in ``kledger.ledger.snapshots`` (both parts of ``Ledger``); ancestry and the
active-set rule in ``kledger.ledger.graph`` (``Ledger.graph``); ``verify`` in ``kledger.ledger.verify``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Iterable, Iterator, Mapping, Sequence

import duckdb

from kledger.ledger import rows
from kledger.ledger.errors import HeadMovedError, NotFoundError, StateError, UsageError
from kledger.ledger.connection import Connections
from kledger.ledger.graph import Graph
from kledger.ledger.objects import ObjectStore
from kledger.ledger.records import DELTA_EVENT_TYPES, MODEL_EVENT_TYPES, Event
from kledger.ledger.refs import _BRANCH_RE, DEFAULT_BRANCH, Refs
from kledger.ledger.rows import GENESIS, DeltaRef, row_hash  # noqa: F401  (part of this module's API)
from kledger.ledger.snapshots import Snapshots

if TYPE_CHECKING:  # torch is imported only when a delta is decoded (load_delta)
    from kledger.ledger.deltas import Delta
    from kledger.ledger.verify import VerifyReport

DIRNAME = ".kledger"
DB_NAME = "ledger.duckdb"
SCHEMA_VERSION = 1


def find_ledger(explicit: str | os.PathLike | None = None, cwd: str | os.PathLike | None = None) -> Path:
    """``--ledger``/``KLEDGER_DIR`` if given, else walk up from ``cwd`` looking for ``.kledger/``."""
    explicit = explicit or os.environ.get("KLEDGER_DIR")
    if explicit:
        p = Path(explicit).expanduser()
        if p.name != DIRNAME and (p / DIRNAME).is_dir():
            p = p / DIRNAME
        if not (p / DB_NAME).is_file():
            raise NotFoundError(f"expected a kledger ledger at {p} ({DB_NAME} inside), found none")
        return p
    here = Path(cwd or os.getcwd()).resolve()
    for d in (here, *here.parents):
        if (d / DIRNAME / DB_NAME).is_file():
            return d / DIRNAME
    raise NotFoundError(
        f"expected a .kledger/ ledger in {here} or a parent folder, found none; run `kledger init --model M`"
    )


class Ledger(Refs, Snapshots):
    """A handle on one ``.kledger/`` folder. Cheap to create; holds no connection open."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.db_path = self.root / DB_NAME
        self.objects = ObjectStore(self.root / "objects")
        self.lock_path = self.root / "write.lock"
        self.cache_dir = self.root / "cache"
        self.db = Connections(self.db_path, self.lock_path)
        self.graph = Graph(self)  # ancestry and the active-set rule

    # --- creation / opening --------------------------------------------------------------
    @classmethod
    def create(cls, parent_dir: str | os.PathLike, model: dict[str, Any], message: str | None = None) -> "Ledger":
        root = Path(parent_dir) / DIRNAME
        if (root / DB_NAME).exists():
            raise StateError(f"expected no ledger in {parent_dir}, found one at {root}")
        (root / "objects").mkdir(parents=True, exist_ok=True)
        (root / "cache").mkdir(exist_ok=True)
        tmp_db = root / (DB_NAME + ".init")
        if tmp_db.exists():
            tmp_db.unlink()
        con = duckdb.connect(str(tmp_db))
        try:
            con.execute(rows.SCHEMA)
            con.execute("INSERT INTO schema_version VALUES (?, ?)", [SCHEMA_VERSION, rows.now()])
            body = rows.build_body(0, {"type": "init", "config": {"model": model, "schema_version": SCHEMA_VERSION},
                             "message": message or "init"}, DEFAULT_BRANCH, rows.now(), GENESIS, None, None, None)
            rows.insert(con, [rows.values(body, row_hash(body))])
            con.execute("CHECKPOINT")
        finally:
            con.close()
        os.replace(tmp_db, root / DB_NAME)
        (root / "HEAD").write_text(DEFAULT_BRANCH + "\n")
        return cls(root)

    @classmethod
    def open(cls, explicit: str | os.PathLike | None = None, cwd: str | os.PathLike | None = None) -> "Ledger":
        return cls(find_ledger(explicit, cwd))

    # --- connections (``kledger.ledger.connection``) -------------------------------------
    def _connect(self, read_only: bool = True, timeout: float | None = None) -> ContextManager[duckdb.DuckDBPyConnection]:
        return self.db.connect(read_only, timeout)

    def session(self) -> ContextManager["Ledger"]:
        """Hold one read-only connection for a burst of reads (see ``Connections.session``)."""
        return self.db.session(self)

    def write_lock(self, timeout: float | None = None) -> ContextManager[None]:
        """Exclusive OS lock across processes; waits up to ``timeout`` s, then LedgerBusyError."""
        return self.db.write_lock(timeout)

    # --- reads ---------------------------------------------------------------------------
    def schema_version(self) -> int:
        with self._connect() as con:
            return int(con.execute("SELECT max(version) FROM schema_version").fetchone()[0])

    def count(self) -> int:
        with self._connect() as con:
            return int(con.execute("SELECT count(*) FROM events").fetchone()[0])

    def base_model(self) -> dict[str, Any]:
        return self.get_seq(0).config["model"]

    def get_seq(self, seq: int) -> Event:
        with self._connect() as con:
            return rows.by_seq(con, seq)

    def get(self, ident: str) -> Event:
        """An event by id or unique id prefix (at least 4 hex digits)."""
        with self._connect() as con:
            return rows.by_ident(con, ident)

    def events(self, *, branch: str | None = None, types: Sequence[str] | None = None,
               limit: int | None = None, newest_first: bool = True, upto: int | None = None,
               since: int | None = None) -> list[Event]:
        """Rows in sequence order (newest first by default); ``upto``/``since``: only rows with
        ``since < seq <= upto``."""
        with self._connect() as con:
            return rows.select(con, branch=branch, types=types, limit=limit, newest_first=newest_first,
                               upto=upto, since=since)

    def iter_events(self, batch: int = 2000) -> Iterator[Event]:
        """Every event in sequence order, streamed in batches (constant memory)."""
        last = -1
        while True:
            with self._connect() as con:
                page = con.execute(f"{rows.SELECT} WHERE seq > ? ORDER BY seq LIMIT ?", [last, batch]).fetchall()
            if not page:
                return
            for r in page:
                yield rows.to_event(r)
            last = page[-1][0]

    def check_rows(self, ids: Iterable[str], batch: int = 5000) -> int:
        """Hash-check the rows with these ids (``rows.check_event``: IntegrityError naming the
        first bad one); returns how many were checked. What materialise and revert use is checked
        this way before it is used."""
        ids = sorted(set(ids))
        for i in range(0, len(ids), batch):
            with self._connect() as con:
                for ev in rows.by_ids(con, ids[i : i + batch]):
                    rows.check_event(ev)
        return len(ids)

    def events_by_ids(self, ids: Sequence[str]) -> list[Event]:
        """The events with these (full) ids, in sequence order."""
        if not ids:
            return []
        with self._connect() as con:
            return rows.by_ids(con, ids)

    # --- the model at a version (``kledger.ledger.graph``) ---------------------------------
    def ancestors(self, event: Event) -> set[str]:
        return self.graph.ancestors(event)

    def active(self, ref: str | Event = "HEAD") -> list[Event]:
        """Delta-carrying events in effect at ``ref``, in sequence order (reverts applied)."""
        return self.events_by_ids(self.graph.active_ids(ref))

    def active_refs(self, ref: str | Event = "HEAD") -> list[DeltaRef]:
        """``active(ref)`` as (id, delta_sha256) pairs, read from the event graph alone: no row is
        decoded (materialising 10,000 events spent 0.4 s turning rows into events it did not need)."""
        return self.graph.active_refs(ref)

    def active_among(self, ids: Iterable[str | Event], ref: str | Event = "HEAD") -> set[str]:
        """Which of the events ``ids`` are active at ``ref`` (reading only the rows that matter)."""
        return self.graph.active_among(ids, ref)

    def active_count(self, ref: str | Event = "HEAD") -> int:
        """``len(active(ref))`` without reading every active event."""
        return self.graph.active_count(ref)

    def is_ancestor(self, event: Event, ref: str | Event = "HEAD") -> bool:
        """Whether ``event`` is ``ref`` or one of its ancestors."""
        return self.graph.is_ancestor(event, ref)

    # --- deltas --------------------------------------------------------------------------
    def load_deltas(self, events: Sequence[Event | DeltaRef], workers: int | None = None) -> list["Delta"]:
        """``load_delta`` for many events (or ``DeltaRef``s): objects are read, hash-checked (once)
        and decoded in a thread pool (file reads, hashing and safetensors decoding release the GIL)."""
        from concurrent.futures import ThreadPoolExecutor

        from kledger.ledger.deltas import Delta

        for ev in events:
            if not ev.delta_sha256:
                raise StateError(f"expected event {ev.id} to carry a delta, found a"
                                 f" {getattr(ev, 'type', 'delta-less')} event without one")
            if isinstance(ev, Event):  # a DeltaRef's row is checked by whoever read it (materialise)
                rows.check_event(ev)

        def one(ev: Event | DeltaRef) -> "Delta":
            return Delta.from_bytes(self.objects.get(ev.delta_sha256))  # get() checks the content hash

        n = workers or min(8, (os.cpu_count() or 1) + 2)
        if n <= 1 or len(events) < 8:
            return [one(e) for e in events]
        with ThreadPoolExecutor(n) as pool:
            return list(pool.map(one, events))

    def load_delta(self, event: Event) -> Delta:
        if not event.delta_sha256:
            raise StateError(f"expected event {event.id} to carry a delta, found a {event.type} event without one")
        rows.check_event(event)
        from kledger.ledger.deltas import Delta

        return Delta.from_bytes(self.objects.get(event.delta_sha256), expected_sha256=event.delta_sha256)

    def delta_summary(self, event: Event) -> dict[str, dict[str, Any]]:
        """``load_delta(event).summary()`` without importing torch (``kledger show`` starts fast);
        the object's content hash is checked. See ``kledger.ledger.deltainfo``."""
        if not event.delta_sha256:
            raise StateError(f"expected event {event.id} to carry a delta, found a {event.type} event without one")
        from kledger.ledger.deltainfo import summary_from_bytes

        return summary_from_bytes(self.objects.get(event.delta_sha256))

    # --- writes --------------------------------------------------------------------------
    def append(self, type: str, *, branch: str | None = None, expect_head: str | None = None,
               lock_timeout: float | None = None, check: Callable[["Ledger", Event | None], None] | None = None,
               **fields: Any) -> Event:
        """Append one event (``fields``: any of ``ITEM_FIELDS`` but ``type``; ``delta`` is a
        ``Delta`` or its bytes). The delta object is stored first (idempotent, content-addressed),
        then, under the write lock, the row is validated against the current head and inserted.

        ``expect_head``: refuse if the branch head moved since the edit was computed (another
        writer appended meanwhile), like a non-fast-forward push. ``check(ledger, head)`` runs
        under the lock for extra validation (e.g. that a revert's target is active).
        """
        return self._append([{"type": type, **fields}], branch, check=check, expect_head=expect_head,
                            lock_timeout=lock_timeout)[0]

    def append_many(self, items: Sequence[Mapping[str, Any]], *, branch: str | None = None,
                    lock_timeout: float | None = None, workers: int = 4) -> list[Event]:
        """Append many events under one lock in one transaction (bulk imports, synthetic ledgers).

        Each item holds ``append``'s fields (``type`` required, not ``branch``). Delta objects
        are stored first, in a thread pool; rows get ``append``'s validation and hash chain, and a
        model event without an explicit ``parent`` follows the previous model event, as
        ``append`` would. Every row commits or none does.
        """
        return self._append(items, branch, lock_timeout=lock_timeout, workers=workers, many=True)

    def _append(self, items: Sequence[Mapping[str, Any]], branch: str | None, *,
                check: Callable[["Ledger", Event | None], None] | None = None, expect_head: str | None = None,
                lock_timeout: float | None = None, workers: int = 1, many: bool = False) -> list[Event]:
        """What ``append`` and ``append_many`` share: validate, store objects, then under the lock
        build the rows on the current head and insert them in one transaction (rolled back on
        any error)."""
        branch = branch or self.current_branch()
        if not _BRANCH_RE.match(branch) or branch == "HEAD":
            raise UsageError(f"expected a branch name of letters, digits and ._/-, found {branch!r}")
        for i, it in enumerate(items):
            rows.check_item(it, f"append_many item {i}: " if many else "", allow_branch=not many)
        stored = self._store_objects(items, workers)
        out: list[Event] = []
        with self.write_lock(lock_timeout):
            self.graph.invalidate()
            if check is not None:  # checks read through their own (read-only) connections
                check(self, self._maybe_head(branch))
            with self._connect(read_only=False) as con:
                seq, prev = con.execute("SELECT seq, hash FROM events WHERE seq = (SELECT max(seq) FROM events)"
                                        ).fetchone()
                head_seq = rows.head_seq(con, branch, seq)
                head_id = None if head_seq is None else con.execute(
                    "SELECT id FROM events WHERE seq = ?", [head_seq]).fetchone()[0]
                if head_id is None and items[0]["type"] != "branch":
                    raise NotFoundError(f"expected a branch named {branch!r}, found none")
                if expect_head is not None and head_id is not None and head_id != expect_head:
                    raise HeadMovedError(
                        f"expected branch {branch!r} at {expect_head}, found it moved to {head_id} while the"
                        " edit was computed; run the command again"
                    )
                values, now = [], rows.now()
                for it, (sha, nbytes) in zip(items, stored):
                    seq += 1
                    body = rows.build_body(seq, it, branch, now, prev, sha, nbytes, head_id)
                    prev = row_hash(body)
                    values.append(rows.values(body, prev))
                    out.append(rows.event_from_body(body, prev))
                    if it["type"] in MODEL_EVENT_TYPES:
                        head_id = prev[:12]
                con.execute("BEGIN TRANSACTION")
                try:
                    rows.insert(con, values)
                    con.execute("COMMIT")
                except BaseException:
                    con.execute("ROLLBACK")
                    raise
                self._record_pending_snapshots(con)
            self.graph.invalidate()
        return out

    def _store_objects(self, items: Sequence[Mapping[str, Any]], workers: int) -> list[tuple[str | None, int | None]]:
        def put(it: Mapping[str, Any]) -> tuple[str | None, int | None]:
            d = it.get("delta")
            if d is None:
                return None, None
            return self.objects.put(d if isinstance(d, bytes) else d.to_bytes())

        if workers <= 1 or len(items) < 2:
            return [put(it) for it in items]
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(put, items))

    def revert(self, target_ref: str, *, message: str | None = None, branch: str | None = None,
               lock_timeout: float | None = None) -> Event:
        """Append a compensating event: the target's delta leaves the model (exactly)."""
        target = rows.check_event(self.resolve(target_ref))

        def check(ledger: "Ledger", head: Event | None) -> None:
            if head is not None:
                rows.check_event(head)
            if target.type not in DELTA_EVENT_TYPES:
                raise StateError(f"expected an edit event (add/merge/forget/learn) to revert, found a {target.type} event {target.id}")
            # reads only the rows that can change the target's state (held under the write lock)
            with ledger.session():
                if head is None or target.id not in ledger.active_among([target], head):
                    if head is None or not ledger.is_ancestor(target, head):
                        raise StateError(f"event {target.id} is not in the history of branch"
                                         f" {branch or ledger.current_branch()!r}")
                    by = ledger.graph.reverted_by(head, target.id)
                    raise StateError(f"event {target.id} is already reverted" + (f" by {by}" if by else ""))

        return self.append("revert", target=target.id, message=message or f"revert {target.id}", branch=branch,
                           check=check, lock_timeout=lock_timeout,
                           request=target.request, method=target.method)

    # --- integrity -----------------------------------------------------------------------
    def verify(self, *, check_objects: bool = True, progress: Callable[[int], None] | None = None,
               anchor: str | None = None, deep_model: Any = None) -> "VerifyReport":
        """Recompute the hash chain and check every object and cache file (see
        ``kledger.ledger.verify``); ``deep_model``: the base model, to recompute snapshots."""
        from kledger.ledger.verify import verify

        return verify(self, check_objects=check_objects, progress=progress, anchor=anchor, deep_model=deep_model)
