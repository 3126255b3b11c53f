"""MONAI's experiment tracking (``--tracking mlflow``) fitted to this bundle.

MONAI appends its ``MLFlowHandler`` to the trainer's and the validator's handlers as they are declared: it would
read the loss with ``from_engine(['loss'], first=True)`` (a tuple here, as the engines do not decollate, so
MLflow fails), log it every iteration under the epoch metric's name, record only ignite's own state as params,
and keep no model. :class:`MLflowSetup` sets those handlers' public options before the engines attach them.
Without ``--tracking`` it finds no handler and does nothing.
"""

from __future__ import annotations

import glob
import os

import torch
from ignite.engine import Engine
from monai.handlers import MLFlowHandler

from .data import CLASSES


def _scalars(values: dict) -> dict[str, float]:
    """Numbers of ``values`` as floats; per-class vectors as ``<name>_<class>``; matrices left out."""
    out = {}
    for key, value in values.items():
        value = torch.as_tensor(value, dtype=torch.float64) if value is not None else None
        if value is None or value.numel() == 0:
            continue
        if value.numel() == 1:
            out[key] = float(value)
        elif value.ndim == 1 and value.numel() == len(CLASSES):
            out.update({f"{key}_{c}": float(v) for c, v in zip(CLASSES, value)})
    return out


class MLflowSetup:
    """What MLflow records of a run: ``params`` (dicts of the config's top-level keys, merged), per-epoch scalar
    metrics and the state attributes ``lr`` (one value an epoch), and ``artifacts`` (files logged when the run
    completes, with the executed config MONAI writes to ``output_dir``)."""

    def __init__(self, params: list[dict], artifacts: list[str], output_dir: str):
        self.params = {k: str(v) for p in params for k, v in p.items()}
        self.artifacts, self.output_dir = list(artifacts), output_dir

    def epoch_logger(self, handler: MLFlowHandler):
        def log(engine: Engine) -> None:
            values = _scalars({**engine.state.metrics, "lr": getattr(engine.state, "lr", None)})
            for key, value in values.items():
                handler.client.log_metric(handler.cur_run.info.run_id, key, value, step=engine.state.epoch)

        return log

    def configure(self, handlers: list, close: bool = False) -> list[MLFlowHandler]:
        """Set the options of the ``MLFlowHandler`` among ``handlers`` (call before the engine is made);
        ``close`` ends the MLflow run when that engine completes (evaluation)."""
        found = [h for h in handlers if isinstance(h, MLFlowHandler)]
        executed = sorted(glob.glob(os.path.join(glob.escape(self.output_dir), "config_*.json")))[-1:]
        for handler in found:
            handler.iteration_log = False  # per-iteration loss goes to TensorBoard, under its own tag
            handler.epoch_logger = self.epoch_logger(handler)
            handler.experiment_param = self.params
            if close or any(handler.artifacts):  # the handler that ends the run logs the files
                handler.artifacts = tuple(self.artifacts + executed)
            handler.close_on_complete = handler.close_on_complete or close
        return found
