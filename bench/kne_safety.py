"""How much untouched knowledge one KNE edit costs, per configuration (SmolLM2-135M).

For each variant and each of the first ``--n`` CounterFact records: compute the KNE delta on the
base model, apply it alone and measure

* efficacy / paraphrase of that edit (P(new) > P(true) on the prompt / its first paraphrase);
* the audit's function-level figures on the ledger's probe set (``ledger.audit.pulse`` with
  ``--prompts`` neutral prompts and ``--facts`` known facts): KL to the base and the retention
  drop of known facts (share of the base's correct answers lost);

then all ``n`` deltas together (computed independently) for the same figures. Probes are read
from an existing ledger (``--probes-from``: any ledger of this base model with a recorded probe
set, e.g. a ``bench/drift.py sequence`` work dir). Appends one JSON line per variant to ``--out``.

    python bench/kne_safety.py --probes-from /tmp/drift-memit500 --n 8 \
        --variants base 'gd:optimizer=normalized_gd;step_norm=0.05'
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kne_tune import BASE, parse_variant  # noqa: E402

from kledger.editors.base import EditContext, applied, config_to_json, make_config  # noqa: E402
from kledger.editors.kne import KNEConfig, KNEEditor  # noqa: E402
from kledger.editors.models import load_model  # noqa: E402
from kledger.editors.scoring import score_targets  # noqa: E402
from kledger.audit.figures import pulse  # noqa: E402
from kledger.audit.probes import latest_probes_event, load_probes  # noqa: E402
from kledger.ledger.records import load_requests  # noqa: E402
from kledger.ledger.store import Ledger  # noqa: E402

DATA = "/work/shared/data/counterfact-600.json"
log = logging.getLogger("kne_safety")


def wins(model, tok, prompts, reqs) -> list[bool]:
    new = score_targets(model, tok, prompts, [r.target_new for r in reqs])
    true = score_targets(model, tok, prompts, [r.target_true for r in reqs])
    return (new > true).tolist()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--probes-from", required=True, help="a directory holding a .kledger with a probe set")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default=DATA)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--facts", type=int, default=96)
    ap.add_argument("--variants", nargs="+", default=["base"])
    ap.add_argument("--out", default="bench/results/kne_safety.jsonl")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(int(os.environ.get("KLEDGER_THREADS", "1")))

    led = Ledger(Path(args.probes_from) / ".kledger")
    ev = latest_probes_event(led)
    if ev is None:
        raise SystemExit(f"expected a probe set in {args.probes_from}, found none")
    probes = load_probes(led, ev)
    model, tok, _ = load_model(args.model, device="cpu")
    reqs = load_requests(args.data)[args.start : args.start + args.n]
    base_pulse = pulse(model, tok, probes, n_prompts=args.prompts, n_facts=args.facts)
    log.info("base: %s", base_pulse)
    for spec in args.variants:
        name, overrides = parse_variant(spec)
        cfg = make_config(KNEConfig, {**BASE, "grad_positions": "subject", **overrides})
        editor = KNEEditor(cfg)
        per, deltas = [], []
        for j, r in enumerate(reqs):
            res = editor.compute(model, tok, [r], EditContext(seed=j))[0]
            deltas.append(res.delta)
            with applied(model, [res.delta]):
                eff = wins(model, tok, [r.prompt], [r])[0]
                para = wins(model, tok, [r.rephrase_prompts[0]], [r])[0] if r.rephrase_prompts else None
                p = pulse(model, tok, probes, n_prompts=args.prompts, n_facts=args.facts)
            m = res.metrics
            per.append({"efficacy": eff, "paraphrase": para, "kl": p["kl"], "retention_drop": p["retention_drop"],
                        "steps": m["steps"], "norm": m["update_norm"], "time_s": m["time_s"]})
            log.info("%s %d %s", name, j, per[-1])
        with applied(model, deltas):
            together = pulse(model, tok, probes, n_prompts=args.prompts, n_facts=args.facts)
            eff_all = sum(wins(model, tok, [r.prompt for r in reqs], reqs)) / len(reqs)

        def mean(key):
            vals = [x[key] for x in per if x[key] is not None]
            return round(statistics.mean(float(v) for v in vals), 4) if vals else None

        row = {"variant": name, "overrides": {k: v for k, v in config_to_json(cfg).items() if k in overrides},
               "n": len(reqs), "start": args.start, "efficacy": mean("efficacy"), "paraphrase": mean("paraphrase"),
               "kl": mean("kl"), "retention_drop": mean("retention_drop"),
               "retention_drop_max": max(x["retention_drop"] for x in per), "norm": mean("norm"),
               "steps": mean("steps"), "time_s": mean("time_s"),
               "together": {"efficacy": eff_all, "kl": together["kl"], "retention_drop": together["retention_drop"]},
               "probe_prompts": args.prompts, "probe_facts": args.facts,
               "load": round(os.getloadavg()[0], 2), "date": time.strftime("%Y-%m-%d %H:%M")}
        log.info("ROW %s", json.dumps(row))
        with open(args.out, "a") as fh:
            fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
