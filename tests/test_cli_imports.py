"""Start-up cost of the CLI: read commands must not import torch, transformers or the editors.

Importing torch alone takes seconds; ``kledger log``/``show``/``status``/``verify``/``--version``
only read the ledger. Commands are loaded on demand from ``kledger.cli.main.COMMANDS``; these
tests keep that table in step with the commands the modules define.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import subprocess
import sys
import textwrap

import torch

import kledger.cli
from kledger.ledger.deltas import Delta, SparseDelta
from kledger.ledger.store import Ledger

from conftest import append_edit, new_ledger, tensor_delta

HEAVY = ("torch", "transformers", "safetensors.torch", "kledger.editors", "kledger.workspace", "kledger.rebase",
         "kledger.auditing", "kledger.audit.auditor",
         "kledger.ledger.deltas", "kledger.ledger.compose",
         "numpy")  # `show` sums small deltas in plain Python (numpy alone costs ~0.1 s to import)


def _run_python(code: str) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON line last."""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


_LOADED = """
import json, sys
heavy = [m for m in sys.modules if any(m == h or m.startswith(h + ".") for h in %r)]
print(json.dumps({"heavy": sorted(heavy), "duckdb": "duckdb" in sys.modules, "out": OUT}))
""" % (HEAVY,)


def test_importing_the_cli_imports_no_torch_nor_duckdb():
    res = _run_python("import kledger.cli.main\nOUT = None\n" + _LOADED)
    assert res["heavy"] == [], f"`import kledger.cli.main` pulled in {res['heavy']}"
    assert not res["duckdb"], "`kledger --version` should not need duckdb"


def _small_ledger(tmp_path) -> Ledger:
    L = new_ledger(tmp_path)
    g = torch.Generator().manual_seed(0)
    d1 = Delta({"w": SparseDelta((6, 8), torch.tensor([1, 5, 9]), torch.randn(3, generator=g))})
    d2 = Delta({"w": tensor_delta("lowrank", (6, 8), g, rank=2)})
    append_edit(L, d1, "a is in", method="fake")
    append_edit(L, d2, "b is in", " y", method="fake")
    L.revert("HEAD~1")
    return L


def test_read_commands_import_no_torch(tmp_path):
    L = _small_ledger(tmp_path)
    code = textwrap.dedent(f"""
    import io, contextlib
    from kledger.cli.main import cli
    OUT = {{}}
    for args in (["log", "-n", "20"], ["show", "HEAD~1"], ["show", "HEAD"], ["--json", "show", "HEAD~2"],
                 ["status"], ["verify"], ["log", "--all"], ["branches"]):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            try:
                cli.main(args=["--ledger", {str(L.root)!r}, *args], prog_name="kledger", standalone_mode=False)
            except SystemExit as exc:
                assert not exc.code, (args, exc.code)
        OUT[" ".join(args)] = buf.getvalue()
    """) + _LOADED
    res = _run_python(code)
    assert res["heavy"] == [], f"read commands pulled in {res['heavy']}"
    out = res["out"]
    assert "[reverted]" in out["log -n 20"] and "(HEAD)" in out["log -n 20"]
    assert "active edits: 1" in out["status"] and "events:       4" in out["status"]
    assert out["verify"].startswith("ok: 4 rows, 2 objects verified")
    shown = json.loads(out["--json show HEAD~2"])
    assert shown["active_at_head"] is False and shown["delta"]["w"]["nnz"] == 3
    assert "rank 2" in out["show HEAD~1"]


def test_python_dash_m_runs_the_cli(tmp_path):
    L = _small_ledger(tmp_path)
    p = subprocess.run([sys.executable, "-m", "kledger.cli.main", "--ledger", str(L.root), "log", "-n", "2"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert len(p.stdout.strip().splitlines()) == 2


def test_command_table_matches_the_commands_the_modules_define():
    from kledger.cli.main import COMMANDS, cli

    for mod in pkgutil.iter_modules(kledger.cli.__path__):
        importlib.import_module(f"kledger.cli.{mod.name}")
    assert set(cli.commands) == set(COMMANDS), "add new commands to kledger.cli.main.COMMANDS"
    for name, cmd in cli.commands.items():
        assert cmd.callback.__module__ == f"kledger.cli.{COMMANDS[name]}", name


def test_merge_strategies_and_options_come_from_the_registry():
    """The `merge` command repeats no strategy name or option: both come from kledger.merging,
    which the light commands (`branch`, `switch`, `branches`) import without torch."""
    from kledger.cli.main import cli
    from kledger.merging import STRATEGIES, all_options

    merge = cli.get_command(None, "merge")
    params = {p.name: p for p in merge.params}
    assert list(params["strategy"].type.choices) == list(STRATEGIES) == ["sum", "resolve", "ties"]
    for o in all_options():
        assert params[o.name].default == o.default and params[o.name].help == o.help
    assert params["density"].default == 0.2
    res = _run_python("import kledger.merging\nOUT = None\n" + _LOADED)
    assert res["heavy"] == [], f"`import kledger.merging` pulled in {res['heavy']}"
