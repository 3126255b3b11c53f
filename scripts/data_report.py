"""The data report written before training: images per class and split, identical images (within a part, and across
parts: a leak), unreadable files, constant images, the files' kinds and sizes, the class imbalance."""

from __future__ import annotations

import json
import logging
import os

from .files import atomic_write, is_main_process

logger = logging.getLogger(__name__)


class DataReport:
    """``output_dir/data_report.json`` and its summary in the log, from the prepared ``data``
    (:class:`~scripts.data.ImageData`) and the built ``cache`` (:class:`~scripts.cache.Cache`)."""

    def __init__(self, output_dir: str, data, cache):
        self.path = os.path.join(str(output_dir), "data_report.json")
        self.data, self.cache = data, cache

    def content(self) -> dict:
        report = dict(self.data.report)
        counts = report.get("images", {})
        training = {c: n["training"] for c, n in counts.items()}
        seen = self.cache.seen
        preprocessed = sum(seen["modes"].values())
        report["imbalance"] = {
            "training_images_per_class": training,
            "largest_to_smallest": (
                round(max(training.values()) / max(1, min(training.values())), 2) if training else None
            ),
        }
        report["preprocessed_images"] = preprocessed
        report["unreadable"] = [{"path": p, "reason": r} for p, r in self.cache.failed]
        report["constant_images"] = {"count": len(seen["constant"]), "examples": seen["constant"][:10]}
        report["kinds"] = dict(seen["modes"].most_common())
        report["sizes"] = {f"{w}x{h}": n for (w, h), n in seen["sizes"].most_common(20)}
        report["distinct_sizes"] = len(seen["sizes"])
        return report

    def write(self) -> dict:
        """The step: write the report and log its summary (a leak and an imbalance as warnings)."""
        report = self.content()
        if is_main_process():
            atomic_write(self.path, lambda f: json.dump(report, f, indent=1))
        counts = report["images"]
        parts = ", ".join(f"{c} {n['training']}/{n['validation']}/{n['test']}" for c, n in counts.items())
        logger.info(
            f"data: {report['source']} at {report['root']}; images per class (training/validation/test): {parts}"
        )
        alike = report["identical_images"]
        if alike["groups"]:
            logger.info(
                f"data: {alike['images']} images in {alike['groups']} groups of identical files, each group kept "
                "in one part of the split"
            )
        if alike["groups_across_splits"]:
            logger.warning(
                f"data: {alike['groups_across_splits']} groups of identical images lie in more than one part (the "
                f"split given, or an older one): test images also seen in training, e.g. {alike['examples_across_splits'][0]}"
            )
        if alike["groups_with_different_labels"]:
            logger.warning(
                f"data: {alike['groups_with_different_labels']} groups of identical images have different labels, "
                f"e.g. {alike['examples_with_different_labels'][0]}"
            )
        constant = report["constant_images"]["count"]
        kinds = ", ".join(f"{k} {n}" for k, n in report["kinds"].items())
        sizes = ", ".join(f"{s} {n}" for s, n in list(report["sizes"].items())[:3])
        logger.info(
            f"data: of {report['preprocessed_images']} preprocessed images, {constant} constant, "
            f"{len(report['unreadable'])} unreadable; kinds: {kinds}; sizes: {sizes}"
            f"{' ...' if report['distinct_sizes'] > 3 else ''}"
        )
        ratio = report["imbalance"]["largest_to_smallest"]
        if ratio and ratio >= 3:
            logger.warning(
                f"data: the largest class has {ratio}x the training images of the smallest (see --class_weights)"
            )
        logger.info(f"wrote {self.path}")
        return report
