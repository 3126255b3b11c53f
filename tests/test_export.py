"""Export: TorchScript via monai.bundle ckpt_export, torch.export and ONNX; each matches the checkpoint."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest

from conftest import BUNDLE, INFERENCE, run_bundle

CLASSES = ["AbdomenCT", "BreastMRI", "CXR", "ChestCT", "Hand", "HeadCT"]


def probabilities(path) -> dict:
    with open(path) as f:
        return {r["path"]: [float(r[c]) for c in CLASSES] for r in csv.DictReader(f) if not r["error"]}


@pytest.fixture(scope="module")
def exported(trained, mednist, tmp_path_factory):
    folder, _ = trained
    out = tmp_path_factory.mktemp("export")
    ckpt = folder / "models" / "model.pt"
    run_bundle(
        "ckpt_export",
        "network_def",
        "--filepath",
        str(out / "model.ts"),
        "--ckpt_file",
        str(ckpt),
        "--meta_file",
        os.path.join(BUNDLE, "configs", "metadata.json"),
        "--config_file",
        INFERENCE,
    )
    for kind in ("pt2", "onnx"):
        subprocess.run(
            [
                sys.executable,
                "-m",
                "scripts.export",
                kind,
                "--ckpt_path",
                str(ckpt),
                "--out",
                str(out / f"model.{kind}"),
            ],
            cwd=BUNDLE,
            check=True,
            capture_output=True,
            text=True,
        )
    images = os.path.join(mednist, "MedNIST")
    run_bundle(
        "run",
        "inference",
        "--config_file",
        INFERENCE,
        input=images,
        output_dir=out / "ckpt",
        ckpt_dir=folder / "models",
    )
    return out, images


@pytest.mark.parametrize("suffix", ["ts", "pt2", "onnx"])
def test_exported_model_matches_checkpoint(exported, suffix):
    out, images = exported
    assert os.path.getsize(out / f"model.{suffix}") > 10_000_000
    run_bundle(
        "run",
        "inference",
        "--config_file",
        INFERENCE,
        input=images,
        output_dir=out / suffix,
        model_file=out / f"model.{suffix}",
    )
    reference, got = probabilities(out / "ckpt" / "predictions.csv"), probabilities(out / suffix / "predictions.csv")
    assert len(got) == len(reference) == 120
    for path, probs in reference.items():
        assert got[path] == pytest.approx(probs, abs=1e-5)


def test_torchscript_embeds_configs(exported):
    import zipfile

    out, _ = exported
    names = zipfile.ZipFile(out / "model.ts").namelist()
    assert any(n.endswith("extra/metadata.json") for n in names)
    assert any(n.endswith("extra/inference.json") for n in names)


def test_bad_model_file_is_named(tmp_path, mednist):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"garbage")
    proc = run_bundle(
        "run", "inference", "--config_file", INFERENCE, input=mednist, output_dir=tmp_path, model_file=bad, check=False
    )
    assert proc.returncode != 0 and f"cannot load exported model {bad}" in proc.stderr
