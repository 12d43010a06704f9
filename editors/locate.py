"""Shared pieces of the locate-then-edit editors (MEMIT, AlphaEdit, and their BLUE variants).

* ``subject_last_index``: the token position of the subject's last token in a prompt;
* ``context_templates``: the raw prompt plus a few short prefixes sampled from the model
  (``"<prefix>. {}"``, as in MEMIT), with a fixed seed;
* ``keys_and_outputs``: keys ``k`` (input of the MLP output projection at the subject's last
  token, averaged over the context templates) for several layers and the block output ``h`` at the
  subject's last token of the raw prompt, in one forward pass that stops after the last layer
  needed;
* ``kledger.editors.vstar.compute_z``: the target vectors ``z = h + δ`` (v*), all requests of a
  batch optimised side by side, each with its own early stop (and MPES / NAS);
* ``kledger.editors.driver``: the closed forms (``memit_solve``: ``V = (λ C0 + K Kᵀ + ρI)⁻¹ K``
  in float64, so that ``ΔW = R Vᵀ``) and ``locate_edit``, the per-batch driver both editors
  share. A ``Solver`` supplies the method's closed form (MEMIT or AlphaEdit). Every closed form is
  ``ΔW = R Vᵀ`` with ``V`` depending on the keys only, so the update is linear in the columns of
  ``R``: request i's share at layer l is the rank-1 pair ``(R_l[:, i], V_l[:, i])`` and the
  shares sum to the batch update exactly.

Layout: ``ΔW`` is out×in; GPT-2's Conv1D stores in×out, so its factors are swapped (``u = V``,
``v = R``) and the delta is always in the parameter's own storage layout.

Shared defaults (``LocateConfig``), measured on SmolLM2-135M with CounterFact records 0–19
(bench/locate_edit.py; tables in bench/results/locate_edit.md):

* ``v_lr = 2.0`` and the NLL-based early stop: with the reference lr 0.5 and the reference stop
  (total loss < 0.05) all 4 probe requests ran the full 25 evaluations (the KL term alone stays at
  0.05–0.1); stopping on the target NLL < 0.05, lr 1.0 needed 13–19 evaluations and lr 2.0 9–12
  for the same final NLL (≈0.04); the hidden state at layer 8 has norm ≈ 125–150 here, so lr 0.5
  moves δ too slowly to reach the clamp (0.75·‖h‖) in a few steps. On 20 requests lr 2.0 took
  9.4 evaluations on average.
* ``layers``: windows 2–6 / 3–7 / 4–8 on one batch of 20 (λ = 5000): efficacy 0.90 / 1.00 / 0.95,
  paraphrase 0.85 / 0.95 / 0.90, neighbourhood score 0.75 / 0.75 / 0.80, top-1 kept
  0.90 / 0.90 / 0.85 — 3–7 and 4–8 tie within one fact of 20; ``default_layers`` keeps 4–8 (same
  rule as the Llama3-8B reference, better neighbourhood score).
* ``stats_tokens = 8192``: C0 from 8k, 16k and 32k sampled tokens gave the same scores on one
  batch of 20 for both MEMIT (0.95 / 0.90 / 0.80 / 0.85–0.90) and AlphaEdit (1.00 / 0.95 / 0.80 /
  0.85–0.90); the sampled corpus costs a full forward pass per token, so the smallest is the default.
* ``clamp_norm_factor`` 0.75, ``kl_factor`` 0.0625, ``v_weight_decay`` 0.5, 5 prefixes of 10
  tokens, 25 steps: the reference values (not swept here).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn

from kledger.editors.hooks import StopAfter, StopForward, Trace, input_device, rows_at
from kledger.editors.sites import Sites, num_layers
from kledger.editors.stats import banned_ids, sample_continuations
from kledger.editors.tokens import pad, pad_id
from kledger.ledger.errors import UsageError
from kledger.ledger.records import FactRequest

log = logging.getLogger(__name__)

#: First words of the context prefixes (MEMIT's choice), cycled when more prefixes are asked for.
PREFIX_STARTS = ("The", "Therefore", "Because", "I", "You")
PREFIX_TOP_K = 5


def default_layers(n_layers: int) -> tuple[int, ...]:
    """Critical layers by model depth: a window of 5 consecutive layers starting at ~13 % depth.

    References: GPT-J (28 layers) 3–8, Llama3-8B (32) 4–8, GPT2-XL (48) 13–17. For SmolLM2-135M
    (30 layers) this gives 4–8; windows 2–6, 3–7 and 4–8 were measured (bench/locate_edit.py
    ``--layers``, results in bench/results/locate_edit.md). Models with ≤ 5 layers edit all.
    """
    if n_layers <= 5:
        return tuple(range(n_layers))
    start = max(1, round(0.13 * n_layers))
    start = min(start, n_layers - 5)
    return tuple(range(start, start + 5))


#: what a MEMIT/AlphaEdit config recorded before the norm controls meant (Editor.recorded_defaults)
PRE_NORM_CONTROL = {"mpes_steps": -1, "norm_anchor": False, "norm_penalty": 0.0}


@dataclass(frozen=True)
class LocateConfig:
    """Hyper-parameters shared by MEMIT and AlphaEdit (see each editor's docstring for defaults)."""

    layers: tuple[int, ...] | None = None  # None: default_layers(num_layers(model))
    v_lr: float = 2.0  # Adam learning rate of δ (v*); see module docstring for the measurement
    v_steps: int = 25  # at most this many loss evaluations (updates: one fewer)
    v_stop_loss: float = 0.05  # a request stops once its v* target NLL (per token) is below this
    clamp_norm_factor: float = 0.75  # ‖δ‖ ≤ factor·‖h‖ after every step
    kl_factor: float = 0.0625  # weight of KL(next token after the subject in "{subject} is a")
    v_weight_decay: float = 0.5  # weight of ‖δ‖/‖h‖²
    n_prefixes: int = 5  # context prefixes sampled from the model (plus the raw prompt)
    prefix_tokens: int = 10  # tokens per context prefix
    stats_tokens: int = 8192  # tokens of the key-statistics corpus (8k ≈ 16k ≈ 32k measured)
    stats_seq_len: int = 64  # window / sampled sequence length of the statistics corpus
    blue: bool = False  # BLUE: edit only the first and last critical layers, each with its own z
    split_batch: bool = True  # one EditResult (rank-1 share per layer) per request
    # --- norm control for long sequences (bench/lifelong.py; bench/results/lifelong.md) ---------
    # MPES 2 and the NAS anchor on since the eleventh session: over the first 100 edits of the lifelong stream
    # (batches of 10) they cut the known-fact retention drop from 0.443 to 0.328 (MEMIT) and from 0.415 to 0.328
    # (AlphaEdit), KL from 0.18 to 0.12, for efficacy 0.92 vs 0.95 / 0.95 vs 0.98 and paraphrase 0.79 vs 0.81 /
    # 0.84 vs 0.90; MEMIT's edits took 6.8 s vs 10.1. A norm penalty of 1,000 on MEMIT wrote almost nothing
    # (efficacy 0.34), so it stays off (bench/results/lifelong.md, runs me-100, me-mpes-nas, ae-100, ae-mpes-nas)
    mpes_steps: int = 2  # ENCORE's MPES: stop v* this many steps after the target is top-1 (-1: off)
    norm_penalty: float = 0.0  # ENCORE: ρ·‖ΔW‖²_F in the closed form (ρ I beside λ C0 / α I)
    norm_anchor: bool = True  # NAS: rescale each solved z to the norm of the unedited h
    batch_templates: bool = True  # one padded forward pass for every template of v* (else one per template)

    def __post_init__(self) -> None:
        if isinstance(self.layers, list):
            object.__setattr__(self, "layers", tuple(self.layers))
        if self.layers is not None:
            if not isinstance(self.layers, tuple) or not self.layers or not all(isinstance(x, int) for x in self.layers):
                raise ValueError(f"layers must be a non-empty list of integers, found {self.layers!r}")
        for name in ("v_lr", "clamp_norm_factor"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, found {getattr(self, name)}")
        for name in ("kl_factor", "v_weight_decay", "v_stop_loss"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be ≥ 0, found {getattr(self, name)}")
        if self.v_steps < 1 or self.n_prefixes < 0 or self.prefix_tokens < 1:
            raise ValueError("v_steps and prefix_tokens must be ≥ 1 and n_prefixes ≥ 0")
        if self.mpes_steps < -1 or self.norm_penalty < 0:
            raise ValueError(f"mpes_steps must be ≥ -1 and norm_penalty ≥ 0, found {self.mpes_steps}, {self.norm_penalty}")
        if self.stats_tokens < 1 or self.stats_seq_len < 2:
            raise ValueError("stats_tokens must be ≥ 1 and stats_seq_len ≥ 2")


def resolve_layers(cfg: LocateConfig, model: nn.Module) -> tuple[int, ...]:
    n = num_layers(model)
    layers = tuple(sorted(set(cfg.layers))) if cfg.layers is not None else default_layers(n)
    bad = [l for l in layers if not 0 <= l < n]
    if bad:
        raise UsageError(f"expected critical layers in [0, {n}), found {bad}")
    return layers


def check_requests(requests: Sequence[FactRequest], method: str) -> None:
    if not requests:
        raise UsageError(f"{method}: expected at least one fact request, found none")
    for r in requests:
        if r.subject is None:
            raise UsageError(
                f"{method} reads keys at the subject's last token, so each request needs a subject;"
                f" found none for prompt {r.prompt!r} (pass --subject, or a 'subject' field)"
            )


# --- tokens ------------------------------------------------------------------------------------
def subject_token_span(tok, text: str, subject: str, start: int = 0) -> tuple[int, int]:
    """[first, last + 1) token indices of the first occurrence of ``subject`` at or after char
    ``start`` of ``text`` (tokenised without special tokens)."""
    pos = text.find(subject, start)
    if pos < 0:
        raise UsageError(f"expected subject {subject!r} in {text!r}, found none")
    end = pos + len(subject)
    try:
        offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        hits = [i for i, (s, e) in enumerate(offsets) if s < end and e > pos]
        if hits:
            return hits[0], hits[-1] + 1
    except (NotImplementedError, KeyError, TypeError, ValueError):
        pass
    first = len(tok(text[:pos], add_special_tokens=False)["input_ids"]) if pos else 0
    return first, max(first + 1, len(tok(text[:end], add_special_tokens=False)["input_ids"]))


def subject_last_index(tok, text: str, subject: str, start: int = 0) -> int:
    """Index of the last token of the first occurrence of ``subject`` at or after char ``start``."""
    return subject_token_span(tok, text, subject, start)[1] - 1


def _fill(template: str, prompt: str) -> tuple[str, int]:
    start = template.index("{}")
    return template[:start] + prompt + template[start + 2 :], start


def context_templates(model: nn.Module, tok, n: int, length: int, seed: int) -> list[str]:
    """``["{}"] + [f"{prefix}. {{}}"]``: n prefixes of ``length`` sampled tokens (top-5, fixed seed)."""
    templates = ["{}"]
    if n == 0:
        return templates
    dev = input_device(model)
    starts = [tok(PREFIX_STARTS[i % len(PREFIX_STARTS)], add_special_tokens=False)["input_ids"] for i in range(n)]
    gen = torch.Generator().manual_seed(seed)
    ban = banned_ids(tok)
    texts: dict[int, str] = {}
    by_len: dict[int, list[int]] = {}
    for i, s in enumerate(starts):
        by_len.setdefault(len(s), []).append(i)
    for _, idx in sorted(by_len.items()):
        start = torch.tensor([starts[i] for i in idx], device=dev)
        out = sample_continuations(model, start, length, gen, PREFIX_TOP_K, ban)
        for i, row in zip(idx, out):
            texts[i] = tok.decode(row.tolist(), skip_special_tokens=True)
    for i in range(n):
        templates.append(texts[i].replace("{", " ").replace("}", " ") + ". {}")
    return templates


# --- keys and block outputs ----------------------------------------------------------------------
@torch.no_grad()
def keys_and_outputs(model: nn.Module, tok, sites: Sites, requests: Sequence[FactRequest], templates: Sequence[str],
                     key_layers: Sequence[int], out_layer: int | None = None,
                     rows_per_pass: int = 96, average: bool = True) -> tuple[dict[int, torch.Tensor], torch.Tensor | None]:
    """Keys ``{layer: K (in×n float64)}`` averaged over templates; ``H`` (d×n) at ``out_layer``.

    With ``average=False`` the keys are per template: ``K`` is in×(n·m), request-major (the
    columns of request ``i`` are ``i·m … i·m + m − 1``, in template order).

    ``H`` is block ``out_layer``'s output at the subject's last token of the raw prompt (template
    0). One forward pass per chunk of rows, stopped after the highest layer needed.
    """
    dev = input_device(model)
    texts, idxs = [], []
    for r in requests:
        for t in templates:
            text, start = _fill(t, r.prompt)
            texts.append(tok(text, add_special_tokens=False)["input_ids"])
            idxs.append(subject_last_index(tok, text, r.subject, start))
    n, m = len(requests), len(templates)
    top = max(list(key_layers) + ([out_layer] if out_layer is not None else []))
    keys: dict[int, list[torch.Tensor]] = {l: [] for l in key_layers}
    outs: list[torch.Tensor] = []
    for c in range(0, len(texts), rows_per_pass):
        ids, mask = pad(texts[c : c + rows_per_pass], pad_id(tok), dev)
        rows = torch.arange(ids.shape[0], device=dev)
        pos = torch.tensor(idxs[c : c + rows_per_pass], device=dev)
        with contextlib.ExitStack() as stack:
            kt = {l: stack.enter_context(Trace(model, sites.mlp_out.format(l), retain_input=True, retain_output=False))
                  for l in key_layers}
            ot = (stack.enter_context(Trace(model, sites.layer.format(out_layer))) if out_layer is not None else None)
            stack.enter_context(StopAfter(model, sites.layer.format(top), retain_output=False))
            try:
                model(input_ids=ids, attention_mask=mask, use_cache=False)
            except StopForward:
                pass
            for l in key_layers:
                keys[l].append(rows_at(kt[l].input, rows, pos))  # on its layer's device (device maps)
            if ot is not None:
                outs.append(rows_at(ot.output, rows, pos))
    if average:
        K = {l: torch.cat(v).view(n, m, -1).mean(dim=1).T.contiguous() for l, v in keys.items()}
    else:
        K = {l: torch.cat(v).T.contiguous() for l, v in keys.items()}
    H = torch.cat(outs).view(n, m, -1)[:, 0].T.contiguous() if outs else None
    return K, H
