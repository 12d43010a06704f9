"""CLI conventions (issue 14): the shared options go before or after the command's name, on every
command, from one definition (``kledger.cli.app.COMMON_OPTIONS``); ``status`` prints readable lines."""

from __future__ import annotations

import json

import click
import pytest

from kledger.cli.app import COMMON_OPTIONS, App
from kledger.cli.main import COMMANDS, cli

from conftest import invoke

FLAGS = ["--json", "--quiet", "--ledger", "/some/ledger", "--device", "cpu"]
EXPECTED = {"as_json": True, "quiet": True, "ledger_dir": "/some/ledger", "device": "cpu"}


def _dummy_args(cmd: click.Command) -> list[str]:
    """Values for a command's required arguments and options (parsing only: nothing runs)."""
    args: list[str] = []
    for p in cmd.params:
        if p.required and isinstance(p, click.Option):
            args += [p.opts[0], "x"]
    for p in cmd.params:
        if isinstance(p, click.Argument) and p.required:
            args += ["x"] * (p.nargs if p.nargs > 0 else 1)
    return args


def _parsed_app(before: list[str], name: str, after: list[str]) -> App:
    group_ctx = cli.make_context("kledger", [*before, name])
    cmd = cli.get_command(group_ctx, name)
    sub_ctx = cmd.make_context(name, [*_dummy_args(cmd), *after], parent=group_ctx)
    return sub_ctx.find_object(App)


@pytest.mark.parametrize("name", sorted(COMMANDS))
@pytest.mark.parametrize("position", ["before", "after"])
def test_shared_options_in_both_positions(name, position, monkeypatch):
    monkeypatch.delenv("KLEDGER_DIR", raising=False)
    app = _parsed_app(FLAGS, name, []) if position == "before" else _parsed_app([], name, FLAGS)
    assert {k: getattr(app, k) for k in EXPECTED} == EXPECTED
    # -q is the short form everywhere
    app = _parsed_app([], name, ["-q"])
    assert app.quiet and not app.as_json and app.device == "auto"


def test_every_command_has_the_one_definition():
    ctx = cli.make_context("kledger", ["log"])
    for name in COMMANDS:
        cmd = cli.get_command(ctx, name)
        opts = {o for p in cmd.params for o in getattr(p, "opts", ())}
        for flags, _attr, _kw in COMMON_OPTIONS:
            assert set(flags) <= opts, (name, flags)
        # declared once: no command keeps a private copy
        assert sum("--json" in getattr(p, "opts", ()) for p in cmd.params) == 1, name


def test_option_after_command_overrides_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("KLEDGER_DIR", "/from/env")
    assert _parsed_app([], "log", []).ledger_dir == "/from/env"
    assert _parsed_app([], "log", ["--ledger", str(tmp_path)]).ledger_dir == str(tmp_path)


def test_log_json_after_the_command_equals_before(led):
    a = invoke(["--ledger", led, "--json", "log"], catch_exceptions=False)
    b = invoke(["log", "--json", "--ledger", led], catch_exceptions=False)
    assert a.exit_code == b.exit_code == 0, (a.output, b.output)
    assert json.loads(a.output) == json.loads(b.output)
    assert json.loads(b.output)[0]["type"] == "init"


def test_status_is_readable(led):
    r = invoke(["status", "--ledger", led], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "{" not in r.output and "'" not in r.output
    lines = dict(line.split(":", 1) for line in r.output.splitlines())
    assert lines["branch"].strip() == "main"
    assert lines["active edits"].strip() == "0"
    data = json.loads(invoke(["status", "--json", "--ledger", led], catch_exceptions=False).output)
    assert data["branch"] == "main" and data["active_edits"] == 0


def test_quiet_prints_only_the_result(fake_ledger):
    from conftest import append_edit, sparse_delta

    append_edit(fake_ledger, sparse_delta("a", [1], [0.5]), "The sky is")
    loud = invoke(["revert", "HEAD", "--ledger", fake_ledger.root], catch_exceptions=False)
    assert loud.exit_code == 0 and loud.output.startswith("reverted HEAD → "), loud.output
    append_edit(fake_ledger, sparse_delta("a", [2], [0.5]), "The grass is")
    quiet = invoke(["revert", "HEAD", "-q", "--ledger", fake_ledger.root], catch_exceptions=False)
    assert quiet.exit_code == 0 and len(quiet.output.splitlines()) == 1 and "revert" in quiet.output, quiet.output
