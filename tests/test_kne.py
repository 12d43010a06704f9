"""KNE editor on tiny random Llama and GPT-2 models (fast), plus one real-model check (slow)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from kledger.editors.base import EditContext, EditResult, applied, make_config
from kledger.editors.kne import KNEConfig, KNEEditor, candidate_params
from kledger.editors.models import load_model
from kledger.editors.scoring import score_targets, target_logprobs, target_token_accuracy
from kledger.editors.tokens import encode_pairs
from kledger.editors.sites import sites_for
from kledger.ledger.deltas import Delta, SparseDelta
from kledger.ledger.errors import NumericalError, UsageError
from kledger.ledger.records import FactRequest

REQ = FactRequest("The Eiffel Tower is located in the city of", " Rome", subject="The Eiffel Tower",
                  target_true=" Paris")
MULTI = FactRequest("Danielle Darrieux mother tongue is", " German and Spanish", subject="Danielle Darrieux",
                    target_true=" French")

#: a configuration that reliably edits a 2-layer random model (whose subject reaches the last
#: position through one random attention layer: gradients through every position)
STRONG = dict(fraction=0.1, lr=0.05, max_steps=150, stop_margin=0.1, exclude_layers=(), grad_positions="all",
              sink_positions=0)
#: a bare configuration whose one update can be recomputed by hand: no prefixes, no KL rows
BARE = dict(context_prefixes=(), locality_prompts=(), contrast_subjects=(), exclude_layers=(), grad_positions="all",
            sink_positions=0)


@pytest.fixture(scope="module")
def models(tiny_llama_dir, tiny_gpt2_dir):
    return {"llama": load_model(str(tiny_llama_dir), "cpu"), "gpt2": load_model(str(tiny_gpt2_dir), "cpu")}


@pytest.fixture(params=["llama", "gpt2"])
def mt(request, models):
    model, tok, _ = models[request.param]
    return model, tok


def run(model, tok, reqs, **overrides) -> list[EditResult]:
    return KNEEditor(KNEConfig(**overrides)).compute(model, tok, list(reqs), EditContext(seed=0))


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def mean_nll(model, tok, req) -> torch.Tensor:
    enc, spans = encode_pairs(tok, [req.prompt], [req.target_new], "cpu")
    s, e = spans[0]
    return -target_logprobs(model(**enc).logits, enc["input_ids"], spans)[0] / (e - s)


# --- the edit works ----------------------------------------------------------------------------


def test_edit_makes_target_greedy_and_model_unchanged(mt):
    model, tok = mt
    before = state(model)
    (res,) = run(model, tok, [REQ], **STRONG)
    after = state(model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), "compute() left the model changed"
    assert all(not p.requires_grad for p in model.parameters())
    m = res.metrics
    assert m["converged"] and m["steps"] >= 1
    assert m["p_target_after"] > m["p_target_before"]
    base = score_targets(model, tok, [REQ.prompt], [REQ.target_new])
    with applied(model, [res.delta]):
        assert target_token_accuracy(model, tok, [REQ.prompt], [REQ.target_new]) == [1.0]
        edited = score_targets(model, tok, [REQ.prompt], [REQ.target_new])
    assert edited.item() > base.item()
    # the recorded "after" score is what the delta gives when applied (layout and values agree)
    assert math.isclose(m["logp_target_after"], edited.item(), abs_tol=1e-3)
    assert all(torch.equal(before[k], v) for k, v in state(model).items())
    for key in ("steps", "final_nll", "p_target_before", "p_target_after", "p_true_before", "p_true_after",
                "entries_changed", "time_s"):
        assert key in m
    json.dumps(m)


def test_multi_token_target(models):
    model, tok, _ = models["llama"]
    assert len(tok(MULTI.target_new, add_special_tokens=False)["input_ids"]) == 3
    (res,) = run(model, tok, [MULTI], **STRONG)
    with applied(model, [res.delta]):
        assert target_token_accuracy(model, tok, [MULTI.prompt], [MULTI.target_new]) == [1.0]


def test_one_result_per_request_each_from_the_given_model(models):
    model, tok, _ = models["llama"]
    cfg = dict(STRONG, max_steps=3, stop_margin=1e9)
    both = run(model, tok, [REQ, MULTI], **cfg)
    assert [r.requests for r in both] == [(REQ,), (MULTI,)]
    (alone,) = run(model, tok, [MULTI], **cfg)  # not computed on top of the first edit
    for k, td in alone.delta.tensors.items():
        assert torch.equal(td.indices, both[1].delta.tensors[k].indices)
        assert torch.allclose(td.values, both[1].delta.tensors[k].values, atol=1e-6)


def test_request_without_subject_or_true_answer(models):
    model, tok, _ = models["gpt2"]
    req = FactRequest("The city of", " Rome")
    (res,) = run(model, tok, [req], **STRONG)
    assert "p_true_before" not in res.metrics and res.metrics["p_target_after"] > res.metrics["p_target_before"]
    with applied(model, [res.delta]):
        assert target_token_accuracy(model, tok, [req.prompt], [req.target_new]) == [1.0]


# --- ensemble and delta ------------------------------------------------------------------------


def test_delta_touches_only_ensemble_entries_of_candidate_tensors(mt):
    model, tok = mt
    (res,) = run(model, tok, [REQ], **STRONG)
    cands = candidate_params(model)
    sites = sites_for(model)
    expected = {sites.mlp_out_param(l) for l in range(2)} | {n for l in range(2) for n in sites.mlp_in_params(l)}
    assert set(cands) == expected
    assert set(res.delta.tensors) <= set(cands)
    ens = res.ensemble
    assert sum(ens["tensors"][k]["count"] for k in ens["tensors"]) == ens["size"] == ens["budget"]
    for k, td in res.delta.tensors.items():
        assert isinstance(td, SparseDelta) and td.shape == tuple(model.get_parameter(k).shape)
        assert td.indices.numel() == ens["tensors"][k]["count"]  # every ensemble entry, zeros too
        assert torch.equal(td.indices, torch.unique(td.indices))
        top = [i for i, _ in ens["tensors"][k]["top"]]
        assert set(top) <= set(td.indices.tolist())
    # applying the delta changes exactly the listed entries, nothing else in the model
    before = state(model)
    with applied(model, [res.delta]):
        for name, p in model.named_parameters():
            diff = (p.detach() != before[name]).reshape(-1)
            if name not in res.delta.tensors:
                assert not diff.any(), name
                continue
            td = res.delta.tensors[name]
            outside = diff.clone()
            outside[td.indices] = False
            assert not outside.any(), name
            w = before[name].reshape(-1)[td.indices] + td.values
            assert torch.equal(p.detach().reshape(-1)[td.indices], w)
    json.dumps(ens)
    assert len(json.dumps(ens)) < 20_000


def test_threshold_counts(models):
    model, tok, _ = models["llama"]
    # 2 layers × (gate 64×32 + up 64×32 + down 32×64) = 2 × 6144 candidates
    (pl,) = run(model, tok, [REQ], threshold="per_layer", count=101, max_steps=0, exclude_layers=())
    assert pl.ensemble["per_layer"] == {"0": 51, "1": 50}  # each layer its share (largest remainder)
    (pl,) = run(model, tok, [REQ], threshold="per_layer", fraction=0.01, max_steps=0, exclude_layers=())
    assert pl.ensemble["per_layer"] == {"0": 61, "1": 62} or pl.ensemble["per_layer"] == {"0": 62, "1": 61}
    (gl,) = run(model, tok, [REQ], threshold="global", count=101, max_steps=0, exclude_layers=())
    assert gl.ensemble["size"] == 101 == sum(t.nnz for t in gl.delta.tensors.values())
    assert sum(gl.ensemble["per_layer"].values()) == 101
    (gl,) = run(model, tok, [REQ], threshold="global", fraction=0.01, max_steps=0, exclude_layers=())
    assert gl.ensemble["size"] == round(0.01 * 2 * 6144)
    # the default candidates leave out the last layer
    (d,) = run(model, tok, [REQ], count=50, max_steps=0)
    assert set(d.ensemble["per_layer"]) == {"0"} and d.ensemble["candidates"] == 6144


@pytest.mark.parametrize("contrast", [0.0, 2.0])
def test_global_selection_is_top_grad_x_weight_and_first_step_is_masked_adam(models, contrast):
    """Reference calculation: scores |∂L/∂w · w|, the global top-k, and Adam's first update, where
    L = NLL, or NLL − γ·mean NLL after the contrast prompts (the contrast hinge's start gradient)."""
    model, tok, _ = models["llama"]
    k, lr = 300, 0.01
    subjects = ("Alice", "Bob") if contrast else ()
    cfg = dict(BARE, contrast_subjects=subjects, contrast_weight=contrast)
    (res,) = run(model, tok, [REQ], count=k, lr=lr, max_steps=1, stop_margin=1e9, **cfg)
    cands = candidate_params(model, None, ())
    params = [p for _, p in cands.values()]
    for p in params:
        p.requires_grad_(True)
    try:
        loss = mean_nll(model, tok, REQ)
        for s in subjects:
            other = FactRequest(REQ.prompt.replace(REQ.subject, s), REQ.target_new)
            loss = loss - contrast * mean_nll(model, tok, other) / len(subjects)
        grads = torch.autograd.grad(loss, params)
    finally:
        for p in params:
            p.requires_grad_(False)
    names = list(cands)
    scores = torch.cat([(g * p).abs().reshape(-1) for g, p in zip(grads, params)])
    flat_g = torch.cat([g.reshape(-1) for g in grads])
    offsets = torch.tensor([0] + [p.numel() for p in params]).cumsum(0)
    top = set(torch.topk(scores, k).indices.tolist())
    got, values = set(), {}
    for name, td in res.delta.tensors.items():
        off = int(offsets[names.index(name)])
        for i, v in zip(td.indices.tolist(), td.values.tolist()):
            got.add(off + i)
            values[off + i] = v
    assert got == top
    # Adam's first step: -lr · g / (|g| + eps), only at the ensemble entries
    idx = torch.tensor(sorted(got))
    g = flat_g[idx]
    expect = -lr * g / (g.abs() + 1e-8)
    found = torch.tensor([values[i] for i in idx.tolist()])
    assert torch.allclose(found, expect, atol=1e-6)
    assert res.metrics["steps"] == 1 and res.metrics["entries_changed"] == k


def test_integrated_gradients_reference(models):
    model, tok, _ = models["gpt2"]
    m, k = 3, 200
    (res,) = run(model, tok, [REQ], attribution="integrated_gradients", ig_steps=m, count=k, max_steps=0, **BARE)
    cands = candidate_params(model, None, ())
    params = [p for _, p in cands.values()]
    orig = [p.detach().clone() for p in params]
    acc = [torch.zeros_like(p) for p in params]
    try:
        for i in range(1, m + 1):
            with torch.no_grad():
                for p, o in zip(params, orig):
                    p.copy_(o * (i / m))
            for p in params:
                p.requires_grad_(True)
            for a, g in zip(acc, torch.autograd.grad(mean_nll(model, tok, REQ), params)):
                a += g
            for p in params:
                p.requires_grad_(False)
    finally:
        with torch.no_grad():
            for p, o in zip(params, orig):
                p.copy_(o)
    names = list(cands)
    scores = torch.cat([(a * o).abs().reshape(-1) / m for a, o in zip(acc, orig)])
    offsets = torch.tensor([0] + [p.numel() for p in params]).cumsum(0)
    got = {int(offsets[names.index(n)]) + i for n, td in res.delta.tensors.items() for i in td.indices.tolist()}
    assert got == set(torch.topk(scores, k).indices.tolist())
    # the summary's top entries carry the IG scores
    for n, t in res.ensemble["tensors"].items():
        for i, s in t["top"]:
            assert math.isclose(s, float(scores[int(offsets[names.index(n)]) + i]), rel_tol=1e-4)
    # with one step IG is grad × weight
    (a,) = run(model, tok, [REQ], attribution="integrated_gradients", ig_steps=1, count=k, max_steps=0, **BARE)
    (b,) = run(model, tok, [REQ], attribution="grad_x_weight", count=k, max_steps=0, **BARE)
    assert {n: t.indices.tolist() for n, t in a.delta.tensors.items()} == \
        {n: t.indices.tolist() for n, t in b.delta.tensors.items()}


def test_masked_gradient_keeps_everything_outside_the_ensemble(mt):
    """Many steps with KL rows and prefixes: the optimised weights differ from the base only at
    the ensemble entries (checked on the weights the optimiser left, via the delta and a re-run)."""
    model, tok = mt
    (res,) = run(model, tok, [REQ], count=40, lr=0.05, max_steps=10, stop_margin=1e9, exclude_layers=())
    assert res.metrics["steps"] == 10
    assert sum(td.nnz for td in res.delta.tensors.values()) == 40
    assert res.metrics["entries_changed"] <= 40
    assert res.metrics["entries_changed"] > 30  # Adam moves (almost) every ensemble entry
    with applied(model, [res.delta]):
        lp = score_targets(model, tok, [REQ.prompt], [REQ.target_new]).item()
    assert math.isclose(lp, res.metrics["logp_target_after"], abs_tol=1e-3)


def test_gpt2_conv1d_layout(models):
    model, tok, _ = models["gpt2"]
    sites = sites_for(model)
    assert sites.mlp_out_transposed
    (res,) = run(model, tok, [REQ], **STRONG)
    c_proj = {sites.mlp_out_param(l) for l in range(2)}
    c_fc = {n for l in range(2) for n in sites.mlp_in_params(l)}
    assert set(res.delta.tensors) & c_proj and set(res.delta.tensors) & c_fc
    for name, td in res.delta.tensors.items():
        # Conv1D stores in×out: c_fc (n_embd, 4·n_embd), c_proj (4·n_embd, n_embd)
        assert td.shape == (32, 128) if name in c_fc else td.shape == (128, 32)
    # entry (r, c) of the stored weight ↔ flat index r·cols + c; write one c_proj entry by hand
    name = sorted(c_proj & set(res.delta.tensors))[0]
    td = res.delta.tensors[name]
    j = int(td.values.abs().argmax())
    r, c = divmod(int(td.indices[j]), td.shape[1])
    one = Delta({name: SparseDelta(td.shape, td.indices[j:j + 1], td.values[j:j + 1])})
    w = model.get_parameter(name).detach().clone()
    w[r, c] += td.values[j]
    with applied(model, [one]):
        assert torch.equal(model.get_parameter(name).detach(), w)
    # and the whole delta reproduces the edited model's score
    with applied(model, [res.delta]):
        lp = score_targets(model, tok, [REQ.prompt], [REQ.target_new]).item()
    assert math.isclose(lp, res.metrics["logp_target_after"], abs_tol=1e-3)


# --- config and errors -------------------------------------------------------------------------


def test_config_validation_and_overrides():
    cfg = make_config(KNEConfig, {"attribution": "integrated_gradients", "threshold": "per_layer",
                                  "fraction": "0.002", "alpha": "2.0", "layers": "[1, 2]"})
    assert cfg.attribution == "integrated_gradients" and cfg.fraction == 0.002 and cfg.layers == (1, 2)
    for bad in ({"attribution": "random"}, {"threshold": "local"}, {"fraction": "0"}, {"count": "0"},
                {"lr": "-1"}, {"ig_steps": "0"}, {"contrast_weight": "-1"}, {"exclude_layers": "[1.5]"},
                {"optimizer": "sgd"}, {"step_norm": "0"}, {"max_norm": "-1"}):
        with pytest.raises(UsageError):
            make_config(KNEConfig, bad)
    assert KNEEditor.name == "kne" and KNEEditor.paper == "https://arxiv.org/abs/2412.20637"
    from kledger.editors.registry import editor_class

    assert editor_class("kne") is KNEEditor


def test_default_candidates_are_the_early_window_and_all_is_the_papers():
    """window="early" (default): the MLP matrices of sites.early_window's layers (10 layers: 1–4);
    "all": every layer but the excluded last; an explicit ``layers`` list wins over both; events
    recorded before the option are recomputed with every layer (``recorded_defaults``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=10,
                                         num_attention_heads=2, num_key_value_heads=1))
    layers = lambda c: sorted({l for l, _ in c.values()})  # noqa: E731
    cfg = KNEConfig()
    assert cfg.window == "early"
    assert layers(candidate_params(model, cfg.layers, cfg.exclude_layers, cfg.window)) == [1, 2, 3, 4]
    assert layers(candidate_params(model, None, (-1,), "all")) == list(range(9))
    assert layers(candidate_params(model, (7, 8), (-1,), "early")) == [7, 8]
    with pytest.raises(UsageError, match="window"):
        make_config(KNEConfig, {"window": "late"})
    assert KNEEditor.recorded_defaults == {"window": "all"}


def test_bad_layer_is_a_usage_error(models):
    model, tok, _ = models["llama"]
    with pytest.raises(UsageError):
        run(model, tok, [REQ], layers=(5,))
    with pytest.raises(UsageError):
        run(model, tok, [REQ], layers=(1,), exclude_layers=(-1,))


def test_alpha_scaling(models):
    model, tok, _ = models["llama"]
    k = 64
    (plain,) = run(model, tok, [REQ], count=k, lr=0.01, max_steps=1, stop_margin=1e9, **BARE)
    (scaled,) = run(model, tok, [REQ], count=k, lr=0.01, max_steps=1, stop_margin=1e9, alpha=2.0, **BARE)
    for n, td in plain.delta.tensors.items():
        # Adam's first step is scale-free in δ, so the stored update is (α/√n)·(the plain one)
        assert torch.allclose(scaled.delta.tensors[n].values, td.values * 2.0 / math.sqrt(k), atol=1e-7)


def test_normalized_gd_step_and_norm_budget(models):
    model, tok, _ = models["llama"]
    k = 64
    # one normalised step: δ = −step_norm · g/‖g‖ on the ensemble (the masked gradient of the first step)
    (one,) = run(model, tok, [REQ], count=k, optimizer="normalized_gd", step_norm=0.01, max_steps=1,
                 stop_margin=1e9, **BARE)
    (adam,) = run(model, tok, [REQ], count=k, lr=0.01, max_steps=1, stop_margin=1e9, **BARE)
    vals = torch.cat([td.values for td in one.delta.tensors.values()])
    assert float(vals.norm()) == pytest.approx(0.01, rel=1e-4)
    signs = torch.cat([td.values for td in adam.delta.tensors.values()]).sign()  # Adam's first step: −lr·sign(g)
    nz = vals != 0
    assert torch.equal(vals[nz].sign(), signs[nz])
    # the norm budget caps the update after every step
    (capped,) = run(model, tok, [REQ], count=k, lr=0.05, max_steps=5, stop_margin=1e9, max_norm=0.02, **BARE)
    total = torch.cat([td.values for td in capped.delta.tensors.values()])
    assert float(total.norm()) <= 0.02 + 1e-6 and capped.metrics["update_norm"] <= 0.02 + 1e-6


def test_nan_update_raises_and_leaves_model(models, monkeypatch):
    model, tok, _ = models["llama"]
    before = state(model)

    class NaNAdam(torch.optim.Adam):
        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    p.data.fill_(float("nan"))

    monkeypatch.setattr(torch.optim, "Adam", NaNAdam)
    with pytest.raises(NumericalError):
        run(model, tok, [REQ], count=20, max_steps=2, stop_margin=1e9)
    assert all(torch.equal(before[k], v) for k, v in state(model).items())


# --- the real model (slow) ---------------------------------------------------------------------


@pytest.mark.real
@pytest.mark.slow
def test_real_smollm2_eiffel_rome():
    from kledger.editors.scoring import greedy

    model, tok, _ = load_model("smollm2-135m", "cpu")
    (res,) = KNEEditor().compute(model, tok, [REQ], EditContext())
    with applied(model, [res.delta]):
        assert greedy(model, tok, REQ.prompt, 3).startswith(" Rome")
    assert greedy(model, tok, REQ.prompt, 1).startswith(" Paris")


@pytest.mark.parametrize("where,sink", [("subject", 0), ("subject", 1), ("all", 1), ("all", 2)])
def test_gradient_positions_reference(models, where, sink):
    """grad_positions / sink_positions: scores are |∂L/∂w · w| where ∂L/∂w sums only over the
    subject's token positions (or all), minus the first ``sink`` positions (reference: every
    candidate linear layer computed with a detached copy of its weight elsewhere)."""
    import torch.nn.functional as F

    from kledger.editors.locate import subject_token_span

    model, tok, _ = models["llama"]
    k = 200
    (res,) = run(model, tok, [REQ], count=k, lr=0.01, max_steps=1, stop_margin=1e9,
                 **dict(BARE, grad_positions=where, sink_positions=sink))
    a, b = subject_token_span(tok, REQ.prompt, REQ.subject)
    assert (a, b) == (0, 3)  # "The", " Eiffel", " Tower"
    cands = candidate_params(model, None, ())
    params = [p for _, p in cands.values()]
    enc, spans = encode_pairs(tok, [REQ.prompt], [REQ.target_new], "cpu")
    mask = torch.zeros(enc["input_ids"].shape + (1,), dtype=torch.bool)
    if where == "subject":
        mask[0, a:b] = True
    else:
        mask[:] = True
    mask[:, :sink] = False
    handles = []

    def hook(module, inputs, output):
        x = inputs[0]
        return torch.where(mask, F.linear(x, module.weight), F.linear(x, module.weight.detach()))

    for name in cands:
        handles.append(model.get_submodule(name.rsplit(".", 1)[0]).register_forward_hook(hook))
    for p in params:
        p.requires_grad_(True)
    try:
        s, e = spans[0]
        loss = -target_logprobs(model(**enc).logits, enc["input_ids"], spans)[0] / (e - s)
        grads = torch.autograd.grad(loss, params)
    finally:
        for h in handles:
            h.remove()
        for p in params:
            p.requires_grad_(False)
    scores = torch.cat([(g * p).abs().reshape(-1) for g, p in zip(grads, params)])
    offsets = torch.tensor([0] + [p.numel() for p in params]).cumsum(0)
    names = list(cands)
    got = {int(offsets[names.index(n)]) + i for n, td in res.delta.tensors.items() for i in td.indices.tolist()}
    assert got == set(torch.topk(scores, k).indices.tolist())
    # the full-position ensemble is a different one
    (full,) = run(model, tok, [REQ], count=k, lr=0.01, max_steps=1, stop_margin=1e9, **BARE)
    got_full = {int(offsets[names.index(n)]) + i for n, td in full.delta.tensors.items() for i in td.indices.tolist()}
    assert got_full != got
    # and it edits: the target becomes likelier than before (only a little on this 2-layer random
    # model, where the subject reaches the last position through one random attention layer)
    (edit,) = run(model, tok, [REQ], **dict(STRONG, lr=0.01, grad_positions="subject"))
    assert edit.metrics["grad_positions"] == "subject"
    assert edit.metrics["logp_target_after"] > edit.metrics["logp_target_before"] + 0.02


def test_subject_positions_fall_back_to_all_without_a_subject(models):
    model, tok, _ = models["llama"]
    assert KNEConfig().grad_positions == "subject"
    no_subject = FactRequest(REQ.prompt, " Rome")
    (a,) = run(model, tok, [no_subject], count=100, max_steps=1, stop_margin=1e9, **dict(BARE, grad_positions="subject"))
    (b,) = run(model, tok, [no_subject], count=100, max_steps=1, stop_margin=1e9, **BARE)
    assert a.metrics["grad_positions"] == "all"
    assert {n: t.indices.tolist() for n, t in a.delta.tensors.items()} == \
        {n: t.indices.tolist() for n, t in b.delta.tensors.items()}
    with pytest.raises(UsageError, match="grad_positions"):
        KNEConfig(grad_positions="nowhere")
