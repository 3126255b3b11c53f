"""The MONAI Deploy application (deploy/app.py, run by .ci/run once deploy/requirements.txt is installed): the
SDK's MonaiBundleInferenceOperator on the bundle's model.ts and on a bundle folder, on DICOM (single frames, a CT
series of three slices, no suffix) and PNG/JPEG: an SR per image, and the labels the bundle's own inference gives."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import BUNDLE, infer, write_dicom

pytest.importorskip("monai.deploy")


def test_the_deploy_app_labels_as_the_bundle_does(trained, mednist, tmp_path):
    import pydicom

    from scripts.export import export

    inputs = tmp_path / "in"
    inputs.mkdir()
    for cls in ("Hand", "CXR", "HeadCT"):
        source = os.path.join(mednist, "MedNIST", cls, "000005.jpeg")
        shutil.copy(source, inputs / f"{cls}.jpeg")
        gray = np.asarray(Image.open(source))
        write_dicom(inputs / f"{cls}.dcm", gray, Modality="DX")
        Image.fromarray(gray).save(inputs / f"{cls}.png")
    series = pydicom.uid.generate_uid()
    for i in range(3):  # a CT series: one row a slice
        gray = np.asarray(Image.open(os.path.join(mednist, "MedNIST", "HeadCT", f"00001{i}.jpeg")))
        write_dicom(inputs / f"ct_{i}", gray, Modality="CT", SeriesInstanceUID=series, InstanceNumber=i + 1)
    (inputs / "notes.txt").write_text("not an image")
    bundle = tmp_path / "bundle"
    shutil.copytree(os.path.join(BUNDLE, "configs"), bundle / "configs")
    shutil.copytree(trained / "models", bundle / "models", ignore=shutil.ignore_patterns("checkpoint*", ".*"))
    export("ts", str(bundle / "models" / "model.pt"))
    infer(trained, tmp_path / "bundle-out", str(inputs))
    with open(tmp_path / "bundle-out" / "predictions.csv") as f:
        expected = {os.path.basename(r["path"]): r["label"] for r in csv.DictReader(f) if not r["error"]}
    assert len(expected) == 12
    for model, out in ((bundle / "models" / "model.ts", tmp_path / "ts"), (bundle, tmp_path / "folder")):
        cmd = [
            sys.executable,
            os.path.join(BUNDLE, "deploy", "app.py"),
            "-i",
            str(inputs),
            "-o",
            str(out),
            "-m",
            str(model),
        ]
        proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        rows = json.loads((out / "summary.json").read_text())["images"]
        got = {os.path.basename(r["path"]): r.get("label") for r in rows}
        assert {k: v for k, v in got.items() if v} == expected, model
        assert got["notes.txt"] is None and 0 < min(r["confidence"] for r in rows if r.get("label")) <= 1
        reports = [pydicom.dcmread(out / name) for name in os.listdir(out) if name.endswith(".dcm")]
        assert len(reports) == 12 and {r.Modality for r in reports} == {"SR"}
        texts = {r.ContentSequence[0].TextValue for r in reports}
        assert any(text.startswith(f"{expected['Hand.dcm']} (confidence ") for text in texts), texts
