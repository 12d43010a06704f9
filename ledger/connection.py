"""Connections to a ledger's DuckDB file and its write lock.

DuckDB lets one process hold the file read-write, so connections are short: readers open
read-only and retry briefly (``KLEDGER_READ_TIMEOUT``, default 15 s) while a writer appends; a
writer takes ``write.lock`` (an OS lock; bounded wait ``KLEDGER_LOCK_TIMEOUT``, default 30 s,
then ``LedgerBusyError``) only for the append itself. A session holds one read-only connection
for a burst of reads.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterator

import duckdb

from kledger.ledger.errors import IntegrityError, LedgerBusyError, StateError

log = logging.getLogger(__name__)


#: what DuckDB says when another process holds the file (the only error that means "busy")
_LOCK_WORDS = ("could not set lock", "conflicting lock", "database is locked")
#: what DuckDB says about a file it cannot read as a database (an integrity failure, exit 4)
_DAMAGE_WORDS = ("corrupt", "checksum", "not a valid duckdb", "could not read enough bytes", "invalid database",
                 "unsupported version", "serialization error", "failed to deserialize")


def _is_lock_error(exc: BaseException) -> bool:
    return isinstance(exc, duckdb.IOException) and any(w in str(exc).lower() for w in _LOCK_WORDS)


def _is_damage(exc: BaseException) -> bool:
    return any(w in str(exc).lower() for w in _DAMAGE_WORDS)


def _damaged(path: Path, exc: BaseException) -> IntegrityError:
    text = " ".join(str(exc).split())
    return IntegrityError(f"expected {path} to be a readable DuckDB ledger database, found it damaged:"
                          f" {text[:300]}")


class Connections:
    """Opens connections to ``db_path`` and takes the lock at ``lock_path``; holds none itself
    except inside a ``session``."""

    def __init__(self, db_path: Path, lock_path: Path) -> None:
        self.db_path, self.lock_path = db_path, lock_path
        self._session_con: duckdb.DuckDBPyConnection | None = None

    @contextlib.contextmanager
    def connect(self, read_only: bool = True, timeout: float | None = None) -> Iterator[duckdb.DuckDBPyConnection]:
        if self._session_con is not None:
            if not read_only:
                raise StateError("expected no write inside a read session (Ledger.session), found one")
            yield self._session_con
            return
        deadline = time.monotonic() + (float(os.environ.get("KLEDGER_READ_TIMEOUT", "15")) if timeout is None
                                       else timeout)
        delay = 0.01
        while True:
            try:
                con = duckdb.connect(str(self.db_path), read_only=read_only)
                break
            except duckdb.Error as exc:
                if not _is_lock_error(exc):  # only a held lock is "busy"; anything else is damage
                    raise _damaged(self.db_path, exc) from None
                if time.monotonic() > deadline:
                    raise LedgerBusyError(f"expected to open {self.db_path}, found it locked: {exc}") from None
                time.sleep(delay)
                delay = min(delay * 2, 0.2)
        try:
            yield con
        except duckdb.Error as exc:
            if _is_damage(exc):
                raise _damaged(self.db_path, exc) from None
            raise
        finally:
            con.close()

    @contextlib.contextmanager
    def session(self, owner: Any = None) -> Iterator[Any]:
        """Hold one read-only connection for a burst of reads (a CLI read command, a merge plan).

        Opening a DuckDB connection costs milliseconds, and a command reads many times. While
        the session lasts, other processes cannot append (DuckDB's file lock), and this handle
        cannot write: keep sessions short and never compute an edit inside one. Nested sessions
        reuse the outer one.
        """
        if self._session_con is not None:
            yield owner
            return
        with self.connect() as con:
            self._session_con = con
            try:
                yield owner
            finally:
                self._session_con = None

    @contextlib.contextmanager
    def write_lock(self, timeout: float | None = None) -> Iterator[None]:
        """Exclusive OS lock across processes; waits up to ``timeout`` s, then LedgerBusyError."""
        timeout = float(os.environ.get("KLEDGER_LOCK_TIMEOUT", "30")) if timeout is None else timeout
        try:  # never through a link: the holder's pid is written into this file
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)  # no O_APPEND: pwrite below
        except OSError as exc:
            if self.lock_path.is_symlink():
                raise IntegrityError(f"expected {self.lock_path} to be a plain file, found a link (refused)") from None
            raise
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
