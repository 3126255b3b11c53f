"""Developer tooling (tools/, outside the bundle): the pipeline benchmark and time to accuracy."""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import statistics
import subprocess
import sys

import pytest

from conftest import BUNDLE, bundle_error


def run_tool(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=BUNDLE, capture_output=True, text=True, timeout=300, env=env
    )


def test_benchmark_runs_both_pipelines_and_reports_ratio(mednist, tmp_path):
    out = tmp_path / "bench.json"
    scratch = tmp_path / "tmp"
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    os.makedirs(scratch / f"bench-{dead.pid}-left" / "out")  # left by a killed benchmark
    proc = run_tool(
        "tools.benchmark", "--dataset_dir", mednist, "--num_images", "32", "--repeats", "1", "--out", out,
        "--batch_size", "16",  # an override reaches bundle and model_only, not the original per-sample pipeline
        env={**os.environ, "TMPDIR": str(scratch)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert not glob.glob(str(scratch / "bench-*"))  # its scratch folders, and a killed run's, are removed
    report = json.loads(out.read_text())
    bundle, per_sample, model_only = report["results"]
    assert [r["pipeline"] for r in report["results"]] == ["bundle", "per_sample", "model_only"]
    assert (bundle["batch"], per_sample["batch"], model_only["batch"]) == ("16 x 1", "4 x 2", "16 x 1")
    assert report["overrides"] == {"batch_size": 16} and "overrides {'batch_size': 16}" in proc.stdout
    # both pipelines see the same images: 32 training ones, and every 3rd of the 12 validation ones up to 8;
    # model_only times whole batches (at least one)
    expected = {"bundle": (32, 4), "per_sample": (32, 4), "model_only": (32, 128)}
    for row in report["results"]:
        runs = report["runs"][row["pipeline"]]
        assert len(runs) == 1 and all((r["train_images"], r["val_images"]) == expected[row["pipeline"]] for r in runs)
        assert row["train_img_per_s"] == round(statistics.median(r["train_img_per_s"] for r in runs), 2)
        assert row["epoch_s"] > 0 and row["peak_rss_gib"] > 0
    ratio = bundle["train_img_per_s"] / per_sample["train_img_per_s"]
    assert report["train_speedup"] == round(ratio, 2)
    assert f"training speed-up (bundle / per_sample): {ratio:.1f}x" in proc.stdout
    assert proc.stdout.count("round ") == 1 and "| train_img_per_s |" in proc.stdout
    assert report["of_model_only"] == round(bundle["train_img_per_s"] / model_only["train_img_per_s"], 2)


def test_benchmark_bad_arguments(mednist, tmp_path):
    from tools.benchmark import benchmark

    with pytest.raises(SystemExit, match="--repeats must be at least 1"):
        benchmark(dataset_dir=mednist, repeats=0, out=str(tmp_path / "b.json"))
    with pytest.raises(SystemExit, match="no key batch_sise in configs/train.json"):
        benchmark(dataset_dir=mednist, out=str(tmp_path / "b.json"), batch_sise=8)
    shutil.copytree(mednist, tmp_path / "data")
    shutil.rmtree(tmp_path / "data" / "MedNIST" / "CXR")
    with pytest.raises(SystemExit) as stopped:  # the first pipeline's process fails: its message is passed on
        benchmark(dataset_dir=str(tmp_path / "data"), repeats=1, out=str(tmp_path / "b.json"))
    message = str(stopped.value)
    assert "the bundle benchmark failed" in message and "class(es) CXR" in message and "Fix:" in message
    assert not (tmp_path / "b.json").exists()


def test_time_to_accuracy_trains_evaluates_and_reports(mednist, tmp_path, capsys):
    from tools.time_to_accuracy import time_to_accuracy  # runs `monai.bundle run training|evaluating` processes

    work = tmp_path / "tta"
    overrides = {"epochs": 3, "batch_size": 16, "val_per_epoch": 2, "half_res_fraction": 0.5}
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
    # the wall time apart: cache build (the log's "cached N items" lines), other start-up, after the last epoch
    log = (work / "training.log").read_text()
    cached = [float(s) for s in re.findall(r"cached \d+ items in ([\d.]+) s \(\d process", log)]
    assert len(cached) == 2 and report["cache_s"] == round(sum(cached), 1)
    assert report["import_s"] > 0 and report["startup_s"] > 0 and report["after_s"] >= 0
    assert report["import_s"] + report["cache_s"] + report["startup_s"] + report["training_s"] <= report["wall_s"]
    assert report["training_s_to_target"] == round(history[-1]["elapsed_s"], 1)
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
