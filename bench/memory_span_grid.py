"""Key-gate diagnostic behind lifelong.md's span table: over the stream's first N subjects, keys at LAYER's MLP input,
radii GAMMA x the distance to 4,096 sampled-text keys; for spans 1-4 and several radii at the earlier tokens, the share
of paraphrases naming the subject inside their own entry and the audit prompts some entry opens on (no timings).

    python bench/memory_span_grid.py 3 1000 0.8
"""
import sys, json, time, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
import lifelong as L
from kledger.editors.models import load_model
from kledger.editors.sites import sites_for, get_module
from kledger.editors.locate import subject_token_span
from kledger.editors.stats import CorpusSampler
from kledger.audit.probes import knowledge_prompts
torch.set_num_threads(1)
model, tok, _ = load_model("smollm2-135m", "cpu")
layer = int(sys.argv[1]); n = int(sys.argv[2]); gamma = float(sys.argv[3]); S = 4
path = sites_for(model).mlp_out.format(layer)
@torch.no_grad()
def keys(text):
    ids = tok(text, return_tensors="pt")["input_ids"]; got = {}
    h = get_module(model, path).register_forward_hook(lambda m, i, o: got.__setitem__("k", i[0][0].float()))
    try: model(input_ids=ids, use_cache=False)
    finally: h.remove()
    return got["k"]
samp = CorpusSampler(model, tok, 32, 64, 0)
bank = []
for b in range(2):
    got = {}
    h = get_module(model, path).register_forward_hook(lambda m, i, o: got.__setitem__("k", i[0].float()))
    with torch.no_grad(): model(input_ids=samp.batch(b), use_cache=False)
    h.remove(); bank.append(got["k"].reshape(-1, got["k"].shape[-1]))
bank = torch.cat(bank)
items = L.stream(n)
E = []  # per entry: (S, d) keys, m
def span_keys(text, subject):
    k = keys(text); s, e = subject_token_span(tok, text, subject)
    m = min(S, e - s); return torch.stack([k[e - 1 - j] for j in range(m)]), m
for _, r in items:
    E.append(span_keys(r.prompt, r.subject))

d = E[0][0].shape[1]
K = torch.zeros(n, S, d); M0 = torch.tensor([m for _, m in E])
for i, (k, m) in enumerate(E): K[i, :m] = k
R0 = torch.zeros(n, S)
for j in range(S):
    has = M0 > j
    db = torch.cdist(K[has, j], bank).min(1).values
    if j == 0:
        dk = torch.cdist(K[has, j], K[has, j]); dk.fill_diagonal_(float("inf")); db = torch.minimum(db, dk.min(1).values)
    R0[has, j] = db
paras = []
for i, (_, r) in enumerate(items):
    for q in r.rephrase_prompts:
        if r.subject in q:
            paras.append((i, keys(q), subject_token_span(tok, q, r.subject)[1] - 1))
auds = [keys(q) for q in knowledge_prompts()]
for Sx in (1, 2, 3, 4):
  for gf in (0.8, 1.2, 2.0, 4.0):
    if Sx == 1 and gf != 0.8: continue
    M = M0.clamp(max=Sx); R = R0.clone(); R[:, 0] *= gamma; R[:, 1:] *= gf
    def fires(k):
        T = k.shape[0]; ok = torch.ones(T, n, dtype=torch.bool)
        for j in range(Sx):
            dj = torch.full((T, n), float("inf"))
            if T > j: dj[j:] = torch.cdist(k[: T - j], K[:, j])
            ok &= (dj < R[:, j][None]) | ~(M > j)[None]
        return ok
    caught = sum(int(fires(k)[e, i]) for i, k, e in paras)
    f = sum(int(fires(k).any()) for k in auds)
    print(json.dumps({"S": Sx, "gamma_prev": gf, "para_gate": round(caught / len(paras), 3), "audit_prompts_fired": f}), flush=True)
