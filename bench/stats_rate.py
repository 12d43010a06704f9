"""Time the key statistics C0 = E[k kᵀ] for the edited layers of a real model, computed from scratch.

    python bench/stats_rate.py                       # smollm2-135m, layers 4–8, 90k tokens, file corpus
    python bench/stats_rate.py --sampled 8192        # also the default corpus (text sampled from the model)

The reference figure (EasyEdit's MEMIT on this machine): 206 s for 5 layers over 90k tokens.

Corpus for the file case: the sentences of ../shared/data (CounterFact prompts, paraphrases and
neighbourhood prompts with their answers, zsRE questions, known facts) joined into paragraphs of
40 sentences, written to a temporary .txt file and cycled until there are ``--tokens`` tokens
(the timing does not depend on what the text says, only on the token count and window length).
Every run uses an empty cache directory, so nothing is reused. Results are appended to
``bench/results/stats_rate.md``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from kledger.editors.base import EditContext
from kledger.editors.models import load_model
from kledger.editors.stats import key_covariances

DATA = Path("/work/shared/data")
log = logging.getLogger("bench.stats_rate")


def sentences() -> list[str]:
    out: list[str] = []
    for r in json.loads((DATA / "counterfact-600.json").read_text()):
        out += [f"{r['prompt']} {r['ground_truth']}.", f"{r['rephrase_prompt']} {r['ground_truth']}.",
                f"{r['locality_prompt']} {r['locality_ground_truth']}."]
    for r in json.loads((DATA / "zsre-600.json").read_text()):
        out += [f"{r['src']} {r['answers'][0]}.", f"{r['rephrase']} {r['answers'][0]}.", f"{r['loc']} {r['loc_ans']}."]
    for r in json.loads((DATA / "known_1000.json").read_text()):
        out.append(f"{r['prompt']} {r['attribute']}.")
    return out


def write_corpus(path: Path, tok, n_tokens: int) -> int:
    sents = sentences()
    paras, count, i = [], 0, 0
    while count < n_tokens:
        para = " ".join(sents[(i + j) % len(sents)] for j in range(40))
        i += 40
        paras.append(para)
        count += len(tok(para, add_special_tokens=False)["input_ids"])
    path.write_text("\n\n".join(paras) + "\n")
    return count


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layers", default="4,5,6,7,8")
    ap.add_argument("--tokens", type=int, default=90_000)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sampled", type=int, default=0, help="also time the sampled default corpus of this many tokens")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "stats_rate.md"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    model, tok, info = load_model(args.model, "cpu")
    layers = [int(x) for x in args.layers.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        have = write_corpus(corpus, tok, args.tokens)
        ctx = EditContext(fingerprint=info.fingerprint, cache_dir=Path(tmp) / "cache", seed=0, stats_corpus=str(corpus))
        t = time.perf_counter()
        c0, desc = key_covariances(model, tok, layers, ctx, n_tokens=args.tokens, seq_len=args.seq_len)
        rows.append(("file corpus", desc["tokens"], time.perf_counter() - t, desc["hit"]))
        t = time.perf_counter()
        _, desc2 = key_covariances(model, tok, layers, ctx, n_tokens=args.tokens, seq_len=args.seq_len)
        rows.append(("file corpus, second call (cache)", desc2["tokens"], time.perf_counter() - t, desc2["hit"]))
        if args.sampled:
            ctx = EditContext(fingerprint=info.fingerprint, cache_dir=Path(tmp) / "cache2", seed=0)
            t = time.perf_counter()
            _, desc3 = key_covariances(model, tok, layers, ctx, n_tokens=args.sampled, seq_len=64)
            rows.append(("sampled from the model (default)", desc3["tokens"], time.perf_counter() - t, desc3["hit"]))
    for r in rows:
        log.info("%s: %d tokens, %.1f s (%.0f tokens/s), cache hit %s", r[0], r[1], r[2], r[1] / r[2], r[3])
    load = os.getloadavg()[0]
    now = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    lines = [f"\n### {now}", "", f"`{' '.join(sys.argv)}`", "",
             f"{args.model}, layers {args.layers} in one pass, window {args.seq_len} tokens, {args.threads} torch"
             f" thread(s), 1-minute load average at the end {load:.1f} (2-core machine). Reference: EasyEdit MEMIT,"
             " 5 layers over 90k tokens, 206 s on this machine.", "",
             "| corpus | tokens | seconds | tokens/s | cache hit |", "|---|---|---|---|---|"]
    lines += [f"| {r[0]} | {r[1]} | {r[2]:.1f} | {r[1] / r[2]:.0f} | {r[3]} |" for r in rows]
    with open(args.out, "a") as fh:
        fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
