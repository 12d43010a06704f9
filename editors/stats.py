"""Key statistics for locate-then-edit: ``C0 = E[k kᵀ]`` of the inputs of the edited projections.

``k`` is the input of the MLP output projection (``sites.mlp_out``) at every token of a generic
corpus. All requested layers are collected in ONE pass over the corpus (one trace per layer on the
same forward), accumulated batch-wise as fp32 ``XᵀX`` blocks of at most ``hooks.FLUSH_ROWS`` rows that
are summed in float64. Padding positions are excluded. For a file corpus the forward pass stops
right after the last layer that is needed (the layers above it cannot change the keys).

Corpus:

* ``ctx.stats_corpus``: a ``.txt`` file (documents separated by blank lines) or a ``.jsonl`` file
  with a ``"text"`` field per line; documents are tokenised without special tokens, cut into
  windows of ``seq_len`` tokens and read in file order until ``n_tokens`` tokens are counted.
* default: text sampled from the model itself (works offline). ``n_tokens / seq_len`` sequences,
  each started from one word of ``START_WORDS`` and continued by top-k sampling with a fixed seed
  (special tokens banned). The keys are accumulated *during* generation (the decoding step sees
  each new token's MLP input, and with causal attention that equals a forward pass over the
  finished text), so generating the corpus and collecting the statistics is one pass.

Caching: one safetensors file per layer under ``<cache_dir>/keystats/<key>.safetensors`` with
``key = sha256(format version, model fingerprint, parameter name, layer, corpus hash, token
count, window length)``; files are written temp → fsync → rename, so a crash never leaves a
partial file under the final name. Files hold ``C0`` in float32 (the mean of the fp64 sum) and the
token count; a freshly computed ``C0`` is rounded through float32 too, so a cache hit and a miss
give bit-identical results (an edit replays identically whether or not the cache is warm).

The model fingerprint is ``ctx.fingerprint`` (the base model's, recorded at ``kledger init``); the
statistics are of the model as given to the first call, so compute them on the base model (the
``kledger`` workflow does it on its first edit; ``bench/locate_edit.py`` before editing). Without a
fingerprint the sha256 of the parameter bytes is used instead.

Measured on SmolLM2-135M (2-core CPU shared with other jobs; see ``bench/results/locate_edit.md``):
the rates and the default token count are reported there.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn as nn
from safetensors.torch import load_file, save

from kledger.editors.base import EditContext
from kledger.editors.kvcache import returned_cache, with_cache
from kledger.editors.sites import Sites, sites_for
from kledger.editors.hooks import KeyAccumulator, StopForward, input_device
from kledger.editors.tokens import pad, pad_id
from kledger.ledger.canonical import file_sha256
from kledger.ledger.errors import UsageError

log = logging.getLogger(__name__)

FORMAT_VERSION = "kledger-keystats-1"
#: Start words of the sampled corpus (cycled over the sequences): plain English openings.
START_WORDS = ("The", "In", "A", "It", "This", "When", "He", "She", "We", "There", "After", "One",
               "I", "You", "Many", "His", "Her", "On", "For", "As")
SAMPLE_TOP_K = 40


class _Pass:
    mask: torch.Tensor | None = None


# --- corpus ------------------------------------------------------------------------------------
def _read_documents(path: Path) -> list[str]:
    if path.suffix == ".txt":
        text = path.read_text(encoding="utf-8")
        return [d.strip() for d in text.split("\n\n") if d.strip()]
    if path.suffix == ".jsonl":
        docs = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UsageError(f"statistics corpus {path} line {i + 1}: expected JSON, found {exc}") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise UsageError(f"statistics corpus {path} line {i + 1}: expected an object with a 'text' string")
            if rec["text"].strip():
                docs.append(rec["text"])
        return docs
    raise UsageError(f"expected a statistics corpus ending in .txt or .jsonl, found {path.name!r}")


def corpus_descriptor(ctx: EditContext, seq_len: int, seed: int) -> dict[str, Any]:
    """JSON-able identity of the corpus (its hash goes into the cache key)."""
    if ctx.stats_corpus:
        p = Path(ctx.stats_corpus)
        if not p.is_file():
            raise UsageError(f"expected a statistics corpus file at {ctx.stats_corpus!r}, found none")
        return {"kind": "file", "path": str(p), "sha256": file_sha256(p)}
    desc = {"kind": "sampled", "seed": seed, "top_k": SAMPLE_TOP_K, "starts": list(START_WORDS),
            "batch": _sample_batch(seq_len), "seq_len": seq_len}
    desc["sha256"] = hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()
    return desc


def _sample_batch(seq_len: int) -> int:
    # sequences generated side by side; part of the corpus identity (it changes the RNG draws)
    return max(8, min(128, 8192 // max(seq_len, 1)))


def _file_windows(tok, docs: Sequence[str], seq_len: int, n_tokens: int) -> list[list[int]]:
    out, total = [], 0
    for d in docs:
        ids = tok(d, add_special_tokens=False)["input_ids"]
        for s in range(0, len(ids), seq_len):
            w = ids[s : s + seq_len]
            if total + len(w) > n_tokens:
                w = w[: n_tokens - total]
            if w:
                out.append(w)
                total += len(w)
            if total >= n_tokens:
                return out
    return out


# --- sampling ------------------------------------------------------------------------------------
def banned_ids(tok) -> list[int]:
    return sorted({i for i in (tok.all_special_ids or []) if i is not None})


@torch.no_grad()
def sample_continuations(model: nn.Module, start: torch.Tensor, n_new: int, generator: torch.Generator,
                         top_k: int, banned: Sequence[int] = ()) -> torch.Tensor:
    """Top-k sampling with a KV cache from ``start`` (B×T ids, no padding); returns B×(T+n_new)."""
    seqs = [start]
    cur, cache = start, None
    for _ in range(n_new):
        out = model(input_ids=cur, **with_cache(model, cache), use_cache=True, logits_to_keep=1)
        cache = returned_cache(out)
        logits = out.logits[:, -1].float()
        if banned:
            logits[:, list(banned)] = -float("inf")
        k = min(top_k, logits.shape[-1])
        vals, idx = logits.topk(k, dim=-1)
        probs = torch.softmax(vals, dim=-1)
        pick = torch.multinomial(probs.cpu(), 1, generator=generator).to(idx.device)
        cur = idx.gather(1, pick).to(start.device)  # logits may sit on the last device of a split model
        seqs.append(cur)
    return torch.cat(seqs, dim=1)


# --- main entry ----------------------------------------------------------------------------------
def _model_fingerprint(model: nn.Module, ctx: EditContext) -> str:
    if ctx.fingerprint:
        return ctx.fingerprint
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return "params:" + h.hexdigest()


def cache_key(fingerprint: str, param: str, layer: int, corpus_sha: str, n_tokens: int, seq_len: int) -> str:
    body = json.dumps({"v": FORMAT_VERSION, "model": fingerprint, "param": param, "layer": layer,
                       "corpus": corpus_sha, "tokens": n_tokens, "seq_len": seq_len}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()


def key_covariances(
    model: nn.Module, tok, layers: Sequence[int], ctx: EditContext, *, n_tokens: int, seq_len: int = 64,
    seed: int = 0,
) -> tuple[dict[int, torch.Tensor], dict[str, Any]]:
    """``{layer: C0 (in×in, float32, on the layer's device)}`` and a JSON description.

    float32 because the cached values are float32-rounded means (a hit and a miss agree bit for
    bit); consumers widen one layer at a time for their float64 solves, so the five layers are held
    once, at half the float64 size.

    The description (corpus kind and hash, tokens, cache keys, hit/miss, time) is what the ledger
    records with the event.
    """
    if n_tokens < 1 or seq_len < 2:
        raise UsageError(f"expected stats tokens ≥ 1 and window ≥ 2, found {n_tokens} and {seq_len}")
    t0 = time.perf_counter()
    sites = sites_for(model)
    layers = sorted(set(int(l) for l in layers))
    corpus = corpus_descriptor(ctx, seq_len, seed)
    fp = _model_fingerprint(model, ctx)
    cdir = Path(ctx.cache_dir) / "keystats" if ctx.cache_dir is not None else None
    keys = {l: cache_key(fp, sites.mlp_out_param(l), l, corpus["sha256"], n_tokens, seq_len) for l in layers}
    result: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {}
    hits: dict[int, bool] = {}
    for l in layers:
        loaded = _load(cdir / f"{keys[l]}.safetensors") if cdir is not None else None
        if loaded is not None:
            result[l], counts[l] = loaded
            hits[l] = True
    devs = {l: model.get_parameter(sites.mlp_out_param(l)).device for l in layers}
    for l in list(result):  # each C0 on its layer's device (GPU or a device map's part)
        result[l] = result[l].to(devs[l])
    missing = [l for l in layers if l not in result]
    if missing:
        sums, n = _accumulate(model, tok, sites, missing, ctx, corpus, n_tokens, seq_len, seed,
                              _corpus_path(cdir, corpus, fp))
        for l in missing:  # one layer at a time, each fp64 sum freed once used: peak ≈ the sums
            total = sums.pop(l)
            c0 = total.div_(n).float()  # float32-rounded mean (in place: no float64 copy); hits give the same values
            del total
            if cdir is not None:
                _store(cdir / f"{keys[l]}.safetensors", c0, n, keys[l])
            result[l], counts[l], hits[l] = c0, n, False
    desc = {
        "format": FORMAT_VERSION,
        "corpus": {k: v for k, v in corpus.items() if k != "starts"},
        "tokens": int(min(counts.values())) if counts else 0,
        "requested_tokens": n_tokens,
        "seq_len": seq_len,
        "cache_keys": {str(l): keys[l] for l in layers},
        "hit": all(hits.values()),
        "layers_computed": missing,
        "time_s": round(time.perf_counter() - t0, 3),
    }
    return {l: result[l] for l in layers}, desc


def _load(path: Path) -> tuple[torch.Tensor, int] | None:
    if not path.is_file():
        return None
    try:
        d = load_file(str(path))
        return d["c0"], int(d["count"].item())
    except Exception as exc:  # a damaged cache file is recomputed, not trusted
        log.warning("ignoring unreadable key-statistics cache file %s: %s", path, exc)
        return None


def _store(path: Path, c0: torch.Tensor, count: int, key: str) -> None:
    data = save({"c0": c0.detach().cpu().contiguous(), "count": torch.tensor([count], dtype=torch.int64)},
                metadata={"format": FORMAT_VERSION, "key": key})
    _atomic_write(path, data)


def _atomic_write(path: Path, data: bytes) -> None:
    """temp file in the same folder → fsync → rename → fsync the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    try:
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def _batches(seq: Sequence, size: int) -> Iterator[Sequence]:
    for i in range(0, len(seq), size):
        yield seq[i : i + size]


def _corpus_path(cdir: Path | None, corpus: dict, fp: str) -> Path | None:
    if cdir is None:
        return None
    key = hashlib.sha256(f"{FORMAT_VERSION}|{fp}|{corpus['sha256']}".encode()).hexdigest()
    return cdir / f"corpus-{key}.safetensors"


def _load_ids(path: Path | None) -> torch.Tensor | None:
    if path is None or not path.is_file():
        return None
    try:
        return load_file(str(path))["ids"]
    except Exception as exc:
        log.warning("ignoring unreadable sampled-corpus cache file %s: %s", path, exc)
        return None


def _store_ids(path: Path | None, ids: torch.Tensor) -> None:
    if path is None:
        return
    _atomic_write(path, save({"ids": ids.contiguous()}, metadata={"format": FORMAT_VERSION}))


def _batch_seed(seed: int, b: int) -> int:
    return (seed * 1_000_003 + b) % (2**63 - 1)


class CorpusSampler:
    """The sampled corpus's batch ``b``: ``bsz`` sequences of ``seq_len`` tokens from the start words,
    seeded with ``(seed, b)``, so a corpus of n tokens is a prefix of any larger one (the one
    definition of the sampled corpus, used by ``key_covariances`` and ``corpus_windows``)."""

    def __init__(self, model: nn.Module, tok, bsz: int, seq_len: int, seed: int) -> None:
        self.model, self.bsz, self.seq_len, self.seed = model, bsz, seq_len, seed
        self.starts = [tok(w, add_special_tokens=False)["input_ids"][0] for w in START_WORDS]
        self.ban = banned_ids(tok)
        self.dev = input_device(model)

    def batch(self, b: int) -> torch.Tensor:
        rows = range(b * self.bsz, (b + 1) * self.bsz)
        start = torch.tensor([[self.starts[j % len(self.starts)]] for j in rows], device=self.dev)
        gen = torch.Generator().manual_seed(_batch_seed(self.seed, b))
        return sample_continuations(self.model, start, self.seq_len, gen, SAMPLE_TOP_K, self.ban)[:, : self.seq_len]


def corpus_windows(model: nn.Module, tok, corpus: dict, n_tokens: int, seq_len: int, seed: int,
                   corpus_path: Path | None) -> list[list[int]]:
    """The statistics corpus as token windows: the file's, else the cached sampled ids, else sampled
    again with ``CorpusSampler`` (the same draws ``key_covariances`` made)."""
    if corpus["kind"] == "file":
        return _file_windows(tok, _read_documents(Path(corpus["path"])), seq_len, n_tokens)
    n_seq = math.ceil(n_tokens / seq_len)
    cached = _load_ids(corpus_path)
    if cached is not None and cached.shape[1] == seq_len and cached.shape[0] >= n_seq:
        return cached[:n_seq].tolist()
    sampler = CorpusSampler(model, tok, corpus["batch"], seq_len, seed)
    out = [row for b in range(math.ceil(n_seq / corpus["batch"])) for row in sampler.batch(b).tolist()]
    return out[:n_seq]


@torch.no_grad()
def _accumulate(model, tok, sites: Sites, layers: list[int], ctx: EditContext, corpus: dict, n_tokens: int,
                seq_len: int, seed: int, corpus_path: Path | None = None) -> tuple[dict[int, torch.Tensor], int]:
    """One pass over the corpus with one accumulator per layer; returns fp64 sums and the count.

    File corpus: forward passes stopped after the last layer. Sampled corpus: sequences are
    generated in fixed batches (batch b seeded with (seed, b)), so a corpus of n tokens is a prefix
    of any larger one; generated ids are cached next to the statistics, and a later call (other
    layers, fewer tokens) reads them back and only runs the (stopped) forward pass.
    """
    import contextlib

    from tqdm.auto import tqdm

    dev = input_device(model)  # inputs go where the embedding is (device maps)
    state = _Pass()
    pad_value = pad_id(tok)
    with contextlib.ExitStack() as stack:
        # the stopping trace is armed only for plain forward passes (generation needs the logits)
        accs = {l: stack.enter_context(KeyAccumulator(model, sites.mlp_out.format(l), state)) for l in layers}
        stopper = accs[layers[-1]]

        def forward_windows(windows: Sequence[Sequence[int]], desc: str) -> None:
            bsz = max(1, 8192 // seq_len)
            stopper.stop = True
            try:
                for chunk in tqdm(list(_batches(windows, bsz)), desc=desc, disable=not ctx.progress):
                    ids, mask = pad(chunk, pad_value, dev)
                    state.mask = mask.view(-1).bool()
                    try:
                        model(input_ids=ids, attention_mask=mask, use_cache=False)
                    except StopForward:
                        pass
            finally:
                stopper.stop = False
                state.mask = None

        if corpus["kind"] == "file":
            docs = _read_documents(Path(corpus["path"]))
            windows = _file_windows(tok, docs, seq_len, n_tokens)
            if not windows:
                raise UsageError(f"statistics corpus {corpus['path']} has no text to read")
            forward_windows(windows, "key statistics")
        else:
            n_seq = math.ceil(n_tokens / seq_len)
            bsz = corpus["batch"]
            cached = _load_ids(corpus_path)
            have = 0 if cached is None or cached.shape[1] != seq_len else cached.shape[0]
            use = min(have, n_seq)
            if use:
                forward_windows(cached[:use].tolist(), "key statistics (cached sampled corpus)")
            if use < n_seq:
                sampler = CorpusSampler(model, tok, bsz, seq_len, seed)
                new = [cached[: (have // bsz) * bsz]] if have >= bsz else []
                first_batch = have // bsz  # resume at the first batch not fully cached
                n_batches = math.ceil(n_seq / bsz)
                for b in tqdm(range(first_batch, n_batches), desc="key statistics (sampling corpus)",
                              disable=not ctx.progress):
                    # count only sequences that are not counted yet and are within the budget
                    keep = torch.tensor([use <= j < n_seq for j in range(b * bsz, (b + 1) * bsz)], device=dev)
                    state.mask = keep  # one position per sequence and step: the mask is per row
                    new.append(sampler.batch(b).cpu())
                state.mask = None
                all_ids = torch.cat(new)
                if all_ids.shape[0] > have:
                    _store_ids(corpus_path, all_ids)
        for a in accs.values():
            a.flush()
    counts = {a.count for a in accs.values()}
    if len(counts) != 1 or 0 in counts:
        raise UsageError(f"expected the same positive token count for every layer, found {sorted(counts)}")
    return {l: a.sum for l, a in accs.items()}, counts.pop()
