"""Evaluation workflow: metrics agree with the per-image predictions; external folders; bad checkpoints."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import BUNDLE, CLASSES, EVALUATE, bundle_error, evaluate, run_bundle, write_mednist


def read_csv(path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def evaluated(trained, mednist, tmp_path_factory):
    out, elsewhere = tmp_path_factory.mktemp("eval"), tmp_path_factory.mktemp("elsewhere")
    # the test split saved by training, results to a fresh folder; from the command line, as a user runs it, in a
    # folder without `scripts` (so with --bundle_root)
    proc = run_bundle("run", "evaluating", "--config_file", EVALUATE, dataset_dir=mednist, output_dir=out,
                      split_file=trained / "out" / "split.json", ckpt_dir=trained / "models", cwd=elsewhere,
                      bundle_root=BUNDLE)  # fmt: skip
    return out, proc, trained


def test_metrics_agree_with_predictions(evaluated):
    out, proc, folder = evaluated
    metrics = json.loads((out / "metrics.json").read_text())
    rows = read_csv(out / "predictions.csv")
    split = json.loads((folder / "out" / "split.json").read_text())
    assert len(rows) == metrics["num_images"] == len(split["test"]) == 12
    logs = proc.stdout + proc.stderr
    assert "evaluation of 12 images" in logs and "validation" not in logs.lower()  # the test split, named so
    assert {os.path.relpath(r["path"], os.path.dirname(os.path.dirname(r["path"]))) for r in rows} == {
        d["image"] for d in split["test"]
    }
    y = np.array([CLASSES.index(r["true_label"]) for r in rows])
    probs = np.array([[float(r[c]) for c in CLASSES] for r in rows])
    pred = probs.argmax(1)
    assert [CLASSES[p] for p in pred] == [r["label"] for r in rows]
    assert metrics["accuracy"] == pytest.approx((pred == y).mean())
    for i, c in enumerate(CLASSES):
        tp, fp, fn = ((pred == i) & (y == i)).sum(), ((pred == i) & (y != i)).sum(), ((pred != i) & (y == i)).sum()
        m = metrics["per_class"][c]
        assert m["precision"] == pytest.approx(tp / (tp + fp) if tp + fp else 0.0)
        assert m["recall"] == pytest.approx(tp / (tp + fn) if tp + fn else 0.0)
        assert m["support"] == (y == i).sum()
        pos, neg = probs[y == i, i], probs[y != i, i]  # ROC AUC as the probability a positive outranks a negative
        auc = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg))
        assert m["roc_auc"] == pytest.approx(auc)
    assert metrics["macro_avg"]["f1"] == pytest.approx(np.mean([metrics["per_class"][c]["f1"] for c in CLASSES]))
    with open(out / "confusion_matrix.csv") as f:
        table = list(csv.reader(f))
    assert table[0] == ["true/predicted", *CLASSES] and [r[0] for r in table[1:]] == list(CLASSES)
    cm = [[int(v) for v in r[1:]] for r in table[1:]]
    assert np.array_equal(np.array(cm), np.array(metrics["confusion_matrix"]))
    assert np.trace(np.array(cm)) == (pred == y).sum()
    assert "macro avg" in proc.stdout and "weighted avg" in proc.stdout
    with Image.open(out / "confusion_matrix.png") as im:
        assert len(set(im.convert("L").getdata())) > 10


def test_external_folder(trained, tmp_path):
    """A folder of other images, some in RGB, RGBA and 16-bit PNG (read as one gray channel, as inference does)."""
    external = os.path.join(write_mednist(str(tmp_path / "ext"), per_class=3, seed=7), "MedNIST")
    for c in CLASSES:
        gray = Image.open(os.path.join(external, c, "000000.jpeg"))
        gray.convert("RGB").save(os.path.join(external, c, "rgb.png"))
        gray.convert("RGBA").save(os.path.join(external, c, "rgba.png"))
        Image.fromarray(np.asarray(gray).astype(np.uint16) * 257).save(os.path.join(external, c, "gray16.png"))
    evaluate(trained, tmp_path / "out", eval_dir=external, dataset_dir=tmp_path / "none")
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["num_images"] == 36
    assert all(metrics["per_class"][c]["support"] == 6 for c in CLASSES)
    with open(tmp_path / "out" / "predictions.csv") as f:
        rows = {os.path.relpath(r["path"], external): r for r in csv.DictReader(f)}
    for c in CLASSES:  # the same pixels whatever the file's colour type
        for copy in ("rgb.png", "rgba.png", "gray16.png"):
            got, expected = rows[f"{c}/{copy}"], rows[f"{c}/000000.jpeg"]
            assert [float(got[k]) for k in CLASSES] == pytest.approx([float(expected[k]) for k in CLASSES], abs=1e-4)


@pytest.mark.parametrize("damage", ["missing", "corrupt", "other_network"])
def test_bad_checkpoint_is_named(damage, trained, mednist, tmp_path):
    ckpt = tmp_path / "model.pt"
    if damage == "corrupt":
        ckpt.write_bytes((trained / "models" / "model.pt").read_bytes()[:1000])
    elif damage == "other_network":
        torch.save(torch.nn.Linear(4, 2).state_dict(), ckpt)
    expected = {
        "missing": f"model file {ckpt} does not exist",
        "corrupt": f"checkpoint {ckpt} cannot be read",
        "other_network": f"checkpoint {ckpt} does not hold the weights of this bundle's network",
    }
    with bundle_error(expected[damage]) as found:
        evaluate(trained, tmp_path / "out", dataset_dir=mednist, ckpt_path=ckpt)
    assert "train first" in found[0].fix and not os.path.exists(tmp_path / "out")


def test_eval_dir_folders_that_are_not_classes_are_named(trained, tmp_path):
    external = os.path.join(write_mednist(str(tmp_path / "ext"), per_class=2), "MedNIST")
    os.rename(os.path.join(external, "Hand"), os.path.join(external, "hand"))
    os.makedirs(os.path.join(external, "Knee"))
    with bundle_error("has folder(s) that are not the model's classes") as found:
        evaluate(trained, tmp_path / "out", eval_dir=external, dataset_dir=tmp_path / "none")
    assert f"{os.path.join(external, 'hand')} (did you mean Hand?)" in str(found[0])
    assert os.path.join(external, "Knee") in str(found[0]) and "case matters" in found[0].fix
    assert not os.path.exists(tmp_path / "out")
