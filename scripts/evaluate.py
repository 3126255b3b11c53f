"""Evaluation report: metrics.json, confusion matrix (CSV and PNG), predictions.csv and a printed table.

The figures are the evaluator's metrics, declared in configs/evaluate.json (ignite's ``Accuracy``,
``ConfusionMatrix``, ``Precision``, ``Recall`` and ``Fbeta``), and MONAI's ``compute_roc_auc`` on the collected
probabilities; this module writes them out.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import warnings

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.metrics import compute_roc_auc
from monai.networks import one_hot

from .calibration import Calibration, FeatureHook, calibration_figures
from .data import CLASSES
from .utils import BundleError, atomic_write, pyplot, save_figure

logger = logging.getLogger(__name__)


def classification_metrics(metrics: dict, probs: torch.Tensor, labels: torch.Tensor, accuracy_key="val_acc") -> dict:
    """metrics.json's content: accuracy, per-class precision/recall/F1 and support (the evaluator's metrics),
    per-class ROC AUC (MONAI's ``compute_roc_auc`` on ``probs`` and ``labels``), their macro and support-weighted
    averages (classes without images left out), and the confusion matrix."""
    cm = np.asarray(torch.as_tensor(metrics["confusion_matrix"]).cpu(), dtype=np.int64)
    support = cm.sum(1)
    figures = {k: np.asarray(torch.as_tensor(metrics[k]).cpu(), dtype=float) for k in ("precision", "recall", "f1")}
    onehot = one_hot(labels.view(-1, 1), len(CLASSES), dim=1)
    with warnings.catch_warnings():  # a class absent from the labels has no ROC AUC: NaN, written as null
        warnings.simplefilter("ignore")
        figures["roc_auc"] = np.asarray(compute_roc_auc(probs, onehot, average="none"), dtype=float).reshape(-1)
    per_class = {
        cls: {**{k: float(v[i]) for k, v in figures.items()}, "support": int(support[i])}
        for i, cls in enumerate(CLASSES)
    }
    macro, weighted = {}, {}
    for name, values in figures.items():
        ok = ~np.isnan(values) & (support > 0)
        macro[name] = float(values[ok].mean()) if ok.any() else float("nan")
        weighted[name] = float(np.average(values[ok], weights=support[ok])) if ok.any() else float("nan")
    return {
        "accuracy": float(metrics[accuracy_key]),
        "num_images": int(support.sum()),
        "per_class": per_class,
        "macro_avg": macro,
        "weighted_avg": weighted,
        "confusion_matrix": cm.tolist(),
    }


def report_table(metrics: dict) -> str:
    """The classification report as a text table (like scikit-learn's)."""
    lines = [f"{'':>14}{'precision':>11}{'recall':>9}{'f1':>9}{'roc_auc':>9}{'support':>9}"]
    for cls, m in metrics["per_class"].items():
        lines.append(
            f"{cls:>14}{m['precision']:>11.4f}{m['recall']:>9.4f}{m['f1']:>9.4f}{m['roc_auc']:>9.4f}{m['support']:>9d}"
        )
    for avg in ("macro_avg", "weighted_avg"):
        m = metrics[avg]
        lines.append(
            f"{avg.replace('_', ' '):>14}{m['precision']:>11.4f}{m['recall']:>9.4f}{m['f1']:>9.4f}"
            f"{m['roc_auc']:>9.4f}{metrics['num_images']:>9d}"
        )
    lines.append(f"{'accuracy':>14}{metrics['accuracy']:>47.4f}{metrics['num_images']:>9d}")
    return "\n".join(lines)


def plot_confusion(cm: np.ndarray, path: str) -> None:
    fig, ax = pyplot().subplots(figsize=(7, 6))
    rates = cm / np.maximum(cm.sum(1, keepdims=True), 1)  # colour: fraction of the true class
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(CLASSES)):
        for j in range(len(CLASSES)):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(CLASSES)), CLASSES, rotation=45, ha="right")
    ax.set_yticks(range(len(CLASSES)), CLASSES)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Confusion matrix")
    fig.tight_layout()
    save_figure(fig, path)


def _json_safe(obj):
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return obj


class ClassificationReport:
    """Collect each image's logits during evaluation; at the end write the report files to ``output_dir``, with
    the probabilities calibrated by ``calibration_path`` (see ``scripts.calibration``) and the expected
    calibration error and negative log-likelihood before and after calibration."""

    def __init__(self, output_dir: str, calibration_path: str | None = None, network=None):
        self.output_dir, self.calibration_path = output_dir, calibration_path
        self.hook = FeatureHook(network)  # the features of the evaluator's forward pass, for the ood_score

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.COMPLETED, self.write)

    def reset(self, engine: Engine) -> None:
        self.paths, self.labels, self.logits, self.features = [], [], [], []

    def collect(self, engine: Engine) -> None:
        out = engine.state.output
        self.logits.append(out["pred"].detach().float().cpu())
        self.features.append(self.hook.take())
        self.labels.append(torch.as_tensor(out["label"]).detach().cpu().long().view(-1))
        self.paths += list(engine.state.batch["path"])

    def write(self, engine: Engine) -> None:
        if not self.logits:
            raise BundleError("no images were evaluated.", "check --eval_dir or the test split.")
        logits, labels = torch.cat(self.logits), torch.cat(self.labels)
        calibration = Calibration.load(self.calibration_path)
        probs = calibration.probabilities(logits)
        metrics = classification_metrics(engine.state.metrics, probs, labels)
        metrics["calibration"] = calibration_figures(logits, labels, calibration)
        features = torch.cat(self.features) if all(f is not None for f in self.features) else None
        scores, threshold = calibration.ood_score(logits, features)
        scores = scores.numpy()
        flagged = scores > threshold if threshold is not None else None
        metrics["out_of_distribution_flagged"] = None if flagged is None else float(flagged.mean())
        probs, labels = probs.numpy(), labels.numpy()
        os.makedirs(self.output_dir, exist_ok=True)
        atomic_write(
            os.path.join(self.output_dir, "metrics.json"), lambda f: json.dump(_json_safe(metrics), f, indent=2)
        )
        cm = np.array(metrics["confusion_matrix"])

        def _cm(f):
            w = csv.writer(f)
            w.writerow(["true/predicted", *CLASSES])
            w.writerows([[c, *row] for c, row in zip(CLASSES, cm.tolist())])

        atomic_write(os.path.join(self.output_dir, "confusion_matrix.csv"), _cm)
        plot_confusion(cm, os.path.join(self.output_dir, "confusion_matrix.png"))

        def _preds(f):
            w = csv.writer(f)
            w.writerow(["path", "true_label", "label", "confidence", *CLASSES, "ood_score"])
            for path, y, p, e in zip(self.paths, labels, probs, scores):
                probabilities = (f"{v:.6f}" for v in p)
                w.writerow([path, CLASSES[y], CLASSES[p.argmax()], f"{p.max():.6f}", *probabilities, f"{e:.4f}"])

        atomic_write(os.path.join(self.output_dir, "predictions.csv"), _preds)
        engine.state.report = metrics
        table = report_table(metrics)
        print(table, flush=True)
        logger.info(f"evaluation of {metrics['num_images']} images written to {self.output_dir}")
