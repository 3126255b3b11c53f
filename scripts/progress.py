"""What a run tells its user while it works and when it ends: the device, progress bars (the loss live), a start
line for each phase, and a summary of where its results are."""

from __future__ import annotations

import logging
import time

import torch
from ignite.engine import Engine, Events
from ignite.handlers import ProgressBar

logger = logging.getLogger(__name__)


class DeviceLogger:
    """Log the device (GPU name, CUDA version, memory; or CPU threads) at the start and the run's time (and peak
    GPU memory) at the end."""

    def __init__(self, device):
        self.device = torch.device(device)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def started(self, engine: Engine) -> None:
        self.t0 = time.perf_counter()
        if torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
            logger.info(f"rank {rank} of {world} ({torch.distributed.get_backend()})")
        if self.device.type == "cuda":
            p = torch.cuda.get_device_properties(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            about = f"{p.name}, CUDA {torch.version.cuda}, {p.total_memory / 2**30:.1f} GiB"
        else:
            about = f"({torch.get_num_threads()} threads)"
        logger.info(f"device: {self.device} {about}, torch {torch.__version__}")

    def completed(self, engine: Engine) -> None:
        peak = torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else None
        memory = f", peak GPU memory {peak:.2f} GiB" if peak is not None else ""
        logger.info(f"run finished in {time.perf_counter() - self.t0:.1f} s{memory}")


class LossProgressBar(ProgressBar):
    """ignite's ``ProgressBar`` showing the live training loss."""

    def attach(self, engine: Engine, *args, **kwargs) -> None:
        kwargs.setdefault("output_transform", lambda output: {"loss": output["loss"].detach().item()})
        super().attach(engine, *args, **kwargs)


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
