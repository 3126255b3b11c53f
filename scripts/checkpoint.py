"""Training checkpoints: crash-safe saving (a run killed at any moment loses at most the epoch in progress), what
they hold, and where a resumed run starts."""

from __future__ import annotations

import glob
import json
import logging
import os
import re

import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint
from ignite.handlers.checkpoint import BaseSaveHandler
from monai.handlers import CheckpointLoader

from .errors import BundleError
from .files import atomic_write, fsync_folder, is_main_process
from .model_file import FORMAT_FILE, ModelDescription

logger = logging.getLogger(__name__)


class SafeDiskSaver(BaseSaveHandler):
    """ignite ``Checkpoint``'s save handler, writing the new file (atomically) before removing the one it replaces:
    ignite's ``DiskSaver`` (so MONAI's ``CheckpointSaver``) removes first, and a kill between leaves none. Only
    the main process writes."""

    def __init__(self, dirname: str):
        self.dirname = dirname
        self._replaced: list[str] = []

    def __call__(self, checkpoint, filename: str, metadata=None) -> None:
        if not is_main_process():
            return
        atomic_write(os.path.join(self.dirname, filename), lambda f: torch.save(checkpoint, f), mode="wb")
        for old in self._replaced:
            path = os.path.join(self.dirname, old)
            if old != filename and os.path.exists(path):
                os.remove(path)
        if self._replaced:
            fsync_folder(self.dirname)
        self._replaced = []

    def remove(self, filename: str) -> None:
        if is_main_process():
            self._replaced.append(filename)


def world_size() -> int:
    """The number of processes training together (1 without ``torchrun``)."""
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


class RunSettings:
    """The settings that set the epoch length, saved in each checkpoint for :func:`check_resume` to compare."""

    def __init__(self, batch_size: int):
        self.settings = {"batch_size": int(batch_size), "processes": world_size()}

    def state_dict(self) -> dict:
        return dict(self.settings)

    def load_state_dict(self, state: dict) -> None:  # check_resume refused the run if they differ
        pass


class TrainingCheckpoints:
    """A trainer handler saving, with :class:`SafeDiskSaver`, ``model_path`` (the weights at ``evaluator``'s best
    accuracy so far), the ``description`` of its classes, channels and size beside it (``network_data_format.json``,
    when the trainer starts), and after every epoch ``checkpoint_epoch=N.pt`` (``state``: anything with a
    ``state_dict``; the trainer, AMP scaler, best-model record, :class:`RunSettings`). With ``resume_from`` MONAI's
    ``CheckpointLoader`` restores it all when the trainer starts (the best-model record only while model.pt
    exists), then older checkpoints are removed. It attaches what its checkpoints hold and follow, before its own
    handlers: ``early_stop`` (:class:`~scripts.history.EarlyStop`, whose state it saves) and ``history``
    (:class:`~scripts.history.HistoryWriter`: a kill between the two leaves a history row the resumed run
    rewrites, never a checkpoint without its row)."""

    def __init__(self, model_path: str, evaluator: Engine, state: dict, batch_size: int, history, description,
                 early_stop, resume_from: str = ""):  # fmt: skip
        unsaveable = [k for k, v in state.items() if not callable(getattr(v, "state_dict", None))]
        if unsaveable:
            raise TypeError(f"TrainingCheckpoints: {unsaveable} have no state_dict (a config reference gone astray?)")
        self.dirname, self.model_file = os.path.split(model_path)
        self.evaluator, self.resume_from = evaluator, resume_from
        self.state = {**state, "early_stop": early_stop}
        self.history, self.description, self.early_stop = history, description, early_stop
        self.settings = RunSettings(batch_size)

    def write_description(self, trainer: Engine) -> None:
        if is_main_process():
            path = os.path.join(self.dirname, FORMAT_FILE)
            atomic_write(path, lambda f: json.dump(self.description.to_json(), f, indent=4))

    def attach(self, trainer: Engine) -> None:
        self.early_stop.attach(trainer)
        self.history.attach(trainer)
        trainer.add_event_handler(Events.STARTED, self.write_description)
        best_model = Checkpoint(
            {"model": self.state["model"]},
            SafeDiskSaver(self.dirname),
            filename_pattern=self.model_file,
            score_name="val_acc",
            n_saved=1,
        )
        # on the evaluator once training starts: an evaluation that builds the trainer but never runs it (the Model
        # Zoo's check_properties of train.json + evaluate.json) keeps its own metrics
        trainer.add_event_handler(Events.STARTED, lambda _: self.watch(best_model))
        to_save = {**self.state, "trainer": trainer, "best_model": best_model, "settings": self.settings}
        if getattr(trainer, "scaler", None) is not None:
            to_save["scaler"] = trainer.scaler  # CUDA AMP gradient scaler
        checkpoint = Checkpoint(
            to_save,
            SafeDiskSaver(self.dirname),
            score_function=lambda engine: engine.state.epoch,
            score_name="epoch",
            n_saved=1,
            include_self=True,
        )
        trainer.add_event_handler(Events.EPOCH_COMPLETED, checkpoint)
        if self.resume_from:
            load = {**to_save, "checkpointer": checkpoint}
            if not os.path.isfile(os.path.join(self.dirname, self.model_file)):
                load.pop("best_model")
            CheckpointLoader(self.resume_from, load, map_location="cpu").attach(trainer)
            trainer.add_event_handler(Events.STARTED, self.remove_older)

    def watch(self, best_model: Checkpoint) -> None:
        if not self.evaluator.has_event_handler(best_model, Events.EPOCH_COMPLETED):
            self.evaluator.add_event_handler(Events.EPOCH_COMPLETED, best_model)

    def remove_older(self, trainer: Engine) -> None:
        """Remove the checkpoints older than the one resumed from (a kill after saving can leave two)."""
        for old in checkpoints(self.dirname):
            if checkpoint_epoch(old) < checkpoint_epoch(self.resume_from) and is_main_process():
                os.remove(old)
                logger.info(f"removed {old}, older than {self.resume_from}")


def checkpoint_epoch(path: str) -> int:
    """N of a ``checkpoint_epoch=N.pt`` path."""
    return int(re.search(r"epoch=(\d+)\.pt$", path).group(1))


def checkpoints(ckpt_dir: str) -> list[str]:
    """The ``checkpoint_epoch=N.pt`` files of ``ckpt_dir``, oldest epoch first."""
    return sorted(glob.glob(os.path.join(glob.escape(ckpt_dir), "checkpoint_epoch=*.pt")), key=checkpoint_epoch)


def check_resume(ckpt_dir: str, resume, epochs: int, batch_size: int, model_path: str, description=None) -> str:
    """With ``resume``, the newest ``checkpoint_epoch=N.pt`` of ``ckpt_dir`` (else ``""``), refused before any work
    if missing, unreadable, without run settings, past ``epochs``, of another ``batch_size`` or number of
    processes (ignite would keep the old epoch length), or trained for another ``description`` (classes,
    channels, size)."""
    if not resume:
        return ""
    beside = os.path.join(os.path.dirname(str(model_path)), FORMAT_FILE)
    if description is not None and os.path.isfile(beside):
        trained = ModelDescription.beside(str(model_path))
        differs = description.describes(trained)
        if differs:
            raise BundleError(
                f"--resume true, but this run's data and {ckpt_dir}'s model differ ({differs}).",
                "resume with the data and settings of that run, or train without --resume.",
            )
    found = checkpoints(ckpt_dir)
    if not found:
        raise BundleError(
            f"--resume true, but {ckpt_dir} holds no checkpoint_epoch=N.pt to resume from.",
            "train without --resume, or pass the --ckpt_dir of the run to continue.",
        )
    path = found[-1]
    fix = "delete it to resume from an older one, or train without --resume."
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # the run's own checkpoint
        trainer, saved = ckpt["trainer"], ckpt["settings"]
        done = int(trainer["epoch"]) if "epoch" in trainer else trainer["iteration"] // trainer["epoch_length"]
    except KeyError as e:
        raise BundleError(f"the checkpoint {path} lacks {e} (made by an older version?).", fix) from e
    except Exception as e:
        raise BundleError(f"cannot read the checkpoint {path} ({type(e).__name__}: {e}).", fix) from e
    if epochs < done:
        raise BundleError(
            f"--epochs {epochs} is less than the {done} epochs {path} has already trained.",
            f"pass --epochs {done + 1} or more to train further ({model_path} is the best model so far).",
        )
    if saved["batch_size"] != batch_size:
        raise BundleError(
            f"--batch_size {batch_size} differs from the {saved['batch_size']} that {path} was trained with.",
            f"resume with --batch_size {saved['batch_size']}, or train a new run without --resume.",
        )
    if saved["processes"] != world_size():
        raise BundleError(
            f"this run has {world_size()} process(es); {path} was trained by {saved['processes']}.",
            f"resume with {saved['processes']} process(es) (torchrun --nproc_per_node), or train a new run.",
        )
    if not os.path.isfile(model_path):
        logger.warning(f"{model_path} is missing: the next validation of the resumed run writes a new one")
    logger.info(f"resuming from {path} (epoch {done} of {epochs})")
    return path
