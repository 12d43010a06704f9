"""Architecture facts: where the edited modules live in each model family.

These are facts about architectures, kept apart from method hyper-parameters (which live in each
editor's frozen config). A ``Sites`` entry maps abstract sites to module path templates with
``{}`` standing for the layer index, and says whether the MLP output projection stores its
weight transposed (GPT-2's ``Conv1D`` stores in×out; ``nn.Linear`` stores out×in).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from kledger.ledger.errors import UsageError


@dataclass(frozen=True)
class Sites:
    family: str
    layers: str  # the ModuleList of blocks
    layer: str  # one block ("{}" = index); its output is the residual stream after the block
    mlp: str  # the MLP module
    mlp_in: tuple[str, ...]  # input projections of the MLP (gate/up, or c_fc)
    mlp_out: str  # the output (down) projection: the key→value memory that locate-then-edit writes
    mlp_out_transposed: bool  # weight stored in×out (Conv1D) instead of out×in
    final_norm: str
    lm_head: str

    def param(self, template: str, layer: int) -> str:
        return template.format(layer) + ".weight"

    def mlp_out_param(self, layer: int) -> str:
        return self.param(self.mlp_out, layer)

    def mlp_in_params(self, layer: int) -> list[str]:
        return [self.param(t, layer) for t in self.mlp_in]


def _llama_like(family: str, prefix: str) -> Sites:
    """The Llama block layout under ``prefix`` (Llama, Mistral, Qwen2/3, Gemma 1–3)."""
    block = f"{prefix}.layers.{{}}"
    return Sites(family=family, layers=f"{prefix}.layers", layer=block, mlp=f"{block}.mlp",
                 mlp_in=(f"{block}.mlp.gate_proj", f"{block}.mlp.up_proj"), mlp_out=f"{block}.mlp.down_proj",
                 mlp_out_transposed=False, final_norm=f"{prefix}.norm", lm_head="lm_head")


_LLAMA = _llama_like("llama", "model")
_GEMMA3 = _llama_like("gemma3", "model.language_model")  # the text model inside Gemma 3's multimodal wrapper
_GPT2 = Sites(
    family="gpt2",
    layers="transformer.h",
    layer="transformer.h.{}",
    mlp="transformer.h.{}.mlp",
    mlp_in=("transformer.h.{}.mlp.c_fc",),
    mlp_out="transformer.h.{}.mlp.c_proj",
    mlp_out_transposed=True,
    final_norm="transformer.ln_f",
    lm_head="lm_head",
)

#: model_type (from the HF config) → sites. Llama-like families share one table.
SITES: dict[str, Sites] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma": _LLAMA,
    "gemma2": _LLAMA,
    "gemma3_text": _LLAMA,
    "gemma3": _GEMMA3,
    "gpt2": _GPT2,
}


def sites_for(model: nn.Module) -> Sites:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SITES:
        raise UsageError(
            f"expected a model type kledger knows ({', '.join(sorted(SITES))}), found {model_type!r}"
        )
    return SITES[model_type]


def num_layers(model: nn.Module) -> int:
    return len(get_module(model, sites_for(model).layers))


def early_window(n_layers: int) -> tuple[int, ...]:
    """The early-middle window the lifelong editors write (UltraEdit's layers, KNE's candidates): 4
    consecutive layers from 10 % of the depth (SmolLM2-135M, 30 layers: 3–6), earlier and narrower than
    MEMIT's (``locate.default_layers``); models of ≤ 4 layers use all."""
    if n_layers <= 4:
        return tuple(range(n_layers))
    start = min(max(1, round(0.1 * n_layers)), n_layers - 4)
    return tuple(range(start, start + 4))


def get_module(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise UsageError(f"expected module {path!r} in {type(model).__name__}, found none") from None
