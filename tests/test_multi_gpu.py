"""Distributed training with torchrun: 2 CPU processes (gloo) on synthetic data."""

from __future__ import annotations

import csv
import glob
import os
import re
import subprocess
import sys

import torch
from monai.networks.nets import DenseNet121

from conftest import BUNDLE, CALIBRATION, TRAIN

MULTI = f"['{TRAIN}','{os.path.join(BUNDLE, 'configs', 'multi_gpu_train.json')}']"


def torchrun(tmp_path, **overrides) -> list[str]:
    """Run 2 processes; return each rank's log (torchrun writes them to files, one per rank)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["--log-dir", str(tmp_path / "logs"), "--redirects", "3"]
    cmd += ["-m", "monai.bundle", "run", "training", "--config_file", MULTI]
    for k, v in {"output_dir": tmp_path / "out", "ckpt_dir": tmp_path / "models", **overrides}.items():
        cmd += [f"--{k}", str(v)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=BUNDLE, capture_output=True, text=True, timeout=600, env=env)
    logs = []
    for rank in (0, 1):
        (path,) = glob.glob(str(tmp_path / "logs" / "*" / "attempt_0" / str(rank) / "stdout.log"))
        with open(path) as f:
            logs.append(f.read())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:] + logs[1][-3000:]
    return logs


def history(tmp_path) -> list[dict]:
    with open(tmp_path / "out" / "history.csv") as f:
        return list(csv.DictReader(f))


def test_two_processes_train_one_model_and_stop_early_together(mednist, tmp_path):
    """One run of 2 ranks: reduced validation metrics, one model and checkpoint, each rank's half of the data, and
    a forced early stop (the loss cannot fall at learning rate 1e-30) ending both ranks after epoch 3."""
    logs = torchrun(
        tmp_path,
        dataset_dir=mednist,
        epochs=10,
        early_stop_patience=2,
        batch_size=8,
        accumulation_steps=1,
        learning_rate=1e-30,
        **{"network_def#norm": "instance", "epoch_length": 1},
    )
    assert "rank 0 of 2 (gloo)" in logs[0] and "rank 1 of 2 (gloo)" in logs[1]
    # validation metrics are reduced over both ranks' shards: both print the same figures
    pattern = r"Epoch\[(\d+)\] Metrics -- val_acc: ([\d.]+) val_loss: ([\d.]+)"
    assert re.findall(pattern, logs[0]) == re.findall(pattern, logs[1]) != []
    for log in logs:  # each rank validated epochs 1-3, then its trainer stopped and the run finished
        assert re.findall(r"Epoch\[(\d+)\] Metrics -- val_acc", log) == ["1", "2", "3"]
        assert "run finished in" in log
    assert [int(r["epoch"]) for r in history(tmp_path)] == [1, 2, 3]
    assert sorted(os.listdir(tmp_path / "models")) == [
        ".mednist.lock",
        *CALIBRATION,
        "checkpoint_epoch=3.pt",
        "model.pt",
        "network.json",
        "network_data_format.json",
    ]
    # each rank preprocessed its own half of the 96 training and 12 validation images
    assert all(re.findall(r"cached (\d+) images", log) == ["48", "6"] for log in logs)
    net = DenseNet121(spatial_dims=2, in_channels=1, out_channels=6, norm="instance")
    net.load_state_dict(torch.load(tmp_path / "models" / "model.pt", weights_only=True))  # no "module." prefix
    events = [f for f in os.listdir(tmp_path / "out") if f.startswith("events.out.tfevents")]
    assert events and len({f.split(".")[-2] for f in events}) == 1  # TensorBoard from one process (rank 0)
