"""Build the Model Zoo release zip of this bundle, byte-for-byte reproducible.

    python -m scripts.release [--ckpt_dir models] [--out_dir dist]

Writes ``dist/mednist_classification_v<version>.zip`` (version from configs/metadata.json) holding the folder
``mednist_classification/`` with configs, docs, scripts, LICENSE and ``models/model.pt`` (plus
calibration.json/.npz, model.ts, model.pt2 and model.onnx when present), as the Model Zoo packs a bundle:
``large_files.yml`` stays out, since the zip carries the weights. Entries are sorted and stamped with a fixed
time and mode, so the same inputs give the same bytes. Every model file is checked first (complete, and
loadable without running code: see ``scripts.model_file``). Prints the zip's size and SHA-256.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile

import fire
import numpy as np

from .model_file import load_model
from .utils import BUNDLE_ROOT, BundleError, atomic_write

NAME = "mednist_classification"
FIXED_TIME = (2020, 1, 1, 0, 0, 0)
MODELS = ("model.pt", "calibration.json", "calibration.npz", "model.ts", "model.pt2", "model.onnx")


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_model_file(path: str) -> None:
    """Stop with a message naming ``path`` unless it is a complete model file this bundle loads without running
    code (``scripts.model_file.load_model``), or a calibration saved by training (plain JSON, arrays without
    pickle)."""
    if path.endswith((".json", ".npz")):
        try:
            if path.endswith(".json"):
                with open(path) as f:
                    temperature = json.load(f)["temperature"]
                assert isinstance(temperature, (int, float)) and temperature > 0
            else:
                with np.load(path, allow_pickle=False) as npz:
                    assert {"means", "precision"} <= set(npz.files)
        except Exception as e:
            raise BundleError(f"{path} is not a calibration saved by training ({e!r}).", "train again.") from e
    else:
        load_model(path)


def release_files(ckpt_dir: str) -> dict[str, str]:
    """Archive name -> file on disk, for everything the release holds."""
    files = {"LICENSE": os.path.join(BUNDLE_ROOT, "LICENSE")}
    for folder in ("configs", "docs", "scripts"):
        for dirpath, dirnames, filenames in os.walk(os.path.join(BUNDLE_ROOT, folder)):
            dirnames[:] = [d for d in dirnames if d != "__pycache__" and not d.startswith(".")]
            for name in filenames:
                if not name.endswith((".pyc", ".pyo")) and not name.startswith("."):
                    path = os.path.join(dirpath, name)
                    files[os.path.relpath(path, BUNDLE_ROOT).replace(os.sep, "/")] = path
    if not os.path.isfile(os.path.join(ckpt_dir, "model.pt")):
        raise BundleError(f"no trained model at {ckpt_dir}/model.pt.", "train first, or pass --ckpt_dir.")
    for name in MODELS:
        path = os.path.join(ckpt_dir, name)
        if os.path.isfile(path):
            check_model_file(path)  # complete, and loadable without running code
            files[f"models/{name}"] = path
    return files


def release(ckpt_dir: str = "models", out_dir: str = "dist") -> None:
    """Write the release zip and print its path, size and SHA-256."""
    with open(os.path.join(BUNDLE_ROOT, "configs", "metadata.json")) as f:
        version = json.load(f)["version"]
    files = sorted(release_files(ckpt_dir).items())  # first: no empty out_dir is left behind when a model is missing
    os.makedirs(out_dir, exist_ok=True)
    out = os.path.join(out_dir, f"{NAME}_v{version}.zip")

    def write_zip(target) -> None:
        with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
            for arcname, path in files:
                info = zipfile.ZipInfo(f"{NAME}/{arcname}", date_time=FIXED_TIME)
                info.external_attr = 0o644 << 16
                info.compress_type = zipfile.ZIP_DEFLATED
                with open(path, "rb") as f:
                    zf.writestr(info, f.read(), compresslevel=9)

    atomic_write(out, write_zip, mode="wb")
    print(f"{out}  {os.path.getsize(out)} bytes  sha256 {sha256(out)}")


if __name__ == "__main__":
    fire.Fire(release)
