"""Which edits of a lifelong run hold, and which cost the known facts (``python bench/lifelong.py kept NAME``).

JSON on stdout, for the run's first ``--n`` edits (default: all):

* ``kept``: CounterFact edits by (target top-1 at the end of their batch — the editor's own check,
  ``metrics.top1`` in the ledger) × (logP(new) > logP(true) on the run's current model), overall and per
  100 edits; so efficacy lost at edit time and efficacy lost later (forgetting) are told apart;
* ``turn_norm``: median ‖ΔW‖ written per turn, for the edits that reached top-1 and those that did not;
* ``subsets``: the audit's retention drop with only some of the run's deltas applied to the base
  model: all, those that reached top-1, those that did not, single-token targets, multi-token targets.
"""

from __future__ import annotations

import copy
import json
import statistics

import torch

from kledger.editors.scoring import score_targets
from kledger.editors.tokens import encode_pairs


def main(ws, items, n: int | None) -> dict:
    from kledger.audit.figures import answers_hold  # noqa: PLC0415
    from kledger.auditing import probe_set  # noqa: PLC0415
    from kledger.ledger.compose import apply_deltas  # noqa: PLC0415

    evs = sorted(ws.ledger.events(types=["add"]), key=lambda e: e.seq)[:n]
    items = items[: len(evs)]
    hit = [bool(e.metrics["top1"]) for e in evs]
    model, tok = ws.working()
    cf = [i for i, (d, _) in enumerate(items) if d == "cf"]
    with torch.no_grad():
        new = score_targets(model, tok, [items[i][1].prompt for i in cf], [items[i][1].target_new for i in cf])
        true = score_targets(model, tok, [items[i][1].prompt for i in cf], [items[i][1].target_true for i in cf])
    ok = dict(zip(cf, (new > true).tolist()))

    def table(idx):
        return {f"top1={a} holds={b}": sum(1 for i in idx if hit[i] == a and ok[i] == b)
                for a in (True, False) for b in (True, False)}

    out = {"edits": len(evs), "kept": table(cf),
           "kept_per_100": {f"{s}-{s + 99}": table([i for i in cf if s <= i < s + 100]) for s in range(0, len(evs), 100)
                            if any(s <= i < s + 100 for i in cf)}}
    per_turn = [sum(e.metrics["delta_norm"].values()) / max(1, e.metrics["turns"]) for e in evs]
    out["turn_norm"] = {k: round(statistics.median([p for p, h in zip(per_turn, hit) if h == v]), 4)
                        for k, v in (("top1", True), ("not_top1", False)) if any(h == v for h in hit)}
    base, tok, _ = ws.load_base()
    facts = list(probe_set(ws.ledger, base, tok)[0].facts)
    held = [h[0] for h in answers_hold(base, tok, facts)]
    deltas = ws.ledger.load_deltas(evs)
    _, spans = encode_pairs(tok, [r.prompt for _, r in items], [r.target_new for _, r in items], "cpu")
    multi = [e - s > 1 for s, e in spans]

    def drop(sel):
        m = copy.deepcopy(base)
        apply_deltas(m, [d for d, s in zip(deltas, sel) if s])
        now = [h[0] for h in answers_hold(m, tok, facts)]
        return round(sum(a and not b for a, b in zip(held, now)) / len(facts), 4)

    out["subsets"] = {"all": drop([True] * len(evs)), "top1": drop(hit), "not_top1": drop([not h for h in hit]),
                      "single_token": drop([not m for m in multi]), "multi_token": drop(multi),
                      "counts": {"top1": sum(hit), "multi_token": sum(multi)}}
    print(json.dumps(out, indent=1))
    return out
