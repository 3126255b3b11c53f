"""Build the Model Zoo release zip of this bundle (a maintainer's tool, not part of the release), byte-for-byte
reproducible (sorted entries, fixed time and mode): configs, docs, scripts, LICENSE and the checked model files
(model.pt, its description, calibration and exports), with a metadata.json describing that model.

    python -m tools.release [--ckpt_dir models] [--out_dir dist]
"""

from __future__ import annotations

import json
import os
import zipfile

import fire
import yaml

from scripts.calibration import calibration_for
from scripts.data import file_hash
from scripts.errors import BundleError
from scripts.files import atomic_write
from scripts.model_file import DESCRIPTION_FILES, ModelDescription, load_model, model_metadata
from tools.bundle import BUNDLE_ROOT

NAME = "mednist_classification"
FIXED_TIME = (2020, 1, 1, 0, 0, 0)
MODELS = ("model.pt", *DESCRIPTION_FILES, "calibration.json", "calibration.npz", "model.ts", "model.pt2", "model.onnx")


def published_sha256() -> str | None:
    """The SHA-256 of the published model.pt (large_files.yml), or None."""
    with open(os.path.join(BUNDLE_ROOT, "large_files.yml")) as f:
        entries = yaml.safe_load(f)["large_files"]
    return next((e["hash_val"] for e in entries if e["path"] == "models/model.pt"), None)


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
    model = os.path.join(ckpt_dir, "model.pt")
    if not os.path.isfile(model):
        raise BundleError(f"no trained model at {model}.", "train first, or pass --ckpt_dir.")
    description = ModelDescription.beside(model)  # readable and sensible, or refused
    network = load_model(model, description=description)
    for name in MODELS:
        path = os.path.join(ckpt_dir, name)
        if os.path.isfile(path):
            if name.startswith("calibration"):
                calibration_for(model, network, description)  # readable, for these weights
            elif name not in DESCRIPTION_FILES:
                load_model(path, description=description)  # the bundle's, loadable without running code
            files[f"models/{name}"] = path
    return files


def release(ckpt_dir: str = "models", out_dir: str = "dist") -> None:
    """Write ``<out_dir>/mednist_classification_v<version>.zip`` and print its size and SHA-256; a model.pt other
    than the published one (large_files.yml) is a local build: ``<version>+local.<sha256[:8]>``, and a model
    card whose first line says its figures are the published model's."""
    files = sorted(release_files(ckpt_dir).items())  # first: no empty out_dir is left behind when a model is missing
    with open(os.path.join(BUNDLE_ROOT, "configs", "metadata.json")) as f:
        metadata = model_metadata(json.load(f), ModelDescription.beside(os.path.join(ckpt_dir, "model.pt")))
    model = file_hash(os.path.join(ckpt_dir, "model.pt"))
    replaced = {"configs/metadata.json": (json.dumps(metadata, indent=4) + "\n").encode()}
    if model != published_sha256():
        published = metadata["version"]
        metadata["version"] = f"{published}+local.{model[:8]}"
        replaced["configs/metadata.json"] = (json.dumps(metadata, indent=4) + "\n").encode()
        with open(os.path.join(BUNDLE_ROOT, "docs", "README.md"), "rb") as f:
            note = (
                f"> **These weights are not the published ones of version {published}** (model.pt SHA-256 "
                f"{model}): the figures below are the published model's, not theirs.\n\n"
            )
            replaced["docs/README.md"] = note.encode() + f.read()
        print(f"model.pt is not the published model: released as version {metadata['version']}")
    os.makedirs(out_dir, exist_ok=True)
    out = os.path.join(out_dir, f"{NAME}_v{metadata['version']}.zip")

    def write_zip(target) -> None:
        with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
            for arcname, path in files:
                info = zipfile.ZipInfo(f"{NAME}/{arcname}", date_time=FIXED_TIME)
                info.external_attr = 0o644 << 16
                info.compress_type = zipfile.ZIP_DEFLATED
                if arcname not in replaced:
                    with open(path, "rb") as f:
                        replaced[arcname] = f.read()
                zf.writestr(info, replaced[arcname], compresslevel=9)

    atomic_write(out, write_zip, mode="wb")
    print(f"{out}  {os.path.getsize(out)} bytes  sha256 {file_hash(out)}")


if __name__ == "__main__":
    fire.Fire(release)
