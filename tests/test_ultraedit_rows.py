"""UltraEdit's rows (``editors/ultraedit_rows.py``): which rows a turn has settled, and ``row_stop``,
which leaves settled rows inside the answer out of the solve (tiny model)."""

from __future__ import annotations

import torch

from kledger.editors.models import load_model
from kledger.editors.sites import sites_for
from kledger.editors.tokens import pair_ids
from kledger.editors.ultraedit import UltraEditConfig, UltraEditEditor
from kledger.editors.ultraedit_rows import features
from kledger.editors.base import EditContext
from kledger.ledger.records import FactRequest

PROMPT, SUBJECT = "Danielle Darrieux mother tongue", "Danielle Darrieux"


def _settled_target(model, tok) -> str:
    """A 3-token target whose 2nd and 3rd tokens are the model's own argmax after the tokens before
    them (teacher-forced), so the two rows inside the answer are settled before any edit."""
    for first in range(3, len(tok)):
        ids, s, _ = pair_ids(tok, PROMPT, tok.decode([first]))
        if ids[s:] != [first]:
            continue
        seq = list(ids)
        for _ in range(2):
            with torch.no_grad():
                seq.append(int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
        text = tok.decode(seq[s:])
        if text.startswith(" ") and pair_ids(tok, PROMPT, text)[0] == seq:  # a request keeps a leading space
            return text
    raise AssertionError("no round-tripping 3-token target found")


def test_settled_rows_are_answer_rows_whose_next_token_is_the_argmax(tiny_llama_dir):
    model, tok, _ = load_model(str(tiny_llama_dir), "cpu")
    target = _settled_target(model, tok)
    req = FactRequest(PROMPT, target, subject=SUBJECT)
    ft = features(model, tok, sites_for(model), [0], [req], with_grad=False, positions="answer")
    assert ft.owners == [0, 0, 0]  # the subject's row, then the rows at the answer's 1st and 2nd tokens
    assert ft.settled == [False, True, True]
    both = features(model, tok, sites_for(model), [0], [req], with_grad=False, positions="both")
    assert len(both.settled) == 4 and both.settled[0] is False and both.settled[2:] == [True, True]


def test_row_stop_leaves_settled_rows_out_of_the_solve(tiny_llama_dir):
    """With ``row_stop`` the first turn writes the subject's row and the prompt-end row only (rank 2 per
    layer, the settled answer rows left out); without it all four rows (rank 4)."""
    model, tok, _ = load_model(str(tiny_llama_dir), "cpu")
    req = FactRequest(PROMPT, _settled_target(model, tok), subject=SUBJECT)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ranks = {}
    for stop in (False, True):
        cfg = UltraEditConfig(lr=2.0, ridge=1e-2, max_turns=1, layers=(0, 1), positions="both", row_stop=stop,
                              preserve_weight=0.0)
        [res] = UltraEditEditor(cfg).compute(model, tok, [req], EditContext())
        ranks[stop] = set(res.ensemble["rank"].values())
    assert ranks == {False: {4}, True: {2}}
    for n, p in model.named_parameters():  # the working copy is restored
        assert torch.equal(p, before[n]), n


def test_context_mean_replaces_each_requests_first_row_by_the_mean_key():
    import pytest

    from kledger.editors.ultraedit_rows import _with_context_mean

    g = torch.Generator().manual_seed(0)
    K = torch.randn(5, 4, generator=g, dtype=torch.float64)
    ctx = torch.randn(3, 2, 4, generator=g)  # 3 requests, 2 prefixes each
    owners = [2, 2, 0, 0, 0]  # request 1 not active this turn
    got = _with_context_mean(K, owners, ctx)
    torch.testing.assert_close(got[0], (K[0] + ctx[2, 0].double() + ctx[2, 1].double()) / 3)
    torch.testing.assert_close(got[2], (K[2] + ctx[0].double().sum(0)) / 3)
    for j in (1, 3, 4):  # rows inside answers are kept as read
        assert torch.equal(got[j], K[j])
    with pytest.raises(ValueError, match="context_mode must be rows, mean or grad"):
        UltraEditConfig(context_mode="sum")


def test_first_weight_weights_the_answers_first_token_in_the_loss(tiny_llama_dir):
    """A request's loss: (w·nll₀ + Σ nll_t) / (w + n − 1) over its target tokens; w = 1 is the plain mean."""
    import pytest

    model, tok, _ = load_model(str(tiny_llama_dir), "cpu")
    req = FactRequest(PROMPT, " Eiffel river the", subject=SUBJECT)
    ids, s, e = pair_ids(tok, PROMPT, req.target_new)
    assert e - s == 3
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    nll = [-float(logp[p, ids[p + 1]]) for p in range(s - 1, e - 1)]
    for w in (1.0, 4.0):
        ft = features(model, tok, sites_for(model), [0], [req], with_grad=False, positions="answer", first_weight=w)
        assert ft.nll[0] == pytest.approx((w * nll[0] + nll[1] + nll[2]) / (w + 2), rel=1e-5)
    with pytest.raises(ValueError, match="first_weight must be > 0"):
        UltraEditConfig(first_weight=0.0)
