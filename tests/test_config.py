"""Bundle structure: properties, metadata, network in/out, and the message for each bad override."""

from __future__ import annotations

import json
import os

import pytest
from monai.bundle import ConfigWorkflow

from conftest import BUNDLE, TRAIN, run_bundle

META = os.path.join(BUNDLE, "configs", "metadata.json")


def test_train_workflow_properties(monkeypatch, mednist, tmp_path):
    monkeypatch.chdir(BUNDLE)
    workflow = ConfigWorkflow(
        config_file=TRAIN, meta_file=META, workflow_type="train", dataset_dir=mednist, output_dir=str(tmp_path)
    )
    workflow.initialize()
    assert workflow.check_properties() in (None, [])


def test_metadata_has_mandatory_keys():
    meta = json.load(open(META))
    for key in (
        "schema",
        "version",
        "changelog",
        "monai_version",
        "pytorch_version",
        "numpy_version",
        "required_packages_version",
        "name",
        "task",
        "description",
        "authors",
        "copyright",
        "data_source",
        "data_type",
        "intended_use",
        "references",
        "network_data_format",
    ):
        assert meta.get(key), key
    assert meta["version"] in meta["changelog"]
    assert meta["schema"].endswith("meta_schema_20240725.json")
    image = meta["network_data_format"]["inputs"]["image"]
    assert (image["num_channels"], image["spatial_shape"], image["dtype"]) == (1, [64, 64], "float32")
    pred = meta["network_data_format"]["outputs"]["pred"]
    assert pred["num_channels"] == 6 and pred["type"] == "probabilities"
    assert list(pred["channel_def"].values()) == ["AbdomenCT", "BreastMRI", "CXR", "ChestCT", "Hand", "HeadCT"]
    assert set(meta["required_packages_version"]) >= {
        "pytorch-ignite",
        "nibabel",
        "pillow",
        "tensorboard",
        "fire",
        "matplotlib",
        "tqdm",
    }


def test_verify_net_in_out():
    proc = run_bundle("verify_net_in_out", "--net_id", "network_def", "--meta_file", META, "--config_file", TRAIN)
    assert "verified with no error" in proc.stdout + proc.stderr


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"epochs": 0}, "--epochs 0 is not an integer >= 1"),
        ({"accumulation_steps": 0}, "--accumulation_steps 0 is not an integer >= 1"),
        ({"batch_size": 0}, "--batch_size 0 is not an integer >= 1"),
        ({"val_frac": 1.5}, "--val_frac 1.5 is not a number in (0.0, 1.0)"),
        ({"test_frac": 0}, "--test_frac 0 is not a number in (0.0, 1.0)"),
        ({"val_frac": 0.5, "test_frac": 0.5}, "sum to 1, leaving no training data"),
        ({"amp": "maybe"}, "--amp 'maybe' is not a boolean"),
        ({"cache_num_workers": 0}, "--cache_num_workers 0 is not an integer >= 1"),
    ],
)
def test_bad_hyperparameter_is_named(overrides, message, tmp_path, mednist):
    proc = run_bundle(
        "run", "training", "--config_file", TRAIN, dataset_dir=mednist, output_dir=tmp_path, check=False, **overrides
    )
    assert proc.returncode != 0
    assert message in proc.stderr and "Fix:" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "split.json")  # stopped before any work
