"""Training checkpoints: crash-safe saving (a run killed at any moment loses at most the epoch in progress), what
they hold, and where a resumed run starts."""

from __future__ import annotations

import glob
import logging
import os
import re

import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint
from ignite.handlers.checkpoint import BaseSaveHandler

from .calibration import arrays_path, calibration_path
from .errors import BundleError
from .files import atomic_write, fsync_folder, is_main_process
from .model_file import FORMAT_FILE, SUFFIXES, ModelDescription, read_checkpoint
from .networks import meta_state, size_of

logger = logging.getLogger(__name__)


class SafeDiskSaver(BaseSaveHandler):
    """ignite ``Checkpoint``'s save handler, writing the new file (atomically) before removing the one it replaces:
    ignite's ``DiskSaver`` (so MONAI's ``CheckpointSaver``) removes first, and a kill between leaves none. Only
    the main process writes."""

    def __init__(self, dirname: str):
        self.dirname, self._replaced = dirname, []

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


def derived_files(model_path: str) -> list[str]:
    """What is made from ``model_path``'s weights beside it: its calibration (and arrays) and the exports
    ``scripts.export`` writes there by default (``model.ts``, ``.pt2``, ``.onnx``)."""
    calibration = calibration_path(model_path)
    exports = [os.path.join(os.path.dirname(calibration), f"model{s}") for s in SUFFIXES if s != ".pt"]
    return [calibration, arrays_path(calibration), *exports]


def file_identity(path: str) -> tuple | None:
    """What changes when ``path`` is replaced (its inode and time), or None if there is no file."""
    try:
        found = os.stat(path)
    except FileNotFoundError:
        return None
    return found.st_ino, found.st_mtime_ns, found.st_size


class BestModel:
    """A validation handler: ``model_path``, ``network``'s weights at the evaluator's best ``score_name`` so far
    (ignite's ``Checkpoint`` with :class:`SafeDiskSaver`: MONAI's ``CheckpointSaver`` writes in place), and its
    ``description`` beside it before the first; the first it writes removes the exports and calibration beside it
    (:func:`derived_files`: made from the weights it replaced). ``state_dict``: the best score, for a resumed run, kept only
    while ``model_path`` exists."""

    def __init__(self, model_path: str, network, description, score_name: str = "val_acc"):
        self.path, self.description, self.described, self.replaced = str(model_path), description, False, False
        folder, name = os.path.split(self.path)
        self.checkpoint = Checkpoint({"model": network}, SafeDiskSaver(folder), filename_pattern=name,
                                     score_name=score_name, n_saved=1)  # fmt: skip

    def attach(self, evaluator: Engine) -> None:
        evaluator.add_event_handler(Events.EPOCH_COMPLETED, self.save)

    def save(self, evaluator: Engine) -> None:
        if not self.described and is_main_process():
            self.description.write(os.path.dirname(os.path.abspath(self.path)))
            self.described = True
        before = file_identity(self.path)
        self.checkpoint(evaluator)
        if not self.replaced and is_main_process() and file_identity(self.path) != before:
            self.replaced = True  # what was made from the weights replaced must not be loaded beside the new ones
            stale = [path for path in derived_files(self.path) if os.path.lexists(path)]
            for path in stale:
                os.remove(path)
            if stale:
                names = ", ".join(os.path.basename(p) for p in stale)
                logger.info(f"{self.path} replaced: removed {names}, made from the weights it held")

    def state_dict(self) -> dict:
        return self.checkpoint.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if os.path.isfile(self.path):
            self.checkpoint.load_state_dict(state)


class TrainingCheckpoint:
    """A trainer handler: after every epoch ``checkpoint_epoch=N.pt`` in ``ckpt_dir`` (:class:`SafeDiskSaver`, the
    older one removed) holding ``state`` (anything with a ``state_dict``), the trainer, its AMP scaler and the
    :class:`RunSettings`; with ``resume_from`` (:func:`check_resume`) all of it restored, from the bytes checked,
    when the trainer starts, then the older checkpoints removed."""

    def __init__(self, ckpt_dir: str, state: dict, batch_size: int, resume_from: str = ""):
        unsaveable = [k for k, v in state.items() if not callable(getattr(v, "state_dict", None))]
        if unsaveable:
            raise TypeError(f"TrainingCheckpoint: {unsaveable} have no state_dict (a config reference gone astray?)")
        self.dirname, self.resume_from = str(ckpt_dir), resume_from
        self.state = {**state, "settings": RunSettings(batch_size)}

    def attach(self, trainer: Engine) -> None:
        to_save = {**self.state, "trainer": trainer}
        if getattr(trainer, "scaler", None) is not None:
            to_save["scaler"] = trainer.scaler  # CUDA AMP gradient scaler
        checkpoint = Checkpoint(to_save, SafeDiskSaver(self.dirname), score_function=lambda e: e.state.epoch,
                                score_name="epoch", n_saved=1, include_self=True)  # fmt: skip
        trainer.add_event_handler(Events.EPOCH_COMPLETED, checkpoint)
        if self.resume_from:
            load = {**to_save, "checkpointer": checkpoint}
            trainer.add_event_handler(Events.STARTED, lambda engine: self.resume(engine, load))

    def resume(self, trainer: Engine, to_load: dict) -> None:
        weights = sum(t.numel() * t.element_size() for t in self.state["model"].state_dict().values())
        state = read_checkpoint(self.resume_from, weights)
        unknown = sorted(set(state) - set(to_load))[:1] or [k for k in to_load if k not in state][:1]
        if unknown:
            raise BundleError(f"the checkpoint {self.resume_from} has no {unknown[0]!r} of this run, or another.", FIX)
        for key, live in to_load.items():
            problem = state_problem(state[key], live, key)
            if problem:
                raise BundleError(f"the checkpoint {self.resume_from} is not this run's: its {problem}.", FIX)
        max_epochs = trainer.state.max_epochs  # this run's --epochs, not the checkpoint's (as MONAI's loader)
        Checkpoint.load_objects(to_load=to_load, checkpoint=state)
        trainer.state.max_epochs = max_epochs
        for old in checkpoints(self.dirname):  # a kill after saving can leave two
            if checkpoint_epoch(old) < checkpoint_epoch(self.resume_from) and is_main_process():
                os.remove(old)
                logger.info(f"removed {old}, older than {self.resume_from}")


FIX = "delete it to resume from an older one, or train without --resume."


def state_problem(found, live, where: str) -> str | None:
    """What in a checkpoint entry ``found`` is unlike what this run's ``live`` object writes (``state_dict``): the
    same keys, tensors of the same shape and dtype, numbers (an optimizer's per-parameter tensors: a scalar or
    its parameter's shape), strings under 4 KiB; else None."""
    expected = live.state_dict()
    if isinstance(live, torch.optim.Optimizer):  # its per-parameter state exists only once it has stepped
        shapes = dict(enumerate(p.shape for group in live.param_groups for p in group["params"]))
        moments = found.get("state") if isinstance(found, dict) else None
        if not isinstance(moments, dict) or set(found) != set(expected):
            return f"{where} is not an optimizer's state"
        for index, tensors in moments.items():
            ok = index in shapes and isinstance(tensors, dict) and len(tensors) <= 8
            if not ok or not all(torch.is_tensor(t) and t.shape in ((), shapes[index]) for t in tensors.values()):
                return f"{where}'s state of parameter {str(index)[:20]} is not of its shape"
        found, expected = found["param_groups"], expected["param_groups"]
        where = f"{where}'s param_groups"
    return form_problem(found, expected, where)


def form_problem(found, expected, where: str) -> str | None:
    """Where ``found`` is not of ``expected``'s form (see :func:`state_problem`), else None."""
    number = (int, float)
    if torch.is_tensor(expected):
        same = torch.is_tensor(found) and found.shape == expected.shape and found.dtype == expected.dtype
        return None if same else f"{where} is not a {expected.dtype} tensor of {tuple(expected.shape)}"
    if isinstance(expected, bool) or expected is None and isinstance(found, bool):
        return None if isinstance(found, bool) else f"{where} is not true or false"
    if expected is None or isinstance(expected, number):  # a best score is None until there is one
        plain = found is None or isinstance(found, number) and not isinstance(found, bool)
        return None if plain and (found is None or abs(found) < 2**63) else f"{where} is not a number"
    if isinstance(expected, str):
        return None if isinstance(found, str) and len(found) < 4096 else f"{where} is not a short text"
    if isinstance(expected, dict):
        if not isinstance(found, dict) or set(found) != set(expected):
            return f"{where} has other keys than this run's"
        return next((p for k in expected if (p := form_problem(found[k], expected[k], f"{where}.{k}"))), None)
    if isinstance(expected, (list, tuple)):
        if not isinstance(found, (list, tuple)) or len(found) > max(len(expected), 64):
            return f"{where} is not a list of this run's length"
        if not expected:  # a checkpoint record's saved files: pairs of a number and a file name
            pairs = all(isinstance(x, (list, tuple)) and len(x) == 2 for x in found)
            ok = pairs and not any(form_problem(x[0], 0, where) or form_problem(x[1], "", where) for x in found)
            return None if ok else f"{where} is not a list of (score, file name)"
        if len(found) != len(expected):
            return f"{where} has {len(found)} items, not {len(expected)}"
        return next(
            (p for i, (a, b) in enumerate(zip(found, expected)) if (p := form_problem(a, b, f"{where}[{i}]"))), None
        )
    return f"{where} is {type(found).__name__}"


def checkpoint_epoch(path: str) -> int:
    """N of a ``checkpoint_epoch=N.pt`` path."""
    return int(re.search(r"epoch=(\d+)\.pt$", path).group(1))


def checkpoints(ckpt_dir: str) -> list[str]:
    """The ``checkpoint_epoch=N.pt`` files of ``ckpt_dir``, oldest epoch first."""
    return sorted(glob.glob(os.path.join(glob.escape(ckpt_dir), "checkpoint_epoch=*.pt")), key=checkpoint_epoch)


def check_resume(ckpt_dir: str, resume, epochs: int, batch_size: int, model_path: str, description) -> str:
    """With ``resume``, the newest ``checkpoint_epoch=N.pt`` of ``ckpt_dir`` (else ``""``), refused before any work
    if missing, not as the bundle writes it (:func:`~scripts.model_file.read_checkpoint`), without run settings,
    past ``epochs``, of another ``batch_size`` or number of processes (ignite would keep the old epoch length), or
    trained for another ``description`` (classes, channels, size, network). Without ``resume``, a model already in
    ``ckpt_dir`` of another description is refused too: a run replaces only a model of its own kind."""
    beside = os.path.join(os.path.dirname(str(model_path)), FORMAT_FILE)
    if os.path.lexists(str(model_path)) or (resume and os.path.isfile(beside)):  # a model there, or its run
        differs = description.describes(ModelDescription.beside(str(model_path)))[:400]
        if differs and resume:
            raise BundleError(
                f"--resume true, but this run's data and {ckpt_dir}'s model differ ({differs}).",
                "resume with the data and settings of that run, or train without --resume into a new --ckpt_dir "
                "and --output_dir.",
            )
        if differs:
            raise BundleError(
                f"--ckpt_dir {ckpt_dir} holds another model ({differs}): this training would replace it.",
                "pass a new --ckpt_dir and --output_dir for this model (the README: Train on your own images), "
                f"or move {model_path} and its files away to replace it.",
            )
    if not resume:
        return ""
    found = checkpoints(ckpt_dir)
    if not found:
        raise BundleError(
            f"--resume true, but {ckpt_dir} holds no checkpoint_epoch=N.pt to resume from.",
            "train without --resume, or pass the --ckpt_dir of the run to continue.",
        )
    path, fix = found[-1], FIX
    ckpt = read_checkpoint(path, size_of(description.network_def))
    try:
        trainer, saved = ckpt["trainer"], ckpt["settings"]
        done = int(trainer["epoch"]) if "epoch" in trainer else trainer["iteration"] // trainer["epoch_length"]
        saved = {"batch_size": int(saved["batch_size"]), "processes": int(saved["processes"])}
        if not 0 <= done < 2**31:
            raise ValueError(f"epoch {done}")
    except KeyError as e:
        raise BundleError(f"the checkpoint {path} lacks {str(e)[:80]} (made by an older version?).", fix) from e
    except (TypeError, ValueError, ZeroDivisionError, AttributeError) as e:
        raise BundleError(
            f"the checkpoint {path} holds a trainer state the bundle does not write ({str(e)[:80]}).", fix
        ) from e
    found_shapes = {k: tuple(v.shape) for k, v in ckpt["model"].items() if torch.is_tensor(v)}
    shapes = {k: tuple(t.shape) for k, t in meta_state(description.network_def, "network_def").items()}
    if found_shapes != shapes:
        raise BundleError(f"the checkpoint {path} does not hold the weights of {ckpt_dir}'s network.", fix)
    moments = ckpt.get("optimizer", {}).get("state", {}) if isinstance(ckpt.get("optimizer"), dict) else None
    tensors = (
        [t for v in moments.values() if isinstance(v, dict) for t in v.values()] if isinstance(moments, dict) else [1]
    )
    if not all(torch.is_tensor(t) and tuple(t.shape) in {(), *shapes.values()} for t in tensors):
        raise BundleError(f"the checkpoint {path} holds optimizer state of another shape than its weights.", fix)
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
