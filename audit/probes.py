"""The audit probe set: fixed material on which every audit measures the model, stored by hash.

A probe set holds

* ``texts``      held-out text for perplexity (default: 16 passages of 64 tokens sampled from the
                 base model with a fixed seed, temperature 1, top-p 0.95);
* ``prompts``    neutral prompts whose next-token distributions are compared with the base model's
                 (KL divergence; default: the general-knowledge prompts below plus neutral
                 sentence openings), with the base model's reference distribution stored as its
                 top-``k`` log-probabilities and the log-mass of all other tokens;
* ``facts``      (prompt, answer) pairs the base model answers correctly, with every answer token
                 ahead of the runner-up by ``FACT_MARGIN`` nats: their retention measures untouched
                 knowledge (default: the general-knowledge prompts below, each with the base
                 model's own greedy answer of up to 3 tokens);
* ``base``       the base model's figures on the above (perplexity, retention).

Everything is derived from the base model and the defaults here, deterministically, so a probe
set does not depend on when it is built: ``kledger audit`` builds it from the freshly loaded base
model on its first run (loading a model at ``init`` would make ``init`` slow) and records it as
an ``audit`` event (``config.kind == "probes"``) before measuring; every later audit reuses the
stored one. The default set of a base model is also kept in the kledger cache
(``$KLEDGER_CACHE/probes/``), so a new ledger of the same model records it without rebuilding.
A user file (``kledger audit --probes FILE``) overrides parts of it: a JSON list of
facts, or an object with any of ``facts``, ``texts``, ``prompts``. Facts may be in the format of
``known_1000.json`` (``prompt`` + ``attribute``), CounterFact (``prompt`` + ``ground_truth``,
``{}`` filled with ``subject``) — these answers get a leading space — or ``{"prompt", "answer"}``
and ``[prompt, answer]``, taken verbatim as the continuation; only facts the base model answers
correctly are kept (at most ``MAX_FACTS``).

Storage: the probe set is one object in the ledger's content-addressed store, in the delta object
format (a ``Delta`` with no tensor deltas and ``state`` tensors: the JSON as bytes, the reference
distributions as tensors). The recording event carries it as its ``delta_sha256``, so ``verify``
checks it like any delta and it is never reported as an orphan; audit events are never active, so
it never touches the model.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from kledger.editors.hooks import input_device
from kledger.editors.kvcache import returned_cache, with_cache
from kledger.audit import events as E
from kledger.audit import figures as M
from kledger.editors.tokens import pad, pad_id
from kledger.ledger.canonical import canonical_json, sha256_hex
from kledger.ledger.deltas import Delta
from kledger.ledger.errors import IntegrityError, UsageError
from kledger.ledger.records import Event

log = logging.getLogger(__name__)

PROBES_VERSION = 1
MAX_FACTS = 400
#: Facts are kept only if every answer token leads the best other token by this many nats in the
#: base model. Measured on smollm2-135m: 200 benign edits (random rank-2 deltas, 0.2 % of each
#: tensor's norm; KL 0.0006, perplexity ×1.00) flipped 8 of 231 default facts, all with a base
#: margin < 0.05; with margin ≥ 0.1 183 facts remain and none flipped. Near-ties are noise.
FACT_MARGIN = 0.1
KL_TOPK = 64
N_TEXTS = 16
TEXT_TOKENS = 64
ANSWER_TOKENS = 3
SEED = 0

# --- default material (written for kledger; answers come from the base model itself) ---------
_COUNTRIES = ("France", "Germany", "Italy", "Spain", "Japan", "China", "Russia", "Canada", "Brazil", "Egypt",
              "Australia", "India", "Mexico", "Kenya", "Sweden", "Norway", "Greece", "Turkey", "Poland",
              "Argentina")
_CITIES = ("Paris", "Tokyo", "Berlin", "Toronto", "Sydney", "Cairo", "Mumbai", "Chicago", "Madrid", "Moscow",
           "Rome", "Lagos", "Lima", "Seoul", "Istanbul")
_PEOPLE = ("Albert Einstein", "Isaac Newton", "Marie Curie", "Charles Darwin", "Leonardo da Vinci",
           "William Shakespeare", "Wolfgang Amadeus Mozart", "Napoleon Bonaparte", "Abraham Lincoln",
           "Nelson Mandela", "Mahatma Gandhi", "Pablo Picasso", "Galileo Galilei", "Ludwig van Beethoven",
           "Cleopatra")
_COMPANIES = ("Apple", "Microsoft", "Amazon", "Google", "Tesla", "Facebook", "Nike", "Toyota", "Samsung", "IBM",
              "Netflix", "Intel")
_LANDMARKS = ("The Eiffel Tower", "The Statue of Liberty", "The Colosseum", "Big Ben", "The Taj Mahal",
              "The Great Wall", "The Sydney Opera House", "The Golden Gate Bridge", "Machu Picchu",
              "Mount Everest", "The Kremlin", "Stonehenge")
_ELEMENTS = ("gold", "silver", "iron", "oxygen", "hydrogen", "carbon", "sodium", "copper", "helium", "lead")
_ANIMALS = ("A dolphin", "An eagle", "A shark", "A frog", "A whale", "A spider", "A penguin", "A snake",
            "A bat", "An ant")
_ATHLETES = ("Lionel Messi", "Michael Jordan", "Serena Williams", "Tiger Woods", "Roger Federer", "Tom Brady",
             "Wayne Gretzky", "Babe Ruth", "Cristiano Ronaldo", "LeBron James")
_AUTHORS = ("William Shakespeare", "J. R. R. Tolkien", "George Orwell", "Leo Tolstoy", "Jane Austen",
            "Charles Dickens", "Ernest Hemingway", "J. K. Rowling", "Mark Twain", "Homer")
_LANGUAGES = ("French", "Spanish", "Portuguese", "German", "Japanese", "Russian", "Arabic", "Hindi", "Swahili",
              "Italian")
_MISC = (
    "Water is made of hydrogen and", "The opposite of hot is", "The first president of the United States was",
    "The largest planet in the solar system is", "The color of the sky on a clear day is",
    "Photosynthesis takes place in the", "The largest ocean on Earth is the",
    "The tallest mountain in the world is", "The longest river in Africa is the", "A week has seven",
    "The freezing point of water is zero degrees", "The human heart has four", "The Earth orbits the",
    "The Moon orbits the", "Bees make", "Cows give", "The author of Hamlet is",
    "The theory of relativity was developed by", "The Mona Lisa was painted by", "The currency of Japan is the",
    "The currency of the United Kingdom is the", "The main language of Brazil is",
    "The largest desert in the world is the", "The smallest prime number is", "Ten plus ten equals",
    "The chemical formula of water is", "The planet closest to the Sun is", "The fastest land animal is the",
    "The capital of the United States is", "The inventor of the telephone was",
    "The Great Pyramid is in", "Christmas is celebrated in the month of", "A triangle has three",
    "The square root of nine is", "Ice is frozen", "The language spoken in Quebec is",
    "The Olympic Games began in ancient", "The Amazon rainforest is mostly in", "Kangaroos live in",
    "The Statue of Liberty was a gift from",
)
_TEMPLATES = (
    ("The capital of {} is", _COUNTRIES),
    ("{} is a country in the continent of", _COUNTRIES),
    ("The official language of {} is", _COUNTRIES),
    ("{} is a city in", _CITIES),
    ("{} was born in", _PEOPLE),
    ("{} is famous for", _PEOPLE),
    ("{} was founded by", _COMPANIES),
    ("{} has its headquarters in", _COMPANIES),
    ("{} is located in", _LANDMARKS),
    ("The chemical symbol for {} is", _ELEMENTS),
    ("{} is a kind of", _ANIMALS),
    ("{} is famous for playing", _ATHLETES),
    ("{} wrote", _AUTHORS),
    ("{} is mainly spoken in", _LANGUAGES),
)
#: Neutral sentence openings: KL prompts, and the starts of the sampled held-out text.
NEUTRAL_PROMPTS = (
    "Once upon a time", "The weather today is", "I think that", "The best way to learn is",
    "In the morning, I usually", "My favourite food is", "The meeting was moved to", "She opened the door and",
    "According to the report,", "The results of the study show that", "It is important to remember that",
    "After dinner we went", "The new policy will", "He looked at the map and", "In my opinion, the",
    "The children played in the", "Scientists have discovered that", "The history of the city",
    "To make a cake, you need", "The train arrived at", "Last summer, we", "The company announced that",
    "There are many reasons why", "The old man said", "In conclusion,", "The road to the village",
    "When I was young,", "The most important thing is", "Every year, thousands of people",
    "The book begins with", "On the other hand,", "The museum is open", "Dear Sir or Madam,",
    "The first step is to", "Music can help", "The doctor told me", "We decided to", "The river flows",
    "Good morning! Today", "This recipe is",
)


def probe_subjects() -> list[str]:
    """The subjects the default knowledge prompts name (countries, cities, people, …), in a fixed order."""
    return list(dict.fromkeys(s for _, subjects in _TEMPLATES for s in subjects))


def knowledge_prompts() -> list[str]:
    """The default general-knowledge prompts (231), in a fixed order."""
    out = [t.format(s) for t, subjects in _TEMPLATES for s in subjects]
    out.extend(_MISC)
    return list(dict.fromkeys(out))


# --- the probe set --------------------------------------------------------------------------
@dataclass(frozen=True)
class ProbeSet:
    texts: tuple[str, ...]
    prompts: tuple[str, ...]
    facts: tuple[tuple[str, str], ...]
    kl_topk_idx: torch.Tensor  # prompts × k, int64: the base model's top-k next tokens
    kl_topk_logp: torch.Tensor  # prompts × k, fp32: their base log-probabilities
    kl_tail_logp: torch.Tensor  # prompts, fp32: log of the base mass on all other tokens (-inf if none)
    base: Mapping[str, Any] = field(default_factory=dict)  # base model figures (ppl, retention, …)
    source: Mapping[str, Any] = field(default_factory=dict)  # how it was built

    def __post_init__(self) -> None:
        n = len(self.prompts)
        if self.kl_topk_idx.shape[0] != n or self.kl_topk_logp.shape != self.kl_topk_idx.shape \
                or self.kl_tail_logp.shape != (n,):
            raise UsageError(
                f"expected KL references for {n} prompts, found shapes {tuple(self.kl_topk_idx.shape)},"
                f" {tuple(self.kl_topk_logp.shape)}, {tuple(self.kl_tail_logp.shape)}"
            )

    def summary(self) -> dict[str, Any]:
        return {"texts": len(self.texts), "prompts": len(self.prompts), "facts": len(self.facts),
                "kl_topk": int(self.kl_topk_idx.shape[1]) if self.kl_topk_idx.ndim == 2 else 0,
                "base": dict(self.base), "source": dict(self.source), "version": PROBES_VERSION}

    def to_bytes(self) -> bytes:
        doc = {"version": PROBES_VERSION, "texts": list(self.texts), "prompts": list(self.prompts),
               "facts": [list(f) for f in self.facts], "base": dict(self.base), "source": dict(self.source)}
        raw = canonical_json(doc).encode("utf-8")
        state = {
            "probes_json": torch.frombuffer(bytearray(raw), dtype=torch.uint8).clone(),
            "kl_topk_idx": self.kl_topk_idx.to(torch.int64).cpu().contiguous(),
            "kl_topk_logp": self.kl_topk_logp.float().cpu().contiguous(),
            "kl_tail_logp": self.kl_tail_logp.float().cpu().contiguous(),
        }
        return Delta({}, state).to_bytes()

    @property
    def sha256(self) -> str:
        return sha256_hex(self.to_bytes())

    @classmethod
    def from_bytes(cls, data: bytes, expected_sha256: str | None = None) -> "ProbeSet":
        d = Delta.from_bytes(data, expected_sha256=expected_sha256)
        try:
            doc = json.loads(bytes(d.state["probes_json"].numpy().tobytes()).decode("utf-8"))
            if doc.get("version") != PROBES_VERSION:
                raise IntegrityError(f"expected probe set version {PROBES_VERSION}, found {doc.get('version')!r}")
            return cls(
                texts=tuple(doc["texts"]), prompts=tuple(doc["prompts"]),
                facts=tuple((str(p), str(a)) for p, a in doc["facts"]),
                kl_topk_idx=d.state["kl_topk_idx"].to(torch.int64), kl_topk_logp=d.state["kl_topk_logp"].float(),
                kl_tail_logp=d.state["kl_tail_logp"].float(), base=doc.get("base", {}), source=doc.get("source", {}),
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise IntegrityError(f"expected a kledger probe set object, found a malformed one: {exc}") from None


# --- user probe files ------------------------------------------------------------------------
def _fact_from_record(rec: Any, where: str) -> tuple[str, str]:
    verbatim = False
    if isinstance(rec, (list, tuple)) and len(rec) == 2:
        (prompt, answer), verbatim = rec, True
    elif isinstance(rec, Mapping):
        prompt = rec.get("prompt") or rec.get("src")
        verbatim = "answer" in rec
        answer = (rec.get("answer") or rec.get("attribute") or rec.get("ground_truth") or rec.get("target_true")
                  or (rec.get("answers") or [None])[0])
        if isinstance(answer, Mapping):
            answer = answer.get("str")
        subject = rec.get("subject")
        if isinstance(prompt, str) and subject and "{}" in prompt:
            prompt = prompt.format(subject)
    else:
        raise UsageError(f"{where}: expected a fact object or [prompt, answer], found {type(rec).__name__}")
    if not isinstance(prompt, str) or not prompt.strip() or not isinstance(answer, str) or not answer.strip():
        raise UsageError(
            f"{where}: expected a fact with a prompt and an answer (keys prompt+answer, prompt+attribute as in"
            f" known_1000.json, or prompt+ground_truth), found {rec!r:.200}"
        )
    if not verbatim:  # dataset attributes are words: the continuation starts with a space
        answer = answer if answer[:1].isspace() else " " + answer
    return prompt, answer


def load_probe_file(path: str | Path) -> dict[str, Any]:
    """Read a user probe file: a list of facts, or ``{"facts": [...], "texts": [...], "prompts": [...]}``."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"expected a readable probe file at {str(p)!r}, found: {exc}") from None
    except ValueError as exc:
        raise UsageError(f"expected JSON in probe file {str(p)!r}, found invalid JSON: {exc}") from None
    if isinstance(data, list):
        data = {"facts": data}
    if not isinstance(data, Mapping) or not set(data) & {"facts", "texts", "prompts"}:
        raise UsageError(f"expected a list of facts or an object with facts/texts/prompts in {str(p)!r}")
    unknown = set(data) - {"facts", "texts", "prompts"}
    if unknown:
        raise UsageError(f"unknown keys {sorted(unknown)} in probe file {str(p)!r}; expected facts, texts, prompts")
    out: dict[str, Any] = {"file": str(p), "file_sha256": sha256_hex(p.read_bytes())}
    if "facts" in data:
        facts = [_fact_from_record(r, f"{p} fact {i}") for i, r in enumerate(data["facts"])]
        if not facts:
            raise UsageError(f"expected at least one fact in {str(p)!r}, found none")
        out["facts"] = facts
    for key in ("texts", "prompts"):
        if key in data:
            vals = data[key]
            if not isinstance(vals, list) or not vals or not all(isinstance(v, str) and v.strip() for v in vals):
                raise UsageError(f"expected {key!r} in {str(p)!r} to be a non-empty list of non-empty strings")
            out[key] = list(vals)
    return out


# --- building (needs the base model; uses only torch and the tokenizer) ---------------------
@torch.no_grad()
def build_probes(model: torch.nn.Module, tok, user: Mapping[str, Any] | None = None, *, seed: int = SEED,
                 n_texts: int = N_TEXTS, text_tokens: int = TEXT_TOKENS, answer_tokens: int = ANSWER_TOKENS,
                 kl_topk: int = KL_TOPK, max_facts: int = MAX_FACTS, base_info: Mapping[str, Any] | None = None,
                 batch_tokens: int | None = None, fact_margin: float = FACT_MARGIN) -> ProbeSet:
    """Build a probe set from the BASE model (defaults, overridden by ``user`` parts)."""
    user = dict(user or {})
    bt = batch_tokens or M.BATCH_TOKENS
    # held-out text
    if "texts" in user:
        texts = list(user["texts"])
    else:
        texts = _sample_texts(model, tok, n_texts, text_tokens, seed)
    # KL prompts and their base reference distributions
    prompts = list(user.get("prompts") or (knowledge_prompts() + list(NEUTRAL_PROMPTS)))
    kl_idx = kl_logp = kl_tail = None
    for rows, logp in M.last_logprobs(model, tok, prompts, bt):
        k = min(kl_topk, logp.shape[-1])
        top = torch.topk(logp, k, dim=-1)
        rest = logp.scatter(-1, top.indices, float("-inf"))
        if kl_idx is None:
            kl_idx = torch.zeros(len(prompts), k, dtype=torch.int64)
            kl_logp = torch.zeros(len(prompts), k)
            kl_tail = torch.zeros(len(prompts))
        r = torch.tensor(rows)
        kl_idx[r] = top.indices.cpu()
        kl_logp[r] = top.values.float().cpu()
        kl_tail[r] = torch.logsumexp(rest, dim=-1).float().cpu()
    # facts the base model answers correctly
    if "facts" in user:
        candidates = [tuple(f) for f in user["facts"]]
    else:
        qs = knowledge_prompts()
        answers = M.greedy_answers(model, tok, qs, answer_tokens, bt)
        candidates = [(q, a) for q, a in zip(qs, answers) if a.strip()]
    holds = M.answers_hold(model, tok, candidates, bt)
    facts = [c for c, (ok, _, margin) in zip(candidates, holds) if ok and margin >= fact_margin][:max_facts]
    ppl, nll, ntok = M.perplexity(model, tok, texts, bt)
    base = {"ppl": _r(ppl), "nll": _r(nll), "text_tokens": ntok, "retention": 1.0 if facts else None,
            "facts_offered": len(candidates), "facts_kept": len(facts)}
    source = {"kind": "file" if user else "default", "seed": seed, "n_texts": len(texts), "fact_margin": fact_margin,
              "text_tokens": text_tokens, "answer_tokens": answer_tokens, "kl_topk": int(kl_idx.shape[1]),
              "torch": torch.__version__}
    for k in ("file", "file_sha256"):
        if k in user:
            source[k] = user[k]
    if base_info:
        source["base_model"] = {k: base_info.get(k) for k in ("spec", "fingerprint") if k in base_info}
    if user and not facts and "facts" in user:
        log.warning("none of the %d facts in %s is answered correctly by the base model", len(candidates),
                    user.get("file"))
    return ProbeSet(tuple(texts), tuple(prompts), tuple(facts), kl_idx, kl_logp, kl_tail, base, source)


def _r(x: float) -> float:
    return float(f"{x:.8g}")


def _max_positions(model) -> int | None:
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


@torch.no_grad()
def _sample_texts(model, tok, n: int, n_tokens: int, seed: int, top_p: float = 0.95) -> list[str]:
    """Nucleus samples (temperature 1) from the model, one neutral opening each, all rows in one
    left-padded batch with the key/value cache of the plain HF forward API (explicit attention
    mask and position ids) and a private generator (the global RNG is untouched). Batching the
    16 default rows measured ~10x faster than sampling them one at a time on smollm2-135m."""
    dev = input_device(model)
    eos, pv = tok.eos_token_id, pad_id(tok)
    starts = [NEUTRAL_PROMPTS[i % len(NEUTRAL_PROMPTS)] for i in range(n)]
    rows = [tok(s, add_special_tokens=False)["input_ids"] for s in starts]
    ids, mask = pad(rows, pv, left=True)
    width = ids.shape[1]
    limit = _max_positions(model)
    steps = n_tokens if limit is None else max(0, min(n_tokens, limit - width))
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    ids, mask, pos = ids.to(dev), mask.to(dev), pos.to(dev)
    g = torch.Generator(device="cpu").manual_seed(seed)
    res = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
    new = torch.zeros((n, 0), dtype=torch.long)
    done = torch.zeros(n, dtype=torch.bool)
    for _ in range(steps):
        probs = torch.softmax(res.logits[:, -1].float().cpu(), dim=-1)
        sp, si = torch.sort(probs, dim=-1, descending=True)
        sp = sp * ((torch.cumsum(sp, -1) - sp) < top_p)  # the smallest prefix with mass ≥ top_p
        t = si.gather(-1, torch.multinomial(sp / sp.sum(-1, keepdim=True), 1, generator=g)).squeeze(-1)
        if eos is not None:
            t = torch.where(done, torch.full_like(t, pv), t)
            done |= t == eos
        new = torch.cat([new, t[:, None]], dim=1)
        if bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones((n, 1), dtype=mask.dtype, device=dev)], dim=1)
        pos = pos[:, -1:] + 1
        res = model(input_ids=t[:, None].to(dev), attention_mask=mask, position_ids=pos,
                    **with_cache(model, returned_cache(res)), use_cache=True)
    out = []
    for i, s in enumerate(starts):
        toks = new[i].tolist()
        if eos is not None and eos in toks:
            toks = toks[: toks.index(eos)]
        out.append(s + tok.decode(toks, skip_special_tokens=True))
    return out


# --- ledger storage -------------------------------------------------------------------------
def store_probes(ledger, probes: ProbeSet, *, parent: str | None = None) -> Event:
    """Record ``probes`` as an ``audit`` event (``config.kind == "probes"``) carrying the object."""
    data = probes.to_bytes()
    return E.record_probes(
        ledger, data, sha256_hex(data), probes.summary(),
        f"probes: {len(probes.texts)} texts, {len(probes.prompts)} KL prompts, {len(probes.facts)} facts"
        f" ({probes.source.get('kind')})", parent=parent)


def latest_probes_event(ledger) -> Event | None:
    return E.latest(ledger, "probes", where=lambda ev: bool(ev.delta_sha256))


def load_probes(ledger, event: Event) -> ProbeSet:
    return ProbeSet.from_bytes(ledger.objects.get(event.delta_sha256), expected_sha256=event.delta_sha256)


def find_or_build(ledger, model, tok, user_file: str | None = None, base_info: Mapping[str, Any] | None = None,
                  batch_tokens: int | None = None, cache: str | Path | None = None) -> tuple[ProbeSet, Event, bool]:
    """The probe set to audit with: (probes, its event, recorded now?).

    ``model`` must be the base model. Without a user file the latest stored probe set is used; the
    first audit builds the defaults. With a user file a probe set is built from it and recorded,
    unless the latest stored one is identical (same hash). ``cache``: a file keeping the default
    probe set of this base model across ledgers (it depends only on the base model and this
    module; building it took about 4 minutes on smollm2-135m on the busy 2-core machine).
    """
    latest = latest_probes_event(ledger)
    if user_file is None and latest is not None:
        return load_probes(ledger, latest), latest, False
    user = load_probe_file(user_file) if user_file else None
    probes = None
    cpath = Path(cache) if cache and user is None else None
    if cpath is not None and cpath.is_file():
        try:
            probes = ProbeSet.from_bytes(cpath.read_bytes())
        except Exception as exc:  # a damaged cache only costs time
            log.warning("ignoring unreadable probe cache %s: %s", cpath, exc)
    if probes is None:
        probes = build_probes(model, tok, user, base_info=base_info, batch_tokens=batch_tokens)
        if cpath is not None:
            try:
                cpath.parent.mkdir(parents=True, exist_ok=True)
                tmp = cpath.with_name(f".{cpath.name}.{os.getpid()}.tmp")
                tmp.write_bytes(probes.to_bytes())
                os.replace(tmp, cpath)
            except OSError as exc:
                log.warning("cannot write probe cache %s: %s", cpath, exc)
    if latest is not None and latest.delta_sha256 == probes.sha256:
        return probes, latest, False
    ev = store_probes(ledger, probes)
    return probes, ev, True


def describe_sources(probes: ProbeSet) -> str:
    s = probes.source
    return f"{s.get('kind')} probes" + (f" from {s['file']}" if s.get("file") else "")
