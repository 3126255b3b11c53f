"""Files the bundle writes: durable atomic writes under temporary names that carry the writer's process id, CSV
cells a spreadsheet would evaluate escaped, one run per folder, and the leftovers of killed runs removed only once
their writer is gone."""

from __future__ import annotations

import contextlib
import csv
import glob
import json
import logging
import os
import re
import shutil
import stat
import tempfile

import torch

from .errors import BundleError

logger = logging.getLogger(__name__)
TMP_PREFIX = ".tmp-"  # + "<pid>-": a temporary file of the process <pid>
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")  # what makes a spreadsheet evaluate a cell
MAX_LIST_BYTES, MAX_CELL = 64 << 20, 4096  # a list or CSV (a million rows); a path or a cell of one


def open_regular(path: str):
    """``path`` opened for reading if it is a regular file (a pipe or device would block or never end), else a
    ``ValueError``; opened without blocking, so a pipe is refused rather than waited on."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ValueError("is not a regular file (a pipe, socket or device)")
    return os.fdopen(fd, "rb")


def read_limited(path: str, limit: int) -> bytes:
    """The bytes of the regular file ``path``, its size checked before a byte is read (a sparse file of any
    size costs nothing), or a ``ValueError`` saying why not (``OSError`` too: a /proc file may fail to read)."""
    with open_regular(path) as f:
        if os.fstat(f.fileno()).st_size > limit:
            raise ValueError(f"is over {limit:,} bytes")
        data = f.read(limit + 1)
    if len(data) > limit:  # a file that reports no size (/proc)
        raise ValueError(f"is over {limit:,} bytes")
    return data


def read_text(path: str, what: str, limit: int, fix: str) -> str:
    """The UTF-8 text of ``path`` (at most ``limit`` bytes), or one ``BundleError`` naming ``what`` and ``fix``."""
    try:
        return read_limited(path, limit).decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise BundleError(f"{what} {path} is not UTF-8 text (byte {e.start:,}).", fix) from e
    except OSError as e:
        raise BundleError(f"{what} {path} cannot be read ({e.strerror or e}).", fix) from e
    except ValueError as e:
        raise BundleError(f"{what} {path} {e}.", fix) from e


def read_json(path: str, what: str, fix: str, limit: int = 1 << 20):
    """The JSON value of the file ``path`` (UTF-8, at most ``limit`` bytes, nested within Python's recursion
    limit, numbers of at most 4,300 digits), or one ``BundleError`` naming ``what`` and ``fix``."""
    text = read_text(path, what, limit, fix)
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:  # RecursionError: nested too deep
        raise BundleError(f"{what} {path} is not readable JSON ({str(e)[:120]}).", fix) from e


def is_main_process() -> bool:
    """True unless this is a non-zero rank of a distributed run (only rank 0 writes files)."""
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def fsync_folder(folder: str) -> None:
    """Make a rename or removal in ``folder`` durable (POSIX; a no-op where folders cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def temporary_path(folder: str, suffix: str = "") -> str:
    """A new, empty ``.tmp-<pid>-*`` file in ``folder``: removed by :func:`remove_stale` once this process is gone."""
    os.makedirs(folder, exist_ok=True)
    fd, path = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{os.getpid()}-", suffix=suffix, dir=folder)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)  # mkstemp makes it private; give it the permissions of a normal file
    return path


def temporary_folder(folder: str) -> str:
    """A new ``.tmp-<pid>-*`` folder in ``folder``: removed by :func:`remove_stale` once this process is gone."""
    os.makedirs(folder, exist_ok=True)
    return tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.getpid()}-", dir=folder)


def atomic_write(path: str, write, mode: str = "w") -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, flush it to disk, rename it over ``path``: ``path``
    is always the old complete file or the new one, even across a power cut."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = temporary_path(folder, os.path.splitext(path)[1])
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_folder(folder)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def csv_cell(value):
    """A text cell no spreadsheet evaluates: text starting with ``= + - @``, a tab or a return gets a leading
    ``'`` (for cells of text from outside, such as file names; not for the numbers the bundle writes)."""
    return f"'{value}" if isinstance(value, str) and value.startswith(FORMULA_START) else value


def write_csv(path: str, columns, rows) -> None:
    """``rows`` (dicts: other keys left out) under a header of ``columns`` (escaped), written atomically."""

    def write(f):
        writer = csv.DictWriter(f, list(columns), extrasaction="ignore")
        writer.writerow({c: csv_cell(c) for c in columns})
        writer.writerows(rows)

    atomic_write(path, write)


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


def remove_stale(folder: str, prefix: str = TMP_PREFIX) -> list[str]:
    """Remove ``folder/<prefix><pid>-*`` files and folders whose process ``pid`` is gone (left by a killed run);
    returns what was removed. Names without a process id are left alone: their writer is unknown."""
    removed = []
    for path in glob.glob(os.path.join(glob.escape(folder), glob.escape(prefix) + "*")):
        match = re.match(r"(\d+)-", os.path.basename(path)[len(prefix) :])
        if not match or pid_alive(int(match.group(1))):
            continue
        shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
        removed.append(path)
    if removed:
        logger.info(f"removed {len(removed)} leftover(s) of a killed run: {', '.join(removed)}")
    return removed


class FolderLock:
    """One run per folder: an exclusive ``fcntl`` lock on ``<folder>/.mednist.lock`` (holding the process id a
    refused run is told) for each of ``folders``, dropped by the system however its process ends. Taking a folder
    removes the temporary files of runs that are gone. Main process only; ``acquire`` is idempotent."""

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
            if os.path.islink(path) or (os.path.exists(path) and not os.path.isfile(path)):
                raise BundleError(
                    f"{path} is a link or special file, not the lock file runs write there.", "remove it."
                )
            try:
                os.makedirs(folder, exist_ok=True)
                flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
                f = os.fdopen(os.open(path, flags, 0o644), "r+")  # never through a link planted since
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
            remove_stale(folder)
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
