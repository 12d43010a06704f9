"""Half-precision bases and models split over devices (issue 15).

* a ledger records the precision its base is loaded in (``init --dtype``; ``auto`` = the
  checkpoint's own); edits in bfloat16 move their targets, reverting gives the base back bit for
  bit, a fresh process materialises exactly the in-process working model, and the export is bf16;
* ``device_map``: a model whose modules lie on two device entries computes the same deltas as
  the unsplit model (on CPU both entries are "cpu", still through the per-module device code;
  with CUDA the second is cuda:0);
* unknown precisions are refused; ``preserved(model, names)`` saves only those parameters.
"""

from __future__ import annotations

import json
import pathlib

import pytest
import torch

from conftest import invoke, run_cli
from kledger.editors.base import EditContext, preserved
from kledger.editors.models import checkpoint_dtype, fingerprint, load_model
from kledger.editors.scoring import score_targets
from kledger.ledger.errors import UsageError
from kledger.ledger.records import FactRequest
from kledger.ledger.store import Ledger
from kledger.workspace import Workspace

EIFFEL = FactRequest("The Eiffel Tower is located in the city of", "Rome", subject="The Eiffel Tower",
                     target_true="Paris")
NILE = FactRequest("The river Nile flows through", "England", subject="river Nile", target_true="Egypt")
JOBS = FactRequest("Steve Jobs founded", "Microsoft", subject="Steve Jobs", target_true="Apple")
# small and fast settings that still move a tiny random model
ULTRA = {"lr": 2.0, "ridge": 1e-2, "max_turns": 2, "preserve_weight": 0, "positions": "both"}
MEMIT = {"layers": [0, 1], "stats_tokens": 512, "stats_seq_len": 16, "n_prefixes": 2, "prefix_tokens": 3,
         "v_steps": 12, "clamp_norm_factor": 4.0, "v_weight_decay": 0.0, "mom2_weight": 100.0}
KNE = {"max_steps": 5, "lr": 0.05}
OTHER = "cuda:0" if torch.cuda.is_available() else "cpu"


def _build4(path: pathlib.Path, kind: str) -> pathlib.Path:
    """A 4-layer tiny model with a larger init (0.2), so that edits at layers 0-1 move its outputs."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from conftest import make_tokenizer

    path.mkdir(parents=True, exist_ok=True)
    _, n = make_tokenizer(path)
    torch.manual_seed(0)
    common = dict(vocab_size=n, pad_token_id=1, eos_token_id=2, bos_token_id=2, initializer_range=0.2)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                             tie_word_embeddings=False, **common))
    else:
        model = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=32, n_head=4, n_positions=64, **common))
    model.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def checkpoints(request, tmp_path_factory):
    """(fp32 checkpoint folder, the same weights saved in bfloat16) of a tiny 4-layer model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    fp32 = _build4(tmp_path_factory.mktemp(f"fp32-{request.param}"), request.param)
    bf16 = tmp_path_factory.mktemp(f"bf16-{request.param}")
    AutoModelForCausalLM.from_pretrained(str(fp32), dtype=torch.bfloat16).save_pretrained(str(bf16))
    AutoTokenizer.from_pretrained(str(fp32)).save_pretrained(str(bf16))
    return fp32, bf16


def _init(work: pathlib.Path, model_dir: pathlib.Path, *extra) -> Ledger:
    r = run_cli(["init", "--model", str(model_dir), "--dir", str(work), *extra])
    assert r.exit_code == 0, r.output
    return Ledger.open(work)


def _params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _same(a: dict, b: dict) -> list[str]:
    return [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]


@pytest.mark.parametrize("how", ["flag", "auto"])
def test_bf16_edits_revert_and_materialise_bit_for_bit(checkpoints, how, tmp_path, monkeypatch):
    fp32, bf16 = checkpoints
    monkeypatch.chdir(tmp_path)
    assert checkpoint_dtype(fp32) == "float32" and checkpoint_dtype(bf16) == "bfloat16"
    ledger = _init(tmp_path / "w", fp32, "--dtype", "bfloat16") if how == "flag" else _init(tmp_path / "w", bf16)
    assert ledger.base_model()["dtype"] == "bfloat16"
    ws = Workspace(ledger, device="cpu")
    model, tok = ws.working()
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    base = _params(model)

    events = []
    for req, method, cfg in ((JOBS, "kne", KNE), (NILE, "memit", MEMIT), (EIFFEL, "ultraedit", ULTRA)):
        before = float(score_targets(model, tok, [req.prompt], [req.target_new]))
        events += ws.add([req], method=method, overrides=cfg)
        model, tok = ws.working()
        after = float(score_targets(model, tok, [req.prompt], [req.target_new]))
        assert after > before + 1e-3, (method, before, after)  # the target moved
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    working = _params(model)
    touched = sorted({n for e in events for n in ledger.load_delta(e).tensors})
    assert touched and _same({n: base[n] for n in touched}, {n: working[n] for n in touched}) == touched

    # a fresh workspace (a new process) materialises exactly the in-process working model
    fresh = Workspace(ledger, device="cpu").model_at("HEAD")[0]
    assert _same(working, _params(fresh)) == []
    # the exact rewrite reads the base in the model's dtype: the same bytes as from_pretrained
    for n in touched:
        assert torch.equal(ws.base_value(n, model.get_parameter(n)), base[n]), n

    # export: bf16 safetensors holding the working model
    out = tmp_path / "export"
    r = run_cli(["export", str(out)], tmp_path / "w")
    assert r.exit_code == 0, r.output
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as fh:
        for name in fh.keys():
            t = fh.get_tensor(name)
            assert t.dtype == torch.bfloat16, name
            if name in working:
                assert torch.equal(t, working[name]), name

    for e in events:
        ws.revert(e.id)
    reverted = _params(ws.working()[0])
    assert _same(base, reverted) == []


def test_old_ledgers_mean_float32(tiny_llama_dir, tmp_path):
    ledger = Ledger.create(tmp_path, {"spec": str(tiny_llama_dir), "path": str(tiny_llama_dir),
                                      "fingerprint": fingerprint(tiny_llama_dir)})  # no "dtype": made before it
    ws = Workspace(ledger, device="cpu")
    assert ws.dtype == "float32"
    assert {p.dtype for p in ws.load_base()[0].parameters()} == {torch.float32}


def test_unknown_dtype_is_refused(tiny_llama_dir, tmp_path):
    r = invoke(["init", "--model", str(tiny_llama_dir), "--dir", str(tmp_path / "w"), "--dtype", "float64"])
    assert r.exit_code == 2
    assert "float64" in r.output and "bfloat16" in r.output and "float16" in r.output
    assert not (tmp_path / "w" / ".kledger").exists()
    with pytest.raises(UsageError, match="expected --dtype float32 | bfloat16 | float16, found 'half'"):
        load_model(str(tiny_llama_dir), "cpu", dtype="half")


def test_float16_runs_or_is_refused_clearly(tiny_llama_dir, monkeypatch):
    from kledger.editors import models

    try:
        model, _, info = load_model(str(tiny_llama_dir), "cpu", dtype="float16")
        assert info.dtype == "float16" and {p.dtype for p in model.parameters()} == {torch.float16}
    except UsageError as exc:  # this torch cannot run half precision on the CPU: said, not changed
        assert "float16" in str(exc)

    class Broken(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(2, dtype=torch.float16))

        def forward(self, **kw):
            raise RuntimeError('"addmm_impl_cpu_" not implemented for \'Half\'')

    with pytest.raises(UsageError, match="expected a float16 model to run on cpu.*bfloat16 or float32"):
        models._check_half_runs(Broken(), "float16")


# --- devices ---------------------------------------------------------------------------------------
SPLIT = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": OTHER,
         "model.norm": OTHER, "lm_head": OTHER}
#: the 4-layer model split after layer 1; edits at layers 1 (first device) and 2 (second)
SPLIT4 = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu", "model.layers.2": OTHER,
          "model.layers.3": OTHER, "model.norm": OTHER, "lm_head": OTHER}


@pytest.fixture(scope="module")
def llama4(tmp_path_factory) -> pathlib.Path:
    """The 4-layer Llama: on the 2-layer one with its small init, v*'s loss is flat, so δ follows
    rounding noise (Adam normalises it) and two devices would legitimately disagree."""
    return _build4(tmp_path_factory.mktemp("llama4"), "llama")


#: no sampled context prefixes: sampling is discrete, so another device's rounding may pick other tokens
SAME = {"memit": MEMIT | {"n_prefixes": 0, "layers": [1, 2]}, "ultraedit": ULTRA | {"layers": [1, 2]}, "kne": KNE}


def _deltas(model, tok, method: str, cfg: dict, cache) -> dict[str, torch.Tensor]:
    """The summed dense deltas of ``method`` on two requests. Key statistics are cached in
    ``cache``: pass one folder for both models so that they share one C0 (its sampled corpus,
    like the prefixes, could differ by a token on another device)."""
    from kledger.editing import make_editor

    ctx = EditContext(cache_dir=cache)
    res = make_editor(method, cfg).compute(model, tok, [EIFFEL, NILE], ctx)
    out: dict[str, torch.Tensor] = {}
    for r in res:
        for n, td in r.delta.tensors.items():
            out[n] = out.get(n, 0) + td.to_dense()
    return out


@pytest.mark.parametrize("method", ["memit", "ultraedit"])
@pytest.mark.parametrize("as_file", [False, True])
def test_split_model_computes_the_unsplit_deltas(llama4, tmp_path, method, as_file):
    one, tok, _ = load_model(str(llama4), "cpu")
    mapping = SPLIT4
    if as_file:
        mapping = tmp_path / "map.json"
        mapping.write_text(json.dumps(SPLIT4))
    split, _, info = load_model(str(llama4), "cpu", device_map=str(mapping) if as_file else mapping)
    assert split.get_parameter("model.layers.2.mlp.down_proj.weight").device == torch.device(OTHER)
    assert set(info.devices) == {"cpu", OTHER}
    assert split.model.layers[2]._forward_pre_hooks, "the per-module device hooks are installed"
    before = _params(split)
    want = _deltas(one, tok, method, SAME[method], tmp_path)
    got = _deltas(split, tok, method, SAME[method], tmp_path)
    tol = 1e-6 if OTHER == "cpu" else 2e-3
    assert sorted(got) == sorted(want)
    for n in want:
        torch.testing.assert_close(got[n].cpu(), want[n], rtol=tol, atol=tol)
    after = _params(split)
    assert all(after[k].device == before[k].device and torch.equal(after[k], before[k]) for k in before)


def test_bf16_split_model_editors_agree_and_restore(llama4, tmp_path):
    """MEMIT, UltraEdit and KNE on a bfloat16 model split over two device entries: finite deltas
    on the same tensors as the unsplit bf16 model (equal on one device), the model left as it was."""
    one, tok, _ = load_model(str(llama4), "cpu", dtype="bfloat16")
    split, _, _ = load_model(str(llama4), "cpu", dtype="bfloat16", device_map=SPLIT4)
    before = _params(split)
    for method, cfg in SAME.items():
        want = _deltas(one, tok, method, cfg, tmp_path)
        got = _deltas(split, tok, method, cfg, tmp_path)
        assert sorted(got) == sorted(want) and all(torch.isfinite(t).all() for t in got.values()), method
        if OTHER == "cpu":
            assert all(torch.equal(got[n], want[n]) for n in want), method
        elif method != "kne":  # KNE's ensemble is a top-k over scores: another device may pick other entries
            for n in want:
                rel = float((got[n].cpu() - want[n]).norm() / want[n].norm().clamp_min(1e-12))
                assert rel < 0.1, (method, n, rel)
    after = _params(split)
    assert all(after[k].dtype == torch.bfloat16 and torch.equal(after[k], before[k]) for k in before)


def test_split_model_materialises_and_scores_like_the_unsplit(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ledger = _init(tmp_path / "w", tiny_llama_dir)
    Workspace(ledger, device="cpu").add([EIFFEL], method="ultraedit", overrides=ULTRA)
    one = Workspace(ledger, device="cpu").model_at("HEAD")[0]
    split, tok = Workspace(ledger, device="cpu", device_map=SPLIT).working()
    for n, p in one.named_parameters():
        torch.testing.assert_close(split.get_parameter(n).detach().cpu(), p.detach(), rtol=0, atol=0)
    lp1 = score_targets(one, tok, [EIFFEL.prompt], [EIFFEL.target_new])
    lp2 = score_targets(split, tok, [EIFFEL.prompt], [EIFFEL.target_new])
    torch.testing.assert_close(lp1, lp2, rtol=1e-4, atol=1e-4)


def test_device_map_auto_and_bad_maps(tiny_llama_dir):
    model, _, info = load_model(str(tiny_llama_dir), "cpu", device_map="auto")
    gpus = torch.cuda.device_count()
    assert set(info.devices) == ({f"cuda:{i}" for i in range(gpus)} if gpus else {"cpu"})
    with pytest.raises(UsageError, match="naming modules of the model, found \\['model.nosuch'\\]"):
        load_model(str(tiny_llama_dir), "cpu", device_map={"model.nosuch": "cpu"})
    with pytest.raises(UsageError, match="no offloading"):
        load_model(str(tiny_llama_dir), "cpu", device_map={"lm_head": "disk"})
    with pytest.raises(UsageError, match="JSON file"):
        load_model(str(tiny_llama_dir), "cpu", device_map="nosuchfile.json")


def test_cli_takes_device_map(led, tmp_path):
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps(SPLIT))
    r = run_cli(["add", EIFFEL.prompt, " Rome", "--subject", "The Eiffel Tower", "--device", "cpu",
                 "--device-map", str(mapping), "--method", "ultraedit", "--set", "lr=2.0", "--set", "preserve_weight=0"], led)
    assert r.exit_code == 0, r.output


def test_rebase_and_resolve_merge_take_the_device_map(tiny_llama_dir, tmp_path, monkeypatch):
    """`revert --rebase` and `merge --strategy resolve` load models too: the map reaches them."""
    import kledger.workspace as W

    seen = []
    real = W.load_model

    def spy(*a, **kw):
        seen.append(kw.get("device_map"))
        return real(*a, **kw)

    monkeypatch.setattr(W, "load_model", spy)
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps(SPLIT))
    ledger = _init(tmp_path / "w", tiny_llama_dir)
    ws = Workspace(ledger, device="cpu")
    first = ws.add([EIFFEL], method="ultraedit", overrides=ULTRA)[0]
    ledger.create_branch("side")
    ws.add([NILE], method="ultraedit", overrides=ULTRA)
    ledger.set_current_branch("side")
    Workspace(ledger, device="cpu").add([JOBS], method="ultraedit", overrides=ULTRA)
    ledger.set_current_branch("main")
    seen.clear()
    for args in (["revert", first.id, "--rebase"], ["merge", "side", "--strategy", "resolve"]):
        r = run_cli(["--device", "cpu", "--device-map", str(mapping), *args], tmp_path / "w")
        assert r.exit_code == 0, r.output
        assert seen and all(m == str(mapping) for m in seen), (args, seen)
        seen.clear()


# --- preserved ---------------------------------------------------------------------------------
def test_preserved_saves_only_the_named_parameters(monkeypatch):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    before = _params(model)
    clones = []
    real_clone = torch.Tensor.clone

    def counting(self, *a, **kw):
        clones.append(tuple(self.shape))
        return real_clone(self, *a, **kw)

    monkeypatch.setattr(torch.Tensor, "clone", counting)
    with preserved(model, ["0.weight"]):
        assert clones == [(4, 3)]  # the one named parameter, nothing else
        with torch.no_grad():
            model[0].weight.add_(1.0)
            model[1].weight.add_(1.0)
    monkeypatch.undo()
    assert torch.equal(model[0].weight, before["0.weight"])  # restored
    assert torch.equal(model[1].weight, before["1.weight"] + 1.0)  # not saved, so not restored
    with pytest.raises(UsageError, match="parameter names of the model"):
        with preserved(model, ["nosuch.weight"]):
            pass
