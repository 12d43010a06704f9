"""MEMIT and AlphaEdit (+BLUE) on tiny models: closed forms against references, layouts, state."""

from __future__ import annotations

import pathlib

import pytest
import torch

from kledger.editors.alphaedit import (AlphaEditConfig, AlphaEditEditor, alphaedit_solve, history_keys,
                                       null_space_projector)
from kledger.editors.base import EditContext, applied, make_config
from kledger.editors.driver import memit_solve
from kledger.editors.locate import default_layers, subject_last_index
from kledger.editors.memit import MEMITConfig, MEMITEditor
from kledger.editors.models import load_model
from kledger.editors.registry import editor_class
from kledger.editors.scoring import score_targets
from kledger.editors.sites import sites_for
from kledger.editors.stats import key_covariances
from kledger.ledger.deltas import Delta, accumulate
from kledger.ledger.errors import UsageError
from kledger.ledger.records import FactRequest

EIFFEL = FactRequest(prompt="The Eiffel Tower is located in the city of", target_new="Rome",
                     subject="Eiffel Tower", target_true="Paris")
DARRIEUX = FactRequest(prompt="Danielle Darrieux mother tongue is", target_new="English",
                       subject="Danielle Darrieux", target_true="French")
NILE = FactRequest(prompt="The river Nile flows through", target_new="England", subject="river Nile",
                   target_true="Egypt")
# small and fast: 4-layer models, edits at layers 0-1 (layers above them carry z to the target)
FAST = dict(layers=(0, 1), stats_tokens=512, stats_seq_len=16, n_prefixes=2, prefix_tokens=3, v_steps=12,
            clamp_norm_factor=4.0, v_weight_decay=0.0)


def _build(path: pathlib.Path, kind: str) -> pathlib.Path:
    """A 4-layer tiny model with a larger init (0.2) so that its outputs depend on the edit."""
    from conftest import make_tokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    path.mkdir(parents=True, exist_ok=True)
    _, n = make_tokenizer(path)
    torch.manual_seed(0)
    if kind == "llama":
        cfg = LlamaConfig(vocab_size=n, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=1,
                          eos_token_id=2, bos_token_id=2, tie_word_embeddings=False, initializer_range=0.2)
        LlamaForCausalLM(cfg).save_pretrained(str(path))
    else:
        cfg = GPT2Config(vocab_size=n, n_layer=4, n_embd=32, n_head=4, n_positions=64, pad_token_id=1,
                         eos_token_id=2, bos_token_id=2, initializer_range=0.2)
        GPT2LMHeadModel(cfg).save_pretrained(str(path))
    return path


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def tiny4(request, tmp_path_factory):
    path = _build(tmp_path_factory.mktemp(f"tiny4-{request.param}"), request.param)
    model, tok, info = load_model(str(path), "cpu")
    return model, tok, info


@pytest.fixture(scope="module")
def tiny4_llama(tmp_path_factory):
    path = _build(tmp_path_factory.mktemp("tiny4-llama-only"), "llama")
    return load_model(str(path), "cpu")


def _ctx(info, tmp_path, **kw) -> EditContext:
    return EditContext(fingerprint=info.fingerprint, cache_dir=tmp_path / "cache", **kw)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _dense(delta: Delta) -> dict[str, torch.Tensor]:
    return {k: td.to_dense() for k, td in delta.tensors.items()}


# --- closed forms against reference least-squares solutions ---------------------------------------
def test_memit_closed_form_equals_lstsq():
    g = torch.Generator().manual_seed(0)
    d_in, d_out, n, lam = 12, 5, 3, 2.5
    K = torch.randn(d_in, n, generator=g, dtype=torch.float64)
    R = torch.randn(d_out, n, generator=g, dtype=torch.float64)
    X = torch.randn(d_in, 40, generator=g, dtype=torch.float64)
    C0 = X @ X.T / 40
    dW = R @ memit_solve(K, C0, lam).T
    # min ‖ΔW K − R‖² + λ‖ΔW L‖² with C0 = L Lᵀ, as one stacked least-squares problem for ΔWᵀ
    L = torch.linalg.cholesky(C0)
    A = torch.cat([K.T, lam**0.5 * L.T])
    B = torch.cat([R.T, torch.zeros(d_in, d_out, dtype=torch.float64)])
    ref = torch.linalg.lstsq(A, B).solution.T
    torch.testing.assert_close(dW, ref, rtol=1e-9, atol=1e-10)


def test_alphaedit_closed_form_equals_lstsq():
    g = torch.Generator().manual_seed(1)
    d_in, d_out, n, alpha = 10, 4, 2, 0.7
    X = torch.randn(d_in, 6, generator=g, dtype=torch.float64)  # rank-6 C0 → 4-dim null space
    C0 = X @ X.T / 6
    P, rank = null_space_projector(C0, 1e-8)
    assert rank == 4
    K = torch.randn(d_in, n, generator=g, dtype=torch.float64)
    Kp = torch.randn(d_in, 3, generator=g, dtype=torch.float64)  # earlier edits' keys
    R = torch.randn(d_out, n, generator=g, dtype=torch.float64)
    dW = R @ alphaedit_solve(K, P, Kp @ Kp.T, alpha).T
    # AlphaEdit's objective: min_Δ ‖ΔP K − R‖² + α‖ΔP‖² + ‖ΔP Kp‖²; the update is ΔW = ΔP
    A = torch.cat([(P @ K).T, alpha**0.5 * P, (P @ Kp).T])
    B = torch.cat([R.T, torch.zeros(d_in + 3, d_out, dtype=torch.float64)])
    delta_t = torch.linalg.lstsq(A, B, driver="gelsd").solution
    ref = (P @ delta_t).T
    torch.testing.assert_close(dW, ref, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(dW @ (X / X.norm(dim=0)), torch.zeros(d_out, 6, dtype=torch.float64), atol=1e-10, rtol=0)


def test_history_keys_sums_outer_products():
    K1, K2 = torch.randn(6, 1), torch.randn(6, 2)
    H = history_keys({"states": [{"keys.3": K1}, {"keys.4": torch.randn(6, 1)}, {"keys.3": K2}]}, 3, 6)
    torch.testing.assert_close(H, (K1 @ K1.T + K2 @ K2.T).double())
    assert history_keys({}, 3, 6) is None
    with pytest.raises(UsageError, match="keys.3"):
        history_keys({"states": [{"keys.3": torch.randn(5, 1)}]}, 3, 6)


# --- editors on tiny models -----------------------------------------------------------------------
@pytest.mark.parametrize("cls,cfg_cls", [(MEMITEditor, MEMITConfig), (AlphaEditEditor, AlphaEditConfig)])
def test_edit_raises_target_probability_and_leaves_model_unchanged(tiny4, tmp_path, cls, cfg_cls):
    model, tok, info = tiny4
    # reference setting: one critical layer, no context prefixes (the key is exactly the raw prompt's)
    # and a vanishing ridge term, so the update must write z exactly at the key's position
    # (ΔW k = z − h); the edited model's block output there equals z (and the target gets likelier).
    extra = ({"mom2_weight": 1e-6} if cls is MEMITEditor
             else {"nullspace_threshold": 0.5, "nullspace_relative": True, "l2": 1e-6})
    editor = cls(cfg_cls(**(FAST | {"layers": (1,), "n_prefixes": 0, "kl_factor": 0.0}), **extra))
    before = _state(model)
    reqs = [FactRequest(prompt=EIFFEL.prompt, target_new="Rome", subject="city of"),
            FactRequest(prompt=DARRIEUX.prompt, target_new="English", subject="mother tongue is")]
    results = editor.compute(model, tok, reqs, _ctx(info, tmp_path))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit-exact
    sites = sites_for(model)
    assert len(results) == 2 and [r.requests for r in results] == [(reqs[0],), (reqs[1],)]
    for res in results:
        assert set(res.delta.tensors) == {sites.mlp_out_param(1)}
        for name, td in res.delta.tensors.items():
            assert td.shape == tuple(model.get_parameter(name).shape) and td.rank == 1
        assert res.metrics["v_loss_end"] < res.metrics["v_loss_start"]
        assert res.ensemble["layers"] == [1] and res.metrics["stats_hit"] in (True, False)
    prompts, targets = [r.prompt for r in reqs], [r.target_new for r in reqs]
    lp0 = score_targets(model, tok, prompts, targets)
    with applied(model, [r.delta for r in results]):
        lp1 = score_targets(model, tok, prompts, targets)
    assert (lp1 > lp0 + 0.5).all(), (lp0, lp1)
    from kledger.editors.locate import keys_and_outputs
    from kledger.editors.vstar import compute_z

    Z, _ = compute_z(model, tok, sites, 1, reqs, ["{}"], editor.config)  # deterministic: the editor's z
    _, h0 = keys_and_outputs(model, tok, sites, reqs, ["{}"], [1], 1)
    with applied(model, [r.delta for r in results]):
        _, h1 = keys_and_outputs(model, tok, sites, reqs, ["{}"], [1], 1)
    assert float((Z - h1).norm()) < 1e-4 * float((Z - h0).norm())


def test_multi_layer_edit_moves_the_last_layer_towards_z(tiny4, tmp_path):
    from kledger.editors.locate import keys_and_outputs

    model, tok, info = tiny4
    cfg = MEMITConfig(**(FAST | {"n_prefixes": 0}), mom2_weight=1e-3)
    res = MEMITEditor(cfg).compute(model, tok, [EIFFEL], _ctx(info, tmp_path))[0]
    sites = sites_for(model)
    _, h_before = keys_and_outputs(model, tok, sites, [EIFFEL], ["{}"], [0], 1)
    with applied(model, [res.delta]):
        _, h_after = keys_and_outputs(model, tok, sites, [EIFFEL], ["{}"], [0], 1)
    z_minus_h = res.metrics["residual_norm"]["0"][0] * 2  # layer 0 got half of the whole residual
    assert float((h_after - h_before).norm()) > 0.5 * z_minus_h
    assert res.metrics["residual_norm"]["1"][0] < res.metrics["residual_norm"]["0"][0] * 2


def test_conv1d_delta_is_in_storage_layout(tiny4, tmp_path):
    model, tok, info = tiny4
    res = MEMITEditor(MEMITConfig(**FAST, mom2_weight=1.0)).compute(model, tok, [EIFFEL], _ctx(info, tmp_path))[0]
    sites = sites_for(model)
    name = sites.mlp_out_param(0)
    w = model.get_parameter(name)
    hidden = model.config.hidden_size
    assert w.shape[1 if sites.mlp_out_transposed else 0] == hidden
    td = res.delta.tensors[name]
    # the factor of length `hidden` is the residual R: v for Conv1D (in×out), u for Linear (out×in)
    assert (td.v if sites.mlp_out_transposed else td.u).shape == (hidden, 1)


@pytest.mark.parametrize("cls,cfg_cls", [(MEMITEditor, MEMITConfig), (AlphaEditEditor, AlphaEditConfig)])
def test_blue_touches_exactly_the_two_boundary_layers(tiny4_llama, tmp_path, cls, cfg_cls):
    model, tok, info = tiny4_llama
    extra = {"nullspace_threshold": 0.5, "nullspace_relative": True} if cls is AlphaEditEditor else {}
    cfg = dict(FAST, layers=(0, 1, 2))
    sites = sites_for(model)
    blue = cls(cfg_cls(**cfg, blue=True, **extra)).compute(model, tok, [EIFFEL], _ctx(info, tmp_path))[0]
    plain = cls(cfg_cls(**cfg, **extra)).compute(model, tok, [EIFFEL], _ctx(info, tmp_path))[0]
    assert set(blue.delta.tensors) == {sites.mlp_out_param(0), sites.mlp_out_param(2)}
    assert set(plain.delta.tensors) == {sites.mlp_out_param(l) for l in (0, 1, 2)}
    assert blue.ensemble["z_layers"] == [0, 2] and plain.ensemble["z_layers"] == [2]
    assert set(blue.metrics["v_star"]) == {"0", "2"}


def test_split_batch_shares_sum_to_the_batch_update(tiny4_llama, tmp_path):
    model, tok, info = tiny4_llama
    reqs = [EIFFEL, DARRIEUX, NILE]
    split = MEMITEditor(MEMITConfig(**FAST)).compute(model, tok, reqs, _ctx(info, tmp_path))
    whole = MEMITEditor(MEMITConfig(**FAST, split_batch=False)).compute(model, tok, reqs, _ctx(info, tmp_path))
    assert len(split) == 3 and len(whole) == 1 and whole[0].requests == tuple(reqs)
    params = dict(model.named_parameters())
    summed = accumulate(params, [r.delta for r in split])
    batch = accumulate(params, [whole[0].delta])
    assert set(summed) == set(batch)
    for k in batch:
        assert all(td.rank == 3 for td in whole[0].delta.tensors.values())
        torch.testing.assert_close(summed[k], batch[k], rtol=1e-5, atol=1e-6)


def test_alphaedit_history_is_deterministic_and_matters(tiny4_llama, tmp_path):
    model, tok, info = tiny4_llama
    cfg = AlphaEditConfig(**FAST, nullspace_threshold=0.5, nullspace_relative=True, l2=0.1)
    sites = sites_for(model)
    d_in = model.get_parameter(sites.mlp_out_param(0)).shape[1]

    def sequence(with_history: bool):
        editor = AlphaEditEditor(cfg)
        first = editor.compute(model, tok, [EIFFEL], _ctx(info, tmp_path))[0]
        assert set(first.delta.state) == {"keys.0", "keys.1"}
        assert first.delta.state["keys.0"].shape == (d_in, 1)
        hist = {"states": [dict(first.delta.state)]} if with_history else {}
        with applied(model, [first.delta]):  # sequential: the second edit sees the first
            second = editor.compute(model, tok, [DARRIEUX], _ctx(info, tmp_path, history=hist))[0]
        assert second.ensemble["stats"]["history_events"] == (1 if with_history else 0)
        return first, second

    f1, s1 = sequence(True)
    f2, s2 = sequence(True)
    _, s3 = sequence(False)
    for k in f1.delta.tensors:
        assert torch.equal(f1.delta.tensors[k].u, f2.delta.tensors[k].u)
        assert torch.equal(s1.delta.tensors[k].u, s2.delta.tensors[k].u)
        assert torch.equal(s1.delta.tensors[k].v, s2.delta.tensors[k].v)
    diff = max(float((_dense(s1.delta)[k] - _dense(s3.delta)[k]).abs().max()) for k in s1.delta.tensors)
    assert diff > 1e-6  # the history changes the update
    # state round-trips through the ledger's delta serialisation
    back = Delta.from_bytes(s1.delta.to_bytes())
    assert torch.equal(back.state["keys.1"], s1.delta.state["keys.1"])


def test_alphaedit_update_spares_preserved_keys(tiny4, tmp_path):
    model, tok, info = tiny4
    cfg = AlphaEditConfig(**FAST, nullspace_threshold=0.3, nullspace_relative=True, l2=0.1)
    ctx = _ctx(info, tmp_path)
    res = AlphaEditEditor(cfg).compute(model, tok, [EIFFEL, DARRIEUX], ctx)
    c0, _ = key_covariances(model, tok, [0, 1], ctx, n_tokens=cfg.stats_tokens, seq_len=cfg.stats_seq_len)
    sites = sites_for(model)
    for l in (0, 1):
        evals, evecs = torch.linalg.eigh(c0[l].double())
        kept = evecs[:, evals >= 0.3 * evals.max()]  # the preserved subspace (large eigenvalues)
        assert kept.shape[1] > 0
        dW = sum(_dense(r.delta)[sites.mlp_out_param(l)] for r in res).double()
        if sites.mlp_out_transposed:
            dW = dW.T
        assert float((dW @ kept).norm()) <= 1e-5 * float(dW.norm()) and float(dW.norm()) > 0


def test_subject_is_required(tiny4_llama, tmp_path):
    model, tok, info = tiny4_llama
    req = FactRequest(prompt="The Eiffel Tower is located in the city of", target_new="Rome")
    for cls in (MEMITEditor, AlphaEditEditor):
        with pytest.raises(UsageError, match="subject"):
            cls(cls.config_cls(**FAST)).compute(model, tok, [req], _ctx(info, tmp_path))


def test_layers_out_of_range_and_config_parsing(tiny4_llama, tmp_path):
    model, tok, info = tiny4_llama
    with pytest.raises(UsageError, match=r"critical layers in \[0, 4\)"):
        MEMITEditor(MEMITConfig(**(FAST | {"layers": (0, 9)}))).compute(model, tok, [EIFFEL], _ctx(info, tmp_path))
    cfg = make_config(AlphaEditConfig, {"layers": "[1, 2]", "blue": "true", "l2": "5", "split_batch": "no"})
    assert cfg.layers == (1, 2) and cfg.blue is True and cfg.l2 == 5.0 and cfg.split_batch is False
    with pytest.raises(UsageError):
        make_config(MEMITConfig, {"mom2_weight": "-1"})
    assert editor_class("memit") is MEMITEditor and editor_class("alphaedit") is AlphaEditEditor


def test_default_layers_by_depth():
    assert default_layers(2) == (0, 1)
    assert default_layers(30) == (4, 5, 6, 7, 8)
    assert default_layers(32) == (4, 5, 6, 7, 8)
    assert default_layers(28) == (4, 5, 6, 7, 8)
    assert default_layers(6) == (1, 2, 3, 4, 5)


def test_subject_last_index(tiny4_llama):
    _, tok, _ = tiny4_llama
    text = "The Eiffel Tower is located in"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    i = subject_last_index(tok, text, "Eiffel Tower")
    assert tok.convert_ids_to_tokens(ids[i]) == "ĠTower"
    prefixed = "Alice plays piano . " + text
    j = subject_last_index(tok, prefixed, "Eiffel Tower", len("Alice plays piano . "))
    assert tok.convert_ids_to_tokens(tok(prefixed, add_special_tokens=False)["input_ids"][j]) == "ĠTower"


def test_prefix_cache_gives_the_same_v_star(tiny4):
    from kledger.editors.locate import LocateConfig, context_templates
    from kledger.editors.vstar import compute_z

    model, tok, _ = tiny4
    cfg = LocateConfig(**(FAST | {"v_steps": 4, "n_prefixes": 3, "prefix_tokens": 4, "batch_templates": False}))
    templates = context_templates(model, tok, cfg.n_prefixes, cfg.prefix_tokens, 0)
    sites = sites_for(model)
    for reqs in ([EIFFEL], [EIFFEL, DARRIEUX, NILE]):
        z1, i1 = compute_z(model, tok, sites, 1, reqs, templates, cfg, prefix_cache=True)
        z0, i0 = compute_z(model, tok, sites, 1, reqs, templates, cfg, prefix_cache=False)
        torch.testing.assert_close(z1, z0, rtol=1e-4, atol=1e-4)
        for a, b in zip(i1.losses, i0.losses):
            assert a == pytest.approx(b, rel=1e-4, abs=1e-5)


def test_batched_templates_give_the_same_v_star(tiny4):
    """One padded pass over every template (the default) = one pass per template (with or without
    the prefix cache): same losses, same z."""
    from kledger.editors.locate import LocateConfig, context_templates
    from kledger.editors.vstar import compute_z

    model, tok, _ = tiny4
    base = FAST | {"v_steps": 5, "n_prefixes": 3, "prefix_tokens": 4}
    templates = context_templates(model, tok, 3, 4, 0)
    sites = sites_for(model)
    reqs = [EIFFEL, DARRIEUX, NILE]
    zb, ib = compute_z(model, tok, sites, 1, reqs, templates, LocateConfig(**(base | {"batch_templates": True})))
    for cache in (False, True):
        zs, is_ = compute_z(model, tok, sites, 1, reqs, templates,
                            LocateConfig(**(base | {"batch_templates": False})), prefix_cache=cache)
        torch.testing.assert_close(zb, zs, rtol=1e-4, atol=1e-4)
        for a, b in zip(ib.losses, is_.losses):
            assert a == pytest.approx(b, rel=1e-4, abs=1e-5)


def test_mpes_stops_earlier_and_reaches_the_target(tiny4):
    """MPES stops v* a fixed number of updates after the target became top-1 on every template:
    fewer steps than the NLL-driven loop, a smaller δ, and the target is still the argmax."""
    from kledger.editors.locate import LocateConfig, context_templates
    from kledger.editors.vstar import compute_z

    model, tok, _ = tiny4
    base = FAST | {"v_steps": 25, "v_stop_loss": 1e-3}
    templates = context_templates(model, tok, 2, 3, 0)
    sites = sites_for(model)
    # the subject ends the prompt, so δ at its last token reaches the next-token logits directly
    reqs = [FactRequest(prompt="The Eiffel Tower", target_new="Rome", subject="Eiffel Tower"),
            FactRequest(prompt="Alice plays piano", target_new="guitar", subject="piano")]
    z_full, full = compute_z(model, tok, sites, 1, reqs, templates, LocateConfig(**base))
    z_mp, mp = compute_z(model, tok, sites, 1, reqs, templates, LocateConfig(**(base | {"mpes_steps": 1})))
    assert all(mp.top1), mp.top1
    for i in range(len(reqs)):
        assert len(mp.losses[i]) < len(full.losses[i])
        assert mp.delta_norm[i] < full.delta_norm[i]
    # the stopped z still makes the target the top token at the final layer (raw prompt)
    from kledger.editors.hooks import edit_output
    from kledger.editors.tokens import encode_pairs

    for i, r in enumerate(reqs):
        idx = subject_last_index(tok, r.prompt, r.subject)
        enc, [(p_len, _)] = encode_pairs(tok, [r.prompt], [r.target_new], "cpu")
        ids = enc["input_ids"]
        z = z_mp[:, i].float()

        def put(h, z=z, idx=idx):
            h = h.clone()
            h[0, idx] = z
            return h

        with torch.no_grad(), edit_output(model, sites.layer.format(1), put):
            logits = model(input_ids=ids).logits
        assert int(logits[0, p_len - 1].argmax()) == int(ids[0, p_len])


def test_norm_anchor_keeps_the_unedited_norm(tiny4):
    from kledger.editors.locate import LocateConfig, context_templates
    from kledger.editors.vstar import compute_z

    model, tok, _ = tiny4
    templates = context_templates(model, tok, 2, 3, 0)
    z, info = compute_z(model, tok, sites_for(model), 1, [EIFFEL, NILE], templates,
                        LocateConfig(**(FAST | {"norm_anchor": True})))
    torch.testing.assert_close(z.norm(dim=0).float(), torch.tensor(info.h_norm), rtol=1e-5, atol=1e-5)


def test_norm_penalty_shrinks_the_update_monotonically():
    """ENCORE's ρ‖ΔW‖²_F: ‖R Vᵀ‖ falls as ρ grows, and ρ = 0 is the plain MEMIT solve (vs lstsq)."""
    g = torch.Generator().manual_seed(0)
    K = torch.randn(12, 5, generator=g, dtype=torch.float64)
    X = torch.randn(12, 40, generator=g, dtype=torch.float64)
    C0 = X @ X.T / 40
    R = torch.randn(7, 5, generator=g, dtype=torch.float64)
    norms = [float((R @ memit_solve(K, C0, 0.5, rho).T).norm()) for rho in (0.0, 0.1, 1.0, 10.0, 100.0)]
    assert all(a > b for a, b in zip(norms, norms[1:])), norms
    # reference: ΔW minimises ‖ΔW K − R‖² + λ tr(ΔW C0 ΔWᵀ) + ρ‖ΔW‖² (normal equations via lstsq)
    lam, rho = 0.5, 10.0
    A = lam * C0 + rho * torch.eye(12, dtype=torch.float64)
    L = torch.linalg.cholesky(A)
    big = torch.cat([K.T, L.T])  # rows: keys, then the penalty's square root
    rhs = torch.cat([R.T, torch.zeros(12, 7, dtype=torch.float64)])
    ref = torch.linalg.lstsq(big, rhs).solution.T
    torch.testing.assert_close(R @ memit_solve(K, C0, lam, rho).T, ref, rtol=1e-8, atol=1e-8)
