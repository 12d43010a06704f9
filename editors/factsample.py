"""Fact-shaped sentences sampled from the model itself: a known-facts corpus kledger builds offline.

UltraEdit's ``facts_weight`` adds ``λ_f·C_facts`` to its preservation term: the covariance of the
keys inside sentences that state facts, the keys through which a sequence of edits damages what the
model knows (``editors/entitystats.py``). A user may name a file of such facts (``preserve_facts``);
without one, this module writes the corpus from the model: each of ``FACT_OPENERS`` (a relation
that asks for an entity, or an entity's kind that asks for its name) is continued by top-k sampling,
``per_opener`` times, for ``new_tokens`` tokens, cut at the first line break. The model names the
entities and states what it believes about them, so the statistics describe the model's own
knowledge, not any evaluation set; ``exclude`` drops the sentences that name given strings (the
lifelong benchmark drops those naming a subject of the audit's probe prompts).

Deterministic: the openers of ``n`` tokens are sampled together (no padding), ``ROWS_PER_CALL``
sequences a call, each call with a ``torch.Generator`` seeded from ``(seed, n, call)``; the
description (openers, counts, seed, top-k, exclude) is hashed into the covariance cache key, so a
changed recipe never reads a stale cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any, Sequence

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from kledger.editors.hooks import input_device
from kledger.editors.stats import SAMPLE_TOP_K, banned_ids, sample_continuations
from kledger.ledger.errors import UsageError

log = logging.getLogger(__name__)
#: sequences per sampling call (openers of one length): in bfloat16 on a CPU one call of 128 sequences
#: peaked at 7.8 GB on SmolLM2-135M (2.5 GB at 32; 1.2 GB in float32 at 128)
ROWS_PER_CALL = 64

#: Openers of the sampled fact sentences: relations that ask for an entity and its attribute, and
#: kinds of entity that make the model name one and say something about it (places, people,
#: organisations, works, products: the kinds of subject a knowledge edit names). None of them opens a
#: prompt of the audit's probe set (``audit/probes.py``: capitals, official languages, currencies, …),
#: so the statistics never hold the probes' own sentence frames.
FACT_OPENERS = (
    "The mother tongue of", "The home country of", "The original language of", "The manufacturer of",
    "The director of", "The religion of", "The genre of", "The record label of", "The developer of", "The owner of",
    "The position of", "The twin city of",
    "The French actor", "The American singer", "The German composer", "The Italian painter", "The Japanese company",
    "The football club", "The television series", "The album", "The novel", "The river", "The mountain",
    "The university", "The airport", "The car model", "The video game", "The politician", "The band",
    "The newspaper", "The island of", "The Spanish footballer", "The Canadian director", "The Russian poet",
    "The Indian film", "The software company",
)


def fact_sample_descriptor(per_opener: int, new_tokens: int, seed: int, exclude: Sequence[str] = ()) -> dict[str, Any]:
    """JSON-able identity of the sampled facts (its hash tags the covariance cache)."""
    desc = {"kind": "sampled-facts", "openers": list(FACT_OPENERS), "per_opener": per_opener,
            "new_tokens": new_tokens, "seed": seed, "top_k": SAMPLE_TOP_K,
            "batches": f"by opener length, {ROWS_PER_CALL} rows", "exclude": sorted(set(exclude))}
    desc["sha256"] = hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()
    return desc


@torch.no_grad()
def sample_fact_windows(model: nn.Module, tok, per_opener: int, new_tokens: int, seed: int,
                        exclude: Sequence[str] = (), progress: bool = False) -> list[list[int]]:
    """Token windows of the sampled fact sentences: opener + continuation up to its first line break,
    without the sentences whose text contains one of ``exclude`` (e.g. the subjects an audit probes)."""
    if per_opener < 1 or new_tokens < 1:
        raise ValueError(f"per_opener and new_tokens must be ≥ 1, found {per_opener}, {new_tokens}")
    dev, ban = input_device(model), banned_ids(tok)
    newline = {i for i in range(len(tok)) if "\n" in tok.decode([i])}
    opener_ids = [tok(o, add_special_tokens=False)["input_ids"] for o in FACT_OPENERS]
    out: dict[int, list[int]] = {}
    calls = []  # (opener length, chunk index, the openers of its rows): no padding inside a call
    for n in sorted({len(x) for x in opener_ids}):
        owners = [j for j, x in enumerate(opener_ids) if len(x) == n for _ in range(per_opener)]
        calls += [(n, c // ROWS_PER_CALL, owners[c:c + ROWS_PER_CALL]) for c in range(0, len(owners), ROWS_PER_CALL)]
    for n, c, owners in tqdm(calls, desc="known-fact sentences (sampling)", disable=not progress):
        start = torch.tensor([opener_ids[j] for j in owners], device=dev)
        gen = torch.Generator().manual_seed((seed * 1_000_003 + 7919 * n + 104_729 * c) % (2**63 - 1))
        rows = sample_continuations(model, start, new_tokens, gen, SAMPLE_TOP_K, ban).tolist()
        for row, j in zip(rows, owners):
            out.setdefault(j, []).append(_cut(row, n, newline))
    windows = [w for j in range(len(FACT_OPENERS)) for w in out[j]]
    if exclude:
        windows = [w for w in windows if not any(x in tok.decode(w) for x in exclude)]
    if not windows:
        raise UsageError(f"facts_exclude left out all {per_opener * len(FACT_OPENERS)} sampled fact sentences: "
                         "expected a few names to leave out, found strings that every sentence contains")
    log.info("sampled %d fact sentences (%d left out by exclude)", len(windows),
             per_opener * len(FACT_OPENERS) - len(windows))
    return windows


def _cut(row: Sequence[int], n_open: int, stops: set[int]) -> list[int]:
    """``row`` up to (not including) its first stop token after the opener."""
    for p in range(n_open, len(row)):
        if row[p] in stops:
            return list(row[:p])
    return list(row)
