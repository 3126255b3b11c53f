"""The bundle's helper commands (GPU check and data exploration), called as fire calls them."""

from __future__ import annotations

import shutil

import pytest
import torch
from PIL import Image

from conftest import CLASSES, bundle_error


def test_check_gpu_reports_device(capsys):
    from scripts.check_gpu import check_gpu

    check_gpu(size=256)
    out = capsys.readouterr().out
    import monai

    assert f"torch {torch.__version__}" in out and f"MONAI {monai.__version__}" in out
    if torch.cuda.is_available():
        assert "compute capability" in out and "fp16 autocast: yes" in out
    else:
        assert "No CUDA GPU is available" in out and "install a CUDA build of torch" in out
        assert "GFLOP/s" in out and "CPU bf16 autocast" in out
        assert "as fast as fp32 on this" in out and "training uses" in out
        with pytest.raises(SystemExit, match="no GPU is usable"):
            check_gpu(require_gpu="true", size=64)


def test_explore_data_table_and_grid(mednist, tmp_path, capsys):
    from scripts.explore_data import explore

    out = tmp_path / "grid.png"
    explore(data_dir=mednist, out=str(out), per_class=4)
    lines = capsys.readouterr().out.splitlines()
    for cls in CLASSES:
        row = next(line for line in lines if line.startswith(cls))
        assert row.split()[1:3] == ["20", "64x64"]
    assert next(line for line in lines if line.startswith("total")).split()[1] == "120"
    with Image.open(out) as im:
        assert im.size[0] > 200 and len(set(im.convert("L").getdata())) > 20


def test_explore_data_bad_folders(mednist, tmp_path):
    from scripts.explore_data import explore

    with bundle_error("does not exist") as found:
        explore(data_dir=str(tmp_path / "none"))
    assert found[0].fix
    shutil.copytree(mednist, tmp_path / "data")
    shutil.rmtree(tmp_path / "data" / "MedNIST" / "CXR")
    with bundle_error("no images for class(es) CXR"):
        explore(data_dir=str(tmp_path / "data"))
    with bundle_error("--per_class 0 is not an integer >= 1"):
        explore(data_dir=mednist, per_class=0)
