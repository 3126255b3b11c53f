"""Time a real training run of the bundle to a validation accuracy, then evaluate it on the test split.

    python -m tools.time_to_accuracy --dataset_dir /path/holding/MedNIST --work_dir /tmp/tta [--target 0.995]
                                       [--stop true] [--configs quick] [--any_train_json_key value ...]

Developer tooling, run from the repository root (not part of the bundle's release). Runs ``monai.bundle run
training`` and ``run evaluating`` as a user would (extra ``--key value`` pairs are passed
to training as overrides), and prints: the wall time of the whole training command (start-up, data split and
cache build included), the training time from the first iteration, the first epoch whose validation accuracy
reached ``target`` and the training time until then (from ``history.csv``; with ``--stop true`` training passes
``--target_accuracy target`` and ends there), training images per second over the fastest epoch (validation
included), the test accuracy
(``metrics.json``), and where the rest of the wall time went (from the training log's timestamps): ``import_s``
to the log's first line (Python, torch and MONAI imports), ``cache_s`` building the data caches, ``startup_s`` the
rest before the first iteration (config, data split, network to the device), ``after_s`` after the last epoch
(saving, exit). Logs and ``time_to_accuracy.json`` are written to ``work_dir``.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import re
import subprocess
import sys
import time
from datetime import datetime

import fire
import torch

from scripts.utils import BUNDLE_ROOT as BUNDLE


def _run(args: list[str], log: str) -> tuple[float, float]:
    """Run ``python -m monai.bundle run ...`` in the bundle's folder, output to ``log``: its start (epoch seconds)
    and wall time in seconds."""
    start, t0 = time.time(), time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "monai.bundle", "run", *args], cwd=BUNDLE, stdout=f, stderr=f)
    if proc.returncode:
        with open(log) as f:
            sys.exit(f"ERROR: `run {args[0]}` failed (exit {proc.returncode}); the end of {log}:\n{f.read()[-3000:]}")
    return start, time.perf_counter() - t0


def _phases(log: str, start: float, wall: float) -> dict:
    """Where the wall time outside training went, in seconds, from the training log's timestamps."""
    stamp = r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) - "
    with open(log, errors="replace") as f:
        text = f.read().replace("\r", "\n")

    def since_start(match) -> float:
        return datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp() - start

    first = re.search(stamp, text, re.M)  # MONAI's first line, once Python, torch and MONAI are imported
    began = re.search(stamp + r".*device: ", text, re.M)  # DeviceLogger, as the trainer starts
    ran = re.search(r"run finished in ([\d.]+) s", text)
    cache = sum(float(s) for s in re.findall(r"cached \d+ items in ([\d.]+) s", text))
    if not (first and began and ran):
        return {"cache_s": round(cache, 1)}
    return {
        "import_s": round(since_start(first), 1),
        "cache_s": round(cache, 1),
        "startup_s": round(since_start(began) - since_start(first) - cache, 1),
        "after_s": round(wall - since_start(began) - float(ran.group(1)), 1),
    }


def time_to_accuracy(
    dataset_dir: str, work_dir: str, target: float = 0.995, stop: bool = False, configs: str = "", **overrides
) -> None:
    """Train with the defaults (plus the override files ``configs``, comma-separated names in configs/, and
    ``overrides``), evaluate on the test split, print and save the timings."""
    if not 0 < float(target) <= 1:
        sys.exit(f"ERROR: --target must be an accuracy in (0, 1], got {target!r}.")
    train = os.path.join(BUNDLE, "configs", "train.json")
    names = [name.strip() for name in str(configs).split(",") if name.strip()]
    files = [train] + [os.path.join(BUNDLE, "configs", f"{name}.json") for name in names]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        sys.exit(f"ERROR: no config file {missing[0]}. Fix: --configs takes names of files in configs/, e.g. quick.")
    config_file = str(files) if names else train
    work_dir = os.path.abspath(work_dir)
    out, models = os.path.join(work_dir, "out"), os.path.join(work_dir, "models")
    if os.path.exists(os.path.join(models, "model.pt")):
        sys.exit(f"ERROR: {models} already holds a model.pt. Fix: pass a new --work_dir, so that no run is mixed in.")
    os.makedirs(work_dir, exist_ok=True)
    folders = ["--dataset_dir", dataset_dir, "--output_dir", out, "--ckpt_dir", models]
    if str(stop).lower() in ("true", "1"):
        overrides = {**overrides, "target_accuracy": float(target)}
    extra = [str(x) for k, v in overrides.items() for x in (f"--{k}", v)]
    log = os.path.join(work_dir, "training.log")
    start, wall = _run(["training", "--config_file", config_file, *folders, *extra], log)
    evaluate = f"['{train}','{os.path.join(BUNDLE, 'configs', 'evaluate.json')}']"
    test_dir = os.path.join(work_dir, "test")
    split = os.path.join(out, "split.json")
    _run(
        ["evaluating", "--config_file", evaluate, *folders, "--output_dir", test_dir, "--split_file", split],
        os.path.join(work_dir, "evaluating.log"),
    )
    with open(os.path.join(out, "history.csv")) as f:
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
    result = {
        "configs": names,
        "overrides": overrides,
        "epochs_run": len(history),
        "wall_s": round(wall, 1),
        "training_s": round(history[-1]["elapsed_s"], 1),
        "epoch_img_per_s": round(epoch_images / min(full_epochs), 1),
        **_phases(log, start, wall),
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
