"""The ``kledger`` command. The only place where exceptions become messages and exit codes.

Exit codes: 0 ok · 1 error · 2 usage · 3 audit threshold crossed · 4 integrity failure ·
75 ledger busy. Tracebacks only with ``KLEDGER_DEBUG=1``.
"""

from __future__ import annotations

import importlib
import logging
import json
import os
import sys
import traceback

import click

from kledger.cli.app import App, common_options
from kledger.ledger.errors import KledgerError


class _Group(click.Group):
    def get_command(self, ctx, cmd_name):
        if cmd_name not in self.commands and cmd_name in COMMANDS:
            importlib.import_module(f"kledger.cli.{COMMANDS[cmd_name]}")  # registers its commands on ``cli``
        return super().get_command(ctx, cmd_name)

    def add_command(self, cmd, name=None):
        common_options(cmd)  # --json/--quiet/--ledger/--device after the command's name too
        super().add_command(cmd, name)

    def list_commands(self, ctx):
        return sorted(set(self.commands) | set(COMMANDS))

    def invoke(self, ctx):
        debug = os.environ.get("KLEDGER_DEBUG") == "1"
        try:
            _check_arguments([*(getattr(ctx, "_protected_args", None) or ()), *ctx.args])
            return super().invoke(ctx)
        except KledgerError as exc:
            if debug:  # the traceback, and still the exit code scripts rely on
                traceback.print_exc(file=sys.stderr)
            click.echo(f"kledger: error: {_one_line(exc)}", err=True)
            _report_partial(ctx)
            ctx.exit(exc.exit_code)
        except BrokenPipeError:  # `kledger log | head`: the reader left; stop quietly
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            ctx.exit(0)
        except KeyboardInterrupt:
            if not _report_partial(ctx, interrupted=True):
                click.echo("kledger: interrupted; nothing was recorded by this command", err=True)
            ctx.exit(130)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except Exception as exc:  # a bug or an unexpected library error: still one line
            if debug:
                traceback.print_exc(file=sys.stderr)
            click.echo(f"kledger: error: {type(exc).__name__}: {_one_line(exc)}"
                       + ("" if debug else " (set KLEDGER_DEBUG=1 for a traceback)"), err=True)
            _report_partial(ctx)
            ctx.exit(1)


def _one_line(exc: BaseException, limit: int = 2000) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit] + " …"


def _check_arguments(args) -> None:
    """Every argument must be text (a lone surrogate is a byte that is not UTF-8: usage error)."""
    from kledger.ledger.errors import UsageError

    for a in args:
        if isinstance(a, str):
            try:
                a.encode("utf-8")
            except UnicodeEncodeError:
                raise UsageError(f"expected UTF-8 text in every argument, found {ascii(a)[:80]}") from None


def _report_partial(ctx, interrupted: bool = False) -> bool:
    """After a stop: say on stderr which events this command had already recorded (a batch
    stopped part-way is not rolled back: each fact is its own event). True if there were any."""
    app = ctx.find_object(App)
    recorded = list(getattr(app, "recorded", None) or ())
    if not recorded:
        return False
    ids = ", ".join(e.id for e in recorded)
    what = "interrupted" if interrupted else "stopped"
    click.echo(f"kledger: {what} after recording {len(recorded)} event(s): {ids}", err=True)
    if getattr(app, "as_json", False):  # scripts read what was recorded from stdout
        click.echo(json.dumps({"stopped": what, "recorded": [{"id": e.id, "seq": e.seq, "type": e.type,
                                                               "request": e.request} for e in recorded]}))
    return True


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.version_option(package_name="kledger")
@click.pass_context
def cli(ctx, verbose):
    """kledger: auditable, reversible knowledge editing with an append-only ledger.

    --json, -q/--quiet, --ledger and --device go before or after the command's name."""
    if verbose:  # asked for: more of kledger's own log output (the process's handlers print it)
        logging.getLogger("kledger").setLevel(logging.WARNING - 10 * min(verbose, 2))
    ctx.ensure_object(App).verbose = verbose  # the shared options (cli/app.py) fill in the rest


common_options(cli, top_level=True)


#: Which module of ``kledger.cli`` defines each command. A command's module is imported when the
#: command is run (or listed by ``--help``), so ``kledger log``/``show``/``status``/``verify``
#: never import torch, transformers or the editors. A new command module must be listed here
#: (tests/test_cli_imports.py checks that this table and the commands the modules define agree).
COMMANDS = {
    "init": "edit", "add": "edit", "revert": "edit",
    "log": "inspect", "show": "inspect", "status": "inspect", "verify": "inspect", "generate": "inspect",
    "export": "export",
    "branch": "branch", "switch": "branch", "branches": "branch", "merge": "branch",
    "audit": "audit",
    "tag": "versions", "tags": "versions", "diff": "versions",
    "forget": "unlearn", "learn": "unlearn",  # UNLEARN / LEARN
}


def configure_process() -> None:
    """What the ``kledger`` program sets up for its own process: log lines on stderr, quiet
    libraries, the Hugging Face hub offline. Only ``main`` calls it; code that invokes ``cli``
    in-process keeps its own environment and logging configuration."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    # transformers is imported only by commands that load a model (it costs seconds): these make
    # it quiet when it is
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.basicConfig(level=logging.WARNING, format="kledger: %(message)s", stream=sys.stderr)
    for noisy in ("transformers", "accelerate", "huggingface_hub", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def main(argv=None) -> None:
    """The ``kledger`` program (console script and ``python -m kledger.cli.main``)."""
    configure_process()
    cli.main(args=argv, prog_name="kledger")


if __name__ == "__main__":  # pragma: no cover
    # ``python -m kledger.cli.main``: run the module the command modules register on, not this copy
    from kledger.cli.main import main as _main

    _main()
