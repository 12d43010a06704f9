"""KNE step 3's pieces: the per-request batch, the loss terms, and one optimiser step."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kledger.editors.kne.config import KNEConfig
from kledger.editors.locate import subject_token_span
from kledger.editors.tokens import encode_pairs, pad, pad_id
from kledger.ledger.records import FactRequest


@dataclass
class Batch:
    enc: dict
    spans: list[tuple[int, int]]  # target spans of the rows that carry a target
    n_nll: int  # rows 0..n_nll-1: prompt (and prefix + prompt) + target_new, trained on
    true_row: int | None  # prompt + target_true (scored, never trained on)
    contrast_rows: list[int]  # contrast prompt + target_new (KL before the target; attribution)
    kl_rows: list[int]  # every row with a KL term: contrast rows, then neutral prompts
    kl_lengths: list[int]  # positions 0..len-1 of each KL row are compared with the unedited model
    subject_mask: torch.Tensor | None = None  # rows × width × 1, True at the subject's tokens


def build_batch(tok, req: FactRequest, cfg: KNEConfig, device) -> Batch:
    """One right-padded batch for one request (see ``Batch``)."""
    prompts = [req.prompt] + [p + req.prompt for p in cfg.context_prefixes]
    targets = [req.target_new] * len(prompts)
    n_nll = len(prompts)
    true_row = None
    if req.target_true:
        true_row = len(prompts)
        prompts.append(req.prompt)
        targets.append(req.target_true)
    contrast = [req.prompt.replace(req.subject, c) for c in cfg.contrast_subjects] if req.subject else []
    first_c = len(prompts)
    prompts += contrast
    targets += [req.target_new] * len(contrast)
    enc, spans = encode_pairs(tok, prompts, targets, device)
    rows = [enc["input_ids"][i, :e].tolist() for i, (_, e) in enumerate(spans)]
    subjects = [req.subject] * first_c + list(cfg.contrast_subjects[: len(contrast)])
    texts = list(prompts)  # the prompt part of each row is tokenised alone by encode_pairs
    contrast_rows = list(range(first_c, len(rows)))
    kl_rows = list(contrast_rows)
    kl_lengths = [spans[i][0] for i in contrast_rows]
    neutral = [p.format(subject=req.subject) for p in cfg.locality_prompts if "{subject}" not in p or req.subject]
    for p in neutral:
        ids = tok(p, add_special_tokens=False)["input_ids"]
        if ids:
            kl_rows.append(len(rows))
            kl_lengths.append(len(ids))
            rows.append(ids)
            texts.append(p)
            subjects.append(req.subject if req.subject and req.subject in p else None)
    input_ids, mask = pad(rows, pad_id(tok), device)
    width = input_ids.shape[1]
    subject_mask = None
    if cfg.grad_positions == "subject" and req.subject:
        sm = torch.zeros((len(rows), width, 1), dtype=torch.bool)
        for i, (text, subj) in enumerate(zip(texts, subjects)):
            if subj and subj in text:
                a, b = subject_token_span(tok, text, subj)
                sm[i, a:b] = True
        sm[:, : cfg.sink_positions] = False
        subject_mask = sm.to(device)
    elif cfg.sink_positions:
        sm = torch.ones((len(rows), width, 1), dtype=torch.bool)
        sm[:, : cfg.sink_positions] = False
        subject_mask = sm.to(device)
    return Batch({"input_ids": input_ids, "attention_mask": mask}, spans, n_nll, true_row,
                  contrast_rows, kl_rows, kl_lengths, subject_mask)


def row_logp(logp: torch.Tensor, batch: Batch, i: int) -> torch.Tensor:
    s, e = batch.spans[i]
    pos = torch.arange(s - 1, e - 1, device=logp.device)
    return logp[i, pos, batch.enc["input_ids"][i, s:e]]


def nll_terms(logp: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, float, float, float | None]:
    """(mean per-token NLL over the NLL rows, min log-prob lead of the prompt's target tokens over
    the runner-up, logP(target_new | prompt), logP(target_true | prompt) or None)."""
    nll = torch.stack([-row_logp(logp, batch, i).mean() for i in range(batch.n_nll)]).mean()
    s, e = batch.spans[0]
    pos = torch.arange(s - 1, e - 1, device=logp.device)
    tgt = batch.enc["input_ids"][0, s:e]
    row = logp[0, pos].detach()
    tgt_lp = row.gather(1, tgt[:, None]).squeeze(1)
    other = row.scatter(1, tgt[:, None], float("-inf")).max(dim=1).values
    lead = float((tgt_lp - other).min())
    lp_true = None if batch.true_row is None else float(row_logp(logp.detach(), batch, batch.true_row).sum())
    return nll, lead, float(tgt_lp.sum()), lp_true


def contrast_nll(logp: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Per contrast row: mean per-token NLL of the target after the contrast prompt."""
    return torch.stack([-row_logp(logp, batch, i).mean() for i in batch.contrast_rows])


def contrast_term(logp: torch.Tensor, batch: Batch, base: torch.Tensor | None, cfg: KNEConfig) -> torch.Tensor:
    """γ · mean relu(base + margin − NLL_c): zero once the target is margin less likely for them."""
    if base is None:
        return logp.new_zeros(())
    return cfg.contrast_weight * torch.relu(base + cfg.contrast_margin - contrast_nll(logp, batch)).mean()


def kl_term(logp: torch.Tensor, ref: list[torch.Tensor], batch: Batch) -> torch.Tensor:
    """Mean over neutral prompts of the mean over their positions of KL(unedited ‖ edited)."""
    if not batch.kl_rows:
        return logp.new_zeros(())
    terms = []
    for r, n, lp_ref in zip(batch.kl_rows, batch.kl_lengths, ref):
        lp = logp[r, :n]
        terms.append((lp_ref.exp() * (lp_ref - lp)).sum(-1).mean())
    return torch.stack(terms).mean()


class Optimizer:
    """One update of δ from ``δ.grad``: Adam, or a normalised gradient step; then the norm budget."""

    def __init__(self, delta: torch.Tensor, cfg: KNEConfig) -> None:
        self.delta, self.cfg = delta, cfg
        self.adam = torch.optim.Adam([delta], lr=cfg.lr) if cfg.optimizer == "adam" else None

    @torch.no_grad()
    def step(self) -> None:
        d, cfg = self.delta, self.cfg
        if self.adam is not None:
            self.adam.step()
        else:
            g = d.grad
            norm = float(g.norm())
            if norm > 0 and math.isfinite(norm):
                d.add_(g, alpha=-cfg.step_norm / norm)
        if cfg.max_norm is not None:
            norm = float(d.norm())
            if norm > cfg.max_norm:
                d.mul_(cfg.max_norm / norm)
