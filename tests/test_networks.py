"""Another network by one override: a JSON holding only ``network_def`` trains, and every later command given only the
model folder rebuilds that network from ``network.json`` (data, never evaluated): evaluation, inference with its
out-of-distribution features and Grad-CAM, and the three exports; definitions the bundle cannot rebuild are refused
before training; a metric added to the evaluation config is reported."""

from __future__ import annotations

import csv
import json
import os

import pytest
import torch

from conftest import CONFIGS, FAST, bundle_error, evaluate, infer, run_workflow

RESNET = {"_target_": "monai.networks.nets.resnet18", "spatial_dims": 2, "n_input_channels": "@in_channels"}
RESNET["num_classes"] = "@num_classes"


def override(tmp_path, network_def: dict) -> str:
    """A config file holding only ``network_def``, as a user writes it."""
    path = tmp_path / "network.json"
    path.write_text(json.dumps({"network_def": network_def}))
    return str(path)


def train_with(network_def: dict, mednist, folder, **overrides):
    names = (os.path.join(CONFIGS, "train.json"), override(folder, network_def))
    paths = {"dataset_dir": mednist, "output_dir": folder / "out", "ckpt_dir": folder / "models"}
    return run_workflow(names, "training", **paths, **{**FAST, "epochs": 1, "epoch_length": 3, **overrides})


@pytest.fixture(scope="module")
def resnet(mednist, tmp_path_factory):
    folder = tmp_path_factory.mktemp("resnet")
    train_with(RESNET, mednist, folder)
    return folder


def rows(folder) -> list[dict]:
    with open(folder / "predictions.csv") as f:
        return list(csv.DictReader(f))


def test_another_network_travels_as_data_through_every_command(resnet, mednist, tmp_path):
    from scripts.export import export

    saved = json.loads((resnet / "models" / "network.json").read_text())
    assert saved["network_def"] == {"_target_": "monai.networks.nets.resnet18", "spatial_dims": 2,
                                    "n_input_channels": 1, "num_classes": 6}  # fmt: skip
    assert saved["feature_layer"] == "fc" and saved["gradcam_layer"] == "layer3"  # 8 x 8 maps of 64 x 64 images
    assert "fc.weight" in torch.load(resnet / "models" / "model.pt", weights_only=True)
    assert json.loads((resnet / "models" / "calibration.json").read_text())["feature_layer"] == "fc"

    evaluate(resnet, tmp_path / "eval", dataset_dir=mednist)  # no override: the model folder says what it is
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert report["num_images"] == 12 and report["ood_score_kind"] == "mahalanobis"

    image = os.path.join(mednist, "MedNIST", "Hand", "000003.jpeg")
    infer(resnet, tmp_path / "pt", image, visualize="true")
    (row,) = rows(tmp_path / "pt")
    assert row["ood_score_kind"] == "mahalanobis" and not row["error"]  # the features of resnet's classifier
    assert os.listdir(tmp_path / "pt" / "visualizations") == ["0000_000003.png"]  # with its Grad-CAM map
    probabilities = [float(row[c]) for c in ("AbdomenCT", "BreastMRI", "CXR", "ChestCT", "Hand", "HeadCT")]
    for kind in ("pt2", "ts", "onnx"):
        exported = export(kind, str(resnet / "models" / "model.pt"), str(tmp_path / "exports" / f"model.{kind}"))
        infer(resnet, tmp_path / kind, image, model_file=exported)
        (row,) = rows(tmp_path / kind)
        assert not row["error"] and row["ood_score_kind"] == "energy", kind
        got = [float(row[c]) for c in ("AbdomenCT", "BreastMRI", "CXR", "ChestCT", "Hand", "HeadCT")]
        assert got == pytest.approx(probabilities, abs=1e-5), kind
    assert sorted(os.listdir(tmp_path / "exports"))[-2:] == ["network.json", "network_data_format.json"]


@pytest.mark.parametrize(
    "network_def, message",
    [
        ({**RESNET, "_target_": "monai.networks.nets.UNet"}, "is not a classifier of monai.networks.nets listed"),
        ({**RESNET, "_target_": "$torch.nn.Linear"}, "is not a classifier of monai.networks.nets listed"),
        ({**RESNET, "bias_downsample": "$torch.tensor(1)"}, "argument bias_downsample is Tensor, not JSON data"),
    ],
)
def test_a_network_the_bundle_cannot_rebuild_is_refused_before_any_file(network_def, message, mednist, tmp_path):
    with bundle_error(message):
        train_with(network_def, mednist, tmp_path)
    assert not (tmp_path / "out").exists() and not (tmp_path / "models").exists()


def test_network_json_is_data_never_evaluated(resnet, tmp_path):
    """A network.json naming an expression or an unlisted callable is refused when read; a JSON string starting
    with $ is a string (the control: MONAI's ConfigParser evaluates it); ``pretrained`` never downloads; a
    definition whose weights would take more than 1 GiB is refused before any is allocated."""
    from monai.bundle import ConfigParser

    from scripts.model_file import ModelDescription

    models = tmp_path / "models"
    models.mkdir()
    for name in ("network_data_format.json", "model.pt"):
        (models / name).write_bytes((resnet / "models" / name).read_bytes())
    saved = json.loads((resnet / "models" / "network.json").read_text())

    def described(network_def):
        (models / "network.json").write_text(json.dumps({**saved, "network_def": network_def}))
        return ModelDescription.beside(str(models / "model.pt"))

    marker = tmp_path / "ran"
    payload = f"$open({str(marker)!r}, 'w').close() or 'basic'"
    with bundle_error("is not a classifier of monai.networks.nets listed"):
        described({**saved["network_def"], "_target_": "os.system"}).network()
    with bundle_error("network_def does not build"):  # the string goes to ResNet as data, which refuses it
        described({"_target_": "monai.networks.nets.ResNet", "block": payload, "layers": [1, 1, 1, 1],
                   "block_inplanes": [8, 8, 8, 8], "spatial_dims": 2, "num_classes": 6}).network()  # fmt: skip
    assert not marker.exists()
    ConfigParser({"net": payload}).get_parsed_content("net")  # the control: a config evaluates it
    assert marker.exists()
    huge = {"_target_": "monai.networks.nets.DenseNet121", "spatial_dims": 2, "in_channels": 1, "out_channels": 6}
    with bundle_error("bytes of weights, over 1,073,741,824"):
        described({**huge, "init_features": 4096, "growth_rate": 2048}).network()
    network = described({**saved["network_def"], "pretrained": True}).network()  # offline: no download tried
    assert type(network).__name__ == "ResNet"


def test_a_metric_added_to_the_evaluation_config_is_reported(trained, mednist, tmp_path):
    top2 = {"_target_": "ignite.metrics.TopKCategoricalAccuracy", "k": 2}
    top2["output_transform"] = "$monai.handlers.from_engine(['pred', 'label'])"
    evaluate(trained, tmp_path, dataset_dir=mednist, **{"validate#additional_metrics#top2": top2})
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert report["metrics"]["accuracy"] == report["accuracy"] <= report["metrics"]["top2"] <= 1
    with open(tmp_path / "metrics.csv") as f:  # MONAI's MetricsSaver: every number in the evaluator's metrics
        saved = dict(line.strip().split(",", 1) for line in f)
    assert float(saved["top2"]) == pytest.approx(report["metrics"]["top2"]) and "f1_macro_avg" in saved
