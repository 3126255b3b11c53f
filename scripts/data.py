"""MedNIST on disk: find or download it, check it, and make the train/validation/test split once."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile

import numpy as np

from scripts.errors import BundleError
from scripts.handlers import atomic_write

CLASSES = ("AbdomenCT", "BreastMRI", "CXR", "ChestCT", "Hand", "HeadCT")
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
logger = logging.getLogger(__name__)


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


def prepare_mednist(dataset_dir: str, download: bool, url: str, md5: str) -> tuple[str, dict[str, list[str]]]:
    """Return ``dataset_dir/MedNIST`` and its image names per class, downloading and extracting it first if it is
    absent and ``download``.

    Extraction goes to a temporary folder beside the target and is renamed into place only when complete,
    so an interrupted or failed download never leaves a half-extracted ``MedNIST`` folder that looks usable.
    """
    root = os.path.join(dataset_dir, "MedNIST")
    if os.path.isdir(root):
        return root, check_class_folders(root)
    tarball = os.path.join(dataset_dir, "MedNIST.tar.gz")
    manual = f"download {url} by hand and either put it at {tarball} or extract it so that {root}/<class>/ exist"
    if not download and not os.path.isfile(tarball):
        raise BundleError(f"no MedNIST data at {root} and download is false.", f"{manual}, or set --download true.")
    from monai.apps.utils import check_hash, download_url, extractall

    os.makedirs(dataset_dir, exist_ok=True)
    if os.path.isfile(tarball) and not check_hash(tarball, md5, "md5"):
        raise BundleError(f"{tarball} does not match MD5 {md5} (corrupt or incomplete).", f"delete it, then {manual}.")
    if not os.path.isfile(tarball):
        logger.info(f"downloading MedNIST from {url} to {tarball}")
        partial = tarball + ".partial"
        try:
            download_url(url, partial, hash_val=md5, hash_type="md5", progress=False)
        except Exception as e:  # network errors and checksum failures alike
            if os.path.exists(partial):
                os.remove(partial)
            raise BundleError(f"could not download MedNIST from {url}: {e}", manual) from e
        os.replace(partial, tarball)
    staging = tempfile.mkdtemp(prefix=".MedNIST-extract-", dir=dataset_dir)
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


def make_split(found: dict[str, list[str]], val_frac: float, test_frac: float, seed: int) -> dict[str, list]:
    """Stratified split: each class is shuffled with ``seed`` and cut into test, validation and training parts."""
    rng = np.random.default_rng(seed)
    split: dict[str, list] = {"training": [], "validation": [], "test": []}
    for label, cls in enumerate(CLASSES):
        files = [f"{cls}/{f}" for f in found[cls]]
        order = rng.permutation(len(files))
        n_test, n_val = int(round(len(files) * test_frac)), int(round(len(files) * val_frac))
        parts = {
            "test": order[:n_test],
            "validation": order[n_test : n_test + n_val],
            "training": order[n_test + n_val :],
        }
        for name, idx in parts.items():
            split[name] += [{"image": files[i], "label": label} for i in sorted(idx)]
    return split


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
    """The data lists ``{"training", "validation", "test"}`` with absolute image paths and integer labels.

    The split is made once and written to ``split_file``; later runs, evaluation included, reuse exactly that
    split, and stop if it was made with other fractions or seed, or names images that are gone.
    """
    root, found = prepare_mednist(dataset_dir, download, url, md5)
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
        for name in ("training", "validation", "test"):
            if not saved[name]:
                raise BundleError(
                    f"the {name} set would be empty with val_frac={val_frac}, test_frac={test_frac}.",
                    "add images or change the fractions.",
                )
        atomic_write(split_file, lambda f: json.dump(saved, f, indent=1))
        logger.info(f"wrote the data split to {split_file}")
    lists = {
        n: [{"image": os.path.join(root, d["image"]), "label": d["label"]} for d in saved[n]]
        for n in ("training", "validation", "test")
    }
    missing = [d["image"] for n in lists for d in lists[n] if not os.path.isfile(d["image"])]
    if missing:
        raise BundleError(
            f"{len(missing)} image(s) named in {split_file} are gone, e.g. {missing[0]}.",
            "restore the dataset, or choose another --output_dir to make a new split.",
        )
    for n, items in lists.items():
        logger.info(f"{n}: {len(items)} images")
    return lists


def split_datalist(split_file: str, dataset_dir: str, name: str = "test") -> list[dict]:
    """The ``name`` part of a split saved by training, with absolute paths, without touching the network."""
    if not os.path.isfile(split_file):
        raise BundleError(
            f"no data split at {split_file}.",
            "run training first (it writes the split to <output_dir>/split.json), pass the same --output_dir, "
            "or evaluate a folder with --eval_dir DIR.",
        )
    with open(split_file) as f:
        items = json.load(f)[name]
    root = os.path.join(dataset_dir, "MedNIST")
    data = [{"image": os.path.join(root, d["image"]), "label": d["label"]} for d in items]
    missing = [d["image"] for d in data if not os.path.isfile(d["image"])]
    if missing:
        raise BundleError(
            f"{len(missing)} {name} image(s) named in {split_file} are not under {root}, e.g. {missing[0]}.",
            "pass the --dataset_dir used for training.",
        )
    return data


def folder_datalist(folder: str) -> list[dict]:
    """Every image under ``folder/<class>/`` (searched recursively) for each of the six class names found."""
    if not os.path.isdir(folder):
        raise BundleError(f"--eval_dir {folder} is not a folder.", "pass a folder with one subfolder per class.")
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
