"""Forward hooks only through context managers that always remove them (like baukit's Trace).

``Trace`` records a module's input and/or output; ``EditOutput`` replaces a module's output by a
function of it. Both remove their hooks on exit, also when the body raises.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Sequence

import torch
import torch.nn as nn

from kledger.editors.sites import get_module


def _first(x):
    return x[0] if isinstance(x, tuple) else x


class Trace(contextlib.AbstractContextManager):
    """Record the input (first positional arg) and/or output of one module during forward passes.

    ``detach=False`` keeps the graph (needed when gradients flow through the recorded tensor).
    """

    def __init__(self, model: nn.Module, path: str, *, retain_input: bool = False,
                 retain_output: bool = True, detach: bool = True) -> None:
        self.module = get_module(model, path)
        self.retain_input, self.retain_output, self.detach = retain_input, retain_output, detach
        self.input: torch.Tensor | None = None
        self.output: torch.Tensor | None = None
        self._handle = None

    def _hook(self, module, inputs, output):
        if self.retain_input:
            x = inputs[0]
            self.input = x.detach() if self.detach else x
        if self.retain_output:
            y = _first(output)
            self.output = y.detach() if self.detach else y

    def __enter__(self) -> "Trace":
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


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
