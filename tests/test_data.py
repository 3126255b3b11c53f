"""Dataset preparation: download with checksum, the message for each bad dataset folder, and the preprocessing
into memory (worker processes, device batches)."""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import time

import pytest
import torch

from conftest import BUNDLE, bundle_error, train, write_mednist
from scripts.data import MEDNIST as CLASSES
from scripts.data import SPLITS, ImageData, file_hash, split_by_content

FAST = {"epochs": 1, "batch_size": 16, "accumulation_steps": 1, "epoch_length": 1}


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
    train(tmp_path / "data", tmp_path, download_url=url, download_md5=md5, **FAST)
    assert len(os.listdir(tmp_path / "data" / "MedNIST" / "Hand")) == 10
    assert os.path.isfile(tmp_path / "models" / "model.pt")
    # nothing of the extraction is left behind
    assert sorted(os.listdir(tmp_path / "data")) == ["MedNIST", "MedNIST.tar.gz"]


def test_download_with_wrong_md5_is_refused(served_tarball, tmp_path):
    url, _ = served_tarball
    with bundle_error(f"could not download MedNIST from {url}") as found:
        train(tmp_path / "data", tmp_path, download_url=url, download_md5="0" * 32, **FAST)
    assert "by hand" in found[0].fix
    assert not os.path.exists(tmp_path / "data" / "MedNIST")


@pytest.fixture
def stalled_server(served_tarball, http_server):
    """A server that sends the first half of the served tarball, then stalls until the test ends: its URL."""
    import http.server
    import threading

    data = (http_server[0] / "MedNIST.tar.gz").read_bytes()
    release = threading.Event()

    class Stall(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            release.wait(120)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Stall)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/MedNIST.tar.gz"
    release.set()
    server.shutdown()


def _files_under(folder) -> list[str]:
    return [os.path.join(d, f) for d, _, files in os.walk(folder) for f in files]


def _killed_mid_transfer(code: str, folder, tmpdir) -> None:
    """Run ``code`` in a process whose TMPDIR is ``tmpdir``; SIGKILL it once a partial download (a file of some
    bytes) exists under ``folder``."""
    child = subprocess.Popen([sys.executable, "-c", code], cwd=BUNDLE, env={**os.environ, "TMPDIR": str(tmpdir)})
    deadline = time.monotonic() + 120
    while not any(os.path.isfile(f) and os.stat(f).st_size for f in _files_under(folder)):
        assert child.poll() is None and time.monotonic() < deadline, "the download did not start"
        time.sleep(0.05)
    child.kill()
    child.wait()


def test_download_killed_mid_transfer_leaves_nothing_outside_dataset_dir(stalled_server, served_tarball, tmp_path):
    """Killed while MedNIST downloads, the bundle leaves its partial file in a .MedNIST-download-* entry of
    dataset_dir (nothing in $TMPDIR), which the next run removes; MONAI's download_url alone, the control, leaves
    it in $TMPDIR, where nothing removes it."""
    data, tmpdir = tmp_path / "data", tmp_path / "tmp"
    os.makedirs(data)
    os.makedirs(tmpdir)
    url, md5 = served_tarball
    prepare = (
        f"from scripts.data import prepare_mednist; prepare_mednist({str(data)!r}, True, {stalled_server!r}, {md5!r})"
    )
    _killed_mid_transfer(prepare, data, tmpdir)
    assert os.listdir(tmpdir) == []
    assert [f.startswith(".MedNIST-download-") for f in os.listdir(data)] == [True]
    from scripts.data import prepare_mednist

    prepare_mednist(str(data), True, url, md5)
    assert sorted(os.listdir(data)) == ["MedNIST", "MedNIST.tar.gz"]  # the leftover is gone

    control = f"from monai.apps import download_url; download_url({stalled_server!r}, {str(tmp_path / 'x.tar.gz')!r})"
    _killed_mid_transfer(control, tmpdir, tmpdir)
    assert os.listdir(tmpdir) != []  # what the bundle's staging prevents


def test_offline_download_names_url_and_manual_fix(tmp_path):
    url = "http://127.0.0.1:9/MedNIST.tar.gz"  # the discard port: connection refused
    with bundle_error(f"could not download MedNIST from {url}") as found:
        train(tmp_path, tmp_path, download_url=url, **FAST)
    assert f"put it at {tmp_path}/MedNIST.tar.gz" in found[0].fix
    assert not os.path.exists(tmp_path / "MedNIST")


def test_no_data_and_download_disabled(tmp_path):
    with bundle_error("download is false"):
        train(tmp_path, tmp_path, download="false", **FAST)


def test_corrupt_tarball_in_place_is_refused(tmp_path):
    (tmp_path / "MedNIST.tar.gz").write_bytes(b"not a tarball")
    with bundle_error("does not match MD5") as found:
        train(tmp_path, tmp_path, download="false", **FAST)
    assert "delete it" in found[0].fix


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
    expected = "class(es) HeadCT" if damage == "missing_class" else "class(es) AbdomenCT, BreastMRI, CXR"
    with bundle_error(expected):
        train(data, tmp_path, **FAST)


def test_split_naming_images_that_are_gone_is_refused(mednist, tmp_path):
    from scripts.data import eval_datalist

    data, split_file = tmp_path / "data", str(tmp_path / "split.json")
    shutil.copytree(mednist, data)
    images = ImageData(str(data), split_file, 0.2, 0.2, seed=0, download=False)
    with bundle_error("no data split at"):  # evaluation before any training
        eval_datalist(None, images, list(CLASSES))
    lists = images.prepare()
    assert eval_datalist(None, images, list(CLASSES)) == lists["test"]
    gone = lists["validation"][3]["image"]
    os.remove(gone)
    with bundle_error(f"1 image(s) named in {split_file} are not under {data}/MedNIST, e.g. {gone}.") as found:
        ImageData(str(data), split_file, 0.2, 0.2, seed=0, download=False).prepare()
    assert "choose another --output_dir" in found[0].fix
    elsewhere = ImageData(str(tmp_path / "elsewhere" / "MedNIST"), split_file, 0.2, 0.2, seed=0)
    with bundle_error(f"24 image(s) named in {split_file} are not under {tmp_path}/elsewhere/MedNIST") as found:
        eval_datalist(None, elsewhere, list(CLASSES))
    assert "pass the --dataset_dir (or --datalist) the split was made from" in found[0].fix


def test_dataset_dir_may_be_the_class_folders_parent(mednist, tmp_path):
    """``--dataset_dir data/MedNIST`` (the extracted folder itself) finds the images, downloading nothing."""
    nested, direct = (ImageData(d, str(tmp_path / f"{i}.json"), 0.2, 0.2, seed=0, download=False).prepare()
                      for i, d in enumerate((mednist, os.path.join(mednist, "MedNIST"))))  # fmt: skip
    assert nested == direct and len(direct["training"]) == 72
    assert sorted(os.listdir(mednist)) == ["MedNIST"]


def _preload(mednist, workers: int, **kwargs):
    """Every synthetic image through the bundle's preprocessing, preloaded by ``workers`` processes."""
    from conftest import parser
    from scripts.cache import CachedDataset

    files = sorted(glob.glob(os.path.join(mednist, "MedNIST", "*", "*.jpeg")))
    data = [{"image": f, "label": i % 6} for i, f in enumerate(files)]
    preprocessing = parser(("train",)).get_parsed_content("train#preprocessing")
    return data, CachedDataset(data, preprocessing, workers, **kwargs).build()


def test_preload_in_processes_equals_in_process(mednist):
    data, one = _preload(mednist, 1)
    _, three = _preload(mednist, 3, chunk_size=7)  # chunks that do not divide the data
    assert len(three) == len(one) == len(data) == 120
    for a, b, item in zip(one, three, data):
        assert a["label"] == b["label"] == item["label"] and a["path"] == b["path"] == item["image"]
        assert type(b["image"]) is torch.Tensor and b["image"].shape == (1, 64, 64)
        assert torch.equal(a["image"], b["image"]) and 0 <= b["image"].min() < b["image"].max() <= 1


@pytest.mark.parametrize("workers", [1, 2])
def test_every_unreadable_image_is_named_then_skipped_on_request(workers, mednist, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(mednist, data)
    names = [f"CXR/{i:06d}.jpeg" for i in range(20)]
    items = [
        {"image": f"{c}/{f}", "label": i}
        for i, c in enumerate(CLASSES)
        for f in sorted(os.listdir(data / "MedNIST" / c))
    ]
    split = split_by_content(items, [file_hash(data / "MedNIST" / d["image"]) for d in items], 0.1, 0.1, 0)
    kept = {d["image"] for part in ("training", "validation") for d in split[part]}
    in_split = {part: [n for n in names if n in {d["image"] for d in split[part]}] for part in SPLITS}
    bad = in_split["training"][:2] + in_split["validation"][:1]  # in both sets the run preprocesses
    for name in bad:
        (data / "MedNIST" / name).write_bytes(b"\xff\xd8 truncated")
    with bundle_error("cannot read 3 image(s)") as found:
        train(data, tmp_path, cache_num_workers=workers, **FAST)
    assert all(str(data / "MedNIST" / name) in str(found[0]) for name in bad)  # every one, in one message
    assert "--skip_unreadable true" in found[0].fix
    assert os.listdir(tmp_path / "models") == [".mednist.lock"]  # no model or checkpoint written

    wf = train(data, tmp_path, cache_num_workers=workers, skip_unreadable=True, **FAST)
    cached = [list(wf.parser.get_parsed_content(f"{part}#dataset")) for part in ("train", "validate")]
    assert sum(map(len, cached)) == len(kept) - 3
    assert not {str(data / "MedNIST" / n) for n in bad} & {d["path"] for v in cached for d in v}


def test_dead_worker_is_reported():
    from monai.transforms import Lambdad

    from scripts.cache import CachedDataset

    data = [{"image": i} for i in range(40)]
    with bundle_error("a process preprocessing the images died") as found:
        CachedDataset(data, Lambdad("image", lambda x: os._exit(9)), num_workers=2, chunk_size=4).build()
    assert "--cache_num_workers" in found[0].fix


def test_device_batches_hold_whole_batches_of_distinct_images_reshuffled_each_epoch(mednist):
    from scripts.cache import DeviceBatches

    _, items = _preload(mednist, 1)
    images = [item["image"] for item in items]

    def epoch(loader) -> list[int]:
        """The data index of every image the loader yields, in order, checking batch sizes and labels."""
        seen = []
        for batch in loader:
            assert type(batch["image"]) is torch.Tensor and batch["image"].shape[1:] == (1, 64, 64)
            assert batch["label"].dtype == torch.int64 and len(batch["label"]) == len(batch["image"]) == 16
            for image, label in zip(batch["image"], batch["label"]):
                (index,) = [i for i, im in enumerate(images) if torch.equal(im, image)]
                assert items[index]["label"] == label
                seen.append(index)
        return seen

    loader = DeviceBatches(items, batch_size=16, seed=3)
    assert len(loader) == 7  # 120 images: 7 batches of 16, the last 8 images left out
    first, second = epoch(loader), epoch(loader)
    assert len(first) == len(set(first)) == len(second) == len(set(second)) == 112  # each image at most once
    assert set(first) != set(second) and first != list(range(112))  # shuffled, anew each epoch
    assert epoch(DeviceBatches(items, batch_size=16, seed=3)) == first  # reproducible from the seed
    assert epoch(DeviceBatches(items, batch_size=16, shuffle=False)) == list(range(112))


def _process_gone(pid: int) -> bool:
    """No such process, or a zombie waiting for a parent to collect its exit status."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="worker processes are forked on Linux only")
def test_cache_workers_die_with_their_parent(tmp_path):
    script = f"""
import os, sys, time
sys.path.insert(0, {BUNDLE!r})
from scripts.cache import CachedDataset

def block(item):  # each worker reports its process id, then works forever
    open(os.path.join({str(tmp_path)!r}, str(os.getpid())), "w").close()
    time.sleep(600)

CachedDataset([{{"image": i}} for i in range(8)], block, num_workers=2, chunk_size=1).build()
"""
    parent = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 120
    while len(os.listdir(tmp_path)) < 2 and parent.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    workers = [int(p) for p in os.listdir(tmp_path)]
    assert len(workers) == 2 and parent.poll() is None
    parent.kill()  # SIGKILL: no clean-up code of the parent runs
    parent.wait()
    deadline = time.monotonic() + 2
    while not all(map(_process_gone, workers)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(map(_process_gone, workers))


def test_killed_extraction_is_cleaned_by_the_next_run(tmp_path):
    src = write_mednist(str(tmp_path / "src"), per_class=3)
    data = tmp_path / "data"
    data.mkdir()
    with tarfile.open(data / "MedNIST.tar.gz", "w:gz") as tar:
        tar.add(os.path.join(src, "MedNIST"), arcname="MedNIST")
    md5 = hashlib.md5((data / "MedNIST.tar.gz").read_bytes()).hexdigest()
    script = f"""
import os, signal, sys
sys.path.insert(0, {BUNDLE!r})
import scripts.data as d
real = d.extractall
def extract_then_die(*args, **kwargs):
    real(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
d.extractall = extract_then_die
d.prepare_mednist({str(data)!r}, False, "", {md5!r})
"""
    assert subprocess.run([sys.executable, "-c", script]).returncode == -9
    left = glob.glob(str(data / ".MedNIST-extract-*"))
    assert len(left) == 1 and not (data / "MedNIST").exists()

    from scripts.data import prepare_mednist

    root = prepare_mednist(str(data), False, "", md5)
    assert sorted(os.listdir(data)) == ["MedNIST", "MedNIST.tar.gz"]  # the leftover is gone
    assert all(len(os.listdir(os.path.join(root, c))) == 3 for c in CLASSES)


@pytest.mark.parametrize("per_class", [3, 13, 25])  # 3 and 13: MONAI alone leaves images out
def test_the_split_keeps_every_image_once(per_class):
    """MONAI's partition_dataset_classes rounds each part on its own and can leave an image out (one of MedNIST's
    AbdomenCT, seen on the development copy) or a small class out of a part; every image lands in exactly one
    part, MONAI's cut kept, each class in each part."""
    from monai.data import partition_dataset_classes

    items = [{"image": f"c{c}/{i:05d}", "label": c} for c in range(2) for i in range(per_class + c)]
    hashes = [d["image"] for d in items]  # all distinct
    split = split_by_content(items, hashes, 0.1, 0.1, 0)
    placed = [d["image"] for part in SPLITS for d in split[part]]
    assert sorted(placed) == sorted(hashes)  # none lost, none twice
    monai_parts = partition_dataset_classes(items, [d["label"] for d in items], [0.8, 0.1, 0.1], shuffle=True, seed=0)
    for name, part in zip(SPLITS[1:], monai_parts[1:]):  # validation and test: MONAI's cut, kept
        assert {d["image"] for d in part} <= {d["image"] for d in split[name]}
        assert {d["label"] for d in split[name]} == {0, 1}  # and each class in each part
