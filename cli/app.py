"""Shared state of one CLI invocation: options, ledger lookup, model loading, output helpers."""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable

import click


if TYPE_CHECKING:  # duckdb is imported by the first command that opens the ledger (not by --version)
    from kledger.ledger.store import Ledger

log = logging.getLogger("kledger")


@dataclass
class App:
    ledger_dir: str | None = None
    as_json: bool = False
    quiet: bool = False
    device: str = "auto"
    device_map: str | None = None
    verbose: int = 0
    _ledger: Ledger | None = field(default=None, repr=False)
    #: events this command has recorded so far (reported if it stops part-way: see cli/main.py)
    recorded: list = field(default_factory=list, repr=False)

    # --- ledger --------------------------------------------------------------------------
    def ledger(self) -> Ledger:
        if self._ledger is None:
            from kledger.ledger.store import Ledger

            self._ledger = Ledger.open(self.ledger_dir)
        return self._ledger

    # --- models --------------------------------------------------------------------------
    def load_base(self, model_spec: str | None = None):
        """Load the ledger's base model (``--model``: a copy of it, refused if its fingerprint differs)."""
        from kledger.workspace import Workspace

        ws = Workspace(self.ledger(), device=self.device, device_map=self.device_map, model_spec=model_spec)
        self.progress_note(f"loading base model {model_spec or self.ledger().base_model()['spec']}")
        return ws.load_base()

    # --- output --------------------------------------------------------------------------
    @property
    def show_progress(self) -> bool:
        return not self.quiet and not self.as_json and sys.stderr.isatty()

    def progress(self, iterable: Iterable | None = None, total: int | None = None, desc: str = ""):
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, disable=not self.show_progress, file=sys.stderr,
                    leave=False, dynamic_ncols=True)

    def progress_note(self, msg: str) -> None:
        if self.show_progress or self.verbose:
            log.info(msg)

    def emit(self, data: Any, text: str | None = None) -> None:
        """Print JSON (with --json) or the human text."""
        if self.as_json:
            click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))
        elif text is not None:
            click.echo(text)


pass_app = click.make_pass_decorator(App)


# --- the options every command takes, before or after its name --------------------------------
#: (flags, App attribute, extra click.Option arguments): the ONE definition of the shared options.
#: ``kledger --json log`` and ``kledger log --json`` are the same; ``common_options`` puts them on
#: the ``kledger`` group and on every command registered on it (cli/main.py's ``_Group``).
COMMON_OPTIONS: tuple[tuple[tuple[str, ...], str, dict[str, Any]], ...] = (
    (("--ledger",), "ledger_dir", {"metavar": "DIR", "help": "Ledger folder (.kledger or its parent)."
                                   " Default: $KLEDGER_DIR, else found by walking up from here."}),
    (("--json",), "as_json", {"is_flag": True, "help": "Machine-readable JSON output (shape: docs/schemas/)."}),
    (("-q", "--quiet"), "quiet", {"is_flag": True, "help": "Only the result: no progress bars, notes or extra lines."}),
    (("--device",), "device", {"metavar": "DEVICE", "help": "auto (default), cpu or cuda[:N]."}),
    (("--device-map",), "device_map", {"metavar": "auto|balanced|FILE",
                                       "help": "Split the model over devices: auto/balanced (decoder layers evenly over"
                                               " the CUDA devices) or a JSON file of module name → device."}),
)


def _set_on_app(attr: str):
    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        from click.core import ParameterSource

        if ctx.get_parameter_source(param.name) not in (None, ParameterSource.DEFAULT) and value not in (None, False):
            setattr(ctx.ensure_object(App), attr, value)  # the group's App; made here if the group's first
        return value

    return callback


def common_options(cmd: click.Command, top_level: bool = False) -> click.Command:
    """Give ``cmd`` the shared options (once; an option a command already defines is left to it).
    They set fields of the invocation's ``App`` and are not passed to the command's function."""
    if getattr(cmd, "_kledger_common", False):
        return cmd
    taken = {o for p in cmd.params for o in (*getattr(p, "opts", ()), *getattr(p, "secondary_opts", ()))}
    for flags, attr, extra in COMMON_OPTIONS:
        if taken.intersection(flags):
            continue
        kw = dict(extra)
        if top_level and attr == "ledger_dir":
            kw["envvar"] = "KLEDGER_DIR"
        cmd.params.append(click.Option([*flags, f"_common_{attr}"], expose_value=False, is_eager=True,
                                       callback=_set_on_app(attr), **kw))
    cmd._kledger_common = True
    return cmd
