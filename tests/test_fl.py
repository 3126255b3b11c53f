"""Federated training: MONAI FL's ``MonaiAlgo`` on this bundle as it is (two sites in one process), and the NVIDIA
FLARE simulator job (``fl/job.py``, run by .ci/run once requirements-fl.txt is installed)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import BUNDLE, CLASSES, bundle_error


def site_data(mednist, folder, classes_images: dict) -> str:
    """A site's own MedNIST-layout folder: links to ``classes_images[class]`` of the synthetic images."""
    for cls, names in classes_images.items():
        os.makedirs(folder / "MedNIST" / cls)
        for name in names:
            os.symlink(os.path.join(mednist, "MedNIST", cls, name), folder / "MedNIST" / cls / name)
    return str(folder)


def algo(site: str, send_weight_diff: bool = True, **overrides):
    """``MonaiAlgo`` as fl/client.py builds it, and NVIDIA FLARE's MONAI examples call it: the bundle root given
    to ``MonaiAlgo`` alone, the bundle's own configs, the site's folders."""
    from monai.fl.client import MonaiAlgo

    folders = {"dataset_dir": site, "output_dir": f"{site}/out", "ckpt_dir": f"{site}/models", "download": False}
    common = {**folders, "batch_size": 8, "epochs": 2, "test_frac": 0.2, **overrides}  # bundle_root given once
    return MonaiAlgo(
        bundle_root=BUNDLE,
        local_epochs=1,
        send_weight_diff=send_weight_diff,
        train_kwargs=dict(common),
        eval_kwargs={**common, "output_dir": f"{site}/eval", "split_file": f"{site}/out/split.json"},
    )


def test_monai_algo_trains_two_sites_of_this_bundle_without_sharing_files(mednist, tmp_path):
    from monai.fl.utils.constants import WeightType
    from monai.fl.utils.exchange_object import ExchangeObject

    from scripts.model_file import ModelDescription

    names = [f"{i:06d}.jpeg" for i in range(20)]
    sites = {
        "site-1": site_data(mednist, tmp_path / "site-1", {c: names[:10] for c in CLASSES}),
        "site-2": site_data(mednist, tmp_path / "site-2", {c: names[10:] for c in CLASSES}),
    }
    global_weights = ModelDescription(tuple(CLASSES)).network().state_dict()
    for name, site in sites.items():
        client = algo(site, send_weight_diff=name == "site-1")
        client.initialize(extra={"CLIENT_NAME": name})
        metrics = client.evaluate(ExchangeObject(weights=global_weights)).metrics  # the key metric, MONAI FL's way
        with open(f"{site}/eval/metrics.json") as f:
            assert metrics["accuracy"] == pytest.approx(json.load(f)["accuracy"])
        client.train(ExchangeObject(weights=global_weights))
        update = client.get_weights()
        trained = client.trainer.network.state_dict()
        if name == "site-1":  # the difference local - global
            assert update.weight_type == WeightType.WEIGHT_DIFF
            key = "class_layers.out.weight"
            torch.testing.assert_close(update.weights[key], trained[key].cpu() - global_weights[key])
        else:
            assert update.weight_type == WeightType.WEIGHTS
            assert all(torch.equal(update.weights[k], trained[k].cpu()) for k in trained)
        assert any(not torch.equal(trained[k].cpu(), global_weights[k]) for k in global_weights)  # it trained
        client.finalize()
    for site in sites.values():  # each site's split, outputs and checkpoints in its own folder
        split = json.loads(open(f"{site}/out/split.json").read())
        assert len(split["training"]) + len(split["validation"]) + len(split["test"]) == 60
        assert os.path.isfile(f"{site}/models/model.pt") and os.path.isfile(f"{site}/out/history.csv")
    first = json.loads(open(f"{sites['site-1']}/out/split.json").read())["training"]
    assert all(int(d["image"].split("/")[1][:6]) < 10 for d in first)  # site-1 saw only its own images


def test_monai_algo_still_refuses_bad_values_before_work(mednist, tmp_path):
    site = site_data(mednist, tmp_path / "site", {c: ["000000.jpeg", "000001.jpeg"] for c in CLASSES})
    with bundle_error("--epochs 0 is not an integer >= 1"):
        algo(site, epochs=0).initialize(extra={"CLIENT_NAME": "site"})
    assert os.listdir(site) == ["MedNIST"]  # no split, output or checkpoint written


def test_flare_simulator_job_with_two_sites(mednist, tmp_path):
    """FedAvg in NVIDIA FLARE's simulator, run from another folder with relative paths: 2 sites, 2 rounds, each
    evaluating the global model every round (read back from TensorBoard) and training on where its last round
    ended, then the global model evaluated on the held-out test split."""
    pytest.importorskip("nvflare")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    work, elsewhere = tmp_path / "fl", tmp_path / "elsewhere"  # relative paths, from another folder
    elsewhere.mkdir()
    job = os.path.join(BUNDLE, "fl", "job.py")
    cmd = [sys.executable, job, "--dataset_dir", os.path.relpath(mednist, elsewhere), "--work_dir", "../fl"]
    cmd += ["--sites", "2", "--shards", "skewed", "--rounds", "2", "--batch_size", "8", "--test_frac", "0.2"]
    proc = subprocess.run(cmd, cwd=elsewhere, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((work / "fl.json").read_text())
    assert report["data"]["pool"] == 108 and report["data"]["test"] == 12
    sizes = report["data"]["sites"]
    assert sum(sum(v.values()) for v in sizes.values()) == 108
    assert sizes["site-1"]["AbdomenCT"] > sizes["site-2"]["AbdomenCT"]  # skewed
    metrics = json.loads((work / "global" / "eval" / "metrics.json").read_text())
    assert report["federated_test_accuracy"] == metrics["accuracy"] and metrics["num_images"] == 12
    weights = torch.load(work / "global" / "models" / "model.pt", weights_only=True)
    assert report["bytes_per_round"] == 2 * 2 * sum(v.numel() * v.element_size() for v in weights.values())
    steps = {}  # TensorBoard events, a folder per site
    for path in work.glob("flare/**/events.out.tfevents*"):
        events = EventAccumulator(str(path))
        events.Reload()
        if "global_model/accuracy" in events.Tags()["scalars"]:
            steps[path.parent.name] = sorted(e.step for e in events.Scalars("global_model/accuracy"))
    assert steps == {"site-1": [0, 1], "site-2": [0, 1]}  # each site evaluated the global model each round
    for site in ("site-1", "site-2"):  # one trainer per site through the rounds: its epochs and schedule go on
        with open(work / "sites" / site / "out" / "history.csv") as f:
            assert [row["epoch"] for row in csv.DictReader(f)] == ["1", "2"]
