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
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, NamedTuple, Sequence

import duckdb

from kledger.ledger.canonical import canonical_json, sha256_hex
from kledger.ledger.errors import (
    IntegrityError, KledgerError, LedgerBusyError, NotFoundError, StateError, UsageError,
)
from kledger.ledger.objects import ObjectStore
from kledger.ledger.records import DELTA_EVENT_TYPES, EVENT_TYPES, MODEL_EVENT_TYPES, Event

if TYPE_CHECKING:  # torch is imported only when a delta is decoded (load_delta)
    from kledger.ledger.deltas import Delta

log = logging.getLogger(__name__)

DIRNAME = ".kledger"
DB_NAME = "ledger.duckdb"
SCHEMA_VERSION = 1
DEFAULT_BRANCH = "main"
GENESIS = "0" * 64
_BRANCH_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,99}$")

_COLUMNS = (
    "seq", "id", "type", "parent", "parents", "branch", "created_at", "request", "method", "config",
    "ensemble", "metrics", "target", "message", "delta_sha256", "delta_bytes", "prev_hash", "hash",
)
_JSON_COLUMNS = ("parents", "request", "config", "ensemble", "metrics")
_PARENT = _COLUMNS.index("parent")
_SCHEMA = """
CREATE TABLE schema_version (version INTEGER NOT NULL, created_at VARCHAR NOT NULL);
CREATE TABLE events (
    seq BIGINT PRIMARY KEY,
    id VARCHAR NOT NULL UNIQUE,
    type VARCHAR NOT NULL,
    parent VARCHAR,
    parents VARCHAR NOT NULL,
    branch VARCHAR NOT NULL,
    created_at VARCHAR NOT NULL,
    request VARCHAR,
    method VARCHAR,
    config VARCHAR,
    ensemble VARCHAR,
    metrics VARCHAR,
    target VARCHAR,
    message VARCHAR,
    delta_sha256 VARCHAR,
    delta_bytes BIGINT,
    prev_hash VARCHAR NOT NULL,
    hash VARCHAR NOT NULL
);
"""


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")


def row_hash(body: dict[str, Any]) -> str:
    return sha256_hex(body["prev_hash"] + canonical_json(body) + (body.get("delta_sha256") or ""))


class DeltaRef(NamedTuple):
    """An active delta event by reference: what materialising needs of it."""

    id: str
    delta_sha256: str


def _row_to_event(row: Sequence[Any]) -> Event:
    d = dict(zip(_COLUMNS, row))
    for k in _JSON_COLUMNS:
        v = d[k]
        d[k] = None if v is None else [] if v == "[]" else json.loads(v)  # "[]": most rows' parents
    d["parents"] = tuple(d["parents"] or ())
    return Event(**d)


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


@dataclass
class VerifyReport:
    rows: int = 0
    objects_checked: int = 0
    bad_row: int | None = None  # seq of the first bad row
    problem: str | None = None
    orphans: list[str] = field(default_factory=list)
    temp_files: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.problem is None

    def to_json(self) -> dict:
        return {
            "ok": self.ok, "rows": self.rows, "objects_checked": self.objects_checked,
            "bad_row": self.bad_row, "problem": self.problem, "orphans": self.orphans,
            "temp_files": self.temp_files, "seconds": round(self.seconds, 3),
            "rows_per_s": round(self.rows / self.seconds, 1) if self.seconds else None,
        }


class Ledger:
    """A handle on one ``.kledger/`` folder. Cheap to create; holds no connection open."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.db_path = self.root / DB_NAME
        self.objects = ObjectStore(self.root / "objects")
        self.lock_path = self.root / "write.lock"
        self.cache_dir = self.root / "cache"
        self._graph_cache: tuple[int, dict] | None = None
        self._supersedes: dict[str, tuple[str, ...]] = {}

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
            con.execute(_SCHEMA)
            con.execute("INSERT INTO schema_version VALUES (?, ?)", [SCHEMA_VERSION, _now()])
            body = {
                "seq": 0, "type": "init", "parent": None, "parents": [], "branch": DEFAULT_BRANCH,
                "created_at": _now(), "request": None, "method": None,
                "config": {"model": model, "schema_version": SCHEMA_VERSION}, "ensemble": None,
                "metrics": None, "target": None, "message": message or "init", "delta_sha256": None,
                "delta_bytes": None, "prev_hash": GENESIS,
            }
            h = row_hash(body)
            _insert(con, body, h)
            con.execute("CHECKPOINT")
        finally:
            con.close()
        os.replace(tmp_db, root / DB_NAME)
        (root / "HEAD").write_text(DEFAULT_BRANCH + "\n")
        return cls(root)

    @classmethod
    def open(cls, explicit: str | os.PathLike | None = None, cwd: str | os.PathLike | None = None) -> "Ledger":
        return cls(find_ledger(explicit, cwd))

    # --- connections ---------------------------------------------------------------------
    @contextlib.contextmanager
    def _connect(self, read_only: bool = True) -> Iterator[duckdb.DuckDBPyConnection]:
        if getattr(self, "_session_con", None) is not None:
            if not read_only:
                raise StateError("expected no write inside a read session (Ledger.session), found one")
            yield self._session_con
            return
        deadline = time.monotonic() + float(os.environ.get("KLEDGER_READ_TIMEOUT", "15"))
        delay = 0.01
        while True:
            try:
                con = duckdb.connect(str(self.db_path), read_only=read_only)
                break
            except duckdb.IOException as exc:
                if "lock" not in str(exc).lower() or time.monotonic() > deadline:
                    raise LedgerBusyError(f"expected to open {self.db_path}, found it locked: {exc}") from None
                time.sleep(delay)
                delay = min(delay * 2, 0.2)
        try:
            yield con
        finally:
            con.close()

    @contextlib.contextmanager
    def session(self) -> Iterator["Ledger"]:
        """Hold one read-only connection for a burst of reads (a CLI read command, a merge plan).

        Opening a DuckDB connection costs milliseconds, and a command reads many times. While
        the session lasts, other processes cannot append (DuckDB's file lock), and this handle
        cannot write: keep sessions short and never compute an edit inside one. Nested sessions
        reuse the outer one.
        """
        if getattr(self, "_session_con", None) is not None:
            yield self
            return
        with self._connect() as con:
            self._session_con = con
            try:
                yield self
            finally:
                self._session_con = None

    @contextlib.contextmanager
    def write_lock(self, timeout: float | None = None) -> Iterator[None]:
        """Exclusive OS lock across processes; waits up to ``timeout`` s, then LedgerBusyError."""
        timeout = float(os.environ.get("KLEDGER_LOCK_TIMEOUT", "30")) if timeout is None else timeout
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)  # no O_APPEND: pwrite below
        try:
            deadline = time.monotonic() + timeout
            told = False
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise LedgerBusyError(
                            f"expected the ledger write lock within {timeout:g} s, found it still held"
                            f" ({self._lock_holder()}); try again later"
                        ) from None
                    if not told:
                        log.warning("waiting for the ledger write lock (%s)", self._lock_holder())
                        told = True
                    time.sleep(0.05)
            # who holds it, for the busy message; fixed width, so no truncate (which costs ms here)
            os.pwrite(fd, f"pid {os.getpid():<12}\n".encode(), 0)
            yield
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _lock_holder(self) -> str:
        try:
            return self.lock_path.read_text().strip() or "unknown holder"
        except OSError:
            return "unknown holder"

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
            row = con.execute(f"SELECT {', '.join(_COLUMNS)} FROM events WHERE seq = ?", [seq]).fetchone()
        if row is None:
            raise NotFoundError(f"expected an event with sequence number {seq}, found none")
        return _row_to_event(row)

    def get(self, ident: str) -> Event:
        """An event by id or unique id prefix (at least 4 hex digits)."""
        ident = ident.strip().lower()
        if not re.fullmatch(r"[0-9a-f]{4,64}", ident):
            raise NotFoundError(f"expected an event id (4–64 hex digits), found {ident!r}")
        with self._connect() as con:
            if len(ident) >= 12:  # a whole id: equality (3x cheaper than LIKE on a cold database)
                rows = con.execute(f"SELECT {', '.join(_COLUMNS)} FROM events WHERE id = ? ORDER BY seq LIMIT 2",
                                   [ident[:12]]).fetchall()
            else:  # a prefix: find the (at most two) rows first, then read them whole
                seqs = [r[0] for r in con.execute("SELECT seq FROM events WHERE id LIKE ? ORDER BY seq LIMIT 2",
                                                  [ident + "%"]).fetchall()]
                rows = con.execute(f"SELECT {', '.join(_COLUMNS)} FROM events WHERE seq IN"
                                   f" ({', '.join('?' for _ in seqs)}) ORDER BY seq", seqs).fetchall() if seqs else []
        # ids are hash[:12]: a longer ref (up to the full hash) must match the hash, not just the id
        rows = [r for r in rows if r[_COLUMNS.index("hash")].startswith(ident)]
        if not rows:
            raise NotFoundError(f"expected an event with id {ident!r}, found none")
        if len(rows) > 1:
            raise UsageError(f"event id prefix {ident!r} is ambiguous; give more digits")
        return _row_to_event(rows[0])

    def events(self, *, branch: str | None = None, types: Sequence[str] | None = None,
               limit: int | None = None, newest_first: bool = True, upto: int | None = None,
               since: int | None = None) -> list[Event]:
        """Rows in sequence order (newest first by default); ``upto``/``since``: only rows with
        ``since < seq <= upto``."""
        sql = f"SELECT {', '.join(_COLUMNS)} FROM events"
        where, args = [], []
        if upto is not None:
            where.append("seq <= ?")
            args.append(int(upto))
        if since is not None:
            where.append("seq > ?")
            args.append(int(since))
        if branch is not None:
            where.append("branch = ?")
            args.append(branch)
        if types:
            where.append(f"type IN ({', '.join('?' for _ in types)})")
            args.extend(types)
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY seq " + ("DESC" if newest_first else "ASC")
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        with self._connect() as con:
            return [_row_to_event(r) for r in con.execute(sql, args).fetchall()]

    def iter_events(self, batch: int = 2000) -> Iterator[Event]:
        """Every event in sequence order, streamed in batches (constant memory)."""
        last = -1
        while True:
            with self._connect() as con:
                rows = con.execute(
                    f"SELECT {', '.join(_COLUMNS)} FROM events WHERE seq > ? ORDER BY seq LIMIT ?", [last, batch]
                ).fetchall()
            if not rows:
                return
            for r in rows:
                yield _row_to_event(r)
            last = rows[-1][0]

    # --- refs and branches ---------------------------------------------------------------
    def current_branch(self) -> str:
        try:
            name = (self.root / "HEAD").read_text().strip()
        except FileNotFoundError:
            return DEFAULT_BRANCH
        return name or DEFAULT_BRANCH

    def set_current_branch(self, name: str) -> None:
        self.branch_head(name)  # must exist
        tmp = self.root / f"HEAD.{os.getpid()}.tmp"
        tmp.write_text(name + "\n")
        os.replace(tmp, self.root / "HEAD")

    def branches(self) -> dict[str, Event]:
        with self._connect() as con:
            names = [r[0] for r in con.execute("SELECT DISTINCT branch FROM events ORDER BY branch").fetchall()]
        return {n: self.branch_head(n) for n in names}

    def branch_head(self, branch: str | None = None) -> Event:
        branch = branch or self.current_branch()
        with self._connect() as con:
            ev = _head(con, branch)
        if ev is None:
            raise NotFoundError(f"expected a branch named {branch!r}, found none")
        return ev

    def _maybe_head(self, branch: str) -> Event | None:
        with self._connect() as con:
            return _head(con, branch)

    def head(self) -> Event:
        return self.branch_head(self.current_branch())

    def resolve(self, ref: str | None = "HEAD") -> Event:
        """``HEAD``, ``HEAD~N``, a branch name (``NAME~N``), or an event id (prefix)."""
        ref = (ref or "HEAD").strip()
        m = re.fullmatch(r"(.+?)(?:~(\d*))?", ref)
        base, back = m.group(1), m.group(2)
        steps = 0 if back is None else (int(back) if back else 1)
        if base == "HEAD":
            ev = self.head()
        else:
            branch_names = None
            if _BRANCH_RE.match(base):
                with self._connect() as con:
                    branch_names = con.execute("SELECT 1 FROM events WHERE branch = ? LIMIT 1", [base]).fetchone()
            ev = self.branch_head(base) if branch_names else self.get(base)
        for i in range(steps):
            if ev.parent is None:
                raise NotFoundError(f"expected {ref!r} to name an event, but the history has only {i} ancestors")
            ev = self.get(ev.parent)
        return ev

    # --- the model at a version ----------------------------------------------------------
    def _graph(self) -> dict[str, Any]:
        """Compact DAG of all events (cached per ledger length)."""
        with self._connect() as con:
            n = int(con.execute("SELECT count(*) FROM events").fetchone()[0])
            if self._graph_cache and self._graph_cache[0] == n:
                return self._graph_cache[1]
            rows = con.execute(
                "SELECT seq, id, type, parent, parents, target, delta_sha256,"
                " CASE WHEN type = 'merge' THEN config END FROM events ORDER BY seq"
            ).fetchall()
        g = {r[1]: (r[0], r[2], r[3], _parents(r[4]), r[5], r[6]) for r in rows}
        # merge events may list events they take out of the active set (see ``_live``)
        self._supersedes = {r[1]: tuple((json.loads(r[7]) or {}).get("supersedes") or ()) for r in rows
                            if r[7] is not None}
        self._graph_cache = (n, g)
        return g

    def _live(self, anc: Iterable[str], g: dict[str, Any] | None = None,
              sup: dict[str, tuple[str, ...]] | None = None) -> list[str]:
        """Ids of the delta events in effect over ``anc`` (a set of events closed under parents).

        The active-set rule, the same for a straight history, a branch and a merge:

        * an ``add``/``forget``/``learn``/``merge`` event that carries a delta is live from its row on;
        * a ``revert`` takes its target out;
        * a ``merge`` event whose config lists ``supersedes`` takes those events out (the losing
          side of a hard conflict, or the side edits that a ``resolve`` merge recomputed in one
          solve); reverting such a merge brings them back.

        Since the set is taken over every ancestor (``parent`` and the merge's ``parents``), a
        merge's active set is the three-way sum: the merge base's edits plus what each side
        added minus what each side reverted. A revert made on one side only stays in effect
        after the merge (as a change does in git), and an edit reverted on both sides leaves
        once. Returned in sequence order.
        """
        if g is None:
            g = self._graph()
            sup = getattr(self, "_supersedes", {})
        sup = sup or {}
        live: dict[str, None] = {}
        dropped_by: dict[str, set[str]] = {}
        for eid in sorted(anc, key=lambda i: g[i][0]):
            _, typ, _, _, target, dsha = g[eid]
            if typ in DELTA_EVENT_TYPES and dsha:
                live[eid] = None
            elif typ == "revert" and target:
                live.pop(target, None)
                for s in sup.get(target, ()):  # reverting a merge restores what it superseded
                    holders = dropped_by.get(s)
                    if holders and target in holders:
                        holders.discard(target)
                        if not holders:
                            live[s] = None
            if typ == "merge":
                for s in sup.get(eid, ()):
                    if s in live or dropped_by.get(s):
                        live.pop(s, None)
                        dropped_by.setdefault(s, set()).add(eid)
        return sorted(live, key=lambda i: g[i][0])

    def ancestors(self, event: Event) -> set[str]:
        g = self._graph()
        seen, stack = set(), [event.id]
        while stack:
            eid = stack.pop()
            if eid in seen or eid not in g:
                continue
            seen.add(eid)
            _, _, parent, parents, _, _ = g[eid]
            if parent:
                stack.append(parent)
            stack.extend(parents)
        return seen

    def active(self, ref: str | Event = "HEAD") -> list[Event]:
        """Delta-carrying events in effect at ``ref``, in sequence order (reverts applied)."""
        ev = ref if isinstance(ref, Event) else self.resolve(ref)
        return self.events_by_ids(self._live(self.ancestors(ev)))

    def active_refs(self, ref: str | Event = "HEAD") -> list["DeltaRef"]:
        """``active(ref)`` as (id, delta_sha256) pairs, read from the event graph alone: no row is
        decoded (materialising 10,000 events spent 0.4 s turning rows into events it did not need)."""
        ev = ref if isinstance(ref, Event) else self.resolve(ref)
        anc = self.ancestors(ev)
        g = self._graph()
        return [DeltaRef(i, g[i][5]) for i in self._live(anc)]

    def active_among(self, ids: Iterable[str | Event], ref: str | Event = "HEAD") -> set[str]:
        """Which of the events ``ids`` are active at ``ref``.

        Only what can change these events' state is read: whatever does (a revert, a merge that
        supersedes one of them, the revert of such a merge) comes after the oldest of them and
        is an ancestor of ``ref``. The ancestors are found as runs of rows in SQL
        (:meth:`_ancestry`), so ``log -n 20`` and ``show`` of any event (recent or 50,000 events
        back) read a handful of rows, not every row since the event. Same answer as
        ``set(ids) & {e.id for e in active(ref)}``. ``ids`` may be given as events (saves a query).
        """
        items = list(ids)
        if not items:
            return set()
        ids = {i.id if isinstance(i, Event) else i for i in items}
        known = [i.seq for i in items if isinstance(i, Event)]
        with self.session():
            ev = ref if isinstance(ref, Event) else self.resolve(ref)
            with self._connect() as con:
                if len(known) == len(items):
                    lo = min(known)
                else:
                    lo = con.execute("SELECT min(seq) FROM events WHERE list_contains(?, id)",
                                     [sorted(ids)]).fetchone()[0]
                if lo is None or lo > ev.seq:
                    return set()
                # a short window (``log -n 20``, ``show`` of a recent event) is read whole in one
                # query; a long one as runs; and a history too tangled for runs is walked row by row
                anc = None if ev.seq - lo <= _WINDOW else self._ancestry(con, ev, lo)
                if anc is None:
                    return ids & set(self._live_since(con, ev, lo))
                where, args = anc.sql()
                merges = con.execute(f"SELECT {_G_COLUMNS}, config FROM events WHERE type = 'merge' AND seq >= ?"
                                     f" AND {where}", [lo, *args]).fetchall()
                sup = _supersedes(merges)
                # the events whose state matters: ``ids`` and the merges that take one of them out
                # (reverting such a merge brings them back), transitively
                rel = set(ids)
                grew = True
                while grew:
                    grew = False
                    for m in merges:
                        if m[1] not in rel and rel.intersection(sup.get(m[1], ())):
                            rel.add(m[1])
                            grew = True
                rows = con.execute(
                    f"SELECT {_G_COLUMNS} FROM events WHERE seq >= ? AND (list_contains(?, id)"
                    f" OR (type = 'revert' AND list_contains(?, target))) AND {where}",
                    [lo, sorted(rel), sorted(rel), *args],
                ).fetchall()
        g = _g_rows(rows + [m[:-1] for m in merges])
        return ids & set(self._live(g, g, sup))

    def active_count(self, ref: str | Event = "HEAD") -> int:
        """``len(active(ref))`` without reading every active event: delta events among the
        ancestors are counted in SQL; only reverts, merges and the events they name are read."""
        with self.session():
            ev = ref if isinstance(ref, Event) else self.resolve(ref)
            with self._connect() as con:
                anc = self._ancestry(con, ev, 0)
                if anc is None:
                    return len(self._live_since(con, ev, 0))
                where, args = anc.sql()
                delta = (f"type IN ({', '.join(repr(t) for t in DELTA_EVENT_TYPES)})"
                         " AND delta_sha256 IS NOT NULL")
                total = con.execute(f"SELECT count(*) FROM events WHERE {delta} AND {where}", args).fetchone()[0]
                merges = con.execute(f"SELECT {_G_COLUMNS}, config FROM events WHERE type = 'merge' AND {where}",
                                     args).fetchall()
                reverts = con.execute(f"SELECT {_G_COLUMNS} FROM events WHERE type = 'revert' AND {where}",
                                      args).fetchall()
                sup = _supersedes(merges)
                named = {r[5] for r in reverts if r[5]} | {m[1] for m in merges}
                named.update(s for ss in sup.values() for s in ss)
                touched = con.execute(f"SELECT {_G_COLUMNS} FROM events WHERE list_contains(?, id) AND {delta}"
                                      f" AND {where}", [sorted(named), *args]).fetchall() if named else []
        g = _g_rows(touched + reverts + [m[:-1] for m in merges])
        # every untouched delta event is live; the touched ones are live as the full rule says
        return int(total) - len(touched) + len(self._live(g, g, sup))

    def is_ancestor(self, event: Event, ref: str | Event = "HEAD") -> bool:
        """Whether ``event`` is ``ref`` or one of its ancestors (reads runs of rows, see ``_ancestry``)."""
        with self.session():
            ev = ref if isinstance(ref, Event) else self.resolve(ref)
            if event.id == ev.id:
                return True
            if event.seq > ev.seq:
                return False
            with self._connect() as con:
                if ev.seq - event.seq <= _WINDOW:
                    return event.id in self._walk_since(con, ev, event.seq)[0]
                anc = self._ancestry(con, ev, event.seq)
            if anc is None:
                return event.id in self.ancestors(ev)
            return anc.contains(event)

    def _ancestry(self, con: duckdb.DuckDBPyConnection, ev: Event, lo: int = 0,
                  max_runs: int = 256) -> "_Ancestry | None":
        """The ancestors of ``ev`` (itself included) with ``seq >= lo``, as runs of rows.

        A branch's model events normally form a chain: each one's ``parent`` is the previous
        model event of the same branch. One SQL query (``lag`` over the branch's rows) finds
        where the chain that ends at a given event starts; everything on that branch between
        the two is an ancestor. The walk then goes on from the start's parent (the event a
        branch was created at) and from every merge's ``parents`` inside the run. A straight
        history is one run, each branch or merge adds one. Parents always come before their
        children, so nothing below ``lo`` can lead back above it. Returns None past
        ``max_runs`` runs (the caller walks the rows instead).
        """
        runs: list[tuple[str, int, int]] = []
        extra: set[str] = set()  # ancestors that are not model events (an audit given as ``ref``)
        todo: list[tuple] = [(ev.seq, ev.branch, ev.type, ev.id, ev.parent, ev.parents)]
        wanted: set[str] = set()
        while todo or wanted:
            if not todo:
                todo = [(r[0], r[1], r[2], r[3], r[4], _parents(r[5])) for r in con.execute(
                    "SELECT seq, branch, type, id, parent, parents FROM events WHERE list_contains(?, id)"
                    " AND seq >= ?", [sorted(wanted), lo]).fetchall()]
                wanted = set()
                continue
            seq, branch, typ, eid, parent, parents = todo.pop()
            if seq < lo or eid in extra:
                continue
            if typ not in MODEL_EVENT_TYPES:
                extra.add(eid)
                wanted.update(p for p in (parent, *parents) if p)
                continue
            if any(b == branch and a <= seq <= z for b, a, z in runs):
                continue
            start = con.execute(
                f"SELECT max(seq) FROM (SELECT seq, parent, lag(id) OVER (ORDER BY seq) AS prev FROM events"
                f" WHERE branch = ? AND seq BETWEEN ? AND ? AND {_MODEL_SQL})"
                " WHERE prev IS NULL OR parent IS DISTINCT FROM prev", [branch, lo, seq]).fetchone()[0]
            runs.append((branch, int(start), seq))
            if len(runs) > max_runs:
                return None
            for s, p, ps in con.execute(
                    f"SELECT seq, parent, parents FROM events WHERE branch = ? AND seq BETWEEN ? AND ?"
                    f" AND {_MODEL_SQL} AND (seq = ? OR parents <> '[]')", [branch, start, seq, start]).fetchall():
                if s == start and p:
                    wanted.add(p)
                wanted.update(_parents(ps))
        return _Ancestry(runs, extra)

    def _walk_since(self, con: duckdb.DuckDBPyConnection, ev: Event, lo: int
                    ) -> tuple[set[str], dict[str, tuple], dict[str, tuple[str, ...]]]:
        """The ancestors of ``ev`` from ``lo`` on, found by reading every row in between and
        walking the links; with the rows' graph and the merges' supersedes lists."""
        rows = con.execute(
            f"SELECT {_G_COLUMNS}, CASE WHEN type = 'merge' THEN config END FROM events"
            " WHERE seq >= ? AND seq <= ? ORDER BY seq", [lo, ev.seq]).fetchall()
        g = _g_rows([r[:-1] for r in rows])
        sup = _supersedes(rows)
        seen, stack = set(), [ev.id]
        while stack:
            eid = stack.pop()
            if eid in seen or eid not in g:
                continue
            seen.add(eid)
            _, _, parent, parents, _, _ = g[eid]
            if parent:
                stack.append(parent)
            stack.extend(parents)
        return seen, g, sup

    def _live_since(self, con: duckdb.DuckDBPyConnection, ev: Event, lo: int) -> list[str]:
        """``_live`` over the ancestors of ``ev`` from ``lo`` on, reading every row in between
        (short windows, and the fallback for histories of very many branches)."""
        seen, g, sup = self._walk_since(con, ev, lo)
        return self._live(seen, g, sup)

    def events_by_ids(self, ids: Sequence[str]) -> list[Event]:
        """The events with these (full) ids, in sequence order."""
        if not ids:
            return []
        with self._connect() as con:
            if len(ids) <= 1000:
                rows = con.execute(f"SELECT {', '.join(_COLUMNS)} FROM events WHERE id IN"
                                   f" ({', '.join('?' for _ in ids)}) ORDER BY seq", list(ids)).fetchall()
            else:  # one hash semi-join (chunks of 1000 ids each scanned the table: 10 s at 100,000)
                rows = con.execute(f"SELECT {', '.join(_COLUMNS)} FROM events WHERE id IN"
                                   " (SELECT unnest(?::VARCHAR[])) ORDER BY seq", [list(ids)]).fetchall()
        return [_row_to_event(r) for r in rows]

    def load_deltas(self, events: Sequence[Event | DeltaRef], workers: int | None = None) -> list["Delta"]:
        """``load_delta`` for many events (or ``DeltaRef``s): objects are read, hash-checked (once)
        and decoded in a thread pool (file reads, hashing and safetensors decoding release the GIL)."""
        from concurrent.futures import ThreadPoolExecutor

        from kledger.ledger.deltas import Delta

        for ev in events:
            if not ev.delta_sha256:
                raise StateError(f"expected event {ev.id} to carry a delta, found a"
                                 f" {getattr(ev, 'type', 'delta-less')} event without one")

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
    def append(
        self,
        type: str,
        *,
        request: Any = None,
        method: str | None = None,
        config: Any = None,
        ensemble: Any = None,
        metrics: Any = None,
        target: str | None = None,
        message: str | None = None,
        delta: Delta | bytes | None = None,
        branch: str | None = None,
        parent: str | None = None,
        parents: Sequence[str] = (),
        expect_head: str | None = None,
        lock_timeout: float | None = None,
        check: Callable[["Ledger", Event], None] | None = None,
    ) -> Event:
        """Append one event. The delta object is stored first (idempotent, content-addressed),
        then, under the write lock, the row is validated against the current head and inserted.

        ``expect_head``: refuse if the branch head moved since the edit was computed (another
        writer appended meanwhile), like a non-fast-forward push. ``check(ledger, head)`` runs
        under the lock for extra validation (e.g. that a revert's target is active).
        """
        if type not in EVENT_TYPES:
            raise UsageError(f"expected an event type in {EVENT_TYPES}, found {type!r}")
        delta_sha = delta_bytes = None
        if delta is not None:
            data = delta if isinstance(delta, bytes) else delta.to_bytes()
            delta_sha, delta_bytes = self.objects.put(data)
        branch = branch or self.current_branch()
        if not _BRANCH_RE.match(branch) or branch == "HEAD":
            raise UsageError(f"expected a branch name of letters, digits and ._/-, found {branch!r}")
        # JSON must be canonical-able before we take the lock
        for name, value in (("request", request), ("config", config), ("ensemble", ensemble), ("metrics", metrics)):
            try:
                canonical_json(value)
            except (TypeError, ValueError) as exc:
                raise UsageError(f"{name} must be JSON without NaN/Inf, found: {exc}") from None
        with self.write_lock(lock_timeout):
            self._graph_cache = None
            if check is not None:  # checks read through their own (read-only) connections
                check(self, self._maybe_head(branch))
            with self._connect(read_only=False) as con:
                last_seq, last_hash = con.execute(
                    "SELECT seq, hash FROM events WHERE seq = (SELECT max(seq) FROM events)").fetchone()
                head_seq = _head_seq(con, branch, last_seq)
                head_id = None if head_seq is None else con.execute(
                    "SELECT id FROM events WHERE seq = ?", [head_seq]).fetchone()[0]
                if head_id is None and type != "branch":
                    raise NotFoundError(f"expected a branch named {branch!r}, found none")
                if expect_head is not None and head_id is not None and head_id != expect_head:
                    raise StateError(
                        f"expected branch {branch!r} at {expect_head}, found it moved to {head_id} while the"
                        " edit was computed; run the command again"
                    )
                if parent is None and head_id is not None and type in MODEL_EVENT_TYPES + ("audit",):
                    parent = head_id
                body = {
                    "seq": int(last_seq) + 1, "type": type, "parent": parent, "parents": list(parents),
                    "branch": branch, "created_at": _now(), "request": request, "method": method,
                    "config": config, "ensemble": ensemble, "metrics": metrics, "target": target,
                    "message": message, "delta_sha256": delta_sha, "delta_bytes": delta_bytes,
                    "prev_hash": last_hash,
                }
                h = row_hash(body)
                con.execute("BEGIN TRANSACTION")
                _insert(con, body, h)
                con.execute("COMMIT")
            self._graph_cache = None
            return _event_from_body(body, h)

    def append_many(self, items: Sequence[dict[str, Any]], *, branch: str | None = None,
                    lock_timeout: float | None = None, workers: int = 4) -> list[Event]:
        """Append many events under one lock in one transaction (bulk imports, synthetic ledgers).

        Each item holds ``append``'s keyword arguments (``type`` required; ``branch``, ``check``
        and ``expect_head`` are not taken per item). Delta objects are stored first, in a thread
        pool; rows get ``append``'s validation and hash chain, and a model event without an
        explicit ``parent`` follows the previous model event, as ``append`` would. Every row
        commits or none does.
        """
        from concurrent.futures import ThreadPoolExecutor

        branch = branch or self.current_branch()
        if not _BRANCH_RE.match(branch) or branch == "HEAD":
            raise UsageError(f"expected a branch name of letters, digits and ._/-, found {branch!r}")
        allowed = {"type", "request", "method", "config", "ensemble", "metrics", "target", "message",
                   "delta", "parent", "parents"}
        for i, it in enumerate(items):
            extra = set(it) - allowed
            if extra:
                raise UsageError(f"append_many item {i}: unsupported fields {sorted(extra)}")
            if it.get("type") not in EVENT_TYPES or it.get("type") == "branch":
                raise UsageError(f"append_many item {i}: expected an event type in {EVENT_TYPES} other than"
                                 f" 'branch', found {it.get('type')!r}")
            for name in ("request", "config", "ensemble", "metrics"):
                try:
                    canonical_json(it.get(name))
                except (TypeError, ValueError) as exc:
                    raise UsageError(f"append_many item {i}: {name} must be JSON without NaN/Inf, found: {exc}") from None

        def put(it: dict[str, Any]) -> tuple[str | None, int | None]:
            d = it.get("delta")
            if d is None:
                return None, None
            return self.objects.put(d if isinstance(d, bytes) else d.to_bytes())

        with ThreadPoolExecutor(max(1, workers)) as pool:
            stored = list(pool.map(put, items))
        out: list[Event] = []
        with self.write_lock(lock_timeout):
            self._graph_cache = None
            with self._connect(read_only=False) as con:
                head = _head(con, branch)
                if head is None:
                    raise NotFoundError(f"expected a branch named {branch!r}, found none")
                last = con.execute("SELECT seq, hash FROM events ORDER BY seq DESC LIMIT 1").fetchone()
                seq, prev, head_id = int(last[0]), last[1], head.id
                rows, now = [], _now()
                for it, (sha, nbytes) in zip(items, stored):
                    typ = it["type"]
                    parent = it.get("parent")
                    if parent is None and typ in MODEL_EVENT_TYPES + ("audit",):
                        parent = head_id
                    seq += 1
                    body = {
                        "seq": seq, "type": typ, "parent": parent, "parents": list(it.get("parents") or ()),
                        "branch": branch, "created_at": now, "request": it.get("request"),
                        "method": it.get("method"), "config": it.get("config"), "ensemble": it.get("ensemble"),
                        "metrics": it.get("metrics"), "target": it.get("target"), "message": it.get("message"),
                        "delta_sha256": sha, "delta_bytes": nbytes, "prev_hash": prev,
                    }
                    h = row_hash(body)
                    rows.append(_insert_values(body, h))
                    out.append(_event_from_body(body, h))
                    prev = h
                    if typ in MODEL_EVENT_TYPES:
                        head_id = h[:12]
                con.execute("BEGIN TRANSACTION")
                try:
                    one = "(" + ", ".join("?" for _ in _COLUMNS) + ")"
                    for i in range(0, len(rows), 256):  # multi-row VALUES: executemany costs ms per row
                        chunk = rows[i : i + 256]
                        con.execute(f"INSERT INTO events ({', '.join(_COLUMNS)}) VALUES "
                                    + ", ".join(one for _ in chunk), [v for r in chunk for v in r])
                    con.execute("COMMIT")
                except BaseException:
                    con.execute("ROLLBACK")
                    raise
            self._graph_cache = None
        return out

    def revert(self, target_ref: str, *, message: str | None = None, branch: str | None = None,
               lock_timeout: float | None = None) -> Event:
        """Append a compensating event: the target's delta leaves the model (exactly)."""
        target = self.resolve(target_ref)

        def check(ledger: "Ledger", head: Event | None) -> None:
            if target.type not in DELTA_EVENT_TYPES:
                raise StateError(f"expected an edit event (add/merge/forget/learn) to revert, found a {target.type} event {target.id}")
            # reads only the rows that can change the target's state (held under the write lock)
            with ledger.session():
                if head is None or target.id not in ledger.active_among([target], head):
                    if head is None or not ledger.is_ancestor(target, head):
                        raise StateError(f"event {target.id} is not in the history of branch"
                                         f" {branch or ledger.current_branch()!r}")
                    by = ledger._reverted_by(head, target.id)
                    raise StateError(f"event {target.id} is already reverted" + (f" by {by}" if by else ""))

        return self.append("revert", target=target.id, message=message or f"revert {target.id}", branch=branch,
                           check=check, lock_timeout=lock_timeout,
                           request=target.request, method=target.method)

    def _active_ids(self, head: Event) -> list[str]:
        return self._live(self.ancestors(head))

    def _reverted_by(self, head: Event, target: str) -> str | None:
        g = self._graph()
        anc = self.ancestors(head)
        for eid in anc:
            if g[eid][1] == "revert" and g[eid][4] == target:
                return eid
        for eid in anc:  # or taken out by a merge that superseded it
            if target in getattr(self, "_supersedes", {}).get(eid, ()):
                return eid
        return None

    # --- integrity -----------------------------------------------------------------------
    def verify(self, *, check_objects: bool = True, progress: Callable[[int], None] | None = None,
               anchor: str | None = None) -> VerifyReport:
        """Stream every row in order: recompute hashes and the chain, check objects, list orphans.

        A chain rewritten consistently from some row on (every later hash recomputed) is only
        detectable against a hash kept outside the ledger: ``anchor`` is such a row hash (from an
        earlier ``kledger log --json``, an export's ``kledger.json``, a nightly audit log); the
        verified chain must contain it, which pins every row up to the anchor.
        """
        rep = VerifyReport()
        t0 = time.perf_counter()
        prev_hash = GENESIS
        expected_seq = 0
        try:
            # memory stays constant: rows come in batches, each with where its rows' parents are
            # (looked up in SQL, instead of a set of every id seen so far)
            for ev, parent_ok in self._verify_batches():
                rep.rows += 1
                if progress:
                    progress(1)
                problem = None
                body = ev.body()
                if ev.seq != expected_seq:
                    problem = f"expected sequence number {expected_seq}, found {ev.seq} (a row is missing)"
                elif ev.prev_hash != prev_hash:
                    problem = "prev_hash does not match the previous row's hash (chain broken)"
                elif row_hash(body) != ev.hash:
                    problem = "content does not match its hash (row changed after it was written)"
                elif ev.id != ev.hash[:12]:
                    problem = f"id {ev.id} does not match its hash {ev.hash[:12]}"
                elif ev.type not in EVENT_TYPES:
                    problem = f"unknown event type {ev.type!r}"
                elif ev.parent and not parent_ok:
                    problem = f"parent {ev.parent} is not an earlier event"
                elif check_objects and ev.delta_sha256:
                    try:
                        data = self.objects.get(ev.delta_sha256)
                        if len(data) != ev.delta_bytes:
                            problem = f"delta object has {len(data)} bytes, the row records {ev.delta_bytes}"
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
            with self._connect() as con:
                hit = con.execute("SELECT seq FROM events WHERE hash = ?", [anchor]).fetchone()
            if hit is None:
                rep.problem = (f"expected the anchor hash {anchor[:16]}… in the verified chain, found no such row"
                               " (the history was rewritten, or the anchor belongs to another ledger)")
        if rep.ok:
            # both sorted by hash: a merge of two streams, not a set of every referenced object
            refs = self._referenced_objects()
            ref = next(refs, None)
            for sha in self.objects:
                while ref is not None and ref < sha:
                    ref = next(refs, None)
                if ref != sha:
                    rep.orphans.append(sha)
        rep.temp_files = [str(p) for p in self.objects.temp_files()]
        rep.seconds = time.perf_counter() - t0
        return rep

    def _verify_batches(self, batch: int = 2000) -> Iterator[tuple[Event, bool]]:
        """Every row in sequence order with whether its parent (if any) is an earlier row; one
        short connection per batch, so writers can append while a long verify runs."""
        last = -1
        sql = f"SELECT {', '.join(_COLUMNS)} FROM events WHERE seq >= ? AND seq < ? ORDER BY seq"
        while True:
            with self._connect() as con:
                # a range of seq, not ``seq > last LIMIT n``: DuckDB then reads only the column
                # segments of these rows (zone maps), so time and memory per batch stay constant
                rows = con.execute(sql, [last + 1, last + 1 + batch]).fetchall()
                if not rows:  # a gap of a whole batch (rows missing): go on from the next row
                    nxt = con.execute("SELECT min(seq) FROM events WHERE seq > ?", [last]).fetchone()[0]
                    if nxt is None:
                        return
                    rows = con.execute(sql, [nxt, nxt + batch]).fetchall()
                # where this batch's parents are (a semi-join built on the batch's parent ids only)
                wanted = sorted({r[_PARENT] for r in rows if r[_PARENT]})
                found = dict(con.execute(
                    "SELECT id, min(seq) FROM events WHERE id IN (SELECT unnest(?::VARCHAR[])) GROUP BY id",
                    [wanted]).fetchall()) if wanted else {}
            for r in rows:
                p = r[_PARENT]
                yield _row_to_event(r), not p or found.get(p, r[0]) < r[0]
            last = rows[-1][0]

    def _referenced_objects(self, groups: int = 16) -> Iterator[str]:
        """The delta objects rows refer to, sorted, without duplicates: read one range of hash
        prefixes at a time (1/16 of them per connection), so memory does not grow with the ledger."""
        hexdigits = "0123456789abcdef"
        for i in range(groups):
            lo = hexdigits[i * 16 // groups]
            hi = hexdigits[(i + 1) * 16 // groups] if i + 1 < groups else "g"
            with self._connect() as con:
                page = [r[0] for r in con.execute(
                    "SELECT DISTINCT delta_sha256 FROM events WHERE delta_sha256 >= ? AND delta_sha256 < ? ORDER BY 1",
                    [lo, hi]).fetchall()]
            yield from page


#: ``active_among``/``is_ancestor`` read a window of at most this many rows whole (one query);
#: longer ones go through ``_ancestry``'s runs
_WINDOW = 1000

#: heads are looked for among the newest rows first: a filter on ``seq`` lets DuckDB skip the
#: older column segments (zone maps), which matters because every command opens a cold database
_TAIL = 2048


def _head_seq(con: duckdb.DuckDBPyConnection, branch: str, last: int | None = None) -> int | None:
    """The sequence number of ``branch``'s newest model event (None: no such branch)."""
    if last is None:
        last = con.execute("SELECT max(seq) FROM events").fetchone()[0]
    for lo in (last - _TAIL, -1):  # the newest rows first, then all of them
        seq = con.execute(f"SELECT max(seq) FROM events WHERE seq > ? AND branch = ? AND {_MODEL_SQL}",
                          [lo, branch]).fetchone()[0]
        if seq is not None or lo < 0:
            return seq
    return None


def _head(con: duckdb.DuckDBPyConnection, branch: str) -> Event | None:
    seq = _head_seq(con, branch)
    if seq is None:
        return None
    row = con.execute(f"SELECT {', '.join(_COLUMNS)} FROM events WHERE seq = ?", [seq]).fetchone()
    return _row_to_event(row)


_MODEL_SQL = f"type IN ({', '.join(repr(t) for t in MODEL_EVENT_TYPES)})"
#: the columns of the compact event graph (``Ledger._graph``'s tuples, with the id second)
_G_COLUMNS = "seq, id, type, parent, parents, target, delta_sha256"


def _parents(text: str | None) -> tuple[str, ...]:
    return () if not text or text == "[]" else tuple(json.loads(text))


def _g_rows(rows: Iterable[Sequence[Any]]) -> dict[str, tuple]:
    """``_G_COLUMNS`` rows → ``{id: (seq, type, parent, parents, target, delta_sha256)}``."""
    return {r[1]: (r[0], r[2], r[3], _parents(r[4]), r[5], r[6]) for r in rows}


def _supersedes(rows: Iterable[Sequence[Any]]) -> dict[str, tuple[str, ...]]:
    """Rows whose last column is a merge's config → ``{id: events it supersedes}``."""
    return {r[1]: tuple((json.loads(r[-1]) or {}).get("supersedes") or ()) for r in rows if r[-1] is not None}


@dataclass(frozen=True)
class _Ancestry:
    """Ancestors of an event as runs ``(branch, first seq, last seq)`` of model events, plus the
    ids of ancestors that are not model events (an audit given as the ref)."""

    runs: list[tuple[str, int, int]]
    extra: set[str]

    def sql(self) -> tuple[str, list[Any]]:
        """A WHERE condition selecting the model events among the ancestors, and its arguments."""
        if not self.runs:
            return "FALSE", []
        runs = " OR ".join("(branch = ? AND seq BETWEEN ? AND ?)" for _ in self.runs)
        return f"({_MODEL_SQL} AND ({runs}))", [v for run in self.runs for v in run]

    def contains(self, ev: Event) -> bool:
        if ev.type not in MODEL_EVENT_TYPES:
            return ev.id in self.extra
        return any(b == ev.branch and a <= ev.seq <= z for b, a, z in self.runs)


def _insert(con: duckdb.DuckDBPyConnection, body: dict[str, Any], h: str) -> None:
    con.execute(f"INSERT INTO events ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' for _ in _COLUMNS)})",
                _insert_values(body, h))


def _insert_values(body: dict[str, Any], h: str) -> list[Any]:
    values = []
    for c in _COLUMNS:
        if c == "id":
            values.append(h[:12])
        elif c == "hash":
            values.append(h)
        elif c in _JSON_COLUMNS:
            v = body[c]
            values.append(None if v is None and c != "parents" else canonical_json(v if v is not None else []))
        else:
            values.append(body[c])
    return values


def _event_from_body(body: dict[str, Any], h: str) -> Event:
    d = dict(body)
    d["parents"] = tuple(d["parents"])
    # round-trip JSON so the returned event equals what a later read gives
    for k in ("request", "config", "ensemble", "metrics"):
        if d[k] is not None:
            d[k] = json.loads(canonical_json(d[k]))
    return Event(id=h[:12], hash=h, **d)
