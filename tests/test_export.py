"""Export: TorchScript via monai.bundle's ckpt_export, torch.export and ONNX; each matches the checkpoint."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
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
    calibration = trained / "models" / "calibration.json"  # the checkpoint's, so that probabilities agree
    infer(trained, out / suffix, images, model_file=out / f"model.{suffix}", ckpt_dir=out / "no-checkpoint-needed",
          calibration_path=calibration)  # fmt: skip
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


class Payload:
    """Unpickling this creates ``path``: the side effect a tampered model file must never get to cause."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def rewrite_zip(src, dst, edit) -> None:
    """Copy the zip archive ``src`` to ``dst`` with each entry's bytes passed through ``edit(name, data)``."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, edit(info.filename, zin.read(info.filename)))


def tampered_pt2(src, dst, kind: str, flag) -> None:
    """A copy of the export ``src`` whose loading by ``torch.export.load`` would create ``flag``."""
    import json
    import pickle

    def edit(name, data):
        if kind == "pickled weight" and name.endswith("weights_config.json"):
            config = json.loads(data)
            next(iter(config["config"].values()))["use_pickle"] = True
            return json.dumps(config).encode()
        if (kind == "pickled weight" and name.endswith("/weight_0")) or (
            kind == "sample inputs" and name.endswith("sample_inputs/model.pt")
        ):
            return pickle.dumps(Payload(flag))
        if kind == "shape expression" and name.endswith("models/model.json"):
            return data.replace(b"Symbol(", f"open('{flag}', 'w') and Symbol(".encode())
        return data

    rewrite_zip(src, dst, edit)


def test_tampered_pt2_is_refused_without_side_effect(exported, trained, mednist, tmp_path):
    out, _ = exported
    flags = []
    for i, kind in enumerate(["pickled weight", "sample inputs", "shape expression"]):
        bad, flag = tmp_path / f"{i}" / "model.pt2", tmp_path / f"payload-{i}-ran"
        bad.parent.mkdir()
        tampered_pt2(out / "model.pt2", bad, kind, flag)
        with bundle_error(f"refused to load {bad}") as found:
            infer(trained, tmp_path / "out", mednist, model_file=bad)
        assert "from a source you trust" in found[0].fix
        assert not flag.exists() and not (tmp_path / "out").exists()  # refused before any file was written
        flags.append((bad, flag))
    # the threat is real: torch's own loader runs each payload
    load = "import sys, torch\nfor p in sys.argv[1:]:\n    try:\n        torch.export.load(p)\n    except Exception:\n        pass"
    subprocess.run([sys.executable, "-c", load, *(str(bad) for bad, _ in flags)], capture_output=True)
    assert all(flag.exists() for _, flag in flags)


def test_tampered_torchscript_and_checkpoint_are_refused(exported, trained, mednist, tmp_path):
    import pickle

    out, _ = exported
    flag = tmp_path / "payload-ran"
    bad_ts = tmp_path / "model.ts"
    rewrite_zip(out / "model.ts", bad_ts, lambda n, d: pickle.dumps(Payload(flag)) if n.endswith("data.pkl") else d)
    with bundle_error(f"cannot load exported model {bad_ts}"):
        infer(trained, tmp_path / "out", mednist, model_file=bad_ts)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "model.pt").write_bytes(pickle.dumps(Payload(flag)))
    with bundle_error("cannot be read"):
        infer(tmp_path, tmp_path / "out", mednist)  # ckpt_dir tmp_path/models
    assert not flag.exists() and not (tmp_path / "out").exists()
