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


_LLAMA = Sites(
    family="llama",
    layers="model.layers",
    layer="model.layers.{}",
    mlp="model.layers.{}.mlp",
    mlp_in=("model.layers.{}.mlp.gate_proj", "model.layers.{}.mlp.up_proj"),
    mlp_out="model.layers.{}.mlp.down_proj",
    mlp_out_transposed=False,
    final_norm="model.norm",
    lm_head="lm_head",
)

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

_GEMMA3 = Sites(
    family="gemma3",
    layers="model.language_model.layers",
    layer="model.language_model.layers.{}",
    mlp="model.language_model.layers.{}.mlp",
    mlp_in=("model.language_model.layers.{}.mlp.gate_proj", "model.language_model.layers.{}.mlp.up_proj"),
    mlp_out="model.language_model.layers.{}.mlp.down_proj",
    mlp_out_transposed=False,
    final_norm="model.language_model.norm",
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


def get_module(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise UsageError(f"expected module {path!r} in {type(model).__name__}, found none") from None
