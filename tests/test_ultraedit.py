"""UltraEdit on tiny models: the ridge closed form against lstsq, per-request shares, the lifelong
normaliser, state kept in the ledger (replay after a restart), and revert --rebase."""

from __future__ import annotations

import json

import pytest
import torch

from kledger.editors.base import EditContext
from kledger.editors.models import load_model
from kledger.editors.scoring import score_targets
from kledger.editors.ultraedit import UltraEditConfig, UltraEditEditor
from kledger.editors.ultraedit_solve import GradStats, _state_stats, history_factor, ridge_factors
from kledger.ledger.deltas import accumulate
from kledger.ledger.records import FactRequest

REQS = [
    FactRequest("The Eiffel Tower is located in the city of", "Rome", subject="The Eiffel Tower", target_true="Paris"),
    FactRequest("Danielle Darrieux mother tongue", "English", subject="Danielle Darrieux", target_true="French"),
    FactRequest("The river Nile flows through", "England", subject="river Nile", target_true="Egypt"),
    FactRequest("Steve Jobs founded", "Microsoft", subject="Steve Jobs", target_true="Apple"),
]
# strong enough to move a tiny random model in one or two turns
CFG = dict(lr=2.0, ridge=1e-2, max_turns=2, facts_weight=0.0)  # the closed forms without the sampled-facts term


def _dense(delta):
    return {k: td.to_dense() for k, td in delta.tensors.items()}


def _assert_shares_sum_to(shares, whole) -> None:
    """The per-request results' dense deltas sum to the one-result (split_batch=False) delta."""
    total = {}
    for r in shares:
        for k, v in _dense(r.delta).items():
            total[k] = total.get(k, 0) + v
    for k, v in _dense(whole.delta).items():
        torch.testing.assert_close(total[k], v, rtol=1e-5, atol=1e-6)


def test_ridge_factors_match_lstsq():
    """ΔWᵀ = argmin ‖K ΔWᵀ − V‖² + μ‖L ΔWᵀ‖² + λ‖ΔWᵀ‖² (H = LᵀL), with and without history."""
    g = torch.Generator().manual_seed(0)
    K = torch.randn(5, 9, generator=g, dtype=torch.float64)
    V = torch.randn(5, 4, generator=g, dtype=torch.float64)
    Lh = torch.randn(7, 9, generator=g, dtype=torch.float64)
    H = Lh.T @ Lh
    for hist, mu in ((None, 0.0), (H, 0.7)):
        lam = 0.3
        rows = [K, (mu ** 0.5) * Lh] if hist is not None else [K]
        big = torch.cat(rows + [lam ** 0.5 * torch.eye(9, dtype=torch.float64)])
        rhs = torch.cat([V] + [torch.zeros(r.shape[0], 4, dtype=torch.float64) for r in rows[1:]]
                        + [torch.zeros(9, 4, dtype=torch.float64)])
        ref = torch.linalg.lstsq(big, rhs).solution  # ΔWᵀ (in × out)
        M = ridge_factors(K, V, lam, hist, mu)
        torch.testing.assert_close(M @ V, ref, rtol=1e-9, atol=1e-9)
        if hist is not None:
            torch.testing.assert_close(ridge_factors(K, V, lam, hist, mu, history_factor(hist, lam, mu)), M)


def test_normaliser_is_defined_for_one_row_and_tends_to_the_running_moments():
    g = torch.Generator().manual_seed(1)
    one = torch.randn(1, 6, generator=g, dtype=torch.float64) * 3
    st = GradStats.of(one)
    z = st.normalise(one, prior=16.0, eps=1e-8)
    assert torch.isfinite(z).all() and float(z.norm()) > 0  # centering one row alone would give 0
    many = torch.randn(40000, 6, generator=g, dtype=torch.float64) * torch.arange(1, 7) + 5
    st = GradStats.of(many)
    z = st.normalise(many, prior=16.0, eps=1e-8)
    torch.testing.assert_close(z.mean(0), torch.zeros(6, dtype=torch.float64), atol=0.02, rtol=0)
    torch.testing.assert_close(z.std(0), torch.ones(6, dtype=torch.float64), atol=0.02, rtol=0)
    # sums of parts = the stats of the whole (what the ledger replays)
    parts = GradStats.of(many[:10000]) + GradStats.of(many[10000:])
    torch.testing.assert_close(parts.sq, st.sq)


@pytest.mark.parametrize("positions", ["target", "both"])
def test_edit_raises_target_and_leaves_model_unchanged(tiny_dir, positions):
    """A single edit (the normaliser's prior keeps one row's direction) raises its target's
    log-probability, and the editor leaves the model it was given bit for bit unchanged."""
    model, tok, _ = load_model(str(tiny_dir), "cpu")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())
    for req in REQS[:2]:
        lp0 = score_targets(model, tok, [req.prompt], [req.target_new])
        [res] = UltraEditEditor(UltraEditConfig(**CFG, positions=positions)).compute(model, tok, [req], EditContext())
        for k, v in model.state_dict().items():
            assert torch.equal(v, before[k]), k
        assert res.delta.tensors
        new = accumulate(params, [res.delta])
        with torch.no_grad():
            for n, t in new.items():
                params[n].copy_(t)
        lp1 = score_targets(model, tok, [req.prompt], [req.target_new])
        model.load_state_dict(before)
        assert (lp1 > lp0).all(), (lp0, lp1)
        layers = res.ensemble["layers"]  # the state the ledger keeps: per layer count, Σg, Σg², keys
        assert {f"gsum.{l}" for l in layers} <= set(res.delta.state)
        assert all(res.delta.state[f"gcount.{l}"].item() >= 1 for l in layers)
        assert all(res.delta.state[f"keys.{l}"].shape[0] == res.delta.tensors[n].shape[1 - int("c_proj" in n)]
                   for l, n in zip(layers, res.ensemble["tensors"]))


def test_shares_sum_to_the_batch_update(tiny_dir):
    model, tok, _ = load_model(str(tiny_dir), "cpu")
    split = UltraEditEditor(UltraEditConfig(**CFG)).compute(model, tok, REQS, EditContext())
    whole = UltraEditEditor(UltraEditConfig(**CFG, split_batch=False)).compute(model, tok, REQS, EditContext())
    assert len(split) == 4 and len(whole) == 1
    _assert_shares_sum_to(split, whole[0])
    for key in whole[0].delta.state:
        if key.startswith("g"):
            torch.testing.assert_close(sum(r.delta.state[key] for r in split), whole[0].delta.state[key])


def _workspace(path, model_dir):
    from kledger import Workspace, init_ledger

    ledger = init_ledger(path, str(model_dir))
    return Workspace(ledger, device="cpu")


def test_state_replayed_from_the_ledger_equals_an_uninterrupted_run(tmp_path, tiny_llama_dir):
    """A sequence continued by a new process ("tomorrow") computes exactly what one uninterrupted
    run computes: the normaliser state is the ledger's events summed in ledger order, and the
    working model after each batch is bit for bit what a fresh process materialises at HEAD."""
    from kledger import Workspace
    from kledger.ledger.store import Ledger

    ws = _workspace(tmp_path / "a", tiny_llama_dir)
    for r in REQS:
        ws.add([r], method="ultraedit", overrides=CFG)
    ws2 = _workspace(tmp_path / "b", tiny_llama_dir)
    ws2.add(REQS[:2], method="ultraedit", overrides=CFG)
    ws3 = Workspace(Ledger.open(tmp_path / "b"), device="cpu")  # a fresh workspace over the same ledger
    ws3.add(REQS[2:], method="ultraedit", overrides=CFG)
    a = [ws.ledger.load_delta(e) for e in ws.ledger.active("HEAD")]
    b = [ws3.ledger.load_delta(e) for e in ws3.ledger.active("HEAD")]
    assert len(a) == len(b) == 4
    for da, db in zip(a, b):
        assert da.state.keys() == db.state.keys()
        for k in da.state:
            assert torch.equal(da.state[k], db.state[k]), k
        for k, td in da.tensors.items():
            assert torch.equal(td.u, db.tensors[k].u) and torch.equal(td.v, db.tensors[k].v), k
    # the running normaliser of the uninterrupted run = the sum replayed from the ledger
    layers = ws.ledger.head().ensemble["layers"]
    for l in layers:
        running = GradStats.zeros(a[0].state[f"gsum.{l}"].numel())
        for d in a:
            running = running + GradStats(d.state[f"gcount.{l}"], d.state[f"gsum.{l}"], d.state[f"gsq.{l}"])
        replayed = _state_stats([dict(d.state) for d in b], l, running.total.numel())
        assert torch.equal(replayed.total, running.total) and torch.equal(replayed.sq, running.sq)


def test_working_model_equals_a_fresh_materialise(tmp_path, tiny_llama_dir):
    ws = _workspace(tmp_path, tiny_llama_dir)
    ws.add(REQS, method="ultraedit", overrides=CFG, batch_size=2)
    live, _ = ws.working()
    fresh, _, _ = ws.model_at("HEAD")
    for (n, p), (_, q) in zip(live.named_parameters(), fresh.named_parameters()):
        assert torch.equal(p, q), n
    # one copy of each event's method state (the key history): in the history cache, not also in the
    # rewrite's delta cache (a 1,000-edit sequence holds gigabytes of keys)
    ids = [e.id for e in ws.ledger.active("HEAD")]
    assert set(ws._deltas) == set(ids) and not any(ws._deltas[i].state for i in ids)
    assert all("keys.0" in ws._states[i] for i in ids)


def test_revert_rebase_equals_a_sequence_without_the_edit(tmp_path, tiny_llama_dir):
    """Revert an UltraEdit event in the middle of a sequence with --rebase: the later edits are
    recomputed with the normaliser state and key history of a sequence that never had it."""
    import json

    from conftest import run_cli

    ws = _workspace(tmp_path / "a", tiny_llama_dir)
    evs = ws.add(REQS, method="ultraedit", overrides=CFG)
    never = _workspace(tmp_path / "b", tiny_llama_dir)
    never.add([r for i, r in enumerate(REQS) if i != 1], method="ultraedit", overrides=CFG)
    r = run_cli(["--json", "--device", "cpu", "revert", evs[1].id, "--rebase"], tmp_path / "a")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output[r.output.index("{"):])
    assert out["recomputed"] == 2
    from kledger import Workspace
    from kledger.ledger.store import Ledger

    got, _, _ = Workspace(Ledger.open(tmp_path / "a"), device="cpu").model_at("HEAD")
    want, _, _ = never.model_at("HEAD")
    changed = 0
    for (n, p), (_, q) in zip(got.named_parameters(), want.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        changed += int("down_proj" in n)
    assert changed
    base, _, _ = never.load_base()
    assert any(not torch.allclose(p, q) for p, q in zip(got.parameters(), base.parameters()))


def test_turns_stop_at_top1_and_an_answered_request_writes_nothing(tiny_llama_dir):
    """MPES applied to turns: a request whose target is already the greedy answer takes no turn and
    writes no weight; otherwise turns stop at the first check that finds the target top-1, and
    ``extra_turns`` adds exactly that many turns after it."""
    model, tok, _ = load_model(str(tiny_llama_dir), "cpu")
    req = REQS[0]
    ids = tok(req.prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        greedy = tok.decode([int(model(ids).logits[0, -1].argmax())])
    if tok(req.prompt + greedy, add_special_tokens=False)["input_ids"][: ids.shape[1] + 1] != \
            ids[0].tolist() + tok(greedy, add_special_tokens=False)["input_ids"][:1]:
        pytest.skip("the greedy token does not round-trip through this tokenizer")
    answered = FactRequest(req.prompt, greedy, subject=req.subject)
    [res] = UltraEditEditor(UltraEditConfig(**CFG)).compute(model, tok, [answered], EditContext())
    assert res.metrics["turns"] == 0 and not res.delta.tensors and res.metrics["top1"]
    cfg = dict(CFG, lr=30.0, max_turns=8, positions="both")  # reaches top-1 in 4–6 turns on the tiny model
    [plain] = UltraEditEditor(UltraEditConfig(**cfg)).compute(model, tok, [REQS[1]], EditContext())
    [extra] = UltraEditEditor(UltraEditConfig(**cfg, extra_turns=1)).compute(model, tok, [REQS[1]], EditContext())
    assert plain.metrics["top1"] and 1 <= plain.metrics["turns"] < 8
    assert extra.metrics["turns"] == plain.metrics["turns"] + 1


def test_answer_positions_are_the_subject_and_the_answer_tokens_that_predict_the_next(tiny_dir):
    """positions="answer": the subject's last token plus the target's own tokens that predict its
    next token (never the prompt's last token); "target" and "both" for comparison."""
    from kledger.editors.locate import subject_last_index
    from kledger.editors.sites import sites_for
    from kledger.editors.tokens import encode_pairs
    from kledger.editors.ultraedit import features

    model, tok, _ = load_model(str(tiny_dir), "cpu")
    req = FactRequest("The Eiffel Tower is located in the city of", " Rome and Milan", subject="The Eiffel Tower")
    _, [(s, e)] = encode_pairs(tok, [req.prompt], [req.target_new], "cpu")
    assert e - s >= 2  # a multi-token answer
    ft = {p: features(model, tok, sites_for(model), (0,), [req], positions=p) for p in ("subject", "target", "both", "answer")}
    assert {p: len(f.owners) for p, f in ft.items()} == {"subject": 1, "target": e - s, "both": e - s + 1, "answer": e - s}
    both, answer = ft["both"].keys[0], ft["answer"].keys[0]  # both: subject, s−1, s, …; answer: subject, s, …
    torch.testing.assert_close(answer, torch.cat([both[:1], both[2:]]), rtol=0, atol=0)
    subj = subject_last_index(tok, req.prompt, req.subject)
    assert subj < s - 1  # the subject ends before the prompt's last token, which "answer" leaves out
    with pytest.raises(ValueError, match="positions must be one of"):
        UltraEditConfig(positions="prompt")


def _reset_peak() -> int | None:
    """Reset the process's peak RSS (Linux ``clear_refs`` 5) and return the current RSS (KiB)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return _peak_kib()
    except OSError:
        return None


def _peak_kib() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))


def test_chol_solve_matches_solve_and_reads_the_factor_in_place():
    """The ridge solve's ``A⁻¹B`` equals ``torch.linalg.solve``, and it allocates no copy of the
    in×in factor (``torch.cholesky_solve`` did: +0.5 GiB a layer on the 1B shape's 8192-wide MLP)."""
    from kledger.editors.ultraedit_solve import chol_solve

    g = torch.Generator().manual_seed(0)
    n = 3072  # a 72 MiB float64 factor
    X = torch.randn(n, n // 2, generator=g, dtype=torch.float64)
    A = X @ X.T / n + torch.eye(n, dtype=torch.float64)
    del X
    L = torch.linalg.cholesky(A)
    B = torch.randn(n, 4, generator=g, dtype=torch.float64)
    torch.testing.assert_close(chol_solve(L, B), torch.linalg.solve(A, B), rtol=1e-9, atol=1e-9)
    start = _reset_peak()
    if start is None:
        pytest.skip("peak RSS cannot be reset on this system")
    chol_solve(L, B)
    grown = (_peak_kib() - start) * 1024
    assert grown < L.numel() * L.element_size() / 4, f"chol_solve grew the peak by {grown / 2**20:.0f} MiB"


def test_features_read_logits_only_where_targets_are_predicted(tiny_dir):
    """The LM head runs only at each row's target-predicting positions (``LogitsAt``); the
    per-request NLL and top-1 flags equal those of the full logits, for targets of unequal length."""
    from kledger.editors.sites import sites_for
    from kledger.editors.tokens import encode_pairs
    from kledger.editors.ultraedit import features

    model, tok, _ = load_model(str(tiny_dir), "cpu")
    reqs = [REQS[0], FactRequest(REQS[1].prompt, " English and French too", subject=REQS[1].subject), REQS[2]]
    ft = features(model, tok, sites_for(model), (0,), reqs, with_grad=False, positions="subject")
    enc, spans = encode_pairs(tok, [r.prompt for r in reqs], [r.target_new for r in reqs], "cpu")
    assert len({e - s for s, e in spans}) > 1
    with torch.no_grad():
        logp = torch.log_softmax(model(**enc).logits.float(), -1)
    for i, (s, e) in enumerate(spans):
        ids = enc["input_ids"][i, s:e]
        lp = logp[i, s - 1:e - 1]
        assert ft.nll[i] == pytest.approx(float(-lp.gather(1, ids[:, None]).mean()), rel=1e-5, abs=1e-6)
        assert ft.top1[i] == bool((lp.argmax(-1) == ids).all())


def test_context_prefix_rows_carry_the_prompt_rows_value(tiny_dir):
    """context_prefixes=m: each request writes 1 + m key rows per layer (its prompt's subject row and
    the subject under m sampled prefixes, the keys keys_and_outputs reads); the shares still sum to
    the batch update, and the update differs from the one without them."""
    from kledger.editors.locate import context_templates, keys_and_outputs
    from kledger.editors.sites import sites_for

    model, tok, _ = load_model(str(tiny_dir), "cpu")
    cfg = UltraEditConfig(**CFG, context_prefixes=2, prefix_tokens=3)
    res = UltraEditEditor(cfg).compute(model, tok, REQS[:2], EditContext())
    layers = res[0].ensemble["layers"]
    templates = context_templates(model, tok, 2, 3, 0)[1:]
    K, _ = keys_and_outputs(model, tok, sites_for(model), REQS[:2], templates, layers, average=False)
    Kavg, _ = keys_and_outputs(model, tok, sites_for(model), REQS[:2], templates, layers)
    for l in layers:
        torch.testing.assert_close(K[l].view(K[l].shape[0], 2, 2).mean(2), Kavg[l])
    for j, r in enumerate(res):
        turns = r.metrics["turns"]
        for l in layers:
            keys = r.delta.state[f"keys.{l}"]
            assert keys.shape[1] == 3 * turns  # per turn: the prompt's row and 2 context rows
            if l == layers[0]:  # the first edited layer's keys come before any edit in the batch
                torch.testing.assert_close(keys[:, 1:3], K[l][:, 2 * j:2 * j + 2].float())
    whole = UltraEditEditor(UltraEditConfig(**CFG, context_prefixes=2, prefix_tokens=3, split_batch=False)
                            ).compute(model, tok, REQS[:2], EditContext())
    _assert_shares_sum_to(res, whole[0])
    plain = UltraEditEditor(UltraEditConfig(**CFG)).compute(model, tok, REQS[:2], EditContext())
    assert plain[0].delta.state[f"keys.{layers[0]}"].shape[1] == plain[0].metrics["turns"]
    assert any(not torch.allclose(v, _dense(plain[0].delta)[k]) for k, v in _dense(res[0].delta).items())
    with pytest.raises(ValueError, match="context_prefixes needs the subject"):
        UltraEditConfig(context_prefixes=1, positions="target")


def test_context_grad_mode_averages_each_rows_gradient_over_the_prefixes_and_adds_no_rows(tiny_dir):
    """context_mode="grad": a row's gradient is the mean of its gradients under the prompt and each
    prefixed prompt (the rows line up: subject row, then the answer's); the keys and their count stay the
    prompt's, and the update differs from the one without prefixes."""
    import dataclasses

    from kledger.editors.locate import context_templates
    from kledger.editors.sites import sites_for
    from kledger.editors.ultraedit_rows import context_grads, features

    model, tok, _ = load_model(str(tiny_dir), "cpu")
    sites, layers, reqs = sites_for(model), [0, 1], REQS[:2]
    templates = context_templates(model, tok, 2, 3, 0)[1:]
    ft = features(model, tok, sites, layers, reqs, positions="answer")
    avg = context_grads(model, tok, sites, layers, reqs, ft, templates, "answer", 1.0)
    each = [features(model, tok, sites, layers, [dataclasses.replace(r, prompt=t.format(r.prompt)) for r in reqs],
                     positions="answer") for t in templates]
    for l in layers:
        want = (ft.grads[l] + sum(f.grads[l] for f in each)) / 3
        torch.testing.assert_close(avg[l], want)
    # the first layer's subject row reaches the answer through attention: the prefixes change its direction
    assert (avg[0] - ft.grads[0]).norm() > 1e-3 * ft.grads[0].norm() > 0
    cfg = UltraEditConfig(**CFG, context_prefixes=2, prefix_tokens=3, context_mode="grad")
    res = UltraEditEditor(cfg).compute(model, tok, reqs, EditContext())
    plain = UltraEditEditor(UltraEditConfig(**CFG)).compute(model, tok, reqs, EditContext())
    first = res[0].ensemble["layers"][0]
    for r, p in zip(res, plain):
        assert r.delta.state[f"keys.{first}"].shape[1] == p.delta.state[f"keys.{first}"].shape[1] * r.metrics["turns"] \
            // p.metrics["turns"]  # the prompt's rows only, as without prefixes
    assert any(not torch.allclose(v, _dense(plain[0].delta)[k]) for k, v in _dense(res[0].delta).items())
    with pytest.raises(ValueError, match="context_mode must be"):
        UltraEditConfig(context_prefixes=1, context_mode="keys")


def test_entity_weight_adds_the_name_key_covariance_to_the_preservation_term(tmp_path, tiny_llama_dir, monkeypatch):
    """entity_weight = λ_e: the solve's factor is that of μH + λ_c C0 + λ_e C_ent + λI (the factor is
    captured and compared with one built from the two covariances), and the ensemble records both."""
    import kledger.editors.ultraedit as U
    from kledger.editors.entitystats import entity_covariances
    from kledger.editors.stats import key_covariances

    model, tok, _ = load_model(str(tiny_llama_dir), "cpu")
    corpus = tmp_path / "c.txt"
    corpus.write_text("Yesterday Alice Smith met Bob Jones in Paris, London and Rome with Carol.\n\n" * 4)
    ctx = EditContext(cache_dir=tmp_path / "cache", stats_corpus=str(corpus))
    cfg = UltraEditConfig(**CFG, layers=(1,), history_weight=0, preserve_weight=3.0, entity_weight=7.0,
                          stats_tokens=128)
    seen = []
    real = U.history_factor
    monkeypatch.setattr(U, "history_factor", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    [res] = UltraEditEditor(cfg).compute(model, tok, [REQS[0]], ctx)
    C0, _ = key_covariances(model, tok, [1], ctx, n_tokens=128)
    Ce, _ = entity_covariances(model, tok, [1], ctx, n_tokens=128)
    A = 3.0 * C0[1].double() + 7.0 * Ce[1].double() + CFG["ridge"] * torch.eye(C0[1].shape[0], dtype=torch.float64)
    torch.testing.assert_close(seen[0] @ seen[0].T, A)
    assert res.ensemble["stats"]["entity"]["tokens"] > 0
    with pytest.raises(ValueError, match="entity_weight and facts_weight must be ≥ 0"):
        UltraEditConfig(entity_weight=-1.0)


def test_facts_weight_adds_the_known_fact_covariance_and_shields_those_keys(tmp_path, tiny_llama_dir, monkeypatch):
    """facts_weight = λ_f with preserve_facts: the factor is that of λ_c C0 + λ_e C_ent + λ_f C_facts + λI,
    and the stronger λ_f, the less the update moves the outputs at the facts' keys."""
    import kledger.editors.ultraedit as U
    from kledger.editors.entitystats import entity_covariances, fact_covariances
    from kledger.editors.hooks import Trace
    from kledger.editors.sites import sites_for
    from kledger.editors.stats import key_covariances

    model, tok, _ = load_model(str(tiny_llama_dir), "cpu")
    corpus = tmp_path / "c.txt"
    corpus.write_text("Yesterday Alice Smith met Bob Jones in Paris, London and Rome with Carol.\n\n" * 4)
    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps([{"prompt": "The Eiffel Tower is in", "attribute": "Paris"},
                                 {"prompt": "Rome is the capital of", "answer": " Italy"}, ["Bob Jones plays", " tennis"]]))
    ctx = EditContext(cache_dir=tmp_path / "cache", stats_corpus=str(corpus))
    seen = []
    real = U.history_factor
    monkeypatch.setattr(U, "history_factor", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    base = dict(CFG, layers=(0,), history_weight=0, preserve_weight=3.0, stats_tokens=128)
    [res] = UltraEditEditor(UltraEditConfig(**dict(base, entity_weight=7.0, facts_weight=11.0),
                                            preserve_facts=str(facts))).compute(model, tok, [REQS[0]], ctx)
    C0, _ = key_covariances(model, tok, [0], ctx, n_tokens=128)
    Ce, _ = entity_covariances(model, tok, [0], ctx, n_tokens=128)
    Cf, desc = fact_covariances(model, tok, [0], ctx, str(facts))
    eye = torch.eye(C0[0].shape[0], dtype=torch.float64)
    A = 3.0 * C0[0].double() + 7.0 * Ce[0].double() + 11.0 * Cf[0].double() + CFG["ridge"] * eye
    torch.testing.assert_close(seen[0] @ seen[0].T, A)
    assert res.ensemble["stats"]["facts"]["facts"] == 3 == desc["facts"]
    # the facts' keys at layer 0 (the subject's row reaches the answer through layer 1's attention), and how far each update moves the outputs there
    site = sites_for(model).mlp_out.format(0)
    with Trace(model, site, retain_input=True, retain_output=False) as t:
        model(input_ids=torch.tensor([tok("Bob Jones plays tennis", add_special_tokens=False)["input_ids"]]))
    K = t.input[0].double()
    moved = []
    for w in (0.0, 1e2, 1e4):
        cfg = dict(base, facts_weight=w, preserve_facts=str(facts) if w else None)
        [r] = UltraEditEditor(UltraEditConfig(**cfg)).compute(model, tok, [REQS[0]], ctx)
        [dW] = [v.double() for v in _dense(r.delta).values()]
        moved.append(float((K @ (dW.T if dW.shape[1] == K.shape[1] else dW)).norm()))
    assert moved[0] > moved[1] > moved[2] and moved[2] < 0.5 * moved[0]
    with pytest.raises(ValueError, match="needs facts_weight > 0"):
        UltraEditConfig(preserve_facts=str(facts), facts_weight=0.0)
    with pytest.raises(ValueError, match="facts_samples must be ≥ 1"):
        UltraEditConfig(facts_weight=1.0, facts_samples=0)
    with pytest.raises(ValueError, match="facts_exclude filters the sampled facts"):
        UltraEditConfig(facts_weight=1.0, preserve_facts=str(facts), facts_exclude=("Paris",))
    with pytest.raises(ValueError, match="non-empty strings"):
        UltraEditConfig(facts_weight=1.0, facts_exclude=("",))
    assert UltraEditConfig(facts_weight=1.0, facts_exclude=["Paris"]).facts_exclude == ("Paris",)



def test_facts_weight_without_a_file_preserves_the_facts_the_model_writes(tmp_path, tiny_llama_dir, monkeypatch):
    """No ``preserve_facts``: C_facts comes from fact sentences sampled from the model (no file, no input digest)."""
    import kledger.editors.ultraedit as U
    from kledger.editors.entitystats import sampled_fact_covariances
    from kledger.editors.stats import key_covariances

    model, tok, _ = load_model(str(tiny_llama_dir), "cpu")
    ctx = EditContext(cache_dir=tmp_path / "cache")
    seen = []
    real = U.history_factor
    monkeypatch.setattr(U, "history_factor", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    cfg = UltraEditConfig(**dict(CFG, layers=(0,), history_weight=0, preserve_weight=3.0, stats_tokens=128,
                                 facts_weight=11.0, facts_samples=1))
    [res] = UltraEditEditor(cfg).compute(model, tok, [REQS[0]], ctx)
    C0, _ = key_covariances(model, tok, [0], ctx, n_tokens=128)
    Cf, desc = sampled_fact_covariances(model, tok, [0], ctx, per_opener=1)
    A = 3.0 * C0[0].double() + 11.0 * Cf[0].double() + CFG["ridge"] * torch.eye(C0[0].shape[0], dtype=torch.float64)
    torch.testing.assert_close(seen[0] @ seen[0].T, A)
    assert res.ensemble["stats"]["facts"]["kind"] == "sampled-facts" == desc["kind"]
    assert res.ensemble["stats"]["facts"]["sample_sha256"] == desc["sample_sha256"]


def test_history_gram_memo_adds_only_new_events_and_matches_a_fresh_sum_bit_for_bit():
    from kledger.editors.ultraedit_solve import GramMemo, _history_keys

    g = torch.Generator().manual_seed(0)
    states = [{"keys.2": torch.randn(6, r, generator=g)} for r in (3, 1, 4, 2)]
    fresh = GramMemo()
    memo = GramMemo()
    expect = torch.zeros(6, 6, dtype=torch.float64)
    for st in states:
        K = st["keys.2"].double()
        expect.addmm_(K, K.T)
    for n in range(1, 5):  # the sequence grows batch by batch: hits after the first call
        got = memo.gram(2, [st["keys.2"] for st in states[:n]], 6)
    assert memo.hits == 3 and torch.equal(got, expect)
    assert torch.equal(got, fresh.gram(2, [s["keys.2"] for s in states], 6))
    torch.testing.assert_close(got, sum(s["keys.2"].double() @ s["keys.2"].double().T for s in states))
    # an event reverted in the middle: not a prefix of what was summed, so summed afresh
    rest = [states[0], states[2], states[3]]
    again = memo.gram(2, [s["keys.2"] for s in rest], 6)
    assert memo.hits == 3 and torch.equal(again, fresh.gram(2, [s["keys.2"] for s in rest], 6))
    # the module's memo behind _history_keys: the same sum, and the caller may modify what it gets
    H = _history_keys(states, 2, 6)
    H.zero_()
    assert torch.equal(_history_keys(states, 2, 6), expect)

def test_early_window_by_depth():
    from kledger.editors.sites import early_window

    assert early_window(2) == (0, 1)
    assert early_window(4) == (0, 1, 2, 3)
    assert early_window(30) == (3, 4, 5, 6)  # SmolLM2-135M (bench/results/lifelong.md)
    assert early_window(32) == (3, 4, 5, 6)
    assert early_window(16) == (2, 3, 4, 5)
    assert early_window(5) == (1, 2, 3, 4)


def test_step_growth_scales_each_turn_by_the_requests_turn_count(tiny_llama_dir):
    """step_growth g: the t-th turn's value rows are g^t times those of g = 1 (same first turn; the
    second turn of a request that is not done yet writes g× the step, from the same state)."""
    model, tok, _ = load_model(str(tiny_llama_dir), "cpu")
    cfg = dict(CFG, max_turns=1)
    [one] = UltraEditEditor(UltraEditConfig(**cfg)).compute(model, tok, [REQS[1]], EditContext())
    [grown] = UltraEditEditor(UltraEditConfig(**cfg, step_growth=3.0)).compute(model, tok, [REQS[1]], EditContext())
    for k, v in _dense(one.delta).items():  # turn 0: g^0 = 1
        torch.testing.assert_close(_dense(grown.delta)[k], v)
    two = dict(CFG, max_turns=2)
    [a] = UltraEditEditor(UltraEditConfig(**two)).compute(model, tok, [REQS[1]], EditContext())
    [b] = UltraEditEditor(UltraEditConfig(**two, step_growth=3.0)).compute(model, tok, [REQS[1]], EditContext())
    assert a.metrics["turns"] == b.metrics["turns"] == 2
    name = next(iter(a.delta.tensors))
    ua, ub = a.delta.tensors[name], b.delta.tensors[name]
    out_a, out_b = ua.u, ub.u  # Llama's down_proj: u holds the value side (out × turns); turn 1 is 3×
    torch.testing.assert_close(out_b[:, 0], out_a[:, 0])
    torch.testing.assert_close(out_b[:, 1], 3.0 * out_a[:, 1], rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="step_growth must be ≥ 1"):
        UltraEditConfig(step_growth=0.5)


def test_final_history_keys_keep_one_turn_of_rows_per_request(tiny_llama_dir):
    """history_keys="final": an event's keys.<l> are the rows of its request's last turn (the same
    first columns' count as one turn of "turns", which keeps every turn's); the update is the same."""
    model, tok, _ = load_model(str(tiny_llama_dir), "cpu")
    cfg = dict(CFG, max_turns=3)
    [every] = UltraEditEditor(UltraEditConfig(**cfg)).compute(model, tok, [REQS[1]], EditContext())
    final_cfg = UltraEditConfig(**cfg, history_keys="final")
    [final] = UltraEditEditor(final_cfg).compute(model, tok, [REQS[1]], EditContext())
    turns = every.metrics["turns"]
    assert turns == final.metrics["turns"] >= 2
    for k, v in _dense(every.delta).items():
        torch.testing.assert_close(_dense(final.delta)[k], v)
    for name, K in every.delta.state.items():
        if name.startswith("keys."):
            rows = K.shape[1] // turns
            assert K.shape[1] == turns * rows and final.delta.state[name].shape == (K.shape[0], rows)
            torch.testing.assert_close(final.delta.state[name], K[:, -rows:])
    with pytest.raises(ValueError, match="history_keys must be turns or final"):
        UltraEditConfig(history_keys="last")
    with pytest.raises(ValueError, match="row_stop"):
        UltraEditConfig(history_keys="final", row_stop=True)
