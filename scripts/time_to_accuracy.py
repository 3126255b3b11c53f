"""Time a real training run of the bundle to a validation accuracy, then evaluate it on the test split.

    python -m scripts.time_to_accuracy --dataset_dir /path/holding/MedNIST --work_dir /tmp/tta [--target 0.995]
                                       [--any_train_json_key value ...]

Runs ``monai.bundle run training`` and ``run evaluating`` as a user would (extra ``--key value`` pairs are passed
to training as overrides), and prints: the wall time of the whole training command (start-up, data split and
cache build included), the training time from the first iteration, the first epoch whose validation accuracy
reached ``target`` and the training time until then (from ``history.csv``), and the test accuracy
(``metrics.json``). Logs and ``time_to_accuracy.json`` are written to ``work_dir``.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time

import fire

BUNDLE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args: list[str], log: str) -> float:
    """Run ``python -m monai.bundle run ...`` in the bundle's folder, output to ``log``; its wall time in seconds."""
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "monai.bundle", "run", *args], cwd=BUNDLE, stdout=f, stderr=f)
    if proc.returncode:
        with open(log) as f:
            sys.exit(f"ERROR: `run {args[0]}` failed (exit {proc.returncode}); the end of {log}:\n{f.read()[-3000:]}")
    return time.perf_counter() - start


def time_to_accuracy(dataset_dir: str, work_dir: str, target: float = 0.995, **overrides) -> None:
    """Train with the defaults (plus ``overrides``), evaluate on the test split, print and save the timings."""
    if not 0 < float(target) <= 1:
        sys.exit(f"ERROR: --target must be an accuracy in (0, 1], got {target!r}.")
    work_dir = os.path.abspath(work_dir)
    out, models = os.path.join(work_dir, "out"), os.path.join(work_dir, "models")
    if os.path.exists(os.path.join(models, "model.pt")):
        sys.exit(f"ERROR: {models} already holds a model.pt. Fix: pass a new --work_dir, so that no run is mixed in.")
    os.makedirs(work_dir, exist_ok=True)
    folders = ["--dataset_dir", dataset_dir, "--output_dir", out, "--ckpt_dir", models]
    extra = [str(x) for k, v in overrides.items() for x in (f"--{k}", v)]
    train = os.path.join(BUNDLE, "configs", "train.json")
    wall = _run(["training", "--config_file", train, *folders, *extra], os.path.join(work_dir, "training.log"))
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
    reached = next((row for row in history if row["val_acc"] >= float(target)), None)
    result = {
        "overrides": overrides,
        "epochs_run": len(history),
        "wall_s": round(wall, 1),
        "training_s": round(history[-1]["elapsed_s"], 1),
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
