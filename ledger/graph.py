"""The event graph: ancestry and the active-set rule, implemented once.

Every event is a ``Node`` (its links and what it does to the active set). ``ancestors`` walks the
``parent``/``parents`` links; ``live`` is THE active-set rule; both work on any set of nodes: the
whole ledger (``Graph.nodes``, cached), the rows of a short window, or the few rows the SQL paths
below select. ``Graph`` answers a ledger's questions (``Ledger.active``, ``active_among``,
``active_count``, ``is_ancestor``, ``ancestors`` delegate here), reading only what it needs.

The active-set rule, the same for a straight history, a branch and a merge:

* an ``add``/``forget``/``learn``/``merge`` event that carries a delta is live from its row on;
* a ``revert`` takes its target out;
* a ``merge`` event whose config lists ``supersedes`` takes those events out (the losing side of
  a hard conflict, or the side edits that a ``resolve`` merge recomputed in one solve);
  reverting such a merge brings them back.

Since the set is taken over every ancestor (``parent`` and the merge's ``parents``), a merge's
active set is the three-way sum: the merge base's edits plus what each side added minus what
each side reverted. A revert made on one side only stays in effect after the merge (as a change
does in git), and an edit reverted on both sides leaves once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Mapping, NamedTuple, Sequence

import duckdb

from kledger.ledger.records import DELTA_EVENT_TYPES, MODEL_EVENT_TYPES, Event
from kledger.ledger.rows import MODEL_SQL, DeltaRef, parents_of

if TYPE_CHECKING:
    from kledger.ledger.store import Ledger

#: ``active_among``/``is_ancestor`` read a window of at most this many rows whole (one query);
#: longer ones go through ``Graph._ancestry``'s runs
WINDOW = 1000
#: the SELECT list that reads rows as ``Node``s (a merge's config for its ``supersedes``)
NODE_SQL = "seq, id, type, parent, parents, target, delta_sha256, CASE WHEN type = 'merge' THEN config END"


class Node(NamedTuple):
    """An event as the graph sees it."""

    seq: int
    id: str
    type: str
    parent: str | None
    parents: tuple[str, ...]
    target: str | None  # the event a revert cancels
    delta_sha256: str | None
    supersedes: tuple[str, ...]  # events a merge takes out of the active set

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> "Node":
        """A row read with ``NODE_SQL``."""
        sup = tuple((json.loads(row[7]) or {}).get("supersedes") or ()) if row[7] is not None else ()
        return cls(row[0], row[1], row[2], row[3], parents_of(row[4]), row[5], row[6], sup)


def nodes_of(rows: Iterable[Sequence[Any]]) -> dict[str, Node]:
    return {r[1]: Node.from_row(r) for r in rows}


def ancestors(nodes: Mapping[str, Node], start: str) -> set[str]:
    """``start`` and every node reachable from it by parent links (within ``nodes``)."""
    seen, stack = set(), [start]
    while stack:
        eid = stack.pop()
        if eid in seen or eid not in nodes:
            continue
        seen.add(eid)
        n = nodes[eid]
        if n.parent:
            stack.append(n.parent)
        stack.extend(n.parents)
    return seen


def live(nodes: Mapping[str, Node], ids: Iterable[str]) -> list[str]:
    """Ids of the delta events in effect over ``ids`` (a set of events closed under parents), in
    sequence order: the active-set rule (see the module docstring)."""
    out: dict[str, None] = {}
    dropped_by: dict[str, set[str]] = {}
    for eid in sorted(ids, key=lambda i: nodes[i].seq):
        n = nodes[eid]
        if n.type in DELTA_EVENT_TYPES and n.delta_sha256:
            out[eid] = None
        elif n.type == "revert" and n.target:
            out.pop(n.target, None)
            target = nodes.get(n.target)
            for s in target.supersedes if target else ():  # reverting a merge restores what it superseded
                holders = dropped_by.get(s)
                if holders and n.target in holders:
                    holders.discard(n.target)
                    if not holders:
                        out[s] = None
        if n.type == "merge":
            for s in n.supersedes:
                if s in out or dropped_by.get(s):
                    out.pop(s, None)
                    dropped_by.setdefault(s, set()).add(eid)
    return sorted(out, key=lambda i: nodes[i].seq)


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
        return f"({MODEL_SQL} AND ({runs}))", [v for run in self.runs for v in run]

    def contains(self, ev: Event) -> bool:
        if ev.type not in MODEL_EVENT_TYPES:
            return ev.id in self.extra
        return any(b == ev.branch and a <= ev.seq <= z for b, a, z in self.runs)


class Graph:
    """The event graph of one ledger, read through the ledger's (short) connections."""

    def __init__(self, ledger: "Ledger") -> None:
        self.ledger = ledger
        self._cache: tuple[int, dict[str, Node]] | None = None

    def invalidate(self) -> None:
        self._cache = None

    def nodes(self) -> dict[str, Node]:
        """Every event as a ``Node`` (cached per ledger length)."""
        with self.ledger._connect() as con:
            n = int(con.execute("SELECT count(*) FROM events").fetchone()[0])
            if self._cache and self._cache[0] == n:
                return self._cache[1]
            rows = con.execute(f"SELECT {NODE_SQL} FROM events ORDER BY seq").fetchall()
        g = nodes_of(rows)
        self._cache = (n, g)
        return g

    def node(self, eid: str) -> Node:
        return self.nodes()[eid]

    def ancestors(self, event: Event) -> set[str]:
        return ancestors(self.nodes(), event.id)

    def live(self, ids: Iterable[str]) -> list[str]:
        """The active-set rule over ``ids`` (closed under parents), on the whole graph."""
        return live(self.nodes(), ids)

    def active_ids(self, ref: str | Event = "HEAD") -> list[str]:
        ev = self._resolve(ref)
        return self.live(self.ancestors(ev))

    def active_refs(self, ref: str | Event = "HEAD") -> list[DeltaRef]:
        g = self.nodes()
        return [DeltaRef(i, g[i].delta_sha256) for i in self.active_ids(ref)]

    def reverted_by(self, head: Event, target: str) -> str | None:
        """The event in ``head``'s history that took ``target`` out: its revert, or a merge that
        superseded it (None if neither)."""
        g = self.nodes()
        anc = ancestors(g, head.id)
        for eid in anc:
            if g[eid].type == "revert" and g[eid].target == target:
                return eid
        for eid in anc:
            if target in g[eid].supersedes:
                return eid
        return None

    def history(self, start: Event, limit: int | None = None) -> list[Event]:
        """Events reachable from ``start`` by first-parent links, newest first (audits included):
        what ``kledger log`` lists. The fast path reads this branch's own rows up to ``start``
        (newest first), then follows the oldest one's parent."""
        out = self.ledger.events(branch=start.branch, upto=start.seq, limit=limit)
        cur = out[-1] if out else start
        while (limit is None or len(out) < limit) and cur.parent is not None:
            cur = self.ledger.get(cur.parent)
            if cur.id in {e.id for e in out}:
                continue
            out.append(cur)
        return out[:limit] if limit is not None else out

    def _resolve(self, ref: str | Event) -> Event:
        return ref if isinstance(ref, Event) else self.ledger.resolve(ref)

    # --- the fast SQL paths (only the rows that matter) -----------------------------------------
    def active_among(self, ids: Iterable[str | Event], ref: str | Event = "HEAD") -> set[str]:
        """Which of the events ``ids`` are active at ``ref``.

        Only what can change these events' state is read: whatever does (a revert, a merge that
        supersedes one of them, the revert of such a merge) comes after the oldest of them and
        is an ancestor of ``ref``. The ancestors are found as runs of rows in SQL
        (``_ancestry``), so ``log -n 20`` and ``show`` of any event (recent or 50,000 events
        back) read a handful of rows, not every row since the event. Same answer as
        ``set(ids) & set(active_ids(ref))``. ``ids`` may be given as events (saves a query).
        """
        items = list(ids)
        if not items:
            return set()
        ids = {i.id if isinstance(i, Event) else i for i in items}
        known = [i.seq for i in items if isinstance(i, Event)]
        with self.ledger.session():
            ev = self._resolve(ref)
            with self.ledger._connect() as con:
                if len(known) == len(items):
                    lo = min(known)
                else:
                    lo = con.execute("SELECT min(seq) FROM events WHERE list_contains(?, id)",
                                     [sorted(ids)]).fetchone()[0]
                if lo is None or lo > ev.seq:
                    return set()
                # a short window (``log -n 20``, ``show`` of a recent event) is read whole in one
                # query; a long one as runs; and a history too tangled for runs is walked row by row
                anc = None if ev.seq - lo <= WINDOW else self._ancestry(con, ev, lo)
                if anc is None:
                    seen, g = self._walk_since(con, ev, lo)
                    return ids & set(live(g, seen))
                where, args = anc.sql()
                merges = nodes_of(con.execute(f"SELECT {NODE_SQL} FROM events WHERE type = 'merge' AND seq >= ?"
                                              f" AND {where}", [lo, *args]).fetchall())
                # the events whose state matters: ``ids`` and the merges that take one of them out
                # (reverting such a merge brings them back), transitively
                rel = set(ids)
                grew = True
                while grew:
                    grew = False
                    for m in merges.values():
                        if m.id not in rel and rel.intersection(m.supersedes):
                            rel.add(m.id)
                            grew = True
                rows = con.execute(
                    f"SELECT {NODE_SQL} FROM events WHERE seq >= ? AND (list_contains(?, id)"
                    f" OR (type = 'revert' AND list_contains(?, target))) AND {where}",
                    [lo, sorted(rel), sorted(rel), *args],
                ).fetchall()
        g = nodes_of(rows) | merges
        return ids & set(live(g, g))

    def active_count(self, ref: str | Event = "HEAD") -> int:
        """``len(active_ids(ref))`` without reading every active event: delta events among the
        ancestors are counted in SQL; only reverts, merges and the events they name are read."""
        with self.ledger.session():
            ev = self._resolve(ref)
            with self.ledger._connect() as con:
                anc = self._ancestry(con, ev, 0)
                if anc is None:
                    seen, g = self._walk_since(con, ev, 0)
                    return len(live(g, seen))
                where, args = anc.sql()
                delta = (f"type IN ({', '.join(repr(t) for t in DELTA_EVENT_TYPES)})"
                         " AND delta_sha256 IS NOT NULL")
                total = con.execute(f"SELECT count(*) FROM events WHERE {delta} AND {where}", args).fetchone()[0]
                changing = nodes_of(con.execute(f"SELECT {NODE_SQL} FROM events WHERE type IN ('merge', 'revert')"
                                                f" AND {where}", args).fetchall())
                named = {n.target for n in changing.values() if n.type == "revert" and n.target}
                named |= {n.id for n in changing.values() if n.type == "merge"}
                named.update(s for n in changing.values() for s in n.supersedes)
                touched = nodes_of(con.execute(f"SELECT {NODE_SQL} FROM events WHERE list_contains(?, id)"
                                               f" AND {delta} AND {where}", [sorted(named), *args]).fetchall()
                                   ) if named else {}
        g = touched | changing
        # every untouched delta event is live; the touched ones are live as the full rule says
        return int(total) - len(touched) + len(live(g, g))

    def is_ancestor(self, event: Event, ref: str | Event = "HEAD") -> bool:
        """Whether ``event`` is ``ref`` or one of its ancestors (reads runs of rows, see ``_ancestry``)."""
        with self.ledger.session():
            ev = self._resolve(ref)
            if event.id == ev.id:
                return True
            if event.seq > ev.seq:
                return False
            with self.ledger._connect() as con:
                if ev.seq - event.seq <= WINDOW:
                    return event.id in self._walk_since(con, ev, event.seq)[0]
                anc = self._ancestry(con, ev, event.seq)
            if anc is None:
                return event.id in self.ancestors(ev)
            return anc.contains(event)

    def _walk_since(self, con: duckdb.DuckDBPyConnection, ev: Event, lo: int) -> tuple[set[str], dict[str, Node]]:
        """The ancestors of ``ev`` from ``lo`` on, found by reading every row in between and
        walking the links; with those rows' nodes."""
        g = nodes_of(con.execute(f"SELECT {NODE_SQL} FROM events WHERE seq >= ? AND seq <= ? ORDER BY seq",
                                 [lo, ev.seq]).fetchall())
        return ancestors(g, ev.id), g

    def _ancestry(self, con: duckdb.DuckDBPyConnection, ev: Event, lo: int = 0,
                  max_runs: int = 256) -> _Ancestry | None:
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
                todo = [(r[0], r[1], r[2], r[3], r[4], parents_of(r[5])) for r in con.execute(
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
                f" WHERE branch = ? AND seq BETWEEN ? AND ? AND {MODEL_SQL})"
                " WHERE prev IS NULL OR parent IS DISTINCT FROM prev", [branch, lo, seq]).fetchone()[0]
            runs.append((branch, int(start), seq))
            if len(runs) > max_runs:
                return None
            for s, p, ps in con.execute(
                    f"SELECT seq, parent, parents FROM events WHERE branch = ? AND seq BETWEEN ? AND ?"
                    f" AND {MODEL_SQL} AND (seq = ? OR parents <> '[]')", [branch, start, seq, start]).fetchall():
                if s == start and p:
                    wanted.add(p)
                wanted.update(parents_of(ps))
        return _Ancestry(runs, extra)
