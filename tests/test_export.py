"""Export: TorchScript via monai.bundle's ckpt_export, torch.export and ONNX; each matches the checkpoint."""

from __future__ import annotations

import csv
import os
import zipfile

import pytest

from conftest import CLASSES, bundle_error, infer


def probabilities(path) -> dict:
    with open(path) as f:
        return {r["path"]: [float(r[c]) for c in CLASSES] for r in csv.DictReader(f) if not r["error"]}


@pytest.fixture(scope="module")
def reference(trained, mednist, tmp_path_factory):
    """Inference with the checkpoint itself on the synthetic images: its folder, and the images' folder."""
    out = tmp_path_factory.mktemp("reference")
    images = os.path.join(mednist, "MedNIST")
    infer(trained, out, images)
    return out, images


@pytest.mark.parametrize("suffix", ["ts", "pt2", "onnx"])
def test_exported_model_matches_checkpoint(exported, reference, trained, suffix, tmp_path):
    (folder, images), out = reference, exported
    assert os.path.getsize(out / f"model.{suffix}") > 10_000_000
    # calibrated as the checkpoint: the .pt2 and .onnx carry its calibration, the .ts finds it beside it
    infer(trained, tmp_path, images, model_file=out / f"model.{suffix}", ckpt_dir=out / "no-checkpoint-needed")
    reference, got = probabilities(folder / "predictions.csv"), probabilities(tmp_path / "predictions.csv")
    assert len(got) == len(reference) == 120
    for path, probs in reference.items():
        assert got[path] == pytest.approx(probs, abs=1e-5)
    with open(tmp_path / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["ood_score_kind"] for r in rows} == {"energy"} and "uncalibrated" not in {r["flag"] for r in rows}


def test_export_picture_says_it_has_no_heat_map(exported, trained, mednist, tmp_path):
    from test_inference import heat_map_panel

    image = os.path.join(mednist, "MedNIST", "Hand", "000000.jpeg")
    infer(trained, tmp_path, image, model_file=exported / "model.pt2")
    (picture,) = (tmp_path / "visualizations").iterdir()
    panel = heat_map_panel(picture).reshape(-1, 3)
    assert (panel.max(1) - panel.min(1) > 100).mean() < 0.01  # no heat map's colours
    assert (panel.max(1) < 100).sum() > 200  # but the dark letters of the line that says why


def test_torchscript_embeds_configs(exported):
    names = zipfile.ZipFile(exported / "model.ts").namelist()
    assert any(n.endswith("extra/metadata.json") for n in names)
    assert any(n.endswith("extra/inference.json") for n in names)


def test_bad_model_file_is_named(trained, tmp_path, mednist):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"garbage")
    with bundle_error(f"refused to load {bad}: it is not an ONNX model"):
        infer(trained, tmp_path / "out", mednist, model_file=bad)
    assert not (tmp_path / "out").exists()


def test_export_that_gives_other_logits_is_not_written(trained, tmp_path, monkeypatch):
    """The parity check: an export whose weights differ from its checkpoint's (here, one changed before writing)
    is refused and leaves no file but the run lock."""
    import torch

    import scripts.export
    from scripts.export import export

    write = scripts.export.write_pt2

    def altered(network, path, image_size, calibration=None):
        with torch.no_grad():
            network.class_layers.out.bias += 1.0
        write(network, path, image_size, calibration)

    monkeypatch.setattr(scripts.export, "write_pt2", altered)
    with bundle_error("gives other logits than its checkpoint"):
        export("pt2", str(trained / "models" / "model.pt"), str(tmp_path / "model.pt2"))
    assert os.listdir(tmp_path) == [".mednist.lock"]  # the genuine export passes the same check: ``exported``


def test_export_to_a_name_of_another_format_is_refused_before_any_work(trained, tmp_path):
    from scripts.export import export

    for kind, out in (
        ("pt2", tmp_path / "model.onnx"),
        ("onnx", tmp_path / "new" / "model.pt2"),
        ("ts", tmp_path / "m.pt"),
    ):
        with bundle_error(f"--out {out} does not end in"):
            export(kind, str(trained / "models" / "model.pt"), str(out))
    with bundle_error("'tflite' is not an export kind"):
        export("tflite", str(trained / "models" / "model.pt"))
    assert os.listdir(tmp_path) == []


def test_the_fresh_export_is_kept_between_runs_and_made_again_when_unreadable(tmp_path, monkeypatch):
    """Loading an export compares it with the bundle's fresh export of the network: kept in the cache folder after
    the first (so a second process skips torch.export), and made again, rewritten, if the kept file is damaged."""
    import torch

    from scripts import programs

    network = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.Linear(144, 2))
    monkeypatch.setenv(programs.CACHE_ENV, str(tmp_path / "cache"))
    made, real = [], programs.make_fresh
    monkeypatch.setattr(programs, "make_fresh", lambda *args: made.append(1) or real(*args))
    for _ in range(2):  # two processes: the in-process memo empty each time
        monkeypatch.setattr(programs, "FRESH", {})
        entries = programs.fresh("pt2", network, (8, 8))
    (kept,) = (tmp_path / "cache").iterdir()
    assert made == [1] and kept.suffix == ".pt2" and zipfile.is_zipfile(kept)  # made once, then read back
    assert entries == programs.zip_entries(kept.read_bytes(), "kept")
    kept.write_bytes(b"PK\x03\x04 damaged")
    monkeypatch.setattr(programs, "FRESH", {})
    assert programs.fresh("pt2", network, (8, 8)).keys() == entries.keys()
    assert made == [1, 1] and zipfile.is_zipfile(kept)  # made again and kept
    monkeypatch.setenv(programs.CACHE_ENV, "")  # none kept
    monkeypatch.setattr(programs, "FRESH", {})
    programs.fresh("pt2", network, (8, 8))
    assert made == [1, 1, 1] and len(list((tmp_path / "cache").iterdir())) == 1
