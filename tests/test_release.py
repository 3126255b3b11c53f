"""Release: a reproducible Model Zoo zip, downloaded with monai.bundle; large files checked by hash."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch
import yaml

from conftest import BUNDLE, bundle_error, run_bundle


def build_release(ckpt_dir, out_dir) -> str:
    """``python -m scripts.release`` as fire calls it; checks the printed SHA-256; returns the zip's path."""
    from tools.release import release

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        release(str(ckpt_dir), str(out_dir))
    path = printed.getvalue().splitlines()[-1].split()[0]
    assert f"sha256 {hashlib.sha256(open(path, 'rb').read()).hexdigest()}" in printed.getvalue()
    return path


def test_release_zip_is_reproducible_and_downloadable(trained, mednist, http_server, tmp_path):
    folder = trained
    served, base = http_server
    first = build_release(folder / "models", served)
    os.utime(os.path.join(BUNDLE, "configs", "train.json"))  # new timestamps must not change the bytes
    second = build_release(folder / "models", tmp_path / "again")
    with open(os.path.join(BUNDLE, "configs", "metadata.json")) as f:
        version = json.load(f)["version"]
    weights = hashlib.sha256((folder / "models" / "model.pt").read_bytes()).hexdigest()
    local = f"{version}+local.{weights[:8]}"  # not the published model.pt: says so in its version and model card
    assert os.path.basename(first) == f"mednist_classification_v{local}.zip"
    assert open(first, "rb").read() == open(second, "rb").read()
    packed = zipfile.ZipFile(first)
    assert json.loads(packed.read("mednist_classification/configs/metadata.json"))["version"] == local
    card = packed.read("mednist_classification/docs/README.md").decode()
    assert card.startswith(f"> **These weights are not the published ones of version {version}**") and weights in card
    names = packed.namelist()
    assert all(n.startswith("mednist_classification/") for n in names)
    for required in (
        "configs/metadata.json",
        "configs/inference.json",
        "docs/README.md",
        "docs/images/training_history.png",  # the model card's pictures travel with it
        "LICENSE",
        "models/model.pt",
        "models/calibration.json",
    ):
        assert f"mednist_classification/{required}" in names
    assert not any(n.endswith("large_files.yml") or "/tests/" in n or "__pycache__" in n for n in names)
    assert not any("/tools/" in n or "benchmark" in n or "time_to_accuracy" in n for n in names)  # developer tooling

    bundles = tmp_path / "bundles"
    from monai.bundle import download  # `python -m monai.bundle download --name ... --url ... --bundle_dir ...`

    download(name="mednist_classification", url=f"{base}/{os.path.basename(first)}", bundle_dir=str(bundles))
    downloaded = bundles / "mednist_classification"
    assert (downloaded / "models" / "model.pt").read_bytes() == (folder / "models" / "model.pt").read_bytes()
    run_bundle(
        "run",
        "inference",
        "--config_file",
        "configs/inference.json",
        cwd=str(downloaded),
        input=os.path.join(mednist, "MedNIST", "Hand"),
        output_dir=tmp_path / "pred",
    )
    with open(tmp_path / "pred" / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 20 and all(r["label"] and not r["error"] for r in rows)


def _bundle_with_large_files(tmp_path, url: str, sha256: str):
    bundle = tmp_path / "bundle"
    os.makedirs(bundle / "models")
    with open(bundle / "large_files.yml", "w") as f:
        yaml.safe_dump(
            {"large_files": [{"path": "models/model.pt", "url": url, "hash_val": sha256, "hash_type": "sha256"}]}, f
        )
    return bundle


def test_download_large_files_checks_sha256(trained, http_server, tmp_path):
    folder = trained
    served, base = http_server
    shutil.copy(folder / "models" / "model.pt", served / "model.pt")
    good = hashlib.sha256((served / "model.pt").read_bytes()).hexdigest()
    bundle = _bundle_with_large_files(tmp_path / "ok", f"{base}/model.pt", good)
    run_bundle("download_large_files", "--bundle_path", str(bundle))
    assert hashlib.sha256((bundle / "models" / "model.pt").read_bytes()).hexdigest() == good

    tampered = bytearray((served / "model.pt").read_bytes())
    tampered[-100] ^= 0xFF
    (served / "tampered.pt").write_bytes(bytes(tampered))
    bundle = _bundle_with_large_files(tmp_path / "bad", f"{base}/tampered.pt", good)
    from monai.bundle import download_large_files  # what the command above runs, here in this process

    with pytest.raises(Exception, match="check of downloaded file failed"):
        download_large_files(bundle_path=str(bundle))
    assert not (bundle / "models" / "model.pt").exists()


def test_large_files_yml_pins_the_model_and_its_calibration():
    with open(os.path.join(BUNDLE, "large_files.yml")) as f:
        entries = yaml.safe_load(f)["large_files"]
    with open(os.path.join(BUNDLE, "configs", "metadata.json")) as f:
        version = json.load(f)["version"]
    names = {"models/model.pt": ".pt", "models/calibration.json": "_calibration.json"}
    names["models/calibration.npz"] = "_calibration.npz"
    assert [entry["path"] for entry in entries] == list(names)
    for entry in entries:
        assert entry["hash_type"] == "sha256" and re.fullmatch("[0-9a-f]{64}", entry["hash_val"])
        assert entry["url"].startswith("https://")
        # the files of this version
        assert entry["url"].endswith(f"/mednist_classification_v{version}{names[entry['path']]}")


def test_release_without_model_says_so_and_writes_nothing(tmp_path):
    out = tmp_path / "dist"
    proc = subprocess.run(
        [sys.executable, "-m", "tools.release", "--ckpt_dir", str(tmp_path / "none"), "--out_dir", str(out)],
        cwd=BUNDLE,
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0 and f"no trained model at {tmp_path / 'none'}/model.pt" in proc.stderr
    assert "Fix: train first" in proc.stderr and not out.exists()


def test_release_refuses_truncated_or_tampered_models(trained, exported, tmp_path):
    from test_model_file import Trap, entries_of, pt2_cases

    from tools.release import release

    models = tmp_path / "models"
    models.mkdir()
    (models / "model.pt").write_bytes((trained / "models" / "model.pt").read_bytes()[:-1000])  # cut short
    with bundle_error(f"checkpoint {models / 'model.pt'} cannot be read"):
        release(str(models), str(tmp_path / "dist"))
    shutil.copy(trained / "models" / "model.pt", models / "model.pt")
    cases = pt2_cases(entries_of((exported / "model.pt2").read_bytes()), tmp_path / "payload-ran")
    (models / "model.pt2").write_bytes(next(data for label, data in cases if label == "from_file node"))
    with bundle_error(f"refused to load {models / 'model.pt2'}"):
        release(str(models), str(tmp_path / "dist"))
    os.remove(models / "model.pt2")
    torch.jit.save(torch.jit.script(Trap(str(tmp_path / "payload-ran"))), str(models / "model.ts"))
    with bundle_error(f"refused to load {models / 'model.ts'}"):  # TorchScript that writes a file when loaded
        release(str(models), str(tmp_path / "dist"))
    assert not (tmp_path / "dist").exists() and not (tmp_path / "payload-ran").exists()
    os.remove(models / "model.ts")
    shutil.copy(trained / "models" / "calibration.json", models / "calibration.json")
    weights = torch.load(models / "model.pt", weights_only=True)
    weights["class_layers.out.bias"] += 0.01
    torch.save(weights, models / "model.pt")
    with bundle_error("was fitted for other weights than"):  # a calibration of other weights
        release(str(models), str(tmp_path / "dist"))
    assert not (tmp_path / "dist").exists()
