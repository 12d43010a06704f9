"""Rerun only the tokens from a position on, the earlier tokens' keys and values computed once.

An optimisation that adds a vector at token ``start`` of each row (the memory's value at the
subject's last token) changes nothing before that token: attention is causal, so every layer's keys
and values of tokens [0, start) are the same at every step. ``SuffixPass`` runs the full rows once
without gradient, keeps every layer's keys and values, and answers each later step with a pass over
the tokens from ``start`` to the last wanted position alone: position ids continue from ``start``,
and a 4-D additive attention mask lets suffix token i see its row's cached positions < start and the
suffix tokens ≤ i. On smollm2-135m a fact's contexts are 12–31 tokens and their suffixes 4–11: the
memory's fits take half the time (``bench/results/lifelong.md``).

The edit memory's gate matches a span of *earlier* tokens, which a suffix pass does not see: the
additions of every memory the model holds are computed once on the full rows and added at the
suffix positions by hooks, with the memories themselves silenced in the suffix pass.

Whether a model honours cached keys under a custom mask is checked, not assumed: ``prepare`` runs
one suffix pass with nothing added and compares its logits with the full pass's; on a mismatch (or
a model whose forward takes no cache) it returns None and the caller runs full passes.
"""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.nn as nn

from kledger.editors.gate import memories, memory_off
from kledger.editors.hooks import edit_output, logits_at
from kledger.editors.kvcache import build_cache, cache_layers, returned_cache, with_cache

log = logging.getLogger(__name__)

#: largest |logit| difference between a suffix pass and the full pass that ``prepare`` accepts (fp32)
TOLERANCE = 1e-3


def _logits(model: nn.Module, index: torch.Tensor, **inputs) -> tuple[torch.Tensor, object]:
    """Logits at ``index`` (rows × P) of one forward pass, and the pass's cache."""
    logits, out = logits_at(model, index, **inputs)
    return logits, returned_cache(out)


class SuffixPass:
    """Cached prefixes of a right-padded batch (see the module docstring). ``logits(rows, path, add)``
    is the logits at ``index`` of rows ``rows`` with ``add`` (len(rows) × d) added to module ``path``'s
    output at each row's ``start`` token, computed over the suffixes alone."""

    def __init__(self, model: nn.Module, kv: list[tuple[torch.Tensor, torch.Tensor]], start: torch.Tensor,
                 ids: torch.Tensor, index: torch.Tensor, extra: dict[str, torch.Tensor]) -> None:
        self.model, self.kv, self.start, self.ids, self.index, self.extra = model, kv, start, ids, index, extra

    @classmethod
    @torch.no_grad()
    def prepare(cls, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, start: torch.Tensor,
                index: torch.Tensor) -> "SuffixPass | None":
        """The full pass (memories on, nothing added), its cache kept; None where a suffix pass does not
        reproduce it. ``start`` (rows): each row's first rerun token; ``index`` (rows × P): the positions
        whose logits are wanted, all ≥ the row's start."""
        if bool((index < start[:, None]).any()):
            raise ValueError("suffix pass: expected every wanted position at or after its row's start, found one before")
        n = int(attention_mask.sum(1).max())
        full, cache = _logits(model, index, input_ids=input_ids[:, :n], attention_mask=attention_mask[:, :n],
                              use_cache=True)
        layers = cache_layers(cache)
        if layers is None:
            log.info("suffix pass: the model returned no key/value cache; running full passes")
            return None
        width = int(start.max())  # the cached positions any row needs
        kv = [(k[:, :, :width], v[:, :, :width]) for k, v in layers]
        # a row's last token is input only: the logits wanted are at most at the one before it
        s = int((index.max(1).values - start).max()) + 1
        cols = (start[:, None] + torch.arange(s, device=start.device)).clamp(max=n - 1)
        extra = {}
        for mem in memories(model):
            added = mem.added(input_ids[:, :n])
            if added is not None:
                extra[mem.path] = added.gather(1, cols.to(added.device)[..., None].expand(-1, -1, added.shape[-1]))
        out = cls(model, kv, start, input_ids[:, :n].gather(1, cols), index - start[:, None], extra)
        rows = torch.arange(input_ids.shape[0], device=start.device)
        try:
            mine = out.logits(rows, None, None)
        except (TypeError, ValueError, RuntimeError) as e:  # a forward that takes no cache or 4-D mask
            log.info("suffix pass: not supported by this model (%s); running full passes", e)
            return None
        gap = float((mine - full).abs().max())
        if gap > TOLERANCE:
            log.warning("suffix pass: logits differ from the full pass by %.2g; running full passes", gap)
            return None
        return out

    def _mask(self, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        width, s = self.kv[0][0].shape[2], self.ids.shape[1]
        dev = self.ids.device
        cached = torch.arange(width, device=dev)[None, :] < self.start[rows][:, None]  # rows × width
        causal = torch.ones(s, s, dtype=torch.bool, device=dev).tril()
        ok = torch.cat([cached[:, None, :].expand(-1, s, -1), causal[None].expand(len(rows), -1, -1)], -1)
        return torch.zeros(ok.shape, dtype=dtype, device=dev).masked_fill(~ok, torch.finfo(dtype).min)[:, None]

    def logits(self, rows: torch.Tensor, path: str | None, add: torch.Tensor | None) -> torch.Tensor:
        cache = build_cache(self.model, [(k[rows.to(k.device)], v[rows.to(v.device)]) for k, v in self.kv])
        s = self.ids.shape[1]
        dtype = self.kv[0][0].dtype
        adds = {p: t[rows.to(t.device)] for p, t in self.extra.items()}
        if path is not None and add is not None:
            at = adds.get(path, torch.zeros(len(rows), s, add.shape[-1], device=add.device, dtype=add.dtype))
            adds[path] = torch.cat([at[:, :1] + add[:, None].to(at.dtype), at[:, 1:]], 1)
        with contextlib.ExitStack() as stack:
            stack.enter_context(memory_off(self.model))
            for p, t in adds.items():
                stack.enter_context(edit_output(self.model, p, lambda y, t=t: y + t.to(y.device, y.dtype)))
            logits, _ = _logits(self.model, self.index[rows], input_ids=self.ids[rows],
                                attention_mask=self._mask(rows, dtype), **with_cache(self.model, cache),
                                position_ids=self.start[rows][:, None] + torch.arange(s, device=rows.device),
                                use_cache=True)
        return logits
