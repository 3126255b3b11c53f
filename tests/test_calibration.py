"""Calibrated confidence and the out-of-distribution flag: the fit, the figures, and their use in evaluation and
inference."""

from __future__ import annotations

import csv
import hashlib
import json
import os

import numpy as np
import pytest
import torch

from conftest import bundle_error
from scripts.calibration import Calibration, energy, expected_calibration_error, fit_temperature


def sampled_logits(temperature: float, n: int = 4000, seed: int = 0):
    """Labels drawn from softmax(z / temperature): ``z`` is over-confident by exactly that temperature."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 6, generator=g, dtype=torch.float64) * 4
    labels = torch.multinomial(torch.softmax(z / temperature, 1), 1, generator=g).view(-1)
    return z, labels


def test_fitted_temperature_recovers_the_true_one_and_lowers_ece():
    z, labels = sampled_logits(2.5)
    t = fit_temperature(z, labels)
    assert t == pytest.approx(2.5, rel=0.1)
    before = expected_calibration_error(torch.softmax(z, 1), labels)
    after = expected_calibration_error(torch.softmax(z / t, 1), labels)
    assert after < 0.03 < before


def test_no_temperature_is_fitted_when_validation_has_no_error():
    """All correct: the likelihood grows without bound as T -> 0 (a fit would stop at some arbitrary T < 1 and
    make every later mistake certain); T stays 1. One mistake makes the optimum finite again."""
    z, _ = sampled_logits(1.0)
    labels = z.argmax(1)
    assert fit_temperature(z, labels) == 1.0
    labels[0] = (labels[0] + 1) % 6
    assert 0 < fit_temperature(z, labels) < 1


def test_a_model_wrong_everywhere_gets_a_temperature_the_loader_accepts():
    """Every image confidently wrong (a model trained a step or two, as the Model Zoo's CI trains it): the
    likelihood improves without bound as T grows; the fit stops at the bound, which loading accepts."""
    z, _ = sampled_logits(1.0)
    labels = (z.argmax(1) + 1) % 6
    t = fit_temperature(z * 50, labels)
    assert t == 100.0
    assert Calibration.from_json(Calibration(t, None, "0" * 64).to_json(), "test").temperature == t


def test_ece_of_a_calibrated_and_an_overconfident_model():
    confident = torch.tensor([[0.9, 0.1]] * 10, dtype=torch.float64)
    labels = torch.tensor([0] * 9 + [1])  # right 9 times in 10 at confidence 0.9: calibrated
    assert expected_calibration_error(confident, labels) == pytest.approx(0.0, abs=1e-12)
    assert expected_calibration_error(confident, torch.tensor([0] * 5 + [1] * 5)) == pytest.approx(0.4)


def gaussian_classes(n: int, dims: int, seed: int, shift: float = 0.0):
    """``n`` feature vectors of six Gaussian classes in ``dims`` dimensions (correlated, as a network's pooled
    features are), their labels, and logits that favour each true class."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(dims, dims, generator=torch.Generator().manual_seed(99), dtype=torch.float64) / dims**0.5
    centres = torch.randn(6, dims, generator=torch.Generator().manual_seed(98), dtype=torch.float64) * 3
    labels = torch.arange(n) % 6
    features = centres[labels] + torch.randn(n, dims, generator=g, dtype=torch.float64) @ mixing + shift
    logits = torch.nn.functional.one_hot(labels, 6).double() * 4 + torch.randn(n, 6, generator=g, dtype=torch.float64)
    return {"features": features, "labels": labels, "logits": logits}


def test_thresholds_pass_97_percent_of_validation_and_round_trip_without_pickle(tmp_path):
    training, validation = gaussian_classes(3000, 16, seed=1), gaussian_classes(3000, 16, seed=2)
    calibration = Calibration.fit(validation, training, weights="ab" * 32)
    z = validation["logits"]
    passed = (energy(z, calibration.temperature) <= calibration.energy_threshold).double().mean()
    assert passed == pytest.approx(0.97, abs=0.002)
    scores, threshold, kind = calibration.ood_score(z, validation["features"])
    assert (scores <= threshold).double().mean() == pytest.approx(0.97, abs=0.002) and kind == "mahalanobis"
    far = calibration.ood_score(z[:10], validation["features"][:10] + 100)[0]
    assert (far > threshold).all()  # features far from every class mean
    assert calibration.ood_score(z, None)[2] == "energy"  # an export: no features
    assert energy(torch.zeros(1, 6)) > energy(torch.tensor([[20.0, 0, 0, 0, 0, 0]]))  # flat logits: less familiar
    calibration.save(str(tmp_path / "calibration.json"))
    saved = json.loads((tmp_path / "calibration.json").read_text())  # plain JSON, and arrays: nothing to unpickle
    assert (saved["statistics_images"], saved["threshold_images"], saved["weights_sha256"]) == (3000, 3000, "ab" * 32)
    loaded = Calibration.load(str(tmp_path / "calibration.json"), 6, 16)
    assert (loaded.temperature, loaded.energy_threshold) == (saved["temperature"], saved["energy_threshold"])
    assert loaded.feature_threshold == saved["feature_threshold"]
    assert torch.allclose(loaded.ood_score(z, validation["features"])[0], scores, rtol=1e-3)  # stored as float32
    (tmp_path / "bad.json").write_text('{"temperature": 1.0}')  # no weights named: not one this bundle wrote
    with bundle_error("is not a calibration this bundle wrote"):
        Calibration.load(str(tmp_path / "bad.json"), 6, 16)


def test_arrays_are_bound_to_their_json(tmp_path, monkeypatch, caplog):
    """calibration.npz is written first and calibration.json names its SHA-256: a run killed between the two (the
    fault injected at the JSON's rename) leaves new arrays that the old JSON refuses; arrays that do not fit are
    refused too; without arrays, the score is the energy."""
    training, validation = gaussian_classes(600, 16, seed=1), gaussian_classes(600, 16, seed=2)
    path = str(tmp_path / "calibration.json")
    Calibration.fit(validation, training, weights="ab" * 32).save(path)
    assert Calibration.load(path, 6, 16).ood_score(validation["logits"], validation["features"])[2] == "mahalanobis"
    replace = os.replace

    def killed_at_json(src, dst):
        if os.path.basename(dst) == "calibration.json":
            raise KeyboardInterrupt  # the process dies here
        replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_at_json)
    with pytest.raises(KeyboardInterrupt):
        Calibration.fit(validation, gaussian_classes(600, 16, seed=3), weights="ab" * 32).save(path)
    monkeypatch.undo()
    with bundle_error(f"{tmp_path / 'calibration.npz'} cannot be used with {path}: its SHA-256 is not the one"):
        Calibration.load(path, 6, 16)

    saved = json.loads(open(path).read())
    np.savez(tmp_path / "calibration.npz", means=np.zeros((6, 16), np.float32), precision=np.eye(15, dtype=np.float32))
    saved["arrays_sha256"] = hashlib.sha256((tmp_path / "calibration.npz").read_bytes()).hexdigest()
    (tmp_path / "calibration.json").write_text(json.dumps(saved))
    with bundle_error("its precision is (15, 15) float32, not (16, 16) float32"):
        Calibration.load(path, 6, 16)
    del saved["arrays_sha256"]  # a calibration written before the binding: its arrays are still used
    (tmp_path / "calibration.json").write_text(json.dumps(saved))
    np.savez(tmp_path / "calibration.npz", means=np.zeros((6, 16), np.float32), precision=np.eye(16, dtype=np.float32))
    assert Calibration.load(path, 6, 16).ood_score(validation["logits"], validation["features"])[2] == "mahalanobis"
    assert "names no SHA-256 of" in caplog.text
    os.remove(tmp_path / "calibration.npz")
    assert Calibration.load(path, 6, 16).ood_score(validation["logits"], validation["features"])[2] == "energy"
    assert "ood_score is the energy" in caplog.text


def test_out_of_distribution_statistics_generalise_with_fewer_images_than_dimensions():
    """300 training and 300 validation images in 1,024 dimensions, as the small-data setting: the flag, fitted
    from the training images with a Ledoit-Wolf covariance and thresholded on the validation images, flags about
    3% of unseen images of the same classes, and those shifted away. The control, the statistics and threshold of
    the same 300 validation images (a plain covariance), flags almost every unseen image."""
    from scripts.calibration import mahalanobis

    training, validation = gaussian_classes(300, 1024, seed=1), gaussian_classes(300, 1024, seed=2)
    unseen, shifted = gaussian_classes(3000, 1024, seed=3), gaussian_classes(600, 1024, seed=4, shift=0.5)
    calibration = Calibration.fit(validation, training, weights="")
    scores, threshold, _ = calibration.ood_score(unseen["logits"], unseen["features"])
    flagged = float((scores > threshold).double().mean())
    assert 0.01 < flagged < 0.06, flagged
    far = calibration.ood_score(shifted["logits"], shifted["features"])[0]
    assert float((far > threshold).double().mean()) > 0.95
    x, y = validation["features"], validation["labels"]  # the control: all from the same 300 images
    means = torch.stack([x[y == c].mean(0) for c in range(6)])
    covariance = torch.cov(torch.cat([x[y == c] - means[c] for c in range(6)]).T) + 1e-3 * torch.eye(1024)
    precision = torch.linalg.inv(covariance)
    in_sample = float(torch.quantile(mahalanobis(x, means, precision), 0.97))
    assert float((mahalanobis(unseen["features"], means, precision) > in_sample).double().mean()) > 0.9


@pytest.mark.parametrize("confidence, expected", [(0.49, "low confidence"), (0.51, "")])
def test_low_confidence_rule(confidence, expected):
    """A confident in-distribution row has no flag; under ``low_confidence`` (0.5) it is flagged."""
    import numpy as np

    from scripts.predictions import flag

    probs = np.array([confidence, 1 - confidence - 0.1, 0.1, 0, 0, 0])
    assert flag(probs, score=1.0, threshold=2.0, constant=False, min_side=64, low_confidence=0.5) == expected
    assert (
        flag(probs, score=3.0, threshold=2.0, constant=False, min_side=64, low_confidence=0.5) == "out-of-distribution"
    )
    assert flag(probs, score=1.0, threshold=None, constant=False, min_side=64, low_confidence=0.5) == "uncalibrated"


def test_training_saves_calibration_and_evaluation_reports_it(trained, mednist, tmp_path):
    import csv

    from conftest import evaluate
    from scripts.calibration import weights_sha256
    from scripts.model_file import load_model

    saved = json.loads((trained / "models" / "calibration.json").read_text())
    assert saved["temperature"] > 0 and (saved["threshold_images"], saved["statistics_images"]) == (12, 96)
    assert saved["weights_sha256"] == weights_sha256(load_model(str(trained / "models" / "model.pt")))
    evaluate(trained, tmp_path, dataset_dir=mednist)
    report = json.loads((tmp_path / "metrics.json").read_text())
    metrics = report["calibration"]
    assert metrics["temperature"] == saved["temperature"]
    assert set(metrics["ece"]) == set(metrics["nll"]) == {"uncalibrated", "calibrated"}
    with open(tmp_path / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    from conftest import CLASSES  # the calibrated ECE again, from the probabilities written in predictions.csv

    probs = torch.tensor([[float(r[c]) for c in CLASSES] for r in rows])
    labels = torch.tensor([CLASSES.index(r["true_label"]) for r in rows])
    assert metrics["ece"]["calibrated"] == pytest.approx(expected_calibration_error(probs, labels), abs=1e-4)
    above = [float(r["ood_score"]) > saved["feature_threshold"] for r in rows]
    assert {r["ood_score_kind"] for r in rows} == {"mahalanobis"} and report["ood_score_kind"] == "mahalanobis"
    assert report["out_of_distribution_flagged"] == pytest.approx(sum(above) / len(rows))
    assert [r["flag"] == "out-of-distribution" for r in rows] == above


def test_inference_flags_what_not_to_trust(trained, mednist, tmp_path):
    import os

    from PIL import Image

    from conftest import infer

    folder = tmp_path / "in"
    folder.mkdir()
    Image.new("L", (64, 64), 128).save(folder / "constant.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (8, 8), dtype=np.uint8)).save(folder / "tiny.png")
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64), dtype=np.uint8)).save(folder / "noise.png")
    split = json.loads((trained / "out" / "split.json").read_text())
    seen = [d["image"] for d in split["training"]][:24]  # images the statistics were fitted on
    for i, name in enumerate(seen):
        os.link(os.path.join(mednist, "MedNIST", name), folder / f"seen_{i}.jpeg")
    infer(trained, tmp_path / "out", folder)
    with open(tmp_path / "out" / "predictions.csv") as f:
        rows = {os.path.basename(r["path"]): r for r in csv.DictReader(f)}
    assert rows["constant.png"]["flag"] == "constant image" and rows["tiny.png"]["flag"] == "small image"
    assert rows["noise.png"]["flag"] == "out-of-distribution"  # nothing like the training images
    out = sum(rows[f"seen_{i}.jpeg"]["flag"] == "out-of-distribution" for i in range(len(seen)))
    assert out <= 3, out  # the training images themselves: in distribution


def test_calibration_goes_with_the_model_and_only_with_its_weights(trained, mednist, tmp_path):
    """Found beside the --ckpt_path given (not in --ckpt_dir); refused, before any file is written, beside other
    weights; where there is none, every row says so."""
    import shutil

    import torch

    from conftest import infer

    images = os.path.join(mednist, "MedNIST", "Hand")
    elsewhere = tmp_path / "kept" / "elsewhere"
    shutil.copytree(trained / "models", elsewhere)
    infer(trained, tmp_path / "beside", images, ckpt_path=elsewhere / "model.pt", ckpt_dir=tmp_path / "empty")
    flags = {r["flag"] for r in read_csv(tmp_path / "beside" / "predictions.csv")}
    assert "uncalibrated" not in flags

    weights = torch.load(elsewhere / "model.pt", weights_only=True)
    weights["class_layers.out.bias"] += 0.01  # other weights, same file name
    torch.save(weights, elsewhere / "model.pt")
    with bundle_error("was fitted for other weights than") as found:
        infer(trained, tmp_path / "other", images, ckpt_path=elsewhere / "model.pt")
    assert "run calibrating" in found[0].fix and not (tmp_path / "other").exists()

    for name in ("calibration.json", "calibration.npz"):
        os.remove(elsewhere / name)
    infer(trained, tmp_path / "none", images, ckpt_path=elsewhere / "model.pt")
    assert {r["flag"] for r in read_csv(tmp_path / "none" / "predictions.csv")} == {"uncalibrated"}


def read_csv(path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_calibrate_an_already_trained_model(trained, mednist, tmp_path):
    """``run calibrating`` fits a trained model's calibration as training's last step does."""
    import shutil

    from conftest import run_workflow

    shutil.copytree(trained / "models", tmp_path / "models", ignore=shutil.ignore_patterns("calibration.*"))
    shutil.copytree(trained / "out", tmp_path / "out", ignore=shutil.ignore_patterns("tensorboard", ".*"))
    folders = {"output_dir": tmp_path / "out", "ckpt_dir": tmp_path / "models"}
    run_workflow(("train", "calibrate"), "calibrating", dataset_dir=mednist, **folders)
    fitted = json.loads((tmp_path / "models" / "calibration.json").read_text())
    original = json.loads((trained / "models" / "calibration.json").read_text())
    assert fitted["temperature"] == pytest.approx(original["temperature"], rel=1e-4)  # what training's last step fits
    assert fitted["feature_threshold"] == pytest.approx(original["feature_threshold"], rel=1e-3)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"feature_threshold": float("nan")}, "feature_threshold nan is not a finite number"),
        ({"energy_threshold": float("inf")}, "energy_threshold inf is not a finite number"),
        ({"temperature": 1e-320}, "temperature 1e-320 is not in [0.01, 100.0]"),
        ({"temperature": "hot"}, "temperature 'hot' is not a finite number"),
        ({"weights_sha256": 5}, "it names no weights_sha256"),
    ],
)
def test_calibration_values_that_make_no_sense_are_refused(change, message, tmp_path):
    """A NaN threshold would turn the out-of-distribution flag off, a temperature of 1e-320 give NaN confidences:
    each value is checked for sense when read, in one message."""
    training, validation = gaussian_classes(300, 16, seed=1), gaussian_classes(300, 16, seed=2)
    path = tmp_path / "calibration.json"
    Calibration.fit(validation, training, weights="ab" * 32).save(str(path))
    saved = json.loads(path.read_text())
    saved.update(change)
    path.write_text(json.dumps(saved))
    with bundle_error(message):
        Calibration.load(str(path), 6, 16)


def test_calibration_arrays_declaring_more_are_refused_from_their_headers(tmp_path):
    """A 1 MB calibration.npz declaring a 16,384-square precision matrix (deflated zeros), bound to its JSON as an
    attacker can bind it: refused before its values are inflated (np.savez stores arrays; their headers must give
    the model's shapes), in a process limited to 3 GiB of address space; ``numpy.load`` alone (the control)
    allocates it and fails within 1 GiB."""
    import io
    import subprocess
    import sys
    import zipfile

    from numpy.lib import format as npy

    from conftest import BUNDLE

    training, validation = gaussian_classes(300, 16, seed=1), gaussian_classes(300, 16, seed=2)
    path = tmp_path / "calibration.json"
    Calibration.fit(validation, training, weights="ab" * 32).save(str(path))
    side, header, means = 16384, io.BytesIO(), io.BytesIO()
    npy.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (side, side)})
    with zipfile.ZipFile(tmp_path / "calibration.npz", "w", zipfile.ZIP_DEFLATED, compresslevel=4) as zf:
        np.save(means, np.zeros((6, 1024), np.float32))
        zf.writestr("means.npy", means.getvalue(), compress_type=zipfile.ZIP_STORED)
        with zf.open("precision.npy", "w", force_zip64=True) as f:  # streamed: never the 2 GiB in memory
            f.write(header.getvalue())
            block, left = bytes(64 << 20), side * side * 4
            while left:
                f.write(block[: min(len(block), left)])
                left -= min(len(block), left)
    assert (tmp_path / "calibration.npz").stat().st_size < 2 << 20
    saved = json.loads(path.read_text())
    saved["arrays_sha256"] = hashlib.sha256((tmp_path / "calibration.npz").read_bytes()).hexdigest()
    path.write_text(json.dumps(saved))
    limited = "import resource; resource.setrlimit(resource.RLIMIT_AS, ({gib} << 30, {gib} << 30))\n"
    guarded = f"""{limited.format(gib=3)}import sys
sys.path.insert(0, {BUNDLE!r})
from scripts.calibration import Calibration
try:
    Calibration.load({str(path)!r}, 6, 1024)
except ValueError as e:
    print("refused:", e.problem)
"""
    control = f"""{limited.format(gib=1)}import numpy
try:
    numpy.load({str(tmp_path / 'calibration.npz')!r})["precision"]
except MemoryError:
    print("MemoryError")
"""
    proc = subprocess.run([sys.executable, "-c", guarded], capture_output=True, text=True, timeout=120)
    assert "its arrays are compressed (np.savez stores them)" in proc.stdout, proc.stderr
    proc = subprocess.run([sys.executable, "-c", control], capture_output=True, text=True, timeout=120)
    assert "MemoryError" in proc.stdout + proc.stderr
