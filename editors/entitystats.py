"""Entity-key statistics: ``C_ent = E[k kᵀ]`` over the tokens of capitalised words (names) only.

The key-statistics corpus (``editors.stats``: sampled from the model, or the user's file) is mostly
function words and common nouns; names are a small share of it, so ``C0`` barely constrains an
update at the keys of *entities*. Those are the keys a lifelong UltraEdit sequence damages: on
smollm2-135m, with the update of a 1,000-edit sequence applied only at the known-fact prompts'
tokens before the last one, 39 of the 52 lost facts stay lost; applied only at the answer's
positions, 10; only at the prompt's last token, 6 (bench/results/lifelong.md, "Where the damage
is"). ``C_ent`` weighs exactly those keys; UltraEdit adds ``λ_e·C_ent`` to its preservation term.

A token counts when it belongs to a word that starts with an upper-case letter and is not the
first word of a sentence (the corpus's ``The``/``In`` openings are not names): a word starts at a
token whose text begins with whitespace or follows punctuation, and continues over the
following tokens that begin with a letter or digit (so the last piece of `` Darrieux`` counts).

The same corpus windows as ``C0`` (the sampled corpus's cached ids, or the file's windows), one
stopped forward pass; cached per layer under ``keystats/`` with the corpus hash prefixed ``entity:``.

``fact_covariances``: ``C_facts = E[k kᵀ]`` over every token of a file of known facts (prompt and
answer, e.g. ``known_1000.json``): the keys of the kind of sentence whose answers an audit checks.
Cached the same way, keyed by the file's hash. ``sampled_fact_covariances``: the same over fact
sentences the model writes itself (``editors/factsample.py``), for a user without such a file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from kledger.editors import stats as S
from kledger.editors.base import EditContext
from kledger.editors.factsample import FACT_OPENERS, fact_sample_descriptor, sample_fact_windows
from kledger.editors.hooks import KeyAccumulator, StopForward, input_device
from kledger.editors.sites import sites_for
from kledger.editors.tokens import pad, pad_id
from kledger.ledger.canonical import file_sha256
from kledger.ledger.errors import UsageError

log = logging.getLogger(__name__)
_SENTENCE_END = (".", "!", "?", "\n", ":", '"')


def entity_mask(pieces: Sequence[str]) -> list[bool]:
    """Per token text: is it part of a capitalised word that does not open a sentence?"""
    out: list[bool] = []
    in_name, prev_char = False, "."  # the window's first word opens a sentence
    for p in pieces:
        body = p.lstrip()
        if not body:  # whitespace only
            in_name = False
            prev_char = "\n" if "\n" in p else (prev_char if prev_char in _SENTENCE_END else " ")
            out.append(False)
            continue
        new_word = p[:1].isspace() or not prev_char.isalnum()
        if not body[:1].isalnum():  # punctuation ends a word
            in_name = False
        elif new_word:
            opens_sentence = prev_char in _SENTENCE_END or (p[:1].isspace() and "\n" in p)
            in_name = body[:1].isupper() and not opens_sentence and body.rstrip() != "I"
        out.append(in_name and body[:1].isalnum())
        prev_char = body.rstrip()[-1:] or prev_char
        if not prev_char.isalnum():
            in_name = False
    return out


@torch.no_grad()
def entity_covariances(model: nn.Module, tok, layers: Sequence[int], ctx: EditContext, *, n_tokens: int,
                       seq_len: int = 64, seed: int = 0) -> tuple[dict[int, torch.Tensor], dict[str, Any]]:
    """``{layer: C_ent (in×in float32, on the layer's device)}`` and a JSON description."""
    t0 = time.perf_counter()
    corpus = S.corpus_descriptor(ctx, seq_len, seed)

    def windows(cdir: Path | None, fp: str) -> list[list[int]]:
        return S.corpus_windows(model, tok, corpus, n_tokens, seq_len, seed, S._corpus_path(cdir, corpus, fp))

    result, keys, count = _masked_covariances(model, tok, layers, ctx, "entity:" + corpus["sha256"], n_tokens, seq_len,
                                              windows, entity_mask)
    desc = {"kind": "entity", "tokens": count, "corpus": corpus["sha256"], "cache_keys": keys,
            "time_s": round(time.perf_counter() - t0, 3)}
    return result, desc


def _masked_covariances(model, tok, layers: Sequence[int], ctx: EditContext, tag: str, budget: int, seq_len: int,
                        windows: Callable[[Path | None, str], list[list[int]]],
                        mask_fn: Callable[[Sequence[str]], list[bool]]):
    """The mean ``k kᵀ`` at the tokens ``mask_fn`` marks in ``windows(cache_dir, fingerprint)``, per layer,
    read from / stored in the ``keystats/`` cache under ``tag``: (per layer on its device, cache keys, count)."""
    sites = sites_for(model)
    layers = sorted(set(int(l) for l in layers))
    fp = S._model_fingerprint(model, ctx)
    cdir = Path(ctx.cache_dir) / "keystats" if ctx.cache_dir is not None else None
    keys = {l: S.cache_key(fp, sites.mlp_out_param(l), l, tag, budget, seq_len) for l in layers}
    found = {l: S._load(cdir / f"{keys[l]}.safetensors") for l in layers} if cdir is not None else {}
    if cdir is None or any(v is None for v in found.values()):
        sums, n = _accumulate(model, tok, sites, layers, windows(cdir, fp), seq_len, mask_fn)
        found = {}
        for l in layers:
            c = sums.pop(l).div_(n).float()
            if cdir is not None:
                S._store(cdir / f"{keys[l]}.safetensors", c, n, keys[l])
            found[l] = (c, n)
    devs = {l: model.get_parameter(sites.mlp_out_param(l)).device for l in layers}
    result = {l: found[l][0].to(devs[l]) for l in layers}
    return result, {str(l): keys[l] for l in layers}, int(found[layers[0]][1])


def fact_sentences(path: str | Path) -> list[str]:
    """The known facts of a JSON file as sentences: ``known_1000.json`` records (``prompt`` + `` `` +
    ``attribute``), ``{"prompt", "answer"}`` objects or ``[prompt, answer]`` pairs (taken verbatim)."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"preserve_facts: expected a JSON file of known facts, found no file at {str(p)!r}")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise UsageError(f"preserve_facts: {str(p)!r} is not JSON ({e})") from None
    if not isinstance(data, list) or not data:
        raise UsageError(f"preserve_facts: expected a non-empty JSON list of facts in {str(p)!r}, found {type(data).__name__}")
    out = []
    for rec in data:
        if isinstance(rec, dict) and isinstance(rec.get("prompt"), str) and isinstance(rec.get("attribute"), str):
            out.append(rec["prompt"] + " " + rec["attribute"])
        elif isinstance(rec, dict) and isinstance(rec.get("prompt"), str) and isinstance(rec.get("answer"), str):
            out.append(rec["prompt"] + rec["answer"])
        elif isinstance(rec, (list, tuple)) and len(rec) == 2 and all(isinstance(x, str) for x in rec):
            out.append(rec[0] + rec[1])
        else:
            raise UsageError("preserve_facts: expected records with prompt+attribute (known_1000.json), "
                             f"prompt+answer, or [prompt, answer]; found {rec!r:.200}")
    return out


@torch.no_grad()
def fact_covariances(model: nn.Module, tok, layers: Sequence[int], ctx: EditContext, path: str | Path, *,
                     seq_len: int = 64) -> tuple[dict[int, torch.Tensor], dict[str, Any]]:
    """``{layer: C_facts (in×in float32, on the layer's device)}``: the mean ``k kᵀ`` over every token
    of the facts in ``path`` (each sentence one window, cut at ``seq_len`` tokens), and a description."""
    t0 = time.perf_counter()
    sentences = fact_sentences(path)  # checks the file first
    sha = file_sha256(path)

    def windows(cdir: Path | None, fp: str) -> list[list[int]]:
        ids = [tok(x, add_special_tokens=False)["input_ids"][:seq_len] for x in sentences]
        return [w for w in ids if w]

    result, keys, count = _masked_covariances(model, tok, layers, ctx, f"facts:{sha}", len(sentences), seq_len,
                                              windows, lambda pieces: [True] * len(pieces))
    desc = {"kind": "facts", "facts": len(sentences), "tokens": count, "file_sha256": sha, "cache_keys": keys,
            "time_s": round(time.perf_counter() - t0, 3)}
    return result, desc


@torch.no_grad()
def sampled_fact_covariances(model: nn.Module, tok, layers: Sequence[int], ctx: EditContext, *, per_opener: int,
                             new_tokens: int = 16, exclude: Sequence[str] = ()
                             ) -> tuple[dict[int, torch.Tensor], dict[str, Any]]:
    """``C_facts`` over fact sentences sampled from the model (``editors/factsample.py``): no file needed."""
    t0 = time.perf_counter()
    sample = fact_sample_descriptor(per_opener, new_tokens, ctx.seed, exclude)

    def windows(cdir: Path | None, fp: str) -> list[list[int]]:
        return sample_fact_windows(model, tok, per_opener, new_tokens, ctx.seed, exclude, progress=ctx.progress)

    result, keys, count = _masked_covariances(model, tok, layers, ctx, f"facts:{sample['sha256']}",
                                              per_opener * len(FACT_OPENERS), new_tokens + 16, windows,
                                              lambda pieces: [True] * len(pieces))
    desc = {"kind": "sampled-facts", "sampled": per_opener * len(FACT_OPENERS), "tokens": count,
            "sample_sha256": sample["sha256"], "cache_keys": keys, "time_s": round(time.perf_counter() - t0, 3)}
    return result, desc


def _accumulate(model, tok, sites, layers: list[int], windows: list[list[int]], seq_len: int,
                mask_fn: Callable[[Sequence[str]], list[bool]]):
    class _State:
        mask: torch.Tensor | None = None

    state = _State()
    dev = input_device(model)
    text = {i: tok.decode([i]) for w in windows for i in w}
    with contextlib.ExitStack() as stack:
        accs = {l: stack.enter_context(KeyAccumulator(model, sites.mlp_out.format(l), state)) for l in layers}
        accs[layers[-1]].stop = True
        bsz = max(1, 8192 // seq_len)
        for c in range(0, len(windows), bsz):
            chunk = windows[c:c + bsz]
            ids, mask = pad(chunk, pad_id(tok), dev)
            ent = torch.zeros_like(mask, dtype=torch.bool)
            for r, w in enumerate(chunk):
                ent[r, :len(w)] = torch.tensor(mask_fn([text[i] for i in w]), dtype=torch.bool)
            state.mask = (ent & mask.bool()).view(-1)
            try:
                model(input_ids=ids, attention_mask=mask, use_cache=False)
            except StopForward:
                pass
        for a in accs.values():
            a.flush()
    n = accs[layers[0]].count
    if n == 0 or accs[layers[0]].sum is None:
        raise UsageError("entity statistics: the corpus has no capitalised words inside sentences")
    return {l: a.sum for l, a in accs.items()}, n
