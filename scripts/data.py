"""The labelled images a run learns from or is evaluated on: MedNIST (found, or downloaded and extracted), a folder
of class folders, or a CSV list; their classes, and their split, made once (stratified, identical images kept in
one part) and saved. Building :class:`ImageData` reads nothing but folder names and the CSV; :meth:`ImageData.prepare`
is the step that downloads, lists, hashes and splits."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import shutil
import stat
import tempfile
import urllib.request
from collections import Counter, defaultdict

from monai.apps.utils import check_hash, extractall
from monai.data import partition_dataset_classes

from .checks import as_bool, check_class_names
from .errors import BundleError
from .files import (
    MAX_CELL,
    MAX_LIST_BYTES,
    atomic_write,
    is_main_process,
    open_regular,
    read_json,
    read_text,
    remove_stale,
)
from .images import MAX_FILE_BYTES, image_suffix
from .progress import tqdm_bar

logger = logging.getLogger(__name__)

MEDNIST = ("AbdomenCT", "BreastMRI", "CXR", "ChestCT", "Hand", "HeadCT")
SPLITS = ("training", "validation", "test")
DOWNLOAD_PREFIX, EXTRACT_PREFIX = ".MedNIST-download-", ".MedNIST-extract-"
LAYOUT = "a folder with one subfolder of images per class (or MedNIST/ inside it), or --datalist FILE.csv"


def list_images(folder: str) -> list[str]:
    """Image files under ``folder`` (searched recursively, symlinked folders not followed), relative, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [os.path.relpath(os.path.join(dirpath, f), folder) for f in sorted(filenames) if not f.startswith(".")]
    return [f for f in found if image_suffix(os.path.join(folder, f))]


def class_folders(root: str) -> list[str]:
    """The subfolders of ``root`` that may be classes (not hidden), sorted: the class names."""
    if not os.path.isdir(root):
        return []
    return sorted(d for d in os.listdir(root) if not d.startswith(".") and os.path.isdir(os.path.join(root, d)))


def images_by_class(root: str, classes, key: str) -> dict[str, list[str]]:
    """Image names (relative to ``root``) per class, refused if a class folder is missing or holds no image."""
    found = {c: [os.path.join(c, f) for f in list_images(os.path.join(root, c))] for c in classes}
    empty = [c for c, files in found.items() if not files]
    if empty:
        raise BundleError(
            f"{key}: {root} has no images for class(es) {', '.join(empty)}.",
            "each class needs a subfolder of images (.png, .jpeg, .jpg, .nii, .nii.gz, .dcm) there; for MedNIST, "
            "re-extract MedNIST.tar.gz or point the key at a complete copy.",
        )
    return found


def check_files(paths: list[str], source: str) -> None:
    """Refuse, before any is hashed or opened, a listed image that is not a regular file of 1 byte to
    :data:`~scripts.images.MAX_FILE_BYTES` (a device, a folder, a /proc file, which tells no size; a sparse file
    of any size)."""
    for path in paths:
        info = os.stat(path)
        problem = "is not a regular file" if not stat.S_ISREG(info.st_mode) else None
        if problem is None and not 0 < info.st_size <= MAX_FILE_BYTES:
            problem = f"is {info.st_size:,} bytes, not an image of 1 to {MAX_FILE_BYTES:,}"
        if problem:
            raise BundleError(f"{source} names {path}, which {problem}.", "remove it from the data, or replace it.")


def file_hash(path: str) -> str:
    """The SHA-256 of a file's bytes (identical images share it; releases name their files by it); a file that
    fails to read (a /proc file) is refused in one line."""
    digest = hashlib.sha256()
    try:
        with open_regular(path) as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except (OSError, ValueError) as e:
        reason = getattr(e, "strerror", None) or e
        raise BundleError(f"cannot read {path} ({reason}).", "remove it from the data, or replace it.") from e
    return digest.hexdigest()


def split_by_content(items: list[dict], hashes: list[str], val_frac: float, test_frac: float, seed: int) -> dict:
    """Stratified split (MONAI's ``partition_dataset_classes``) of groups of identical images, each group in one
    part: each class's groups shuffled with ``seed`` and cut into training, validation and test; each part listed
    by class, then file name. With no two images alike, it is the per-image split."""
    groups: dict[str, list[dict]] = {}
    for item, digest in zip(items, hashes):
        groups.setdefault(digest, []).append(item)
    firsts = [members[0] for members in groups.values()]
    parts = partition_dataset_classes(
        firsts,
        classes=[d["label"] for d in firsts],
        ratios=[1 - val_frac - test_frac, val_frac, test_frac],
        shuffle=True,
        seed=seed,
    )
    placed = {id(first) for part in parts for first in part}
    parts[0] += [first for first in firsts if id(first) not in placed]  # MONAI rounds each part alone: none lost
    for part, frac in zip(parts[1:], (val_frac, test_frac)):  # nor does a small class leave a part without it
        for label in {d["label"] for d in parts[0]} - {d["label"] for d in part} if frac > 0 else ():
            mine = [d for d in parts[0] if d["label"] == label]
            if len(mine) > 1:
                parts[0].remove(mine[-1])
                part.append(mine[-1])
    by_first = {id(members[0]): members for members in groups.values()}
    return {
        name: sorted((d for first in part for d in by_first[id(first)]), key=lambda d: (d["label"], d["image"]))
        for name, part in zip(SPLITS, parts)
    }


class ImageData:
    """The images of a run and their split: ``datalist`` (a CSV of ``image,label[,split]``, paths relative to it),
    else MedNIST in ``dataset_dir`` (``dataset_dir/MedNIST``, or ``dataset_dir`` named MedNIST; downloaded there
    if absent and ``download``), else ``dataset_dir``'s class folders (any names, at least two, in sorted order);
    refused if the training part fills no batch of ``batch_size``."""

    def __init__(self, dataset_dir, split_file: str, val_frac=0.1, test_frac=0.1, seed=0, datalist=None,
                 download=True, url: str = "", md5: str = "", batch_size: int = 1):  # fmt: skip
        self.dataset_dir, self.split_file, self.datalist = str(dataset_dir), str(split_file), datalist or None
        self.params = {"seed": int(seed), "val_frac": float(val_frac), "test_frac": float(test_frac)}
        self.download, self.url, self.md5 = as_bool(download, "download"), url, md5
        self.batch_size = int(batch_size)
        self.prepared, self.report = None, {}
        nested = os.path.join(self.dataset_dir, "MedNIST")
        if self.datalist:
            self.kind, self.root = "csv", os.path.dirname(os.path.abspath(self.datalist))
        elif os.path.isdir(nested) or os.path.basename(os.path.normpath(self.dataset_dir)) == "MedNIST":
            self.kind, self.root = "mednist", nested if os.path.isdir(nested) else self.dataset_dir
        elif class_folders(self.dataset_dir):
            self.kind, self.root = "folders", self.dataset_dir
        else:
            self.kind, self.root = "download", nested
        self.rows = self.read_datalist() if self.kind == "csv" else None

    @property
    def classes(self) -> list[str]:
        """The class names, in label order: MedNIST's six, the class folders' or the CSV's labels, sorted."""
        if self.kind in ("mednist", "download"):
            return list(MEDNIST)
        if self.kind == "csv":
            return check_class_names(sorted({r["label"] for r in self.rows}), self.datalist)
        names = class_folders(self.root)
        if len(names) < 2:
            raise BundleError(
                f"--dataset_dir {self.root} has {len(names)} class folder(s): {', '.join(names) or 'none'}.",
                f"a classifier needs two classes or more: {LAYOUT}.",
            )
        return check_class_names(names, f"--dataset_dir {self.root}")

    def read_datalist(self) -> list[dict]:
        """The rows of the CSV ``datalist``: ``image`` and ``label``, and ``split`` if it has the column; every row
        checked (empty or unknown values), one message for the first bad row."""
        if not os.path.lexists(self.datalist):
            raise BundleError(f"--datalist {self.datalist} does not exist.", "pass a CSV file of image,label rows.")
        fix = "pass a CSV file of image,label rows in UTF-8 (a spreadsheet's 'CSV UTF-8')."
        text = read_text(self.datalist, "--datalist", MAX_LIST_BYTES, fix)
        try:
            reader = csv.DictReader(io.StringIO(text, newline=""))
            columns = [c.strip() for c in reader.fieldnames or []]
            rows = [{k.strip(): (v or "").strip() for k, v in r.items() if isinstance(k, str)} for r in reader]
        except csv.Error as e:  # e.g. a field over csv's limit of 131,072 characters
            raise BundleError(f"--datalist {self.datalist} is not a CSV file ({e}).", fix) from e
        long = next((n for n, r in enumerate(rows, 2) for v in r.values() if len(v) > MAX_CELL), None)
        if long or any(len(c) > MAX_CELL for c in columns):
            raise BundleError(f"--datalist {self.datalist}, line {long or 1}: a cell of over {MAX_CELL:,} characters.",
                              "give each row a path and a label of at most 4,096 characters.")  # fmt: skip
        missing = [c for c in ("image", "label") if c not in columns]
        if missing:
            raise BundleError(
                f"--datalist {self.datalist} has no column {missing[0]!r} (its columns: {', '.join(columns)}).",
                "give it a header row image,label (and optionally split).",
            )
        for number, row in enumerate(rows, 2):
            where = f"--datalist {self.datalist}, line {number}"
            if not row.get("image") or not row.get("label"):
                empty = "image" if not row.get("image") else "label"
                raise BundleError(f"{where}: an empty {empty}.", "fill it or delete the row.")
            if "split" in columns and row.get("split") not in SPLITS:
                raise BundleError(
                    f"{where}: split {row.get('split')!r} is not training, validation or test.",
                    "give every row one of those, or drop the split column to have the bundle split.",
                )
        if not rows:
            raise BundleError(f"--datalist {self.datalist} lists no images.", "add rows of image,label.")
        folder = os.path.dirname(os.path.abspath(self.datalist))
        missing = [r["image"] for r in rows if not os.path.exists(os.path.join(folder, r["image"]))]
        if missing:
            raise BundleError(
                f"--datalist {self.datalist} names {len(missing)} file(s) that do not exist, e.g. {missing[0]}.",
                "fix the paths (relative to the CSV's folder, or absolute) or delete their rows.",
            )
        check_files([os.path.join(folder, r["image"]) for r in rows], f"--datalist {self.datalist}")
        return rows

    def csv_items(self) -> tuple[list[dict], list[str] | None]:
        """The CSV's items (paths as given, relative to its folder) and their splits (None without the column)."""
        labels = {c: i for i, c in enumerate(self.classes)}
        items = [{"image": r["image"], "label": labels[r["label"]]} for r in self.rows]
        splits = [r["split"] for r in self.rows] if "split" in self.rows[0] else None
        return items, splits

    def prepare(self) -> dict[str, list[dict]]:
        """The step that makes the data ready: MedNIST downloaded and extracted if needed, the images listed and
        hashed, the split made (or the saved one reused) and each part checked; the data lists
        ``{"training", "validation", "test"}`` (absolute paths, integer labels)."""
        if self.prepared is not None:
            return self.prepared
        classes = self.classes
        if self.kind == "download":
            prepare_mednist(self.dataset_dir, self.download, self.url, self.md5)
            self.kind = "mednist"
        if self.kind == "csv":
            items, given = self.csv_items()
        else:
            found = images_by_class(self.root, classes, "dataset_dir")
            items, given = [{"image": f, "label": i} for i, c in enumerate(classes) for f in found[c]], None
            check_files([os.path.join(self.root, d["image"]) for d in items], f"--dataset_dir {self.root}")
        hashes = [file_hash(os.path.join(self.root, d["image"])) for d in items]
        reused = saved = self.saved_split(classes)
        if saved is None:
            if given:
                split = {name: [d for d, s in zip(items, given) if s == name] for name in SPLITS}
            else:
                split = split_by_content(items, hashes, **self.params)
            saved = {**self.params, "classes": classes, "source": self.kind, "given": bool(given), **split}
            self.check_parts(saved, classes)
        if len(saved["training"]) < self.batch_size:  # each epoch leaves out the last partial batch
            images = len(saved["training"])
            raise BundleError(f"--batch_size {self.batch_size} is more than the {images} training images.",
                              f"pass --batch_size {max(1, images)} or less, or train on more images.")  # fmt: skip
        if reused is None:  # a new split, written once every check passed
            atomic_write(self.split_file, lambda f: json.dump(saved, f, indent=1))
            logger.info(f"wrote the data split to {self.split_file}")
        self.prepared = {name: self.on_disk(saved[name]) for name in SPLITS}
        self.report = self.describe(items, hashes, classes)
        return self.prepared

    def saved_split(self, classes) -> dict | None:
        """The split saved in ``split_file`` if there is one, refused if made with other settings or classes."""
        if not os.path.lexists(self.split_file):
            return None
        fix = "delete it (or choose another --output_dir) to make a new split."
        saved = read_json(self.split_file, "the split", fix, MAX_LIST_BYTES)
        parts = [saved.get(name) for name in SPLITS] if isinstance(saved, dict) else [None]
        items = [d for part in parts if isinstance(part, list) for d in part]
        ok = all(isinstance(p, list) for p in parts) and all(
            isinstance(d, dict) and isinstance(d.get("image"), str) and type(d.get("label")) is int for d in items
        )
        if not ok or not all(0 <= d["label"] < len(classes) and len(d["image"]) <= MAX_CELL for d in items):
            raise BundleError(f"{self.split_file} is not a split this bundle writes.", fix)
        old = {k: saved.get(k) for k in self.params}
        if not saved.get("given") and old != self.params:
            raise BundleError(
                f"{self.split_file} was made with {old}, not {self.params}.",
                "pass the same seed/val_frac/test_frac, or choose another --output_dir (or delete that file) "
                "to make a new split.",
            )
        made_for = saved.get("classes", list(MEDNIST))
        if made_for != list(classes):
            listed = ", ".join(map(str, made_for)) if isinstance(made_for, list) else repr(made_for)
            raise BundleError(
                f"{self.split_file} was made for the classes {listed[:300]}, not this data's {', '.join(classes)}.",
                "choose another --output_dir for a new split, or pass the data it was made from.",
            )
        logger.info(f"reusing the data split in {self.split_file}")
        return saved

    def check_parts(self, split: dict, classes) -> None:
        """Refuse a split with an empty part or a class missing from one (too few images for the fractions)."""
        for name in SPLITS:
            counts = Counter(d["label"] for d in split[name])
            short = [c for i, c in enumerate(classes) if not counts[i]]
            if short:
                total = sum(d["label"] == classes.index(short[0]) for p in SPLITS for d in split[p])
                fix = f"add images of {short[0]} or raise --val_frac/--test_frac so that each part gets one of it"
                if total < len(SPLITS):  # no fraction gives 1 or 2 images to 3 parts
                    fix = f"add images of {short[0]} (training, validation and test need one each), or remove it"
                raise BundleError(
                    f"class {short[0]} has {total} image(s): the {name} set would have none of it "
                    f"(val_frac {self.params['val_frac']}, test_frac {self.params['test_frac']}).",
                    fix + " (a CSV's split column must give each class a row in each split).",
                )

    def on_disk(self, items: list[dict]) -> list[dict]:
        """The items of a saved split with their paths under the data's root, refused if an image is not there."""
        data = [{"image": os.path.join(self.root, d["image"]), "label": d["label"]} for d in items]
        missing = [d["image"] for d in data if not os.path.isfile(d["image"])]
        if missing:
            raise BundleError(
                f"{len(missing)} image(s) named in {self.split_file} are not under {self.root}, e.g. {missing[0]}.",
                "pass the --dataset_dir (or --datalist) the split was made from, or choose another --output_dir "
                "to make a new split.",
            )
        return data

    def describe(self, items, hashes, classes) -> dict:
        """Per class and split, the number of images; groups of identical images (within and across parts)."""
        part = {d["image"]: name for name, listed in self.prepared.items() for d in listed}
        counts = {c: dict.fromkeys(SPLITS, 0) for c in classes}
        for name, listed in self.prepared.items():
            for d in listed:
                counts[classes[d["label"]]][name] += 1
        groups = defaultdict(list)
        for item, digest in zip(items, hashes):
            groups[digest].append(os.path.join(self.root, item["image"]))
        alike = [g for g in groups.values() if len(g) > 1]
        across = [g for g in alike if len({part.get(p) for p in g}) > 1]
        labels = {os.path.join(self.root, d["image"]): classes[d["label"]] for d in items}
        mixed = [g for g in alike if len({labels[p] for p in g}) > 1]
        return {
            "source": self.kind,
            "root": self.root,
            "classes": classes,
            "images": counts,
            "identical_images": {
                "groups": len(alike),
                "images": sum(map(len, alike)),
                "groups_across_splits": len(across),
                "examples_across_splits": [g[:3] for g in across[:5]],
                "groups_with_different_labels": len(mixed),
                "examples_with_different_labels": [g[:3] for g in mixed[:5]],
            },
        }


def prepare_mednist(dataset_dir: str, download: bool, url: str, md5: str) -> str:
    """``dataset_dir/MedNIST``, downloaded and extracted first if absent and ``download``: extracted beside it and
    renamed into place when complete, never half-extracted."""
    root = os.path.join(dataset_dir, "MedNIST")
    if os.path.isdir(root):
        return root
    tarball = os.path.join(dataset_dir, "MedNIST.tar.gz")
    manual = f"download {url} by hand and either put it at {tarball} or extract it so that {root}/<class>/ exist"
    if not download and not os.path.isfile(tarball):
        raise BundleError(
            f"no images at {dataset_dir} ({LAYOUT}) and download is false.",
            f"point --dataset_dir at your images, or, for MedNIST, {manual}, or set --download true.",
        )
    os.makedirs(dataset_dir, exist_ok=True)
    for prefix in (DOWNLOAD_PREFIX, EXTRACT_PREFIX):  # what a killed download or extraction left
        remove_stale(dataset_dir, prefix)
    if os.path.isfile(tarball) and not check_hash(tarball, md5, "md5"):
        raise BundleError(f"{tarball} does not match MD5 {md5} (corrupt or incomplete).", f"delete it, then {manual}.")
    if not os.path.isfile(tarball):
        fetch_tarball(url, md5, tarball, manual)
    staging = tempfile.mkdtemp(prefix=f"{EXTRACT_PREFIX}{os.getpid()}-", dir=dataset_dir)
    try:
        logger.info(f"extracting {tarball}")
        extractall(tarball, staging, file_type="tar.gz", has_base=False)
        images_by_class(os.path.join(staging, "MedNIST"), MEDNIST, "MedNIST.tar.gz")
        os.replace(os.path.join(staging, "MedNIST"), root)
    except BundleError:
        raise
    except Exception as e:
        raise BundleError(f"could not extract {tarball}: {e}", f"delete it, then {manual}.") from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


def fetch_tarball(url: str, md5: str, tarball: str, manual: str) -> None:
    """Download ``url`` to ``tarball`` with a progress bar, into a ``.MedNIST-download-<pid>-*`` folder beside it
    (which the next run removes if this one is killed), MD5-checked (MONAI's ``check_hash``), then renamed."""
    logger.info(f"downloading MedNIST from {url} to {tarball}")
    staging = tempfile.mkdtemp(prefix=f"{DOWNLOAD_PREFIX}{os.getpid()}-", dir=os.path.dirname(tarball))
    partial = os.path.join(staging, "MedNIST.tar.gz")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm_bar(total, "Downloading MedNIST", unit="B", unit_scale=True) as bar:
                for block in iter(lambda: response.read1(1 << 20), b""):  # what has arrived, not a whole block
                    out.write(block)
                    bar.update(len(block))
        if not check_hash(partial, md5, "md5"):
            raise ValueError(f"the downloaded file does not match MD5 {md5}")
        os.replace(partial, tarball)
    except Exception as e:  # network errors and checksum failures alike
        raise BundleError(f"could not download MedNIST from {url}: {e}", manual) from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def folder_datalist(folder: str, classes, key: str = "eval_dir") -> list[dict]:
    """Every image under ``folder/<class>/`` (searched recursively) for each of the model's ``classes`` found."""
    if not os.path.isdir(folder):
        raise BundleError(f"--{key} {folder} is not a folder.", "pass a folder with one subfolder per class.")
    others = [d for d in class_folders(folder) if d not in classes]
    if others:
        named = {c.lower(): c for c in classes}
        listed = ", ".join(
            os.path.join(folder, d) + (f" (did you mean {named[d.lower()]}?)" if d.lower() in named else "")
            for d in others
        )
        raise BundleError(
            f"--{key} {folder} has folder(s) that are not the model's classes: {listed}.",
            f"rename them to one of {', '.join(classes)} (case matters), or move them out of the folder.",
        )
    data = [
        {"image": os.path.join(folder, c, f), "label": label}
        for label, c in enumerate(classes)
        for f in (list_images(os.path.join(folder, c)) if os.path.isdir(os.path.join(folder, c)) else [])
    ]
    if not data:
        raise BundleError(
            f"--{key} {folder} holds no images in subfolders named {', '.join(classes)}.",
            "arrange the images as <eval_dir>/<class name>/<image> (.png, .jpeg, .jpg, .nii, .nii.gz, .dcm).",
        )
    return data


def eval_datalist(eval_dir, data: ImageData, classes) -> list[dict]:
    """What evaluation runs on: every image of ``eval_dir``'s class folders if given, else the saved test split of
    ``data`` (made by training, for the same classes as the model's)."""
    if eval_dir:
        return folder_datalist(str(eval_dir), classes)
    if not os.path.lexists(data.split_file):
        raise BundleError(
            f"no data split at {data.split_file}.",
            "run training first (it writes the split to <output_dir>/split.json), pass the same --output_dir, "
            "or evaluate a folder with --eval_dir DIR.",
        )
    saved = data.saved_split(classes)
    return data.on_disk(saved["test"])


class DataReport:
    """A trainer handler writing, when training starts, ``output_dir/data_report.json`` and its summary in the
    log: from the prepared ``data`` (:class:`ImageData`) and its ``datasets`` (the built
    :class:`~scripts.cache.CachedDataset` of training and validation), images per class and split, identical images
    (within a part, and across parts: a leak), unreadable files, constant images, the files' kinds and sizes, the
    class imbalance."""

    def __init__(self, output_dir: str, data, datasets: list):
        self.path = os.path.join(str(output_dir), "data_report.json")
        self.data, self.datasets = data, datasets

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, lambda _: self.write())

    def content(self) -> dict:
        report = dict(self.data.report)
        counts = report.get("images", {})
        training = {c: n["training"] for c, n in counts.items()}
        seen, failed = {"modes": Counter(), "sizes": Counter(), "constant": []}, []
        for dataset in self.datasets:  # what a per-sample pipeline's datasets do not record stays empty
            for key, value in getattr(dataset, "seen", {}).items():
                seen[key] += value
            failed += getattr(dataset, "failed", [])
        preprocessed = sum(seen["modes"].values())
        report["imbalance"] = {
            "training_images_per_class": training,
            "largest_to_smallest": (
                round(max(training.values()) / max(1, min(training.values())), 2) if training else None
            ),
        }
        report["preprocessed_images"] = preprocessed
        report["unreadable"] = [{"path": p, "reason": r} for p, r in failed]
        report["constant_images"] = {"count": len(seen["constant"]), "examples": seen["constant"][:10]}
        report["kinds"] = dict(seen["modes"].most_common())
        report["sizes"] = {f"{w}x{h}": n for (w, h), n in seen["sizes"].most_common(20)}
        report["distinct_sizes"] = len(seen["sizes"])
        return report

    def write(self) -> dict:
        """The step: write the report and log its summary (a leak and an imbalance as warnings)."""
        report = self.content()
        if is_main_process():
            atomic_write(self.path, lambda f: json.dump(report, f, indent=1))
        counts = report["images"]
        parts = ", ".join(f"{c} {n['training']}/{n['validation']}/{n['test']}" for c, n in counts.items())
        logger.info(
            f"data: {report['source']} at {report['root']}; images per class (training/validation/test): {parts}"
        )
        alike = report["identical_images"]
        if alike["groups"]:
            logger.info(
                f"data: {alike['images']} images in {alike['groups']} groups of identical files, each group kept "
                "in one part of the split"
            )
        if alike["groups_across_splits"]:
            logger.warning(
                f"data: {alike['groups_across_splits']} groups of identical images lie in more than one part (the "
                f"split given, or an older one): test images also seen in training, e.g. {alike['examples_across_splits'][0]}"
            )
        if alike["groups_with_different_labels"]:
            logger.warning(
                f"data: {alike['groups_with_different_labels']} groups of identical images have different labels, "
                f"e.g. {alike['examples_with_different_labels'][0]}"
            )
        constant = report["constant_images"]["count"]
        kinds = ", ".join(f"{k} {n}" for k, n in report["kinds"].items())
        sizes = ", ".join(f"{s} {n}" for s, n in list(report["sizes"].items())[:3])
        logger.info(
            f"data: of {report['preprocessed_images']} preprocessed images, {constant} constant, "
            f"{len(report['unreadable'])} unreadable; kinds: {kinds}; sizes: {sizes}"
            f"{' ...' if report['distinct_sizes'] > 3 else ''}"
        )
        ratio = report["imbalance"]["largest_to_smallest"]
        if ratio and ratio >= 3:
            logger.warning(
                f"data: the largest class has {ratio}x the training images of the smallest (see --class_weights)"
            )
        logger.info(f"wrote {self.path}")
        return report
