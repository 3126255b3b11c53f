"""Export: TorchScript via monai.bundle's ckpt_export, torch.export and ONNX; each matches the checkpoint."""

from __future__ import annotations

import csv
import os
import zipfile

import pytest
from monai.bundle import ckpt_export

from conftest import BUNDLE, CLASSES, INFERENCE, META, bundle_error, infer


def probabilities(path) -> dict:
    with open(path) as f:
        return {r["path"]: [float(r[c]) for c in CLASSES] for r in csv.DictReader(f) if not r["error"]}


@pytest.fixture(scope="module")
def exported(trained, mednist, tmp_path_factory):
    from scripts.export import export_onnx, export_pt2

    out = tmp_path_factory.mktemp("export")
    ckpt = str(trained / "models" / "model.pt")
    ckpt_export(net_id="network_def", filepath=str(out / "model.ts"), ckpt_file=ckpt, meta_file=META,
                config_file=INFERENCE, bundle_root=BUNDLE)  # fmt: skip
    export_pt2(ckpt, str(out / "model.pt2"))
    export_onnx(ckpt, str(out / "model.onnx"))
    images = os.path.join(mednist, "MedNIST")
    infer(trained, out / "ckpt", images)
    return out, images


@pytest.mark.parametrize("suffix", ["ts", "pt2", "onnx"])
def test_exported_model_matches_checkpoint(exported, trained, suffix):
    out, images = exported
    assert os.path.getsize(out / f"model.{suffix}") > 10_000_000
    infer(trained, out / suffix, images, model_file=out / f"model.{suffix}", ckpt_dir=out / "no-checkpoint-needed")
    reference, got = probabilities(out / "ckpt" / "predictions.csv"), probabilities(out / suffix / "predictions.csv")
    assert len(got) == len(reference) == 120
    for path, probs in reference.items():
        assert got[path] == pytest.approx(probs, abs=1e-5)


def test_torchscript_embeds_configs(exported):
    out, _ = exported
    names = zipfile.ZipFile(out / "model.ts").namelist()
    assert any(n.endswith("extra/metadata.json") for n in names)
    assert any(n.endswith("extra/inference.json") for n in names)


def test_bad_model_file_is_named(trained, tmp_path, mednist):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"garbage")
    with bundle_error(f"cannot load exported model {bad}"):
        infer(trained, tmp_path / "out", mednist, model_file=bad)
