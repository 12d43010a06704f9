"""Tokenisation and padding: the one place that turns text into padded id batches.

Every batch in kledger is built here, with one pad-id rule (``pad_id``): the tokenizer's pad
token, else its end-of-sequence token, else 0. Padded positions are masked out (attention mask
0) and never scored, so the id only has to be a valid token.

* ``ids``         a text's token ids, without special tokens;
* ``pair_ids``    prompt + answer ids and the answer's span, tokenising the answer on its own
                  when tokenisation merges across the boundary;
* ``pad``         a list of id rows as a right- (or left-) padded batch and its attention mask;
* ``encode_pairs`` prompts + targets as one right-padded batch with each target's span.
"""

from __future__ import annotations

from typing import Sequence

import torch


def pad_id(tok) -> int:
    """The id written into padded positions: pad token, else end-of-sequence, else 0."""
    for v in (getattr(tok, "pad_token_id", None), getattr(tok, "eos_token_id", None)):
        if v is not None:
            return int(v)
    return 0


def ids(tok, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens."""
    return list(tok(text, add_special_tokens=False)["input_ids"])


def pair_ids(tok, prompt: str, answer: str) -> tuple[list[int], int, int]:
    """(prompt + answer ids, answer start, answer end). The answer's ids are read off the joint
    tokenisation; if that merges tokens across the boundary, the answer is tokenised alone."""
    p = ids(tok, prompt)
    full = ids(tok, prompt + answer)
    if full[: len(p)] == p and len(full) > len(p):
        a = full[len(p):]
    else:
        a = ids(tok, answer)
    return p + a, len(p), len(p) + len(a)


def pad(rows: Sequence[Sequence[int]], pad_value: int, device=None, *, left: bool = False
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` (long, rows × longest) of id rows padded with ``pad_value``
    on the right (or the ``left``)."""
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), pad_value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if not len(r):
            continue
        span = slice(width - len(r), width) if left else slice(0, len(r))
        out[i, span] = torch.as_tensor(list(r), dtype=torch.long)
        mask[i, span] = 1
    if device is not None:
        out, mask = out.to(device), mask.to(device)
    return out, mask


def encode_pairs(tok, prompts: Sequence[str], targets: Sequence[str], device) -> tuple[dict, list[tuple[int, int]]]:
    """Right-padded batch of prompt+target; spans[i] = (start, end) of target i's tokens."""
    rows, spans = [], []
    for p, t in zip(prompts, targets):
        row, s, e = pair_ids(tok, p, t)
        rows.append(row)
        spans.append((s, e))
    input_ids, mask = pad(rows, pad_id(tok), device)
    return {"input_ids": input_ids, "attention_mask": mask}, spans
