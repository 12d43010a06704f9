"""Every forward hook kledger installs, each behind a context manager that always removes it.

Like baukit's ``Trace``: hooks exist only inside a ``with`` block and are removed on exit, also
when the body raises (a ``StopForward`` that ends a pass early included).

* ``Trace`` / ``TraceDict``  record a module's input and/or output;
* ``StopAfter``              record like ``Trace``, then end the forward pass (``StopForward``);
* ``KeyAccumulator``         sum ``XᵀX`` of a module's input over the unmasked positions;
* ``edit_output``            replace a module's output by a function of it;
* ``gradient_through``       let the loss gradient reach some weights only at masked positions;
* ``LogitsAt``               give the output embedding only the hidden states at chosen positions
                             (``logits_at``: one pass's logits at those positions);
* ``follow_devices``         (a model split over devices) move each module's inputs to its own
                             device, and the model's outputs back to the device its inputs came on.

The hooks that stay for a model's life — the token-gated edit memory's — live in ``editors/gate.py``.

On a split model every recorded tensor (keys, outputs, gradients) is on the device of the module
it belongs to; ``input_device`` is where token ids go (the input embedding's device).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Sequence

import torch
import torch.nn as nn

from kledger.editors.sites import get_module

#: rows of ``XᵀX`` blocks buffered by ``KeyAccumulator`` before they are multiplied out
FLUSH_ROWS = 4096
#: ... and at most this many buffered values (rows × width): 4096 rows of SmolLM2's 1536-wide keys;
#: wider keys flush sooner (8192-wide: every 768 rows), so the buffers stay ~25 MB a layer at any width
FLUSH_ELEMENTS = 4096 * 1536


def _first(x):
    return x[0] if isinstance(x, tuple) else x


def rows_at(x: torch.Tensor, bi: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Rows ``x[bi, pos]`` (float64, detached), indexed on ``x``'s own device (split models)."""
    return x[bi.to(x.device), pos.to(x.device)].detach().double()


def input_device(model: nn.Module) -> torch.device:
    """The device token ids go to: the input embedding's (the first parameter's if none)."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    weight = getattr(emb, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight.device
    return next(model.parameters()).device


def module_device(module: nn.Module) -> torch.device:
    """The device of a module's first parameter (or buffer); cpu for a module holding neither."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def _to(x, device: torch.device):
    """``x`` with every tensor in it (tuples, lists, dicts) moved to ``device``; other objects as they are."""
    if isinstance(x, torch.Tensor):
        return x if x.device == device else x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(_to(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return x


def follow_devices(model: nn.Module, modules: Sequence[str]) -> list:
    """Permanent hooks for a model whose modules lie on several devices: each module in
    ``modules`` (and every module holding its own parameters or buffers outside them) gets its
    inputs moved to its own device before it runs; the model's output tensors (logits, loss,
    hidden states; not the KV cache) go back to the device of its first tensor input, so callers
    see logits where they put the ids. Returns the hook handles."""
    mapped = set(modules)
    hooked = []
    for name, mod in model.named_modules():
        parts = name.split(".") if name else []
        if any(".".join(parts[:i]) in mapped for i in range(1, len(parts))):
            continue  # inside a mapped module: on that module's device, its inputs already moved
        own = any(True for _ in mod.parameters(recurse=False)) or any(True for _ in mod.buffers(recurse=False))
        if name in mapped or (own and name):
            hooked.append(mod)
    handles = []
    for mod in hooked:
        dev = module_device(mod)

        def pre(m, args, kwargs, dev=dev):
            return _to(args, dev), _to(kwargs, dev)

        handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
    arrived: list[torch.device] = []

    def top_pre(m, args, kwargs):
        first = next((t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)), None)
        arrived.append(first.device if first is not None else input_device(m))

    def top_post(m, args, kwargs, output):
        dev = arrived.pop() if arrived else input_device(m)
        if output is None:  # the forward raised (a StopForward): nothing to move
            return None
        if isinstance(output, torch.Tensor):
            return _to(output, dev)
        for key in ("logits", "loss", "hidden_states", "attentions"):
            value = getattr(output, key, None) if not isinstance(output, tuple) else None
            if value is not None:
                output[key] = _to(value, dev)
        return output

    handles.append(model.register_forward_pre_hook(top_pre, with_kwargs=True))
    handles.append(model.register_forward_hook(top_post, with_kwargs=True, always_call=True))
    return handles


class _Hook(contextlib.AbstractContextManager):
    """A forward hook (``_hook``) on one module, registered on enter and removed on exit."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self._handle = None

    def _hook(self, module, inputs, output):  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def __enter__(self):
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


class Trace(_Hook):
    """Record the input (first positional arg) and/or output of one module during forward passes.

    ``detach=False`` keeps the graph (needed when gradients flow through the recorded tensor).
    """

    def __init__(self, model: nn.Module, path: str, *, retain_input: bool = False,
                 retain_output: bool = True, detach: bool = True) -> None:
        super().__init__(get_module(model, path))
        self.retain_input, self.retain_output, self.detach = retain_input, retain_output, detach
        self.input: torch.Tensor | None = None
        self.output: torch.Tensor | None = None

    def _hook(self, module, inputs, output):
        if self.retain_input:
            x = inputs[0]
            self.input = x.detach() if self.detach else x
        if self.retain_output:
            y = _first(output)
            self.output = y.detach() if self.detach else y


class TraceDict(contextlib.ExitStack):
    """Several ``Trace``s at once, indexed by module path."""

    def __init__(self, model: nn.Module, paths: Sequence[str], **kw) -> None:
        super().__init__()
        self.traces = {p: Trace(model, p, **kw) for p in paths}

    def __enter__(self) -> "TraceDict":
        super().__enter__()
        for t in self.traces.values():
            self.enter_context(t)
        return self

    def __getitem__(self, path: str) -> Trace:
        return self.traces[path]


class StopForward(Exception):
    """Raised by a hook to end a forward pass early (nothing above it is needed)."""


class StopAfter(Trace):
    """A ``Trace`` that records like ``Trace`` and then ends the forward pass (``StopForward``)."""

    def _hook(self, module, inputs, output):
        super()._hook(module, inputs, output)
        raise StopForward


class KeyAccumulator(_Hook):
    """Sum ``XᵀX`` of one module's input (its last dimension) over the selected positions.

    ``owner.mask`` (flattened bool, or None for all positions) selects rows at each call; rows
    are buffered and multiplied out ``FLUSH_ROWS`` at a time in fp32, the blocks summed in
    float64 (``sum``, ``count``). With ``stop=True`` the hook ends the forward pass afterwards.
    """

    def __init__(self, model: nn.Module, path: str, owner, stop: bool = False) -> None:
        super().__init__(get_module(model, path))
        self.owner, self.stop = owner, stop
        self.sum: torch.Tensor | None = None
        self.count = 0
        self._buf: list[torch.Tensor] = []
        self._rows = 0

    def _hook(self, module, inputs, output):
        x = inputs[0].detach()
        x = x.reshape(-1, x.shape[-1])
        if self.owner.mask is not None:
            x = x[self.owner.mask.to(x.device)]
        self._buf.append(x.float())
        self._rows += x.shape[0]
        if self._rows >= FLUSH_ROWS or self._rows * x.shape[-1] >= FLUSH_ELEMENTS:
            self.flush()
        if self.stop:
            raise StopForward

    def flush(self) -> None:
        if not self._buf:
            return
        x = torch.cat(self._buf)
        self._buf, self._rows = [], 0
        block = x.T @ x  # fp32 block, summed into float64 in place (no float64 copy of the block)
        if self.sum is None:
            self.sum = block.double()
        else:
            self.sum.add_(block)
        self.count += x.shape[0]


@contextlib.contextmanager
def edit_output(model: nn.Module, path: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replace ``module(path)``'s (first) output by ``fn(output)`` inside the block."""
    module = get_module(model, path)

    def hook(mod, inputs, output):
        if isinstance(output, tuple):
            return (fn(output[0]),) + tuple(output[1:])
        return fn(output)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def gradient_through(model: nn.Module, param_names: Sequence[str], mask: torch.Tensor | None) -> Iterator[None]:
    """Inside the block, the modules owning ``param_names`` use their weights only where ``mask``
    (rows × positions × 1) is True and a detached copy of them elsewhere: the loss gradient reaches
    those weights only through the masked positions (it still flows through every position's
    activations). Values are unchanged. No-op when ``mask`` is None; hooks always removed."""
    if mask is None:
        yield
        return
    from torch.func import functional_call

    busy: set[int] = set()

    def hook(module, inputs, output):
        if id(module) in busy:  # the frozen recomputation below calls the module again
            return None
        busy.add(id(module))
        try:
            frozen = functional_call(module, {n: p.detach() for n, p in module.named_parameters(recurse=False)},
                                     inputs)
        finally:
            busy.discard(id(module))
        return torch.where(mask.to(output.device), output, frozen)

    handles = []
    try:
        for name in dict.fromkeys(n.rsplit(".", 1)[0] for n in param_names):
            handles.append(model.get_submodule(name).register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


class LogitsAt(contextlib.AbstractContextManager):
    """The output embedding (LM head) sees only the hidden states at ``index`` (rows × P
    positions), so the logits are rows × P × vocabulary instead of rows × length × vocabulary.
    The head is most of a small model's cost per token (SmolLM2-135M: 49k × 576 of its 135M
    parameters). ``handle`` stays None when there is nothing to hook (no ``index``, or no
    separate output embedding): the caller then selects the positions from the full logits."""

    def __init__(self, model: nn.Module, index: torch.Tensor | None) -> None:
        self.model, self.index, self.handle = model, index, None

    def __enter__(self) -> "LogitsAt":
        head = self.model.get_output_embeddings() if self.index is not None else None
        if head is not None:
            idx = self.index

            def pre(module, args):
                h = args[0]
                i = idx.to(h.device)
                return (h.gather(1, i[..., None].expand(-1, -1, h.shape[-1])),) + tuple(args[1:])

            self.handle = head.register_forward_pre_hook(pre)
        return self

    def __exit__(self, *exc) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


def logits_at(model: nn.Module, index: torch.Tensor, **inputs):
    """One forward pass of ``model(**inputs)``: (its logits at ``index``, rows × P × vocabulary, and the
    pass's output). The LM head runs only at those positions where it can be hooked (``LogitsAt``)."""
    with LogitsAt(model, index) as head:
        out = model(**inputs)
        hooked = head.handle is not None
    logits = out.logits
    if not hooked:  # no separate output embedding: pick the positions from the full logits
        logits = logits.gather(1, index.to(logits.device)[..., None].expand(-1, -1, logits.shape[-1]))
    return logits, out
