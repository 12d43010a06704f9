"""Exporting a version whose active edits include the token-gated edit memory (``--method memory``).

A plain checkpoint cannot hold the memory: ``from_pretrained`` would load the weights and drop the
entries, silently serving the unedited model. So such an export is a Hugging Face folder *with
remote code*: ``config.json`` has the model type ``kledger_memory``, which only
``modeling_kledger_memory.py`` defines (``auto_map``: a config class and a model class, the base
architecture's plus the memory, whose tensors are in the saved weights), and lists the memories
(``kledger_memory``: layer, hooked module, sizes). Load it with
``AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)``; without that flag
transformers refuses the unknown model type instead of loading the model without its edits. The memory's code in the file is the
source of ``editors/gate.py``'s ``GatedMemory`` at export time (one definition).
"""

from __future__ import annotations

import inspect
import json

import torch.nn as nn

from kledger.editors import gate

MODELING_FILE = "modeling_kledger_memory.py"
CLASS_NAME = "KledgerMemoryForCausalLM"
CONFIG_NAME = "KledgerMemoryConfig"
#: the model card's line on loading such an export
CARD_NOTE = ("Some edits live in kledger's token-gated edit memory (`modeling_kledger_memory.py`): load with"
             " `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`.")

_TEMPLATE = '''"""Written by kledger export: {arch} with kledger's token-gated edit memory (load with trust_remote_code=True)."""
import torch
import torch.nn as nn
from transformers import {arch}, {config}


class {cls_config}({config}):
    model_type = "kledger_memory"


{first}

{memory}

class {cls}({arch}):
    config_class = {cls_config}

    def __init__(self, config):
        super().__init__(config)
        holder = nn.ModuleDict()
        for spec in config.kledger_memory:
            mem = GatedMemory(spec["capacity"], spec["span"], spec["d_out"])
            holder[str(spec["layer"])] = mem
            mem.handles = [self.get_input_embeddings().register_forward_pre_hook(mem.read_tokens, with_kwargs=True),
                           self.get_submodule(spec["path"]).register_forward_hook(mem.gate)]
        self.kledger_memory = holder
'''


def memory_specs(model: nn.Module) -> list[dict]:
    """The memories a model carries: layer, hooked module path and sizes (JSON)."""
    holder = getattr(model, gate.MEMORY_ATTR, None)
    out = []
    for layer, mem in (holder.items() if holder is not None else ()):
        out.append({"layer": int(layer), "path": mem.path, "capacity": mem.ids.shape[0], "span": mem.ids.shape[1],
                    "d_out": mem.values.shape[1]})
    return out


def prepare(model: nn.Module, with_memory: bool) -> dict[str, str]:
    """Make ``model`` ready to be saved. ``with_memory``: some active edit lives in the memory, so the
    returned {file: text} holds the modeling file and a ``config.json`` (written over the saved one) whose
    ``model_type`` only that file defines, with ``auto_map``/``architectures``/``kledger_memory``;
    otherwise any (empty) memory is taken off the model and nothing extra is written."""
    if not with_memory:
        gate.remove_memory(model)
        return {}
    specs = memory_specs(model)
    arch, config_cls = type(model).__name__, type(model.config).__name__
    source = _TEMPLATE.format(arch=arch, config=config_cls, cls=CLASS_NAME, cls_config=CONFIG_NAME,
                              first=inspect.getsource(gate._first), memory=inspect.getsource(gate.GatedMemory))
    config = model.config.to_dict()
    module = MODELING_FILE[:-3]
    config.update(model_type="kledger_memory", architectures=[CLASS_NAME], kledger_memory=specs,
                  auto_map={"AutoConfig": f"{module}.{CONFIG_NAME}", "AutoModelForCausalLM": f"{module}.{CLASS_NAME}"})
    return {MODELING_FILE: source, "config.json": json.dumps(config, indent=2, sort_keys=True) + "\n"}
