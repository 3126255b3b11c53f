"""Resume: a run killed with SIGKILL after its first checkpoint continues to the planned epoch."""

from __future__ import annotations

import csv
import signal
import subprocess
import sys
import time

import torch
from monai.networks.nets import DenseNet121

from conftest import BUNDLE, TRAIN, bundle_error, run_bundle, train

RUN = {"batch_size": 8, "accumulation_steps": 1, "learning_rate": 0.001, "early_stop_patience": 10}


def test_sigkill_then_resume(mednist, tmp_path):
    out, models = tmp_path / "out", tmp_path / "models"
    args = ["run", "training", "--config_file", TRAIN, "--dataset_dir", mednist, "--output_dir", str(out)]
    args += ["--ckpt_dir", str(models), "--epochs", "4"] + [f"--{k}={v}" for k, v in RUN.items()]
    proc = subprocess.Popen([sys.executable, "-m", "monai.bundle", *args], cwd=BUNDLE, stdout=subprocess.DEVNULL)
    first = models / "checkpoint_epoch=1.pt"
    deadline = time.time() + 300
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first.exists() or (models / "checkpoint_epoch=2.pt").exists()
    with open(out / "history.csv") as f:
        done = [int(r["epoch"]) for r in csv.DictReader(f)]
    assert done and done[-1] < 4  # killed before the end
    before = {k: v.clone() for k, v in torch.load(models / "model.pt", weights_only=True).items()}

    result = run_bundle(*args[:2], *args[2:], "--resume", "true")
    assert "resuming from" in result.stdout and "Engine run resuming from iteration" in result.stdout
    with open(out / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]  # continuous, nothing repeated or lost
    assert all(r["val_acc"] for r in rows)
    elapsed = [float(r["elapsed_s"]) for r in rows]
    assert elapsed == sorted(elapsed)
    ckpt = torch.load(models / "checkpoint_epoch=4.pt", weights_only=True)
    assert ckpt["trainer"]["iteration"] == 4 * ckpt["trainer"]["epoch_length"]
    assert {"optimizer", "lr_scheduler", "early_stop", "best_model", "checkpointer"} <= set(ckpt)
    assert not (models / "checkpoint_epoch=1.pt").exists()  # only the last one is kept
    net = DenseNet121(spatial_dims=2, in_channels=1, out_channels=6)
    net.load_state_dict(torch.load(models / "model.pt", weights_only=True))
    assert set(before) == set(net.state_dict())


def test_resume_without_checkpoint_is_named(mednist, tmp_path):
    with bundle_error("holds no checkpoint_epoch=N.pt to resume from"):
        train(mednist, tmp_path, resume="true", **RUN)  # tmp_path/models does not exist
