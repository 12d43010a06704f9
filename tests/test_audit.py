"""Drift tracking and audits on tiny models: weight figures against reference calculations, the
probe set, thresholds (a test that fails if thresholds are ignored), blame with a planted
destructive edit, reports, and that audits hold the write lock only for the append."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import pytest
import torch

from kledger import Workspace, init_ledger, workspace
from kledger.editors.base import EditResult, Editor
from kledger.editors.models import load_model
from kledger.editors.sites import sites_for
from kledger import audit as A
from kledger.ledger.compose import materialise
from kledger.ledger.deltas import Delta, DenseDelta, LowRankDelta, SparseDelta
from kledger.audit.drift import DriftTracker, top_singular_value
from kledger.audit.probes import ProbeSet, build_probes, latest_probes_event, load_probes
from kledger.ledger.records import FactRequest
from kledger.ledger.store import Ledger

from conftest import invoke


# --- a test-only editor: a deterministic low-rank delta of a chosen relative size ------------
@dataclass(frozen=True)
class ToyConfig:
    scale: float = 1e-3  # ‖ΔW‖_F / ‖W‖_F
    layer: int = 0
    rank: int = 2


class ToyEditor(Editor):
    name = "toy"
    summary = "test-only random low-rank delta"
    paper = "none"
    config_cls = ToyConfig

    def compute(self, model, tok, requests, ctx):
        out = []
        for r in requests:
            name = sites_for(model).mlp_out_param(self.config.layer)
            w = model.get_parameter(name)
            seed = int(hashlib.sha256(r.prompt.encode()).hexdigest()[:8], 16)
            g = torch.Generator().manual_seed(seed)
            u = torch.randn(w.shape[0], self.config.rank, generator=g)
            v = torch.randn(w.shape[1], self.config.rank, generator=g)
            d = u @ v.T
            k = self.config.scale * float(w.norm()) / float(d.norm())
            out.append(EditResult((r,), Delta({name: LowRankDelta(tuple(w.shape), u * k, v)}), {}, {"toy": True}))
        return out


@pytest.fixture
def toy(monkeypatch):
    from kledger.editors import registry

    monkeypatch.setitem(registry.EDITORS, "toy", ToyEditor)
    return ToyEditor


def _requests(n: int, tag: str = "") -> list[FactRequest]:
    subjects = ["Alice", "Bob", "The Eiffel Tower", "Steve Jobs", "Bill Gates", "Michel Rocard", "Danielle Darrieux",
                "Apple", "Microsoft", "Google", "Amazon", "The Nile", "The Seine", "The Thames"]
    return [FactRequest(prompt=f"{subjects[i % len(subjects)]} is located in the city of {tag}{i}",
                        target_new=" Paris", subject=subjects[i % len(subjects)]) for i in range(n)]


def _run(args, code=0):
    res = invoke(args)
    assert res.exit_code == code, (res.exit_code, res.output, res.exception)
    return res


# --- weight-level drift -----------------------------------------------------------------------
def test_top_singular_value_matches_svd():
    g = torch.Generator().manual_seed(1)
    for shape in [(40, 90), (90, 40), (7,), (3, 4, 5)]:
        w = torch.randn(*shape, generator=g)
        m = w.reshape(w.shape[0], -1) if w.ndim > 1 else w.view(1, -1)
        exact = float(torch.linalg.svdvals(m)[0])
        sv, v = top_singular_value(w)
        assert sv == pytest.approx(exact, rel=1e-4)
        # a warm start from the answer converges at once to the same value
        sv2, _ = top_singular_value(w, v, max_iter=3)
        assert sv2 == pytest.approx(exact, rel=1e-4)


def test_delta_fro_of_every_format_equals_dense_norm():
    g = torch.Generator().manual_seed(2)
    u, v = torch.randn(6, 2, generator=g), torch.randn(5, 2, generator=g)
    sp = SparseDelta((6, 5), torch.tensor([0, 7, 29]), torch.tensor([1.0, -2.0, 0.5]))
    for td in (LowRankDelta((6, 5), u, v), sp, DenseDelta((6, 5), torch.randn(6, 5, generator=g))):
        assert td.fro_norm() == pytest.approx(float(td.to_dense().norm()), rel=1e-5)


@pytest.mark.parametrize("kind", ["lowrank", "sparse", "dense"])
def test_tracker_figures_against_reference(kind):
    g = torch.Generator().manual_seed(3)
    w0 = torch.randn(30, 50, generator=g)
    tr = DriftTracker(lambda name: w0)
    w = w0.clone()
    total = torch.zeros_like(w0)
    for step in range(3):
        if kind == "lowrank":
            d = LowRankDelta((30, 50), torch.randn(30, 1, generator=g) * (step + 1), torch.randn(50, 1, generator=g))
        elif kind == "sparse":
            idx = torch.randperm(1500, generator=g)[:40]
            d = SparseDelta((30, 50), idx, torch.randn(40, generator=g) * (step + 1))
        else:
            d = DenseDelta((30, 50), torch.randn(30, 50, generator=g) * 0.1 * (step + 1))
        f = tr.measure({"w": w}, Delta({"w": d}))["w"]
        total += d.to_dense()
        ref_w = w0 + total
        assert f["delta_fro"] == pytest.approx(float(d.to_dense().norm()), rel=1e-5)
        assert f["cum_rel"] == pytest.approx(float(total.norm() / w0.norm()), rel=1e-5)
        s0 = float(torch.linalg.svdvals(w0)[0])
        s = float(torch.linalg.svdvals(ref_w)[0])
        # warm-started steps stop at a 1e-4 relative change; on these gapless random matrices
        # (sigma2/sigma1 up to 0.97, the worst case) the error measured up to 1.1e-4
        assert f["sv_top"] == pytest.approx(s, rel=5e-4)
        assert f["sv_growth"] == pytest.approx(s / s0, rel=5e-4)
        w = ref_w


def test_workspace_records_drift_with_each_edit(tmp_path, tiny_llama_dir, toy):
    ledger = init_ledger(tmp_path, str(tiny_llama_dir))
    ws = Workspace(ledger, device="cpu")
    evs = ws.add(_requests(3), method="toy", overrides={"scale": 0.05})
    model, _, _ = load_model(str(tiny_llama_dir), "cpu")
    name = sites_for(model).mlp_out_param(0)
    w0 = model.get_parameter(name).detach().clone()
    total = torch.zeros_like(w0)
    for ev in evs:
        d = ledger.load_delta(ev).tensors[name].to_dense()
        total += d
        f = ev.metrics["drift"][name]
        assert f["delta_fro"] == pytest.approx(float(d.norm()), rel=1e-4)
        assert f["cum_rel"] == pytest.approx(float(total.norm() / w0.norm()), rel=1e-4)
        ratio = float(torch.linalg.svdvals(w0 + total)[0] / torch.linalg.svdvals(w0)[0])
        assert f["sv_growth"] == pytest.approx(ratio, rel=1e-3)
        assert ev.metrics["drift_s"] >= 0
    # a second workspace (a new `kledger add`) continues the cumulative figures from the base
    ev4 = Workspace(ledger, device="cpu").add(_requests(1, "x"), method="toy", overrides={"scale": 0.05})[0]
    total += ledger.load_delta(ev4).tensors[name].to_dense()
    assert ev4.metrics["drift"][name]["cum_rel"] == pytest.approx(float(total.norm() / w0.norm()), rel=1e-4)


# --- function-level measurement -----------------------------------------------------------------
def test_measurements_against_reference(tiny_llama_dir):
    model, tok, _ = load_model(str(tiny_llama_dir), "cpu")
    texts = ["The Eiffel Tower is located in the city of Paris .", "Alice plays piano and Bob plays guitar ."]
    prompts = ["The capital of France is", "Bob works as a", "The sky is"]
    vocab = model.config.vocab_size
    probes = build_probes(model, tok, {"texts": texts, "prompts": prompts,
                                       "facts": [("The sky is", " blue")]}, kl_topk=vocab)
    # reference perplexity, one text at a time
    nll, n = 0.0, 0
    for t in texts:
        ids = tok(t, add_special_tokens=False, return_tensors="pt")["input_ids"]
        lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1)
        nll -= float(lp.gather(-1, ids[0, 1:, None]).sum())
        n += ids.shape[1] - 1
    assert probes.base["ppl"] == pytest.approx(torch.tensor(nll / n).exp().item(), rel=1e-4)
    m, _ = A.measure(model, tok, probes)
    assert m["ppl_ratio"] == pytest.approx(1.0, abs=1e-5)
    assert m["kl"] == pytest.approx(0.0, abs=1e-5)
    # perturb the model: with k = vocabulary the stored KL is the exact KL
    name = sites_for(model).mlp_out_param(1)
    p = model.get_parameter(name)
    base_lp = [torch.log_softmax(model(input_ids=tok(q, add_special_tokens=False, return_tensors="pt")
                                       ["input_ids"]).logits[0, -1], -1) for q in prompts]
    with torch.no_grad():
        p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.5)
    new_lp = [torch.log_softmax(model(input_ids=tok(q, add_special_tokens=False, return_tensors="pt")
                                      ["input_ids"]).logits[0, -1], -1) for q in prompts]
    ref_kl = sum(float((b.exp() * (b - q)).sum()) for b, q in zip(base_lp, new_lp)) / len(prompts)
    m2, _ = A.measure(model, tok, probes, parts={"prompts"})
    assert ref_kl > 1e-3 and m2["kl"] == pytest.approx(ref_kl, rel=1e-3)


def test_probe_facts_filtered_to_base_answers_and_round_trip(tiny_llama_dir, tmp_path):
    model, tok, _ = load_model(str(tiny_llama_dir), "cpu")
    qs = ["The Eiffel Tower is located in", "Alice works as a", "Steve Jobs founded"]
    right = A.greedy_answers(model, tok, qs, 1)
    # the base model's own answers are kept; an answer it does not give is dropped
    wrong = [" Nile" if a.strip() != "Nile" else " Seine" for a in right]
    f = tmp_path / "facts.json"
    f.write_text(json.dumps([{"prompt": q, "answer": a} for q, a in zip(qs, right)]
                            + [{"prompt": q, "attribute": w.strip()} for q, w in zip(qs, wrong)]))
    from kledger.audit.probes import load_probe_file

    user = load_probe_file(f)
    probes = build_probes(model, tok, user, n_texts=2, text_tokens=8, fact_margin=0.0)
    assert sorted(probes.facts) == sorted((q, a) for q, a in zip(qs, right) if a.strip())
    # with a margin, only answers that lead the runner-up by that much stay
    holds = A.answers_hold(model, tok, list(zip(qs, right)))
    assert all(ok and m > 0 for ok, _, m in holds)
    cut = sorted(m for _, _, m in holds)[1]
    strict = build_probes(model, tok, user, n_texts=2, text_tokens=8, fact_margin=cut)
    assert sorted(strict.facts) == sorted((q, a) for (q, a), h in zip(zip(qs, right), holds) if h[2] >= cut)
    assert len(strict.facts) == 2
    assert probes.base["facts_offered"] == 6 and probes.source["file_sha256"]
    again = ProbeSet.from_bytes(probes.to_bytes(), expected_sha256=probes.sha256)
    assert again.facts == probes.facts and again.prompts == probes.prompts and again.sha256 == probes.sha256
    assert torch.equal(again.kl_topk_idx, probes.kl_topk_idx)
    # deterministic: built twice, the same object
    assert build_probes(model, tok, user, n_texts=2, text_tokens=8, fact_margin=0.0).sha256 == probes.sha256


# --- the command --------------------------------------------------------------------------------
def _ledger_with_edits(tmp_path, tiny_dir, toy, n_good=6, bad_at=None, bad_scale=30.0):
    ledger = init_ledger(tmp_path, str(tiny_dir))
    ws = Workspace(ledger, device="cpu")
    events, bad = [], None
    for i, r in enumerate(_requests(n_good)):
        if i == bad_at:
            bad = ws.add([FactRequest(prompt="Bill Gates founded the company", target_new=" Apple")], method="toy",
                         overrides={"scale": bad_scale, "layer": 1})[0]
            events.append(bad)
        events.extend(ws.add([r], method="toy", overrides={"scale": 1e-3, "layer": i % 2}))
    return ledger, events, bad


def test_audit_healthy_records_probes_once_and_compares(tmp_path, tiny_llama_dir, toy):
    ledger, events, _ = _ledger_with_edits(tmp_path, tiny_llama_dir, toy, n_good=4)
    d = str(tmp_path)
    # toy edits never make their target the answer: edit retention is off for this ledger
    _run(["--ledger", d, "audit", "--set-threshold", "edit_retention_drop=off"])
    r1 = json.loads(_run(["--ledger", d, "audit", "--json"]).output)
    assert r1["healthy"] and r1["probes"]["recorded_now"] and r1["previous"] is None
    assert r1["metrics"]["active_edits"] == 4 and r1["metrics"]["edits"] == 4
    assert r1["metrics"]["kl"] < 0.1 and r1["thresholds"]["edit_retention_drop"] is None
    import os
    import pathlib

    # the default probe set of this base model is cached for other ledgers, by content
    cached = list((pathlib.Path(os.environ["KLEDGER_CACHE"]) / "probes").glob("default-*.safetensors"))
    assert [ProbeSet.from_bytes(c.read_bytes()).sha256 for c in cached] == [r1["probes"]["sha256"]]
    r2 = json.loads(_run(["--ledger", d, "audit", "--json"]).output)
    assert not r2["probes"]["recorded_now"] and r2["probes"]["sha256"] == r1["probes"]["sha256"]
    assert r2["previous"]["event"] == r1["event"]
    audits = [e for e in ledger.events(types=["audit"])]
    kinds = [e.config["kind"] for e in audits]
    assert kinds.count("probes") == 1 and kinds.count("audit") == 2 and kinds.count("thresholds") == 1
    # audit events do not move the head; the probe object is verified like a delta, no orphans
    assert ledger.head().id == events[-1].id
    rep = ledger.verify()
    assert rep.ok and rep.orphans == [] and rep.objects_checked == len(events) + 1
    pev = latest_probes_event(ledger)
    assert load_probes(ledger, pev).sha256 == pev.delta_sha256


def test_thresholds_are_enforced(tmp_path, tiny_llama_dir, toy):
    """Fails if thresholds are ignored: the same ledger passes or fails only by its thresholds."""
    ledger, _, _ = _ledger_with_edits(tmp_path, tiny_llama_dir, toy, n_good=3, bad_at=1, bad_scale=0.5)
    d = str(tmp_path)
    _run(["--ledger", d, "audit", "--set-threshold", "edit_retention_drop=off"])
    base = json.loads(_run(["--ledger", d, "audit", "--json", "--threshold", "kl=1e9",
                            "--threshold", "ppl_ratio=1e9", "--threshold", "retention_drop=1"]).output)
    kl = base["metrics"]["kl"]
    assert kl > 0
    # a bound just below the measured KL must fail with exit 3, just above must pass
    res = _run(["--ledger", d, "audit", "--json", "--threshold", f"kl={kl * 0.9}", "--threshold", "ppl_ratio=off",
                "--threshold", "retention_drop=off"], code=3)
    assert "kl" in json.loads(res.output[: res.output.rindex("}") + 1])["crossed"]
    _run(["--ledger", d, "audit", "--threshold", f"kl={kl * 1.1}", "--threshold", "ppl_ratio=off",
          "--threshold", "retention_drop=off"], code=0)
    # a recorded threshold is used by later audits; a weight threshold crosses too
    _run(["--ledger", d, "audit", "--set-threshold", f"kl={kl * 0.9}"])
    _run(["--ledger", d, "audit", "--threshold", "ppl_ratio=off", "--threshold", "retention_drop=off"], code=3)
    out = _run(["--ledger", d, "audit", "--threshold", "kl=off", "--threshold", "ppl_ratio=off",
                "--threshold", "retention_drop=off", "--threshold", "sv_growth=1.0001"], code=3).output
    assert "sv_growth" in out and "CROSSED" in out
    th = json.loads(_run(["--ledger", d, "audit", "--show-thresholds", "--json"]).output)["thresholds"]
    assert th["kl"] == pytest.approx(kl * 0.9) and th["edit_retention_drop"] is None
    _run(["--ledger", d, "audit", "--set-threshold", "nonsense=1"], code=2)
    _run(["--ledger", d, "audit", "--set-threshold", "kl=-1"], code=2)


def test_blame_names_planted_edit_and_revert_heals(tmp_path, tiny_llama_dir, toy):
    ledger, events, bad = _ledger_with_edits(tmp_path, tiny_llama_dir, toy, n_good=9, bad_at=5, bad_scale=30.0)
    d = str(tmp_path)
    # a tiny random model's next-token distributions are nearly uniform whatever its weights, so
    # its KL stays small: this ledger records a bound suited to it (toy edits never hold either)
    _run(["--ledger", d, "audit", "--set-threshold", "edit_retention_drop=off", "--set-threshold", "kl=2e-4"])
    res = _run(["--ledger", d, "audit", "--blame", "--report", str(tmp_path / "rep")], code=3)
    assert f"kledger revert {bad.id}" in res.output
    blame_ev = [e for e in ledger.events(types=["audit"]) if e.config["kind"] == "blame"][0]
    assert [c["id"] for c in blame_ev.metrics["culprits"]] == [bad.id] and blame_ev.metrics["fixed"]
    # bisection: about log2(10) midpoints, not one audit per event
    assert len(blame_ev.metrics["steps"]) <= 5
    html = (tmp_path / "rep" / "index.html").read_text()
    assert bad.id in html and "THRESHOLD CROSSED" in html
    assert (tmp_path / "rep" / "kl.png").stat().st_size > 1000
    assert (tmp_path / "rep" / "edit_sv_growth.png").is_file()
    # the suggested revert brings the audit back to healthy
    _run(["--ledger", d, "revert", bad.id])
    ok = json.loads(_run(["--ledger", d, "audit", "--json", "--report", str(tmp_path / "rep2")]).output)
    assert ok["healthy"] and ok["metrics"]["active_edits"] == 9
    assert "HEALTHY" in (tmp_path / "rep2" / "index.html").read_text()


@pytest.mark.parametrize("chunk", [None, 2])
def test_auditor_state_equals_materialise(tmp_path, tiny_gpt2_dir, toy, chunk):
    """Bit-identical, also when the sums run in chunks (and materialise writes and then starts
    from snapshots: chunk 2 here, 2,048 by default)."""
    sums = {"chunk": chunk} if chunk else {}
    ledger, events, _ = _ledger_with_edits(tmp_path, tiny_gpt2_dir, toy, n_good=4)
    model, tok, _ = load_model(str(tiny_gpt2_dir), "cpu")
    probes = build_probes(model, tok, {"texts": ["Alice plays piano ."], "prompts": ["The sky is"],
                                       "facts": [("The sky is", " blue")]})
    aud = A.Auditor(ledger, model, tok, probes, **sums)
    ref, _, _ = load_model(str(tiny_gpt2_dir), "cpu")
    for target in (events[1], events[3], events[0], events[3]):
        aud.set_state(ledger.active(target))
        fresh, _, _ = load_model(str(tiny_gpt2_dir), "cpu")
        materialise(ledger, fresh, target, **sums)
        for (n, p), (_, q) in zip(model.named_parameters(), fresh.named_parameters()):
            assert torch.equal(p, q), n
    if chunk:
        assert list((ledger.cache_dir / "snapshots").glob("*.safetensors"))
    aud.restore()
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert torch.equal(p, q), n


def test_audit_holds_the_lock_only_for_the_append(tmp_path, tiny_llama_dir, toy, monkeypatch):
    ledger, _, _ = _ledger_with_edits(tmp_path, tiny_llama_dir, toy, n_good=2)
    seen = []
    orig = A.Auditor.measure_state

    def spy(self, *a, **k):
        # while measuring, another writer can take the lock at once and readers can read
        other = Ledger(ledger.root)
        with other.write_lock(timeout=0):
            seen.append(other.count())
        return orig(self, *a, **k)

    monkeypatch.setattr(A.Auditor, "measure_state", spy)
    _run(["--ledger", str(tmp_path), "audit", "--threshold", "edit_retention_drop=off"])
    assert seen


def test_edit_retention_counts_edits_that_hold(tmp_path, tiny_llama_dir, toy):
    """An edit whose target is the model's answer holds; one whose target is not, is lost."""
    model, tok, _ = load_model(str(tiny_llama_dir), "cpu")
    cands = ["The Eiffel Tower is located in", "Alice works as a", "Steve Jobs founded", "Bob plays the",
             "The river Nile flows through", "Michel Rocard is a native speaker of", "The sky is"]
    answers = A.greedy_answers(model, tok, cands, 1)
    # targets are normalised to start with a space: use a prompt whose greedy token does
    p1, a1 = next((p, a) for p, a in zip(cands, answers) if a.startswith(" ") and a.strip())
    p2 = next(p for p in cands if p != p1)
    a2 = answers[cands.index(p2)]
    other = next(w for w in (" Nile", " Seine", " Thames") if w != a2)
    ledger = init_ledger(tmp_path, str(tiny_llama_dir))
    ws = Workspace(ledger, device="cpu")
    held = ws.add([FactRequest(prompt=p1, target_new=a1)], method="toy", overrides={"scale": 1e-5})[0]
    lost = ws.add([FactRequest(prompt=p2, target_new=other)], method="toy", overrides={"scale": 1e-5})[0]
    r = json.loads(_run(["--ledger", str(tmp_path), "audit", "--json"], code=0).output)
    assert r["metrics"]["edit_retention"] == 0.5 and r["metrics"]["lost_edits"] == [lost.id]
    assert held.id not in r["metrics"]["lost_edits"]
    _run(["--ledger", str(tmp_path), "audit", "--threshold", "edit_retention_drop=0.4"], code=3)


@pytest.mark.slow
def test_nightly_example_script(tmp_path, tiny_llama_dir):
    """examples/nightly_audit/nightly-audit.sh end to end: exit 3, the blame's fix, a kept report.
    Slow (a subprocess that imports torch: 13 s just to start on the busy test machine)."""
    import os
    import pathlib
    import shutil
    import subprocess
    import sys

    kledger = shutil.which("kledger")
    if kledger is None:
        pytest.skip("the kledger console script is not on PATH")
    ledger = init_ledger(tmp_path, str(tiny_llama_dir))
    model, _, _ = load_model(str(tiny_llama_dir), "cpu")
    name = sites_for(model).mlp_out_param(1)
    w = model.get_parameter(name)
    g = torch.Generator().manual_seed(0)
    ids = []
    for scale in (1e-4, 30.0, 1e-4):
        u, v = torch.randn(w.shape[0], 1, generator=g), torch.randn(w.shape[1], 1, generator=g)
        k = scale * float(w.norm()) / float((u @ v.T).norm())
        ev = ledger.append("add", request={"prompt": "Alice plays the", "target_new": " piano"}, method="hand",
                           delta=Delta({name: LowRankDelta(tuple(w.shape), u * k, v)}))
        ids.append(ev.id)
    A.record_thresholds(ledger, {"edit_retention_drop": None, "kl": 2e-4})  # tiny model: see the blame test
    script = pathlib.Path(__file__).resolve().parents[1] / "examples" / "nightly_audit" / "nightly-audit.sh"
    env = dict(os.environ, KLEDGER_DIR=str(tmp_path), REPORTS=str(tmp_path / "reports"), KLEDGER=kledger,
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    res = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 3, res.stderr
    assert f"kledger revert {ids[1]}" in res.stderr
    latest = tmp_path / "reports" / "latest"
    assert (latest / "index.html").is_file() and json.loads((latest / "audit.json").read_text())["crossed"]


# --- per-edit pulse ------------------------------------------------------------------------------
def test_pulse_matches_audit_on_the_same_subset(tiny_llama_dir):
    model, tok, _ = load_model(str(tiny_llama_dir), "cpu")
    probes = build_probes(model, tok, {"texts": ["Alice plays piano ."], "prompts": ["The sky is", "Bob works as a"],
                                       "facts": [("The sky is", " blue")]}, n_texts=1, text_tokens=8, fact_margin=0.0)
    fig = A.pulse(model, tok, probes)
    assert fig["kl"] == pytest.approx(0.0, abs=1e-6) and fig["prompts"] == 2
    with torch.no_grad():
        p = model.get_parameter(sites_for(model).mlp_out_param(1))
        p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    fig = A.pulse(model, tok, probes)
    full, _ = A.measure(model, tok, probes, parts={"prompts", "facts"})
    assert fig["kl"] == pytest.approx(full["kl"], rel=1e-5) and fig["kl"] > 0
    assert fig["retention_drop"] == pytest.approx(full["retention_drop"])


def test_every_edit_gets_a_pulse_once_probes_are_recorded_and_a_bad_one_warns(tmp_path, tiny_llama_dir, toy, monkeypatch):
    d = str(tmp_path)
    _run(["--ledger", d, "init", "--model", str(tiny_llama_dir), "--dir", d, "--probes", "default"], code=0)
    ledger = Ledger.open(tmp_path)
    assert latest_probes_event(ledger) is not None
    ws = Workspace(ledger, device="cpu")
    good = ws.add(_requests(2), method="toy", overrides={"scale": 1e-4})
    assert all(e.metrics["pulse"]["crossed"] == [] for e in good)
    assert all(e.metrics["pulse"]["kl"] < 1e-3 for e in good)
    # a recorded tight KL bound makes a large edit cross it: the pulse warns at that edit
    A.record_thresholds(ledger, {"kl": 1e-6})
    warned = []
    monkeypatch.setattr(workspace.log, "warning", lambda msg, *a: warned.append(msg % a))
    bad = Workspace(ledger, device="cpu").add(_requests(1, "z"), method="toy", overrides={"scale": 5.0, "layer": 1})[0]
    assert "kl" in bad.metrics["pulse"]["crossed"] and bad.metrics["pulse"]["kl"] > 1e-6
    assert len(warned) == 1 and "collapse warning after this edit: kl" in warned[0]
    # the pulse is on HEAD + the edit: it equals a full measurement of the materialised HEAD's subset
    model, tok, _ = Workspace(ledger, device="cpu").model_at("HEAD")
    probes = load_probes(ledger, latest_probes_event(ledger))
    assert A.pulse(model, tok, probes)["kl"] == pytest.approx(bad.metrics["pulse"]["kl"], rel=1e-4)


def test_init_probes_rejects_a_missing_file(tmp_path, tiny_llama_dir):
    res = _run(["init", "--model", str(tiny_llama_dir), "--dir", str(tmp_path), "--probes", "/nonexistent.json"], code=2)
    assert "--probes: expected 'default' or a probe file" in res.output


def test_guard_refuses_a_crossing_edit_and_appends_nothing(tmp_path, tiny_llama_dir, toy):
    from kledger.ledger.errors import AuditThresholdError

    d = str(tmp_path)
    _run(["--ledger", d, "init", "--model", str(tiny_llama_dir), "--dir", d, "--probes", "default"], code=0)
    ledger = Ledger.open(tmp_path)
    A.record_thresholds(ledger, {"kl": 1e-6})
    n = ledger.count()
    ws = Workspace(ledger, device="cpu", guard=True)
    with pytest.raises(AuditThresholdError) as err:  # a batch of two: neither is appended
        ws.add(_requests(2, "z"), method="toy", overrides={"scale": 5.0, "layer": 1}, batch_size=2)
    assert err.value.exit_code == 3 and "nothing was appended" in str(err.value) and "kl" in str(err.value)
    assert ledger.count() == n
    # the refused deltas left the working model: a harmless edit's pulse is HEAD's again
    ok = ws.add(_requests(1), method="toy", overrides={"scale": 1e-9})[0]
    assert ok.metrics["pulse"]["crossed"] == [] and ledger.count() == n + 1
    # without the guard the same edit is appended (and warned about)
    bad = Workspace(ledger, device="cpu").add(_requests(1, "z"), method="toy", overrides={"scale": 5.0, "layer": 1})[0]
    assert "kl" in bad.metrics["pulse"]["crossed"] and ledger.count() == n + 2


def test_guard_needs_a_probe_set(tmp_path, tiny_llama_dir):
    d = str(tmp_path)
    _run(["--ledger", d, "init", "--model", str(tiny_llama_dir), "--dir", d], code=0)
    res = _run(["--ledger", d, "add", "The Eiffel Tower is located in", " Rome", "--subject", "The Eiffel Tower",
                "--guard"], code=2)
    assert "--guard: expected a probe set" in res.output
    assert Ledger.open(tmp_path).count() == 1


def test_kne_sequences_are_guarded_by_default(tmp_path, tiny_llama_dir):
    """A KNE sequence (several facts) is guarded when the ledger has a probe set; one fact, other
    methods and a ledger without probes are not; --no-guard / --guard always win."""
    import json as _json

    from kledger.editors.registry import editor_class
    from kledger.workspace import default_guard

    d = str(tmp_path)
    _run(["--ledger", d, "init", "--model", str(tiny_llama_dir), "--dir", d], code=0)
    kne, memit = editor_class("kne"), editor_class("memit")
    assert not default_guard(Ledger.open(tmp_path), kne, 3)  # no probe set yet: nothing to guard with
    _run(["--ledger", d, "init", "--model", str(tiny_llama_dir), "--dir", str(tmp_path / "p"), "--probes", "default"],
         code=0)
    ledger = Ledger.open(tmp_path / "p")
    assert default_guard(ledger, kne, 3) and not default_guard(ledger, kne, 1)
    assert not default_guard(ledger, memit, 3)
    # through the CLI: a crossing KNE sequence is refused (exit 3) unless --no-guard
    A.record_thresholds(ledger, {"kl": 1e-9})
    facts = tmp_path / "facts.json"
    facts.write_text(_json.dumps([{"prompt": "The Eiffel Tower is located in", "target_new": "Rome",
                                   "subject": "The Eiffel Tower"},
                                  {"prompt": "Alice plays", "target_new": "piano", "subject": "Alice"}]))
    n = ledger.count()
    fast = ["--set", "max_steps=2"]
    _run(["--ledger", str(tmp_path / "p"), "add", "--from-file", str(facts), "--method", "kne", *fast], code=3)
    assert Ledger.open(tmp_path / "p").count() == n
    _run(["--ledger", str(tmp_path / "p"), "add", "--from-file", str(facts), "--method", "kne", "--no-guard", *fast],
         code=0)
    assert Ledger.open(tmp_path / "p").count() == n + 2
