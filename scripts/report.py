"""Evaluation report: metrics.json, the confusion matrix (CSV and PNG) and a printed table, from the evaluator's
metrics (configs/evaluate.json: ignite's ``Accuracy``, ``ClassificationReport``, ``ConfusionMatrix``), MONAI's
``compute_roc_auc`` and the calibration figures, for the model's own classes; balanced accuracy and macro F1
beside accuracy, for imbalanced classes (predictions.csv: ``scripts.predictions``)."""

from __future__ import annotations

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

from .calibration import calibration_figures
from .errors import BundleError
from .files import atomic_write, pyplot, save_figure, write_csv

logger = logging.getLogger(__name__)


def classification_metrics(metrics: dict, probs: torch.Tensor, labels: torch.Tensor, classes) -> dict:
    """metrics.json's content: accuracy, balanced accuracy (the mean recall of the classes with images), per class
    precision, recall, F1 (ignite's ``ClassificationReport``), ROC AUC (MONAI's ``compute_roc_auc``) and support,
    their macro and support-weighted averages over classes with images, and the confusion matrix."""
    cm = np.asarray(torch.as_tensor(metrics["confusion_matrix"]).cpu(), dtype=np.int64)
    support = cm.sum(1)
    report = metrics["report"]
    names = {"precision": "precision", "recall": "recall", "f1": "f1-score"}
    figures = {k: np.array([report[c][name] for c in classes], dtype=float) for k, name in names.items()}
    onehot = one_hot(labels.view(-1, 1), len(classes), dim=1)
    with warnings.catch_warnings():  # a class absent from the labels has no ROC AUC: NaN, written as null
        warnings.simplefilter("ignore")
        figures["roc_auc"] = np.asarray(compute_roc_auc(probs, onehot, average="none"), dtype=float).reshape(-1)
    per_class = {
        cls: {**{k: float(v[i]) for k, v in figures.items()}, "support": int(support[i])}
        for i, cls in enumerate(classes)
    }
    macro, weighted = {}, {}
    for name, values in figures.items():
        ok = ~np.isnan(values) & (support > 0)
        macro[name] = float(values[ok].mean()) if ok.any() else float("nan")
        weighted[name] = float(np.average(values[ok], weights=support[ok])) if ok.any() else float("nan")
    return {
        "accuracy": float(metrics["accuracy"]),
        "balanced_accuracy": macro["recall"],
        "num_images": int(support.sum()),
        "per_class": per_class,
        "macro_avg": macro,
        "weighted_avg": weighted,
        "confusion_matrix": cm.tolist(),
    }


def scalars(report: dict) -> dict[str, float]:
    """The numbers of a metrics.json report as flat scalars (``precision_Hand``, ``f1_macro_avg``,
    ``ece_calibrated``, ...): what an engine's ``state.metrics`` can hand to MONAI's metric loggers."""
    flat = {"accuracy": report["accuracy"], "balanced_accuracy": report["balanced_accuracy"]}
    for group, values in [*report["per_class"].items(), ("macro_avg", report["macro_avg"])]:
        flat.update({f"{k}_{group}": v for k, v in values.items() if k != "support"})
    flat.update({f"{k}_weighted_avg": v for k, v in report["weighted_avg"].items()})
    for figure in ("ece", "nll"):
        flat.update({f"{figure}_{k}": v for k, v in report["calibration"][figure].items()})
    flat["out_of_distribution_flagged"] = report["out_of_distribution_flagged"]
    return {k: v for k, v in flat.items() if isinstance(v, float) and not math.isnan(v)}


def number(value) -> bool:
    """Whether a metric's value is one number (a Python number or a one-element tensor)."""
    plain = isinstance(value, (int, float)) and not isinstance(value, bool)
    return plain or isinstance(value, torch.Tensor) and value.numel() == 1


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
    lines.append(f"{'balanced acc.':>14}{metrics['balanced_accuracy']:>47.4f}{metrics['num_images']:>9d}")
    return "\n".join(lines)


def plot_confusion(cm: np.ndarray, classes, path: str) -> None:
    side = max(6, 0.6 * len(classes))
    fig, ax = pyplot().subplots(figsize=(side + 1, side))
    rates = cm / np.maximum(cm.sum(1, keepdims=True), 1)  # colour: fraction of the true class
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set(xlabel="predicted", ylabel="true", title="Confusion matrix")
    fig.tight_layout()
    save_figure(fig, path)


class ClassificationReport:
    """At the end of an evaluation (``EPOCH_COMPLETED``, before MONAI's trackers log) the report of the evaluator's
    metrics and ``outputs`` under the ``model``'s calibration (ECE and NLL before and after, the share flagged out
    of distribution), for its classes, with every number the config's metrics give (``metrics``); in
    ``state.metrics`` what is not a number (ignite's report and confusion matrix) gives way to the report's
    scalars."""

    def __init__(self, output_dir: str, outputs, model):
        self.output_dir, self.outputs, self.model = str(output_dir), outputs, model

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.write)

    def write(self, engine: Engine) -> None:
        gathered = self.outputs.gathered()
        if gathered["logits"] is None:
            raise BundleError("no images were evaluated.", "check --eval_dir or the test split.")
        logits, labels = gathered["logits"], gathered["labels"]
        classes, calibration = self.model.classes, self.model.calibration
        metrics = classification_metrics(engine.state.metrics, calibration.probabilities(logits), labels, classes)
        metrics["calibration"] = calibration_figures(logits, labels, calibration)
        scores, threshold, kind = calibration.ood_score(logits, gathered["features"])
        flagged = None if threshold is None else float((~(scores <= threshold)).double().mean())
        metrics.update(out_of_distribution_flagged=flagged, ood_score_kind=kind)
        metrics["metrics"] = {k: float(v) for k, v in engine.state.metrics.items() if number(v)}
        os.makedirs(self.output_dir, exist_ok=True)
        safe = json.loads(json.dumps(metrics), parse_constant=lambda _: None)  # NaN as null
        atomic_write(os.path.join(self.output_dir, "metrics.json"), lambda f: json.dump(safe, f, indent=2))
        cm = np.array(metrics["confusion_matrix"])
        rows = [{"true/predicted": c, **dict(zip(classes, row))} for c, row in zip(classes, cm.tolist())]
        write_csv(os.path.join(self.output_dir, "confusion_matrix.csv"), ["true/predicted", *classes], rows)
        plot_confusion(cm, classes, os.path.join(self.output_dir, "confusion_matrix.png"))
        engine.state.report = metrics
        engine.state.metrics = {**metrics["metrics"], **scalars(metrics)}
        print(report_table(metrics), flush=True)
        logger.info(f"evaluation of {metrics['num_images']} images written to {self.output_dir}")
