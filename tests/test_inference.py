"""Inference workflow: every kind of input file, per-file errors, pictures, and agreement with evaluation."""

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

from conftest import CLASSES, bundle_error, evaluate, infer, killed_at_rename, parser
from scripts.inputs import find_inputs
from scripts.predictions import read_predictions

CLASS_NAMES = ["AbdomenCT", "BreastMRI", "CXR", "ChestCT", "Hand", "HeadCT"]
COLUMNS = ["path", "true_label", "label", "confidence", *CLASS_NAMES, "ood_score", "ood_score_kind", "flag", "error"]
COLUMNS += ["sop_instance_uid"]


def read_rows(path) -> list[dict]:
    with open(path) as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == COLUMNS
        return list(reader)


def test_mixed_folder_one_row_per_file(trained, mixed_folder, tmp_path, capsys):
    infer(trained, tmp_path, mixed_folder["dir"])
    logged = capsys.readouterr().out
    rows = {os.path.basename(r["path"]): r for r in read_rows(tmp_path / "predictions.csv")}
    assert set(rows) == set(mixed_folder["good"]) | set(mixed_folder["bad"])
    for name, error in mixed_folder["bad"].items():
        assert error in rows[name]["error"], (name, rows[name]["error"])
        assert rows[name]["label"] == "" and name in logged  # logged too
    assert (rows["dot.png"]["flag"], rows["line.png"]["flag"]) == ("constant image", "small image")
    for name in mixed_folder["good"]:
        r = rows[name]
        probs = [float(r[c]) for c in CLASS_NAMES]
        assert r["error"] == "" and sum(probs) == pytest.approx(1, abs=1e-4) and r["true_label"] == ""
        assert r["label"] == CLASS_NAMES[int(np.argmax(probs))] and float(r["confidence"]) == max(probs)
    # the same pixels give the same prediction whatever the container
    for name in ("rgb.png", "rgba.png", "gray16.png", "slice.nii.gz", "slice1.nii"):
        assert rows[name]["label"] == rows["rgb.png"]["label"]
        assert float(rows[name]["confidence"]) == pytest.approx(float(rows["rgb.png"]["confidence"]), abs=1e-4)
    assert not os.path.exists(tmp_path / "visualizations")  # pictures only on request for many inputs


def test_nothing_predictable_is_an_error(trained, mixed_folder, tmp_path):
    bad = [str(mixed_folder["dir"] / n) for n in mixed_folder["bad"]]
    with bundle_error("no image could be predicted") as found:
        infer(trained, tmp_path / "out", bad)
    assert f"(and {len(bad) - 1} more; see the error column)" in str(found[0])
    rows = read_rows(tmp_path / "out" / "predictions.csv")
    assert len(rows) == len(bad) and all(r["error"] for r in rows)
    assert mixed_folder["bad"][os.path.basename(bad[-1])] in rows[-1]["error"]
    with bundle_error(f"no image could be predicted: {bad[-1]}: {rows[-1]['error']}"):  # one input: its reason
        infer(trained, tmp_path / "one", bad[-1:])


def test_a_missing_input_is_refused_before_the_model_is_read(mixed_folder, tmp_path):
    """A path of the command that does not exist stops the run before the model (here: none) is looked at."""
    missing = str(tmp_path / "missing.png")
    with bundle_error(f"--input {missing} does not exist."):
        infer(tmp_path / "no_model_here", tmp_path / "out", [str(mixed_folder["dir"] / "rgb.png"), missing])
    assert not (tmp_path / "out").exists()


def heat_map_panel(picture) -> np.ndarray:
    """The pixels of a picture's third panel (where the Grad-CAM++ map goes), as RGB."""
    with Image.open(picture) as im:
        rgb = np.asarray(im.convert("RGB")).astype(int)
    height, width = rgb.shape[:2]
    return rgb[int(0.15 * height) : int(0.85 * height), int(0.64 * width) : int(0.86 * width)]


def test_single_image_gets_picture_with_gradcam(trained, mixed_folder, tmp_path):
    infer(trained, tmp_path, mixed_folder["dir"] / "hand.jpeg")
    pictures = os.listdir(tmp_path / "visualizations")
    assert len(pictures) == 1
    panel = heat_map_panel(tmp_path / "visualizations" / pictures[0]).reshape(-1, 3)
    saturated = panel.max(1) - panel.min(1) > 100  # the jet colours of the heat map over the gray image
    assert saturated.mean() > 0.3 and len(np.unique(panel[saturated], axis=0)) > 100


def test_glob_and_visualize_flag(trained, mixed_folder, tmp_path):
    infer(trained, tmp_path, f"{mixed_folder['dir']}/*.jp*g", visualize="true")
    rows = read_rows(tmp_path / "predictions.csv")
    assert sorted(os.path.basename(r["path"]) for r in rows) == ["camera.jpg", "cxr.jpg", "hand.jpeg", "truncated.jpeg"]
    assert len(os.listdir(tmp_path / "visualizations")) == 3


def test_inference_matches_evaluation(trained, mednist, tmp_path):
    """Inference preprocessing equals training's: the same file gets the same probabilities as in evaluation."""
    evaluate(trained, tmp_path / "eval", dataset_dir=mednist)
    with open(tmp_path / "eval" / "predictions.csv") as f:
        evaluated = {r["path"]: r for r in csv.DictReader(f)}
    infer(trained, tmp_path / "inf", sorted(evaluated))
    for r in read_rows(tmp_path / "inf" / "predictions.csv"):
        for c in CLASS_NAMES + ["ood_score"]:
            assert float(r[c]) == pytest.approx(float(evaluated[r["path"]][c]), abs=1e-4), c
        assert (r["flag"], r["ood_score_kind"]) == (evaluated[r["path"]]["flag"], "mahalanobis")


# Runs inference with the prediction writer's per-batch hook patched to SIGKILL the process after n batches.
KILL_AFTER_BATCHES = """
import os, runpy, signal, sys
sys.path.insert(0, os.getcwd())
from scripts.predictions import PredictionWriter
real, done, batches = PredictionWriter.collect, [], int(sys.argv[1])
def collect(self, engine):
    real(self, engine)
    done.append(1)
    if len(done) == batches:
        os.kill(os.getpid(), signal.SIGKILL)
PredictionWriter.collect = collect
sys.argv = ["monai.bundle", *sys.argv[2:]]
runpy.run_module("monai.bundle", run_name="__main__")
"""


def test_killed_inference_keeps_its_rows_and_resumes(trained, mednist, tmp_path):
    import subprocess
    import sys

    from conftest import BUNDLE, INFERENCE

    images = os.path.join(mednist, "MedNIST")  # 120 images, 8 a batch
    args = ["run", "inference", "--config_file", INFERENCE, "--input", images, "--output_dir", str(tmp_path)]
    args += ["--ckpt_dir", str(trained / "models"), "--batch_size", "8"]
    proc = subprocess.run([sys.executable, "-c", KILL_AFTER_BATCHES, "3", *args], cwd=BUNDLE, capture_output=True)
    assert proc.returncode == -9
    with open(tmp_path / "predictions.csv", "a") as f:
        f.write(f"{images}/Hand/000019.jpeg,Ha")  # a row cut short, as a kill in the middle of a write leaves
    kept = read_rows(tmp_path / "predictions.csv")
    assert len(kept) == 25 and all(r["label"] for r in kept[:24])  # three whole batches were written

    # a resumed run rewrites the file without the cut row before appending: killed right before and right after
    # that rewrite's rename, it has lost nothing
    for when in ("before", "after"):
        assert killed_at_rename([*args, "--resume", "true"], when, "predictions.csv").returncode == -9
        assert read_predictions(str(tmp_path / "predictions.csv"), CLASSES) == kept[:24], when
    infer(trained, tmp_path, images, resume="true", batch_size=8)
    rows = read_rows(tmp_path / "predictions.csv")
    assert [r["path"] for r in rows[:24]] == [r["path"] for r in kept[:24]]  # kept, not predicted again
    assert sorted(r["path"] for r in rows) == sorted(d["path"] for d in find_inputs(images))  # each once
    assert all(r["label"] and not r["error"] for r in rows)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]  # the killed rewrite's file is gone


@pytest.mark.parametrize("output", ["a file", "under a file"])
def test_unusable_output_dir_is_refused_before_predicting(trained, mednist, tmp_path, output):
    (tmp_path / "file").write_text("not a folder")
    out = tmp_path / "file" if output == "a file" else tmp_path / "file" / "sub"
    message = "is a file, not a folder" if output == "a file" else "cannot write to"
    with bundle_error(message) as found:
        infer(trained, out, mednist)
    assert found[0].fix and (tmp_path / "file").read_text() == "not a folder"


def test_gradcam_heat_lies_on_the_anatomy(tmp_path):
    """Real-looking images (each class's pattern inside a body-like ellipse placed at random on a dark
    background, as MedNIST's anatomy sits on its background): after a short training, the Grad-CAM maps that
    inference draws put more of their mass on the body than its share of the image, for every class."""
    import torch

    from conftest import CLASSES, FAST, train, write_mednist
    from scripts.pictures import gradcam_maps

    data = write_mednist(str(tmp_path / "data"), body=True)
    train(data, tmp_path, epochs=6, **FAST)
    inference = parser(("inference",), input=data, ckpt_dir=str(tmp_path / "models"))
    model = inference.get_parsed_content("model").load()
    network, layer = model.network, model.description.gradcam_layer
    preprocessing = inference.get_parsed_content("preprocessing")
    for name in CLASSES:
        files = sorted(os.listdir(os.path.join(data, "MedNIST", name)))[:8]
        paths = [os.path.join(data, "MedNIST", name, f) for f in files]
        images = torch.stack([torch.as_tensor(preprocessing({"image": p})["image"]) for p in paths])
        heat_share, area = [], []
        for image, heat in zip(images[:, 0].numpy(), gradcam_maps(network, images, layer)):
            body = image > 0.15  # the background is 10/255 of the range before scaling, the body 70/255 or more
            heat_share.append((heat * body).sum() / heat.sum())
            area.append(body.mean())
        # seen on 2 cores: 0.45 (Hand, HeadCT) to 0.55 (AbdomenCT) of the mass on bodies covering 0.17 to 0.18
        assert np.mean(heat_share) > 1.5 * np.mean(area), (name, np.mean(heat_share), np.mean(area))


def test_inference_dataset_drops_metadata_only_while_it_runs(mixed_folder):
    """Inference's dataset yields plain tensors (no MetaTensor built at each transform) and leaves MONAI's
    metadata tracking on for whatever runs next in the process (training's transforms need it)."""
    import torch
    from monai.data import MetaTensor, get_track_meta
    from monai.transforms import LoadImage

    names = ("hand.jpeg", "large.png")  # as it is, and resized
    inference = parser(("inference",), input=[str(mixed_folder["dir"] / name) for name in names])
    for item in inference.get_parsed_content("dataset"):
        assert type(item["image"]) is torch.Tensor and item["error"] == ""
        assert item["image"].shape == (1, 64, 64) and 0.9 < float(item["image"].max()) <= 1.0  # scaled
    assert get_track_meta()
    assert isinstance(LoadImage(image_only=True)(str(mixed_folder["dir"] / "hand.jpeg")), MetaTensor)


def test_preprocessing_of_an_extreme_shape_is_by_area(tmp_path):
    """A 1 x 2,000,000 PNG (2 MB, under the pixel limit) is resized by area averaging, in training's and
    inference's preprocessing alike: a Gaussian anti-aliasing filter, whose width grows with the shrink factor,
    took 150 s on it (a denial of service; tools.benchmark times preprocessing)."""
    from monai.transforms import Resized

    path = str(tmp_path / "wide.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (1, 2_000_000), dtype=np.uint8)).save(path)
    for names, key in ((("train",), "train#preprocessing"), (("inference",), "preprocessing")):
        transforms = parser(names, input=path).get_parsed_content(key).transforms
        (resize,) = [t for t in transforms if isinstance(t, Resized)]
        assert resize.resizer.mode == "area" and not resize.resizer.anti_aliasing
    item = parser(("inference",), input=path).get_parsed_content("dataset")[0]
    assert item["error"] == "" and item["image"].shape == (1, 64, 64) and item["min_side"] == 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the stand-in Ghostscript is a shell script")
def test_no_image_file_runs_a_program(tmp_path):
    """Pillow renders an EPS file by running Ghostscript (``gs`` on the PATH), whatever the file is named. A fake
    ``gs`` that leaves a marker stands in for it, in a fresh process (Pillow remembers where gs is): inference's
    and training's preprocessing refuse EPS files named .png, .jpeg and .jpg without running it; the control,
    MONAI's plain ``LoadImage``, runs it."""
    from conftest import BUNDLE

    marker, gs = tmp_path / "ran", tmp_path / "bin" / "gs"
    gs.parent.mkdir()
    gs.write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
    gs.chmod(0o755)
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\nnewpath 0 0 moveto 64 64 lineto stroke\nshowpage\n"
    files = [str(tmp_path / name) for name in ("a.png", "b.jpeg", "c.jpg")]
    for f in files:
        open(f, "wb").write(eps)
    code = f"""
import json, os, sys
sys.path[:0] = [{BUNDLE!r}, {os.path.join(BUNDLE, "tests")!r}]
from monai.transforms import LoadImage
from conftest import parser
from scripts.inputs import reason
errors = []
for f in {files!r}:
    errors.append(parser(("inference",), input=f).get_parsed_content("dataset")[0]["error"])
preprocessing = parser(("train",)).get_parsed_content("train#preprocessing")
for f in {files!r}:
    try:
        preprocessing({{"image": f}})
    except Exception as e:
        errors.append(reason(e))
print(json.dumps({{"errors": errors, "ran": os.path.exists({str(marker)!r})}}))
try:
    LoadImage(image_only=True)({files[0]!r})
except Exception:
    pass
print(json.dumps(os.path.exists({str(marker)!r})))
"""
    env = {**os.environ, "PATH": f"{gs.parent}{os.pathsep}{os.environ['PATH']}"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    guarded, control = map(json.loads, out.stdout.splitlines()[-2:])
    inference, training = guarded["errors"][:3], guarded["errors"][3:]
    assert inference == ["cannot read image: its content is not PNG, JPEG, NIfTI or DICOM"] * 3
    assert training == ["cannot read image: its content is not PNG, JPEG, NIfTI or DICOM"] * 3
    assert guarded["ran"] is False
    assert control is True  # plain MONAI/Pillow ran the stand-in Ghostscript


def test_a_list_or_a_model_description_inference_cannot_hold_is_refused_before_any_work(trained, tmp_path):
    """A --input_list of 1.2 GB (sparse: refused by its size, never read) and a model whose description declares
    4096 x 4096 images beside its genuine weights (a batch of them would take hundreds of GiB): refused in one line
    before the model is loaded or a file written; at 512 x 512, inference runs batches of what fits its 2 GiB."""
    from scripts.model_file import ModelDescription

    with open(tmp_path / "list.txt", "wb") as f:
        f.truncate(1_200_000_000)
    with bundle_error("--input_list") as found:
        infer(trained, tmp_path / "out", None, input_list=tmp_path / "list.txt")
    assert "is over 67,108,864 bytes" in found[0].problem and not (tmp_path / "out").exists()
    models = tmp_path / "models"
    shutil.copytree(trained / "models", models, ignore=shutil.ignore_patterns("checkpoint*", ".*"))
    described = json.loads((models / "network_data_format.json").read_text())
    for size, limit in ((4096, None), (512, 2)):
        described["inputs"]["image"]["spatial_shape"] = [size, size]
        (models / "network_data_format.json").write_text(json.dumps(described))
        if limit is None:
            with bundle_error("takes 48.1 GiB for one, over the 2 GiB inference holds"):
                infer(trained, tmp_path / "big", str(tmp_path / "list.txt"), ckpt_dir=models)
            assert not (tmp_path / "big").exists()
        else:
            assert ModelDescription.beside(str(models / "model.pt")).batch_limit() == limit
