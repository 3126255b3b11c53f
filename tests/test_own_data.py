"""Your images, your classes: class folders of any names, a CSV list, any size, colour, fine-tuning from a model of
the bundle, class weights; the data report; the classes travelling with the model through evaluation, inference,
export and release; and each refusal of data that cannot work, before any file is written."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import CLASSES, FAST, bundle_error, class_image, evaluate, infer, run_workflow, train

OWN = {"CT": 18, "MRI": 12, "Radiograph": 6}  # imbalanced 3:2:1


def write_own(root, counts=OWN, size=(80, 48), seed: int = 0) -> str:
    """``root/<class>/NNN.png`` colour PNGs of another size than MedNIST's, a pattern per class."""
    rng = np.random.default_rng(seed)
    for label, (name, count) in enumerate(counts.items()):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(count):
            gray = Image.fromarray(class_image(label * 2 % 6 + label // 3, rng)).resize(size)
            tint = Image.merge("RGB", (gray, gray.point(lambda v: v * 0.8), gray.point(lambda v: v * 0.6)))
            tint.save(os.path.join(root, name, f"{i:03d}.png"))
    return str(root)


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    """A training on class folders CT/MRI/Radiograph with a planted identical pair, a constant image and an
    unreadable file (skipped on request): its folder and the data's."""
    folder = tmp_path_factory.mktemp("own")
    data = write_own(folder / "data")
    shutil.copy(os.path.join(data, "CT", "000.png"), os.path.join(data, "CT", "copy.png"))
    Image.new("RGB", (80, 48), (90, 90, 90)).save(os.path.join(data, "MRI", "blank.png"))
    with open(os.path.join(data, "Radiograph", "broken.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    train(data, folder, epochs=1, skip_unreadable="true", test_frac=0.2, **FAST)
    return folder, data


def test_class_folders_train_a_model_of_their_classes(own):
    folder, data = own
    described = json.loads((folder / "models" / "network_data_format.json").read_text())
    assert list(described["outputs"]["pred"]["channel_def"].values()) == ["CT", "MRI", "Radiograph"]
    assert described["inputs"]["image"]["num_channels"] == 1 and described["outputs"]["pred"]["num_channels"] == 3
    split = json.loads((folder / "out" / "split.json").read_text())
    assert split["classes"] == ["CT", "MRI", "Radiograph"] and split["source"] == "folders"
    assert torch.load(folder / "models" / "model.pt", weights_only=True)["class_layers.out.weight"].shape == (3, 1024)


def test_the_data_report_names_what_is_wrong_with_the_data(own):
    folder, data = own
    report = json.loads((folder / "out" / "data_report.json").read_text())
    assert report["classes"] == ["CT", "MRI", "Radiograph"]
    counts = report["images"]
    assert sum(n for c in counts.values() for n in c.values()) == 19 + 13 + 7  # the unreadable one listed too
    alike = report["identical_images"]
    assert (alike["groups"], alike["images"], alike["groups_across_splits"]) == (1, 2, 0)  # kept in one part
    split = json.loads((folder / "out" / "split.json").read_text())
    preprocessed = {os.path.basename(d["image"]) for part in ("training", "validation") for d in split[part]}
    assert report["constant_images"]["count"] == ("blank.png" in preprocessed)  # of the images preprocessed
    assert [os.path.basename(u["path"]) for u in report["unreadable"]] == ["broken.png"] * (
        "broken.png" in preprocessed
    )
    assert report["imbalance"]["largest_to_smallest"] >= 2.5
    assert list(report["kinds"]) == ["PNG RGB"] and report["sizes"] == {"80x48": report["preprocessed_images"]}


def test_the_classes_travel_through_evaluation_inference_export_and_release(own, tmp_path):
    from scripts.export import export
    from tools.release import release

    folder, data = own
    evaluate(folder, tmp_path / "eval", dataset_dir=data, skip_unreadable="true", test_frac=0.2)
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert list(metrics["per_class"]) == ["CT", "MRI", "Radiograph"]
    assert metrics["balanced_accuracy"] == pytest.approx(metrics["macro_avg"]["recall"])
    assert "f1" in metrics["macro_avg"]
    infer(folder, tmp_path / "inf", os.path.join(data, "MRI"))
    with open(tmp_path / "inf" / "predictions.csv") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames[4:7] == ["CT", "MRI", "Radiograph"]
        rows = list(reader)
    assert {r["label"] for r in rows if not r["error"]} <= {"CT", "MRI", "Radiograph"}
    exported = export("pt2", str(folder / "models" / "model.pt"), str(tmp_path / "exported" / "model.pt2"))
    assert (tmp_path / "exported" / "network_data_format.json").exists()  # the description travels with it
    infer(folder, tmp_path / "inf-pt2", os.path.join(data, "MRI"), model_file=exported)
    with open(tmp_path / "inf-pt2" / "predictions.csv") as f:
        assert csv.DictReader(f).fieldnames[4:7] == ["CT", "MRI", "Radiograph"]
    release(str(folder / "models"), str(tmp_path / "dist"))
    (zipped,) = os.listdir(tmp_path / "dist")
    with zipfile.ZipFile(tmp_path / "dist" / zipped) as z:
        metadata = json.loads(z.read("mednist_classification/configs/metadata.json"))
        assert "mednist_classification/models/network_data_format.json" in z.namelist()
    assert list(metadata["network_data_format"]["outputs"]["pred"]["channel_def"].values()) == [
        "CT",
        "MRI",
        "Radiograph",
    ]
    assert "3 classes (CT, MRI, Radiograph)" in metadata["task"] and "0: CT" in metadata["label_classes"]
    with bundle_error("has folder(s) that are not the model's classes"):  # data of other classes: refused
        evaluate(folder, tmp_path / "other", dataset_dir=data, eval_dir=os.path.dirname(data), test_frac=0.2)


def test_a_csv_list_with_its_own_split(tmp_path):
    data = write_own(tmp_path / "images", {"benign": 8, "malignant": 8})
    rows = [("image", "label", "split")]
    for name in ("benign", "malignant"):
        files = sorted(os.listdir(os.path.join(data, name)))
        rows += [
            (f"images/{name}/{f}", name, "training" if i < 5 else "validation" if i < 7 else "test")
            for i, f in enumerate(files)
        ]
    with open(tmp_path / "list.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    wf = train(None, tmp_path, datalist=tmp_path / "list.csv", epochs=1, batch_size=4, learning_rate=0.001)
    split = json.loads((tmp_path / "out" / "split.json").read_text())
    assert split["given"] and split["classes"] == ["benign", "malignant"] and len(split["test"]) == 2
    assert wf.parser.get_parsed_content("split")["test"][0]["image"] == str(tmp_path / "images" / "benign" / "007.png")


@pytest.mark.parametrize(
    "rows, message",
    [
        ([("images/CT/000.png", "CT"), ("images/CT/nope.png", "MRI")], "names 1 file(s) that do not exist"),
        ([("images/CT/000.png", "CT", "train"), ("images/CT/001.png", "MRI", "test")], "split 'train' is not"),
        ([("images/CT/000.png", "CT"), ("images/CT/001.png", "")], "an empty label"),
        ([("images/CT/000.png", "CT"), ("images/CT/001.png", "=cmd")], "has the class name '=cmd'"),
        ([("images/CT/000.png", "CT"), ("images/CT/001.png", "CT")], "names 1 classes"),
        ([("images/CT/000.png", "CT"), ("/proc/self/mem", "MRI")], "/proc/self/mem, which is 0 bytes, not an image"),
        ([("images/CT/000.png", "CT"), ("sparse.png", "MRI")], "sparse.png, which is 68,719,476,736 bytes"),
        ([("images/CT/000.png", "path"), ("images/CT/001.png", "error")], "has the class name 'error', a column"),
    ],
)
def test_a_csv_that_cannot_work_is_refused_in_one_line_before_any_file(rows, message, tmp_path):
    """Each bad row, a listed /proc file (its size unknown, 0) or a sparse file of 64 GiB (never read), class names
    that are columns of predictions.csv: refused in one line, before any file is written."""
    write_own(tmp_path / "images", {"CT": 2})
    with open(tmp_path / "sparse.png", "wb") as f:
        f.truncate(64 << 30)
    header = ("image", "label", "split") if len(rows[0]) == 3 else ("image", "label")
    with open(tmp_path / "list.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    with bundle_error(message) as found:
        run_workflow(
            ("train",), "training", datalist=tmp_path / "list.csv", output_dir=tmp_path / "out", ckpt_dir=tmp_path / "m"
        )
    assert "\n" not in found[0].problem and not (tmp_path / "out").exists() and not (tmp_path / "m").exists()


def test_folders_that_cannot_train_are_refused_before_any_file(tmp_path):
    """One class, classes named like columns of predictions.csv (which would overwrite them): refused before any
    file; a class too small for the split: before the split is written."""
    data = write_own(tmp_path / "one", {"CT": 6})
    with bundle_error("has 1 class folder(s): CT"):
        run_workflow(("train",), "training", dataset_dir=data, output_dir=tmp_path / "out", ckpt_dir=tmp_path / "m")
    assert not (tmp_path / "m").exists() and not (tmp_path / "out").exists()
    data = write_own(tmp_path / "columns", {"error": 10, "path": 10})
    with bundle_error("has the class name 'error', a column of predictions.csv") as found:
        run_workflow(("train",), "training", dataset_dir=data, output_dir=tmp_path / "out", ckpt_dir=tmp_path / "m")
    assert "error_class" in found[0].fix and not (tmp_path / "out").exists()
    data = write_own(tmp_path / "small", {"CT": 20, "MRI": 2})
    with bundle_error("class MRI has 2 image(s): the test set would have none of it") as found:
        run_workflow(("train",), "training", dataset_dir=data, output_dir=tmp_path / "out", ckpt_dir=tmp_path / "m")
    assert "add images of MRI (training, validation and test need one each)" in found[0].fix  # no fraction helps
    assert "val_frac" not in found[0].fix and os.listdir(tmp_path / "out") == [".mednist.lock"]


def test_colour_training_fine_tuned_from_a_model_of_other_classes_and_channels(own, tmp_path, capsys):
    """--in_channels 3 trains in RGB; --pretrained loads every weight of a 1-channel 3-class model that fits (all
    but the first convolution), logs what it loaded, and trains those at --pretrained_lr_factor the rate."""
    folder, _ = own
    data = write_own(tmp_path / "data", {"a": 10, "b": 10, "c": 10, "d": 10})
    wf = train(data, tmp_path, epochs=1, in_channels=3, pretrained=folder / "models" / "model.pt",
               pretrained_lr_factor=0.1, class_weights="balanced", **FAST)  # fmt: skip
    logged = capsys.readouterr().out
    assert "724 of 727 tensors loaded" in logged and "started afresh: class_layers.out, features.conv0" in logged
    groups = wf.parser.get_parsed_content("optimizer").param_groups
    assert [g["initial_lr"] for g in groups] == pytest.approx([0.0001, 0.001])
    network = dict(wf.parser.get_parsed_content("network").named_parameters())
    assert all(network["features.conv0.weight"] is not p for p in groups[0]["params"])  # started afresh
    described = json.loads((tmp_path / "models" / "network_data_format.json").read_text())
    assert described["inputs"]["image"]["num_channels"] == 3
    assert torch.load(tmp_path / "models" / "model.pt", weights_only=True)["features.conv0.weight"].shape[1] == 3
    with bundle_error("this run's data and"):  # a resumed run's data must be the model's
        train(write_own(tmp_path / "other", {"x": 10, "y": 10}), tmp_path, epochs=2, resume="true", **FAST)


def test_balanced_class_weights_weigh_each_class_alike():
    from scripts.training import class_weights

    weights = class_weights("balanced", [0] * 30 + [1] * 10, 2)
    assert weights.tolist() == pytest.approx([40 / (2 * 30), 40 / (2 * 10)])
    assert class_weights("none", [0, 1], 2) is None


def digests(folder) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_the_readme_sequence_mednist_then_own_images_then_fine_tuning_loses_nothing(
    mednist, trained, exported, tmp_path
):
    """The README's order: a MedNIST model (with its export) in models/; your own images trained with the same
    folders are refused before any file is touched, naming both; in their own folders they train, and so does
    fine-tuning from the MedNIST model; the MedNIST files never change. Training again on the same kind of data
    replaces the model and removes the export made from the weights it replaced; a stale export is refused with
    're-export'."""
    bundle = tmp_path / "bundle"
    shutil.copytree(trained / "models", bundle / "models")
    shutil.copytree(trained / "out", bundle / "out", ignore=shutil.ignore_patterns("tensorboard"))
    shutil.copy(exported / "model.ts", bundle / "models" / "model.ts")
    mednist_files = digests(bundle / "models")
    scans = write_own(tmp_path / "scans", {"CT": 10, "MRI": 10, "Radiograph": 10})
    out_files = digests(bundle / "out")

    with bundle_error("--ckpt_dir") as refused:  # the README's fix before: another --output_dir, models replaced
        train(scans, bundle, output_dir=tmp_path / "new_out", epochs=1, **FAST)
    assert "classes CT, MRI, Radiograph against AbdomenCT" in str(refused[0]) and "--output_dir" in str(refused[0])
    assert digests(bundle / "models") == mednist_files and not (tmp_path / "new_out").exists()
    assert digests(bundle / "out") == out_files

    own_run, tuned = tmp_path / "scans_run", tmp_path / "tuned_run"
    train(scans, own_run, epochs=1, **FAST)
    train(scans, tuned, epochs=1, pretrained=bundle / "models" / "model.pt", pretrained_lr_factor=0.1, **FAST)
    assert digests(bundle / "models") == mednist_files
    hand = os.path.join(mednist, "MedNIST", "Hand", "000000.jpeg")
    infer(bundle, tmp_path / "ts", hand, model_file=bundle / "models" / "model.ts")  # the MedNIST export still loads
    with open(tmp_path / "ts" / "predictions.csv") as f:
        assert next(csv.DictReader(f))["label"] in CLASSES

    shutil.copy(exported / "model.ts", own_run / "models" / "model.ts")  # stale: the MedNIST model's export
    with bundle_error("re-export"):
        infer(own_run, tmp_path / "stale", scans, model_file=own_run / "models" / "model.ts")
    before = (own_run / "models" / "calibration.json").read_text()
    train(scans, own_run, epochs=1, **{**FAST, "learning_rate": 0.002})  # the same kind of model again: replaced
    assert not (own_run / "models" / "model.ts").exists()
    assert (own_run / "models" / "calibration.json").read_text() != before  # fitted again for the new weights
    infer(own_run, tmp_path / "again", scans)
