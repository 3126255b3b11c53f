"""Developer tooling (tools/, outside the bundle): the pipeline benchmark and time to accuracy."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import BUNDLE, bundle_error


def run_tool(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=BUNDLE, capture_output=True, text=True, timeout=300, env=env
    )


def test_benchmark_measures_training_and_inference_against_the_bare_network(mednist, tmp_path):
    out = tmp_path / "bench.json"
    scratch = tmp_path / "tmp"
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    os.makedirs(scratch / f"bench-{dead.pid}-left" / "out")  # left by a killed benchmark
    proc = run_tool(
        "tools.benchmark", "--dataset_dir", mednist, "--num_images", "32", "--repeats", "1", "--out", out,
        "--batch_size", "8", "--cpu_bf16", "false", env={**os.environ, "TMPDIR": str(scratch)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert not glob.glob(str(scratch / "bench-*"))  # its scratch folders, and a killed run's, are removed
    report = json.loads(out.read_text())
    (run,) = report["runs"]
    assert report["overrides"] == {"batch_size": 8, "cpu_bf16": "false"} and run == report["median"]
    assert (run["batch"], run["precision"], run["train_images"], run["inference_images"]) == (8, "fp32", 32, 32)
    for kind, bare in (("training", "bare_training"), ("inference", "bare_forward")):
        assert run[f"{kind}_of_bare"] == round(run[f"{kind}_img_per_s"] / run[f"{bare}_img_per_s"], 3) > 0
        assert f"{kind}_of_bare: {run[f'{kind}_of_bare']:.0%} (target >= " in proc.stdout
    assert report["machine"]["capability"] == torch.backends.cpu.get_cpu_capability()
    assert f"{report['machine']['capability']}, {os.cpu_count()} cores" in proc.stdout
    assert "precision: fp32 (--cpu_bf16 false), batch 8, " in proc.stdout and "round 1/1: training" in proc.stdout


def test_decisions_count_fresh_processes_and_probe_only_times_the_probe(tmp_path):
    """`--decisions N`: N fresh processes' `--cpu_bf16 auto` picks (here one); with `--probe_only true` the flags are
    set aside and the timed probe decides (or the fp32 fallback), taking its pairs' time."""
    out = tmp_path / "decisions.json"
    proc = run_tool("tools.benchmark", "--decisions", "1", "--probe_only", "true", "--out", out)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["probe_only"] is True and len(report["runs"]) == 1 and "of 1" in proc.stdout
    for run in report["runs"]:
        assert run["evidence"].startswith(("decided by a probe", "fp32 by default")) and run["seconds"] > 0.05, run


def test_benchmark_bad_arguments(mednist, tmp_path):
    from tools.benchmark import benchmark

    with pytest.raises(SystemExit, match="--repeats must be a whole number of at least 1, got 0"):
        benchmark(dataset_dir=mednist, repeats=0, out=str(tmp_path / "b.json"))
    with pytest.raises(SystemExit, match="--load must be a whole number of at least 0, got -1"):
        benchmark(dataset_dir=mednist, load=-1, out=str(tmp_path / "b.json"))
    with pytest.raises(SystemExit, match="--decisions must be a whole number of at least 0, got 'x'"):
        benchmark(decisions="x", out=str(tmp_path / "b.json"))
    with pytest.raises(SystemExit, match="--dataset_dir is missing"):
        benchmark(out=str(tmp_path / "b.json"))
    with pytest.raises(SystemExit, match="no key batch_sise in configs/train.json"):
        benchmark(dataset_dir=mednist, out=str(tmp_path / "b.json"), batch_sise=8)
    shutil.copytree(mednist, tmp_path / "data")
    shutil.rmtree(tmp_path / "data" / "MedNIST" / "CXR")
    with pytest.raises(SystemExit) as stopped:  # refused before any round's process starts
        benchmark(dataset_dir=str(tmp_path / "data"), repeats=1, out=str(tmp_path / "b.json"))
    message = str(stopped.value)
    assert message.startswith("ERROR: dataset_dir: ") and "class(es) CXR" in message and "Fix:" in message
    assert not (tmp_path / "b.json").exists()


def test_time_to_accuracy_trains_evaluates_and_reports(mednist, tmp_path, capsys):
    from tools.time_to_accuracy import time_to_accuracy  # runs `monai.bundle run training|evaluating` processes

    work = tmp_path / "tta"
    overrides = {"epochs": 3, "batch_size": 16, "val_per_epoch": 2}
    time_to_accuracy(dataset_dir=mednist, work_dir=str(work), target=0.5, stop=True, **overrides)
    printed = capsys.readouterr().out
    report = json.loads((work / "time_to_accuracy.json").read_text())
    history, metrics = report["history"], json.loads((work / "test" / "metrics.json").read_text())
    assert (
        report["overrides"] == {**overrides, "target_accuracy": 0.5} and report["test_accuracy"] == metrics["accuracy"]
    )
    # validated twice an epoch, stopped by the first validation at 0.5 or more (the synthetic classes separate
    # within the 3 epochs): earlier epochs ended below it, the last row is the validation that reached it
    assert report["epochs_run"] == len(history) == report["target_epoch"] <= 3
    assert all(row["val_acc"] < 0.5 for row in history[:-1]) and history[-1]["val_acc"] >= 0.5
    assert "reached the target 0.5: training ends" in (work / "training.log").read_text()
    assert report["epoch_img_per_s"] > 0
    assert report["best_val_acc"] == max(row["val_acc"] for row in history)
    assert 0 < report["training_s"] < report["wall_s"] and report["training_s"] == round(history[-1]["elapsed_s"], 1)
    # the wall time apart: before training (imports, data, start-up), the epochs, after them (calibration, exit)
    phases = report["before_training_s"] + report["training_s"] + report["after_s"]
    assert (
        report["before_training_s"] > 0 and report["after_s"] > 0 and phases == pytest.approx(report["wall_s"], abs=0.2)
    )
    assert report["training_s_to_target"] == round(history[-1]["elapsed_s"], 1) and report["peak_rss_gib"] > 0.3
    assert f"test_accuracy: {metrics['accuracy']}" in printed and (work / "training.log").stat().st_size > 0
    # a second run into the same folder would mix two models: refused
    with pytest.raises(SystemExit, match="pass a new --work_dir"):
        time_to_accuracy(dataset_dir=mednist, work_dir=str(work))


def test_inference_memory_needs_enough_images(mednist):
    from tools.inference_memory import inference_memory

    with bundle_error("holds 120 images, fewer than 500"):
        inference_memory(images=os.path.join(mednist, "MedNIST"), counts="5,500")


def test_time_to_accuracy_bad_arguments(mednist, tmp_path):
    from tools.time_to_accuracy import time_to_accuracy

    with pytest.raises(SystemExit, match="--target must be an accuracy in"):
        time_to_accuracy(dataset_dir=mednist, work_dir=str(tmp_path / "w"), target=1.5)
    with pytest.raises(SystemExit, match="no config file .*quik.json. Fix: --configs takes names"):
        time_to_accuracy(dataset_dir=mednist, work_dir=str(tmp_path / "w"), configs="quik")
    assert not os.listdir(tmp_path)  # refused before any file is written
