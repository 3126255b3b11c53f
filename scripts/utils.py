"""Helpers shared by the bundle's scripts: the one error type, booleans from the command line, durable atomic
writes, one run per folder, leftovers of killed runs, the distributed rank, matplotlib without a display."""

from __future__ import annotations

import csv
import glob
import logging
import os
import re
import shutil
import sys
import tempfile

import torch

logger = logging.getLogger(__name__)
BUNDLE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TRUE, _FALSE = ("true", "1", "yes", "y", "on"), ("false", "0", "no", "n", "off")


class BundleError(ValueError):
    """A bad input, with a message naming the problem and its fix; a ``ValueError`` for Python callers, one message
    without a traceback on the command line (:func:`report_bundle_error`)."""

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


def fsync_folder(folder: str) -> None:
    """Make a rename or removal in ``folder`` durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, write, mode: str = "w") -> None:
    """Call ``write(file)`` on a temporary file ``.tmp-*`` beside ``path``, flush it to disk, rename it over ``path``:
    ``path`` is always the old complete file or the new one, even across a power cut."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=os.path.splitext(path)[1], dir=folder)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; give it the permissions of a normal file
        os.replace(tmp, path)
        fsync_folder(folder)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_csv(path: str, columns, rows) -> None:
    """``rows`` (dicts: other keys left out) under a header of ``columns``, written atomically."""

    def write(f):
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)

    atomic_write(path, write)


TMP_PREFIX = ".tmp-"
IGNITE_TMP = re.compile(r"^tmp[a-z0-9_]{8}$")  # ignite DiskSaver(atomic=True)'s temporary files


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (on this machine); assumed so off POSIX, where ``os.kill`` ends it."""
    if os.name != "posix":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def remove_stale(folder: str, prefix: str) -> list[str]:
    """Remove ``folder/<prefix><pid>-*`` files and folders whose process ``pid`` is gone (left by a killed run), and
    such names without a process id; returns what was removed."""
    removed = []
    for path in glob.glob(os.path.join(glob.escape(folder), glob.escape(prefix) + "*")):
        match = re.match(r"(\d+)-", os.path.basename(path)[len(prefix) :])
        if match and pid_alive(int(match.group(1))):
            continue
        shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
        removed.append(path)
    if removed:
        logger.info(f"removed {len(removed)} leftover(s) of a killed run: {', '.join(removed)}")
    return removed


class FolderLock:
    """One run per folder: an exclusive ``fcntl`` lock on ``<folder>/.mednist.lock`` (holding the process id a
    refused run is told) for each of ``folders``, dropped by the system however its process ends. Taking a folder
    removes the temporary files a killed run left there. Main process only; ``acquire`` is idempotent."""

    NAME = ".mednist.lock"
    _held: dict[str, object] = {}  # real folder path -> open lock file, for this process

    def __init__(self, folders):
        self.folders = [folders] if isinstance(folders, str) else list(folders)

    def acquire(self) -> FolderLock:
        if not is_main_process():
            return self
        try:
            import fcntl
        except ImportError:  # Windows
            fcntl = None
            logger.warning("this system has no fcntl: one run per folder is not enforced")
        for folder in dict.fromkeys(os.path.realpath(str(f)) for f in self.folders):
            if folder in self._held:
                continue
            path = os.path.join(folder, self.NAME)
            if os.path.exists(folder) and not os.path.isdir(folder):
                raise BundleError(f"{folder} is a file, not a folder.", "pass a folder path for the outputs.")
            try:
                os.makedirs(folder, exist_ok=True)
                f = open(path, "a+")
            except OSError as e:
                raise BundleError(
                    f"cannot write to {folder} ({e.strerror or e}).",
                    "pass a writable folder (--output_dir or --ckpt_dir), or fix its permissions.",
                ) from e
            try:
                if fcntl is not None:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                f.seek(0)
                owner = f.read().strip() or "unknown"
                f.close()
                raise BundleError(
                    f"{folder} is in use by another run (process {owner}).",
                    "wait for it to finish, stop it, or give this run other folders (--output_dir, --ckpt_dir).",
                ) from e
            f.seek(0)
            f.truncate()
            f.write(f"{os.getpid()}\n")
            f.flush()
            self._held[folder] = f
            for name in os.listdir(folder) if fcntl is not None else ():  # unlocked, another run may be writing
                stale = name.startswith(TMP_PREFIX) or IGNITE_TMP.match(name)
                if stale and os.path.isfile(os.path.join(folder, name)):
                    os.remove(os.path.join(folder, name))
                    logger.info(f"removed {os.path.join(folder, name)}, left by a killed run")
        return self

    def release(self) -> None:
        for folder in dict.fromkeys(os.path.realpath(str(f)) for f in self.folders):
            f = self._held.pop(folder, None)
            if f is not None:
                f.close()  # closing drops the flock


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
