"""Entity-key statistics: which tokens count as names, and C_ent against a direct computation."""

from __future__ import annotations

import pytest
import torch

from kledger.editors.base import EditContext
from kledger.editors.entitystats import entity_covariances, entity_mask
from kledger.editors.models import load_model
from kledger.ledger.errors import UsageError


def test_entity_mask_marks_names_inside_sentences_only():
    pieces = ["The", " mother", " tongue", " of", " Dani", "elle", " Dar", "rie", "ux", " is", " French", ".",
              " In", " 1990", ",", " I", " met", " IBM", "'s", " boss", "\n", "New", " York"]
    marked = [p for p, m in zip(pieces, entity_mask(pieces)) if m]
    # sentence openings (The, In, New after a newline) and the pronoun I are not names; 's ends the word
    assert marked == [" Dani", "elle", " Dar", "rie", "ux", " French", " IBM", " York"]


def test_entity_covariance_is_the_mean_outer_product_at_name_tokens(tmp_path, tiny_llama_dir):
    from kledger.editors.hooks import Trace
    from kledger.editors.sites import sites_for

    model, tok, _ = load_model(str(tiny_llama_dir), "cpu")
    corpus = tmp_path / "c.txt"
    corpus.write_text("Yesterday Alice Smith met Bob in Paris and London.\n\nthe cat saw Mary there.\n\n")
    ctx = EditContext(cache_dir=tmp_path / "cache", stats_corpus=str(corpus))
    C, desc = entity_covariances(model, tok, [0, 1], ctx, n_tokens=64, seq_len=16)
    again, _ = entity_covariances(model, tok, [0, 1], ctx, n_tokens=64, seq_len=16)  # from the cache
    sites = sites_for(model)
    rows = {0: [], 1: []}
    for doc in corpus.read_text().split("\n\n"):
        if not doc.strip():
            continue
        ids = tok(doc.strip(), add_special_tokens=False)["input_ids"][:16]
        mask = torch.tensor(entity_mask([tok.decode([i]) for i in ids]))
        with Trace(model, sites.mlp_out.format(0), retain_input=True, retain_output=False) as t0, \
                Trace(model, sites.mlp_out.format(1), retain_input=True, retain_output=False) as t1:
            model(input_ids=torch.tensor([ids]))
        rows[0].append(t0.input[0][mask])
        rows[1].append(t1.input[0][mask])
    for l in (0, 1):
        K = torch.cat(rows[l]).double()
        assert desc["tokens"] == K.shape[0] > 0
        torch.testing.assert_close(C[l], (K.T @ K / K.shape[0]).float(), rtol=1e-4, atol=1e-6)
        assert torch.equal(C[l], again[l])


def test_fact_sentences_formats_and_errors(tmp_path):
    import json

    import pytest

    from kledger.editors.entitystats import fact_sentences

    f = tmp_path / "f.json"
    f.write_text(json.dumps([{"prompt": "Vinson Massif is located in the continent of", "attribute": "Antarctica"},
                             {"prompt": "2 + 2 =", "answer": " 4"}, ["The sky is", " blue"]]))
    assert fact_sentences(f) == ["Vinson Massif is located in the continent of Antarctica", "2 + 2 = 4", "The sky is blue"]
    with pytest.raises(UsageError, match="no file"):
        fact_sentences(tmp_path / "missing.json")
    f.write_text(json.dumps([{"subject": "x"}]))
    with pytest.raises(UsageError, match="prompt\\+attribute"):
        fact_sentences(f)
    f.write_text("{}")
    with pytest.raises(UsageError, match="non-empty JSON list"):
        fact_sentences(f)


def test_fact_covariance_is_the_mean_outer_product_over_every_token(tmp_path, tiny_llama_dir):
    import json

    from kledger.editors.entitystats import fact_covariances
    from kledger.editors.hooks import Trace
    from kledger.editors.sites import sites_for

    model, tok, _ = load_model(str(tiny_llama_dir), "cpu")
    f = tmp_path / "facts.json"
    f.write_text(json.dumps([["The Eiffel Tower is in", " Paris"], ["Bob plays", " tennis every day"]]))
    ctx = EditContext(cache_dir=tmp_path / "cache")
    C, desc = fact_covariances(model, tok, [0], ctx, f)
    again, _ = fact_covariances(model, tok, [0], ctx, f)  # from the cache
    rows = []
    for text in ("The Eiffel Tower is in Paris", "Bob plays tennis every day"):
        with Trace(model, sites_for(model).mlp_out.format(0), retain_input=True, retain_output=False) as t:
            model(input_ids=torch.tensor([tok(text, add_special_tokens=False)["input_ids"]]))
        rows.append(t.input[0])
    K = torch.cat(rows).double()
    assert desc["tokens"] == K.shape[0] and desc["facts"] == 2
    torch.testing.assert_close(C[0], (K.T @ K / K.shape[0]).float(), rtol=1e-4, atol=1e-6)
    assert torch.equal(C[0], again[0])


def test_sampled_facts_open_with_the_openers_stop_at_a_line_break_and_repeat_by_seed(tiny_llama_dir):
    from kledger.editors.factsample import FACT_OPENERS, _cut, sample_fact_windows

    model, tok, _ = load_model(str(tiny_llama_dir), "cpu")
    w = sample_fact_windows(model, tok, 2, 6, seed=3)
    assert len(w) == 2 * len(FACT_OPENERS)
    for j, opener in enumerate(FACT_OPENERS):
        ids = tok(opener, add_special_tokens=False)["input_ids"]
        for row in w[2 * j: 2 * j + 2]:
            assert row[: len(ids)] == ids and len(ids) <= len(row) <= len(ids) + 6
            assert all("\n" not in tok.decode([i]) for i in row[len(ids):])
    assert w == sample_fact_windows(model, tok, 2, 6, seed=3)
    assert w != sample_fact_windows(model, tok, 2, 6, seed=4)
    assert _cut([5, 6, 7, 9, 8], 2, {9}) == [5, 6, 7] and _cut([5, 9, 7], 2, {9}) == [5, 9, 7]
    # exclude: the sentences naming a given string are left out (here every one of the first opener's)
    assert sample_fact_windows(model, tok, 2, 6, seed=3, exclude=[FACT_OPENERS[0]]) == w[2:]
    with pytest.raises(UsageError, match="left out all 72 sampled fact sentences"):
        sample_fact_windows(model, tok, 2, 6, seed=3, exclude=["The"])


def test_fact_openers_never_open_an_audit_probe_prompt():
    from kledger.audit.probes import knowledge_prompts
    from kledger.editors.factsample import FACT_OPENERS

    assert not [(o, p) for o in FACT_OPENERS for p in knowledge_prompts() if p.startswith(o) or o.startswith(p)]


def test_sampled_fact_covariance_is_the_mean_outer_product_over_the_sampled_sentences(tmp_path, tiny_llama_dir,
                                                                                     monkeypatch):
    import kledger.editors.entitystats as E
    from kledger.editors.factsample import sample_fact_windows
    from kledger.editors.hooks import Trace
    from kledger.editors.sites import sites_for

    model, tok, _ = load_model(str(tiny_llama_dir), "cpu")
    ctx = EditContext(cache_dir=tmp_path / "cache", seed=5)
    C, desc = E.sampled_fact_covariances(model, tok, [0], ctx, per_opener=1, new_tokens=4)
    monkeypatch.setattr(E, "sample_fact_windows", lambda *a, **k: pytest.fail("sampled again despite the cache"))
    again, _ = E.sampled_fact_covariances(model, tok, [0], ctx, per_opener=1, new_tokens=4)
    rows = []
    for ids in sample_fact_windows(model, tok, 1, 4, seed=5):
        with Trace(model, sites_for(model).mlp_out.format(0), retain_input=True, retain_output=False) as t:
            model(input_ids=torch.tensor([ids]))
        rows.append(t.input[0])
    K = torch.cat(rows).double()
    assert desc["kind"] == "sampled-facts" and desc["tokens"] == K.shape[0]
    torch.testing.assert_close(C[0], (K.T @ K / K.shape[0]).float(), rtol=1e-4, atol=1e-6)
    assert torch.equal(C[0], again[0])
