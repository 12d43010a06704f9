"""The collateral measurement in lifelong.md: the stream records whose subject is an audit subject, fitted from the
base with the memory in each variant; efficacy, paraphrase, and KL / top-1 kept on the audit prompts naming them.

    python bench/memory_essence.py 0,1,4                                   # essence_weight 0, 1, 4
    python bench/memory_essence.py layer=3 layer=9 "layer=9 nll_stop=0.5"  # variants: MemoryConfig fields
    python bench/memory_essence.py 'essence_weight=4 essence_prompts=["{} is known for", "{} has"]'
"""
import sys, json, re, time, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
import lifelong as L
from kledger.editors.models import load_model
from kledger.editors.memory import MemoryEditor, MemoryConfig
from kledger.editors.base import EditContext
from kledger.editors.gate import remove_memory
from kledger.ledger.compose import apply_deltas
from kledger.audit.probes import probe_subjects, knowledge_prompts
from kledger.editors.scoring import score_targets
torch.set_num_threads(1)
model, tok, _ = load_model("smollm2-135m", "cpu")
subs = set(probe_subjects())
items = [(k, r) for k, r in L.stream(600) if r.subject in subs]
print(len(items), [r.subject for _, r in items])
prompts = knowledge_prompts()
@torch.no_grad()
def dist(ps):
    out = []
    for p in ps:
        ids = tok(p, return_tensors="pt")["input_ids"]
        out.append(torch.log_softmax(model(ids).logits[0, -1].float(), -1))
    return torch.stack(out)
reqs = [r for _, r in items]
aff = [[p for p in prompts if r.subject in p] for r in reqs]
base = [dist(a) for a in aff]
def variants(argv):
    if len(argv) == 1 and "=" not in argv[0]:
        return [{"essence_weight": float(x)} for x in argv[0].split(",")]
    pairs = lambda a: re.findall(r'(\w+)=(\[.*?\]|\S+)', a)  # noqa: E731  (a JSON list may hold spaces)
    return [{k: tuple(v) if isinstance(v, list) else v for k, v in ((k, json.loads(v)) for k, v in pairs(a))}
            for a in argv]
for w in variants(sys.argv[1:]):
    t0 = time.time()
    res = MemoryEditor(MemoryConfig(**w)).compute(model, tok, reqs, EditContext(fingerprint="x"))
    apply_deltas(model, [r.delta for r in res])
    new = score_targets(model, tok, [r.prompt for r in reqs], [r.target_new for r in reqs])
    true = score_targets(model, tok, [r.prompt for r in reqs], [r.target_true for r in reqs])
    pp = [(r, q) for r in reqs for q in r.rephrase_prompts]
    pn = score_targets(model, tok, [q for _, q in pp], [r.target_new for r, _ in pp]); pt = score_targets(model, tok, [q for _, q in pp], [r.target_true for r, _ in pp])
    kls, top = [], []
    for b, a in zip(base, aff):
        if not a: continue
        d = dist(a); kls += (b.exp() * (b - d)).sum(-1).tolist(); top += (b.argmax(-1) == d.argmax(-1)).float().tolist()
    print(json.dumps({"w": w, "eff": float((new > true).float().mean()), "para": float((pn > pt).float().mean()),
        "kl_subject_prompts": round(sum(kls) / len(kls), 3), "top1_kept": round(sum(top) / len(top), 3), "n_prompts": len(kls),
        "steps": [r.metrics["steps"] for r in res], "s": round(time.time() - t0, 1)}), flush=True)
    remove_memory(model)
    # restore pristine weights: memory removed; nothing else changed
