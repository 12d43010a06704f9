"""Real merges and rebase-revert on smollm2-135m (CPU), CounterFact records.

``merge``: two branches edited in parallel from the same base, ``a`` with records [0, n) and
``b`` with records [n, 2n) of ``counterfact-600.json`` (disjoint subjects: no hard conflicts),
each a sequence of edits, one event per fact (``--batch-size`` facts per editor call; 1 is the
lifelong setting; the committed runs used 10, see bench/results/merge_real.md). The branch
ledger is built once and copied for each strategy; ``a`` merges ``b``. Reported: efficacy
(logP(new) > logP(true) on the edit prompt) and paraphrase of both sides' facts on each branch
alone and after the merge, merge time, and the dry-run's overlap/interference summary.

``rebase``: a sequence of n single-fact edits; edit number k is removed with plain ``revert``
and with ``revert --rebase``; reported: how far the two models differ (relative Frobenius
distance on the edited tensors), the remaining facts' efficacy under both, the removed fact's
efficacy (base level is expected), and the time of each.

Usage::

    python bench/merge_real.py merge --method memit --n 50
    python bench/merge_real.py rebase --method alphaedit --n 50 --k 10
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from counterfact_eval import counterfact_scores  # noqa: E402

from kledger import Workspace, init_ledger, rebase_revert  # noqa: E402
from kledger.editors.models import load_model  # noqa: E402
from kledger.ledger.compose import materialise  # noqa: E402
from kledger.ledger.merge import analyse  # noqa: E402
from kledger.ledger.mergeplan import plan_merge  # noqa: E402
from kledger.ledger.records import load_requests  # noqa: E402
from kledger.ledger.store import Ledger  # noqa: E402
from kledger.merging import do_merge  # noqa: E402

DATA = "/work/shared/data/counterfact-600.json"
DEVICE = "cpu"
#: key statistics (C0) are content-addressed per base model: computed once, shared by every ledger here
KEYSTATS = Path("/tmp/kledger-merge-real/keystats")


CORPUS = Path("/tmp/kledger-merge-real/corpus.txt")


def stats_corpus() -> str:
    """Key statistics from a text file instead of text sampled from the model (the default):
    the ROME "known facts" statements (prompt + GPT-2 XL continuation), ~30k tokens. A file
    corpus is one forward pass per window; sampling 20k tokens took over 40 min of this shared
    2-core CPU. The same corpus is used for every edit, merge and rebase here."""
    if not CORPUS.exists():
        CORPUS.parent.mkdir(parents=True, exist_ok=True)
        recs = json.load(open("/work/shared/data/known_1000.json"))
        CORPUS.write_text("\n\n".join(r["prompt"] + r["prediction"] for r in recs) + "\n")
    return str(CORPUS)


def new_ledger(root: Path) -> Ledger:
    L = init_ledger(root, "smollm2-135m")
    if KEYSTATS.is_dir():
        shutil.copytree(KEYSTATS, L.cache_dir / "keystats", dirs_exist_ok=True)
    return L


def save_keystats(L: Ledger) -> None:
    src = L.cache_dir / "keystats"
    if src.is_dir():
        shutil.copytree(src, KEYSTATS, dirs_exist_ok=True)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def scores(ledger: Ledger, ref, reqs) -> dict:
    model, tok, _ = load_model("smollm2-135m", DEVICE)
    materialise(ledger, model, ref)
    s = counterfact_scores(model, tok, reqs, fluency_prompts=0)
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in s.items()}


def build_branches(root: Path, method: str, a, b, overrides, batch_size: int = 1) -> dict:
    if (root / ".kledger").exists():
        log(f"reusing {root}")
        return json.loads((root / "build.json").read_text())
    root.mkdir(parents=True, exist_ok=True)
    L = new_ledger(root)
    L.create_branch("a")
    L.create_branch("b")
    info = {}
    for br, reqs in (("a", a), ("b", b)):
        L.set_current_branch(br)
        ws = Workspace(L, device=DEVICE)
        t = time.perf_counter()
        evs = ws.add(reqs, method=method, overrides=overrides, batch_size=batch_size, stats_corpus=stats_corpus(),
                     on_event=lambda ev: log(f"  {br}: {ev.describe()[:90]}"))
        info[br] = {"edits": len(evs), "seconds": round(time.perf_counter() - t, 1)}
        save_keystats(L)
    L.set_current_branch("a")
    (root / "build.json").write_text(json.dumps(info))
    return info


def run_merge(args) -> dict:
    reqs = load_requests(DATA)
    a, b = reqs[: args.n], reqs[args.n : 2 * args.n]
    root = Path(args.workdir) / f"merge-{args.method}-{args.n}-b{args.batch_size}"
    overrides = dict(kv.split("=", 1) for kv in args.set)
    build = build_branches(root, args.method, a, b, overrides, args.batch_size)
    L = Ledger(root / ".kledger")
    out = {"method": args.method, "n": args.n, "batch_size": args.batch_size, "build": build, "alone": {}, "merged": {}}
    out["alone"]["a"] = {"a": scores(L, "a", a), "b": scores(L, "a", b)}
    out["alone"]["b"] = {"a": scores(L, "b", a), "b": scores(L, "b", b)}
    log(f"alone: {out['alone']}")
    plan = plan_merge(L, L.branch_head("a"), L.branch_head("b"))
    t = time.perf_counter()
    analyse(plan, L.load_delta)
    rel = [max(r.get("theirs_on_our_keys_rel") or 0, r.get("ours_on_their_keys_rel") or 0) for r in plan.interference]
    out["analysis"] = {
        "seconds": round(time.perf_counter() - t, 2), "pairs_sharing_tensors": len(plan.interference),
        "overlapping_pairs": len({(o["ours"], o["theirs"]) for o in plan.overlaps}),
        "shared_entries": sum(o["shared_entries"] for o in plan.overlaps),
        "opposite_sign": sum(o["opposite_sign"] for o in plan.overlaps),
        "keys": sorted({r["keys"] for r in plan.interference}),
        "interference_rel_median": round(float(torch.tensor(rel).median()), 4) if rel else None,
        "interference_rel_max": round(max(rel), 4) if rel else None,
        "conflicts": len(plan.conflicts),
    }
    log(f"analysis: {out['analysis']}")
    for strategy in args.strategies:
        dst = Path(args.workdir) / f"merge-{args.method}-{args.n}-b{args.batch_size}-{strategy}"
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(root / ".kledger", dst / ".kledger")
        M = Ledger(dst / ".kledger")
        M.set_current_branch("a")
        p = plan_merge(M, M.branch_head("a"), M.branch_head("b"))
        t = time.perf_counter()
        ev, extra = do_merge(M, p, strategy, branch="b", device=DEVICE, stats_corpus=stats_corpus())
        secs = time.perf_counter() - t
        row = {"seconds": round(secs, 1), "merge_event": ev.id, "delta_bytes": ev.delta_bytes,
               "superseded": len((ev.config or {}).get("supersedes") or []),
               "a": scores(M, "HEAD", a), "b": scores(M, "HEAD", b)}
        if "ties" in extra:
            row["ties"] = extra["ties"]
        if "resolve" in extra:
            row["resolve"] = {k: v for k, v in extra["resolve"].items() if k in ("methods", "kept_as_sum", "note")}
        out["merged"][strategy] = row
        log(f"{strategy}: {row}")
    return out


def run_rebase(args) -> dict:
    reqs = load_requests(DATA)[args.offset : args.offset + args.n]
    root = Path(args.workdir) / f"rebase-{args.method}-{args.n}-b{args.batch_size}"
    overrides = dict(kv.split("=", 1) for kv in args.set)
    if not (root / ".kledger").exists():
        root.mkdir(parents=True, exist_ok=True)
        L = new_ledger(root)
        t = time.perf_counter()
        Workspace(L, device=DEVICE).add(reqs, method=args.method, overrides=overrides, batch_size=args.batch_size,
                                       stats_corpus=stats_corpus(),
                                       on_event=lambda ev: log(f"  {ev.describe()[:90]}"))
        (root / "build.json").write_text(json.dumps({"seconds": round(time.perf_counter() - t, 1)}))
        save_keystats(L)
    build = json.loads((root / "build.json").read_text())
    L = Ledger(root / ".kledger")
    target = L.active()[args.k - 1]
    removed = [r for r in reqs if r.prompt == target.request["prompt"]]
    rest = [r for r in reqs if r.prompt != target.request["prompt"]]
    out = {"method": args.method, "n": args.n, "k": args.k, "batch_size": args.batch_size, "build_s": build["seconds"],
           "before": {"rest": scores(L, "HEAD", rest), "removed": scores(L, "HEAD", removed)}}
    models = {}
    for mode in ("plain", "rebase"):
        dst = Path(args.workdir) / f"rebase-{args.method}-{args.n}-b{args.batch_size}-{mode}"
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(root / ".kledger", dst / ".kledger")
        M = Ledger(dst / ".kledger")
        t = time.perf_counter()
        if mode == "plain":
            M.revert(target.id)
        else:
            rebase_revert(M, target.id, device=DEVICE, stats_corpus=stats_corpus())
        secs = time.perf_counter() - t
        model, tok, _ = load_model("smollm2-135m", DEVICE)
        m = materialise(M, model, "HEAD")
        models[mode] = {n: p.detach().clone() for n, p in model.named_parameters() if n in m.tensors}
        out[mode] = {"seconds": round(secs, 1), "rest": scores(M, "HEAD", rest),
                     "removed": scores(M, "HEAD", removed)}
        log(f"{mode}: {out[mode]}")
    base, _, _ = load_model("smollm2-135m", DEVICE)
    bp = dict(base.named_parameters())
    names = sorted(set(models["plain"]) | set(models["rebase"]))
    diff = edit = 0.0
    per = {}
    for n in names:
        wp = models["plain"].get(n, bp[n].detach())
        wr = models["rebase"].get(n, bp[n].detach())
        d = float((wp - wr).norm())
        e = float((wr - bp[n].detach()).norm())
        per[n] = {"plain_minus_rebase": round(d, 5), "rebase_edit_norm": round(e, 5),
                  "relative": round(d / e, 4) if e else None}
        diff += d * d
        edit += e * e
    out["distance"] = {"relative_fro": round((diff ** 0.5) / (edit ** 0.5), 4) if edit else None,
                       "plain_minus_rebase_fro": round(diff ** 0.5, 5), "per_tensor": per}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("experiment", choices=["merge", "rebase"])
    ap.add_argument("--method", default="memit")
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--k", type=int, default=10, help="rebase: remove the k-th edit (1-based)")
    ap.add_argument("--offset", type=int, default=200, help="rebase: first CounterFact record")
    ap.add_argument("--batch-size", type=int, default=1,
                    help="facts per editor call while building the sequences (one event per fact either way)")
    ap.add_argument("--strategies", nargs="*", default=["sum", "ties", "resolve"])
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    ap.add_argument("--workdir", default="/tmp/kledger-merge-real")
    ap.add_argument("--out", help="append the JSON result to this file")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    global DEVICE
    DEVICE = args.device
    torch.manual_seed(0)
    res = run_merge(args) if args.experiment == "merge" else run_rebase(args)
    text = json.dumps(res, indent=2)
    print(text)
    if args.out:
        p = Path(args.out)
        prev = json.loads(p.read_text()) if p.exists() else []
        prev.append(res)
        p.write_text(json.dumps(prev, indent=2) + "\n")


if __name__ == "__main__":
    main()
