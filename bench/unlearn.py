"""Benchmark UNLEARN ("forget") and LEARN ("learn") on smollm2-135m (CPU, a few minutes per run).

Known facts: a record of ROME's known_1000.json is *known* when every token of " attribute"
is the model's top-1 prediction after "prompt" under teacher forcing — the same as the greedy
continuation starting with the attribute's tokens. The list is cached (``--known-cache``).

FORGET: the known facts of one relation (``--relation``, default P36 "capital") are split into a
forget set (``--n-forget``) and a same-relation test set (never used as retain); the other known
facts are split into a retain set (``--n-retain``) and an other-relation test set. Reported:
forget rate (share of forget facts no longer known), accuracy on both test sets (the unedited
model knows all of them, so accuracy = retained share), retain-set accuracy, and perplexity
drift on a fixed paragraph — with discrimination on and off.

LEARN: ``--n-learn`` CounterFact records (prompt → target_new, counterfactual) are learned;
accuracy (all answer tokens top-1), paraphrase accuracy, and accuracy on other known facts are
compared with a hand-written LoRA of the same rank on the same weights (Adam, B = 0 start).

    python bench/unlearn.py forget --sweep default discriminate=false   # with / without discrimination
    python bench/unlearn.py forget --relation P103 --n-forget 10 --retain-same 6 --sweep default scale=0.6
    python bench/unlearn.py learn --sweep default method=lora,rank=64 method=lora,rank=64,lr=0.003
Results are appended to bench/results/unlearn.md (``--out``); that file lists the exact commands
of its tables.
"""

from __future__ import annotations

import argparse
import logging
import json
import math
import random
import time
from pathlib import Path

import torch

from kledger.editors.base import EditContext, applied, make_config
from kledger.editors.models import load_model
from kledger.editors.scoring import target_token_accuracy
from kledger.editors.subspace import Facts, edited_weights
from kledger.editors.unlearn import LearnConfig, LearnEditor, SubspaceConfig, UnlearnEditor
from kledger.ledger.records import FactRequest

DATA = Path("/work/shared/data")
PARAGRAPH = (
    "The river rises in the hills to the north of the town and flows south through a broad valley "
    "of farms and small villages. In the nineteenth century the valley was known for its mills, "
    "which used the water to grind grain and later to spin cotton. Most of the mills closed after "
    "the war, and today many of the old buildings have been turned into homes, shops and a small "
    "museum. A railway line was opened in 1862 and still carries passengers to the city, about an "
    "hour away. The town has a primary school, a library and a market that is held every Saturday "
    "in the main square. Visitors often come in the summer to walk along the river, to fish, or to "
    "see the old stone bridge, which was built more than four hundred years ago and is one of the "
    "oldest in the region."
)


def known_facts(model, tok, cache: Path) -> list[dict]:
    recs = json.loads((DATA / "known_1000.json").read_text())
    if cache.is_file():
        ids = set(json.loads(cache.read_text()))
    else:
        ids = set()
        for i in range(0, len(recs), 32):
            b = recs[i : i + 32]
            acc = target_token_accuracy(model, tok, [r["prompt"] for r in b], [" " + r["attribute"] for r in b])
            ids |= {r["known_id"] for r, a in zip(b, acc) if a == 1.0}
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(sorted(ids)))
    return [r for r in recs if r["known_id"] in ids]


def as_request(r: dict) -> FactRequest:
    return FactRequest(prompt=r["prompt"], target_new=r["attribute"], subject=r["subject"],
                       case_id=str(r["known_id"]))


def accuracy(model, tok, reqs, batch=32) -> float:
    if not reqs:
        return float("nan")
    hits = []
    for i in range(0, len(reqs), batch):
        b = reqs[i : i + batch]
        hits += [a == 1.0 for a in target_token_accuracy(model, tok, [r.prompt for r in b], [r.target_new for r in b])]
    return sum(hits) / len(hits)


@torch.no_grad()
def perplexity(model, tok, text: str = PARAGRAPH) -> float:
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    out = model(input_ids=ids, labels=ids)
    return math.exp(float(out.loss))


# ---------------------------------------------------------------------------------------------


def forget_split(known: list[dict], relation: str, n_forget: int, n_retain: int, n_test: int, seed: int,
                 retain_same: int = 0):
    """(forget, same-relation test, retain, other test); ``retain_same`` relation facts join retain."""
    rng = random.Random(seed)
    rel = [as_request(r) for r in known if r["relation_id"] == relation]
    other = [as_request(r) for r in known if r["relation_id"] != relation]
    rng.shuffle(rel)
    rng.shuffle(other)
    if len(rel) <= n_forget + retain_same:
        raise SystemExit(f"relation {relation} has {len(rel)} known facts; need more than"
                         f" --n-forget {n_forget} + --retain-same {retain_same}")
    forget, same_retain, same_test = rel[:n_forget], rel[n_forget : n_forget + retain_same], rel[n_forget + retain_same :]
    return forget, same_test, same_retain + other[:n_retain], other[n_retain : n_retain + n_test]


def run_forget(args, model, tok, known) -> list[dict]:
    forget, same_rel, retain, test = forget_split(known, args.relation, args.n_forget, args.n_retain, args.n_test,
                                                  args.seed, args.retain_same)
    print(f"forget {len(forget)} | same-relation test {len(same_rel)} | retain {len(retain)} | other test {len(test)}")
    ppl0 = perplexity(model, tok)
    rows = []
    variants = []
    for spec in args.sweep:
        overrides = dict(kv.split("=", 1) for kv in spec.split(",") if kv) if spec != "default" else {}
        variants.append((spec, overrides))
    for spec, overrides in variants:
        overrides = {**dict(kv.split("=", 1) for kv in args.set), **overrides}
        cfg = make_config(SubspaceConfig, overrides)
        t0 = time.perf_counter()
        res = UnlearnEditor(cfg).compute(model, tok, forget, EditContext(seed=args.seed, cache_dir=Path(args.cache)), retain=retain)[0]
        dt = time.perf_counter() - t0
        with applied(model, [res.delta]):
            row = {
                "config": spec if spec != "default" else "defaults",
                "overrides": json.dumps(overrides, sort_keys=True),
                "forget_rate": 1 - accuracy(model, tok, forget),
                "same_rel_acc": accuracy(model, tok, same_rel),
                "other_acc": accuracy(model, tok, test),
                "retain_acc": accuracy(model, tok, retain),
                "ppl": perplexity(model, tok),
            }
        layers = res.ensemble["layers"]
        row.update(ppl0=ppl0, time_s=dt, mean_rank=sum(x["rank"] for x in layers) / len(layers),
                   retain_rank=sum(x["retain_rank"] for x in layers) / len(layers),
                   energy_kept=sum(x["energy_kept"] for x in layers) / len(layers),
                   mean_overlap=sum(x["overlap_removed"] for x in layers) / len(layers),
                   loss=(res.metrics["forget_loss_before"], res.metrics["forget_loss_after"]))
        print(json.dumps(row))
        rows.append(row)
    return rows


def write_forget(rows, args, out: Path) -> None:
    lines = [
        f"\n### forget: relation {args.relation}, n_forget {args.n_forget}, retain {args.n_retain}"
        f" (+{args.retain_same} same-relation),"
        f" other test {args.n_test}, seed {args.seed} ({time.strftime('%Y-%m-%d %H:%M')})\n",
        "| config | forget rate | same-rel acc | other acc | retain acc | ppl (base) | rank | energy kept | retain rank | overlap | forget NLL before→after | time s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['forget_rate']:.2f} | {r['same_rel_acc']:.2f} | {r['other_acc']:.2f} |"
            f" {r['retain_acc']:.2f} | {r['ppl']:.2f} ({r['ppl0']:.2f}) | {r['mean_rank']:.1f} | {r['energy_kept']:.2f} | {r['retain_rank']:.1f} |"
            f" {r['mean_overlap']:.2f} | {r['loss'][0]:.2f}→{r['loss'][1]:.2f} | {r['time_s']:.0f} |"
        )
    with out.open("a") as fh:
        fh.write("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------


def lora_fit(model, tok, reqs, names_t, rank: int, steps: int, lr: float, batch_size: int, seed: int):
    """A plain LoRA on the given weights: ΔW = B A (logical out×in), B = 0, A ~ N(0, 1/in)."""
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    facts = Facts(tok, reqs, next(model.parameters()).device, batch_size)
    ab = {}
    for name, transposed in names_t:
        w = params[name]
        out_dim, in_dim = (w.shape[1], w.shape[0]) if transposed else tuple(w.shape)
        a = (torch.randn(rank, in_dim, generator=g) / math.sqrt(in_dim)).requires_grad_(True)
        b = torch.zeros(out_dim, rank, requires_grad=True)
        ab[name] = (a, b, transposed)
    opt = torch.optim.Adam([t for a, b, _ in ab.values() for t in (a, b)], lr=lr)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        for batch in facts.batches:
            ov = {n: params[n] + ((b @ a).T if tr else b @ a) for n, (a, b, tr) in ab.items()}
            (facts.nll(model, ov, batch).sum() / facts.n).backward()
        opt.step()
    from kledger.ledger.deltas import Delta, LowRankDelta

    tensors = {}
    for n, (a, b, tr) in ab.items():
        a, b = a.detach(), b.detach()
        tensors[n] = LowRankDelta(tuple(params[n].shape), u=a.T.contiguous(), v=b.contiguous()) if tr else \
            LowRankDelta(tuple(params[n].shape), u=b.contiguous(), v=a.T.contiguous())
    return Delta(tensors=tensors)


def run_learn(args, model, tok, known) -> list[dict]:
    recs = json.loads((DATA / "counterfact-600.json").read_text())
    rng = random.Random(args.seed)
    learn = [FactRequest.from_record(r) for r in rng.sample(recs, args.n_learn)]
    para = [FactRequest(prompt=r.rephrase_prompts[0], target_new=r.target_new) for r in learn if r.rephrase_prompts]
    other = [as_request(r) for r in known]
    rng.shuffle(other)
    retain, test = other[: args.n_retain], other[args.n_retain : args.n_retain + args.n_test]
    ppl0 = perplexity(model, tok)
    base = {"learn_acc": accuracy(model, tok, learn), "para_acc": accuracy(model, tok, para)}
    print("base", base)
    rows = []
    for spec in args.sweep:
        overrides = dict(kv.split("=", 1) for kv in spec.split(",") if kv) if spec != "default" else {}
        overrides = {**dict(kv.split("=", 1) for kv in args.set), **overrides}
        method = overrides.pop("method", "learn")
        t0 = time.perf_counter()
        if method == "learn":
            cfg = make_config(LearnConfig, overrides)
            use_retain = retain if cfg.discriminate else ()
            res = LearnEditor(cfg).compute(model, tok, learn, EditContext(seed=args.seed, cache_dir=Path(args.cache)), retain=use_retain)[0]
            delta = res.delta
            ranks = [x["rank"] for x in res.ensemble["layers"]]
        else:  # lora: rank, steps, lr, layers as overrides
            cfg = make_config(LearnConfig, {k: v for k, v in overrides.items() if k not in ("rank",)})
            rank = int(overrides.get("rank", 8))
            ws = [(w.name, w.transposed) for w in edited_weights(model, cfg)]
            delta = lora_fit(model, tok, learn, ws, rank, cfg.steps, cfg.lr, cfg.batch_size, args.seed)
            ranks = [rank] * len(ws)
        dt = time.perf_counter() - t0
        with applied(model, [delta]):
            row = {"config": f"{method} {spec}", "learn_acc": accuracy(model, tok, learn),
                   "para_acc": accuracy(model, tok, para), "other_acc": accuracy(model, tok, test),
                   "ppl": perplexity(model, tok)}
        row.update(ppl0=ppl0, time_s=dt, mean_rank=sum(ranks) / len(ranks),
                   params=sum(td.u.numel() + td.v.numel() for td in delta.tensors.values()))
        print(json.dumps(row))
        rows.append(row)
    rows.insert(0, {"config": "unedited", **base, "other_acc": 1.0, "ppl": ppl0, "ppl0": ppl0, "time_s": 0,
                    "mean_rank": 0, "params": 0})
    return rows


def write_learn(rows, args, out: Path) -> None:
    lines = [
        f"\n### learn: {args.n_learn} CounterFact facts, retain {args.n_retain}, other test {args.n_test},"
        f" seed {args.seed} ({time.strftime('%Y-%m-%d %H:%M')})\n",
        "| config | learn acc | paraphrase acc | other known acc | ppl (base) | mean rank | delta params | time s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['learn_acc']:.2f} | {r['para_acc']:.2f} | {r['other_acc']:.2f} |"
            f" {r['ppl']:.2f} ({r['ppl0']:.2f}) | {r['mean_rank']:.1f} | {r['params']} | {r['time_s']:.0f} |"
        )
    with out.open("a") as fh:
        fh.write("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("task", choices=("forget", "learn"))
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--relation", default="P36")
    ap.add_argument("--n-forget", type=int, default=14)
    ap.add_argument("--retain-same", type=int, default=0,
                    help="move this many same-relation facts (not forgotten) into the retain set")
    ap.add_argument("--n-learn", type=int, default=20)
    ap.add_argument("--n-retain", type=int, default=32)
    ap.add_argument("--n-test", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], metavar="K=V", help="config override for every run")
    ap.add_argument("--sweep", nargs="+", default=["default"],
                    help="runs: 'default' or comma-separated K=V overrides (method=lora,rank=8 for LEARN)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (on the shared 2-core machine 1 thread was ~6x faster than 2)")
    ap.add_argument("--known-cache", default=str(Path.home() / ".cache/kledger/bench/known-smollm2-135m.json"))
    ap.add_argument("--cache", default=str(Path.home() / ".cache/kledger/bench/cache"),
                    help="editor cache (fitted task subspaces are reused across runs with equal fits)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "unlearn.md"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("httpx", "urllib3", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    model, tok, info = load_model(args.model, "cpu")
    known = known_facts(model, tok, Path(args.known_cache))
    print(f"{len(known)} known facts")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.task == "forget":
        write_forget(run_forget(args, model, tok, known), args, out)
    else:
        write_learn(run_learn(args, model, tok, known), args, out)


if __name__ == "__main__":
    main()
