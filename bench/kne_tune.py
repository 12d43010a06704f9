"""Tune and measure the KNE editor on SmolLM2-135M with CounterFact records.

Each edit is computed on the base model independently; then ALL deltas are applied together
(``editors.base.applied``) and scored:

* efficacy: share of records with logP(target_new) > logP(ground_truth) on the edit prompt
  (sum of token log-probs, ``editors.scoring.score_targets``);
* paraphrase: the same on ``rephrase_prompt``;
* locality: share of ``locality_prompt``s whose greedy first token (unedited model) is still the
  argmax, and the mean change of logP(locality_ground_truth);
* single-edit efficacy (each delta alone), time per edit, entries per edit;
* the Eiffel check: "The Eiffel Tower is located in the city of" → " Rome" (alone and together
  with all other deltas): does the greedy continuation start with " Rome"?

Usage::

    python bench/kne_tune.py --n 20 --variants base,ig,per_layer
    python bench/kne_tune.py --n 20 --variants 'custom:fraction=0.0005;lr=0.05'

Writes ``bench/results/kne.md`` (``--out``) with one table row per variant (rows of earlier
runs in the same file are kept unless ``--fresh``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import statistics
import sys
import time
from pathlib import Path

import torch

from kledger.editors.base import EditContext, applied, config_to_json, make_config
from kledger.editors.kne import KNEConfig, KNEEditor
from kledger.editors.models import load_model
from kledger.editors.scoring import greedy, score_targets
from kledger.ledger.records import FactRequest

DATA = "/work/shared/data/counterfact-600.json"
NOTES_MARKER = "<!-- notes: kept when the table is rewritten -->"

#: named variants: config overrides relative to the KNEConfig defaults
#: the reference point of the comparison, spelled out so that the table does not depend on the
#: KNEConfig defaults of the day; every variant changes a few of these
#: the paper's setting (every layer a candidate, 0.001 of them, 25 steps): what every variant here changes
BASE: dict = {"attribution": "grad_x_weight", "threshold": "global", "fraction": 1e-3, "exclude_layers": [-1],
              "lr": 1e-3, "stop_margin": 0.0, "locality_weight": 1.0, "contrast_subjects": [], "contrast_weight": 0.0,
              "window": "all", "max_steps": 25}
CONTRAST = {"contrast_subjects": ["Someone", "John Smith"], "contrast_weight": 1.0}

#: named variants: changes relative to BASE
VARIANTS: dict[str, dict] = {
    "base": {},
    "early": {"window": "early", "fraction": 1e-2, "max_steps": 40},  # KNEConfig's defaults since the eleventh session
    "per_layer": {"threshold": "per_layer"},
    "ig": {"attribution": "integrated_gradients"},
    "ig_per_layer": {"attribution": "integrated_gradients", "threshold": "per_layer"},
    "budget_1e-4": {"fraction": 1e-4},
    "budget_1e-2": {"fraction": 1e-2},
    "contrast": CONTRAST,
    "all_layers": {"exclude_layers": []},
    "margin1": {"stop_margin": 1.0},
    "budget_1e-2_alpha": {"fraction": 1e-2, "alpha": 280.0},  # α/√n: the step norm of budget 1e-3
    "lr5e-4_kl5": {"lr": 5e-4, "locality_weight": 5.0},
    "per_layer_1e-2": {"threshold": "per_layer", "fraction": 1e-2},
    "contrast_per_layer": {**CONTRAST, "threshold": "per_layer"},
    "contrast_ig": {**CONTRAST, "attribution": "integrated_gradients"},
}

#: generic sentences for a fluency/damage check: mean NLL of their continuation after 2 words
GENERIC = [
    "The history of the city dates back to the Roman period, when a small settlement was founded on the river.",
    "She studied mathematics at the university and later worked as a teacher in a small town.",
    "The company announced on Tuesday that its profits had risen by ten percent in the last quarter.",
    "Water boils at one hundred degrees Celsius at sea level, but at lower temperatures on mountains.",
    "He opened the window, looked at the rain for a while, and then went back to his book.",
]

EIFFEL = FactRequest("The Eiffel Tower is located in the city of", " Rome", subject="The Eiffel Tower",
                     target_true=" Paris")


def parse_variant(spec: str) -> tuple[str, dict]:
    """A named variant, or ``name:key=value;key=value`` (``base+name:...`` starts from a named one);
    returns (name, changes relative to BASE)."""
    if spec in VARIANTS:
        return spec, dict(VARIANTS[spec])
    if ":" in spec:  # name:key=value;key=value
        name, body = spec.split(":", 1)
        base = {}
        if "+" in name:  # base+name → start from a named variant
            b, name = name.split("+", 1)
            base = dict(VARIANTS[b])
        for kv in filter(None, body.split(";")):
            k, v = kv.split("=", 1)
            base[k] = v
        return name, base
    raise SystemExit(f"unknown variant {spec!r}; known: {sorted(VARIANTS)} or name:key=value;...")


@torch.no_grad()
def first_tokens(model, tok, prompts):
    out = []
    for p in prompts:
        enc = tok(p, return_tensors="pt", add_special_tokens=False)
        out.append(int(model(**enc).logits[0, -1].argmax()))
    return out


def generic_nll(model, tok) -> float:
    heads = [" ".join(g.split(" ")[:2]) for g in GENERIC]
    tails = [" " + " ".join(g.split(" ")[2:]) for g in GENERIC]
    return float(-score_targets(model, tok, heads, tails).mean())


def evaluate(model, tok, reqs, base_loc_tok, base_loc_lp, base_gen):
    prompts = [r.prompt for r in reqs]
    eff = (score_targets(model, tok, prompts, [r.target_new for r in reqs])
           > score_targets(model, tok, prompts, [r.target_true for r in reqs])).float().mean().item()
    reph = [(r.rephrase_prompts[0], r) for r in reqs if r.rephrase_prompts]
    para = (score_targets(model, tok, [p for p, _ in reph], [r.target_new for _, r in reph])
            > score_targets(model, tok, [p for p, _ in reph], [r.target_true for _, r in reph])).float().mean().item()
    loc_prompts = [r.locality_prompts[0] for r in reqs]
    loc_tok = first_tokens(model, tok, loc_prompts)
    loc_top1 = sum(a == b for a, b in zip(loc_tok, base_loc_tok)) / len(reqs)
    loc_lp = score_targets(model, tok, loc_prompts, [" " + r.locality_answers[0].lstrip() for r in reqs])
    loc_new = score_targets(model, tok, loc_prompts, [r.target_new for r in reqs])
    return {"efficacy": eff, "paraphrase": para, "locality_top1": loc_top1,
            "locality_ns": float((loc_lp > loc_new).float().mean()),
            "locality_dlogp": float((loc_lp - base_loc_lp).mean()),
            "generic_dnll": generic_nll(model, tok) - base_gen}


def run_variant(name, overrides, model, tok, reqs, base, log):
    cfg = make_config(KNEConfig, {**BASE, **overrides})
    editor = KNEEditor(cfg)
    ctx = EditContext(seed=0)
    results = []
    single_eff = []
    t0 = time.perf_counter()
    for r in reqs:
        res = editor.compute(model, tok, [r], ctx)[0]
        results.append(res)
        m = res.metrics
        single_eff.append(m["logp_target_after"] > m["logp_true_after"])
        log.info("%s | %-45s → %-12s steps=%2d conv=%d p %.2e→%.2e true %.2e→%.2e n=%d %.1fs", name, r.prompt[:45],
                 r.target_new, m["steps"], m["converged"], m["p_target_before"], m["p_target_after"],
                 m["p_true_before"], m["p_true_after"], m["ensemble_size"], m["time_s"])
    wall = time.perf_counter() - t0
    deltas = [r.delta for r in results]
    with applied(model, deltas):
        ev = evaluate(model, tok, reqs, *base)
    eiffel = editor.compute(model, tok, [EIFFEL], ctx)[0]
    with applied(model, [eiffel.delta]):
        g_alone = greedy(model, tok, EIFFEL.prompt, 3)
    with applied(model, deltas + [eiffel.delta]):
        g_all = greedy(model, tok, EIFFEL.prompt, 3)
    times = [r.metrics["time_s"] for r in results]
    row = {
        "variant": name,
        "overrides": {k: v for k, v in config_to_json(cfg).items() if k in overrides and v != BASE.get(k, object())},
        **ev,
        "single_efficacy": sum(single_eff) / len(single_eff),
        "time_per_edit_s": statistics.mean(times),
        "time_max_s": max(times),
        "steps_mean": statistics.mean(r.metrics["steps"] for r in results),
        "converged": sum(r.metrics["converged"] for r in results) / len(results),
        "entries_per_edit": statistics.mean(r.metrics["entries_changed"] for r in results),
        "update_norm": statistics.mean(r.metrics["update_norm"] for r in results),
        "eiffel_alone": g_alone,
        "eiffel_with_all": g_all,
        "eiffel_ok": g_alone.startswith(" Rome") and g_all.startswith(" Rome"),
        "time_attribution_s": statistics.mean(r.metrics["time_attribution_s"] for r in results),
        "load_avg": os.getloadavg()[0],
        "n": len(reqs),
        "wall_s": wall,
    }
    log.info("%s: %s", name, json.dumps(row))
    return row


def write_table(rows, out: Path, header_note: str):
    lines = [
        "# KNE on SmolLM2-135M — first N CounterFact records",
        "",
        header_note,
        "",
        "Edits computed independently on the base model, then **all deltas applied together** and scored.",
        "Efficacy/paraphrase: logP(new) > logP(true) (sum of token log-probs). Locality top-1: share of",
        "locality prompts whose unedited greedy first token is kept; NS: share with logP(locality answer) >",
        "logP(target_new) there; Δlogp: mean change of logP(locality answer). Generic ΔNLL: change of the",
        "mean NLL (nats per sentence, ~18 tokens) of 5 generic sentences (damage/fluency proxy). Single:",
        "efficacy of each delta alone. Eiffel: greedy continuation of",
        "\"The Eiffel Tower is located in the city of\" after the \" Rome\" edit (alone / with all deltas).",
        "Time: seconds per edit (2 CPU cores shared with other jobs, 1 torch thread; the 1-minute load",
        "average at the end of each variant is given — timings are only comparable at similar load).",
        "",
        "| variant | overrides | n | efficacy | paraphrase | loc top-1 | loc NS | loc Δlogp | generic ΔNLL | single | steps | conv | s/edit (attr.) | load | entries/edit | ‖Δ‖ | Eiffel alone / all |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ov = ", ".join(f"{k}={v}" for k, v in r["overrides"].items()) or "(base)"
        lines.append(
            f"| {r['variant']} | {ov} | {r['n']} | {r['efficacy']:.2f} | {r['paraphrase']:.2f} | {r['locality_top1']:.2f} |"
            f" {r['locality_ns']:.2f} | {r['locality_dlogp']:+.2f} | {r['generic_dnll']:+.2f} | {r['single_efficacy']:.2f} | {r['steps_mean']:.1f} | {r['converged']:.2f} |"
            f" {r['time_per_edit_s']:.1f} ({r.get('time_attribution_s', float('nan')):.1f}) | {r.get('load_avg', float('nan')):.1f} | {r['entries_per_edit']:.0f} | {r['update_norm']:.2f} |"
            f" {r['eiffel_alone']!r} / {r['eiffel_with_all']!r} |"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    notes = ""
    if out.exists() and NOTES_MARKER in out.read_text():  # keep the hand-written conclusions
        notes = out.read_text().split(NOTES_MARKER, 1)[1]
    out.write_text("\n".join(lines) + "\n\n" + NOTES_MARKER + notes)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20, help="first N CounterFact records")
    ap.add_argument("--variants", default="base", help=f"comma-separated, from {sorted(VARIANTS)}, or name:k=v;k=v")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default=DATA)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core box)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "kne.md"))
    ap.add_argument("--fresh", action="store_true", help="drop rows of earlier runs from the table")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    logging.getLogger("kledger").setLevel(logging.WARNING)
    log = logging.getLogger("kne_tune")
    torch.set_num_threads(args.threads)
    model, tok, info = load_model(args.model, "cpu")
    recs = json.load(open(args.data))[: args.n]
    reqs = [FactRequest.from_record(r) for r in recs]
    base_loc_tok = first_tokens(model, tok, [r.locality_prompts[0] for r in reqs])
    base_loc_lp = score_targets(model, tok, [r.locality_prompts[0] for r in reqs],
                                [" " + r.locality_answers[0].lstrip() for r in reqs])
    out = Path(args.out)
    rows = []
    if out.with_suffix(".json").exists() and not args.fresh:
        rows = json.loads(out.with_suffix(".json").read_text())
    for spec in filter(None, args.variants.split(",")):
        name, overrides = parse_variant(spec)
        row = run_variant(name, overrides, model, tok, reqs, (base_loc_tok, base_loc_lp, generic_nll(model, tok)), log)
        rows = [r for r in rows if r["variant"] != name] + [row]
        if not args.no_write:
            write_table(rows, out, f"Model `{args.model}`, data `{os.path.basename(args.data)}`. Every variant is "
                        f"BASE `{json.dumps(BASE)}` plus its overrides; other fields are the KNEConfig defaults.")
    for r in rows:
        print(f"{r['variant']:<28} eff={r['efficacy']:.2f} para={r['paraphrase']:.2f} loc={r['locality_top1']:.2f}"
              f" ns={r['locality_ns']:.2f} dlp={r['locality_dlogp']:+.2f} gen={r['generic_dnll']:+.2f} single={r['single_efficacy']:.2f} s/edit={r['time_per_edit_s']:.1f}"
              f" entries={r['entries_per_edit']:.0f} eiffel={r['eiffel_alone']!r}/{r['eiffel_with_all']!r}")


if __name__ == "__main__":
    main()
