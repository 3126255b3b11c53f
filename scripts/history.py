"""A training's history (``history.csv`` and its plot, every epoch), its early stop (on a plateau of the validation
loss, or at a target accuracy) and its summary (where its results are)."""

from __future__ import annotations

import csv
import io
import logging
import os
import time

import torch
from ignite.engine import Engine, Events
from ignite.handlers import EarlyStopping

from .errors import BundleError
from .files import is_main_process, pyplot, read_text, save_figure, write_csv

logger = logging.getLogger(__name__)
COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_time_s", "elapsed_s")


def plot_history(rows: list[dict], path: str) -> None:
    """Loss and accuracy curves, training against validation, saved as a PNG."""
    from matplotlib.ticker import MaxNLocator

    fig, axes = pyplot().subplots(1, 2, figsize=(11, 4))
    for ax, what, title in zip(axes, ("loss", "acc"), ("cross-entropy loss", "accuracy")):
        for split, style, label in (("train", "o-", "training"), ("val", "s-", "validation")):
            pts = [(r["epoch"], r[f"{split}_{what}"]) for r in rows if r.get(f"{split}_{what}") not in (None, "")]
            if pts:
                ax.plot(*zip(*pts), style, label=label)
        ax.set(xlabel="epoch", ylabel=title, title=title.capitalize())
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


class HistoryWriter:
    """After every epoch, ``history.csv`` and ``training_history.png`` (atomically): the epoch's training loss
    and accuracy, its validation's (blank without one), the learning rate at its start and timings; complete
    after an early stop or a crash, and a resumed run keeps the earlier rows. Listed before the epoch's
    checkpoint: a kill between the two leaves a row the resumed run rewrites, never a checkpoint without its
    row."""

    def __init__(self, output_dir: str, evaluator: Engine, optimizer: torch.optim.Optimizer):
        self.csv_path = os.path.join(output_dir, "history.csv")
        self.png_path = os.path.join(output_dir, "training_history.png")
        self.evaluator, self.optimizer = evaluator, optimizer
        self.rows, self.val, self.lr = None, {}, None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.EPOCH_STARTED, self.epoch_started)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)
        self.evaluator.add_event_handler(Events.COMPLETED, self.validated)

    def started(self, engine: Engine) -> None:
        self.rows, self.t0 = None, time.perf_counter()

    def epoch_started(self, engine: Engine) -> None:
        if self.rows is None:  # the first epoch of this process: a resumed checkpoint is loaded by now
            self.rows = []
            if engine.state.epoch > 1 and os.path.isfile(self.csv_path):  # keep the earlier epochs' rows
                self.rows = self.earlier_rows(engine.state.epoch)
            self.offset = float(self.rows[-1]["elapsed_s"]) if self.rows else 0.0
        self.lr = self.optimizer.param_groups[0]["lr"]
        self.epoch_t0 = time.perf_counter()

    def earlier_rows(self, epoch: int) -> list[dict]:
        """The rows of ``history.csv`` before ``epoch`` (a resumed run's), numbers as it writes them; none, with a
        warning, if the file is not the one it writes."""
        try:
            rows = list(csv.DictReader(io.StringIO(read_text(self.csv_path, "history", 1 << 24, ""))))
            rows = [{k: float(v) if v else "" for k, v in r.items() if k in COLUMNS} for r in rows]
            rows = [{**r, "epoch": int(r["epoch"])} for r in rows if r["epoch"] < epoch]
            if any(set(r) != set(COLUMNS) for r in rows):
                raise ValueError("its columns are not the bundle's")
        except (BundleError, ValueError, KeyError, TypeError, OverflowError, csv.Error) as e:
            logger.warning(f"{self.csv_path} is not the history this bundle writes ({str(e)[:120]}): started anew")
            return []
        return rows

    def validated(self, evaluator: Engine) -> None:
        self.val = {k: evaluator.state.metrics.get(k) for k in ("val_loss", "val_acc")}

    def epoch_completed(self, engine: Engine) -> None:
        now, metrics = time.perf_counter(), engine.state.metrics
        row = {"epoch": engine.state.epoch, **{k: metrics.get(k, "") for k in ("train_loss", "train_acc")}}
        row.update({k: self.val.get(k, "") for k in ("val_loss", "val_acc")}, lr=self.lr)
        row.update(epoch_time_s=round(now - self.epoch_t0, 3), elapsed_s=round(self.offset + now - self.t0, 3))
        self.val = {}
        self.rows.append(row)
        if is_main_process():
            write_csv(self.csv_path, COLUMNS, self.rows)
            plot_history(self.rows, self.png_path)


class EarlyStop:
    """A trainer handler ending training after ``patience`` validations of ``evaluator`` without a lower loss
    (ignite's ``EarlyStopping``) or at the first whose accuracy reaches ``target`` (0: never). Only validations
    while the trainer runs count; one reaching the target mid-epoch ends that epoch first, so that its history
    row, checkpoint and model.pt are written. ``state_dict``: the early-stopping state, for resuming."""

    def __init__(self, evaluator: Engine, patience: int, target: float = 0.0):
        self.evaluator, self.patience, self.target = evaluator, int(patience), float(target or 0)
        self.reached, self.plateau, self.training = False, None, False

    def attach(self, trainer: Engine) -> None:
        self.plateau = EarlyStopping(self.patience, lambda evaluator: -evaluator.state.metrics["val_loss"], trainer)
        self.evaluator.add_event_handler(Events.EPOCH_COMPLETED, self.judge)
        self.evaluator.add_event_handler(Events.COMPLETED, lambda evaluator: self.validated(evaluator, trainer))
        trainer.add_event_handler(Events.STARTED, lambda _: setattr(self, "training", True))
        trainer.add_event_handler(Events.COMPLETED, lambda _: setattr(self, "training", False))
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    def judge(self, evaluator: Engine) -> None:
        if self.training:
            self.plateau(evaluator)

    def validated(self, evaluator: Engine, trainer: Engine) -> None:
        if not self.training:
            return
        accuracy = evaluator.state.metrics.get("val_acc", 0.0)
        if self.target and accuracy >= self.target:
            logger.info(f"validation accuracy {accuracy:.4f} reached the target {self.target}: training ends")
            self.reached = True
            trainer.terminate_epoch()

    def epoch_completed(self, trainer: Engine) -> None:
        if self.reached:
            trainer.terminate()

    def state_dict(self) -> dict:
        return self.plateau.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.plateau.load_state_dict(state)


class TrainingSummary:
    """The last lines of a training (:meth:`log`, its last step): the best validation accuracy and where the model,
    its calibration, history and data report are, and the command that evaluates the test split."""

    def __init__(self, trainer: Engine, evaluator: Engine, model_path: str, output_dir: str, calibration_fit):
        self.trainer, self.evaluator, self.calibration_fit = trainer, evaluator, calibration_fit
        self.model_path, self.output_dir = str(model_path), str(output_dir)

    def log(self) -> str:
        best, epoch = self.evaluator.state.best_metric, self.evaluator.state.best_metric_epoch
        accuracy = (
            f"best validation accuracy {best:.4f} (epoch {epoch})"
            if best is not None and best >= 0
            else "no validation"
        )
        calibration = self.calibration_fit.path
        lines = [
            f"training done: {self.trainer.state.epoch} epoch(s), {accuracy}",
            f"  model: {self.model_path}; calibration: {calibration or 'none (no model.pt, or not the main process)'}",
            f"  history: {self.output_dir}/history.csv and training_history.png; data: {self.output_dir}/data_report.json",
            "  test accuracy: python -m monai.bundle run evaluating --config_file "
            "\"['configs/train.json','configs/evaluate.json']\" with this run's --output_dir and --ckpt_dir",
        ]
        for line in lines:
            logger.info(line)
        return "\n".join(lines)
