"""Training checkpoints: crash-safe saving, what they hold, and where a resumed run starts.

At every instant the newest complete ``checkpoint_epoch=N.pt`` and the best ``model.pt`` are on disk: a new file
is written beside its target, flushed to disk and renamed into place, and only then is the file it replaces
removed. A run killed at any moment loses at most the epoch in progress.
"""

from __future__ import annotations

import glob
import logging
import os
import re

import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint
from ignite.handlers.checkpoint import BaseSaveHandler
from monai.handlers import CheckpointLoader

from .utils import BundleError, as_bool, atomic_write, fsync_folder, is_main_process

logger = logging.getLogger(__name__)


class SafeDiskSaver(BaseSaveHandler):
    """ignite ``Checkpoint``'s save handler that writes the new file before removing the old one.

    ``Checkpoint`` asks its handler to remove the file it replaces before it saves the new one; ignite's
    ``DiskSaver`` (and so MONAI's ``CheckpointSaver``) obeys at once, so a kill between the two leaves no
    checkpoint. Here removals wait until the next file is safely in place (and a file replaced under the same
    name, as ``model.pt``, is not removed at all). Only the main process of a distributed run writes.
    """

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
    """The settings a resumed run must share with its checkpoint (together they set the epoch length), saved in
    it (``state_dict``) and checked by :func:`check_resume` before any work."""

    def __init__(self, batch_size: int):
        self.settings = {"batch_size": int(batch_size), "processes": world_size()}

    def state_dict(self) -> dict:
        return dict(self.settings)

    def load_state_dict(self, state: dict) -> None:
        """Nothing to restore: :func:`check_resume` refused the run if the saved settings differ."""


class TrainingCheckpoints:
    """What training saves, crash-safely (:class:`SafeDiskSaver`), and how a run resumes: a handler of the trainer.

    - ``model_path`` (``model.pt``): the network's weights at the validation of ``evaluator`` with the best
      accuracy so far (ignite's ``Checkpoint``);
    - ``checkpoint_epoch=N.pt`` beside it, after every epoch: ``state`` (network, optimizer, scheduler, early
      stop: anything with ``state_dict``), the trainer, its AMP scaler, the best-model record, the
      :class:`RunSettings` and this checkpoint's own record;
    - with ``resume_from`` (a checkpoint checked by :func:`check_resume`), all of it restored by MONAI's
      ``CheckpointLoader`` when the trainer starts (the best-model record only if ``model.pt`` is still there, so
      that the next validation writes a new one), then the older checkpoints a killed run left are removed.

    The trainer, and the savers that attach to it, are added when the trainer attaches this handler: the config
    cannot name the trainer in its own handler list. It comes after the history writer in that list: a run killed
    between the two has a history row that its resumed run writes again, never a checkpoint without its row.
    """

    def __init__(self, model_path: str, evaluator: Engine, state: dict, batch_size: int, resume_from: str = ""):
        unsaveable = [k for k, v in state.items() if not callable(getattr(v, "state_dict", None))]
        if unsaveable:
            raise TypeError(f"TrainingCheckpoints: {unsaveable} have no state_dict (a config reference gone astray?)")
        self.dirname, self.model_file = os.path.split(model_path)
        self.evaluator, self.state, self.resume_from = evaluator, dict(state), resume_from
        self.settings = RunSettings(batch_size)

    def attach(self, trainer: Engine) -> None:
        best_model = Checkpoint(
            {"model": self.state["model"]},
            SafeDiskSaver(self.dirname),
            filename_pattern=self.model_file,
            score_name="val_acc",
            n_saved=1,
        )
        self.evaluator.add_event_handler(Events.EPOCH_COMPLETED, best_model)
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

    def remove_older(self, trainer: Engine) -> None:
        """Remove the checkpoints older than the one resumed from (a run killed between writing its newest and
        removing the previous one leaves both)."""
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


def check_resume(ckpt_dir: str, resume, epochs: int, batch_size: int, model_path: str) -> str:
    """With ``resume``, the newest ``checkpoint_epoch=N.pt`` of ``ckpt_dir``, checked against this run before any
    work or file is written; without, ``""``.

    Refused in one message: no checkpoint, an unreadable one or one without run settings (made before version
    0.6.0), ``epochs`` below the epochs it already trained, a ``batch_size`` or number of processes other than the
    checkpoint's (ignite would keep the old epoch length and train on part of the data). A missing ``model.pt``
    is only warned about: the next validation writes a new one.
    """
    if not as_bool(resume, "resume"):
        return ""
    found = checkpoints(ckpt_dir)
    if not found:
        raise BundleError(
            f"--resume true, but {ckpt_dir} holds no checkpoint_epoch=N.pt to resume from.",
            "train without --resume, or pass the --ckpt_dir of the run to continue.",
        )
    path = found[-1]
    fix = "delete it to resume from an older one, or train without --resume."
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
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
