"""Shared fixtures: tiny models built from configs, saved and loaded through the real code path.

The tokenizer is a small word-level tokenizer built in the test (no download): it knows the
words the tests use, with a leading-space convention like GPT-2's byte-level BPE ("Ġword").
"""

from __future__ import annotations

import os
import pathlib

import pytest
import torch

# the test process owns its environment, and sets what the `kledger` program sets for itself
# (in-process callers of the CLI keep theirs): tiny models are local folders, nothing is fetched,
# and no library progress bar mixes into the output the tests parse
for _key, _value in (("HF_HUB_OFFLINE", "1"), ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
                     ("TRANSFORMERS_VERBOSITY", "error"), ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")):
    os.environ.setdefault(_key, _value)

WORDS = (
    "The Eiffel Tower is located in the city of Paris Rome London Berlin Madrid France Italy "
    "Danielle Darrieux mother tongue language English French German Spanish Michel Rocard a native speaker "
    "capital Germany Spain Where from people speak Alice Bob works as doctor teacher lawyer plays piano guitar "
    "violin sky blue green red grass color and what question answer Apple company founded by Steve Jobs Bill Gates "
    "Microsoft Google Amazon river Nile Seine Thames flows through Egypt England music jazz rock born year "
    "one two three four five six seven eight nine ten , . ? ! : ' s"
).split()


def make_tokenizer(path: pathlib.Path):
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<pad>": 1, "<eos>": 2}
    for w in WORDS:
        for form in (w, "Ġ" + w):
            vocab.setdefault(form, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")
    fast.save_pretrained(str(path))
    return fast, len(vocab)


def _vocab_size() -> int:
    return 2 * len(dict.fromkeys(WORDS)) + 3 + 8  # a little slack; exact size does not matter


def build_tiny(path: pathlib.Path, kind: str, seed: int = 0) -> pathlib.Path:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    path.mkdir(parents=True, exist_ok=True)
    tok, n = make_tokenizer(path)
    torch.manual_seed(seed)
    if kind == "llama":
        cfg = LlamaConfig(vocab_size=n, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                          pad_token_id=1, eos_token_id=2, bos_token_id=2, tie_word_embeddings=False)
        model = LlamaForCausalLM(cfg)
    elif kind == "gpt2":
        cfg = GPT2Config(vocab_size=n, n_layer=2, n_embd=32, n_head=4, n_positions=64,
                         pad_token_id=1, eos_token_id=2, bos_token_id=2)
        model = GPT2LMHeadModel(cfg)
    else:
        raise ValueError(kind)
    model.save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> pathlib.Path:
    return build_tiny(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> pathlib.Path:
    return build_tiny(tmp_path_factory.mktemp("tiny-gpt2"), "gpt2")


@pytest.fixture(params=["llama", "gpt2"])
def tiny_dir(request, tiny_llama_dir, tiny_gpt2_dir) -> pathlib.Path:
    return tiny_llama_dir if request.param == "llama" else tiny_gpt2_dir


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # fingerprint/file-hash caches go to a per-session temp dir; the converted real model stays shared
    cache = tmp_path_factory.getbasetemp() / "kledger-cache"
    real = pathlib.Path.home() / ".cache" / "kledger" / "models"
    cache.mkdir(exist_ok=True)
    if real.is_dir() and not (cache / "models").exists():
        (cache / "models").symlink_to(real)
    monkeypatch.setenv("KLEDGER_CACHE", str(cache))


def pytest_collection_modifyitems(config, items):
    if os.environ.get("KLEDGER_SLOW") != "1":
        skip = pytest.mark.skip(reason="slow benchmark: set KLEDGER_SLOW=1")
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op torch thread per test: on a shared 2-core machine it measured ~10x faster
    than two competing threads, and tiny models gain nothing from more."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --- ledgers and deltas made by hand (no model is loaded) ------------------------------------
#: the base-model record of ledgers whose deltas are made in the test
FAKE_MODEL = {"spec": "fake", "path": "/nonexistent", "fingerprint": "0" * 64}
#: parameter shapes of ``Params``, the small module hand-made deltas are materialised onto
SHAPES = {"a": (6, 8), "b": (5, 4)}


def new_ledger(path) -> "Ledger":
    """A fresh ledger in ``path`` over ``FAKE_MODEL``."""
    from kledger.ledger.store import Ledger

    return Ledger.create(path, FAKE_MODEL)


@pytest.fixture
def fake_ledger(tmp_path, monkeypatch):
    """A fresh ledger over ``FAKE_MODEL`` (``KLEDGER_DIR`` unset, so lookups see this one)."""
    monkeypatch.delenv("KLEDGER_DIR", raising=False)
    return new_ledger(tmp_path)


def tensor_delta(kind: str, shape, g: torch.Generator, *, nnz: int = 3, rank: int = 1, scale: float = 1.0):
    """A random tensor delta of ``kind`` drawn from ``g``: ``nnz`` sparse entries, or rank-``rank``
    factors, or a dense tensor; values ~ N(0, 1)·``scale``."""
    from kledger.ledger.deltas import DenseDelta, LowRankDelta, SparseDelta

    shape = tuple(shape)
    if kind == "sparse":
        n = 1
        for d in shape:
            n *= d
        return SparseDelta(shape, torch.randperm(n, generator=g)[:nnz], torch.randn(nnz, generator=g) * scale)
    if kind == "lowrank":
        return LowRankDelta(shape, torch.randn(shape[0], rank, generator=g) * scale,
                            torch.randn(shape[1], rank, generator=g) * scale)
    if kind == "dense":
        return DenseDelta(shape, torch.randn(*shape, generator=g) * scale)
    raise ValueError(kind)


def sparse_delta(name: str, idx, vals, shape=None):
    """A one-tensor sparse delta on ``Params``' tensor ``name`` with these entries."""
    from kledger.ledger.deltas import Delta, SparseDelta

    return Delta({name: SparseDelta(tuple(shape or SHAPES[name]), torch.tensor(idx, dtype=torch.int64),
                                    torch.tensor(vals, dtype=torch.float32))})


def append_edit(ledger, delta, prompt: str, target: str = " x", subject: str | None = None, method: str = "test",
                **kw):
    """Append an ``add`` event for a hand-made delta (``kw``: ``append``'s other arguments)."""
    request = {"prompt": prompt, "target_new": target} | ({"subject": subject} if subject else {})
    return ledger.append("add", request=request, method=method, delta=delta, **kw)


def add_fact(ledger, subject: str, target: str, delta, branch: str | None = None):
    """Append ``{subject} lives in`` → `` {target}`` (a fact the merge plan can compare)."""
    return append_edit(ledger, delta, f"{subject} lives in", " " + target, subject, method="fake", branch=branch)


class Params(torch.nn.Module):
    """A module with parameters of ``SHAPES`` (seeded), for materialising hand-made deltas."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        for name, shape in SHAPES.items():
            setattr(self, name, torch.nn.Parameter(torch.randn(*shape, generator=g), requires_grad=False))


def weights(ledger, ref="HEAD") -> dict:
    """``Params`` materialised at ``ref``: {name: tensor}."""
    from kledger.ledger.compose import materialise

    m = Params()
    with ledger.session():
        materialise(ledger, m, ref)
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


# --- the command ------------------------------------------------------------------------------
def invoke(args, **kw):
    """``kledger ARGS`` in this process through click's CliRunner (the one place tests reach the
    command; everything else they test through ``kledger``'s Python API)."""
    from click.testing import CliRunner

    from kledger.cli.main import cli

    return CliRunner().invoke(cli, [str(a) for a in args], **kw)


def run_on(ledger, *args):
    """``kledger --ledger LEDGER ARGS`` (exceptions propagate)."""
    return invoke(["--ledger", str(ledger.root), *args], catch_exceptions=False)


def run_cli(args, ledger_dir=None, **kw):
    """``kledger [--ledger DIR] --quiet ARGS`` through click's CliRunner (exceptions propagate)."""
    full = (["--ledger", str(ledger_dir)] if ledger_dir else []) + ["--quiet"] + list(args)
    return invoke(full, catch_exceptions=False, **kw)


@pytest.fixture()
def led(tmp_path, tiny_llama_dir):
    """A work folder holding a fresh ledger over the tiny Llama (made through ``kledger init``)."""
    work = tmp_path / "work"
    work.mkdir()
    r = run_cli(["init", "--model", str(tiny_llama_dir), "--dir", str(work)])
    assert r.exit_code == 0, r.output
    return work


def rewrite_chain(ledger, seq: int, column: str, value) -> None:
    """Forge a ledger the way an attacker with write access would: set ``column`` of row ``seq``
    to ``value`` and recompute the hash chain from that row on, so every row hash is consistent."""
    import json

    import duckdb

    from kledger.ledger.store import row_hash

    rows = list(ledger.iter_events())
    con = duckdb.connect(str(ledger.db_path))
    try:
        prev = rows[seq - 1].hash
        for ev in rows[seq:]:
            body = ev.body()
            body["prev_hash"] = prev
            if ev.seq == seq:
                body[column] = value
            stored = body[column] if isinstance(body[column], (str, type(None))) else \
                json.dumps(body[column], separators=(",", ":"))
            h = row_hash(body)
            con.execute(f"UPDATE events SET {column} = ?, prev_hash = ?, hash = ?, id = ? WHERE seq = ?",
                        [stored, prev, h, h[:12], ev.seq])
            prev = h
    finally:
        con.close()


def sql(ledger, query: str, args=()) -> None:
    """Run one SQL statement on the ledger's database directly, as an attacker with file access could."""
    import duckdb

    con = duckdb.connect(str(ledger.db_path))
    try:
        con.execute(query, list(args))
    finally:
        con.close()
