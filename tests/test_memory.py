"""The token-gated edit memory (``--method memory``): placement, the gate, edits through the
ledger (bit-for-bit replay in a fresh process, revert, revert --rebase) and what it refuses."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_cli
from kledger.editors.base import EditContext
from kledger.editors.gate import GatedMemory, install_memory, memory_off
from kledger.editors.memory import MemoryConfig, MemoryEditor, _site, place, span_ids
from kledger.editors.models import load_model
from kledger.editors.scoring import score_targets
from kledger.ledger.errors import UsageError
from kledger.ledger.records import FactRequest

# prompts that end with their subject: on a 2-layer random model a value added at the subject's last
# token moves the next-token logits directly (a value at an earlier token needs layers above it)
REQS = [
    FactRequest("Facts about the Eiffel Tower", " Rome", subject="the Eiffel Tower", target_true=" Paris"),
    FactRequest("Facts about Danielle Darrieux", " English", subject="Danielle Darrieux", target_true=" French"),
    FactRequest("Facts about the river Nile", " England", subject="the river Nile", target_true=" Egypt"),
]
CFG = dict(layer=1, capacity=8, prefixes=1, steps=40, lr=1.0, nll_stop=0.5)


def _workspace(path, model_dir):
    from kledger import Workspace, init_ledger

    return Workspace(init_ledger(path, str(model_dir)), device="cpu")


def _memory(entries, span=3, d=1):
    """A GatedMemory holding ``entries``: (slot, [[ids of the last token], [ids of the one before], …], value)."""
    mem = GatedMemory(4, span, d)
    with torch.no_grad():
        for slot, positions, value in entries:
            for j, spellings in enumerate(positions):
                for v, tid in enumerate(spellings):
                    mem.ids[slot, j, v] = tid + 1
            mem.values[slot] = value
    return mem


def _entry(*positions, span=3):
    e = torch.zeros(span, 2)
    for j, spellings in enumerate(positions):
        for v, tid in enumerate(spellings):
            e[j, v] = tid + 1
    return e


def test_place_reuses_the_entry_with_the_same_span_in_either_spelling_else_a_free_slot():
    mem = _memory([(1, [[7], [5, 6]], 20.0)])
    assert place(mem.ids, _entry([7], [6])) == (1, True)  # the other spelling of the earlier token
    assert place(mem.ids, _entry([7])) == (0, False)  # a shorter span is another subject
    assert place(mem.ids, _entry([7], [5], [9])) == (0, False)
    full = _memory([(s, [[s]], 1.0) for s in range(4)])
    with pytest.raises(UsageError, match="free slot"):
        place(full.ids, _entry([9]))


def test_span_ids_keep_the_contexts_spellings_and_the_span_all_contexts_have():
    ids = [[5, 6, 7, 8], [1, 2, 16, 7, 8]]  # the subject "6 7" / "16 7" (after other text), then a token
    out = span_ids(ids, [(1, 3), (2, 4)], 3)
    assert out.tolist() == [[8.0, 0.0], [7.0, 17.0], [0.0, 0.0]]


def test_gate_fires_on_the_whole_span_and_the_longest_match_wins():
    mem = _memory([(0, [[3]], 10.0),  # one-token subject "3"
                   (1, [[3], [2, 12]], 20.0),  # two tokens "2 3" (or "12 3")
                   (2, [[4], [8], [9]], 30.0)])  # three tokens "9 8 4"
    mem.read_tokens(None, (torch.tensor([[1, 3, 2, 3, 12, 3, 8, 4, 9, 8, 4]]),))
    out = mem.gate(None, (None,), torch.zeros(1, 11, 1))
    assert out[0, :, 0].tolist() == [0, 10, 0, 20, 0, 20, 0, 0, 0, 0, 30]
    # the ids are used once: a later pass without them (inputs_embeds) sees no entry
    assert mem.gate(None, (None,), torch.zeros(1, 11, 1)) is None
    mem.read_tokens(None, (torch.tensor([[2, 3]]),))
    mem.enabled = False
    assert mem.gate(None, (None,), torch.zeros(1, 2, 1)) is None


def test_install_memory_refuses_another_shape(tiny_llama_dir):
    model, _, _ = load_model(str(tiny_llama_dir), "cpu")
    path, d_out = _site(model, 1)
    mem = install_memory(model, path, 1, 8, 2, d_out)
    assert install_memory(model, path, 1, 8, 2, d_out) is mem
    assert "kledger_memory.1.ids" in dict(model.named_parameters())
    with pytest.raises(UsageError, match="capacity"):
        install_memory(model, path, 1, 16, 2, d_out)
    with pytest.raises(ValueError, match="span"):
        MemoryConfig(span=0)


def test_an_entry_moves_its_prompt_and_leaves_other_inputs_bit_for_bit(tiny_llama_dir):
    model, tok, _ = load_model(str(tiny_llama_dir), "cpu")
    other = ["The weather today is", "Numbers: 1 2 3"]
    ids = tok(other[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        before = model(ids).logits
    new0 = score_targets(model, tok, [r.prompt for r in REQS], [r.target_new for r in REQS])
    results = MemoryEditor(MemoryConfig(**CFG)).compute(model, tok, REQS, EditContext())
    assert [r.ensemble["slot"] for r in results] == [0, 1, 2]
    assert all(not p.requires_grad for n, p in model.named_parameters() if "memory" not in n)
    from kledger.ledger.compose import apply_deltas

    apply_deltas(model, [r.delta for r in results])
    new1 = score_targets(model, tok, [r.prompt for r in REQS], [r.target_new for r in REQS])
    # a random 2-layer model caps what one vector can do to its logits (~0.3–0.4 nats here)
    assert bool((new1 > new0 + 0.25).all()), (new0, new1)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)  # it names no edited subject
        with memory_off(model):
            off = score_targets(model, tok, [r.prompt for r in REQS], [r.target_new for r in REQS])
    torch.testing.assert_close(off, new0)


def test_working_model_equals_a_fresh_process_and_revert_drops_the_entry(tmp_path, tiny_llama_dir):
    from kledger import Workspace
    from kledger.ledger.store import Ledger

    ws = _workspace(tmp_path, tiny_llama_dir)
    evs = ws.add(REQS, method="memory", overrides=CFG, batch_size=2)
    live, tok = ws.working()
    fresh, _, _ = Workspace(Ledger.open(tmp_path), device="cpu").model_at("HEAD")
    for (n, p), (m, q) in zip(live.named_parameters(), fresh.named_parameters()):
        assert n == m and torch.equal(p, q), n
    mem = fresh.kledger_memory["1"]
    assert int((mem.ids[:, 0, 0] > 0).sum()) == 3
    ws.revert(evs[1].id)
    live, _ = ws.working()
    mem = live.kledger_memory["1"]
    assert not bool(mem.ids[1].any()) and not bool(mem.values[1].any())
    assert int((mem.ids[:, 0, 0] > 0).sum()) == 2
    # a later entry takes the freed slot
    [ev] = ws.add([FactRequest("Facts about Steve Jobs", " Microsoft", subject="Steve Jobs")], method="memory",
                  overrides=CFG)
    assert ev.ensemble["slot"] == 1


def test_revert_rebase_equals_a_sequence_without_the_entry(tmp_path, tiny_llama_dir):
    from kledger import Workspace
    from kledger.ledger.store import Ledger

    ws = _workspace(tmp_path / "a", tiny_llama_dir)
    evs = ws.add(REQS, method="memory", overrides=CFG)
    never = _workspace(tmp_path / "b", tiny_llama_dir)
    never.add([REQS[0], REQS[2]], method="memory", overrides=CFG)
    r = run_cli(["--json", "--device", "cpu", "revert", evs[1].id, "--rebase"], tmp_path / "a")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output[r.output.index("{"):])["recomputed"] == 1
    got, _, _ = Workspace(Ledger.open(tmp_path / "a"), device="cpu").model_at("HEAD")
    want, _, _ = never.model_at("HEAD")
    for (n, p), (_, q) in zip(got.named_parameters(), want.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)


def test_export_carries_the_memory_as_remote_code_and_the_cli_runs_the_method(tmp_path, led):
    from transformers import AutoModelForCausalLM

    from kledger import Workspace
    from kledger.ledger.store import Ledger

    r = run_cli(["--json", "--device", "cpu", "add", REQS[0].prompt, REQS[0].target_new,
                 "--subject", REQS[0].subject, "--method", "memory"]
                + [a for k, v in CFG.items() for a in ("--set", f"{k}={v}")], led)
    assert r.exit_code == 0, r.output
    r = run_cli(["--device", "cpu", "export", str(tmp_path / "out")], led)
    assert r.exit_code == 0, r.output
    assert "trust_remote_code" in (tmp_path / "out" / "README.md").read_text()
    with pytest.raises(ValueError, match="trust_remote_code"):  # refused, never loaded without the edits
        AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), trust_remote_code=False)
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), trust_remote_code=True)
    want, tok, _ = Workspace(Ledger.open(led), device="cpu").model_at("HEAD")
    ids = tok(REQS[0].prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, want(ids).logits)
        with memory_off(want):
            assert not torch.allclose(loaded(ids).logits, want(ids).logits)  # the entry is what moves it
    # after a revert of the only memory edit the export is a plain checkpoint again
    assert run_cli(["revert", "HEAD"], led).exit_code == 0
    assert run_cli(["--device", "cpu", "export", str(tmp_path / "plain")], led).exit_code == 0
    assert not (tmp_path / "plain" / "modeling_kledger_memory.py").exists()
    assert "kledger_memory" not in json.loads((tmp_path / "plain" / "config.json").read_text())


def test_merging_branches_whose_entries_share_a_slot_is_refused(tmp_path, tiny_llama_dir):
    ws = _workspace(tmp_path, tiny_llama_dir)
    main = ws.ledger.current_branch()
    ws.ledger.create_branch("side")
    ws.add([REQS[0]], method="memory", overrides=CFG)
    ws.ledger.set_current_branch("side")
    ws.add([REQS[1]], method="memory", overrides=CFG)  # the side branch fills slot 0 too
    ws.ledger.set_current_branch(main)
    head = ws.ledger.head().id
    r = run_cli(["merge", "side"], tmp_path)
    assert r.exit_code != 0 and "same slots" in r.output, r.output
    assert ws.ledger.head().id == head


def test_essence_term_keeps_what_else_the_subject_says_closer_to_the_base(tiny_llama_dir):
    """ROME's essence KL: with it, the next-token distribution after "{subject} is a" moves less."""
    model, tok, _ = load_model(str(tiny_llama_dir), "cpu")
    req = REQS[0]
    probe = tok(f"{req.subject} is a", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        p0 = torch.log_softmax(model(probe).logits[0, -1], -1)
    kls = []
    for w in (0.0, 4.0):
        ws_model, _, _ = load_model(str(tiny_llama_dir), "cpu")
        # layer 0: the value reaches the last token through layer 1; the probe opens with the subject
        cfg = dict(CFG, layer=0, essence_weight=w, initial_spelling=True)
        [res] = MemoryEditor(MemoryConfig(**cfg)).compute(ws_model, tok, [req], EditContext())
        from kledger.ledger.compose import apply_deltas

        apply_deltas(ws_model, [res.delta])
        with torch.no_grad():
            p = torch.log_softmax(ws_model(probe).logits[0, -1], -1)
        kls.append(float((p0.exp() * (p0 - p)).sum()))
    assert kls[1] < kls[0], kls
    with pytest.raises(ValueError, match="essence"):
        MemoryConfig(essence_prompts=("no slot",))
