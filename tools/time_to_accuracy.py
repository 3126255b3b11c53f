"""Time a real training run of the bundle to a validation accuracy, then evaluate it on the test split.

    python -m tools.time_to_accuracy --dataset_dir /path/holding/MedNIST --work_dir /tmp/tta [--target 0.995]
                                       [--stop true] [--configs quick] [--any_train_json_key value ...]
    python -m tools.time_to_accuracy --datalist labels.csv --work_dir /tmp/tta ...

Developer tooling, run from the repository root (not part of the bundle's release). Runs ``monai.bundle run
training`` and ``run evaluating`` as a user would (extra ``--key value`` pairs are passed to training as
overrides; with ``--stop true`` training passes ``--target_accuracy target`` and ends there), and prints: the wall
time of the whole training command, where it went (``before_training_s``: imports, data split, preprocessing and
start-up; ``training_s``: the epochs with their validations; ``after_s``: calibration, saving, exit), the first
epoch whose validation accuracy reached ``target`` and the training time until then, training images per second
over the fastest epoch (validation included), and the test accuracy. The phases come from the run's own files
(``history.csv``: its epochs' times; the moment it was last written), not from its log. Logs and
``time_to_accuracy.json`` are written to ``work_dir``.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import sys

import fire
import torch

from tools.bundle import BUNDLE_ROOT as BUNDLE
from tools.commands import run_bundle


def time_to_accuracy(
    work_dir: str, dataset_dir: str = "", target: float = 0.995, stop: bool = False, configs: str = "", **overrides
) -> None:
    """Train with the defaults (plus the override files ``configs``, comma-separated names in configs/ or paths to
    JSON files, and ``overrides``), evaluate on the test split, print and save the timings."""
    if not 0 < float(target) <= 1:
        sys.exit(f"ERROR: --target must be an accuracy in (0, 1], got {target!r}.")
    train = os.path.join(BUNDLE, "configs", "train.json")
    names = [name.strip() for name in str(configs).split(",") if name.strip()]
    files = [train] + [
        os.path.abspath(n) if n.endswith(".json") else os.path.join(BUNDLE, "configs", f"{n}.json") for n in names
    ]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        sys.exit(f"ERROR: no config file {missing[0]}. Fix: --configs takes names of files in configs/, e.g. quick.")
    config_file = str(files) if names else train
    work_dir = os.path.abspath(work_dir)
    out, models = os.path.join(work_dir, "out"), os.path.join(work_dir, "models")
    if os.path.exists(os.path.join(models, "model.pt")):
        sys.exit(f"ERROR: {models} already holds a model.pt. Fix: pass a new --work_dir, so that no run is mixed in.")
    os.makedirs(work_dir, exist_ok=True)
    folders = ["--output_dir", out, "--ckpt_dir", models] + (["--dataset_dir", dataset_dir] if dataset_dir else [])
    if str(stop).lower() in ("true", "1"):
        overrides = {**overrides, "target_accuracy": float(target)}
    extra = [str(x) for k, v in overrides.items() for x in (f"--{k}", v)]
    log = os.path.join(work_dir, "training.log")
    run = run_bundle("run", "training", "--config_file", config_file, *folders, *extra, log=log)
    history_file, split = os.path.join(out, "history.csv"), os.path.join(out, "split.json")
    last_epoch_end = os.path.getmtime(history_file)  # written as each epoch ends
    evaluate = f"['{train}','{os.path.join(BUNDLE, 'configs', 'evaluate.json')}']"
    test_dir = os.path.join(work_dir, "test")
    data = [str(x) for k, v in overrides.items() if k == "datalist" for x in (f"--{k}", v)]  # the same images
    evaluating = ["run", "evaluating", "--config_file", evaluate, *folders, *data, "--output_dir", test_dir]
    run_bundle(*evaluating, "--split_file", split, log=os.path.join(work_dir, "evaluating.log"))
    with open(history_file) as f:
        history = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
    with open(os.path.join(test_dir, "metrics.json")) as f:
        test_accuracy = json.load(f)["accuracy"]
    with open(split) as f:
        train_images = len(json.load(f)["training"])
    (ckpt,) = glob.glob(os.path.join(models, "checkpoint_epoch=*.pt"))
    ckpt = torch.load(ckpt, weights_only=True, map_location="cpu", mmap=True)  # two numbers of 80 MB
    epoch_images = min(train_images, ckpt["trainer"]["epoch_length"] * ckpt["settings"]["batch_size"])
    full_epochs = [row["epoch_time_s"] for row in history[:-1]] or [history[-1]["epoch_time_s"]]
    reached = next((row for row in history if row["val_acc"] >= float(target)), None)
    training_s = history[-1]["elapsed_s"]
    after_s = run["start"] + run["wall_s"] - last_epoch_end
    result = {
        "configs": names,
        "overrides": overrides,
        "epochs_run": len(history),
        "wall_s": round(run["wall_s"], 1),
        "before_training_s": round(run["wall_s"] - after_s - training_s, 1),
        "training_s": round(training_s, 1),
        "after_s": round(after_s, 1),
        "peak_rss_gib": round(run["peak_rss_mib"] / 1024, 2),
        "epoch_img_per_s": round(epoch_images / min(full_epochs), 1),
        "best_val_acc": max(row["val_acc"] for row in history),
        "target": float(target),
        "target_epoch": int(reached["epoch"]) if reached else None,
        "training_s_to_target": round(reached["elapsed_s"], 1) if reached else None,
        "test_accuracy": test_accuracy,
    }
    for key, value in result.items():
        print(f"{key}: {value}")
    with open(os.path.join(work_dir, "time_to_accuracy.json"), "w") as f:
        json.dump({**result, "history": history}, f, indent=2)


if __name__ == "__main__":
    fire.Fire(time_to_accuracy)
