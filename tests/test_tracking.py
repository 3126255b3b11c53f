"""Experiment tracking: MONAI's ``--tracking mlflow`` records params, one value an epoch per metric, and the files."""

from __future__ import annotations

import json
import os

import pytest

from conftest import CONFIGS, FAST, evaluate, train

mlflow = pytest.importorskip("mlflow")


def runs(uri) -> tuple:
    client = mlflow.MlflowClient(uri)
    found = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    return client, sorted(found, key=lambda r: r.info.start_time)


def test_mlflow_records_training_and_evaluation(mednist, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    settings = os.path.join(CONFIGS, "mlflow.json")  # --tracking configs/mlflow.json
    train(mednist, tmp_path, epochs=2, tracking=settings, tracking_uri=uri, **FAST)
    evaluate(tmp_path, tmp_path / "eval", dataset_dir=mednist, tracking=settings, tracking_uri=uri)
    client, (trained, evaluated) = runs(uri)

    assert trained.info.status == evaluated.info.status == "FINISHED"
    params = trained.data.params
    assert (params["epochs"], params["batch_size"], params["learning_rate"]) == ("2", "16", "0.001")
    assert params["dataset_dir"] == str(mednist) and params["zoom_range"] == "[0.9, 1.1]"
    for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
        assert [m.step for m in client.get_metric_history(trained.info.run_id, key)] == [1, 2], key
    with open(tmp_path / "out" / "history.csv") as f:
        rows = f.read().splitlines()
        last = rows[-1].split(",")
    # each epoch's learning rate after its first iteration, with that iteration's loss: warm-up, then decay
    lr = [m.value for m in client.get_metric_history(trained.info.run_id, "lr_group_0")]
    history_lr = [float(r.split(",")[5]) for r in rows[1:]]  # at each epoch's start
    assert len(lr) == 2 and lr[1] < lr[0] <= 0.001 and history_lr[1] >= lr[1] > 0
    assert len(client.get_metric_history(trained.info.run_id, "train_loss_iteration")) == 2
    assert client.get_metric_history(trained.info.run_id, "val_acc")[-1].value == pytest.approx(float(last[4]))
    files = [a.path for a in client.list_artifacts(trained.info.run_id)]
    assert {"model.pt", "history.csv", "training_history.png"} <= set(files)
    assert any(f.startswith("config_") and f.endswith(".json") for f in files)  # the executed config

    metrics = evaluated.data.metrics
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["accuracy"] == pytest.approx(report["accuracy"]) and "val_acc" not in metrics  # the test split
    assert metrics["precision_Hand"] == pytest.approx(report["per_class"]["Hand"]["precision"])
    assert {"recall_CXR", "f1_HeadCT", "roc_auc_macro_avg", "ece_calibrated"} <= set(metrics)
    assert {"metrics.json", "confusion_matrix.png", "predictions.csv"} <= {
        a.path for a in client.list_artifacts(evaluated.info.run_id)
    }
