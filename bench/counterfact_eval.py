"""CounterFact / zsRE scoring of a (materialised) model, shared by the bench scripts.

CounterFact (measured on the model after the whole edit sequence):
  efficacy    share of edit prompts with logP(target_new) > logP(target_true)
  paraphrase  the same on the rephrase prompts
  locality    share of locality prompts whose greedy first token is unchanged vs the unedited model
  locality_p  share of locality prompts still preferring locality_ground_truth … as the unedited model did
  fluency     weighted 2-/3-gram entropy of short greedy generations on the edit prompts (ROME's measure)
zsRE: teacher-forced token accuracy of target (edit), rephrase, and locality agreement with the base.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Sequence

import torch

from kledger.editors.scoring import score_targets, target_token_accuracy
from kledger.ledger.records import FactRequest


@torch.no_grad()
def first_tokens(model, tok, prompts: Sequence[str], batch: int = 16) -> list[int]:
    dev = next(model.parameters()).device
    out = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        enc = [tok(p, add_special_tokens=False)["input_ids"] for p in chunk]
        w = max(len(e) for e in enc)
        ids = torch.full((len(enc), w), tok.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, e in enumerate(enc):
            ids[j, : len(e)] = torch.tensor(e)
            mask[j, : len(e)] = 1
        logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits
        last = mask.sum(1) - 1
        out.extend(logits[torch.arange(len(enc)), last.to(dev)].argmax(-1).tolist())
    return out


def _ngram_entropy(tokens: list[str], n: int) -> float:
    grams = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    total = sum(grams.values())
    return -sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0


@torch.no_grad()
def fluency(model, tok, prompts: Sequence[str], max_new_tokens: int = 24) -> float:
    dev = next(model.parameters()).device
    vals = []
    for p in prompts:
        enc = tok(p, return_tensors="pt", add_special_tokens=False).to(dev)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id or tok.eos_token_id)
        words = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).split()
        vals.append(2 / 3 * _ngram_entropy(words, 2) + 4 / 3 * _ngram_entropy(words, 3))
    return sum(vals) / max(len(vals), 1) / 2  # ROME: weighted average of the two entropies


def counterfact_scores(model, tok, requests: Sequence[FactRequest], base_locality_tokens: list[int] | None = None,
                       fluency_prompts: int = 10) -> dict:
    reqs = [r for r in requests if r.target_true]
    new = score_targets(model, tok, [r.prompt for r in reqs], [r.target_new for r in reqs])
    true = score_targets(model, tok, [r.prompt for r in reqs], [r.target_true for r in reqs])
    out = {"n": len(reqs), "efficacy": float((new > true).float().mean())}
    para = [(r, p) for r in reqs for p in r.rephrase_prompts]
    if para:
        pn = score_targets(model, tok, [p for _, p in para], [r.target_new for r, _ in para])
        pt = score_targets(model, tok, [p for _, p in para], [r.target_true for r, _ in para])
        out["paraphrase"] = float((pn > pt).float().mean())
    loc = [p for r in reqs for p in r.locality_prompts]
    if loc and base_locality_tokens is not None:
        now = first_tokens(model, tok, loc)
        out["locality"] = sum(a == b for a, b in zip(now, base_locality_tokens)) / len(loc)
    if fluency_prompts:
        out["fluency"] = fluency(model, tok, [r.prompt for r in reqs[:fluency_prompts]])
    return out


def zsre_scores(model, tok, requests: Sequence[FactRequest], base_locality_tokens: list[int] | None = None) -> dict:
    acc = target_token_accuracy(model, tok, [r.prompt for r in requests], [r.target_new for r in requests])
    out = {"n": len(requests), "efficacy": sum(acc) / len(acc)}
    para = [(r, p) for r in requests for p in r.rephrase_prompts]
    if para:
        pa = target_token_accuracy(model, tok, [p for _, p in para], [r.target_new for r, _ in para])
        out["paraphrase"] = sum(pa) / len(pa)
    loc = [p for r in requests for p in r.locality_prompts]
    if loc and base_locality_tokens is not None:
        now = first_tokens(model, tok, loc)
        out["locality"] = sum(a == b for a, b in zip(now, base_locality_tokens)) / len(loc)
    return out
