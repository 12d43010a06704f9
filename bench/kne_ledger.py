"""KNE through the real ledger path on smollm2-135m: N CounterFact facts added sequentially
(`kledger add --from-file` semantics: one event per fact, each edit computed on the model that
already has the earlier ones), then scored on the materialised HEAD.

    python bench/kne_ledger.py --n 20 [--set key=value ...] [--out bench/results/kne_ledger.md]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from counterfact_eval import counterfact_scores, first_tokens  # noqa: E402

from kledger import Workspace, init_ledger  # noqa: E402
from kledger.ledger.records import load_requests  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "counterfact-600.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", default=None, help="append a markdown row to this file")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    reqs = load_requests(args.data)[: args.n]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="kne-ledger-"))
    ledger = init_ledger(work, "smollm2-135m")
    ws = Workspace(ledger, device="cpu")
    base, tok, _ = ws.load_base()
    base_loc = first_tokens(base, tok, [p for r in reqs for p in r.locality_prompts])
    overrides = dict(s.split("=", 1) for s in args.sets)
    times, entries = [], []
    t_all = time.perf_counter()
    for ev in ws.add(reqs, method="kne", overrides=overrides):
        times.append(ev.metrics.get("time_s", 0.0))
        entries.append(sum(v.get("count", 0) for v in ev.ensemble.get("tensors", {}).values())
                       if isinstance(ev.ensemble.get("tensors"), dict) else ev.metrics.get("entries_changed"))
    wall = time.perf_counter() - t_all
    model, tok, m = ws.model_at("HEAD")
    scores = counterfact_scores(model, tok, reqs, base_loc)
    rep = ledger.verify()
    row = {
        "n": len(reqs), **{k: round(v, 3) if isinstance(v, float) else v for k, v in scores.items()},
        "edit_s_mean": round(statistics.mean(times), 2), "edit_s_median": round(statistics.median(times), 2),
        "wall_per_fact_s": round(wall / len(reqs), 2),
        "entries_per_edit": statistics.mean(e for e in entries if e is not None) if any(entries) else None,
        "active_edits": len(m.active), "verify_ok": rep.ok, "overrides": overrides,
    }
    print(json.dumps(row, indent=2))
    if args.out:
        with open(args.out, "a") as fh:
            fh.write("| " + " | ".join(str(row.get(k)) for k in (
                "n", "efficacy", "paraphrase", "locality", "fluency", "edit_s_mean", "wall_per_fact_s",
                "entries_per_edit", "overrides")) + " |\n")


if __name__ == "__main__":
    main()
