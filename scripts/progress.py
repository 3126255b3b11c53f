"""Progress bars: tqdm's (through ignite's ``ProgressBar``) on a terminal; where the output is not one (CI,
``nohup``, ``| tee``), plain lines instead, one each ``STEP`` percent of a bar, without the carriage returns and
cursor codes tqdm redraws with."""

from __future__ import annotations

import re
import sys

from ignite.handlers import ProgressBar

STEP = 10  # percent between two plain lines of one bar
PLAIN_FORMAT = "{desc}[{n_fmt}/{total_fmt}] {percentage:3.0f}% [{elapsed}<{remaining}]{postfix}"
CONTROL = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
UPDATE = re.compile(r"^(.*)\[[^\]/]+/[^\]]+\] +(\d+)%")  # a bar's text before its count, and its percentage


class PlainLines:
    """A stream for tqdm that writes an update as a line when it starts a bar or moves it ``step`` percent (and
    at 100%), dropping the redraws between; other text passes as lines."""

    def __init__(self, stream, step: int = STEP):
        self.stream, self.step, self.last = stream, step, (None, -1)

    def write(self, text: str) -> int:
        for line in CONTROL.sub("", text).replace("\r", "\n").split("\n"):
            line = line.strip()
            found = UPDATE.match(line)
            if found:
                bar, percent = found.group(1), int(found.group(2))
                bucket = 100 if percent == 100 else percent // self.step * self.step
                if (bar, bucket) == self.last or (bar == self.last[0] and bucket < self.last[1]):
                    continue
                self.last = (bar, bucket)
            if line:
                self.stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def bar_file(stream=None):
    """Where a tqdm bar writes: ``stream`` (standard error) itself on a terminal, else :class:`PlainLines` on it."""
    stream = stream or sys.stderr
    return stream if stream.isatty() else PlainLines(stream)


def tqdm_bar(total, desc: str, **kwargs):
    """A tqdm bar of ``total`` steps, drawn on a terminal, as plain lines elsewhere."""
    from tqdm import tqdm

    file = bar_file()
    plain = {} if file is sys.stderr else {"bar_format": PLAIN_FORMAT}
    return tqdm(total=total, desc=desc, file=file, **plain, **kwargs)


def progress_bar(desc: str, persist: bool = False) -> ProgressBar:
    """Ignite's ``ProgressBar`` with ``desc``, drawn on a terminal, as plain lines elsewhere."""
    file = bar_file()
    if file is sys.stderr:
        return ProgressBar(desc=desc, persist=persist)
    return ProgressBar(desc=desc, persist=True, bar_format=PLAIN_FORMAT, file=file)
