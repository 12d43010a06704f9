"""Lifelong benchmark: 1,000 sequential edits through the ledger, audited every 100.

The stream is the 600 records of ``counterfact-600.json`` followed by the first 400 of
``zsre-600.json`` (from ``../shared/data``), edited in order with ``Workspace.add`` in batches of
at most 10 (one event per fact). Every ``--audit-every`` edits (and at the end) the script
measures, on the current model:

* efficacy / paraphrase of *all* edits made so far (CounterFact: logP(new) > logP(true);
  zsRE: teacher-forced token accuracy of the new target), so forgotten edits count against it;
* neighbourhood top-1 kept: locality prompts whose greedy first token is the base model's;
* the full audit (``Auditor.audit`` on the ledger's probe set): known-fact retention drop,
  perplexity ratio, KL to the base, max ‖W−W₀‖/‖W₀‖, edit retention;
* seconds per edit (editor + ledger append, no audit) and seconds per audit.

Rows go to ``WORKDIR/rows.jsonl`` (one per audit) and are copied into
``bench/results/lifelong.jsonl`` by ``write``. The run resumes from its ledger: it counts the
``add`` events already recorded and continues with the next record (stop it at any time).

    python bench/lifelong.py run --name mem-tok --threads 2                  # the default method (memory)
    python bench/lifelong.py run --name gs-5k --method ultraedit --threads 1 # the weight-editing default before it
    python bench/lifelong.py run --name alphaedit --method alphaedit --n 300
    python bench/lifelong.py write                                            # table + plot
    python bench/lifelong.py kept NAME --n 600                                # which edits hold / cost facts
    python bench/lifelong.py consolidate NAME --alpha 1,10                    # re-solve the accumulated update
"""

from __future__ import annotations

import argparse
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

from kledger.editors.registry import DEFAULT_METHOD  # noqa: E402
from kledger.editors.scoring import score_targets, target_token_accuracy  # noqa: E402
from kledger.ledger.records import FactRequest, load_requests  # noqa: E402

log = logging.getLogger("lifelong")
HERE = Path(__file__).resolve().parent
DATA = Path(os.environ.get("KLEDGER_DATA", HERE.parent.parent / "shared" / "data"))
RESULTS = HERE / "results"
RUNS = Path(os.environ.get("KLEDGER_BENCH_RUNS", "/tmp/kledger-bench/lifelong"))


def stream(n: int) -> list[tuple[str, FactRequest]]:
    cf = load_requests(str(DATA / "counterfact-600.json"))
    zs = [FactRequest.from_record(rec) for rec in json.loads((DATA / "zsre-600.json").read_text())[:400]]
    return ([("cf", r) for r in cf] + [("zsre", r) for r in zs])[:n]


def _workspace(workdir: Path, model: str, threads: int):
    from kledger import Workspace, init_ledger  # noqa: PLC0415
    from kledger.ledger.store import Ledger  # noqa: PLC0415

    torch.set_num_threads(threads)
    if (workdir / ".kledger").is_dir():
        ledger = Ledger.open(workdir)
    else:
        workdir.mkdir(parents=True, exist_ok=True)
        ledger = init_ledger(workdir, model)
    ws = Workspace(ledger, device="cpu")
    ws.pulse = False  # audits are measured separately, every --audit-every edits
    return ws


def _done(ledger, method: str) -> int:
    return sum(1 for e in ledger.events(types=["add"]) if e.method == method)


def _rows(workdir: Path) -> list[dict]:
    p = workdir / "rows.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()] if p.exists() else []


def _base_locality(workdir: Path, ws, items) -> list[int]:
    """The base model's greedy first token of every locality prompt in the stream (cached)."""
    p = workdir / "base_locality.json"
    prompts = [q for _, r in items for q in r.locality_prompts]
    if p.exists():
        cached = json.loads(p.read_text())
        if len(cached) == len(prompts):
            return cached
    model, tok, _ = ws.load_base()
    toks = first_tokens(model, tok, prompts)
    p.write_text(json.dumps(toks))
    return toks


@torch.no_grad()
def edit_scores(model, tok, items, base_loc: list[int]) -> dict:
    """Efficacy / paraphrase of every edit so far and neighbourhood top-1 kept, on ``model``."""
    eff, para, per = [], [], {"cf": ([], []), "zsre": ([], [])}
    cf = [r for d, r in items if d == "cf"]
    zs = [r for d, r in items if d == "zsre"]
    if cf:
        new = score_targets(model, tok, [r.prompt for r in cf], [r.target_new for r in cf])
        true = score_targets(model, tok, [r.prompt for r in cf], [r.target_true for r in cf])
        e = (new > true).float().tolist()
        pp = [(r, q) for r in cf for q in r.rephrase_prompts]
        pn = score_targets(model, tok, [q for _, q in pp], [r.target_new for r, _ in pp])
        pt = score_targets(model, tok, [q for _, q in pp], [r.target_true for r, _ in pp])
        p = (pn > pt).float().tolist()
        eff += e; para += p; per["cf"] = (e, p)
    if zs:
        e = target_token_accuracy(model, tok, [r.prompt for r in zs], [r.target_new for r in zs])
        pp = [(r, q) for r in zs for q in r.rephrase_prompts]
        p = target_token_accuracy(model, tok, [q for _, q in pp], [r.target_new for r, _ in pp])
        eff += e; para += p; per["zsre"] = (e, p)
    loc = [q for _, r in items for q in r.locality_prompts]
    now = first_tokens(model, tok, loc) if loc else []
    kept = sum(a == b for a, b in zip(now, base_loc[: len(now)])) / max(len(now), 1)
    out = {"efficacy": _mean(eff), "paraphrase": _mean(para), "neighbourhood_kept": round(kept, 4)}
    for k, (e, p) in per.items():
        if e:
            out[f"{k}_efficacy"], out[f"{k}_paraphrase"], out[f"{k}_n"] = _mean(e), _mean(p), len(e)
    return out


def _mean(xs) -> float | None:
    return round(sum(xs) / len(xs), 4) if xs else None


def run(args) -> None:
    workdir = RUNS / args.name
    ws = _workspace(workdir, args.model, args.threads)
    ledger = ws.ledger
    shown = args.set + (["--preserve-known-facts"] if args.preserve_known_facts else [])
    meta = {"name": args.name, "method": args.method, "set": shown, "batch_size": args.batch_size,
            "model": args.model, "threads": args.threads, "start": args.start}
    (workdir / "meta.json").write_text(json.dumps(meta, indent=1))
    items = stream(args.start + args.n)[args.start:]  # --start: a trial on a later segment (e.g. zsRE at 600)
    overrides = dict(kv.split("=", 1) for kv in args.set)
    if args.preserve_known_facts:
        overrides["preserve_facts"] = str(_known_facts_file(workdir, ws))
    elif (exclude := sampled_facts_exclude(args.method, overrides)) is not None:
        overrides["facts_exclude"] = exclude
        log.info("sampled facts: leaving out sentences that name one of the %d probe subjects", len(exclude))
    base_loc = _base_locality(workdir, ws, items)
    auditor = None
    done = _done(ledger, args.method)
    audited = {r["edits"] for r in _rows(workdir)}
    log.info("%s: %d of %d edits already in the ledger", args.name, done, len(items))
    spent = _spent(workdir, done)
    window = spent - sum(r.get("edit_s_window", 0.0) for r in _rows(workdir))  # a window a stop cut short
    while done < len(items) or done not in audited:
        if done < len(items):
            nxt = min(len(items), (done // args.audit_every + 1) * args.audit_every)
            batch = [r for _, r in items[done : min(done + args.batch_size, nxt)]]
            t0 = time.perf_counter()
            ws.add(batch, method=args.method, overrides=overrides, batch_size=len(batch))
            dt = time.perf_counter() - t0
            window += dt
            spent += dt
            done += len(batch)
            with open(workdir / "batches.jsonl", "a") as fh:  # every batch's time: a resumed run counts it all
                fh.write(json.dumps({"edits": done, "s": round(dt, 3), "load": round(os.getloadavg()[0], 2)}) + "\n")
            log.info("%s: %d edits (%.2f s/edit this batch, load %.2f)", args.name, done, dt / len(batch),
                     os.getloadavg()[0])
        if (done % args.audit_every == 0 or done == len(items)) and done not in audited:
            if auditor is None:
                auditor = _auditor(ws)
            row = _measure(ws, auditor, items[:done], base_loc)
            row.update(edits=done, name=args.name, method=args.method, set=shown, start=args.start,
                       edit_s=round(spent / done, 3),
                       edit_s_window=round(window, 2), load=round(os.getloadavg()[0], 2),
                       at=_dt.datetime.now().isoformat(timespec="seconds"))
            with open(workdir / "rows.jsonl", "a") as fh:
                fh.write(json.dumps(row) + "\n")
            audited.add(done)
            window = 0.0
            log.info("%s @%d: %s", args.name, done, {k: row.get(k) for k in _COLS})


def sampled_facts_exclude(method: str, overrides: dict) -> list[str] | None:
    """The probe subjects, when the run's UltraEdit samples known facts (``facts_weight`` > 0, by default
    or by ``--set``, and no facts file): sentences naming them stay out of what the editor preserves."""
    from kledger.audit.probes import probe_subjects  # noqa: PLC0415
    from kledger.editors.ultraedit import UltraEditConfig  # noqa: PLC0415

    weight = float(overrides.get("facts_weight", UltraEditConfig().facts_weight))
    if method != "ultraedit" or weight <= 0 or "preserve_facts" in overrides:
        return None
    return probe_subjects()


def _spent(workdir: Path, done: int) -> float:
    """Seconds spent on the first ``done`` edits, from the per-batch log ``batches.jsonl`` (so a stop
    between audits loses nothing but a batch cut off before its line). A run from before that log starts
    it with what its audited windows hold."""
    p = workdir / "batches.jsonl"
    if not p.exists():
        carried = sum(r.get("edit_s_window", 0.0) for r in _rows(workdir))
        p.write_text(json.dumps({"edits": done, "s": round(carried, 3), "from": "audited windows"}) + "\n")
    batches = [json.loads(x) for x in p.read_text().splitlines() if x.strip()]
    return sum(b["s"] for b in batches if b["edits"] <= done)


def _known_facts_file(workdir: Path, ws) -> Path:
    """``known_1000.json`` without the records whose subject appears in an audit probe prompt (the
    audit's known facts must stay unseen by the editor), written into the run's directory."""
    from kledger.audit.probes import knowledge_prompts  # noqa: PLC0415

    probe_text = "\n".join(knowledge_prompts())
    recs = json.loads((DATA / "known_1000.json").read_text())
    keep = [r for r in recs if r["subject"] not in probe_text]
    out = workdir / "preserve_facts.json"
    out.write_text(json.dumps([{"prompt": r["prompt"], "attribute": r["attribute"]} for r in keep]))
    log.info("preserve_facts: %d of %d known_1000 records (%d share a subject with a probe prompt)", len(keep),
             len(recs), len(recs) - len(keep))
    return out


def _auditor(ws):
    from kledger.audit.auditor import Auditor  # noqa: PLC0415
    from kledger.auditing import probe_set  # noqa: PLC0415

    model, tok, _ = ws.load_base()
    probes, _, _ = probe_set(ws.ledger, model, tok)
    return Auditor(ws.ledger, model, tok, probes)


def _measure(ws, auditor, items, base_loc) -> dict:
    t0 = time.perf_counter()
    res = auditor.audit(ws.ledger.head())
    audit_s = time.perf_counter() - t0
    m = res.metrics
    row = {k: m.get(k) for k in ("retention_drop", "ppl_ratio", "kl", "weight_rel", "sv_growth", "edit_retention")}
    row["audit_s"] = round(audit_s, 1)
    t0 = time.perf_counter()
    model, tok = ws.working()
    row.update(edit_scores(model, tok, items, base_loc))
    row["score_s"] = round(time.perf_counter() - t0, 1)
    return row


def lost(args) -> None:
    """The known facts the run's current model lost, and how many still start with the base's first
    answer token (the audit's test is the whole greedy answer of up to 3 tokens); JSON on stdout."""
    from kledger.audit.figures import answers_hold  # noqa: PLC0415
    from kledger.auditing import probe_set  # noqa: PLC0415

    ws = _workspace(RUNS / args.name, args.model, args.threads)
    base, tok, _ = ws.load_base()
    facts = list(probe_set(ws.ledger, base, tok)[0].facts)
    del base
    model, tok = ws.working()
    gone = [f for f, h in zip(facts, answers_hold(model, tok, facts)) if not h[0]]
    first = [(p, tok.decode(tok(a, add_special_tokens=False)["input_ids"][:1])) for p, a in gone]
    kept = sum(h[0] for h in answers_hold(model, tok, first))
    out = {"run": args.name, "edits": _done(ws.ledger, _meta(RUNS / args.name).get("method", "ultraedit")),
           "facts": len(facts), "lost": len(gone), "lost_keeping_first_token": kept,
           "first_token_drop": round((len(gone) - kept) / max(len(facts), 1), 4), "lost_facts": gone}
    print(json.dumps(out))


def _meta(workdir: Path) -> dict:
    p = workdir / "meta.json"
    return json.loads(p.read_text()) if p.exists() else {}


_COLS = ("efficacy", "paraphrase", "neighbourhood_kept", "retention_drop", "ppl_ratio", "kl", "weight_rel",
         "edit_s", "audit_s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="edit the stream (resumable) with audits")
    r.add_argument("--name", required=True)
    r.add_argument("--method", default=DEFAULT_METHOD)
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    r.add_argument("--n", type=int, default=1000)
    r.add_argument("--start", type=int, default=0, help="skip the stream's first START records (trials)")
    r.add_argument("--preserve-known-facts", action="store_true",
                   help="give the editor known_1000.json (minus the probe set's subjects) as preserve_facts")
    r.add_argument("--batch-size", type=int, default=10)
    r.add_argument("--audit-every", type=int, default=100)
    r.add_argument("--model", default="smollm2-135m")
    r.add_argument("--threads", type=int, default=2)
    w = sub.add_parser("write", help="table + plot from the runs' rows")
    w.add_argument("names", nargs="*")
    lo = sub.add_parser("lost", help="the known facts a run's current model lost (JSON)")
    lo.add_argument("name")
    lo.add_argument("--model", default="smollm2-135m")
    lo.add_argument("--threads", type=int, default=1)
    da = sub.add_parser("damage", help="which positions and edited tensors carry a run's lost facts (JSON)")
    da.add_argument("name")
    da.add_argument("--model", default="smollm2-135m")
    da.add_argument("--threads", type=int, default=1)
    ke = sub.add_parser("kept", help="which edits hold, and which cost the known facts (JSON)")
    ke.add_argument("name")
    ke.add_argument("--n", type=int, default=None, help="only the run's first N edits' deltas")
    ke.add_argument("--model", default="smollm2-135m")
    ke.add_argument("--threads", type=int, default=1)
    co = sub.add_parser("consolidate", help="re-solve a run's accumulated update ΔW H (H + αΣ)⁻¹ per α, off the ledger (JSON)")
    co.add_argument("name")
    co.add_argument("--alpha", default="1,10", help="comma-separated α values")
    co.add_argument("--model", default="smollm2-135m")
    co.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.cmd == "run":
        run(args)
    elif args.cmd == "lost":
        lost(args)
    elif args.cmd == "kept":
        from lifelong_kept import main as kept  # noqa: PLC0415

        start = _meta(RUNS / args.name).get("start", 0)
        kept(_workspace(RUNS / args.name, args.model, args.threads), stream(start + 1000)[start:], args.n)
    elif args.cmd == "consolidate":
        from lifelong_consolidate import main as consolidate  # noqa: PLC0415

        workdir = RUNS / args.name
        ws = _workspace(workdir, args.model, args.threads)
        n = _done(ws.ledger, "ultraedit")
        start = _meta(workdir).get("start", 0)
        consolidate(ws, workdir, stream(start + n)[start:], [float(a) for a in args.alpha.split(",")], edit_scores)
    elif args.cmd == "damage":
        from lifelong_damage import main as damage  # noqa: PLC0415

        damage(_workspace(RUNS / args.name, args.model, args.threads), args.name)
    else:
        from lifelong_report import write  # noqa: PLC0415

        write(args.names, RUNS, RESULTS)


if __name__ == "__main__":
    main()
