"""The key/value cache: the one place that speaks transformers' API for it, whose names moved across versions.

transformers 5.x renamed the forward argument and the output field ``past_key_values`` to ``cache`` and warns on
the old name (a warning that lands in the CLI's output); the versions from the project's floor (4.45) know only the
old name. Callers pass and read caches through these helpers and never name either.
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn as nn


@functools.lru_cache(maxsize=None)
def _kwarg(cls: type) -> str:
    params = inspect.signature(cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def with_cache(model: nn.Module, cache) -> dict:
    """The forward keyword argument that hands ``model`` a cache (None: an empty one it fills)."""
    return {_kwarg(type(model)): cache}


def returned_cache(out):
    """The cache a forward pass returned (``use_cache=True``), or None."""
    for name in ("cache", "past_key_values"):
        if name in out:  # a ModelOutput holds only the fields that are set: reading keys never warns
            return out[name]
    return None


def cache_layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Every layer's (keys, values) of a returned cache (batch × heads × positions × head size), or None."""
    layers = getattr(cache, "layers", None)
    if not layers or any(getattr(lay, "keys", None) is None for lay in layers):
        return None
    return [(lay.keys, lay.values) for lay in layers]


def build_cache(model: nn.Module, kv: list[tuple[torch.Tensor, torch.Tensor]]):
    """A cache holding ``kv`` (per layer (keys, values)) for a forward pass of ``model``; the pass appends to a
    copy, ``kv``'s tensors stay as they are."""
    from transformers import DynamicCache  # noqa: PLC0415

    return DynamicCache(kv, config=model.config)
