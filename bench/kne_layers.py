"""Which layers of one KNE delta do the damage: the delta of one CounterFact edit applied one layer
at a time, each measured with the audit's pulse (KL to the base on 32 neutral prompts, retention
drop on 96 known facts of the ledger's probe set).

    python bench/kne_layers.py --probes-from /tmp/drift-kne-subj --record 0 [--set sink_positions=0]
"""

from __future__ import annotations

import argparse
import logging

import torch

from kledger.editors.base import EditContext, applied, make_config
from kledger.editors.kne import KNEConfig, KNEEditor
from kledger.editors.models import load_model
from kledger.audit.figures import pulse
from kledger.ledger.deltas import Delta
from kledger.audit.probes import latest_probes_event, load_probes
from kledger.ledger.records import load_requests
from kledger.ledger.store import Ledger

log = logging.getLogger("kne_layers")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--probes-from", required=True)
    ap.add_argument("--data", default="/work/shared/data/counterfact-600.json")
    ap.add_argument("--record", type=int, default=0)
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    led = Ledger(args.probes_from.rstrip("/") + "/.kledger")
    probes = load_probes(led, latest_probes_event(led))
    model, tok, _ = load_model("smollm2-135m", "cpu")
    req = load_requests(args.data)[args.record]
    cfg = make_config(KNEConfig, dict(kv.split("=", 1) for kv in args.set))
    res = KNEEditor(cfg).compute(model, tok, [req], EditContext(seed=0))[0]
    by_layer: dict[int, dict] = {}
    for name, td in res.delta.tensors.items():
        by_layer.setdefault(int(name.split(".")[2]), {})[name] = td
    with applied(model, [res.delta]):
        log.info("all layers: %s", pulse(model, tok, probes, n_prompts=32, n_facts=96))
    log.info("layer entries norm kl retention_drop")
    for layer in sorted(by_layer):
        with applied(model, [Delta(by_layer[layer])]):
            p = pulse(model, tok, probes, n_prompts=32, n_facts=96)
        vals = torch.cat([td.values for td in by_layer[layer].values()])
        log.info("%d %d %.3f %s %s", layer, vals.numel(), float(vals.norm()), p["kl"], p["retention_drop"])


if __name__ == "__main__":
    main()
