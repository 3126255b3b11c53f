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
from ignite.handlers.checkpoint import BaseSaveHandler

from .utils import BundleError, as_bool, atomic_write, fsync_folder, is_main_process

logger = logging.getLogger(__name__)


class SafeDiskSaver(BaseSaveHandler):
    """ignite ``Checkpoint``'s save handler that writes the new file before removing the old one.

    ``Checkpoint`` asks its handler to remove the file it replaces before it saves the new one; ignite's
    ``DiskSaver`` obeys at once, so a kill between the two leaves no checkpoint. Here removals wait until the
    next file is safely in place (and a file replaced under the same name, as ``model.pt``, is not removed at
    all). Only the main process of a distributed run writes.
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


def training_state(network, optimizer, lr_scheduler, trainer, early_stop, best_model_saver, settings) -> dict:
    """Everything a resumed run needs, for the last-epoch checkpoint and for ``CheckpointLoader``: besides the
    network, optimizer, scheduler and trainer, ignite's ``EarlyStopping`` (its counter and best score), the
    ``Checkpoint`` writing ``model.pt`` (the best validation accuracy so far) and the :class:`RunSettings`."""
    state = {
        "model": network,
        "optimizer": optimizer,
        "lr_scheduler": lr_scheduler,
        "trainer": trainer,
        "early_stop": early_stop,
        "best_model": best_model_saver,
        "settings": settings,
    }
    if getattr(trainer, "scaler", None) is not None:
        state["scaler"] = trainer.scaler  # CUDA AMP gradient scaler
    return state


def checkpoint_epoch(path: str) -> int:
    """N of a ``checkpoint_epoch=N.pt`` path."""
    return int(re.search(r"epoch=(\d+)\.pt$", path).group(1))


def checkpoints(ckpt_dir: str) -> list[str]:
    """The ``checkpoint_epoch=N.pt`` files of ``ckpt_dir``, oldest epoch first."""
    return sorted(glob.glob(os.path.join(glob.escape(ckpt_dir), "checkpoint_epoch=*.pt")), key=checkpoint_epoch)


def check_resume(ckpt_dir: str, resume, epochs: int, batch_size: int, model_path: str) -> str:
    """With ``resume``, the newest ``checkpoint_epoch=N.pt`` of ``ckpt_dir``, checked against this run before any
    work or file is written; without, ``""``.

    Refused in one message: no checkpoint, an unreadable one, ``epochs`` below the epochs it already trained, a
    ``batch_size`` or number of processes other than the checkpoint's (ignite would keep the old epoch length and
    train on part of the data). A missing ``model.pt`` is only warned about: the next validation writes a new one.
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
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        trainer = ckpt["trainer"]
        done = (
            int(trainer["epoch"]) if "epoch" in trainer else int(trainer["iteration"]) // int(trainer["epoch_length"])
        )
    except Exception as e:
        raise BundleError(
            f"cannot read the checkpoint {path} ({type(e).__name__}: {e}).",
            "delete it to resume from an older one, or train without --resume.",
        ) from e
    if epochs < done:
        raise BundleError(
            f"--epochs {epochs} is less than the {done} epochs {path} has already trained.",
            f"pass --epochs {done + 1} or more to train further ({model_path} is the best model so far).",
        )
    saved = ckpt.get("settings", {})
    if saved.get("batch_size", batch_size) != batch_size:
        raise BundleError(
            f"--batch_size {batch_size} differs from the {saved['batch_size']} that {path} was trained with.",
            f"resume with --batch_size {saved['batch_size']}, or train a new run without --resume.",
        )
    if saved.get("processes", world_size()) != world_size():
        raise BundleError(
            f"this run has {world_size()} process(es); {path} was trained by {saved['processes']}.",
            f"resume with {saved['processes']} process(es) (torchrun --nproc_per_node), or train a new run.",
        )
    if not os.path.isfile(model_path):
        logger.warning(f"{model_path} is missing: the next validation of the resumed run writes a new one")
    logger.info(f"resuming from {path} (epoch {done} of {epochs})")
    return path


def resume_state(state: dict, checkpointer, checkpoint: str, model_path: str) -> dict:
    """What ``CheckpointLoader`` restores from ``checkpoint``: ``state`` and the ``checkpointer`` itself.

    The ``model.pt`` saver's record is left out when ``model.pt`` is gone (so the next validation writes it),
    and the settings when an older checkpoint has none. Older ``checkpoint_epoch=N.pt`` files, left by a run
    killed between writing its newest checkpoint and removing the previous one, are removed.
    """
    load = {**state, "checkpointer": checkpointer}
    if not checkpoint:  # not resuming: the loader is made but never attached
        return load
    keys = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True).keys()
    if not os.path.isfile(model_path):
        load.pop("best_model")
    if "settings" not in keys:
        load.pop("settings")
    for old in checkpoints(os.path.dirname(checkpoint)):
        if checkpoint_epoch(old) < checkpoint_epoch(checkpoint):
            os.remove(old)
            logger.info(f"removed {old}, older than {checkpoint}")
    return load
