"""MedNIST on disk: find or download it, check it, split it once, preprocess it into memory in worker processes."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from functools import partial

import numpy as np
import torch
from monai.apps.utils import check_hash, download_url, extractall
from monai.data import partition_dataset_classes
from monai.utils import convert_to_numpy, optional_import

from .utils import BundleError, as_bool, atomic_write, remove_stale, root_cause

tqdm, has_tqdm = optional_import("tqdm", name="tqdm")

CLASSES = ("AbdomenCT", "BreastMRI", "CXR", "ChestCT", "Hand", "HeadCT")
SPLITS = ("training", "validation", "test")
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
IMAGE_FORMATS = ("JPEG", "PNG")  # what Pillow may open: not EPS, which it renders by running Ghostscript
DOWNLOAD_PREFIX, EXTRACT_PREFIX = ".MedNIST-download-", ".MedNIST-extract-"
logger = logging.getLogger(__name__)


def class_names() -> list[str]:
    """The class names, in label order (for metrics that name them)."""
    return list(CLASSES)


def checked_gray(image):
    """``PILReader``'s converter, before any pixel is decoded: content other than :data:`IMAGE_FORMATS` refused;
    RGB(A), palette and 1-bit images to one luma channel; grayscale ones (8/16-bit, float), as MedNIST's, as is."""
    if image.format not in (*IMAGE_FORMATS, "MPO"):  # MPO: a JPEG holding several pictures, as cameras write
        raise ValueError(f"its content is {image.format}, not {' or '.join(IMAGE_FORMATS)}")
    return image if image.mode in ("L", "I;16", "I;16B", "I;16L", "I", "F") else image.convert("L")


def list_images(folder: str) -> list[str]:
    """Sorted image file names (not paths) directly inside ``folder``."""
    return sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_SUFFIXES))


def check_class_folders(root: str, key: str = "dataset_dir") -> dict[str, list[str]]:
    """Image names per class under ``root``; stop with a message if a class folder is missing or empty."""
    if not os.path.isdir(root):
        raise BundleError(f"{key}: folder {root} does not exist.", f"point --{key} at a folder of MedNIST layout.")
    found = {c: list_images(os.path.join(root, c)) if os.path.isdir(os.path.join(root, c)) else [] for c in CLASSES}
    empty = [c for c, files in found.items() if not files]
    if empty:
        raise BundleError(
            f"{key}: {root} has no images for class(es) {', '.join(empty)}.",
            f"each of {', '.join(CLASSES)} needs a subfolder of .jpeg/.jpg/.png images there; "
            "re-extract MedNIST.tar.gz or point the key at a complete copy.",
        )
    return found


def mednist_root(dataset_dir: str) -> str:
    """Where MedNIST's class folders are: ``dataset_dir/MedNIST``, or else ``dataset_dir`` itself if it holds any."""
    nested = os.path.join(dataset_dir, "MedNIST")
    if not os.path.isdir(nested) and any(os.path.isdir(os.path.join(dataset_dir, c)) for c in CLASSES):
        return dataset_dir
    return nested


def prepare_mednist(dataset_dir: str, download: bool, url: str, md5: str) -> tuple[str, dict[str, list[str]]]:
    """``dataset_dir/MedNIST`` and its image names per class, downloaded and extracted first if absent and
    ``download``: extracted beside it and renamed into place when complete, never half-extracted."""
    root = mednist_root(dataset_dir)
    if os.path.isdir(root):
        return root, check_class_folders(root)
    tarball = os.path.join(dataset_dir, "MedNIST.tar.gz")
    manual = f"download {url} by hand and either put it at {tarball} or extract it so that {root}/<class>/ exist"
    if not download and not os.path.isfile(tarball):
        raise BundleError(f"no MedNIST data at {root} and download is false.", f"{manual}, or set --download true.")
    os.makedirs(dataset_dir, exist_ok=True)
    for prefix in (DOWNLOAD_PREFIX, EXTRACT_PREFIX):  # what a killed download or extraction left
        remove_stale(dataset_dir, prefix)
    if os.path.isfile(tarball) and not check_hash(tarball, md5, "md5"):
        raise BundleError(f"{tarball} does not match MD5 {md5} (corrupt or incomplete).", f"delete it, then {manual}.")
    if not os.path.isfile(tarball):
        fetch_tarball(url, md5, tarball, manual)
    staging = tempfile.mkdtemp(prefix=f"{EXTRACT_PREFIX}{os.getpid()}-", dir=dataset_dir)
    try:
        extractall(tarball, staging, file_type="tar.gz", has_base=False)
        found = check_class_folders(os.path.join(staging, "MedNIST"), key="MedNIST.tar.gz")
        os.replace(os.path.join(staging, "MedNIST"), root)
    except BundleError:
        raise
    except Exception as e:
        raise BundleError(f"could not extract {tarball}: {e}", f"delete it, then {manual}.") from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root, found


def fetch_tarball(url: str, md5: str, tarball: str, manual: str) -> None:
    """Download ``url`` to ``tarball`` with MONAI's ``download_url`` (MD5-checked), staged (``tempfile``'s folder,
    for the call) in a ``.MedNIST-download-<pid>-*`` folder beside it, which the next run removes if killed."""
    logger.info(f"downloading MedNIST from {url} to {tarball}")
    staging = tempfile.mkdtemp(prefix=f"{DOWNLOAD_PREFIX}{os.getpid()}-", dir=os.path.dirname(tarball))
    saved, tempfile.tempdir = tempfile.tempdir, staging
    try:
        download_url(url, os.path.join(staging, "MedNIST.tar.gz"), hash_val=md5, hash_type="md5", progress=False)
        os.replace(os.path.join(staging, "MedNIST.tar.gz"), tarball)
    except Exception as e:  # network errors and checksum failures alike
        raise BundleError(f"could not download MedNIST from {url}: {e}", manual) from e
    finally:
        tempfile.tempdir = saved
        shutil.rmtree(staging, ignore_errors=True)


def make_split(found: dict[str, list[str]], val_frac: float, test_frac: float, seed: int) -> dict[str, list]:
    """Stratified split (MONAI's ``partition_dataset_classes``): each class's images shuffled with ``seed`` and cut
    into training, validation and test parts; each part listed by class, then file name."""
    items = [{"image": f"{cls}/{f}", "label": label} for label, cls in enumerate(CLASSES) for f in found[cls]]
    parts = partition_dataset_classes(
        items,
        classes=[d["label"] for d in items],
        ratios=[1 - val_frac - test_frac, val_frac, test_frac],
        shuffle=True,
        seed=seed,
    )
    return {name: sorted(part, key=lambda d: (d["label"], d["image"])) for name, part in zip(SPLITS, parts)}


def load_split(
    dataset_dir: str,
    split_file: str,
    val_frac: float,
    test_frac: float,
    seed: int,
    download: bool = True,
    url: str = "",
    md5: str = "",
) -> dict[str, list[dict]]:
    """The data lists ``{"training", "validation", "test"}`` (absolute paths, integer labels) of the split made once
    into ``split_file`` and reused by later runs, refused if made with other fractions or seed or images are gone."""
    root, found = prepare_mednist(dataset_dir, as_bool(download, "download"), url, md5)
    params = {"seed": int(seed), "val_frac": float(val_frac), "test_frac": float(test_frac)}
    if os.path.isfile(split_file):
        with open(split_file) as f:
            saved = json.load(f)
        old = {k: saved.get(k) for k in params}
        if old != params:
            raise BundleError(
                f"{split_file} was made with {old}, not {params}.",
                "pass the same seed/val_frac/test_frac, or choose another --output_dir (or delete that file) "
                "to make a new split.",
            )
        logger.info(f"reusing the data split in {split_file}")
    else:
        saved = {**params, "classes": list(CLASSES), **make_split(found, **params)}
        for name in SPLITS:
            if not saved[name]:
                raise BundleError(
                    f"the {name} set would be empty with val_frac={val_frac}, test_frac={test_frac}.",
                    "add images or change the fractions.",
                )
        atomic_write(split_file, lambda f: json.dump(saved, f, indent=1))
        logger.info(f"wrote the data split to {split_file}")
    fix = "restore the dataset, or choose another --output_dir to make a new split."
    lists = {name: on_disk(saved[name], root, split_file, fix) for name in SPLITS}
    for n, items in lists.items():
        logger.info(f"{n}: {len(items)} images")
    return lists


def test_datalist(split_file: str, dataset_dir: str) -> list[dict]:
    """The test part of a split saved by training, with absolute paths, without touching the network."""
    if not os.path.isfile(split_file):
        raise BundleError(
            f"no data split at {split_file}.",
            "run training first (it writes the split to <output_dir>/split.json), pass the same --output_dir, "
            "or evaluate a folder with --eval_dir DIR.",
        )
    with open(split_file) as f:
        items = json.load(f)["test"]
    return on_disk(items, mednist_root(dataset_dir), split_file, "pass the --dataset_dir used for training.")


def on_disk(items: list[dict], root: str, split_file: str, fix: str) -> list[dict]:
    """The items of a saved split with their paths under ``root``, or a ``BundleError`` if an image is not there."""
    data = [{"image": os.path.join(root, d["image"]), "label": d["label"]} for d in items]
    missing = [d["image"] for d in data if not os.path.isfile(d["image"])]
    if missing:
        problem = f"{len(missing)} image(s) named in {split_file} are not under {root}, e.g. {missing[0]}."
        raise BundleError(problem, fix)
    return data


def folder_datalist(folder: str) -> list[dict]:
    """Every image under ``folder/<class>/`` (searched recursively) for each of the six class names found."""
    if not os.path.isdir(folder):
        raise BundleError(f"--eval_dir {folder} is not a folder.", "pass a folder with one subfolder per class.")
    others = [d for d in sorted(os.listdir(folder)) if d not in CLASSES and not d.startswith(".")]
    others = [d for d in others if os.path.isdir(os.path.join(folder, d))]
    if others:
        named = {c.lower(): c for c in CLASSES}
        listed = ", ".join(
            os.path.join(folder, d) + (f" (did you mean {named[d.lower()]}?)" if d.lower() in named else "")
            for d in others
        )
        raise BundleError(
            f"--eval_dir {folder} has folder(s) that are not MedNIST class names: {listed}.",
            f"rename them to one of {', '.join(CLASSES)} (case matters), or move them out of the folder.",
        )
    data = []
    for label, cls in enumerate(CLASSES):
        for dirpath, _, files in sorted(os.walk(os.path.join(folder, cls))):
            data += [
                {"image": os.path.join(dirpath, f), "label": label}
                for f in sorted(files)
                if f.lower().endswith(IMAGE_SUFFIXES)
            ]
    if not data:
        raise BundleError(
            f"--eval_dir {folder} holds no images in subfolders named {', '.join(CLASSES)}.",
            "arrange the images as <eval_dir>/<class name>/*.jpeg (or .jpg/.png).",
        )
    return data


_worker_transform = None  # set in each worker process by _start_worker


def _die_with_parent(parent: int) -> None:
    """Linux: have the kernel kill this process when its parent dies, so no orphan holds memory."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the call above
        os._exit(1)


def _start_worker(transform, parent: int) -> None:
    """A worker's initializer: killed with its parent, one torch thread (a forked OpenMP pool must not be
    reused), and the transform, inherited through ``fork`` rather than pickled."""
    global _worker_transform
    _die_with_parent(parent)
    torch.set_num_threads(1)
    _worker_transform = transform


def _preprocess_in_worker(items: list[dict]) -> tuple:
    return _preprocess(_worker_transform, items)


def _preprocess(transform, items: list[dict]) -> tuple:
    """``items`` through ``transform``, packed as one stacked image array plus the other fields, and the
    ``(path, reason)`` of every image that could not be read."""
    images, rest, failed = [], [], []
    for item in items:
        try:
            out = transform(dict(item))
        except Exception as e:
            cause = root_cause(e)
            failed.append((str(item["image"]), f"{type(cause).__name__}: {cause}"))
            continue
        images.append(convert_to_numpy(out["image"], dtype=np.float32))
        rest.append({k: v for k, v in out.items() if k != "image"} | {"path": str(item["image"])})
    return (np.stack(images) if images else None), rest, failed


def preload(
    data: dict[str, list[dict]], transform, num_workers: int = 1, skip_unreadable=False, chunk_size: int = 256
) -> dict[str, list[dict]]:
    """Every item of each list of ``data`` (e.g. ``{"training": [...], "validation": [...]}``) through
    ``transform`` (the deterministic preprocessing), in memory under the same names, each as ``{"image": float32
    tensor, "path": its file, ...}`` for a plain ``monai.data.Dataset``. Chunks go to ``num_workers`` forked
    processes (Linux; else this process) that die with it, not threads as in MONAI's ``CacheDataset``: the
    transforms hold Python's lock. Unreadable images are named together at the end, or with ``skip_unreadable``
    left out and counted."""
    workers = max(1, int(num_workers))
    chunks = {
        name: [items[i : i + chunk_size] for i in range(0, len(items), chunk_size)] for name, items in data.items()
    }
    bar = tqdm(total=sum(map(len, data.values())), desc="Loading dataset") if has_tqdm else None
    cached, failed, pool = {}, [], None
    try:
        if workers > 1 and sys.platform.startswith("linux"):  # fork is safe on Linux only
            fork = multiprocessing.get_context("fork")
            init = (transform, os.getpid())
            pool = ProcessPoolExecutor(workers, mp_context=fork, initializer=_start_worker, initargs=init)
        else:
            workers = 1
        for name, parts in chunks.items():
            start, cached[name] = time.perf_counter(), []
            results = pool.map(_preprocess_in_worker, parts) if pool else map(partial(_preprocess, transform), parts)
            for stacked, rest, bad in results:
                failed += bad
                if stacked is not None:
                    tensor = torch.from_numpy(stacked)
                    cached[name] += [{"image": tensor[i], **other} for i, other in enumerate(rest)]
                if bar is not None:
                    bar.update(len(rest) + len(bad))
            took = time.perf_counter() - start
            logger.info(f"cached {len(cached[name])} items in {took:.1f} s ({workers} process(es)): {name}")
    except BrokenProcessPool as e:  # a worker was killed, e.g. by the out-of-memory killer
        raise BundleError(
            f"a process preprocessing the images died ({e}).",
            f"pass a smaller --cache_num_workers (it was {workers}; 1 works in the training process).",
        ) from e
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        if bar is not None:
            bar.close()
    if failed:
        listed = "\n".join(f"    {path}: {reason}" for path, reason in failed)
        if not as_bool(skip_unreadable, "skip_unreadable"):
            raise BundleError(
                f"cannot read {len(failed)} image(s):\n{listed}",
                "replace or delete them (and train with a new --output_dir, for a new split), "
                "or pass --skip_unreadable true to leave them out.",
            )
        logger.warning(f"skipped {len(failed)} unreadable image(s) (--skip_unreadable true):\n{listed}")
    return cached


def eval_datalist(eval_dir: str | None, split_file: str, dataset_dir: str) -> list[dict]:
    """What evaluation runs on: every image of ``eval_dir``'s class folders if given, else the saved test split."""
    return folder_datalist(eval_dir) if eval_dir else test_datalist(split_file, dataset_dir)
