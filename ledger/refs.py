"""Refs and branches of a ledger: the ``HEAD`` file, branch heads, ``resolve`` and ``create_branch``.

``Refs`` is a part of ``kledger.ledger.store.Ledger`` (a mixin: it uses the handle's ``root``,
``_connect``, ``get`` and ``append``); ``check_branch_name`` is the one rule for new branch names.
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING, Any

from kledger.ledger import rows
from kledger.ledger.errors import IntegrityError, NotFoundError, StateError, UsageError
from kledger.ledger.records import Event

if TYPE_CHECKING:
    from kledger.ledger.store import Ledger

DEFAULT_BRANCH = "main"
_BRANCH_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,99}$")
_HEXLIKE = re.compile(r"[0-9a-fA-F]{4,}")
#: the longest HEAD file content shown in a message
_SHOWN = 60


def check_branch_name(name: Any) -> str:
    """A new branch's name, or UsageError: letters, digits and ``._/-``, starting with a letter
    or digit, at most 100 characters; not ``HEAD``, not a hex string of 4+ digits (it would hide
    the event id it spells), no ``..``, no ``/`` at the end, no ``~``, ``^`` or whitespace."""
    if not isinstance(name, str) or not _BRANCH_RE.match(name) or name == "HEAD" or ".." in name \
            or name.endswith(("/", ".")) or "//" in name or _HEXLIKE.fullmatch(name):
        shown = ascii(name)[:60] if isinstance(name, str) else type(name).__name__
        raise UsageError(f"expected a branch name of letters, digits and ._/- (not HEAD, not a hex string that could"
                         f" be an event id, no '..' and no '/' at the end), found {shown}")
    return name


class Refs:
    """The refs-and-branches part of ``Ledger``."""

    def current_branch(self) -> str:
        try:
            with open(self.root / "HEAD", "rb") as fh:
                raw = fh.read(512)
        except FileNotFoundError:
            return DEFAULT_BRANCH
        try:
            name = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            name = None
        if name == "":
            return DEFAULT_BRANCH
        if name is None or len(raw) >= 512 or not _BRANCH_RE.match(name):
            raise IntegrityError(f"expected {self.root / 'HEAD'} to hold a branch name, found"
                                 f" {ascii(raw[:_SHOWN])}{'…' if len(raw) > _SHOWN else ''} ({len(raw)}+ bytes)")
        return name

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
        ev = self._maybe_head(branch)
        if ev is None:
            raise NotFoundError(f"expected a branch named {branch!r}, found none")
        return ev

    def _maybe_head(self, branch: str) -> Event | None:
        with self._connect() as con:
            return rows.head(con, branch)

    def head(self) -> Event:
        return self.branch_head(self.current_branch())

    def resolve(self, ref: str | None = "HEAD") -> Event:
        """``HEAD``, ``HEAD~N``, a branch name (``NAME~N``), a tag, or an event id (prefix). A hex ref
        that names an event is that event, even where an older ledger has a branch of that name."""
        if ref is None:
            ref = "HEAD"
        if not isinstance(ref, str) or not ref.strip():
            raise UsageError(f"expected a ref (HEAD, HEAD~N, a branch or an event id), found {ascii(ref)[:60]}")
        ref = ref.strip()
        m = re.fullmatch(r"(.+?)(?:~(\d*))?", ref)
        base, back = m.group(1), m.group(2)
        steps = 0 if back is None else (int(back) if back else 1)
        if base == "HEAD":
            ev = self.head()
        else:
            branch_names = None
            if _HEXLIKE.fullmatch(base):
                try:
                    ev = self.get(base)
                except NotFoundError:
                    ev = None
            else:
                ev = None
            if ev is None and _BRANCH_RE.match(base):
                with self._connect() as con:
                    branch_names = con.execute("SELECT 1 FROM events WHERE branch = ? LIMIT 1", [base]).fetchone()
            if ev is None and not branch_names and _BRANCH_RE.match(base):
                from kledger.ledger.tags import lookup

                ev = lookup(self, base)  # a tag
            if ev is None:
                ev = self.branch_head(base) if branch_names else self.get(base)
        for i in range(steps):
            if ev.parent is None:
                raise NotFoundError(f"expected {ref!r} to name an event, but the history has only {i} ancestors")
            ev = self.get(ev.parent)
        return ev

    def create_branch(self, name: str, ref: str | Event = "HEAD") -> Event:
        """Append a ``branch`` event: branch ``name`` starts at ``ref``."""
        check_branch_name(name)
        at = ref if isinstance(ref, Event) else self.resolve(ref)

        def check(_ledger: "Ledger", head: Event | None) -> None:
            if head is not None:
                raise StateError(f"expected a new branch name, found branch {name!r} already exists (head {head.id})")
            from kledger.ledger.tags import tag_events

            if name in tag_events(_ledger):
                raise StateError(f"expected a branch name that is not a tag, found tag {name!r}")

        return self.append("branch", branch=name, parent=at.id, message=f"branch {name} at {at.id}", check=check)
