"""``kledger diff A B``: what differs between two versions, from the ledger alone (no model).

The edits: the active delta events of one version and not the other (``Ledger.active``). The
weights: since a version's weights are ``W₀ + Σ`` its active deltas, ``W_B − W_A`` is the sum of
B's own deltas minus A's own (the shared ones cancel); it is summed per tensor in fp32 from the
delta objects (``accumulate`` on zeros), so neither version is materialised and the base model is
never read — ``git diff --stat`` for models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kledger.ledger.records import Event

if TYPE_CHECKING:
    from kledger.ledger.store import Ledger


@dataclass
class VersionDiff:
    a: Event
    b: Event
    only_a: list[Event]  # active at A, not at B
    only_b: list[Event]  # active at B, not at A
    common: int
    tensors: dict[str, dict[str, Any]] | None  # name → {fro_norm, shape, events}; None when not asked

    def to_json(self) -> dict[str, Any]:
        def ev(e: Event) -> dict[str, Any]:
            return {"id": e.id, "seq": e.seq, "type": e.type, "method": e.method, "request": e.request,
                    "message": e.message}

        return {"a": self.a.id, "b": self.b.id, "only_a": [ev(e) for e in self.only_a],
                "only_b": [ev(e) for e in self.only_b], "common": self.common, "tensors": self.tensors}


def diff_versions(ledger: "Ledger", a: str | Event, b: str | Event, *, tensors: bool = True) -> VersionDiff:
    import torch

    from kledger.ledger.deltas import accumulate

    with ledger.session():
        ea = a if isinstance(a, Event) else ledger.resolve(a)
        eb = b if isinstance(b, Event) else ledger.resolve(b)
        act_a, act_b = ledger.active(ea), ledger.active(eb)
        ids_a, ids_b = {e.id for e in act_a}, {e.id for e in act_b}
        only_a = [e for e in act_a if e.id not in ids_b]
        only_b = [e for e in act_b if e.id not in ids_a]
        out = None
        if tensors:
            events = only_b + only_a
            deltas = ledger.load_deltas(events)
            signs = [1.0] * len(only_b) + [-1.0] * len(only_a)
            shapes: dict[str, tuple[int, ...]] = {}
            touched: dict[str, int] = {}
            for d in deltas:
                for name, td in d.tensors.items():
                    shapes[name] = tuple(td.shape)
                    touched[name] = touched.get(name, 0) + 1
            zeros = {n: torch.zeros(s, dtype=torch.float32) for n, s in shapes.items()}
            sums = accumulate(zeros, deltas, signs, owned=zeros.keys())
            out = {n: {"fro_norm": float(t.norm()), "shape": list(shapes[n]), "events": touched[n]}
                   for n, t in sorted(sums.items())}
    return VersionDiff(ea, eb, only_a, only_b, len(ids_a & ids_b), out)
