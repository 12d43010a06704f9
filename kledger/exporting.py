"""Exports beyond the full model folder: a PEFT LoRA adapter of the active edits, and the model card
both kinds of export carry (``README.md`` in the Hugging Face convention).

``export_peft`` writes ``adapter_config.json`` + ``adapter_model.safetensors`` (loadable by
``peft.PeftModel.from_pretrained(base, OUT)``; vLLM and TGI serve such adapters per request),
``kledger.json`` (provenance) and ``README.md``. The LoRA factors come from
``kledger.ledger.adapter.lora_factors``; this module maps them onto modules: an ``nn.Linear``
stores ΔW as out×in, so ``lora_B = left`` and ``lora_A = right``; GPT-2's ``Conv1D`` stores it
in×out and peft runs it with ``fan_in_fan_out`` (it adds ``(B A)ᵀ``), so ``lora_B = rightᵀ`` and
``lora_A = leftᵀ``. ``lora_alpha`` equals each module's rank (``alpha_pattern``/``rank_pattern``),
so peft's scale ``alpha / r`` is 1. The base model is never loaded (only its config, on the meta
device, to learn each edited module's type).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from kledger.ledger.errors import UsageError
from kledger.ledger.records import Event
from kledger.ledger.store import Ledger

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass
class PeftExport:
    out: Path
    version: Event
    active: list[str]
    modules: dict[str, dict[str, Any]]  # module name → {rank, summed_rank, rel_error, kinds, layout}
    fan_in_fan_out: bool
    bytes: int
    seconds: float
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def max_rel_error(self) -> float:
        return max((m["rel_error"] for m in self.modules.values()), default=0.0)

    def to_json(self) -> dict[str, Any]:
        return {"out": str(self.out), "format": "peft", "version": self.version.id, "active_events": self.active,
                "modules": self.modules, "max_rel_error": self.max_rel_error, "fan_in_fan_out": self.fan_in_fan_out,
                "adapter_bytes": self.bytes, "seconds": round(self.seconds, 3)}


def _model_path(ledger: Ledger, model_spec: str | None) -> Path:
    from kledger.editors.models import resolve_model_path

    base = ledger.base_model()
    return resolve_model_path(model_spec or base.get("path") or base["spec"])


def module_layouts(model_path: str | os.PathLike, modules: Sequence[str]) -> dict[str, str]:
    """{module name: "linear" | "conv1d"} for the edited modules, from the model's config alone
    (built on the meta device: no weights are read). Anything else is refused."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    cfg = AutoConfig.from_pretrained(str(model_path))
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(cfg)
    out = {}
    for name in modules:
        try:
            mod = skeleton.get_submodule(name)
        except AttributeError:
            raise UsageError(f"expected the base model to have a module {name!r} (an edited tensor's), found none") from None
        if isinstance(mod, Conv1D):
            out[name] = "conv1d"
        elif isinstance(mod, torch.nn.Linear):
            out[name] = "linear"
        else:
            raise UsageError(f"{name}: expected a Linear or Conv1D module for a LoRA adapter, found"
                             f" {type(mod).__name__}; export the full model (--format full)")
    return out


def export_peft(ledger: Ledger, out_dir: str | os.PathLike, ref: str | Event = "HEAD", *, max_rank: int | None = None,
                lossy: bool = False, overwrite: bool = False, model_spec: str | None = None) -> PeftExport:
    """Write the active edits at ``ref`` as a PEFT LoRA adapter folder (see the module docstring)."""
    import torch
    from safetensors.torch import save_file

    from kledger.ledger.adapter import lora_factors
    from kledger.ledger.compose import EXPORT_MARK, check_export_target
    from kledger.ledger.objects import replacing_dir

    t0 = time.perf_counter()
    out = check_export_target(ledger, out_dir, overwrite)
    with ledger.session():
        version = ref if isinstance(ref, Event) else ledger.resolve(ref)
        ledger.check_rows(ledger.graph.ancestors(version))
        active = ledger.active_refs(version)
        deltas = ledger.load_deltas(active)
        head_hash = ledger.events(limit=1)[0].hash
    if not active:
        raise UsageError(f"expected active edits at {version.id} to export as an adapter, found none")
    names = {}
    for ref_, d in zip(active, deltas):
        for tname, td in d.tensors.items():
            if td.kind != "lowrank":
                names.setdefault(tname, ref_.id)
    factors = lora_factors(deltas, max_rank=max_rank, lossy=lossy, names=names)
    for tname in factors:
        if not tname.endswith(".weight"):
            raise UsageError(f"{tname}: expected weight tensors only in a LoRA adapter, found a delta on {tname}")
    modules = {t[: -len(".weight")]: f for t, f in factors.items()}
    layouts = module_layouts(_model_path(ledger, model_spec), list(modules))
    kinds = set(layouts.values())
    if len(kinds) > 1:
        raise UsageError("expected edited modules of one kind for one adapter (peft's fan_in_fan_out is global),"
                         f" found Linear and Conv1D ones: {sorted(layouts)}")
    fan_in_fan_out = kinds == {"conv1d"}
    tensors: dict[str, torch.Tensor] = {}
    report: dict[str, dict[str, Any]] = {}
    for mod, f in modules.items():
        if fan_in_fan_out:
            b, a = f.right.T, f.left.T
        else:
            b, a = f.left, f.right
        tensors[f"base_model.model.{mod}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{mod}.lora_B.weight"] = b.contiguous()
        report[mod] = f.to_json() | {"layout": layouts[mod]}
    r = max(f.rank for f in modules.values())
    base = ledger.base_model()
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base.get("path") or base["spec"],
        "r": r, "lora_alpha": r, "rank_pattern": {m: f.rank for m, f in modules.items()},
        "alpha_pattern": {m: f.rank for m, f in modules.items()}, "target_modules": sorted(modules),
        "fan_in_fan_out": fan_in_fan_out, "lora_dropout": 0.0, "bias": "none", "use_rslora": False,
        "use_dora": False, "inference_mode": True, "init_lora_weights": True, "modules_to_save": None,
        "revision": None,
    }
    provenance = {
        "kledger_version": __import__("kledger").__version__, "format": "peft", "ledger": str(ledger.root.resolve()),
        "version": version.id, "version_hash": version.hash, "ledger_head_hash": head_hash, "base_model": base,
        "active_events": [e.id for e in active], "edited_tensors": sorted(factors), "modules": report,
        "max_rank": max_rank, "lossy": lossy,
    }
    card = model_card(ledger, version, library_name="peft", head_hash=head_hash,
                      extra=[f"LoRA adapter: {len(modules)} modules, rank ≤ {r}, lora_alpha = rank (scale 1)"
                             + (f"; largest relative error of the SVD compression {max(m['rel_error'] for m in report.values()):.3g}"
                                if any(m["rel_error"] for m in report.values()) else "; exact (no compression)")])
    with replacing_dir(out) as tmp:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / EXPORT_MARK).write_text(json.dumps(provenance, indent=2) + "\n")
        (tmp / "README.md").write_text(card)
    size = (out / ADAPTER_WEIGHTS).stat().st_size
    return PeftExport(out, version, [e.id for e in active], report, fan_in_fan_out, size,
                      time.perf_counter() - t0, provenance)


# --- model card ----------------------------------------------------------------------------------
def _cell(text: Any) -> str:
    return str(text if text is not None else "").replace("|", "\\|").replace("\n", " ")


def last_audit(ledger: Ledger, version: Event) -> Event | None:
    """The latest audit of ``version`` or one of its ancestors, or None."""
    from kledger.audit import events as E

    anc = ledger.ancestors(version)
    return E.latest(ledger, "audit", where=lambda ev: E.config_of(ev).get("version") in anc)


def model_card(ledger: Ledger, version: Event, *, library_name: str, head_hash: str | None = None,
               extra: Sequence[str] = ()) -> str:
    """``README.md`` for an export of ``version``: YAML front matter (``base_model``, ``tags``,
    ``library_name``), the active edits (prompt → target, method, event id), the last audit's
    figures and the ledger head hash."""
    base = ledger.base_model()
    active = ledger.active(version)
    head_hash = head_hash or ledger.events(limit=1)[0].hash
    audit = last_audit(ledger, version)
    base_name = base.get("spec") or base.get("path")
    lines = ["---", f"base_model: {json.dumps(str(base_name))}", "tags:", "- knowledge-editing", "- kledger",
             f"library_name: {library_name}", "---", "",
             f"# {Path(str(base_name)).name} + {len(active)} knowledge edits", "",
             f"Knowledge edits recorded with kledger on `{base_name}`"
             f" (fingerprint `{str(base.get('fingerprint', ''))[:16]}`), exported at version `{version.id}`.", ""]
    lines += [f"- {x}" for x in extra]
    lines.append(f"- base precision: `{base.get('dtype') or 'float32'}` (the edits are stored in float32; a full"
                 " export holds base + edits summed in float32 and rounded once into this precision)")
    lines += [f"- ledger head hash: `{head_hash}`", f"- version hash: `{version.hash}`", "",
              "## Active edits", ""]
    if active:
        lines += ["| event | type | method | prompt | → target |", "|---|---|---|---|---|"]
        for ev in active:
            reqs = ev.request if isinstance(ev.request, list) else [ev.request]
            for req in reqs:
                req = req if isinstance(req, Mapping) else {}
                lines.append(f"| `{ev.id}` | {ev.type} | {_cell(ev.method)} | {_cell(req.get('prompt'))} |"
                             f" {_cell(req.get('target_new', req.get('target')))} |")
    else:
        lines.append("None: this is the base model.")
    lines += ["", "## Last audit", ""]
    if audit is None:
        lines.append("No audit recorded for this version or its ancestors (`kledger audit`).")
    else:
        m = audit.metrics or {}
        lines.append(f"Audit event `{audit.id}` of version `{(audit.config or {}).get('version')}`:"
                     f" {m.get('status', '?')}.")
        lines += ["", "| figure | value |", "|---|---|"]
        for k, v in sorted(m.items()):
            if isinstance(v, (int, float, str)) and not isinstance(v, bool):
                lines.append(f"| {k} | {_cell(v)} |")
    lines += ["", "Provenance: `kledger.json` (ledger, version, active events); check it with `kledger verify`.", ""]
    return "\n".join(lines)
