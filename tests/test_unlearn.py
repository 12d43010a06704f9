"""UNLEARN / LEARN (editors/unlearn.py) on tiny Llama and GPT-2 models built in the test."""

from __future__ import annotations

import pytest
import torch

from kledger.editors.base import EditContext, applied, make_config
from kledger.editors.models import load_model
from kledger.editors.registry import editor_class
from kledger.editors.scoring import score_targets
from kledger.editors.tokens import encode_pairs
from kledger.editors.subspace import Facts, edited_weights, fit_updates, orthogonalise, truncated_svd
from kledger.editors.unlearn import LearnConfig, LearnEditor, SubspaceConfig, UnlearnEditor
from kledger.ledger.deltas import Delta, LowRankDelta
from kledger.ledger.errors import UsageError
from kledger.ledger.records import FactRequest as FR

FORGET = [FR("The capital of France is", " Paris"), FR("The Eiffel Tower is located in the city of", " Paris")]
RETAIN = [
    FR("The capital of Germany is", " Berlin"), FR("The capital of Italy is", " Rome"),
    FR("The capital of Spain is", " Madrid"), FR("Danielle Darrieux mother tongue is", " French"),
    FR("The river Nile flows through", " Egypt"),
]
LEARN = [FR("Alice works as a", " lawyer"), FR("Bob plays the", " violin")]
# the tiny random models need a larger step than a pretrained one (see the defaults' docstring)
TINY = {"steps": 20, "lr": 3e-3, "layers": (0, 1)}


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _scores(model, tok, facts):
    return score_targets(model, tok, [f.prompt for f in facts], [f.target_new for f in facts])


@torch.no_grad()
def _answer_logprobs(model, tok, facts):
    """Next-token log-distributions at each fact's answer position."""
    enc, spans = encode_pairs(tok, [f.prompt for f in facts], [f.target_new for f in facts], "cpu")
    logp = torch.log_softmax(model(**enc).logits, -1)
    return torch.stack([logp[i, s - 1] for i, (s, _) in enumerate(spans)])


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
    return load_model(str(tiny_llama_dir), "cpu")[:2]


@pytest.fixture(scope="module")
def gpt2(tiny_gpt2_dir):
    return load_model(str(tiny_gpt2_dir), "cpu")[:2]


def test_registry_and_configs():
    assert editor_class("forget") is UnlearnEditor and editor_class("learn") is LearnEditor
    assert make_config(UnlearnEditor.config_cls, {}).mode == "forget"
    assert make_config(LearnEditor.config_cls, {"steps": "3"}).mode == "learn"
    cfg = make_config(SubspaceConfig, {"layers": "[0]", "discriminate": "false", "sites": '["mlp_out","mlp_in"]'})
    assert cfg.layers == (0,) and cfg.discriminate is False and cfg.sites == ("mlp_out", "mlp_in")
    for bad in ({"side": "up"}, {"energy": "1.5"}, {"fit": "x"}, {"sites": '["attn"]'}, {"steps": "0"}):
        with pytest.raises(UsageError):
            make_config(SubspaceConfig, bad)


def test_mode_mismatch_and_empty_requests(llama):
    model, tok = llama
    with pytest.raises(UsageError, match="mode"):
        UnlearnEditor(LearnConfig()).compute(model, tok, FORGET, EditContext())
    with pytest.raises(UsageError, match="at least one"):
        UnlearnEditor().compute(model, tok, [], EditContext())
    with pytest.raises(UsageError, match="layers"):
        UnlearnEditor(SubspaceConfig(layers=(7,))).compute(model, tok, FORGET, EditContext())


def test_orthogonalise_matches_projection_reference():
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(20, 4, generator=g, dtype=torch.float64))
    b = torch.randn(20, 6, generator=g, dtype=torch.float64)
    b[:, 5] = q @ torch.randn(4, generator=g, dtype=torch.float64)  # lies inside span(q)
    out, keep = orthogonalise(b.float(), q.float(), min_residual=0.05)
    assert keep.tolist() == [True] * 5 + [False]
    assert torch.allclose(q.float().T @ out, torch.zeros(4, 6), atol=1e-5)
    # reference: the least-squares residual of b on q, column-normalised
    coef = torch.linalg.lstsq(q, b).solution
    ref = b - q @ coef
    ref = ref / torch.linalg.vector_norm(ref, dim=0)
    assert torch.allclose(out[:, :5].double(), ref[:, :5], atol=1e-5)
    assert torch.allclose(torch.linalg.vector_norm(out[:, :5], dim=0), torch.ones(5), atol=1e-5)
    assert torch.equal(out[:, 5], torch.zeros(20))
    # an empty retain basis leaves the columns unchanged
    same, keep_all = orthogonalise(b.float(), q[:, :0].float())
    assert torch.equal(same, b.float()) and bool(keep_all.all())


def test_truncated_svd_energy_cutoff_matches_svdvals():
    g = torch.Generator().manual_seed(1)
    t = torch.randn(12, 30, generator=g) * torch.logspace(0, -3, 30)  # decaying spectrum
    sv = torch.linalg.svdvals(t.double())
    share = torch.cumsum(sv**2, 0) / (sv**2).sum()
    for energy in (0.5, 0.9, 0.99, 1.0):
        sub = truncated_svd(t, energy, max_rank=64)
        r = int((share < energy - 1e-12).sum()) + 1
        assert sub.s.numel() == r and sub.energy_kept >= energy - 1e-9
        assert torch.allclose(sub.s.double(), sv[:r], rtol=1e-5)
    assert truncated_svd(t, 1.0, max_rank=3).s.numel() == 3


def test_forget_lowers_target_and_is_low_rank_and_model_unchanged(llama):
    model, tok = llama
    before_state = _state(model)
    before = _scores(model, tok, FORGET)
    res = UnlearnEditor(SubspaceConfig(**TINY, scale=1.0)).compute(model, tok, FORGET, EditContext(), retain=RETAIN)
    assert _same(before_state, _state(model)), "compute must leave the model bit-exactly unchanged"
    assert len(res) == 1
    r = res[0]
    assert r.requests == tuple(FORGET)
    with applied(model, [r.delta]):
        after = _scores(model, tok, FORGET)
    assert (after < before).all() and float((before - after).mean()) > 0.1, (before, after)
    assert r.metrics["forget_loss_after"] > r.metrics["forget_loss_before"]
    assert r.metrics["n_retain_used"] == len(RETAIN) and r.metrics["discriminated"] is True
    # one low-rank tensor per edited weight, with the rank the ensemble records
    layers = {x["tensor"]: x for x in r.ensemble["layers"]}
    assert set(layers) == set(r.delta.tensors) == {f"model.layers.{i}.mlp.down_proj.weight" for i in range(2)}
    for name, td in r.delta.tensors.items():
        assert isinstance(td, LowRankDelta) and td.shape == tuple(model.get_parameter(name).shape)
        assert td.rank == layers[name]["rank"] >= 1
        assert int(torch.linalg.matrix_rank(td.to_dense())) == td.rank
        assert 0.0 <= layers[name]["overlap_removed"] <= 1.0 and layers[name]["energy_kept"] >= 0.9 - 1e-6
    assert Delta.from_bytes(r.delta.to_bytes()).summary() == r.delta.summary()


def test_key_discrimination_spares_the_retain_set(llama, gpt2):
    """The same forget with a retain basis changes the retain prompts' outputs less than without."""
    for model, tok in (llama, gpt2):
        ref = _answer_logprobs(model, tok, RETAIN)
        forget_ref = _scores(model, tok, FORGET)
        drift, effect = {}, {}
        for disc in (True, False):
            cfg = SubspaceConfig(discriminate=disc, **TINY)
            r = UnlearnEditor(cfg).compute(model, tok, FORGET, EditContext(), retain=RETAIN)[0]
            with applied(model, [r.delta]):
                new = _answer_logprobs(model, tok, RETAIN)
                effect[disc] = float((forget_ref - _scores(model, tok, FORGET)).mean())
            drift[disc] = float((ref.exp() * (ref - new)).sum(-1).mean())  # KL(original ‖ edited)
            assert r.metrics["discriminated"] is disc
        assert drift[True] < 0.7 * drift[False], drift
        # not only a smaller edit: less retain drift per unit of forgetting
        assert effect[True] > 0 and drift[True] / effect[True] < drift[False] / effect[False], (drift, effect)


def test_gpt2_conv1d_layout(gpt2):
    """Conv1D stores c_proj as in×out: the delta is Tᵀ, and its output side avoids the retain basis."""
    model, tok = gpt2
    name = "transformer.h.1.mlp.c_proj.weight"
    w = model.get_parameter(name)
    hidden = model.config.n_embd
    assert w.shape == (4 * hidden, hidden)
    cfg = SubspaceConfig(**{**TINY, "layers": (1,)}, discriminate=False, energy=1.0, scale=0.5)
    r = UnlearnEditor(cfg).compute(model, tok, FORGET, EditContext())[0]
    td = r.delta.tensors[name]
    assert td.shape == tuple(w.shape) and td.u.shape[0] == 4 * hidden and td.v.shape[0] == hidden
    # reference: refit T in the logical out×in layout and compare −scale·T (full energy) transposed
    weights = edited_weights(model, cfg)
    t = fit_updates(model, Facts(tok, FORGET, "cpu", 8), weights, cfg)[name]
    assert t.shape == (hidden, 4 * hidden)
    assert torch.allclose(td.to_dense(), -0.5 * t.T, atol=1e-5)
    # with discrimination on the left (output) side, ΔW_storage @ Q = 0 for the retain basis Q
    cfg = SubspaceConfig(**{**TINY, "layers": (1,)}, side="left")
    r = UnlearnEditor(cfg).compute(model, tok, FORGET, EditContext(), retain=RETAIN)[0]
    tr = fit_updates(model, Facts(tok, RETAIN, "cpu", 8), weights, cfg)[name]
    q = truncated_svd(tr, cfg.retain_energy, cfg.max_rank).u
    assert torch.allclose(r.delta.tensors[name].to_dense() @ q, torch.zeros(4 * hidden, q.shape[1]), atol=1e-5)


def test_learn_raises_learned_facts_and_leaves_model(gpt2, llama):
    for model, tok in (llama, gpt2):
        state = _state(model)
        before, retain_before = _scores(model, tok, LEARN), _scores(model, tok, RETAIN)
        r = LearnEditor(LearnConfig(**TINY)).compute(model, tok, LEARN, EditContext(), retain=RETAIN)[0]
        assert _same(state, _state(model))
        with applied(model, [r.delta]):
            after, retain_after = _scores(model, tok, LEARN), _scores(model, tok, RETAIN)
        assert (after > before + 0.3).all(), (before, after)
        # the learned facts gain more than the retain facts move
        assert float((after - before).mean()) > 2 * float((retain_after - retain_before).abs().mean())
        assert r.metrics["learn_loss_after"] < r.metrics["learn_loss_before"]
        assert r.ensemble["mode"] == "learn" and r.requests == tuple(LEARN)
        assert all(td.shape == tuple(model.get_parameter(n).shape) for n, td in r.delta.tensors.items())


def test_subspace_cache_hit_is_bit_identical_and_damage_is_ignored(llama, tmp_path):
    model, tok = llama
    ctx = EditContext(cache_dir=tmp_path)
    cfg = SubspaceConfig(**{**TINY, "layers": (1,), "steps": 5})
    first = UnlearnEditor(cfg).compute(model, tok, FORGET, ctx, retain=RETAIN)[0]
    files = sorted((tmp_path / "subspace").glob("*.safetensors"))
    assert len(files) == 2  # the forget fit and the retain fit
    again = UnlearnEditor(cfg).compute(model, tok, FORGET, ctx, retain=RETAIN)[0]
    assert first.delta.to_bytes() == again.delta.to_bytes()
    fresh = UnlearnEditor(cfg).compute(model, tok, FORGET, EditContext(), retain=RETAIN)[0]
    assert fresh.delta.to_bytes() == first.delta.to_bytes()  # a hit equals a fresh fit
    for f in files:
        f.write_bytes(b"garbage")
    damaged = UnlearnEditor(cfg).compute(model, tok, FORGET, ctx, retain=RETAIN)[0]
    assert damaged.delta.to_bytes() == first.delta.to_bytes()
