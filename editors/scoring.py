"""Scoring prompts and targets: log-probabilities of continuations and greedy answers.

Shared by editors (stopping rules, edit-time metrics) and by the metrics/audit code.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn


def encode_pairs(tok, prompts: Sequence[str], targets: Sequence[str], device) -> tuple[dict, list[tuple[int, int]]]:
    """Right-padded batch of prompt+target; spans[i] = (start, end) of target i's tokens."""
    ids, spans = [], []
    for p, t in zip(prompts, targets):
        p_ids = tok(p, add_special_tokens=False)["input_ids"]
        t_ids = tok(p + t, add_special_tokens=False)["input_ids"][len(p_ids):]
        if not t_ids or tok(p + t, add_special_tokens=False)["input_ids"][: len(p_ids)] != p_ids:
            # tokenisation merged across the boundary: tokenise the target on its own
            t_ids = tok(t, add_special_tokens=False)["input_ids"]
        ids.append(p_ids + t_ids)
        spans.append((len(p_ids), len(p_ids) + len(t_ids)))
    width = max(len(x) for x in ids)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}, spans


def target_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, spans: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Sum of log P(target tokens) per row, from logits of the padded batch (keeps the graph)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    out = []
    for i, (s, e) in enumerate(spans):
        pos = torch.arange(s - 1, e - 1, device=logits.device)
        out.append(logp[i, pos, input_ids[i, s:e]].sum())
    return torch.stack(out)


@torch.no_grad()
def score_targets(model: nn.Module, tok, prompts: Sequence[str], targets: Sequence[str], batch_size: int = 16) -> torch.Tensor:
    """Sum log-probabilities of each target after its prompt (CPU float tensor)."""
    dev = next(model.parameters()).device
    out = []
    for i in range(0, len(prompts), batch_size):
        enc, spans = encode_pairs(tok, prompts[i : i + batch_size], targets[i : i + batch_size], dev)
        logits = model(**enc).logits
        out.append(target_logprobs(logits, enc["input_ids"], spans).cpu())
    return torch.cat(out) if out else torch.zeros(0)


@torch.no_grad()
def target_token_accuracy(model: nn.Module, tok, prompts: Sequence[str], targets: Sequence[str]) -> list[float]:
    """Teacher-forced token accuracy of each target (the zsRE metric)."""
    dev = next(model.parameters()).device
    enc, spans = encode_pairs(tok, prompts, targets, dev)
    pred = model(**enc).logits.argmax(-1)
    out = []
    for i, (s, e) in enumerate(spans):
        out.append(float((pred[i, s - 1 : e - 1] == enc["input_ids"][i, s:e]).float().mean()))
    return out


@torch.no_grad()
def greedy(model: nn.Module, tok, prompt: str, max_new_tokens: int = 5) -> str:
    """Greedy continuation (without special tokens)."""
    dev = next(model.parameters()).device
    enc = tok(prompt, return_tensors="pt", add_special_tokens=False).to(dev)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
