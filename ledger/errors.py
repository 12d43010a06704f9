"""Exceptions with the exit code the CLI maps them to.

Every message says what was expected and what was found. The CLI (``kledger.cli.main``) is the
only place that turns these into one line on stderr and an exit code.
"""

from __future__ import annotations


class KledgerError(Exception):
    """Base class: a user-facing error (exit code 1)."""

    exit_code = 1


class UsageError(KledgerError):
    """Bad input from the user: empty prompt, subject not in prompt, unknown method (exit 2)."""

    exit_code = 2


class NotFoundError(KledgerError):
    """An event, ref, branch, model or ledger that does not exist (exit 1)."""


class StateError(KledgerError):
    """An operation that the ledger's state does not allow (revert twice, ...) (exit 1)."""


class ModelMismatchError(KledgerError):
    """The model's fingerprint differs from the one recorded at ``init`` (exit 1)."""


class NumericalError(KledgerError):
    """An editor produced a NaN/Inf delta or failed numerically; nothing is recorded (exit 1)."""


class IntegrityError(KledgerError):
    """A row or object fails its hash check, or the hash chain is broken (exit 4)."""

    exit_code = 4


class AuditThresholdError(KledgerError):
    """An audit crossed a drift threshold (exit 3)."""

    exit_code = 3


class LedgerBusyError(KledgerError):
    """Another process holds the ledger's write lock past the wait limit (exit 75, EX_TEMPFAIL)."""

    exit_code = 75


class HeadMovedError(LedgerBusyError, StateError):
    """The branch head moved (another writer appended) while an edit was computed; nothing of
    this edit was appended and running the command again is safe (exit 75, like busy)."""
