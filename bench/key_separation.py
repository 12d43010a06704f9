"""Could a key-gated edit memory work on smollm2-135m? Distances between keys (down_proj input) at the subject's
last token of the stream's first 200 CounterFact prompts and of their paraphrases, against every token of the
locality and audit probe prompts and the other prompts' subject keys. One JSON line per layer:

* separable: share of edits whose paraphrase key is nearer the prompt key than any other key measured;
* ratio_median: median of d(prompt, paraphrase) / d(prompt, nearest other key);
* para_nearest_is_own: share of paraphrase keys whose nearest prompt key is their own edit's.

    python bench/key_separation.py
"""
import contextlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kledger.editors.models import load_model  # noqa: E402
from kledger.editors.sites import sites_for  # noqa: E402
from kledger.editors.hooks import Trace  # noqa: E402
from kledger.editors.locate import subject_last_index  # noqa: E402
from kledger.ledger.records import load_requests  # noqa: E402
from kledger.audit.probes import _TEMPLATES  # noqa: E402
from lifelong import DATA  # noqa: E402
torch.set_num_threads(1)
LAYERS = [3, 4, 5, 6, 10, 15]
model, tok, _ = load_model("smollm2-135m", "cpu")
sites = sites_for(model)

@torch.no_grad()
def keys(text, pos=None):
    """per layer: key at pos (None: every token) of text."""
    ids = tok(text, return_tensors="pt")
    with contextlib.ExitStack() as st:
        tr = {l: st.enter_context(Trace(model, sites.mlp_out.format(l), retain_input=True, retain_output=False)) for l in LAYERS}
        model(**ids, use_cache=False)
        return {l: (tr[l].input[0] if pos is None else tr[l].input[0, pos:pos + 1]).float() for l in LAYERS}

def at_subject(text, subject):
    return keys(text, subject_last_index(tok, text, subject))

reqs = load_requests(str(DATA / "counterfact-600.json"))[:200]
P, Q, ok = [], [], []
for r in reqs:
    para = [q for q in r.rephrase_prompts if r.subject in q]
    if not para:
        continue
    P.append(at_subject(r.prompt, r.subject)); Q.append(at_subject(para[0], r.subject)); ok.append(r)
others = []  # keys an edit must not fire on: every token of locality prompts and probe prompts
for r in ok:
    for q in r.locality_prompts:
        others.append(keys(q))
for t, subs in _TEMPLATES:
    for s in subs:
        others.append(keys(t.format(s)))
print(len(ok), "edits with a paraphrase naming the subject;", sum(o[3].shape[0] for o in others), "other tokens")
res = {}
for l in LAYERS:
    Pk = torch.cat([p[l] for p in P]); Qk = torch.cat([q[l] for q in Q]); Ok = torch.cat([o[l] for o in others])
    d_para = (Pk - Qk).norm(dim=1)
    d_tok = torch.cdist(Pk, Ok).min(dim=1).values  # nearest token of other texts
    D = torch.cdist(Pk, Pk); D.fill_diagonal_(float("inf"))
    d_subj = D.min(dim=1).values  # nearest other edit's subject key
    # a paraphrase is caught by radius r = d_para; nothing else may be inside it
    d_oth = torch.minimum(d_tok, d_subj)
    # the paraphrase's key is also compared with other edits' prompt keys: would it fire the wrong edit?
    Dq = torch.cdist(Qk, Pk); own = Dq.diagonal().clone(); Dq.fill_diagonal_(float("inf"))
    wrong = (Dq.min(dim=1).values < own).float().mean()
    res[l] = dict(separable=float((d_para < d_oth).float().mean()), ratio_median=float((d_para / d_oth).median()),
                  para_nearest_is_own=1 - float(wrong), norm=float(Pk.norm(dim=1).median()),
                  d_para=float(d_para.median()), d_other=float(d_oth.median()),
                  cos_para=float(torch.nn.functional.cosine_similarity(Pk, Qk).median()))
    print(l, json.dumps({k: round(v, 3) for k, v in res[l].items()}), flush=True)
