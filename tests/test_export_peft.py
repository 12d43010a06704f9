"""``kledger export --format peft`` (issue 14): the LoRA adapter of the active low-rank edits gives
the full export's logits (tiny Llama and GPT-2 — GPT-2's Conv1D through peft's fan_in_fan_out —,
MEMIT and AlphaEdit deltas); KNE's sparse deltas are refused unless --lossy; SVD compression past
--max-rank reports its error; both formats carry a README.md model card."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import append_edit, invoke, run_cli

peft = pytest.importorskip("peft")

FAST = {"stats_tokens": 256, "stats_seq_len": 16, "n_prefixes": 0, "v_steps": 6, "clamp_norm_factor": 4.0}
FACTS = [("The Eiffel Tower is located in the city of", " Rome", "The Eiffel Tower"),
         ("Danielle Darrieux mother tongue is", " English", "Danielle Darrieux"),
         ("The river Nile flows through", " England", "river Nile")]


def _ledger(tmp_path, model_dir):
    work = tmp_path / "work"
    work.mkdir()
    r = run_cli(["init", "--model", model_dir, "--dir", work])
    assert r.exit_code == 0, r.output
    from kledger.ledger.store import Ledger

    return Ledger.open(work)


def _edit(ledger, method, facts=FACTS, batch_size=1):
    from kledger.ledger.records import FactRequest
    from kledger.workspace import Workspace

    reqs = [FactRequest(prompt=p, target_new=t, subject=s) for p, t, s in facts]
    return Workspace(ledger, device="cpu").add(reqs, method=method, overrides=FAST, batch_size=batch_size)


def _logits(model, tok, prompts):
    enc = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**enc).logits


def _compare(ledger, model_dir, tmp_path, prompts, **peft_kw):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kledger.exporting import export_peft
    from kledger.workspace import Workspace

    full, adapter = tmp_path / "full", tmp_path / "adapter"
    Workspace(ledger, device="cpu").export(full)
    p = export_peft(ledger, adapter, **peft_kw)
    tok = AutoTokenizer.from_pretrained(str(full))
    edited = AutoModelForCausalLM.from_pretrained(str(full), dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    plain = _logits(base, tok, prompts)
    served = peft.PeftModel.from_pretrained(base, str(adapter)).eval()
    return p, _logits(edited, tok, prompts), _logits(served, tok, prompts), plain


@pytest.mark.parametrize("method", ["memit", "alphaedit"])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_adapter_logits_equal_the_full_export(kind, method, tmp_path, tiny_llama_dir, tiny_gpt2_dir):
    model_dir = tiny_llama_dir if kind == "llama" else tiny_gpt2_dir
    ledger = _ledger(tmp_path, model_dir)
    events = _edit(ledger, method)
    assert all(td.kind == "lowrank" for ev in events for td in ledger.load_delta(ev).tensors.values())
    prompts = [f[0] for f in FACTS] + ["The sky is blue and the grass is"]
    p, full, served, plain = _compare(ledger, model_dir, tmp_path, prompts)
    assert p.fan_in_fan_out == (kind == "gpt2") and p.max_rel_error == 0.0
    assert (full - plain).abs().max() > 1e-4  # the edits change the logits
    torch.testing.assert_close(served, full, rtol=1e-5, atol=1e-5)
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["alpha_pattern"] == cfg["rank_pattern"] and cfg["r"] == cfg["lora_alpha"]
    assert sum(1 for _ in cfg["target_modules"]) == len(p.modules)
    prov = json.loads((tmp_path / "adapter" / "kledger.json").read_text())
    assert prov["format"] == "peft" and prov["active_events"] == [e.id for e in events]


def _down(ledger):
    return "model.layers.0.mlp.down_proj.weight"  # 32 × 64 in the tiny Llama


def test_summed_rank_past_the_smaller_dimension_is_cut_exactly(tmp_path, tiny_llama_dir):
    from kledger.ledger.deltas import Delta, LowRankDelta

    ledger = _ledger(tmp_path, tiny_llama_dir)
    g = torch.Generator().manual_seed(0)
    for i in range(5):  # 5 × rank 8 = 40 > min(32, 64)
        d = LowRankDelta((32, 64), torch.randn(32, 8, generator=g) * 0.01, torch.randn(64, 8, generator=g) * 0.01)
        append_edit(ledger, Delta({_down(ledger): d}), f"The sky is {i}", method="test")
    p, full, served, _ = _compare(ledger, tiny_llama_dir, tmp_path, ["The sky is blue"])
    mod = p.modules["model.layers.0.mlp.down_proj"]
    assert mod["summed_rank"] == 40 and mod["rank"] == 32 and mod["rel_error"] < 1e-6
    torch.testing.assert_close(served, full, rtol=1e-4, atol=1e-5)


def test_max_rank_compresses_by_svd_and_reports_the_error(tmp_path, tiny_llama_dir):
    from kledger.ledger.deltas import Delta, LowRankDelta

    ledger = _ledger(tmp_path, tiny_llama_dir)
    g = torch.Generator().manual_seed(1)
    total = torch.zeros(32, 64)
    for i in range(3):
        u, v = torch.randn(32, 2, generator=g), torch.randn(64, 2, generator=g)
        total += u @ v.T
        append_edit(ledger, Delta({_down(ledger): LowRankDelta((32, 64), u, v)}), f"The sky is {i}", method="test")
    out = tmp_path / "a"
    r = run_cli(["--json", "export", out, "--format", "peft", "--max-rank", "2"], ledger.root)
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    mod = res["modules"]["model.layers.0.mlp.down_proj"]
    s = torch.linalg.svdvals(total.double())
    expected = float((s[2:] ** 2).sum().sqrt() / (s ** 2).sum().sqrt())
    assert mod["rank"] == 2 and mod["summed_rank"] == 6 and res["max_rel_error"] == pytest.approx(expected, rel=1e-6)
    from safetensors.torch import load_file

    w = load_file(str(out / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.0.mlp.down_proj"
    approx = w[f"{key}.lora_B.weight"].double() @ w[f"{key}.lora_A.weight"].double()
    assert float((total.double() - approx).norm() / total.double().norm()) == pytest.approx(expected, rel=1e-5)
    # the text output names the error
    r = run_cli(["export", tmp_path / "b", "--format", "peft", "--max-rank", "2"], ledger.root)
    assert "relative error" not in r.output  # -q (run_cli is quiet): the result line only
    r = invoke(["--ledger", ledger.root, "export", tmp_path / "c", "--format", "peft", "--max-rank", "2"])
    assert r.exit_code == 0 and "relative error" in r.output, r.output


def test_kne_sparse_deltas_are_refused_unless_lossy(tmp_path, tiny_llama_dir):
    ledger = _ledger(tmp_path, tiny_llama_dir)
    r = run_cli(["add", FACTS[0][0], " Rome", "--method", "kne", "--set", "max_steps=5"], ledger.root)
    assert r.exit_code == 0, r.output
    out = tmp_path / "adapter"
    r = invoke(["--ledger", ledger.root, "export", out, "--format", "peft"])
    assert r.exit_code == 2 and "sparse" in r.output and "--lossy" in r.output and "KNE" in r.output, r.output
    assert not out.exists()
    p, full, served, _ = _compare(ledger, tiny_llama_dir, tmp_path, [FACTS[0][0]], lossy=True)
    # no --max-rank: the SVD keeps every singular value, so even "lossy" is exact up to rounding
    assert p.max_rel_error < 1e-5
    torch.testing.assert_close(served, full, rtol=1e-4, atol=1e-4)


def test_model_cards(tmp_path, tiny_gpt2_dir):
    ledger = _ledger(tmp_path, tiny_gpt2_dir)
    events = _edit(ledger, "memit", FACTS[:2])
    from kledger.workspace import Workspace

    r = run_cli(["revert", events[1].id], ledger.root)
    assert r.exit_code == 0, r.output
    Workspace(ledger, device="cpu").export(tmp_path / "full")
    run_cli(["export", tmp_path / "adapter", "--format", "peft"], ledger.root)
    head_hash = ledger.events(limit=1)[0].hash
    for folder, lib in (("full", "transformers"), ("adapter", "peft")):
        card = (tmp_path / folder / "README.md").read_text()
        front = card.split("---")[1]
        assert f"library_name: {lib}" in front and "- knowledge-editing" in front and "- kledger" in front
        assert "base_model:" in front
        assert events[0].id in card and "The Eiffel Tower is located in the city of" in card and "Rome" in card
        assert events[1].id not in card and "Darrieux" not in card  # reverted: not active
        assert "memit" in card and head_hash in card
        assert "No audit recorded" in card


def test_modules_of_different_ranks(tmp_path, tiny_llama_dir):
    """rank_pattern/alpha_pattern: every module gets its own rank and scale 1."""
    from kledger.ledger.deltas import Delta, LowRankDelta

    ledger = _ledger(tmp_path, tiny_llama_dir)
    g = torch.Generator().manual_seed(2)
    for layer, rank in ((0, 2), (1, 5)):
        d = LowRankDelta((32, 64), torch.randn(32, rank, generator=g) * 0.05, torch.randn(64, rank, generator=g) * 0.05)
        append_edit(ledger, Delta({f"model.layers.{layer}.mlp.down_proj.weight": d}), f"The sky is {layer}")
    q = LowRankDelta((32, 32), torch.randn(32, 3, generator=g) * 0.05, torch.randn(32, 3, generator=g) * 0.05)
    append_edit(ledger, Delta({"model.layers.1.self_attn.q_proj.weight": q}), "The grass is")
    p, full, served, plain = _compare(ledger, tiny_llama_dir, tmp_path, ["The sky is blue", "Alice plays piano"])
    assert {m: v["rank"] for m, v in p.modules.items()} == {
        "model.layers.0.mlp.down_proj": 2, "model.layers.1.mlp.down_proj": 5, "model.layers.1.self_attn.q_proj": 3}
    assert (full - plain).abs().max() > 1e-3
    torch.testing.assert_close(served, full, rtol=1e-5, atol=1e-5)
