"""The suffix pass (``editors/suffix.py``): the memory's value fit reruns only the tokens from each
row's subject on, the earlier tokens' keys and values cached — the same logits and gradients as a
full pass, memory entries that span the cut included, and a fall-back where a model differs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kledger.editors import suffix as suffix_mod
from kledger.editors.gate import install_memory
from kledger.editors.hooks import LogitsAt, edit_output
from kledger.editors.memory import MemoryConfig, MemoryEditor, _site, fit_values
from kledger.editors.models import load_model
from kledger.editors.suffix import SuffixPass
from kledger.editors.tokens import encode_pairs
from kledger.ledger.records import FactRequest

TEXTS = ["The Eiffel Tower is located in the city of", "Alice works as a", "Where do people speak"]
TARGETS = [" Paris", " doctor and teacher", " French"]
START = [3, 1, 2]  # a token of each prompt before its target: the add goes there


def _batch(tok):
    enc, spans = encode_pairs(tok, TEXTS, TARGETS, "cpu")
    width = max(e - s for s, e in spans)
    index = torch.tensor([[s - 1 + min(t, e - s - 1) for t in range(width)] for s, e in spans])
    return enc, index, torch.tensor(START)


def _full(model, path, enc, index, start, add):
    rows = torch.arange(len(start))
    fn = lambda y: y.index_put((rows, start), add.to(y.dtype), accumulate=True)  # noqa: E731
    with edit_output(model, path, fn), LogitsAt(model, index) as head:
        logits = model(**enc, use_cache=False).logits
        hooked = head.handle is not None
    return logits if hooked else logits.gather(1, index[..., None].expand(-1, -1, logits.shape[-1]))


def _memory_on(model, tok, path, d):
    """A memory entry on "Tower is" (spanning the first row's cut at "Tower") and one on "Alice"."""
    mem = install_memory(model, path, 0, 4, 2, d)
    ids = lambda w: tok(w, add_special_tokens=False)["input_ids"][0]  # noqa: E731
    with torch.no_grad():
        mem.ids[0, 0, 0], mem.ids[0, 1, 0] = ids(" is") + 1, ids(" Tower") + 1
        mem.ids[1, 0, 0] = ids("Alice") + 1
        mem.values[:2] = torch.randn(2, d)
    return mem


@pytest.mark.parametrize("with_memory", [False, True])
def test_suffix_logits_and_gradients_equal_the_full_pass(tiny_dir, with_memory):
    model, tok, _ = load_model(str(tiny_dir), device="cpu")
    path, d = _site(model, 0)
    if with_memory:
        _memory_on(model, tok, path, d)
    enc, index, start = _batch(tok)
    sp = SuffixPass.prepare(model, enc["input_ids"], enc["attention_mask"], start, index)
    assert sp is not None
    assert sp.ids.shape[1] < enc["input_ids"].shape[1]  # fewer tokens per step than the full rows
    torch.manual_seed(1)
    add = torch.randn(3, d, requires_grad=True)
    full = _full(model, path, enc, index, start, add)
    (g_full,) = torch.autograd.grad(full.logsumexp(-1).sum(), add)
    rows = torch.tensor([0, 2])  # a subset of the rows, as the fit runs once requests are done
    mine = sp.logits(rows, path, add[rows])
    (g_mine,) = torch.autograd.grad(mine.logsumexp(-1).sum(), add)
    torch.testing.assert_close(mine, full[rows], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_mine[rows], g_full[rows], atol=1e-5, rtol=1e-4)
    assert not bool(g_mine[1].any())


def test_prepare_refuses_a_wanted_position_before_the_start(tiny_llama_dir):
    model, tok, _ = load_model(str(tiny_llama_dir), device="cpu")
    enc, index, start = _batch(tok)
    with pytest.raises(ValueError, match="before"):
        SuffixPass.prepare(model, enc["input_ids"], enc["attention_mask"], start + 10, index)


REQS = [FactRequest("Facts about the Eiffel Tower", " Rome", subject="the Eiffel Tower", target_true=" Paris"),
        FactRequest("Where do people speak music", " English", subject="people", target_true=" French")]


def _fit(model, tok, cfg):
    mem = MemoryEditor(cfg).attach(model)
    torch.manual_seed(0)
    return fit_values(model, tok, mem.path, mem.values.shape[1], REQS, ["{}", "The sky is blue. {}"], cfg)


def test_fit_with_the_suffix_pass_equals_the_fit_with_full_passes(tiny_llama_dir):
    model, tok, _ = load_model(str(tiny_llama_dir), device="cpu")
    cfg = MemoryConfig(layer=0, capacity=8, prefixes=1, steps=30, lr=1.0, nll_stop=0.5)
    fast, slow = _fit(model, tok, cfg), _fit(model, tok, dataclasses.replace(cfg, cache_prefix=False))
    assert fast["steps"].tolist() == slow["steps"].tolist()
    torch.testing.assert_close(fast["values"], slow["values"], atol=1e-4, rtol=1e-4)


def test_a_model_the_check_rejects_runs_full_passes(tiny_llama_dir, monkeypatch):
    model, tok, _ = load_model(str(tiny_llama_dir), device="cpu")
    enc, index, start = _batch(tok)
    monkeypatch.setattr(suffix_mod, "TOLERANCE", -1.0)  # any difference at all (even none) is a mismatch
    assert SuffixPass.prepare(model, enc["input_ids"], enc["attention_mask"], start, index) is None
    cfg = MemoryConfig(layer=0, capacity=8, prefixes=1, steps=30, lr=1.0, nll_stop=0.5)
    monkeypatch.setattr(suffix_mod, "TOLERANCE", 1e-3)
    want = _fit(model, tok, dataclasses.replace(cfg, cache_prefix=False))
    monkeypatch.setattr(suffix_mod, "TOLERANCE", -1.0)
    got = _fit(model, tok, cfg)
    assert got["steps"].tolist() == want["steps"].tolist()
    torch.testing.assert_close(got["values"], want["values"])
