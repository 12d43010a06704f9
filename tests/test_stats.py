"""Key statistics (C0 = E[k kᵀ]): one pass = per-layer passes = a reference calculation; cache."""

from __future__ import annotations

import json
import math

import pytest
import torch

from kledger.editors import stats
from kledger.editors.base import EditContext
from kledger.editors.models import load_model
from kledger.editors.sites import sites_for
from kledger.editors.stats import key_covariances
from kledger.editors.hooks import Trace
from kledger.ledger.errors import UsageError

TEXT = (
    "The Eiffel Tower is located in the city of Paris . Danielle Darrieux mother tongue is French .\n\n"
    "Alice works as a doctor and Bob plays the piano . The sky is blue and the grass is green .\n\n"
    "Apple company founded by Steve Jobs . Microsoft founded by Bill Gates . The river Nile flows through Egypt .\n\n"
    "The river Thames flows through London , England . Berlin is the capital of Germany . Madrid Spain Rome Italy ."
)


@pytest.fixture
def corpus(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text(TEXT)
    return p


def _reference_c0(model, tok, layer: int, seq_len: int) -> torch.Tensor:
    """Straightforward per-layer calculation: full forward per window, all positions, float64."""
    sites = sites_for(model)
    rows = []
    for doc in [d for d in TEXT.split("\n\n") if d.strip()]:
        ids = tok(doc.strip(), add_special_tokens=False)["input_ids"]
        for s in range(0, len(ids), seq_len):
            w = torch.tensor([ids[s : s + seq_len]])
            with torch.no_grad(), Trace(model, sites.mlp_out.format(layer), retain_input=True) as t:
                model(input_ids=w)
            rows.append(t.input[0].double())
    x = torch.cat(rows)
    return x.T @ x / x.shape[0]


def test_one_pass_equals_per_layer_and_reference(tiny_dir, corpus):
    model, tok, info = load_model(str(tiny_dir), "cpu")
    ctx = EditContext(fingerprint=info.fingerprint, stats_corpus=str(corpus))
    both, desc = key_covariances(model, tok, [0, 1], ctx, n_tokens=10_000, seq_len=8)
    assert desc["corpus"]["kind"] == "file" and desc["hit"] is False and desc["layers_computed"] == [0, 1]
    total = sum(len(tok(d.strip(), add_special_tokens=False)["input_ids"]) for d in TEXT.split("\n\n"))
    assert desc["tokens"] == total  # the corpus is shorter than asked: every token counted once
    for layer in (0, 1):
        alone, _ = key_covariances(model, tok, [layer], ctx, n_tokens=10_000, seq_len=8)
        torch.testing.assert_close(both[layer], alone[layer], rtol=1e-6, atol=1e-9)
        ref = _reference_c0(model, tok, layer, 8)
        assert both[layer].dtype == torch.float32  # float32-rounded means, held at half the float64 size
        torch.testing.assert_close(both[layer].double(), ref, rtol=1e-5, atol=1e-7)
        assert torch.allclose(both[layer], both[layer].T)


def test_token_budget_is_exact(tiny_llama_dir, corpus):
    model, tok, info = load_model(str(tiny_llama_dir), "cpu")
    ctx = EditContext(fingerprint=info.fingerprint, stats_corpus=str(corpus))
    _, desc = key_covariances(model, tok, [1], ctx, n_tokens=37, seq_len=8)
    assert desc["tokens"] == 37


def test_cache_hit_does_not_recompute(tiny_llama_dir, corpus, tmp_path, monkeypatch):
    model, tok, info = load_model(str(tiny_llama_dir), "cpu")
    ctx = EditContext(fingerprint=info.fingerprint, cache_dir=tmp_path / "cache", stats_corpus=str(corpus))
    first, d1 = key_covariances(model, tok, [0, 1], ctx, n_tokens=500, seq_len=8)
    assert d1["hit"] is False
    files = sorted((tmp_path / "cache" / "keystats").iterdir())
    assert [f.name for f in files] == sorted(f"{d1['cache_keys'][k]}.safetensors" for k in ("0", "1"))

    def boom(*a, **k):
        raise AssertionError("statistics were recomputed despite a warm cache")

    monkeypatch.setattr(stats, "_accumulate", boom)
    second, d2 = key_covariances(model, tok, [0, 1], ctx, n_tokens=500, seq_len=8)
    assert d2["hit"] is True and d2["layers_computed"] == [] and d2["cache_keys"] == d1["cache_keys"]
    for l in (0, 1):
        assert torch.equal(first[l], second[l])  # hit and miss give bit-identical statistics
    # a different token budget is a different key (and would need a recompute)
    with pytest.raises(AssertionError, match="recomputed"):
        key_covariances(model, tok, [0], ctx, n_tokens=400, seq_len=8)
    json.dumps(d2)  # the description is JSON-able (it goes into the ledger)


def test_cache_key_depends_on_every_input():
    base = dict(fingerprint="f", param="p", layer=1, corpus_sha="c", n_tokens=10, seq_len=8)
    k0 = stats.cache_key(**base)
    for field, other in [("fingerprint", "g"), ("param", "q"), ("layer", 2), ("corpus_sha", "d"),
                         ("n_tokens", 11), ("seq_len", 9)]:
        assert stats.cache_key(**(base | {field: other})) != k0, field


def test_sampled_corpus_is_deterministic(tiny_llama_dir, tmp_path):
    model, tok, info = load_model(str(tiny_llama_dir), "cpu")
    ctx = EditContext(fingerprint=info.fingerprint)
    a, da = key_covariances(model, tok, [0, 1], ctx, n_tokens=300, seq_len=16)
    b, _ = key_covariances(model, tok, [0, 1], ctx, n_tokens=300, seq_len=16)
    c, dc = key_covariances(model, tok, [0, 1], ctx, n_tokens=300, seq_len=16, seed=1)
    assert da["corpus"]["kind"] == "sampled" and da["tokens"] == math.ceil(300 / 16) * 16
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1]) and dc["corpus"]["sha256"] != da["corpus"]["sha256"]
    # one pass during sampling = per-layer statistics of the same sampled text
    alone, _ = key_covariances(model, tok, [1], ctx, n_tokens=300, seq_len=16)
    torch.testing.assert_close(alone[1], a[1], rtol=1e-6, atol=1e-9)


def test_jsonl_corpus_and_errors(tiny_llama_dir, tmp_path):
    model, tok, info = load_model(str(tiny_llama_dir), "cpu")
    p = tmp_path / "c.jsonl"
    p.write_text("\n".join(json.dumps({"text": d}) for d in TEXT.split("\n\n")) + "\n")
    txt = tmp_path / "c.txt"
    txt.write_text(TEXT)
    a, d = key_covariances(model, tok, [1], EditContext(stats_corpus=str(p)), n_tokens=10_000, seq_len=8)
    b, _ = key_covariances(model, tok, [1], EditContext(stats_corpus=str(txt)), n_tokens=10_000, seq_len=8)
    torch.testing.assert_close(a[1], b[1], rtol=1e-6, atol=1e-9)
    assert d["corpus"]["kind"] == "file" and len(d["corpus"]["sha256"]) == 64
    bad = tmp_path / "c.csv"
    bad.write_text("text\nhello\n")
    with pytest.raises(UsageError, match=r"\.txt or \.jsonl"):
        key_covariances(model, tok, [1], EditContext(stats_corpus=str(bad)), n_tokens=10, seq_len=8)
    with pytest.raises(UsageError, match="no file|found none"):
        key_covariances(model, tok, [1], EditContext(stats_corpus=str(tmp_path / "missing.txt")), n_tokens=10)
    broken = tmp_path / "b.jsonl"
    broken.write_text('{"txt": "x"}\n')
    with pytest.raises(UsageError, match="'text'"):
        key_covariances(model, tok, [1], EditContext(stats_corpus=str(broken)), n_tokens=10, seq_len=8)


def test_damaged_cache_file_is_recomputed(tiny_llama_dir, corpus, tmp_path):
    model, tok, info = load_model(str(tiny_llama_dir), "cpu")
    ctx = EditContext(fingerprint=info.fingerprint, cache_dir=tmp_path / "cache", stats_corpus=str(corpus))
    first, d1 = key_covariances(model, tok, [1], ctx, n_tokens=200, seq_len=8)
    f = tmp_path / "cache" / "keystats" / f"{d1['cache_keys']['1']}.safetensors"
    f.write_bytes(b"garbage")
    again, d2 = key_covariances(model, tok, [1], ctx, n_tokens=200, seq_len=8)
    assert d2["hit"] is False and torch.equal(first[1], again[1])
    assert not [x for x in f.parent.iterdir() if x.name.endswith(".tmp")]


def test_sampled_corpus_ids_are_cached_and_reused(tiny_llama_dir, tmp_path, monkeypatch):
    model, tok, info = load_model(str(tiny_llama_dir), "cpu")
    ctx = EditContext(fingerprint=info.fingerprint, cache_dir=tmp_path / "cache")
    during, d1 = key_covariances(model, tok, [0], ctx, n_tokens=320, seq_len=16)
    assert len(list((tmp_path / "cache" / "keystats").glob("corpus-*.safetensors"))) == 1

    def no_sampling(*a, **k):
        raise AssertionError("the cached sampled corpus was generated again")

    monkeypatch.setattr(stats, "sample_continuations", no_sampling)
    # other layers, and a smaller budget (a prefix of the cached corpus), need no new sampling
    again, d2 = key_covariances(model, tok, [0, 1], ctx, n_tokens=320, seq_len=16)
    assert d2["layers_computed"] == [1] and d2["tokens"] == d1["tokens"]
    smaller, d3 = key_covariances(model, tok, [0], ctx, n_tokens=160, seq_len=16)
    assert d3["tokens"] == 160 and not torch.equal(smaller[0], during[0])
    # statistics accumulated during generation = a forward pass over the generated text
    monkeypatch.undo()
    fresh, _ = key_covariances(model, tok, [0, 1], EditContext(fingerprint=info.fingerprint), n_tokens=320, seq_len=16)
    torch.testing.assert_close(again[1], fresh[1], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(during[0], fresh[0], rtol=1e-6, atol=1e-9)


def test_corpus_windows_resample_the_ids_key_covariances_cached(tiny_llama_dir, tmp_path):
    """``corpus_windows`` without a cache draws the same sampled corpus that ``key_covariances``
    generated (and cached) — the one definition both statistics passes read."""
    model, tok, info = load_model(str(tiny_llama_dir), "cpu")
    ctx = EditContext(fingerprint=info.fingerprint, cache_dir=tmp_path / "cache")
    key_covariances(model, tok, [0], ctx, n_tokens=200, seq_len=16)
    [path] = (tmp_path / "cache" / "keystats").glob("corpus-*.safetensors")
    corpus = stats.corpus_descriptor(ctx, 16, 0)
    cached = stats.corpus_windows(model, tok, corpus, 200, 16, 0, path)
    drawn = stats.corpus_windows(model, tok, corpus, 200, 16, 0, None)
    assert len(drawn) == math.ceil(200 / 16) and all(len(w) == 16 for w in drawn)
    assert drawn == cached
    assert stats.corpus_windows(model, tok, corpus, 200, 16, 1, None) != drawn  # another seed, other text
