"""Every file the bundle reads, through a table of hostile contents: bytes that are not UTF-8, JSON nested
100,000 deep, numbers of 5,000 digits, a 400-digit number or a text where a number belongs, a device and a /proc
file in its place. Each is refused by one ``BundleError`` of one line (its problem and its fix), never a traceback
or another exception, before anything is written."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from conftest import CLASSES

DEVICES = {"a device": "/dev/zero", "a /proc file that fails to read": "/proc/self/mem"}
BYTES = {"not UTF-8": b"\xff\xfe\x00 not text", "nested 100,000 deep": b"[" * 100_000, "5,000 digits": b"9" * 5000}


def model_folder(trained, tmp_path):
    shutil.copytree(trained / "models", tmp_path / "models", ignore=shutil.ignore_patterns("checkpoint*", ".*"))
    return tmp_path / "models"


def description(path):
    from scripts.model_file import ModelDescription

    described = ModelDescription.beside(str(path.parent / "model.pt"))
    described.network()
    described.batch_limit(str(path))


def calibration(path):
    from scripts.calibration import Calibration

    Calibration.load(str(path), 6, 1024)


def split(path):
    from scripts.data import ImageData

    ImageData(str(path.parent / "data"), str(path)).saved_split(list(CLASSES))


def datalist(path):
    from scripts.data import ImageData

    ImageData("", "", datalist=str(path))


def input_list(path):
    from scripts.inputs import find_inputs

    find_inputs(input_list=str(path))


def predictions(path):
    from scripts.predictions import skip_done

    skip_done([{"image": "a.png", "path": "a.png"}], str(path.parent), CLASSES, resume=True)


def checkpoint(path):
    from scripts.model_file import read_checkpoint

    read_checkpoint(str(path), 32 << 20)


def model(path):
    from scripts.model_file import load_model

    load_model(str(path))


def json_text(value) -> bytes:
    return json.dumps(value).encode()


FILES = {  # the file's name, how the bundle reads it, contents of its own kind that make no sense
    "network_data_format.json": (
        description,
        {
            "channels 1.0": lambda d: d["inputs"]["image"].update(num_channels=1.0),
            "a 400-digit size": lambda d: d["inputs"]["image"].update(spatial_shape=[10**400, 64]),
            "a class named like a column": lambda d: d["outputs"]["pred"]["channel_def"].update({"0": "label"}),
            "a size inference cannot hold": lambda d: d["inputs"]["image"].update(spatial_shape=[4096, 4096]),
        },
    ),
    "network.json": (
        description,
        {
            "a layer name that is a number": lambda d: d.update(feature_layer=5),
            "an expression as its target": lambda d: d["network_def"].update(_target_="$os.system"),
            "a 400-digit argument": lambda d: d["network_def"].update(growth_rate=10**400),
            "a text where a number belongs": lambda d: d["network_def"].update(out_channels="six"),
        },
    ),
    "calibration.json": (
        calibration,
        {
            "a 400-digit threshold": lambda d: d.update(energy_threshold=10**400),
            "a text count": lambda d: d.update(threshold_images="many"),
            "no weights' hash": lambda d: d.update(weights_sha256=7),
        },
    ),
    "split.json": (
        split,
        {
            "a text label": lambda d: d["training"][0].update(label="0"),
            "a label past the classes": lambda d: d["training"][0].update(label=10**400),
            "a part that is not a list": lambda d: d.update(test=5),
        },
    ),
    "datalist.csv": (datalist, {"a cell of 200 KB": b"image,label\n" + b"a" * 200_000 + b".png,CT\n"}),
    "input_list.txt": (input_list, {"a line of 200 KB": b"a" * 200_000 + b".png\n"}),
    "predictions.csv": (predictions, {}),
    "checkpoint_epoch=1.pt": (checkpoint, {"a zip of text": b"PK\x03\x04 not an archive"}),
    "model.pt": (model, {}),
}
CASES = [
    (name, label, hostile)
    for name, (_, hostile_of_its_kind) in FILES.items()
    for label, hostile in {**BYTES, **DEVICES, **hostile_of_its_kind}.items()
]


@pytest.mark.parametrize("name, label, hostile", CASES, ids=[f"{n}: {label}" for n, label, _ in CASES])
def test_every_file_the_bundle_reads_refuses_a_hostile_content_in_one_line(trained, tmp_path, name, label, hostile):
    from scripts.errors import BundleError

    folder = model_folder(trained, tmp_path)
    (tmp_path / "out").mkdir()
    shutil.copy(trained / "out" / "split.json", tmp_path / "out" / "split.json")
    path = (
        folder
        if name in ("network_data_format.json", "network.json", "calibration.json", "model.pt")
        else tmp_path / "out"
    ) / name
    if callable(hostile):  # the genuine file, one value changed
        genuine = json.loads(path.read_text())
        hostile(genuine)
        path.write_bytes(json.dumps(genuine).encode())
    elif isinstance(hostile, str):  # a device or /proc file in its place
        if path.exists():
            path.unlink()
        os.symlink(hostile, path)
    else:
        path.write_bytes(hostile)
    before = sorted(os.listdir(tmp_path / "out")) + sorted(os.listdir(folder))
    with pytest.raises(BundleError) as found:
        FILES[name][0](path)
    assert "\n" not in found.value.problem and "\n" not in found.value.fix, (label, str(found.value))
    assert str(found.value).count("\n") == 1 and str(path) in str(found.value) or name == "network.json", str(
        found.value
    )
    assert sorted(os.listdir(tmp_path / "out")) + sorted(os.listdir(folder)) == before  # nothing written
