"""Helpers shared by the bundle's scripts: the one error type, booleans from the command line, atomic writes,
the distributed rank and matplotlib without a display."""

from __future__ import annotations

import os
import sys
import tempfile

import torch

BUNDLE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TRUE, _FALSE = ("true", "1", "yes", "y", "on"), ("false", "0", "no", "n", "off")


class BundleError(ValueError):
    """A bad input, with a message naming the problem and its fix.

    A ``ValueError``, so that Python callers (``ConfigWorkflow``, the Model Zoo's CI) can catch it. From the
    command line, :func:`report_bundle_error` prints it as one message instead of a traceback.
    """

    def __init__(self, problem: str, fix: str):
        super().__init__(problem, fix)
        self.problem, self.fix = problem, fix

    def __str__(self) -> str:
        return f"ERROR: {self.problem}\n  Fix: {self.fix}"


def root_cause(error: BaseException) -> BaseException:
    """The first exception of ``error``'s chain of causes (MONAI wraps a reader's error in "applying transform")."""
    while error.__cause__ is not None:
        error = error.__cause__
    return error


def report_bundle_error(exc_type, exc, tb) -> None:
    """``sys.excepthook``: an uncaught exception caused by a ``BundleError`` prints only that error's message.

    MONAI wraps errors raised while it evaluates a config in its own exceptions; the ``BundleError`` is found
    along their causes. Any other exception keeps Python's traceback. The exit status stays 1.
    """
    cause, seen = exc, set()
    while cause is not None and not isinstance(cause, BundleError) and id(cause) not in seen:
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, BundleError):
        print(cause, file=sys.stderr, flush=True)
    else:
        sys.__excepthook__(exc_type, exc, tb)


sys.excepthook = report_bundle_error


def as_bool(value, key: str) -> bool:
    """``value`` as a bool; the command line hands ``--amp false`` over as the (truthy) string ``"false"``."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise BundleError(f"--{key} {value!r} is not a boolean.", f"pass --{key} true or --{key} false.")


def is_main_process() -> bool:
    """True unless this is a non-zero rank of a distributed run (only rank 0 writes files)."""
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def atomic_write(path: str, write, mode: str = "w") -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, then rename it over ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=folder)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; give it the permissions of a normal file
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def pyplot():
    """matplotlib's ``pyplot`` drawing off-screen (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str, dpi: int = 100) -> None:
    """Write ``fig`` to ``path`` as a PNG, atomically, and close it."""
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi), mode="wb")
    pyplot().close(fig)
