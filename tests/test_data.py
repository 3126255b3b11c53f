"""Dataset preparation: download with checksum, and the message for each bad dataset folder."""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import tarfile

import pytest
import torch

from conftest import TRAIN, train_bundle, write_mednist

FAST = {"epochs": 1, "batch_size": 16, "accumulation_steps": 1}


@pytest.fixture(scope="module")
def served_tarball(http_server):
    """A synthetic MedNIST.tar.gz served over HTTP on 127.0.0.1; yields (url, md5)."""
    root, base = http_server
    src = write_mednist(str(root / "src"), per_class=10)
    with tarfile.open(root / "MedNIST.tar.gz", "w:gz") as tar:
        tar.add(os.path.join(src, "MedNIST"), arcname="MedNIST")
    return f"{base}/MedNIST.tar.gz", hashlib.md5((root / "MedNIST.tar.gz").read_bytes()).hexdigest()


def test_download_checks_md5_and_extracts(served_tarball, tmp_path):
    url, md5 = served_tarball
    train_bundle(tmp_path / "data", tmp_path, download_url=url, download_md5=md5, **FAST)
    assert len(os.listdir(tmp_path / "data" / "MedNIST" / "Hand")) == 10
    assert os.path.isfile(tmp_path / "models" / "model.pt")
    # nothing of the extraction is left behind
    assert sorted(os.listdir(tmp_path / "data")) == ["MedNIST", "MedNIST.tar.gz"]


def test_download_with_wrong_md5_is_refused(served_tarball, tmp_path):
    url, _ = served_tarball
    proc = train_bundle(tmp_path / "data", tmp_path, download_url=url, download_md5="0" * 32, check=False, **FAST)
    assert proc.returncode != 0
    assert f"could not download MedNIST from {url}" in proc.stderr and "by hand" in proc.stderr
    assert not os.path.exists(tmp_path / "data" / "MedNIST")


def test_offline_download_names_url_and_manual_fix(tmp_path):
    url = "http://127.0.0.1:9/MedNIST.tar.gz"  # the discard port: connection refused
    proc = train_bundle(tmp_path, tmp_path, download_url=url, check=False, **FAST)
    assert proc.returncode != 0
    assert f"could not download MedNIST from {url}" in proc.stderr
    assert f"put it at {tmp_path}/MedNIST.tar.gz" in proc.stderr
    assert not os.path.exists(tmp_path / "MedNIST")


def test_no_data_and_download_disabled(tmp_path):
    proc = train_bundle(tmp_path, tmp_path, download="false", check=False, **FAST)
    assert proc.returncode != 0
    assert "no MedNIST data" in proc.stderr and "download is false" in proc.stderr


def test_corrupt_tarball_in_place_is_refused(tmp_path):
    (tmp_path / "MedNIST.tar.gz").write_bytes(b"not a tarball")
    proc = train_bundle(tmp_path, tmp_path, download="false", check=False, **FAST)
    assert proc.returncode != 0
    assert "does not match MD5" in proc.stderr and "delete it" in proc.stderr


@pytest.mark.parametrize("damage", ["missing_class", "no_images"])
def test_incomplete_dataset_is_refused(damage, mednist, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(mednist, data)
    if damage == "missing_class":
        shutil.rmtree(data / "MedNIST" / "HeadCT")
    else:
        for cls in os.listdir(data / "MedNIST"):
            for f in os.listdir(data / "MedNIST" / cls):
                os.remove(data / "MedNIST" / cls / f)
    proc = train_bundle(data, tmp_path, check=False, **FAST)
    assert proc.returncode != 0
    expected = "class(es) HeadCT" if damage == "missing_class" else "class(es) AbdomenCT, BreastMRI, CXR"
    assert expected in proc.stderr and "Fix:" in proc.stderr


def _cache(mednist, workers: int, preprocessing: str = "validate#preprocessing", cache_rate: float = 1.0, **overrides):
    """Every synthetic image through train.json's ``preprocessing`` (with ``overrides``), in a ProcessCacheDataset."""
    from monai.bundle import ConfigParser

    from scripts.pipeline import ProcessCacheDataset

    parser = ConfigParser()
    parser.read_config(TRAIN)
    parser.update(overrides)
    transform = parser.get_parsed_content(preprocessing)
    files = sorted(glob.glob(os.path.join(mednist, "MedNIST", "*", "*.jpeg")))
    data = [{"image": f, "label": i % 6} for i, f in enumerate(files)]
    return data, ProcessCacheDataset(data, transform, cache_rate=cache_rate, num_workers=workers, progress=False)


def test_process_filled_cache_equals_in_process_cache(mednist):
    data, one = _cache(mednist, 1)
    _, three = _cache(mednist, 3)
    assert len(three._cache) == len(one._cache) == len(data) == 120
    for a, b, item in zip(one._cache, three._cache, data):
        assert a["label"] == b["label"] == item["label"]
        assert b["image"].shape == (1, 64, 64) and torch.equal(a["image"], b["image"])
        assert b["image"].meta["filename_or_obj"] == item["image"]  # evaluation's report needs the path


@pytest.mark.parametrize("workers", [1, 2])
def test_unreadable_training_image_is_named(workers, mednist, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(mednist, data)
    bad = data / "MedNIST" / "CXR" / "000003.jpeg"
    bad.write_bytes(b"\xff\xd8 truncated")
    proc = train_bundle(data, tmp_path, check=False, cache_num_workers=workers, **FAST)
    assert proc.returncode == 1
    assert f"cannot read {bad}" in proc.stderr and "Fix: replace it with a readable image" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_pack_round_trip_keeps_values_and_metadata(mednist):
    from scripts.pipeline import _pack, _unpack

    _, one = _cache(mednist, 1)
    items = one._cache[:5]
    back = _unpack(_pack(items))
    for a, b in zip(items, back):
        assert a.keys() == b.keys() and a["label"] == b["label"] and torch.equal(a["image"], b["image"])
        assert b["image"].meta["filename_or_obj"] == a["image"].meta["filename_or_obj"]
        assert torch.equal(torch.as_tensor(b["image"].affine), torch.as_tensor(a["image"].affine))
    # items of other shapes or keys go through as they are
    odd = [{"image": items[0]["image"], "label": 0}, {"image": items[1]["image"][:, :32], "label": 1}, {"other": 2}]
    assert [sorted(d) for d in _unpack(_pack(odd))] == [["image", "label"], ["image", "label"], ["other"]]
    mixed = _unpack(_pack(odd[:2]))
    assert mixed[1]["image"].shape == (1, 32, 64) and mixed[1]["label"] == 1


def test_dead_cache_worker_is_reported(mednist):
    from monai.transforms import Lambdad

    from scripts.errors import BundleError
    from scripts.pipeline import ProcessCacheDataset

    data = [{"image": i} for i in range(40)]
    with pytest.raises(BundleError, match="a process building the data cache died") as err:
        ProcessCacheDataset(data, Lambdad("image", lambda x: os._exit(9)), num_workers=2, progress=False)
    assert "--cache_num_workers" in err.value.fix


def test_device_batches_cover_the_cache_once_an_epoch(mednist):
    from scripts.pipeline import DeviceBatches

    _, ds = _cache(mednist, 1)
    images = [item["image"].as_tensor() for item in ds._cache]

    def epoch(loader) -> list[int]:
        """The dataset index of every image the loader yields, in order, checking batch sizes and labels."""
        seen = []
        for batch in loader:
            assert type(batch["image"]) is torch.Tensor and batch["image"].shape[1:] == (1, 64, 64)
            assert batch["label"].dtype == torch.int64 and len(batch["label"]) == len(batch["image"]) <= 16
            for image, label in zip(batch["image"], batch["label"]):
                (index,) = [i for i, im in enumerate(images) if torch.equal(im, image)]
                assert ds._cache[index]["label"] == label
                seen.append(index)
        return seen

    loader = DeviceBatches(ds, batch_size=16, seed=3)
    assert len(loader) == 8  # 120 images: 7 batches of 16 and one of 8
    first, second = epoch(loader), epoch(loader)
    assert sorted(first) == sorted(second) == list(range(120))  # each image once an epoch
    assert first != second and first != list(range(120))  # shuffled, anew each epoch
    assert epoch(DeviceBatches(ds, batch_size=16, seed=3)) == first  # reproducible from the seed
    assert epoch(DeviceBatches(ds, batch_size=16, shuffle=False)) == list(range(120))


def test_device_batches_refuse_items_that_change(mednist):
    from scripts.errors import BundleError
    from scripts.pipeline import DeviceBatches

    # without batch_augment, the per-image random transforms go into the cached dataset's transform
    _, augmented = _cache(mednist, 1, "train#preprocessing", batch_augment=False)
    _, half = _cache(mednist, 1, cache_rate=0.5)
    for ds in (augmented, half):
        with pytest.raises(BundleError, match="needs them all cached and without per-image random") as err:
            next(iter(DeviceBatches(ds, batch_size=8)))
        assert "--device_batches false" in err.value.fix
