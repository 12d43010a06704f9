"""Snapshot records bound to a ledger (``cache/snapshots``): a snapshot is used only if its bytes match
the hash the ledger database recorded for it.

``Snapshots`` is a part of ``kledger.ledger.store.Ledger`` (a mixin: it uses the handle's ``db``,
``cache_dir``, ``write_lock`` and ``_connect``); appends call ``_record_pending_snapshots``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import duckdb

from kledger.ledger.errors import KledgerError
from kledger.ledger import rows

log = logging.getLogger(__name__)


class Snapshots:
    """The snapshot-record part of ``Ledger``."""

    def record_snapshot(self, name: str, record: Mapping[str, Any]) -> bool:
        """Record a snapshot's content hash (and the hash of the last row it summarises) in the
        ledger database: a snapshot is used only if its bytes match what the ledger recorded, so
        editing a cache file and its neighbours cannot change a model. Written at once when this
        handle can (no read session held, the lock free); otherwise left as ``NAME.pending``
        beside the file and recorded by the next append. Returns whether it is recorded now."""
        pending = self.cache_dir / "snapshots" / (name + ".pending")
        if self.db._session_con is None:
            try:
                with self.write_lock(timeout=0.2), self._connect(read_only=False, timeout=0.5) as con:
                    _insert_snapshots(con, [(name, dict(record))])
                return True
            except (KledgerError, duckdb.Error, OSError):
                pass
        _write_private(pending, json.dumps(dict(record), sort_keys=True))
        return False

    def snapshot_record(self, name: str) -> dict[str, Any] | None:
        """What the ledger recorded for snapshot file ``name`` (None: nothing)."""
        with self._connect() as con:
            if not _has_table(con, "snapshots"):
                return None
            row = con.execute("SELECT record FROM snapshots WHERE name = ? ORDER BY created_at DESC LIMIT 1",
                              [name]).fetchone()
        return None if row is None else json.loads(row[0])

    def _record_pending_snapshots(self, con: duckdb.DuckDBPyConnection) -> None:
        """Record the snapshots left pending (called under the write lock by an append)."""
        folder = self.cache_dir / "snapshots"
        try:
            files = sorted(folder.glob("*.pending")) if folder.is_dir() else []
            if not files:
                return
            recs = [(f.name[: -len(".pending")], json.loads(f.read_text())) for f in files]
            _insert_snapshots(con, recs)
            for f in files:
                f.unlink(missing_ok=True)
        except (OSError, ValueError, duckdb.Error) as exc:  # a cache: never fails the append
            log.warning("could not record pending snapshots: %s", exc)


SNAPSHOTS_SQL = "CREATE TABLE IF NOT EXISTS snapshots (name VARCHAR NOT NULL, record VARCHAR NOT NULL, created_at VARCHAR NOT NULL)"


def _has_table(con: duckdb.DuckDBPyConnection, name: str) -> bool:
    return con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = ?", [name]).fetchone()[0] > 0


def _insert_snapshots(con: duckdb.DuckDBPyConnection, recs: Sequence[tuple[str, Mapping[str, Any]]]) -> None:
    con.execute(SNAPSHOTS_SQL)
    for name, rec in recs:
        con.execute("INSERT INTO snapshots VALUES (?, ?, ?)", [name, json.dumps(dict(rec), sort_keys=True), rows.now()])


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, refusing to follow a link at ``path``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)
