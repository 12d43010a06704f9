"""Sequential batch editing with MEMIT / AlphaEdit (± BLUE) on a real model; scores after the sequence.

    python bench/locate_edit.py --n 200 --batch 10 --variants memit,memit-blue,alphaedit,alphaedit-blue

For each variant: the first N records are edited in batches; each batch's deltas are written into
the working model before the next batch (AlphaEdit gets the earlier batches' ``Delta.state`` as
``ctx.history["states"]``, as the ledger would pass it). Scores are measured on the final model
(after the whole sequence, the lifelong setting); with ``--immediate`` also right after each batch.

CounterFact: efficacy / paraphrase = P(new) > P(true) (sum of target-token log-probs) on the
prompt / rephrase; specificity: ``ns`` = P(locality answer) > P(new target) on the locality prompt
(CounterFact's neighbourhood score), ``top1`` = the unedited model's greedy next token on the
locality prompt is still the greedy next token. zsRE: teacher-forced token accuracy of the new
target on the prompt / rephrase; locality = fraction of the locality answer's teacher-forced argmax
tokens that are unchanged from the unedited model.

Results are appended as a markdown table to ``--out`` (default bench/results/locate_edit.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from counterfact_eval import first_tokens  # noqa: E402

from kledger.editors.alphaedit import AlphaEditEditor
from kledger.editors.base import EditContext, make_config
from kledger.editors.kne import KNEEditor
from kledger.editors.locate import LocateConfig, resolve_layers
from kledger.editors.memit import MEMITEditor
from kledger.editors.models import cache_dir, load_model
from kledger.editors.scoring import score_targets
from kledger.editors.tokens import encode_pairs
from kledger.editors.stats import key_covariances
from kledger.ledger.deltas import accumulate
from kledger.ledger.records import FactRequest

log = logging.getLogger("bench.locate_edit")

VARIANTS = {
    "memit": (MEMITEditor, {}),
    "memit-blue": (MEMITEditor, {"blue": True}),
    "alphaedit": (AlphaEditEditor, {}),
    "alphaedit-blue": (AlphaEditEditor, {"blue": True}),
    "kne": (KNEEditor, {}),  # one request at a time; a batch's edits are computed on the same model
}


def parse_sets(items):
    out = {}
    for it in items or []:
        k, _, v = it.partition("=")
        out[k.strip()] = v.strip()
    return out


@torch.no_grad()
def teacher_forced_argmax(model, tok, prompts, targets, bs=16):
    """Per row: (argmax predictions at the target positions, target ids)."""
    dev = next(model.parameters()).device
    out = []
    for i in range(0, len(prompts), bs):
        enc, spans = encode_pairs(tok, prompts[i : i + bs], targets[i : i + bs], dev)
        pred = model(**enc).logits.argmax(-1)
        for j, (s, e) in enumerate(spans):
            out.append((pred[j, s - 1 : e - 1].cpu(), enc["input_ids"][j, s:e].cpu()))
    return out


def ngram_entropy(text: str, ns=(2, 3), weights=(2 / 3, 4 / 3)) -> float:
    """ROME's fluency measure: weighted mean of the n-gram (word) entropies, in bits."""
    import collections
    import math

    words = text.split()
    total = []
    for n, w in zip(ns, weights):
        grams = collections.Counter(tuple(words[i : i + n]) for i in range(max(len(words) - n + 1, 0)))
        c = sum(grams.values())
        h = -sum(v / c * math.log2(v / c) for v in grams.values()) if c else 0.0
        total.append(w * h)
    return sum(total) / len(total)


@torch.no_grad()
def fluency(model, tok, prompts, max_new_tokens=40):
    """Mean n-gram entropy of greedy continuations (one batch, left padding)."""
    dev = next(model.parameters()).device
    old = tok.padding_side
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    enc = tok(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False).to(dev)
    tok.padding_side = old
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return sum(ngram_entropy(t) for t in texts) / len(texts), texts


def evaluate(model, tok, reqs, kind, base=None, n_fluency=20):
    """Scores on the current model; ``base`` holds the unedited model's reference predictions."""
    res = {}
    if n_fluency:
        res["fluency"], res["_gen"] = fluency(model, tok, [r.prompt for r in reqs[:n_fluency]])
    if kind == "counterfact":
        p = [r.prompt for r in reqs]
        new = score_targets(model, tok, p, [r.target_new for r in reqs])
        true = score_targets(model, tok, p, [r.target_true for r in reqs])
        res["efficacy"] = float((new > true).float().mean())
        res["efficacy_margin"] = float((new - true).mean())
        rp = [(r.rephrase_prompts[0], r) for r in reqs if r.rephrase_prompts]
        pn = score_targets(model, tok, [x for x, _ in rp], [r.target_new for _, r in rp])
        pt = score_targets(model, tok, [x for x, _ in rp], [r.target_true for _, r in rp])
        res["paraphrase"] = float((pn > pt).float().mean())
        lp = [(r.locality_prompts[0], r.locality_answers[0], r) for r in reqs if r.locality_prompts]
        ln = score_targets(model, tok, [x for x, _, _ in lp], [r.target_new for _, _, r in lp])
        lt = score_targets(model, tok, [x for x, _, _ in lp], [" " + a.strip() for _, a, _ in lp])
        res["ns"] = float((lt > ln).float().mean())
        top1 = torch.tensor(first_tokens(model, tok, [x for x, _, _ in lp], batch=32))
        res["_top1"] = top1
        if base is not None:
            res["top1"] = float((top1 == base["_top1"]).float().mean())
    else:  # zsre
        acc = teacher_forced_argmax(model, tok, [r.prompt for r in reqs], [r.target_new for r in reqs])
        res["efficacy"] = sum(float((a == b).float().mean()) for a, b in acc) / len(acc)
        rp = [(r.rephrase_prompts[0], r) for r in reqs if r.rephrase_prompts]
        acc = teacher_forced_argmax(model, tok, [x for x, _ in rp], [r.target_new for _, r in rp])
        res["paraphrase"] = sum(float((a == b).float().mean()) for a, b in acc) / len(acc)
        lp = [(r.locality_prompts[0], r.locality_answers[0]) for r in reqs if r.locality_prompts]
        loc = teacher_forced_argmax(model, tok, [x for x, _ in lp], [" " + a.strip() for _, a in lp])
        res["_loc"] = [a for a, _ in loc]
        if base is not None:
            res["locality"] = sum(float((a == b).float().mean()) for a, b in zip(res["_loc"], base["_loc"])) / len(loc)
    return res


def _memoise_v_star():
    """Reuse v* while the model's weights and the inputs are the same (for --sweep)."""
    import hashlib

    from kledger.editors import driver

    orig, memo = driver.compute_z, {}

    def cached(model, tok, sites, layer, requests, templates, cfg, **kw):
        h = hashlib.sha256()
        for n, p in model.named_parameters():
            if "mlp" in n:
                h.update(p.detach().numpy().tobytes())
        v = (cfg.v_lr, cfg.v_steps, cfg.v_stop_loss, cfg.clamp_norm_factor, cfg.kl_factor, cfg.v_weight_decay)
        key = (h.hexdigest(), layer, tuple(r.prompt for r in requests), tuple(templates), v)
        if key not in memo:
            memo[key] = orig(model, tok, sites, layer, requests, templates, cfg, **kw)
        return memo[key]

    driver.compute_z = cached


def write_into(model, deltas):
    params = dict(model.named_parameters())
    new = accumulate(params, deltas)
    with torch.no_grad():
        for n, t in new.items():
            params[n].copy_(t.to(params[n].dtype))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dataset", choices=["counterfact", "zsre"], default="counterfact")
    ap.add_argument("--data", default=None, help="records file (default /work/shared/data/<dataset>-600.json)")
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--variants", default="memit,memit-blue,alphaedit,alphaedit-blue")
    ap.add_argument("--set", action="append", default=[], help="config override k=v for every variant")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core box)")
    ap.add_argument("--cache-dir", default=str(cache_dir() / "bench-cache"))
    ap.add_argument("--stats-corpus", default=None)
    ap.add_argument("--immediate", action="store_true", help="also score each batch right after it is written")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "locate_edit.md"))
    ap.add_argument("--json", default=None, help="also write raw results as JSON here")
    ap.add_argument("--tag", default="")
    ap.add_argument("--rows", default=None, help="append each finished variant's row as a JSON line here")
    ap.add_argument("--table-from", nargs="+", default=None,
                    help="only render one table from these --rows files (runs split over processes)")
    ap.add_argument("--checkpoints", default="",
                    help="comma-separated edit counts after which the edits so far are scored too")
    ap.add_argument("--sweep", default=None,
                    help="k=v1,v2,... (or k=v1;v2 for list values): run every variant once per value (v* is memoised while the model"
                         " is unchanged, so sweeping solve parameters costs little)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.table_from:
        recs = [json.loads(l) for f in args.table_from for l in Path(f).read_text().splitlines() if l.strip()]
        stats = max(recs, key=lambda r: 0 if r["stats"].get("hit") else 1)  # prefer a run that computed them
        first = recs[0]["row"]
        args.n, args.batch = first["n"], first["batch"]
        args.dataset = "counterfact" if "ns" in first else "zsre"
        write_table(args, [r["row"] for r in recs], recs[0]["base"], stats["stats_s"], stats["stats"])
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    data = args.data or f"/work/shared/data/{args.dataset}-600.json"
    records = json.load(open(data))[args.offset : args.offset + args.n]
    reqs = [FactRequest.from_record(r) for r in records]
    model, tok, info = load_model(args.model, "cpu")
    sets = parse_sets(args.set)
    base_eval = evaluate(model, tok, reqs, args.dataset)
    base_eval.update({k: 1.0 for k in ("top1", "locality")})
    log.info("unedited: %s", {k: v for k, v in base_eval.items() if not k.startswith("_")})

    rows = []
    ctx0 = EditContext(fingerprint=info.fingerprint, cache_dir=Path(args.cache_dir), seed=0,
                       stats_corpus=args.stats_corpus)
    # statistics first, on the base model, for every layer any variant edits (one pass)
    layer_union, cfgs = set(), {}
    runs = []  # (label, variant name)
    sweep_key, sweep_vals = None, [None]
    if args.sweep:
        sweep_key, raw = args.sweep.split("=", 1)
        sweep_vals = raw.split(";") if ";" in raw else raw.split(",")  # ";" when values hold commas
    for name in args.variants.split(","):
        cls, over = VARIANTS[name]
        for val in sweep_vals:
            extra = {sweep_key: val} if sweep_key else {}
            label = f"{name} {sweep_key}={val}" if sweep_key else name
            fields = {f.name for f in dataclasses.fields(cls.config_cls)}
            mine = {k: v for k, v in {**sets, **extra}.items() if k in fields}  # --set k=v of other methods
            cfgs[label] = make_config(cls.config_cls, {**mine, **over})
            if isinstance(cfgs[label], LocateConfig):
                layer_union |= set(resolve_layers(cfgs[label], model))
            runs.append((label, name))
    if sweep_key:
        _memoise_v_star()
    any_cfg = next((c for c in cfgs.values() if isinstance(c, LocateConfig)), LocateConfig())
    t0 = time.perf_counter()
    sdesc = {"tokens": 0, "corpus": {"kind": "none"}, "hit": True}
    if layer_union:
        _, sdesc = key_covariances(model, tok, sorted(layer_union), ctx0, n_tokens=any_cfg.stats_tokens,
                                   seq_len=any_cfg.stats_seq_len, seed=0)
    stats_s = time.perf_counter() - t0
    log.info("statistics: %.1fs %s", stats_s, sdesc)

    for label, name in runs:
        cls, _ = VARIANTS[name]
        editor = cls(cfgs[label])
        base_w = {n: p.detach().clone() for n, p in model.named_parameters()}
        states, times, immediate, vsteps, vloss = [], [], [], [], []
        checkpoints = sorted(int(x) for x in args.checkpoints.split(",") if x.strip())
        t_all = time.perf_counter()
        for b in range(0, len(reqs), args.batch):
            batch = reqs[b : b + args.batch]
            ctx = EditContext(fingerprint=info.fingerprint, cache_dir=Path(args.cache_dir), seed=0,
                              stats_corpus=args.stats_corpus, history={"states": list(states)})
            t = time.perf_counter()
            results = editor.compute(model, tok, batch, ctx)
            times.append(time.perf_counter() - t)
            write_into(model, [r.delta for r in results])
            states.extend(dict(r.delta.state) for r in results if r.delta.state)
            for r in results:
                vsteps.append(r.metrics.get("v_steps", r.metrics.get("steps", 0)))
                vloss.append(r.metrics.get("v_loss_end", r.metrics.get("loss_end", 0.0)))
            if args.immediate:
                ev = evaluate(model, tok, batch, args.dataset)
                immediate.append(ev["efficacy"])
            log.info("%s batch %d: %.1fs (%.1fs/edit) v* steps %s", name, b // args.batch, times[-1],
                     times[-1] / len(batch), vsteps[-len(results):])
            done = b + len(batch)
            if done in checkpoints and done < len(reqs):
                sub = reqs[:done]
                base_sub = {k: (v[:done] if k in ("_top1", "_loc") else v) for k, v in base_eval.items()}
                ev = evaluate(model, tok, sub, args.dataset, base_sub)
                crow = {"variant": f"{label} @{done}", "n": done, "batch": args.batch,
                        "s_per_edit": sum(times) / done, "wall_s": time.perf_counter() - t_all,
                        "v_steps_mean": sum(vsteps) / len(vsteps), "v_loss_end_mean": sum(vloss) / len(vloss),
                        "config": dict(editor.config.__dict__), **{k: v for k, v in ev.items() if not k.startswith("_")}}
                log.info("checkpoint %s", {k: v for k, v in crow.items() if k != "config"})
                write_table(args, [crow], base_sub, stats_s, sdesc)
        total = time.perf_counter() - t_all
        ev = evaluate(model, tok, reqs, args.dataset, base_eval)
        row = {"variant": label, "n": len(reqs), "batch": args.batch, "s_per_edit": sum(times) / len(reqs),
               "wall_s": total, "v_steps_mean": sum(vsteps) / len(vsteps),
               "v_loss_end_mean": sum(vloss) / len(vloss),
               "config": {k: v for k, v in editor.config.__dict__.items()},
               **{k: v for k, v in ev.items() if not k.startswith("_")}, "samples": ev["_gen"][:3]}
        if immediate:
            row["efficacy_immediate"] = sum(immediate) / len(immediate)
        rows.append(row)
        log.info("%s: %s", name, {k: v for k, v in row.items() if k != "config"})
        if args.rows:  # each variant's row as soon as it is done (a killed run keeps its finished variants)
            with open(args.rows, "a") as fh:
                fh.write(json.dumps({"row": row, "base": {k: v for k, v in base_eval.items() if not k.startswith("_")},
                                     "stats_s": stats_s, "stats": sdesc}, default=str) + "\n")
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(base_w[n])
    write_table(args, rows, base_eval, stats_s, sdesc)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows, "stats": sdesc,
                                               "stats_s": stats_s}, indent=1, default=str))


def write_table(args, rows, base_eval, stats_s, sdesc):
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    now = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    load = os.getloadavg()[0]
    lines = [f"\n### {args.tag or 'run'} — {now}", "",
             f"`{' '.join(sys.argv)}`", "",
             f"{args.model}, {args.dataset} records {args.offset}..{args.offset + args.n - 1}, batches of {args.batch},"
             f" {args.threads} thread(s), " + (f"load average {load:.1f}" if not args.table_from else
                                               "rows of separate runs (load averages in the text)")
             + f"; statistics: {sdesc['tokens']} tokens"
             f" ({sdesc['corpus']['kind']} corpus), {stats_s:.1f}s ({'cache hit' if sdesc['hit'] else 'computed'}).",
             ""]
    if args.dataset == "counterfact":
        lines += ["| variant | layers | efficacy | paraphrase | NS (P) | top-1 kept | fluency | s/edit | v* steps | v* loss end |",
                  "|---|---|---|---|---|---|---|---|---|---|",
                  f"| unedited | – | {base_eval['efficacy']:.3f} | {base_eval['paraphrase']:.3f} | {base_eval['ns']:.3f} | 1.000 |"
                  f" {base_eval.get('fluency', float('nan')):.2f} | – | – | – |"]
        for r in rows:
            eff = f"{r['efficacy']:.3f}" + (f" ({r['efficacy_immediate']:.3f})" if "efficacy_immediate" in r else "")
            lines.append(f"| {r['variant']} | {_layers(r)} | {eff} | {r['paraphrase']:.3f} | {r['ns']:.3f} |"
                         f" {r['top1']:.3f} | {r.get('fluency', float('nan')):.2f} | {r['s_per_edit']:.1f} | {r['v_steps_mean']:.1f} | {r['v_loss_end_mean']:.3f} |")
    else:
        lines += ["| variant | layers | efficacy (tok acc) | paraphrase | locality | fluency | s/edit | v* steps |",
                  "|---|---|---|---|---|---|---|---|",
                  f"| unedited | – | {base_eval['efficacy']:.3f} | {base_eval['paraphrase']:.3f} | 1.000 |"
                  f" {base_eval.get('fluency', float('nan')):.2f} | – | – |"]
        for r in rows:
            lines.append(f"| {r['variant']} | {_layers(r)} | {r['efficacy']:.3f} | {r['paraphrase']:.3f} |"
                         f" {r['locality']:.3f} | {r.get('fluency', float('nan')):.2f} | {r['s_per_edit']:.1f} | {r['v_steps_mean']:.1f} |")
    cfg_diff = {k: v for k, v in rows[0]["config"].items() if k not in ("blue",)} if rows else {}
    lines += ["", f"config: `{json.dumps(cfg_diff, default=str)}`", ""]
    with open(out, "a") as fh:
        fh.write("\n".join(lines))


def _layers(r):
    layers = r["config"].get("layers")
    return "default" if layers is None else ",".join(map(str, layers))


if __name__ == "__main__":
    main()
