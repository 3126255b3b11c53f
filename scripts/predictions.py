"""``predictions.csv``, one schema for evaluation and inference, written batch by batch: ``path``, ``true_label``
(evaluation; empty in inference), calibrated ``label``, ``confidence`` and a probability per class of the model,
``ood_score`` and its kind (``mahalanobis``, or ``energy`` for an export), ``flag`` (why not to trust the row) and
``error`` (why an input could not be predicted). Text cells a spreadsheet would evaluate are escaped."""

from __future__ import annotations

import csv
import logging
import math
import os

import numpy as np
from ignite.engine import Engine, Events

from .checks import as_bool
from .errors import BundleError
from .files import FORMULA_START, csv_cell, read_text, write_csv

logger = logging.getLogger(__name__)
MIN_SIDE = 32  # pixels: smaller images are flagged (MedNIST's are 64 x 64)
MAX_PREDICTIONS = 1 << 30  # bytes of an earlier predictions.csv a resumed run reads (millions of rows)
BEFORE, AFTER = ("path", "true_label", "label", "confidence"), ("ood_score", "ood_score_kind", "flag", "error")
AFTER += ("sop_instance_uid",)  # the columns around the classes' (their names may not be these)
TEXT = ("path", "true_label", "label", "flag", "error", "sop_instance_uid")  # cells of text, escaped; others numbers


def columns(classes) -> tuple:
    return (*BEFORE, *classes, *AFTER)


def flag(probs: np.ndarray, score: float, threshold, constant: bool, min_side: int, low_confidence: float) -> str:
    """Why not to trust one prediction, or ``""``: the first of ``constant image``, ``small image`` (a side under
    32 pixels), ``uncalibrated``, ``out-of-distribution`` (a score not under ``threshold``), ``low confidence`` (a
    confidence not at least ``low_confidence``). A score or confidence that is not a number is never trusted."""
    if constant:
        return "constant image"
    if min_side < MIN_SIDE:
        return "small image"
    if threshold is None:
        return "uncalibrated"
    if not score <= threshold:
        return "out-of-distribution"
    return "" if np.all(np.isfinite(probs)) and probs.max() >= low_confidence else "low confidence"


def prediction_rows(outputs: dict, calibration, classes, low_confidence: float) -> list[dict]:
    """The rows of one batch of :class:`~scripts.outputs.Outputs`: calibrated probabilities, score and flag for
    each image, the reason for each one that could not be read."""
    batch, logits = outputs["batch"], outputs["logits"]
    probs = calibration.probabilities(logits).numpy()
    scores, threshold, kind = calibration.ood_score(logits, outputs["features"])
    constant = (batch["image"].detach().flatten(1).std(1).cpu().numpy() == 0).tolist()
    errors = batch.get("error", [""] * len(logits))
    sides = batch.get("min_side", [MIN_SIDE] * len(logits))
    uids = batch.get("sop_instance_uid", [""] * len(logits))  # a DICOM image's, the only tag a row names
    labels = outputs["labels"]
    rows = []
    for i, path in enumerate(batch["path"]):
        row = {"path": path, "error": errors[i], "sop_instance_uid": uids[i]}
        if not errors[i]:
            score = float(scores[i])
            row.update(label=classes[int(np.nan_to_num(probs[i], nan=-1).argmax())], confidence=f"{probs[i].max():.6f}")
            row.update({c: f"{p:.6f}" for c, p in zip(classes, probs[i])})
            row.update(ood_score=f"{score:.4f}" if math.isfinite(score) else str(score), ood_score_kind=kind)
            row["flag"] = flag(probs[i], score, threshold, constant[i], int(sides[i]), low_confidence)
            if labels is not None and int(labels[i]) >= 0:
                row["true_label"] = classes[int(labels[i])]
        rows.append({k: csv_cell(v) if k in TEXT else v for k, v in row.items()})
    return rows


def read_predictions(path: str, classes) -> list[dict]:
    """The complete rows of a ``predictions.csv`` of a model of ``classes`` (a last line cut short by a kill is
    left out), or a ``BundleError`` if it is not one."""
    if not os.path.lexists(path):
        return []
    fix = "run without --resume to predict every input again, or move it away."
    lines = read_text(path, "the earlier predictions", MAX_PREDICTIONS, fix).splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines = lines[:-1]
    try:
        reader = csv.DictReader(lines)
        if reader.fieldnames != [csv_cell(c) for c in columns(classes)]:
            raise csv.Error("its columns are not those of predictions of this model")
        rows = list(reader)
    except csv.Error as e:
        raise BundleError(f"{path} is not the predictions.csv the bundle writes ({e}).", fix) from e
    return [r for r in rows if None not in r and None not in r.values()]  # every column, no extra field


def skip_done(data: list[dict], output_dir: str, classes, resume=False) -> list[dict]:
    """``data`` without, with ``resume``, the inputs ``output_dir/predictions.csv`` (of ``classes``) already has
    rows for."""
    if not as_bool(resume, "resume"):
        return data
    paths = [r["path"] for r in read_predictions(os.path.join(output_dir, "predictions.csv"), classes)]
    done = {p[1:] if p.startswith("'") and p[1:].startswith(FORMULA_START) else p for p in paths}  # csv_cell undone
    todo = [d for d in data if d["path"] not in done]
    logger.info(f"resuming: {len(data) - len(todo)} of {len(data)} input(s) already predicted")
    return todo


class PredictionWriter:
    """Append each batch's rows (:func:`prediction_rows` of ``outputs`` under the ``model``'s calibration) to
    ``output_dir/predictions.csv``, on disk (``fsync``) before the next batch, so that a kill or power cut keeps
    every batch written; with ``resume`` the complete rows already there are kept (rewritten atomically first).
    ``pictures`` (:class:`~scripts.pictures.Pictures`) draws each batch's predicted images after its rows are
    written, numbered on from the rows kept. Nothing is held across batches."""

    def __init__(self, output_dir: str, outputs, model, low_confidence=0.5, resume=False, pictures=None):
        self.path = os.path.join(str(output_dir), "predictions.csv")
        self.outputs, self.model, self.low_confidence = outputs, model, float(low_confidence)
        self.resume, self.pictures = as_bool(resume, "resume"), pictures
        self.rows = self.predicted = 0
        self.failed: list[dict] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.open)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.COMPLETED, self.close)

    def open(self, engine: Engine | None = None) -> None:
        self.columns = columns(self.model.classes)
        kept = read_predictions(self.path, self.model.classes) if self.resume else []
        write_csv(self.path, self.columns, kept)
        if self.pictures is not None:
            self.pictures.drawn = sum(not r["error"] for r in kept)
        self.file = open(self.path, "a", newline="", encoding="utf-8", errors="backslashreplace")  # any file name
        self.csv = csv.DictWriter(self.file, fieldnames=list(self.columns), extrasaction="ignore")

    def collect(self, engine: Engine) -> None:
        last = self.outputs.last
        rows = prediction_rows(last, self.model.calibration, self.model.classes, self.low_confidence)
        self.csv.writerows(rows)
        self.file.flush()
        os.fsync(self.file.fileno())  # on disk, not only in the operating system's cache
        for row in rows:
            if row["error"]:
                logger.warning(f"{row['path']}: {row['error']}")
                self.failed.append(row)
        self.rows, self.predicted = self.rows + len(rows), self.predicted + sum(not r["error"] for r in rows)
        good = [i for i, row in enumerate(rows) if not row["error"]]
        if self.pictures is not None and good:
            probs = self.model.calibration.probabilities(last["logits"][good]).numpy()
            self.pictures.draw(last["batch"]["image"][good], probs, [last["batch"]["path"][i] for i in good])

    def close(self, engine: Engine | None = None) -> None:
        self.file.close()
        if self.pictures is not None:
            self.pictures.close()
        logger.info(f"{self.predicted} of {self.rows} input(s) predicted; wrote {self.path}")

    def finish(self, skipped: int = 0) -> int:
        """After the run: a ``BundleError`` naming why if nothing was predicted (unless an earlier run did it all)."""
        if self.predicted == 0 and not (skipped and self.rows == 0):
            first = self.failed[0] if self.failed else {"path": "", "error": "no input"}
            more = f" (and {len(self.failed) - 1} more; see the error column)" if len(self.failed) > 1 else ""
            raise BundleError(
                f"no image could be predicted: {first['path']}: {first['error']}{more}.",
                f"pass images this bundle reads (.png/.jpeg/.jpg, 2D .nii/.nii.gz, DICOM); rows in {self.path}.",
            )
        return self.predicted
