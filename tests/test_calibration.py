"""Calibrated confidence and the out-of-distribution flag: the fit, the figures, and their use in evaluation and
inference."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

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


def test_ece_of_a_calibrated_and_an_overconfident_model():
    confident = torch.tensor([[0.9, 0.1]] * 10, dtype=torch.float64)
    labels = torch.tensor([0] * 9 + [1])  # right 9 times in 10 at confidence 0.9: calibrated
    assert expected_calibration_error(confident, labels) == pytest.approx(0.0, abs=1e-12)
    assert expected_calibration_error(confident, torch.tensor([0] * 5 + [1] * 5)) == pytest.approx(0.4)


def test_thresholds_pass_97_percent_of_validation_and_round_trip_without_pickle(tmp_path):
    z, labels = sampled_logits(1.0)
    features = z @ torch.randn(6, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    features += torch.randn(len(z), 16, dtype=torch.float64) * 0.1
    calibration = Calibration.fit(z, labels, features)
    passed = (energy(z, calibration.temperature) <= calibration.energy_threshold).double().mean()
    assert passed == pytest.approx(0.97, abs=0.002)
    scores, threshold = calibration.ood_score(z, features)
    assert (scores <= threshold).double().mean() == pytest.approx(0.97, abs=0.002)
    far = calibration.ood_score(z[:10], features[:10] + 100)[0]
    assert (far > threshold).all()  # features far from every class mean
    assert energy(torch.zeros(1, 6)) > energy(torch.tensor([[20.0, 0, 0, 0, 0, 0]]))  # flat logits: less familiar
    calibration.save(str(tmp_path / "calibration.json"))
    saved = json.loads((tmp_path / "calibration.json").read_text())  # plain JSON, and arrays: nothing to unpickle
    loaded = Calibration.load(str(tmp_path / "calibration.json"))
    assert (loaded.temperature, loaded.energy_threshold) == (saved["temperature"], saved["energy_threshold"])
    assert loaded.feature_threshold == saved["feature_threshold"]
    assert torch.allclose(loaded.ood_score(z, features)[0], scores, rtol=1e-3)  # stored as float32
    assert Calibration.load(str(tmp_path / "none.json")).temperature == 1.0


def test_training_saves_calibration_and_evaluation_reports_it(trained, mednist, tmp_path):
    from conftest import evaluate

    saved = json.loads((trained / "models" / "calibration.json").read_text())
    assert saved["temperature"] > 0 and saved["fitted_on_validation_images"] == 12
    evaluate(trained, tmp_path, dataset_dir=mednist)
    metrics = json.loads((tmp_path / "metrics.json").read_text())["calibration"]
    assert metrics["temperature"] == saved["temperature"]
    assert set(metrics["ece"]) == set(metrics["nll"]) == {"uncalibrated", "calibrated"}
    assert all(0 <= v <= 1 for v in metrics["ece"].values()) and all(v > 0 for v in metrics["nll"].values())


def test_inference_flags_what_not_to_trust(trained, mednist, tmp_path):
    import os

    from PIL import Image

    from conftest import infer

    folder = tmp_path / "in"
    folder.mkdir()
    Image.new("L", (64, 64), 128).save(folder / "constant.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (8, 8), dtype=np.uint8)).save(folder / "tiny.png")
    for name in ("000000.jpeg", "000001.jpeg"):
        os.link(os.path.join(mednist, "MedNIST", "Hand", name), folder / name)
    infer(trained, tmp_path / "out", folder)
    with open(tmp_path / "out" / "predictions.csv") as f:
        rows = {os.path.basename(r["path"]): r for r in csv.DictReader(f)}
    assert rows["constant.png"]["flag"] == "constant image" and rows["tiny.png"]["flag"] == "small image"
    threshold = json.loads((trained / "models" / "calibration.json").read_text())["feature_threshold"]
    for name in ("000000.jpeg", "000001.jpeg"):
        ood = float(rows[name]["ood_score"]) > threshold
        expected = ("out-of-distribution",) if ood else ("", "low confidence")
        assert rows[name]["flag"] in expected


def test_calibrate_an_already_trained_model(trained, mednist, tmp_path):
    import shutil

    from scripts.calibration import calibrate

    shutil.copytree(trained / "models", tmp_path / "models", ignore=shutil.ignore_patterns("calibration.json"))
    path = calibrate(dataset_dir=mednist, output_dir=str(trained / "out"), ckpt_dir=str(tmp_path / "models"))
    fitted = json.loads(open(path).read())
    original = json.loads((trained / "models" / "calibration.json").read_text())
    assert fitted["temperature"] == pytest.approx(original["temperature"], rel=1e-4)  # what training's last step fits
