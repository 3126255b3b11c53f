"""Federated training: MONAI FL's ``MonaiAlgo`` on this bundle as it is (two sites in one process), and the NVIDIA
FLARE simulator job (``fl/job.py``, run by .ci/run once requirements-fl.txt is installed)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
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


def colour_csv(folder, per_class: int = 16) -> str:
    """A 3-class colour task listed in a CSV (image,label), its images in one flat folder."""
    from PIL import Image

    from conftest import class_image

    rng, rows = np.random.default_rng(0), ["image,label"]
    os.makedirs(folder / "images")
    for label, name in enumerate(("red", "green", "blue")):
        for i in range(per_class):
            gray = class_image(label * 2, rng)
            rgb = np.stack([gray * (c == label) + gray // 4 for c in range(3)], axis=-1).astype(np.uint8)
            Image.fromarray(rgb).save(folder / "images" / f"{name}{i:02d}.png")
            rows.append(f"images/{name}{i:02d}.png,{name}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    return str(folder / "labels.csv")


def test_monai_algo_trains_a_three_class_colour_site(tmp_path):
    """MonaiAlgo takes any data the bundle takes: a CSV of three colour classes, trained in RGB, the global model
    evaluated with the description the federation gives the site."""
    from monai.fl.utils.exchange_object import ExchangeObject

    from scripts.model_file import ModelDescription

    labels = colour_csv(tmp_path / "site")
    # the federation's model, described in the site's model folder before its first round (as fl/job.py does)
    ModelDescription(("blue", "green", "red"), 3).write(str(tmp_path / "site" / "models"))
    client = algo(str(tmp_path / "site"), datalist=labels, in_channels=3, dataset_dir=None, test_frac=0.1)
    client.initialize(extra={"CLIENT_NAME": "site-1"})
    start = ModelDescription(("blue", "green", "red"), 3).network().state_dict()
    metrics = client.evaluate(ExchangeObject(weights=start)).metrics
    assert 0 <= metrics["accuracy"] <= 1 and (tmp_path / "site" / "eval" / "metrics.json").exists()
    client.train(ExchangeObject(weights=start))
    trained = client.trainer.network.state_dict()
    assert trained["features.conv0.weight"].shape[1] == 3 and trained["class_layers.out.weight"].shape[0] == 3
    assert not torch.equal(trained["class_layers.out.weight"].cpu(), start["class_layers.out.weight"])


def test_flare_job_takes_a_three_class_colour_csv_and_refuses_a_site_short_of_a_class(tmp_path):
    """fl/job.py with --datalist (3 colour classes) and --in_channels 3 runs FLARE to a global RGB model of those
    classes; sites that cannot each have every class are refused before FLARE starts."""
    pytest.importorskip("nvflare")
    labels = colour_csv(tmp_path / "data", per_class=8)
    job = [sys.executable, os.path.join(BUNDLE, "fl", "job.py"), "--datalist", labels, "--in_channels", "3"]
    short = subprocess.run(job + ["--work_dir", str(tmp_path / "short"), "--sites", "4", "--shards", "skewed"],
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert short.returncode != 0 and "image(s) of" in short.stderr and "Fix: fewer --sites" in short.stderr
    assert not (tmp_path / "short").exists()  # refused before FLARE started, nothing left
    labels = colour_csv(tmp_path / "more")
    cmd = job[:3] + [labels, "--in_channels", "3", "--work_dir", str(tmp_path / "fl"), "--sites", "2", "--rounds", "1"]
    proc = subprocess.run(cmd + ["--batch_size", "8", "--test_frac", "0.2"], capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "fl" / "fl.json").read_text())
    assert report["data"]["classes"] == ["blue", "green", "red"]
    weights = torch.load(tmp_path / "fl" / "global" / "models" / "model.pt", weights_only=True)
    assert weights["features.conv0.weight"].shape[1] == 3 and weights["class_layers.out.weight"].shape[0] == 3
