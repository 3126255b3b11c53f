"""Training workflow: history, split, early stopping, LR schedule, accumulation and the pipeline variants."""

from __future__ import annotations

import csv
import glob
import json
import math
import os

import pytest
import torch
from monai.networks.nets import DenseNet121
from PIL import Image

from conftest import CALIBRATION, CLASSES, FAST, bundle_error, train


def read_history(output_dir) -> list[dict]:
    with open(os.path.join(output_dir, "history.csv")) as f:
        return list(csv.DictReader(f))


def load_model(path) -> DenseNet121:
    net = DenseNet121(spatial_dims=2, in_channels=1, out_channels=6)
    net.load_state_dict(torch.load(path, weights_only=True))  # strict: every key matches, no "module." prefix
    return net


def test_model_and_checkpoint(trained):
    load_model(trained / "models" / "model.pt")
    ckpt = torch.load(trained / "models" / "checkpoint_epoch=2.pt", weights_only=True)
    assert {"model", "optimizer", "lr_scheduler", "trainer", "early_stop", "best_model", "checkpointer"} <= set(ckpt)
    assert ckpt["trainer"]["iteration"] == 2 * ckpt["trainer"]["epoch_length"]  # saved after epoch 2
    assert ckpt["checkpointer"]["_saved"] == [(2, "checkpoint_epoch=2.pt")]
    assert [name for _, name in ckpt["best_model"]["_saved"]] == ["model.pt"]
    assert sorted(os.listdir(trained / "models")) == [
        ".mednist.lock",
        *CALIBRATION,
        "checkpoint_epoch=2.pt",
        "model.pt",
        "network.json",
        "network_data_format.json",
    ]
    described = json.loads((trained / "models" / "network_data_format.json").read_text())
    assert list(described["outputs"]["pred"]["channel_def"].values()) == list(CLASSES)  # the classes travel with it


def test_history_and_plot(trained):
    rows = read_history(trained / "out")
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for r in rows:
        # the accuracy of 12 validation and of 96 training images (6 batches of 16): whole counts of them
        assert float(r["val_acc"]) * 12 == pytest.approx(round(float(r["val_acc"]) * 12), abs=1e-9)
        assert float(r["train_acc"]) * 96 == pytest.approx(round(float(r["train_acc"]) * 96), abs=1e-9)
        assert float(r["val_loss"]) > 0 and float(r["train_loss"]) > 0
    # 96 images in batches of 16: 6 iterations an epoch, 12 in all, warm-up round(0.05 * 12) = 1 iteration; the
    # rate at each epoch's start: 0.001 after the warm-up step, then 5 of the 11 cosine steps down
    lrs = [float(r["lr"]) for r in rows]
    assert lrs == pytest.approx([0.001, 0.001 * 0.5 * (1 + math.cos(math.pi * 5 / 11))], rel=1e-6)
    best = max(float(r["val_acc"]) for r in rows)
    ckpt = torch.load(trained / "models" / "checkpoint_epoch=2.pt", weights_only=True)
    assert ckpt["best_model"]["_saved"][0][0] == pytest.approx(best)  # model.pt is the best validation accuracy
    with Image.open(trained / "out" / "training_history.png") as im:
        assert im.size[0] > 500 and len(set(im.convert("L").getdata())) > 10
    (run,) = os.listdir(trained / "out" / "tensorboard")  # each run's TensorBoard files in a folder of their own
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(trained / "out" / "tensorboard" / run))


def test_tensorboard_has_one_value_per_step_and_tag(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps, values = {}, {}
    (run,) = glob.glob(str(trained / "out" / "tensorboard" / "*"))
    for name in sorted(os.listdir(run)):
        events = EventAccumulator(os.path.join(run, name))
        events.Reload()
        for tag in events.Tags()["scalars"]:
            steps.setdefault(tag, []).extend(e.step for e in events.Scalars(tag))
            values.setdefault(tag, []).extend(e.value for e in events.Scalars(tag))
    for tag in ("train_loss", "train_acc", "val_loss", "val_acc"):
        assert sorted(steps[tag]) == [1, 2], tag  # one value an epoch
    assert sorted(steps["train_loss_iteration"]) == list(range(1, 13))  # 2 epochs of 6 iterations
    assert sorted(steps["lr"]) == list(range(1, 13)) and max(values["lr"]) == pytest.approx(0.001)


def test_split_is_disjoint_stratified_and_reused(trained, mednist, tmp_path):
    split_file = trained / "out" / "split.json"
    split = json.loads(split_file.read_text())
    sets = {k: {d["image"] for d in split[k]} for k in ("training", "validation", "test")}
    assert not sets["training"] & sets["validation"]
    assert not sets["training"] & sets["test"]
    assert not sets["validation"] & sets["test"]
    assert sum(len(s) for s in sets.values()) == 6 * 20
    for k in ("validation", "test"):  # stratified: 10% of each class's 20 images
        assert sorted(d["label"] for d in split[k]) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    umask = os.umask(0)
    os.umask(umask)
    assert split_file.stat().st_mode & 0o777 == 0o666 & ~umask  # a normal file, not the temp file's 0600
    before = split_file.read_bytes()
    # a second run with the same output_dir reuses exactly that split
    wf = train(mednist, tmp_path, epochs=1, output_dir=trained / "out", **FAST, **{"epoch_length": 1})
    assert split_file.read_bytes() == before
    assert [d["path"] for d in wf.parser.get_parsed_content("train#dataset")] == [
        os.path.join(mednist, "MedNIST", d["image"]) for d in split["training"]
    ]
    # a different fraction with the same output_dir is refused rather than silently re-split
    with bundle_error("split.json was made with"):
        train(mednist, tmp_path, epochs=1, val_frac=0.2, output_dir=trained / "out")


# A learning rate of 1e-30 leaves the weights unchanged in float32, and instance norm keeps no running
# statistics, so the validation loss is exactly flat: a plateau by construction, whatever the hardware.
PLATEAU = {**FAST, "learning_rate": 1e-30, "network_def#norm": "instance", "epoch_length": 1}


def test_early_stopping_ends_run_early(mednist, tmp_path):
    train(mednist, tmp_path, epochs=10, early_stop_patience=2, **PLATEAU)
    rows = read_history(tmp_path / "out")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]  # best at epoch 1, then 2 epochs without improvement
    assert len({r["val_loss"] for r in rows}) == 1
    assert os.path.isfile(tmp_path / "models" / "model.pt")


def test_learning_rate_warms_up_then_follows_a_cosine_to_zero_and_resumes_longer():
    from scripts.training import warmup_cosine

    def rates(scheduler, steps):
        out = []
        for _ in range(steps):
            out.append(scheduler.get_last_lr()[0])
            scheduler.optimizer.step()
            scheduler.step()
        return out

    param = torch.nn.Parameter(torch.zeros(1))
    scheduler = warmup_cosine(torch.optim.SGD([param], lr=0.1), total_steps=100, warmup=0.1)
    lr = rates(scheduler, 101)
    assert lr[:10] == pytest.approx([0.01 * (i + 1) for i in range(10)])  # linear warm-up over 10 steps
    assert lr[55] == pytest.approx(0.05) and lr[100] == pytest.approx(0.0, abs=1e-12)  # half way, then 0
    assert all(a >= b for a, b in zip(lr[9:], lr[10:]))
    # a resumed run with twice the epochs: the step is restored, the length is the new run's
    state = warmup_cosine(torch.optim.SGD([param], lr=0.1), total_steps=100, warmup=0.1)
    rates(state, 50)
    longer = warmup_cosine(torch.optim.SGD([param], lr=0.1), total_steps=200, warmup=0.1)
    longer.load_state_dict(state.state_dict())
    longer.step()  # re-applies the rate of the restored step under the new length, as a resumed epoch does
    assert longer.last_epoch == 51
    ramp = 20
    assert longer.get_last_lr()[0] == pytest.approx(0.05 * (1 + math.cos(math.pi * (51 - ramp) / (200 - ramp))))


def _one_step_weights(mednist, out, batch_size: int, accumulation_steps: int, iterations: int) -> dict:
    train(
        mednist,
        out,
        epochs=1,
        batch_size=batch_size,
        accumulation_steps=accumulation_steps,
        augment="false",
        cpu_bf16="false",
        learning_rate=0.1,
        **{
            "epoch_length": iterations,
            "train#dataloader#shuffle": False,
            "network_def#norm": "instance",
            "optimizer#_target_": "torch.optim.SGD",
        },
    )
    return torch.load(out / "models" / "checkpoint_epoch=1.pt", weights_only=True)["model"]


def test_accumulation_matches_large_batch(mednist, tmp_path):
    """batch 4 x accumulation 2 takes the same optimizer step as batch 8.

    DenseNet's BatchNorm normalises with per-batch statistics, which differ between a batch of 4 and one of 8
    whatever the accumulation does, so these runs swap in instance norm (batch-independent) to isolate the
    accumulation itself. They also use SGD, whose step is proportional to the gradient: Adam's first step is
    about lr * sign(gradient), which turns float rounding of a near-zero gradient into a full step.
    """
    accumulated = _one_step_weights(mednist, tmp_path / "a", 4, 2, iterations=2)
    large = _one_step_weights(mednist, tmp_path / "b", 8, 1, iterations=1)
    two_steps = _one_step_weights(mednist, tmp_path / "c", 4, 1, iterations=2)
    for k in large:
        torch.testing.assert_close(accumulated[k], large[k], rtol=1e-4, atol=1e-5)  # seen: 1.3e-6
    assert any(not torch.allclose(two_steps[k], large[k], rtol=1e-4, atol=1e-5) for k in large)  # seen: 0.37


VARIANTS = {"device_batches": FAST, "per_sample": {"epoch_length": 2}, "quick": {"batch_size": 16, "quick_images": 48}}


@pytest.mark.parametrize("variant, epoch_length", [("device_batches", 6), ("per_sample", 2), ("quick", 3)])
def test_variant_trains(variant, epoch_length, mednist, tmp_path):
    """The override files: device batches (every image once an epoch: 96 in batches of 16), the original
    project's per-sample pipeline (batch 4, two iterations here) and the quick run (one epoch over a stratified
    random subset of the training split at a higher learning rate: 48 of the 96 images here)."""
    overrides = VARIANTS[variant]
    wf = train(mednist, tmp_path, ("train", variant), epochs=1, **overrides)
    (row,) = read_history(tmp_path / "out")
    ckpt = torch.load(tmp_path / "models" / "checkpoint_epoch=1.pt", weights_only=True)
    assert ckpt["best_model"]["_saved"][0][0] == pytest.approx(float(row["val_acc"])) and float(row["train_loss"]) > 0
    assert ckpt["trainer"]["epoch_length"] == epoch_length
    load_model(tmp_path / "models" / "model.pt")
    loader = wf.parser.get_parsed_content("train#trainer").data_loader
    if variant == "per_sample":  # MONAI's per-sample random transforms on each decoded image, batch 4
        assert [type(t).__name__ for t in loader.dataset.transform.transforms[-3:]] == [
            "RandRotated",
            "RandFlipd",
            "RandZoomd",
        ]
        assert loader.batch_size == 4 and wf.parser.get_parsed_content("accumulation_steps") == 2
    elif variant == "quick":
        assert wf.parser.get_parsed_content("learning_rate") == 0.002
        subset = loader.dataset.data
        assert len(subset) == 48 and sorted(d["label"] for d in subset) == sorted(list(range(6)) * 8)
    else:
        assert type(loader).__name__ == "DeviceBatches"


def test_batch_larger_than_the_training_set_is_refused(mednist, tmp_path):
    """Each epoch leaves out its last partial batch (drop_last), so a batch larger than the training set would
    train nothing: refused in one message, before the network is built."""
    with bundle_error("--batch_size 100 is more than the 96 training images") as found:
        train(mednist, tmp_path, epochs=1, batch_size=100)
    assert "--batch_size 96 or less" in found[0].fix and not os.listdir(tmp_path / "models")[1:]
    assert not (tmp_path / "out" / "split.json").exists()  # nothing written for a run refused


def test_a_validation_reaching_the_target_mid_epoch_ends_the_run(mednist, tmp_path):
    """Through train.json's own handlers (ValidationHandler, EarlyStop, history, checkpoints): validating twice an
    epoch of 6 iterations, the first validation, at iteration 3, reaches a target of 1% accuracy; that epoch ends
    there (its history row, checkpoint and model.pt written) and so does the run, of 3 epochs."""
    wf = train(mednist, tmp_path, epochs=3, val_per_epoch=2, target_accuracy=0.01, **FAST)
    trainer = wf.parser.get_parsed_content("train#trainer")
    assert (trainer.state.iteration, trainer.state.epoch) == (3, 1)
    (row,) = read_history(tmp_path / "out")
    assert float(row["val_acc"]) >= 0.01 and os.path.isfile(tmp_path / "models" / "checkpoint_epoch=1.pt")
    assert wf.parser.get_parsed_content("train#handlers#2").reached  # the EarlyStop handler
    summary = wf.parser.get_parsed_content("summary").log()  # the last lines of the run's log, as it printed them
    lines = summary.splitlines()
    assert lines[0] == f"training done: 1 epoch(s), best validation accuracy {float(row['val_acc']):.4f} (epoch 1)"
    model, calibration = (part.split(": ", 1)[1] for part in lines[1].strip().split("; "))
    assert model == str(tmp_path / "models" / "model.pt") and os.path.isfile(model)
    assert calibration == str(tmp_path / "models" / "calibration.json") and os.path.isfile(calibration)
    assert f"{tmp_path / 'out'}/history.csv" in lines[2] and "run evaluating" in lines[3]
