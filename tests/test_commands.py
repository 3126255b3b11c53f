"""The bundle's helper commands: GPU check and data exploration."""

from __future__ import annotations

import shutil
import subprocess
import sys

import torch
from PIL import Image

from conftest import BUNDLE


def run_script(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=BUNDLE, capture_output=True, text=True, timeout=300)


def test_check_gpu_reports_device():
    proc = run_script("scripts.check_gpu", "--size", "256")
    assert proc.returncode == 0, proc.stderr
    assert f"torch {torch.__version__}" in proc.stdout and "MONAI 1.6.1" in proc.stdout
    if torch.cuda.is_available():
        assert "compute capability" in proc.stdout and "fp16 autocast: yes" in proc.stdout
    else:
        assert "No CUDA GPU is available" in proc.stdout and "install a CUDA build of torch" in proc.stdout
        assert "GFLOP/s" in proc.stdout and "CPU bf16 autocast" in proc.stdout
        required = run_script("scripts.check_gpu", "--size", "64", "--require_gpu", "true")
        assert required.returncode != 0 and "no GPU is usable" in required.stderr


def test_explore_data_table_and_grid(mednist, tmp_path):
    out = tmp_path / "grid.png"
    proc = run_script("scripts.explore_data", "--data_dir", mednist, "--out", str(out), "--per_class", "4")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    for cls in ("AbdomenCT", "BreastMRI", "CXR", "ChestCT", "Hand", "HeadCT"):
        row = next(line for line in lines if line.startswith(cls))
        assert row.split()[1:3] == ["20", "64x64"]
    assert next(line for line in lines if line.startswith("total")).split()[1] == "120"
    with Image.open(out) as im:
        assert im.size[0] > 200 and len(set(im.convert("L").getdata())) > 20


def test_explore_data_bad_folders(mednist, tmp_path):
    proc = run_script("scripts.explore_data", "--data_dir", str(tmp_path / "none"))
    assert proc.returncode != 0 and "does not exist" in proc.stderr and "Fix:" in proc.stderr
    shutil.copytree(mednist, tmp_path / "data")
    shutil.rmtree(tmp_path / "data" / "MedNIST" / "CXR")
    proc = run_script("scripts.explore_data", "--data_dir", str(tmp_path / "data"))
    assert proc.returncode != 0 and "no images for class(es) CXR" in proc.stderr
