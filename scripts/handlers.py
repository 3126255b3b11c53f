"""Ignite handlers the bundle needs beyond MONAI's own: per-epoch history, device report, loss progress bar,
and early stopping (on a plateau or at a target accuracy)."""

from __future__ import annotations

import csv
import logging
import os
import time

import torch
from ignite.engine import Engine, Events
from ignite.handlers import EarlyStopping, ProgressBar

from .utils import atomic_write, is_main_process, pyplot, save_figure

logger = logging.getLogger(__name__)
COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_time_s", "elapsed_s")


def plot_history(rows: list[dict], path: str) -> None:
    """Loss and accuracy curves, training against validation, saved as a PNG."""
    from matplotlib.ticker import MaxNLocator

    fig, axes = pyplot().subplots(1, 2, figsize=(11, 4))
    for ax, what in zip(axes, ("loss", "acc")):
        for split, style in (("train", "o-"), ("val", "s-")):
            pts = [(r["epoch"], r[f"{split}_{what}"]) for r in rows if r.get(f"{split}_{what}") not in (None, "")]
            if pts:
                ax.plot(*zip(*pts), style, label={"train": "training", "val": "validation"}[split])
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel({"loss": "cross-entropy loss", "acc": "accuracy"}[what])
        ax.set_title({"loss": "Loss", "acc": "Accuracy"}[what])
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


class HistoryWriter:
    """Write ``history.csv`` and ``training_history.png`` after every epoch, atomically.

    Each row holds the epoch's mean training loss and accuracy, the validation loss and accuracy (blank on
    epochs without validation), the learning rate used and the timings. The files are therefore complete
    whether the run ends normally, by early stopping or by a crash; a resumed run keeps the earlier rows.
    It also sets ``engine.state.lr`` so that ``TensorBoardStatsHandler(state_attributes=["lr"])`` can log it.
    """

    def __init__(self, output_dir: str, evaluator: Engine, optimizer: torch.optim.Optimizer):
        self.csv_path = os.path.join(output_dir, "history.csv")
        self.png_path = os.path.join(output_dir, "training_history.png")
        self.evaluator, self.optimizer = evaluator, optimizer
        self.rows: list[dict] = []
        self._val: dict = {}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.EPOCH_STARTED, self.epoch_started)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)
        self.evaluator.add_event_handler(Events.COMPLETED, self.validated)

    def started(self, engine: Engine) -> None:
        self.rows, self._t0 = None, time.perf_counter()

    def _load_earlier_rows(self, epoch: int) -> None:
        """Keep the rows of epochs before ``epoch`` from a resumed run's history (none on a fresh run)."""
        self.rows = []
        if epoch > 1 and os.path.isfile(self.csv_path):
            with open(self.csv_path) as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["epoch"]) < epoch]
            for r in self.rows:
                r.update({k: float(v) if v not in ("", None) else "" for k, v in r.items() if k != "epoch"})
                r["epoch"] = int(r["epoch"])
        self._offset = float(self.rows[-1]["elapsed_s"]) if self.rows else 0.0

    def epoch_started(self, engine: Engine) -> None:
        if self.rows is None:  # first epoch of this process: the checkpoint (if resuming) is loaded by now
            self._load_earlier_rows(engine.state.epoch)
        engine.state.lr = self.optimizer.param_groups[0]["lr"]
        self._epoch_t0 = time.perf_counter()

    def validated(self, evaluator: Engine) -> None:
        self._val = {
            "val_loss": evaluator.state.metrics.get("val_loss"),
            "val_acc": evaluator.state.metrics.get("val_acc"),
        }

    def epoch_completed(self, engine: Engine) -> None:
        now = time.perf_counter()
        metrics = engine.state.metrics
        row = {
            "epoch": engine.state.epoch,
            "train_loss": metrics.get("train_loss", ""),
            "train_acc": metrics.get("train_acc", ""),
            "val_loss": self._val.get("val_loss", ""),
            "val_acc": self._val.get("val_acc", ""),
            "lr": engine.state.lr,
            "epoch_time_s": round(now - self._epoch_t0, 3),
            "elapsed_s": round(self._offset + now - self._t0, 3),
        }
        self._val = {}
        self.rows.append(row)
        if is_main_process():
            self.write()

    def write(self) -> None:
        def _csv(f):
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            w.writeheader()
            w.writerows(self.rows)

        atomic_write(self.csv_path, _csv)
        plot_history(self.rows, self.png_path)


class DeviceLogger:
    """Log the device at the start of a run (GPU name, CUDA version, memory) and peak GPU memory at the end."""

    def __init__(self, device):
        self.device = torch.device(device)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def started(self, engine: Engine) -> None:
        self._t0 = time.perf_counter()
        if torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
            logger.info(f"rank {rank} of {world} ({torch.distributed.get_backend()})")
        if self.device.type == "cuda":
            p = torch.cuda.get_device_properties(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            logger.info(
                f"device: {self.device} {p.name}, CUDA {torch.version.cuda}, {p.total_memory / 2**30:.1f} GiB, "
                f"torch {torch.__version__}"
            )
        else:
            logger.info(f"device: {self.device} ({torch.get_num_threads()} threads), torch {torch.__version__}")

    def completed(self, engine: Engine) -> None:
        msg = f"run finished in {time.perf_counter() - self._t0:.1f} s"
        if self.device.type == "cuda":
            msg += f", peak GPU memory {torch.cuda.max_memory_allocated(self.device) / 2**30:.2f} GiB"
        logger.info(msg)


class LossProgressBar(ProgressBar):
    """ignite's ``ProgressBar`` showing the live training loss."""

    def attach(self, engine: Engine, *args, **kwargs) -> None:
        kwargs.setdefault("output_transform", lambda output: {"loss": output["loss"].detach().item()})
        super().attach(engine, *args, **kwargs)


class EarlyStop:
    """End training early, judged at each validation of ``evaluator``: after ``patience`` validations without a
    lower validation loss (ignite's ``EarlyStopping``), or at the first whose accuracy reaches ``target`` (0:
    never). A handler of the trainer, which it stops; it watches the evaluator, whose own handlers cannot name
    the trainer (the trainer names the evaluator).

    Validations outside a training run (an evaluation workflow built on the same evaluator) are not judged.
    A validation within an epoch that reaches the target ends that epoch first, so its history row, checkpoint
    and model.pt are written as at any epoch's end; then the run completes (calibration included).
    ``state_dict`` holds the early-stopping counter and best loss, for resuming.
    """

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
