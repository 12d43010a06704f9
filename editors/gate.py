"""The token-gated edit memory's module and the hooks that stay (``--method memory``, ``editors/memory.py``).

Unlike ``editors/hooks.py``'s context managers, these hooks are part of the edited model: the memory
sits beside the model like a parameter (its tensors are among ``named_parameters``), and its two hooks
— a pre-hook on the input embedding that reads the token ids, and a hook on one layer's MLP output
projection that adds the entries' values — stay until ``remove_memory``.

* ``GatedMemory``     the entries (token-id spans and values) and the gate;
* ``install_memory``  add a memory at a layer (idempotent; refuses other sizes);
* ``remove_memory``   take every memory and its hooks off a model;
* ``memory_off``      silence every memory inside a block;
* ``memories``        the memories a model holds.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn as nn

from kledger.editors.hooks import _first, module_device
from kledger.editors.sites import get_module
from kledger.ledger.errors import UsageError

#: attribute of the model holding the memories (an ``nn.ModuleDict`` by layer): their tensors are
#: named ``kledger_memory.<layer>.ids`` / ``.values`` among the model's parameters
MEMORY_ATTR = "kledger_memory"


def memory_prefix(layer: int) -> str:
    return f"{MEMORY_ATTR}.{int(layer)}"


def is_memory_tensor(name: str) -> bool:
    """Whether a tensor name is a memory's (zero in the base model, absent from its weight files)."""
    return name.startswith(MEMORY_ATTR + ".")


class GatedMemory(nn.Module):
    """``capacity`` entries, each a span of up to ``span`` token ids (last token first, two spellings per
    position: a word-initial token differs with and without a leading space) and one value.

    Entry e fires at token t when the ids of tokens t, t−1, …, t−m+1 are its span (m = the
    positions it uses); where several fire, the longest span wins (then the lowest slot). Its
    value is added to the hooked module's output at t. Ids are stored as id + 1 in fp32 (exact
    below 2²⁴), 0 meaning "no id": an entry is live while ``ids[e, 0, 0] > 0``, and an all-zero entry
    is a free slot. The token ids of a forward pass are read by a pre-hook on the input embedding
    (``install_memory``) and used once: a pass given ``inputs_embeds`` instead of ids sees no entry,
    and a cached generation step (one new token) sees only entries whose span is that token."""

    def __init__(self, capacity: int, span: int, d_out: int, device=None) -> None:
        super().__init__()
        zeros = lambda *s: nn.Parameter(torch.zeros(*s, device=device), requires_grad=False)  # noqa: E731
        self.ids, self.values = zeros(capacity, span, 2), zeros(capacity, d_out)
        self.enabled = True
        self.handles: list = []  # the embedding pre-hook and the module hook (set by ``install_memory``)
        self.path = ""
        self._tokens: torch.Tensor | None = None  # this forward pass's token ids (B × T)

    def read_tokens(self, module, args, kwargs=None):
        ids = args[0] if args else (kwargs or {}).get("input")
        self._tokens = ids if isinstance(ids, torch.Tensor) and not ids.is_floating_point() else None

    def which(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For token ids (B × T): (B·T,) index into the live entries of the entry that fires at each
        token, or −1; and the live entries' slots."""
        live = (self.ids[:, 0, 0] > 0).nonzero().flatten()
        b, t = tokens.shape
        out = torch.full((b * t,), -1, dtype=torch.long, device=self.ids.device)
        if not live.numel():
            return out, live
        want = self.ids[live].long() - 1  # L × span × 2, −1 = no id
        tok = tokens.to(self.ids.device).long()
        ok = (tok.reshape(-1, 1, 1) == want[None, :, 0]).any(-1)  # B·T × L: the last token matches
        cand = ok.any(1).nonzero().flatten()
        if not cand.numel():
            return out, live
        ok = ok[cand]
        length = torch.ones(len(live), device=self.ids.device)
        bi, ti = cand // t, cand % t
        for j in range(1, want.shape[1]):
            used = want[:, j, 0] >= 0
            if not bool(used.any()):
                break
            prev = torch.where(ti >= j, tok[bi, (ti - j).clamp(min=0)], torch.full_like(ti, -2))
            ok &= (prev[:, None, None] == want[None, :, j]).any(-1) | ~used
            length = length + used.float()
        score = torch.where(ok, length[None, :] - torch.arange(len(live), device=ok.device)[None, :] * 1e-6, -1.0)
        best, idx = score.max(1)
        hit = best > 0
        out[cand[hit]] = idx[hit]
        return out, live

    def added(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """What the memory adds at each token of ``tokens`` (B × T): B × T × d_out, or None where no entry fires."""
        which, live = self.which(tokens)
        hit = which >= 0
        if not bool(hit.any()):
            return None
        add = torch.zeros(which.shape[0], self.values.shape[1], device=self.values.device)
        add[hit] = self.values[live[which[hit]]]
        return add.view(*tokens.shape, -1)

    def gate(self, module, inputs, output):
        tokens, self._tokens = self._tokens, None  # used once: never a later pass's
        if not self.enabled or tokens is None:
            return None
        y = _first(output)
        if tuple(tokens.shape) != tuple(y.shape[:2]):
            return None
        add = self.added(tokens)
        if add is None:
            return None
        y = y + add.to(y.device, y.dtype)
        return (y,) + tuple(output[1:]) if isinstance(output, tuple) else y


def memories(model: nn.Module) -> list[GatedMemory]:
    """The model's memories (none on a model without one)."""
    return list(getattr(model, MEMORY_ATTR).values()) if hasattr(model, MEMORY_ATTR) else []


def install_memory(model: nn.Module, path: str, layer: int, capacity: int, span: int, d_out: int) -> GatedMemory:
    """The memory at ``layer`` (hooked on module ``path``), created empty if the model has none there.
    Its hooks stay for the model's life (the memory is part of the edited model)."""
    holder = getattr(model, MEMORY_ATTR, None)
    if holder is None:
        holder = nn.ModuleDict()
        model.add_module(MEMORY_ATTR, holder)
    key = str(int(layer))
    if key in holder:
        mem = holder[key]
        found = (mem.ids.shape[0], mem.ids.shape[1], mem.values.shape[1])
        if found != (capacity, span, d_out):
            raise UsageError(f"memory at layer {layer}: expected capacity×span×value {(capacity, span, d_out)},"
                             f" found {found} (a ledger's memory keeps the sizes of its first entry)")
        return mem
    module = get_module(model, path)
    mem = GatedMemory(capacity, span, d_out, device=module_device(module))
    holder[key] = mem
    mem.path = path
    mem.handles = [model.get_input_embeddings().register_forward_pre_hook(mem.read_tokens, with_kwargs=True),
                   module.register_forward_hook(mem.gate)]
    return mem


def remove_memory(model: nn.Module) -> None:
    """Take every memory (and its hook) off the model."""
    holder = getattr(model, MEMORY_ATTR, None)
    if holder is None:
        return
    for mem in holder.values():
        for h in mem.handles:
            h.remove()
    delattr(model, MEMORY_ATTR)


@contextlib.contextmanager
def memory_off(model: nn.Module) -> Iterator[None]:
    """Every memory of the model silent inside the block (restored on exit)."""
    mems = memories(model)
    was = [m.enabled for m in mems]
    for m in mems:
        m.enabled = False
    try:
        yield
    finally:
        for m, w in zip(mems, was):
            m.enabled = w
