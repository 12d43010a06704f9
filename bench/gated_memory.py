"""Prototype, off the ledger: a key-gated edit memory at one layer of smollm2-135m over the lifelong stream.

Edit i stores (k_i, r_i, δ_i): k_i the down_proj input at the subject's last token of the prompt, δ_i a vector
added to that layer's MLP output wherever a token's key lies within r_i of k_i (the nearest such entry wins);
δ_i is fitted on the model without the memory under the prompt and context prefixes (Adam, until every
context's target NLL < 0.1); r_i = γ · the distance to the nearest key of 4,096 tokens the model samples itself
or of another entry (an older entry's radius shrinks so as never to reach a newer key). Every --every edits the
stream's scores (``lifelong.edit_scores``) and the retention drop on the audit's probe set of the run
--probes-from (whose ``base_locality.json`` it also reads) are measured with the memory on; para_gate is the
share of paraphrases naming the subject whose key falls inside their own entry's radius.

    python bench/gated_memory.py --n 100 --gamma 0.8 --probes-from gs-5k
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lifelong as L  # noqa: E402
from kledger.editors.models import load_model  # noqa: E402
from kledger.editors.sites import sites_for  # noqa: E402
from kledger.editors.hooks import get_module  # noqa: E402
from kledger.editors.locate import subject_last_index, context_templates  # noqa: E402
from kledger.editors.stats import CorpusSampler  # noqa: E402
from kledger.editors.tokens import encode_pairs  # noqa: E402
from kledger.audit.figures import answers_hold  # noqa: E402
from kledger.auditing import probe_set  # noqa: E402
ap = argparse.ArgumentParser()
ap.add_argument("--n", type=int, default=200); ap.add_argument("--start", type=int, default=0)
ap.add_argument("--layer", type=int, default=3); ap.add_argument("--gamma", type=float, default=0.5)
ap.add_argument("--prefixes", type=int, default=2); ap.add_argument("--steps", type=int, default=40)
ap.add_argument("--lr", type=float, default=0.5); ap.add_argument("--every", type=int, default=100)
ap.add_argument("--out", default=None, help="rows as JSON lines (default: RUNS/gated-L<layer>-g<gamma>.jsonl)")
ap.add_argument("--probes-from", default="gs-5k", help="a lifelong run whose ledger holds the probe set")
ap.add_argument("--fact-bank", action="store_true",
                help="also bound radii by the keys of the known-fact sentences the model samples (editors/factsample.py)")
a = ap.parse_args()
torch.set_num_threads(1); torch.manual_seed(0)
model, tok, _ = load_model("smollm2-135m", "cpu")
site = get_module(model, sites_for(model).mlp_out.format(a.layer))

class Memory:
    def __init__(self): self.K = torch.zeros(0, site.in_features); self.r = torch.zeros(0); self.D = torch.zeros(0, site.out_features)
    def hook(self, mod, inputs, out):
        if not len(self.r): return out
        x = inputs[0]; flat = x.reshape(-1, x.shape[-1]).float()
        d = torch.cdist(flat, self.K)
        d = torch.where(d < self.r[None], d, torch.full_like(d, float("inf")))
        best, idx = d.min(1)
        hit = torch.isfinite(best)
        if not hit.any(): return out
        add = torch.zeros_like(flat[:, :out.shape[-1]]); add[hit] = self.D[idx[hit]]
        return out + add.view(*out.shape[:-1], -1).to(out.dtype)
mem = Memory()
handle = site.register_forward_hook(mem.hook)

@torch.no_grad()
def keys_of(ids):
    got = {}
    h = site.register_forward_hook(lambda m, i, o: got.__setitem__("k", i[0].detach()))
    try: model(input_ids=ids, use_cache=False)
    finally: h.remove()
    return got["k"]
# reference bank: keys of 4,096 tokens of text the model samples itself (no evaluation data)
handle.remove()
samp = CorpusSampler(model, tok, 32, 64, 0)
bank = torch.cat([keys_of(samp.batch(b)).reshape(-1, site.in_features) for b in range(2)]).float()
if a.fact_bank:  # every token of the sampled fact sentences (the audit's probe subjects left out)
    from kledger.audit.probes import probe_subjects  # noqa: E402
    from kledger.editors.factsample import sample_fact_windows  # noqa: E402
    wins = sample_fact_windows(model, tok, 32, 16, 0, exclude=probe_subjects())
    bank = torch.cat([bank] + [keys_of(torch.tensor([w]))[0].float() for w in wins])
templates = context_templates(model, tok, a.prefixes, 10, 0)
handle = site.register_forward_hook(mem.hook)
print("bank", bank.shape, "templates", templates, flush=True)

def fit(r):
    texts = [t.format(r.prompt) for t in templates]
    enc, spans = encode_pairs(tok, texts, [r.target_new] * len(texts), "cpu")
    pos = [subject_last_index(tok, t, r.subject, t.index(r.prompt)) for t in texts]
    k = keys_of(enc["input_ids"][:1])[0, pos[0]].float()
    delta = torch.zeros(site.out_features, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=a.lr)
    def add(mod, inputs, out):
        out = out.clone()
        for b, p in enumerate(pos): out[b, p] += delta
        return out
    h = site.register_forward_hook(add)
    try:
        for step in range(a.steps):
            logits = model(**enc, use_cache=False).logits.float()
            nll = []
            for b, (s, e) in enumerate(spans):
                lp = torch.log_softmax(logits[b, s - 1:e - 1], -1)
                nll.append(-lp.gather(1, enc["input_ids"][b, s:e, None])[:, 0])
            nll = torch.stack([x.mean() for x in nll])
            if float(nll.detach().max()) < 0.1: break
            opt.zero_grad(); nll.mean().backward(); opt.step()
    finally: h.remove()
    return k, delta.detach(), step

def insert(k, d):
    dist = torch.cat([torch.cdist(k[None], bank)[0], torch.cdist(k[None], mem.K)[0] if len(mem.r) else torch.zeros(0)])
    r = a.gamma * float(dist.min())
    if len(mem.r):  # an older entry's radius never reaches the new key
        mem.r = torch.minimum(mem.r, a.gamma * torch.cdist(k[None], mem.K)[0])
    mem.K = torch.cat([mem.K, k[None]]); mem.r = torch.cat([mem.r, torch.tensor([r])]); mem.D = torch.cat([mem.D, d[None]])

ws = L._workspace(L.RUNS / a.probes_from, "smollm2-135m", 1)
handle.remove(); base_facts = list(probe_set(ws.ledger, model, tok)[0].facts); handle = site.register_forward_hook(mem.hook)
items = L.stream(a.start + a.n)[a.start:]
base_loc_all = json.loads((L.RUNS / a.probes_from / "base_locality.json").read_text())
skip = sum(len(r.locality_prompts) for _, r in L.stream(a.start))
base_loc = base_loc_all[skip:]
out = open(a.out or L.RUNS / f"gated-L{a.layer}-g{a.gamma:g}.jsonl", "w"); t_edit = 0.0
for i, (kind, r) in enumerate(items, 1):
    t0 = time.perf_counter()
    handle.remove()  # fit on the model without the memory: δ is what this subject needs on its own
    k, d, steps = fit(r)
    handle = site.register_forward_hook(mem.hook)
    insert(k, d); t_edit += time.perf_counter() - t0
    if i % a.every == 0 or i == len(items):
        t0 = time.perf_counter()
        held = answers_hold(model, tok, base_facts)
        row = {"edits": i, "start": a.start, "load": round(os.getloadavg()[0], 2), "layer": a.layer, "gamma": a.gamma, "prefixes": a.prefixes,
               "retention_drop": round(1 - sum(h[0] for h in held) / len(base_facts), 4),
               **L.edit_scores(model, tok, items[:i], base_loc), "edit_s": round(t_edit / i, 3),
               "radius_median": round(float(mem.r.median()), 3), "delta_norm_median": round(float(mem.D.norm(dim=1).median()), 3),
               "score_s": round(time.perf_counter() - t0, 1)}
        handle.remove()
        caught, tot = 0, 0
        for j, (_, rr) in enumerate(items[:i]):
            for q in rr.rephrase_prompts:
                if rr.subject not in q: continue
                ids = tok(q, return_tensors="pt")["input_ids"]
                kq = keys_of(ids)[0, subject_last_index(tok, q, rr.subject)].float()
                dd = torch.cdist(kq[None], mem.K)[0]
                caught += int(dd[j] < mem.r[j] and int(dd.argmin()) == j); tot += 1
        handle = site.register_forward_hook(mem.hook)
        row["para_gate"] = round(caught / max(tot, 1), 3); row["para_named"] = tot
        print(json.dumps(row), flush=True); out.write(json.dumps(row) + "\n"); out.flush()
