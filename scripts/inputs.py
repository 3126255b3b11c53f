"""Inference's inputs: files, folders (walked without following symlinked folders), globs (matched the same way,
so a symlink loop cannot trap them), lists, and a file listing paths (never evaluated as a MONAI expression); each
read by the bundle's preprocessing in its own error handling, so that a bad input costs its own row alone."""

from __future__ import annotations

import glob
import itertools
import os
import re

import torch
from monai.data import get_track_meta, set_track_meta

from .errors import BundleError, root_cause
from .files import MAX_CELL, MAX_LIST_BYTES, read_text
from .images import IMAGE_SUFFIXES, dicom_uid, image_suffix

ACCEPTED = "images of the accepted kinds (.png, .jpeg, .jpg, .nii, .nii.gz, .dcm, or DICOM files without a suffix)"


def walk(folder: str) -> list[str]:
    """Every file under ``folder``, sorted, symlinked folders not followed (a folder named like an image is
    listed, as a user may have meant it as one)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        found += [os.path.join(dirpath, d) for d in dirnames if d.lower().endswith(IMAGE_SUFFIXES)]
        found += [os.path.join(dirpath, f) for f in sorted(filenames)]
    return found


def glob_regex(pattern: str) -> re.Pattern:
    """A glob (``*``, ``?``, ``[...]`` within a name; ``**`` across folders) as a regular expression on paths."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append(r"(?:[^/]*/)*")
            i += 3
            continue
        if pattern.startswith("**", i):
            out.append(r".*")
            i += 2
            continue
        if c == "*":
            out.append(r"[^/]*")
        elif c == "?":
            out.append(r"[^/]")
        elif c == "[":
            end = pattern.find("]", i + 2)
            if end < 0:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1 : end].replace("\\", "\\\\")
                out.append("[^" + body[1:] + "]" if body.startswith("!") else "[" + body + "]")
                i = end
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out))


def glob_files(pattern: str) -> list[str]:
    """The files (and folders) matching ``pattern``, found by walking its fixed leading folders without following
    symlinked folders (Python's ``glob`` follows them, and a symlink loop never ends)."""
    parts = pattern.split("/")
    fixed = list(itertools.takewhile(lambda part: not glob.has_magic(part), parts[:-1]))
    base = "/".join(fixed) if fixed else "."
    relative = base == "." and not pattern.startswith("./")
    regex, found = glob_regex(pattern), []
    for dirpath, dirnames, filenames in os.walk(base or "/"):
        dirnames.sort()
        for name in sorted(filenames) + dirnames:
            path = os.path.join(dirpath, name)
            path = os.path.relpath(path) if relative else path
            if regex.fullmatch(path):
                found.append(path)
    return sorted(found)


def read_input_list(path: str) -> list[str]:
    """The paths listed in the text file ``path``, one a line (relative ones to its folder); blank lines and lines
    starting with ``#`` left out. Values here are never evaluated, whatever they start with."""
    fix = "pass a UTF-8 text file with one image path a line."
    if not os.path.lexists(path):
        raise BundleError(f"--input_list {path} does not exist.", fix)
    folder = os.path.dirname(os.path.abspath(path))
    lines = read_text(path, "--input_list", MAX_LIST_BYTES, fix).splitlines()
    long = next((n for n, line in enumerate(lines, 1) if len(line) > MAX_CELL), None)
    if long:
        raise BundleError(f"--input_list {path}, line {long}: over {MAX_CELL:,} characters.", fix)
    return [os.path.join(folder, line) for line in lines if line.strip() and not line.lstrip().startswith("#")]


def find_inputs(input=None, input_list=None) -> list[dict]:
    """One item per input: a file, every file under a folder, every match of a glob, a list of those, or the
    paths in ``input_list``. A folder holding no image of the accepted kinds gets a row saying so; a given path
    that does not exist is refused."""
    paths = read_input_list(str(input_list)) if input_list else []
    given = [] if input in (None, "", []) else input if isinstance(input, (list, tuple)) else [input]
    if not given and not paths:
        raise BundleError(
            "no input given.",
            "pass --input PATH (an image, a folder or a glob such as 'imgs/*.png'), or --input_list FILE.",
        )
    missing = [str(p) for p in given if not os.path.exists(str(p)) and not glob.has_magic(str(p))]
    if missing:  # a value of the command: refused before the model is read (a listed file gets its row)
        raise BundleError(f"--input {missing[0]} does not exist.", "pass an existing image, folder or glob.")
    items = []
    for path in [str(p) for p in given]:
        if os.path.isdir(path):
            found = walk(path)
            if not any(image_suffix(p) for p in found):
                items.append({"image": path, "path": path, "error": f"the folder holds no {ACCEPTED}"})
            items += [{"image": p, "path": p} for p in found]
        elif not os.path.exists(path) and glob.has_magic(path):
            matches = glob_files(path)
            items += [{"image": p, "path": p} for p in matches] or [{"image": path, "path": path}]
        else:
            items.append({"image": path, "path": path})  # a file (a link that leads nowhere: its row says so)
    return items + [{"image": p, "path": p} for p in paths]


def reason(error: BaseException) -> str:
    """Why an input failed, in one line: the first ``ValueError`` of the chain (the reader's reason, which MONAI
    wraps in "applying transform"), else the root cause with its type."""
    cause = error
    while cause is not None:
        if isinstance(cause, ValueError) and str(cause):
            return str(cause).splitlines()[0]
        cause = cause.__cause__
    cause = root_cause(error)
    return f"{type(cause).__name__}: {cause}".splitlines()[0]


class SafeDataset(torch.utils.data.Dataset):
    """``data`` through ``transform`` (the bundle's preprocessing: its loader first) one item at a time, with MONAI's
    metadata tracking off (only the pixels are needed); an item that cannot be used, whatever fails, becomes zeros
    of ``channels`` x ``image_size`` with the reason under ``error``. ``min_side``: the loaded image's smaller
    side; ``sop_instance_uid``: a DICOM image's (no other tag of the file leaves it)."""

    def __init__(self, data: list[dict], transform, image_size, channels: int = 1, reader=None):
        self.data, self.transform, self.reader = data, transform, reader
        self.blank = torch.zeros(int(channels), *[int(s) for s in image_size])

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict:
        return self.prepared(self.data[index])

    def prepared(self, item: dict) -> dict:
        """One input (``{"image": path}``, or ``{"data": bytes}`` read by ``reader`` in the place of the
        transform's loader), preprocessed as the dataset's items are."""
        item = dict(item)
        out = {"path": str(item.get("path", item.get("image"))), "label": item.get("label", -1)}
        if item.get("error"):
            return {**out, "image": self.blank.clone(), "error": item["error"], "min_side": 0, "sop_instance_uid": ""}
        tracking = get_track_meta()
        set_track_meta(False)
        try:
            if "data" in item:  # bytes sent to a service: the same reader, then the rest of the preprocessing
                array, _ = self.reader.get_data(self.reader.read(item["data"]))
                loaded = {"image": torch.as_tensor(array)}
            else:
                loaded = self.transform({"image": item["image"]}, end=1)
            side = int(min(torch.as_tensor(loaded["image"]).shape[:2]))
            image = self.transform(loaded, start=1)["image"]
            image = torch.as_tensor(image).float()
            if tuple(image.shape) != tuple(self.blank.shape) or not torch.isfinite(image).all():
                raise ValueError(
                    f"preprocessing gave {tuple(image.shape)}, not {tuple(self.blank.shape)} finite values"
                )
        except Exception as e:
            return {**out, "image": self.blank.clone(), "error": reason(e), "min_side": 0, "sop_instance_uid": ""}
        finally:
            set_track_meta(tracking)
        uid = dicom_uid(item["data"] if "data" in item else out["path"])
        return {**out, "image": image, "error": "", "min_side": side, "sop_instance_uid": uid}
