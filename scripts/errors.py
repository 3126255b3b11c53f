"""The bundle's one error type: a bad input, named with its fix, printed as one message on the command line."""

from __future__ import annotations

import sys


class BundleError(ValueError):
    """A bad input, with a message naming the problem and its fix; a ``ValueError`` for Python callers, one message
    without a traceback on the command line (:func:`report_bundle_error`)."""

    def __init__(self, problem: str, fix: str):
        super().__init__(problem, fix)
        self.problem, self.fix = problem, fix

    def __str__(self) -> str:
        return f"ERROR: {self.problem}\n  Fix: {self.fix}"


def first_line(error: BaseException, limit: int = 200) -> str:
    """``error`` as ``Type: first line of its message``, at most ``limit`` characters: for a one-line refusal."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:limit]


def root_cause(error: BaseException) -> BaseException:
    """The first exception of ``error``'s chain of causes (MONAI wraps a reader's error in "applying transform")."""
    while error.__cause__ is not None:
        error = error.__cause__
    return error


def report_bundle_error(exc_type, exc, tb) -> None:
    """``sys.excepthook``: an uncaught exception caused by a ``BundleError`` (MONAI wraps errors raised while it
    evaluates a config) prints only that error's message; any other keeps its traceback. The exit status is 1."""
    cause, seen = exc, set()
    while cause is not None and not isinstance(cause, BundleError) and id(cause) not in seen:
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, BundleError):
        print(cause, file=sys.stderr, flush=True)
    else:
        sys.__excepthook__(exc_type, exc, tb)


def report_errors_briefly() -> None:
    """The first step of each workflow: a ``BundleError`` ending the process is printed as its one message."""
    sys.excepthook = report_bundle_error
