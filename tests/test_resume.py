"""Checkpoints and resume: a kill at any save loses nothing, a resumed run is checked before any work, and one
run owns its folders."""

from __future__ import annotations

import copy
import csv
import io
import os
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch
from monai.networks.nets import DenseNet121

from conftest import BUNDLE, CALIBRATION, TRAIN, bundle_error, killed_at_rename, train
from scripts.model_file import FORMAT_FILE

RUN = {"batch_size": 16, "accumulation_steps": 1, "learning_rate": 0.001, "early_stop_patience": 10}


def loads_as_densenet(path) -> bool:
    net = DenseNet121(spatial_dims=2, in_channels=1, out_channels=6)
    net.load_state_dict(torch.load(path, weights_only=True))
    return True


# the second model.pt goes through the same SafeDiskSaver path as the checkpoint: one kill point for both
@pytest.mark.parametrize("when, target, nth", [("before", "checkpoint_epoch=2.pt", 1)])
def test_kill_at_a_save_loses_nothing_and_resume_finishes(mednist, tmp_path, when, target, nth):
    out, models = tmp_path / "out", tmp_path / "models"
    args = ["run", "training", "--config_file", TRAIN, "--dataset_dir", mednist, "--output_dir", out]
    short = {**RUN, "epoch_length": 2}  # two iterations an epoch: this is about the saves
    args += ["--ckpt_dir", models, "--epochs", "2"] + [f"--{k}={v}" for k, v in short.items()]
    proc = killed_at_rename(args, when, target, nth)
    assert proc.returncode == -9, proc.stderr[-3000:]  # killed where asked
    files = os.listdir(models)
    temporary = [f for f in files if f.startswith(".tmp-")]
    assert len(temporary) == (1 if when == "before" else 0)  # the complete new file, not yet renamed
    assert loads_as_densenet(models / "model.pt")  # the best model so far is always there
    assert [f for f in files if f.startswith("checkpoint_epoch=")] == ["checkpoint_epoch=1.pt"]  # not removed

    train(mednist, tmp_path, resume="true", epochs=3, **short)  # one epoch more than planned, to see it go on
    assert sorted(os.listdir(models)) == [
        ".mednist.lock",
        *CALIBRATION,
        "checkpoint_epoch=3.pt",
        "model.pt",
        "network.json",
        "network_data_format.json",
    ]  # no leftovers
    assert loads_as_densenet(models / "model.pt")
    with open(out / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3] and all(r["val_acc"] for r in rows)
    ckpt = torch.load(models / "checkpoint_epoch=3.pt", weights_only=True)
    assert ckpt["trainer"]["iteration"] == 3 * ckpt["trainer"]["epoch_length"] == 6
    assert ckpt["settings"] == {"batch_size": 16, "processes": 1}


def test_kill_after_a_rename_then_resume_keeps_the_newest(mednist, tmp_path):
    """Killed right after renaming checkpoint_epoch=2.pt into place: both checkpoints are on disk; the resumed
    run continues from the newer and removes the older."""
    out, models = tmp_path / "out", tmp_path / "models"
    args = ["run", "training", "--config_file", TRAIN, "--dataset_dir", mednist, "--output_dir", out]
    short = {**RUN, "epoch_length": 2}
    args += ["--ckpt_dir", models, "--epochs", "2"] + [f"--{k}={v}" for k, v in short.items()]
    assert killed_at_rename(args, "after", "checkpoint_epoch=2.pt").returncode == -9
    assert {"checkpoint_epoch=1.pt", "checkpoint_epoch=2.pt"} <= set(os.listdir(models))
    train(mednist, tmp_path, resume="true", epochs=3, **short)
    assert sorted(os.listdir(models)) == [
        ".mednist.lock",
        *CALIBRATION,
        "checkpoint_epoch=3.pt",
        "model.pt",
        "network.json",
        FORMAT_FILE,
    ]
    with open(out / "history.csv") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [1, 2, 3]  # resumed from epoch 2, not 1


@pytest.fixture
def resumable(trained, tmp_path):
    """A copy of the shared 2-epoch run (batch size 16), to resume."""
    shutil.copytree(trained, tmp_path, dirs_exist_ok=True)
    return tmp_path


def unchanged(folder) -> dict:
    return {p: os.stat(os.path.join(d, p)).st_mtime_ns for d, _, files in os.walk(folder) for p in files}


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"epochs": 1}, "--epochs 1 is less than the 2 epochs"),
        ({"epochs": 4, "batch_size": 8}, "--batch_size 8 differs from the 16 that"),
    ],
)
def test_resume_that_cannot_work_is_refused_before_any_work(mednist, resumable, overrides, message):
    before = unchanged(resumable)
    with bundle_error(message) as found:
        train(mednist, resumable, resume="true", **{**RUN, **overrides})
    assert found[0].fix and unchanged(resumable) == before


def test_resume_without_model_pt_writes_a_new_one(mednist, resumable):
    os.remove(resumable / "models" / "model.pt")
    train(mednist, resumable, resume="true", epochs=3, **RUN)
    assert loads_as_densenet(resumable / "models" / "model.pt")


def test_resume_without_checkpoint_is_refused_and_writes_nothing(mednist, tmp_path):
    with bundle_error("holds no checkpoint_epoch=N.pt to resume from"):
        train(mednist, tmp_path, resume="true", **RUN)
    assert os.listdir(tmp_path) == []  # no split.json, event files or empty ckpt_dir


def lock_holder(folder) -> subprocess.Popen:
    """Another process holding the run lock of ``folder`` until its stdin closes."""
    return subprocess.Popen(
        [sys.executable, "-c", "import sys; from scripts.files import FolderLock; "
         f"FolderLock([{str(folder)!r}]).acquire(); print('held', flush=True); sys.stdin.read()"],
        cwd=BUNDLE, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip


def test_second_run_in_a_folder_is_refused_until_the_first_dies(mednist, tmp_path):
    holder = lock_holder(tmp_path / "models")
    try:
        assert holder.stdout.readline() == "held\n"
        with bundle_error(f"{tmp_path / 'models'} is in use by another run (process {holder.pid})") as found:
            train(mednist, tmp_path, epochs=1, **RUN)  # same ckpt_dir, its own output_dir is free
        assert "--output_dir" in found[0].fix
    finally:
        holder.kill()
        holder.wait()
    train(mednist, tmp_path, epochs=1, **RUN)  # the killed holder's lock is taken over
    assert (tmp_path / "models" / ".mednist.lock").read_text().strip() == str(os.getpid())


def test_without_fcntl_a_run_goes_on_unlocked_and_touches_no_other_runs_files(tmp_path, monkeypatch, caplog):
    """Where there is no fcntl (Windows) a run is not locked out, with a warning, and leaves the temporary files in
    its folders alone (another run may be writing them); a killed download's leftovers stay too, since
    ``os.kill(pid, 0)``, POSIX's test for a process, ends that process there."""
    from scripts.files import FolderLock, remove_stale

    (tmp_path / ".tmp-123.pt").write_bytes(b"another run's checkpoint, being written")
    monkeypatch.setitem(sys.modules, "fcntl", None)  # import fcntl fails
    lock = FolderLock([str(tmp_path)]).acquire()
    try:
        assert (tmp_path / ".tmp-123.pt").exists() and "one run per folder is not enforced" in caplog.text
        assert (tmp_path / ".mednist.lock").read_text().strip() == str(os.getpid())
    finally:
        lock.release()
    (tmp_path / ".MedNIST-download-999999999-x").mkdir()
    monkeypatch.setattr(os, "name", "nt")
    monkeypatch.setattr(os, "kill", lambda *args: pytest.fail("os.kill would end the process on Windows"))
    assert remove_stale(str(tmp_path), ".MedNIST-download-") == []


def test_a_run_removes_only_the_temporary_files_of_writers_that_are_gone(trained, tmp_path):
    """Taking a folder removes ``.tmp-<pid>-*`` files whose process is gone, never a live writer's (inference's
    clean-up deleted a running export's file); exports and calibration take the folder's lock themselves."""
    from scripts.export import export
    from scripts.files import FolderLock

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    writer = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        dead, live = tmp_path / f".tmp-{gone.stdout.strip()}-a.pt", tmp_path / f".tmp-{writer.pid}-b.pt2"
        for path in (dead, live):
            path.write_bytes(b"partial")
        FolderLock([str(tmp_path)]).acquire().release()
        assert live.exists() and not dead.exists()
    finally:
        writer.kill()
        writer.wait()
    holder = lock_holder(tmp_path)
    try:
        assert holder.stdout.readline() == "held\n"
        with bundle_error(f"{tmp_path} is in use by another run"):
            export("pt2", str(trained / "models" / "model.pt"), str(tmp_path / "model.pt2"))
        assert not (tmp_path / "model.pt2").exists()
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_is_never_taken_through_a_link(tmp_path):
    """A `.mednist.lock` planted as a link (e.g. in a model folder someone sent) is refused, its target untouched;
    the control: opening the path as a plain file would have truncated the target."""
    from scripts.files import FolderLock

    victim = tmp_path / "victim.py"
    victim.write_text("print('mine')\n")
    os.symlink(victim, tmp_path / ".mednist.lock")
    with bundle_error(f"{tmp_path / '.mednist.lock'} is a link or special file"):
        FolderLock([str(tmp_path)]).acquire()
    assert victim.read_text() == "print('mine')\n"
    with open(tmp_path / ".mednist.lock", "a+") as f:  # what the lock did before
        f.truncate(0)
    assert victim.read_text() == ""


def test_a_resume_checkpoint_is_read_as_a_model_file(trained, mednist, tmp_path):
    """--resume reads the newest checkpoint_epoch=N.pt as model.pt is read, before any work: a file of a few hundred
    bytes whose dict key nests tuples 40 deep (torch.load alone never returns on such a key: the control of
    tests/test_model_file.py), the genuine checkpoint padded to 1.28 GB (sparse: its size refuses it before a byte
    is read), one whose optimizer moments are of another shape and one whose trainer's epoch is a text: each
    refused in one line naming it, nothing written."""
    from test_model_file import nested_key

    shutil.copytree(trained / "models", tmp_path / "models")
    shutil.copytree(trained / "out", tmp_path / "out", ignore=shutil.ignore_patterns("tensorboard"))
    checkpoint = tmp_path / "models" / "checkpoint_epoch=2.pt"
    genuine = torch.load(checkpoint, weights_only=True)
    moments, epoch = copy.deepcopy(genuine), copy.deepcopy(genuine)
    moments["optimizer"]["state"][0]["exp_avg"] = torch.zeros(3)
    epoch["trainer"]["epoch"] = "two"
    pickled = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(checkpoint.read_bytes())) as archive:  # the genuine archive, another pickle
        entries = [(i.filename, archive.read(i)) for i in archive.infolist()]
    with zipfile.ZipFile(pickled, "w", zipfile.ZIP_STORED) as archive:
        for name, data in entries:
            archive.writestr(name, nested_key(39) if name.endswith("/data.pkl") else data)
    cases = {"nested": pickled.getvalue(), "moments": moments, "epoch": epoch, "padded": checkpoint.read_bytes()}
    messages = {
        "nested": "a pickled tuple used twice",
        "moments": "holds optimizer state of another shape than its weights",
        "epoch": "holds a trainer state the bundle does not write",
        "padded": "is over",
    }
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()}
    for name, content in cases.items():
        if isinstance(content, dict):
            torch.save(content, checkpoint)
        else:
            checkpoint.write_bytes(content)
        if name == "padded":
            os.truncate(checkpoint, 1_280_000_000)
        with bundle_error(messages[name]) as found:
            train(mednist, tmp_path, resume="true", epochs=3, **RUN)
        assert str(checkpoint) in found[0].problem and "\n" not in found[0].problem, name
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()} == before  # nothing written
