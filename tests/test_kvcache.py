"""``editors/kvcache.py``: caches passed and read through the one helper, under the name this transformers
version uses — no deprecation warning (one in the CLI's output broke its JSON), and a cached step equals the
uncached pass."""

from __future__ import annotations

import warnings

import torch

from kledger.editors.kvcache import build_cache, cache_layers, returned_cache, with_cache
from kledger.editors.models import load_model


def test_a_cached_step_equals_the_full_pass_and_warns_nothing(tiny_dir):
    model, _, _ = load_model(str(tiny_dir), device="cpu")
    ids = torch.tensor([[3, 4, 5, 6]])
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        kv = cache_layers(returned_cache(model(input_ids=ids[:, :3], use_cache=True)))
        assert kv is not None and kv[0][0].shape[2] == 3
        step = model(input_ids=ids[:, 3:], **with_cache(model, build_cache(model, kv)), use_cache=True)
    full = model(input_ids=ids, use_cache=False).logits[:, -1]
    torch.testing.assert_close(step.logits[:, -1], full, atol=1e-5, rtol=1e-5)
    assert kv[0][0].shape[2] == 3  # the pass appended to the cache's copy, not to kv
    assert cache_layers(returned_cache(step))[0][0].shape[2] == 4
