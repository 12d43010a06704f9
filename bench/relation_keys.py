"""Could a memory entry be gated on the relation as well as the subject (lifelong.md)? For each record, the
hidden state at the prompt's last token (every layer) against its paraphrase's and against 10 other relations'
prompts about the same subject (other records' templates filled with this subject): cosine similarities
(states centred on the other prompts' mean), the
AUC of paraphrase vs other relation, and the share of paraphrases above the threshold that opens on 5 % of the
other-relation prompts. No fits, no timings.

    python bench/relation_keys.py 200 100      # the first 200 CounterFact records, zsRE records 600-699
"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lifelong as L  # noqa: E402
from kledger.editors.models import load_model  # noqa: E402
from kledger.editors.tokens import pad, pad_id  # noqa: E402

torch.set_num_threads(2)
model, tok, _ = load_model("smollm2-135m", device="cpu")


@torch.no_grad()
def last_states(texts):
    """texts → layers × N × d hidden states at each text's last token."""
    out = []
    for i in range(0, len(texts), 64):
        rows = [tok(t, add_special_tokens=False)["input_ids"] for t in texts[i:i + 64]]
        ids, mask = pad(rows, pad_id(tok), "cpu")
        hs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False).hidden_states
        last = mask.sum(1) - 1
        out.append(torch.stack([h[torch.arange(len(rows)), last].float() for h in hs]))
    return torch.cat(out, 1)


def measure(records):
    temps = [r.prompt.replace(r.subject, "{}") for r in records]
    ok = [i for i, t in enumerate(temps) if t.count("{}") == 1 and records[i].rephrase_prompts]
    prompts, paras, others, owner = [], [], [], []
    for i in ok:
        r = records[i]
        prompts.append(r.prompt)
        paras.append(r.rephrase_prompts[0])
        picked = [temps[j] for j in ok if temps[j] != temps[i] and j != i][(i * 7) % 50:][:10]
        for t in picked:
            others.append(t.replace("{}", r.subject))
            owner.append(len(prompts) - 1)
    P, Q, O = last_states(prompts), last_states(paras), last_states(others)
    mean = O.mean(1, keepdim=True)  # centred on the other-relation prompts' mean: the last token is often "?"
    P, Q, O = (torch.nn.functional.normalize(x - mean, dim=-1) for x in (P, Q, O))
    own = torch.tensor(owner)
    rows = []
    for layer in range(P.shape[0]):
        sp = (P[layer] * Q[layer]).sum(-1)
        so = (P[layer][own] * O[layer]).sum(-1)
        auc = float((sp[:, None] > so[None, :]).float().mean())
        thr = float(torch.quantile(so, 0.95))
        rows.append({"layer": layer, "auc": round(auc, 3), "para_cos": round(float(sp.mean()), 3),
                     "other_cos": round(float(so.mean()), 3), "thr95": round(thr, 3),
                     "para_open_at_thr95": round(float((sp > thr).float().mean()), 3)})
    return len(prompts), rows


n_cf, n_zs = int(sys.argv[1]), int(sys.argv[2])
items = L.stream(1000)
for name, recs in (("counterfact", [r for d, r in items[:n_cf]]), ("zsre", [r for d, r in items[600:600 + n_zs]])):
    n, rows = measure(recs)
    for row in rows:
        print(json.dumps({"data": name, "records": n, **row}), flush=True)
