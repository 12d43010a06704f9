"""Scoring prompts and targets: log-probabilities of continuations and greedy answers.

Shared by editors (stopping rules, edit-time metrics) and by the metrics/audit code.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from kledger.editors.hooks import input_device
from kledger.editors.tokens import encode_pairs, pad_id


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
    dev = input_device(model)
    out = []
    for i in range(0, len(prompts), batch_size):
        enc, spans = encode_pairs(tok, prompts[i : i + batch_size], targets[i : i + batch_size], dev)
        logits = model(**enc).logits
        out.append(target_logprobs(logits, enc["input_ids"], spans).cpu())
    return torch.cat(out) if out else torch.zeros(0)


@torch.no_grad()
def target_token_accuracy(model: nn.Module, tok, prompts: Sequence[str], targets: Sequence[str]) -> list[float]:
    """Teacher-forced token accuracy of each target (the zsRE metric)."""
    dev = input_device(model)
    enc, spans = encode_pairs(tok, prompts, targets, dev)
    pred = model(**enc).logits.argmax(-1)
    out = []
    for i, (s, e) in enumerate(spans):
        out.append(float((pred[i, s - 1 : e - 1] == enc["input_ids"][i, s:e]).float().mean()))
    return out


@torch.no_grad()
def greedy(model: nn.Module, tok, prompt: str, max_new_tokens: int = 5) -> str:
    """Greedy continuation (without special tokens)."""
    dev = input_device(model)
    enc = tok(prompt, return_tensors="pt", add_special_tokens=False).to(dev)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=pad_id(tok))
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
