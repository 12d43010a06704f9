"""Tags: immutable names for versions, like annotated git tags ("the model we shipped on 2026-11-30").

A tag is a ``tag`` event (a note: it never changes the model nor moves a branch head) whose
``target`` and ``parent`` are the tagged event and whose ``config`` is ``{"name": NAME}``; it is
hash-chained like every row, so it cannot be edited. Names follow the branch-name rules
(``check_branch_name``) and must be new: not an existing tag, nor a branch (a ref names one thing).
A tag never moves: the duplicate check runs under the write lock, and a lookup takes the oldest
tag event of the name in any case. Every ref (``--at``, ``show``, ``diff``...) accepts a tag
(``Ledger.resolve``: an event id first, then a branch, then a tag; ``NAME~N`` works too).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

from kledger.ledger.errors import StateError
from kledger.ledger.records import Event

if TYPE_CHECKING:
    from kledger.ledger.store import Ledger


def _name(ev: Event) -> str | None:
    return ev.config.get("name") if isinstance(ev.config, Mapping) else None


def tag_events(ledger: "Ledger") -> dict[str, Event]:
    """{name: its tag event}, oldest event per name (a later row of the same name is ignored)."""
    out: dict[str, Event] = {}
    for ev in ledger.events(types=["tag"], newest_first=False):
        name = _name(ev)
        if isinstance(name, str) and name not in out:
            out[name] = ev
    return out


def lookup(ledger: "Ledger", name: str) -> Event | None:
    """The event tag ``name`` names, or None."""
    ev = tag_events(ledger).get(name)
    return None if ev is None else ledger.get(ev.target)


def create_tag(ledger: "Ledger", name: str, ref: str | Event = "HEAD", message: str | None = None) -> Event:
    """Append the ``tag`` event naming ``ref``'s event ``name``; refused (StateError) if the name is
    taken by a tag or a branch."""
    from kledger.ledger.refs import check_branch_name

    check_branch_name(name)
    at = ref if isinstance(ref, Event) else ledger.resolve(ref)

    def check(led: "Ledger", _head: Event | None) -> None:
        old = tag_events(led).get(name)
        if old is not None:
            raise StateError(f"expected a new tag name, found tag {name!r} already names {old.target}"
                             " (tags never move; choose another name)")
        if led._maybe_head(name) is not None:
            raise StateError(f"expected a tag name that is not a branch, found branch {name!r}")

    return ledger.append("tag", branch=at.branch, parent=at.id, target=at.id, config={"name": name},
                         message=f"tag {name} → {at.id}" + (f": {message}" if message else ""), check=check)
