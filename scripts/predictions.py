"""``predictions.csv``, one schema for evaluation and inference, written batch by batch: ``path``, ``true_label``
(evaluation), calibrated ``label``, ``confidence`` and class probabilities, ``ood_score`` and its kind
(``mahalanobis``, or ``energy`` for an export), ``flag`` (why not to trust the row) and ``error`` (why an input
could not be predicted)."""

from __future__ import annotations

import csv
import logging
import os

import numpy as np
from ignite.engine import Engine, Events

from .calibration import Calibration, Outputs
from .data import CLASSES
from .utils import BundleError, as_bool, write_csv

logger = logging.getLogger(__name__)
COLUMNS = ("path", "true_label", "label", "confidence", *CLASSES, "ood_score", "ood_score_kind", "flag", "error")
MIN_SIDE = 32  # pixels: smaller images are flagged (MedNIST's are 64 x 64)


def flag(probs: np.ndarray, score: float, threshold, constant: bool, min_side: int, low_confidence: float) -> str:
    """Why not to trust one prediction, or ``""``: the first of ``constant image``, ``small image`` (a side under
    32 pixels), ``uncalibrated``, ``out-of-distribution`` (score over ``threshold``), ``low confidence``."""
    if constant:
        return "constant image"
    if min_side < MIN_SIDE:
        return "small image"
    if threshold is None:
        return "uncalibrated"
    if score > threshold:
        return "out-of-distribution"
    return "low confidence" if probs.max() < low_confidence else ""


def prediction_rows(outputs: dict, calibration: Calibration, low_confidence: float) -> list[dict]:
    """The rows of one batch of :class:`~scripts.calibration.Outputs`: calibrated probabilities, score and flag
    for each image, the reason for each one that could not be read."""
    batch, logits = outputs["batch"], outputs["logits"]
    probs = calibration.probabilities(logits).numpy()
    scores, threshold, kind = calibration.ood_score(logits, outputs["features"])
    images = batch["image"]
    constant = images.detach().flatten(1).std(1).cpu().numpy() == 0
    errors = batch.get("error", [""] * len(logits))
    sides = batch.get("min_side", [MIN_SIDE] * len(logits))
    labels = outputs["labels"]
    rows = []
    for i, path in enumerate(batch["path"]):
        row = {"path": path, "error": errors[i]}
        if not errors[i]:
            row.update(label=CLASSES[probs[i].argmax()], confidence=f"{probs[i].max():.6f}")
            row.update({c: f"{p:.6f}" for c, p in zip(CLASSES, probs[i])})
            row.update(ood_score=f"{float(scores[i]):.4f}", ood_score_kind=kind)
            row["flag"] = flag(probs[i], float(scores[i]), threshold, constant[i], int(sides[i]), low_confidence)
            if labels is not None:
                row["true_label"] = CLASSES[int(labels[i])]
        rows.append(row)
    return rows


def read_predictions(path: str) -> list[dict]:
    """The complete rows of a ``predictions.csv`` (a last line cut short by a kill is left out)."""
    if not os.path.isfile(path):
        return []
    with open(path, newline="") as f:
        lines = f.readlines()
    if lines and not lines[-1].endswith("\n"):
        lines = lines[:-1]
    rows = list(csv.DictReader(lines))
    return [r for r in rows if None not in r and None not in r.values()]  # every column, no extra field


def skip_done(data: list[dict], output_dir: str, resume=False) -> list[dict]:
    """``data`` without, with ``resume``, the inputs ``output_dir/predictions.csv`` already has rows for."""
    if not as_bool(resume, "resume"):
        return data
    done = {r["path"] for r in read_predictions(os.path.join(output_dir, "predictions.csv"))}
    todo = [d for d in data if d["path"] not in done]
    logger.info(f"resuming: {len(data) - len(todo)} of {len(data)} input(s) already predicted")
    return todo


class PredictionWriter:
    """Append each batch's rows (:func:`prediction_rows` of ``outputs``) to ``output_dir/predictions.csv``, on disk
    (``fsync``) before the next batch, so a kill or power cut keeps every batch written; with ``resume`` the
    complete rows already there are kept (rewritten atomically first). Nothing is held across batches."""

    def __init__(self, output_dir: str, outputs: Outputs, calibration: Calibration, low_confidence=0.5, resume=False):
        self.path = os.path.join(output_dir, "predictions.csv")
        self.outputs, self.calibration, self.low_confidence = outputs, calibration, float(low_confidence)
        self.resume = as_bool(resume, "resume")
        self.rows = self.predicted = 0
        self.failed: list[dict] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.open)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.COMPLETED, self.close)

    def open(self, engine: Engine | None = None) -> None:
        write_csv(self.path, COLUMNS, read_predictions(self.path) if self.resume else [])
        self.file = open(self.path, "a", newline="")
        self.csv = csv.DictWriter(self.file, fieldnames=COLUMNS, extrasaction="ignore")

    def collect(self, engine: Engine) -> None:
        rows = prediction_rows(self.outputs.last, self.calibration, self.low_confidence)
        self.csv.writerows(rows)
        self.file.flush()
        os.fsync(self.file.fileno())  # on disk, not only in the operating system's cache
        for row in rows:
            if row["error"]:
                logger.warning(f"{row['path']}: {row['error']}")
                self.failed.append(row)
        self.rows, self.predicted = self.rows + len(rows), self.predicted + sum(not r["error"] for r in rows)

    def close(self, engine: Engine | None = None) -> None:
        self.file.close()
        logger.info(f"{self.predicted} of {self.rows} input(s) predicted; wrote {self.path}")

    def finish(self, skipped: int = 0) -> int:
        """After the run: a ``BundleError`` naming why if nothing was predicted (unless an earlier run did it all)."""
        if self.predicted == 0 and not (skipped and self.rows == 0):
            first = self.failed[0] if self.failed else {"path": "", "error": "no input"}
            more = f" (and {len(self.failed) - 1} more; see the error column)" if len(self.failed) > 1 else ""
            raise BundleError(
                f"no image could be predicted: {first['path']}: {first['error']}{more}.",
                f"pass images this bundle reads (.jpeg/.jpg/.png, 2D .nii/.nii.gz); rows in {self.path}.",
            )
        return self.predicted
