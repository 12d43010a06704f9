"""The events table: its schema, how rows become ``Event``s and back, and the plain queries.

Every function here takes an open DuckDB connection (``Ledger`` owns connections and the
write lock). Rows are never updated or deleted: ``hash = sha256(prev_hash ‖ canonical_json(body)
‖ delta_sha256)`` where ``body`` is every column except ``id`` and ``hash``; ``id = hash[:12]``.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

import duckdb

from kledger.ledger.canonical import canonical_json, sha256_hex
from kledger.ledger.errors import IntegrityError, NotFoundError, UsageError
from kledger.ledger.records import EVENT_TYPES, MODEL_EVENT_TYPES, Event

GENESIS = "0" * 64
COLUMNS = (
    "seq", "id", "type", "parent", "parents", "branch", "created_at", "request", "method", "config",
    "ensemble", "metrics", "target", "message", "delta_sha256", "delta_bytes", "prev_hash", "hash",
)
JSON_COLUMNS = ("parents", "request", "config", "ensemble", "metrics")
PARENT = COLUMNS.index("parent")
SELECT = f"SELECT {', '.join(COLUMNS)} FROM events"
SCHEMA = """
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
#: a SQL condition selecting model events (the events that make up branch histories)
MODEL_SQL = f"type IN ({', '.join(repr(t) for t in MODEL_EVENT_TYPES)})"
#: heads are looked for among the newest rows first: a filter on ``seq`` lets DuckDB skip the
#: older column segments (zone maps), which matters because every command opens a cold database
TAIL = 2048


class DeltaRef(NamedTuple):
    """An active delta event by reference: what materialising needs of it."""

    id: str
    delta_sha256: str


def now() -> str:
    """A row's timestamp: UTC, ISO 8601, microseconds."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")


def row_hash(body: dict[str, Any]) -> str:
    return sha256_hex(body["prev_hash"] + canonical_json(body) + (body.get("delta_sha256") or ""))


def row_problem(ev: Event) -> str | None:
    """What is wrong with one row on its own (None: its hash matches its content)."""
    if row_hash(ev.body()) != ev.hash:
        return "content does not match its hash (row changed after it was written)"
    if ev.id != ev.hash[:12]:
        return f"id {ev.id} does not match its hash {ev.hash[:12]}"
    return None


def check_event(ev: Event) -> Event:
    """``ev`` if its row hash matches its content, else IntegrityError naming the row: every
    command that materialises or reverts checks each row it uses (one sha256 per row)."""
    problem = row_problem(ev)
    if problem:
        raise IntegrityError(f"row {ev.seq} (event {ev.id}): {problem}; nothing was done (run `kledger verify`)")
    return ev


def to_event(row: Sequence[Any]) -> Event:
    d = dict(zip(COLUMNS, row))
    for k in JSON_COLUMNS:
        v = d[k]
        d[k] = None if v is None else [] if v == "[]" else json.loads(v)  # "[]": most rows' parents
    d["parents"] = tuple(d["parents"] or ())
    return Event(**d)


def values(body: dict[str, Any], h: str) -> list[Any]:
    """The column values of a row with this body and hash, in ``COLUMNS`` order."""
    out = []
    for c in COLUMNS:
        if c == "id":
            out.append(h[:12])
        elif c == "hash":
            out.append(h)
        elif c in JSON_COLUMNS:
            v = body[c]
            out.append(None if v is None and c != "parents" else canonical_json(v if v is not None else []))
        else:
            out.append(body[c])
    return out


def event_from_body(body: dict[str, Any], h: str) -> Event:
    """The event a row with this body reads back as (JSON round-tripped, as a later read gives)."""
    d = dict(body)
    d["parents"] = tuple(d["parents"])
    for k in ("request", "config", "ensemble", "metrics"):
        if d[k] is not None:
            d[k] = json.loads(canonical_json(d[k]))
    return Event(id=h[:12], hash=h, **d)


def insert(con: duckdb.DuckDBPyConnection, rows: Sequence[list[Any]], per_statement: int = 256) -> None:
    """Insert column-value rows (multi-row VALUES: ``executemany`` costs milliseconds per row)."""
    one = "(" + ", ".join("?" for _ in COLUMNS) + ")"
    for i in range(0, len(rows), per_statement):
        chunk = rows[i : i + per_statement]
        con.execute(f"INSERT INTO events ({', '.join(COLUMNS)}) VALUES " + ", ".join(one for _ in chunk),
                    [v for r in chunk for v in r])


# --- queries ----------------------------------------------------------------------------------
def by_seq(con: duckdb.DuckDBPyConnection, seq: int) -> Event:
    row = con.execute(f"{SELECT} WHERE seq = ?", [seq]).fetchone()
    if row is None:
        raise NotFoundError(f"expected an event with sequence number {seq}, found none")
    return to_event(row)


def by_ident(con: duckdb.DuckDBPyConnection, ident: str) -> Event:
    """An event by id or unique id prefix (at least 4 hex digits; up to the full hash)."""
    ident = ident.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{4,64}", ident):
        raise NotFoundError(f"expected an event id (4–64 hex digits), found {ident!r}")
    if len(ident) >= 12:  # a whole id: equality (3x cheaper than LIKE on a cold database)
        rows = con.execute(f"{SELECT} WHERE id = ? ORDER BY seq LIMIT 2", [ident[:12]]).fetchall()
    else:  # a prefix: find the (at most two) rows first, then read them whole
        seqs = [r[0] for r in con.execute("SELECT seq FROM events WHERE id LIKE ? ORDER BY seq LIMIT 2",
                                          [ident + "%"]).fetchall()]
        rows = con.execute(f"{SELECT} WHERE seq IN ({', '.join('?' for _ in seqs)}) ORDER BY seq",
                           seqs).fetchall() if seqs else []
    # ids are hash[:12]: a longer ref (up to the full hash) must match the hash, not just the id
    rows = [r for r in rows if r[COLUMNS.index("hash")].startswith(ident)]
    if not rows:
        raise NotFoundError(f"expected an event with id {ident!r}, found none")
    if len(rows) > 1:
        raise UsageError(f"event id prefix {ident!r} is ambiguous; give more digits")
    return to_event(rows[0])


def select(con: duckdb.DuckDBPyConnection, *, branch: str | None = None, types: Sequence[str] | None = None,
           limit: int | None = None, newest_first: bool = True, upto: int | None = None,
           since: int | None = None) -> list[Event]:
    """Rows in sequence order (newest first by default); ``upto``/``since``: only rows with
    ``since < seq <= upto``."""
    where, args = [], []
    for cond, value in (("seq <= ?", None if upto is None else int(upto)),
                        ("seq > ?", None if since is None else int(since)), ("branch = ?", branch)):
        if value is not None:
            where.append(cond)
            args.append(value)
    if types:
        where.append(f"type IN ({', '.join('?' for _ in types)})")
        args.extend(types)
    sql = SELECT + (" WHERE " + " AND ".join(where) if where else "")
    sql += " ORDER BY seq " + ("DESC" if newest_first else "ASC")
    if limit is not None:
        sql += f" LIMIT {int(limit)}"
    return [to_event(r) for r in con.execute(sql, args).fetchall()]


def by_ids(con: duckdb.DuckDBPyConnection, ids: Sequence[str]) -> list[Event]:
    """The events with these (full) ids, in sequence order."""
    if not ids:
        return []
    if len(ids) <= 1000:
        rows = con.execute(f"{SELECT} WHERE id IN ({', '.join('?' for _ in ids)}) ORDER BY seq",
                           list(ids)).fetchall()
    else:  # one hash semi-join (chunks of 1000 ids each scanned the table: 10 s at 100,000)
        rows = con.execute(f"{SELECT} WHERE id IN (SELECT unnest(?::VARCHAR[])) ORDER BY seq", [list(ids)]).fetchall()
    return [to_event(r) for r in rows]


def head_seq(con: duckdb.DuckDBPyConnection, branch: str, last: int | None = None) -> int | None:
    """The sequence number of ``branch``'s newest model event (None: no such branch)."""
    if last is None:
        last = con.execute("SELECT max(seq) FROM events").fetchone()[0]
    for lo in (last - TAIL, -1):  # the newest rows first, then all of them
        seq = con.execute(f"SELECT max(seq) FROM events WHERE seq > ? AND branch = ? AND {MODEL_SQL}",
                          [lo, branch]).fetchone()[0]
        if seq is not None or lo < 0:
            return seq
    return None


def head(con: duckdb.DuckDBPyConnection, branch: str) -> Event | None:
    seq = head_seq(con, branch)
    return None if seq is None else by_seq(con, seq)


def parents_of(text: str | None) -> tuple[str, ...]:
    """The ``parents`` column as a tuple."""
    return () if not text or text == "[]" else tuple(json.loads(text))


def json_columns(items: Iterable[tuple[str, Any]]) -> None:
    """Raise UsageError unless every (name, value) is canonical JSON (no NaN/Inf, no objects)."""
    for name, value in items:
        try:
            canonical_json(value)
        except (TypeError, ValueError) as exc:
            raise UsageError(f"{name} must be JSON without NaN/Inf, found: {exc}") from None


#: what an appended event may carry (``append``'s keyword arguments, ``append_many``'s item keys)
ITEM_FIELDS = frozenset({"type", "request", "method", "config", "ensemble", "metrics", "target", "message",
                         "delta", "parent", "parents"})


def check_item(it: Mapping[str, Any], where: str, allow_branch: bool) -> None:
    """The one validator of what an append may write (raises UsageError)."""
    extra = set(it) - ITEM_FIELDS
    if extra:
        raise UsageError(f"{where}unsupported fields {sorted(extra)}")
    if it.get("type") not in EVENT_TYPES or (it.get("type") == "branch" and not allow_branch):
        other = "" if allow_branch else " other than 'branch'"
        raise UsageError(f"{where}expected an event type in {EVENT_TYPES}{other}, found {it.get('type')!r}")
    json_columns((f"{where}{name}", it.get(name)) for name in ("request", "config", "ensemble", "metrics"))


def build_body(seq: int, it: Mapping[str, Any], branch: str, now: str, prev: str, sha: str | None,
          nbytes: int | None, head_id: str | None) -> dict[str, Any]:
    """The one row builder: a row's hashed body. A model or audit event without an explicit
    ``parent`` follows the branch head ``head_id``."""
    parent = it.get("parent")
    if parent is None and head_id is not None and it["type"] in MODEL_EVENT_TYPES + ("audit",):
        parent = head_id
    return {
        "seq": seq, "type": it["type"], "parent": parent, "parents": list(it.get("parents") or ()),
        "branch": branch, "created_at": now, "request": it.get("request"), "method": it.get("method"),
        "config": it.get("config"), "ensemble": it.get("ensemble"), "metrics": it.get("metrics"),
        "target": it.get("target"), "message": it.get("message"), "delta_sha256": sha, "delta_bytes": nbytes,
        "prev_hash": prev,
    }
