"""The same images as JPEG and as DICOM: do the bundle's inference and the MONAI Deploy app label them alike?

    python -m tools.dicom_agreement --dataset_dir /path/holding/MedNIST --split OUT/split.json --ckpt_dir MODELS
                                    --work_dir /tmp/dicom [--images 0] [--deploy_python PYTHON] [--deploy_images 300]

Developer tooling (not part of the release), for the model card. Each test image of ``split`` (all, or the first
``images``) is written as DICOM in four encodings: 8-bit, 16-bit with a rescale and a soft-tissue window that
renders to the JPEG's pixels (CT-like), MONOCHROME1 (inverted), RLE-compressed. The bundle's ``run inference``
predicts the JPEGs (``--input_list``) and each encoding's folder; the labels of each encoding are compared with the
JPEG's, and the largest difference of a class probability is reported. With ``deploy_python`` (a Python with
``deploy/requirements.txt`` installed), ``deploy/app.py`` runs on ``model.ts`` over the first ``deploy_images``
as 8-bit DICOM and as JPEG, its labels compared with the bundle's. Times are whole commands (start-up included).
Writes ``dicom_agreement.json`` to ``work_dir``.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time

import fire
import numpy as np
from PIL import Image

from scripts.data import ImageData
from tools.bundle import BUNDLE_ROOT
from tools.commands import inference, run_bundle
from tools.dicom import write_dicom

WINDOW = {"RescaleSlope": 1, "RescaleIntercept": -1024, "WindowCenter": 40, "WindowWidth": 400}


def encodings(gray: np.ndarray) -> dict[str, dict]:
    """``write_dicom`` arguments of each encoding of one 8-bit rendering ``gray``."""
    stored = np.round(gray.astype(np.float64) / 255 * 400 + 40 - 200 + 1024).astype(np.uint16)
    return {
        "8-bit": {"pixels": gray},
        "16-bit rescaled and windowed": {"pixels": stored, "Modality": "CT", **WINDOW},
        "MONOCHROME1": {"pixels": 255 - gray, "photometric": "MONOCHROME1"},
        "RLE": {"pixels": gray, "syntax": "1.2.840.10008.1.2.5"},
    }


def _predictions(output_dir: str) -> dict[str, dict]:
    with open(os.path.join(output_dir, "predictions.csv")) as f:
        return {os.path.splitext(os.path.basename(r["path"]))[0]: r for r in csv.DictReader(f)}


def _deploy(python: str, inputs: str, out: str, model: str) -> tuple[dict[str, str], float]:
    start = time.perf_counter()
    cmd = [python, os.path.join(BUNDLE_ROOT, "deploy", "app.py"), "-i", inputs, "-o", out, "-m", model]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"ERROR: deploy/app.py failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    with open(os.path.join(out, "summary.json")) as f:
        rows = json.load(f)["images"]
    return {os.path.splitext(os.path.basename(r["path"]))[0]: r.get("label") for r in rows}, time.perf_counter() - start


def dicom_agreement(
    dataset_dir: str,
    split: str,
    ckpt_dir: str,
    work_dir: str,
    images: int = 0,
    deploy_python: str = "",
    deploy_images: int = 300,
) -> None:
    if os.path.exists(work_dir):
        sys.exit(f"ERROR: {work_dir} exists. Fix: pass a new --work_dir.")
    root = ImageData(dataset_dir, "", download=False).root
    with open(split) as f:
        test = [os.path.join(root, item["image"]) for item in json.load(f)["test"]]
    test = test[: int(images)] if int(images) > 0 else test
    names = {path: f"{path.split(os.sep)[-2]}_{os.path.splitext(os.path.basename(path))[0]}" for path in test}
    folders = {}
    for path in test:
        gray = np.asarray(Image.open(path).convert("L"))
        for encoding, kwargs in encodings(gray).items():
            folder = folders.setdefault(encoding, os.path.join(work_dir, "dicom", encoding.replace(" ", "_")))
            os.makedirs(folder, exist_ok=True)
            write_dicom(os.path.join(folder, names[path] + ".dcm"), **kwargs)
    jpeg_dir = os.path.join(work_dir, "jpeg")  # the JPEGs under the same names, linked
    os.makedirs(jpeg_dir)
    for path in test:
        os.symlink(path, os.path.join(jpeg_dir, names[path] + ".jpeg"))
    report = {"images": len(test), "ckpt_dir": os.path.abspath(ckpt_dir), "bundle": {}}
    timing = inference(jpeg_dir, os.path.join(work_dir, "out", "jpeg"), ckpt_dir)
    jpeg = _predictions(os.path.join(work_dir, "out", "jpeg"))
    classes = [c for c in next(iter(jpeg.values())) if c not in ("path", "true_label", "label", "confidence")]
    classes = classes[: classes.index("ood_score")]
    report["bundle"]["JPEG"] = {"wall_s": round(timing["wall_s"], 1)}
    for encoding, folder in folders.items():
        out = os.path.join(work_dir, "out", os.path.basename(folder))
        timing = inference(folder, out, ckpt_dir)
        got = _predictions(out)
        same = sum(got[n]["label"] == jpeg[n]["label"] for n in names.values())
        diff = max(abs(float(got[n][c]) - float(jpeg[n][c])) for n in names.values() for c in classes)
        errors = sum(bool(got[n]["error"]) for n in names.values())
        report["bundle"][encoding] = {"same_label": same, "errors": errors, "max_prob_diff": round(diff, 6)}
        report["bundle"][encoding]["wall_s"] = round(timing["wall_s"], 1)
        print(f"{encoding}: {same} of {len(names)} labels as the JPEG's, {errors} errors, probabilities within "
              f"{diff:.2g}; {timing['wall_s']:.1f} s")  # fmt: skip
    print(f"JPEG: {report['bundle']['JPEG']['wall_s']} s for {len(test)} images")
    if deploy_python:
        report["deploy"] = _deploy_runs(deploy_python, ckpt_dir, work_dir, test[: int(deploy_images)], names, jpeg)
    with open(os.path.join(work_dir, "dicom_agreement.json"), "w") as f:
        json.dump(report, f, indent=1)


def _deploy_runs(python: str, ckpt_dir: str, work_dir: str, subset: list[str], names: dict, jpeg: dict) -> dict:
    """deploy/app.py on model.ts over ``subset`` as 8-bit DICOM and as JPEG; labels against the bundle's."""
    models = os.path.join(work_dir, "bundle", "models")
    shutil.copytree(ckpt_dir, models, ignore=shutil.ignore_patterns("checkpoint*", ".*"))
    run_bundle(
        "ckpt_export",
        "network_def",
        "--filepath",
        os.path.join(models, "model.ts"),
        "--ckpt_file",
        os.path.join(models, "model.pt"),
        "--meta_file",
        "configs/metadata.json",
        "--config_file",
        "configs/inference.json",
        "--ckpt_dir",
        models,
    )  # fmt: skip  (the README's export command)
    result = {"images": len(subset)}
    for kind, source in (("DICOM 8-bit", os.path.join(work_dir, "dicom", "8-bit")), ("JPEG", None)):
        inputs = os.path.join(work_dir, "deploy-in", kind.replace(" ", "_"))
        os.makedirs(inputs)
        for path in subset:
            name = names[path] + (".dcm" if source else ".jpeg")
            shutil.copy(os.path.join(source, name) if source else path, os.path.join(inputs, name))
        out = os.path.join(work_dir, "deploy-out", kind.replace(" ", "_"))
        labels, wall = _deploy(python, inputs, out, os.path.join(models, "model.ts"))
        same = sum(labels.get(names[p]) == jpeg[names[p]]["label"] for p in subset)
        result[kind] = {"same_label_as_bundle": same, "wall_s": round(wall, 1)}
        print(f"deploy app, {kind}: {same} of {len(subset)} labels as the bundle's; {wall:.1f} s")
    return result


if __name__ == "__main__":
    fire.Fire(dicom_agreement)
