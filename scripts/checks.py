"""Checks of the command-line overrides, run first in each workflow, before any work starts."""

from __future__ import annotations

import ast
import difflib
import os
import sys

import torch

from .utils import BundleError, as_bool

# the options of `python -m monai.bundle run` itself, and the keys MONAI's experiment tracking adds
RUN_OPTIONS = {"run_id", "init_id", "final_id", "meta_file", "config_file", "logging_file", "tracking", "args_file"}
TRACKING_KEYS = {"tracking_uri", "experiment_name", "run_name", "save_execute_config", "output_dir"}


def _integer(key: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise BundleError(f"--{key} {value!r} is not an integer >= {minimum}.", f"pass e.g. --{key} {max(minimum, 1)}.")
    return value


def _number(key: str, value, low: float, high: float | None = None, closed: bool = False) -> float:
    """``value`` as a float in (low, high), or in [low, high] with ``closed``."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    inside = number and (low <= value if closed else low < value)
    if not (inside and (high is None or (value <= high if closed else value < high))):
        bounds = f"in [{low}, {high}]" if closed else f"in ({low}, {high})" if high is not None else f"> {low}"
        raise BundleError(f"--{key} {value!r} is not a number {bounds}.", f"pass a value {bounds}.")
    return float(value)


def config_ids(config, prefix: str = "") -> set[str]:
    """Every id of a config, nested ones as ``a#b#0``."""
    items = config.items() if isinstance(config, dict) else enumerate(config) if isinstance(config, list) else ()
    ids = set()
    for key, value in items:
        ids |= {f"{prefix}{key}"} | config_ids(value, f"{prefix}{key}#")
    return ids


def check_command_line(argv: list[str] | None = None) -> None:
    """Refuse a ``--key`` of ``python -m monai.bundle run`` that none of its config files declares (nor, for
    ``a#b#c``, its parent ``a#b``), naming the closest known key (``--epoch`` -> ``--epochs``): MONAI would add it
    to the config and ignore it."""
    from monai.bundle import ConfigParser

    argv = sys.argv if argv is None else argv
    if not argv or not argv[0].endswith(os.path.join("monai", "bundle", "__main__.py")) or "run" not in argv[1:2]:
        return  # not the command line (ConfigWorkflow, tests, the Model Zoo's CI)
    options = {}  # --key value and --key=value, as fire reads them
    for i, arg in enumerate(argv[2:], 2):
        if arg.startswith("--") and len(arg) > 2:
            key, _, value = arg[2:].partition("=")
            options[key.replace("-", "_")] = value or (argv[i + 1] if i + 1 < len(argv) else "")
    files = options.get("config_file")
    if not files:
        return
    try:
        files = ast.literal_eval(files) if files.strip().startswith("[") else files
        known = config_ids(ConfigParser.load_config_files(files)) | RUN_OPTIONS
    except Exception:
        return  # MONAI reports a config file it cannot read
    if "tracking" in options:
        known |= TRACKING_KEYS
    for key in options:  # a nested key may add an argument to a component the configs declare
        if key not in known and key.rpartition("#")[0] not in known:
            close = difflib.get_close_matches(key, sorted(k for k in known if "#" not in k), n=1, cutoff=0.6)
            hint = f"did you mean --{close[0]}? " if close else ""
            raise BundleError(
                f"--{key} is not a key of {files}.",
                f"{hint}The keys are those of the config files (README lists them).",
            )


def check_device(device) -> torch.device:
    """``device`` as a ``torch.device`` this machine has."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise BundleError(f"--device {device!r} is not a device ({e}).", "pass --device cpu or --device cuda:0.") from e
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise BundleError(f"--device {device} asks for CUDA, but no CUDA GPU is usable here.", "pass --device cpu.")
        if (device.index or 0) >= count:
            raise BundleError(
                f"--device {device}: this machine has {count} CUDA GPU(s).",
                f"pass --device cuda:0 .. cuda:{count - 1}.",
            )
    elif device.type != "cpu":
        raise BundleError(f"--device {device} is not supported.", "pass --device cpu or --device cuda:N.")
    return device


def check_image_size(image_size) -> list[int]:
    """``image_size`` as two integers of at least 32 (DenseNet121 halves the image five times)."""
    ok = isinstance(image_size, (list, tuple)) and len(image_size) == 2
    if not ok or any(isinstance(s, bool) or not isinstance(s, int) or s < 32 for s in image_size):
        raise BundleError(
            f"--image_size {image_size!r} is not two integers of at least 32.",
            "pass --image_size [64,64] (the size the model was trained at).",
        )
    return list(image_size)


def check_inference_args(device, batch_size, image_size, low_confidence, max_image_pixels, gradcam_layer, network):
    """Check the inference keys (and the command line's keys) before any work; ``gradcam_layer`` must name a module
    of ``network``."""
    check_command_line()
    check_device(device)
    _integer("batch_size", batch_size, 1)
    _integer("max_image_pixels", max_image_pixels, 1)
    _number("low_confidence", low_confidence, 0, 1, closed=True)
    check_image_size(image_size)
    if gradcam_layer not in dict(network.named_modules()):
        raise BundleError(
            f"--gradcam_layer {gradcam_layer!r} is not a layer of the network.",
            "pass a module name of network_def, e.g. features.transition2.relu (the default).",
        )


INTEGERS = {  # key: smallest value
    "epochs": 1,
    "batch_size": 1,
    "accumulation_steps": 1,
    "val_interval": 1,
    "val_per_epoch": 1,
    "val_batch_size": 1,
    "early_stop_patience": 1,
    "num_workers": 0,
    "cache_num_workers": 1,
    "seed": 0,
    "quick_images": 1,  # configs/quick.json
}
FRACTIONS = {  # key: (low, high, bounds included)
    "val_frac": (0.0, 1.0, False),
    "test_frac": (0.0, 1.0, False),
    "lr_warmup": (0, 1, True),
    "target_accuracy": (0, 1, True),
    "augment_prob": (0, 1, True),
    "rotate_degrees": (0, 180, True),
}
FLAGS = ("amp", "channels_last", "augment", "download", "resume", "skip_unreadable")
PER_SAMPLE = {"augment": True}  # what configs/per_sample.json's pipeline always does


def check_train_args(
    learning_rate, epoch_length, cpu_bf16, device, image_size, zoom_range, flip_axis, pipeline="batched", **keys
) -> None:
    """Check the training keys before any work (``keys``: those of :data:`INTEGERS`, :data:`FRACTIONS` and
    :data:`FLAGS`): one message naming the key and the fix if one is out of range, two contradict each other, the
    command line names a key the configs lack, or ``per_sample`` (configs/per_sample.json) cannot honour one."""
    check_command_line()
    unknown = set(keys) - set(INTEGERS) - set(FRACTIONS) - set(FLAGS)
    if unknown:
        raise TypeError(f"check_train_args got unexpected keys {sorted(unknown)}")
    flags = {key: as_bool(keys[key], key) for key in FLAGS if key in keys}
    numbers = {key: _integer(key, keys[key], low) for key, low in INTEGERS.items() if key in keys}
    numbers.update({key: _number(key, keys[key], *FRACTIONS[key]) for key in FRACTIONS if key in keys})
    _number("learning_rate", learning_rate, 0.0)
    if epoch_length is not None:
        _integer("epoch_length", epoch_length, 1)
    if str(cpu_bf16).strip().lower() != "auto":
        as_bool(cpu_bf16, "cpu_bf16")
    check_device(device)
    check_image_size(image_size)
    if flip_axis not in (0, 1) or isinstance(flip_axis, bool):
        raise BundleError(f"--flip_axis {flip_axis!r} is not 0 or 1.", "pass --flip_axis 0 or --flip_axis 1.")
    zoom = isinstance(zoom_range, (list, tuple)) and len(zoom_range) == 2
    if not zoom or not all(isinstance(z, (int, float)) and not isinstance(z, bool) and z > 0 for z in zoom_range):
        raise BundleError(
            f"--zoom_range {zoom_range!r} is not two numbers above 0.", "pass e.g. --zoom_range [0.9,1.1]."
        )
    if zoom_range[0] > zoom_range[1]:
        raise BundleError(
            f"--zoom_range {zoom_range!r} is not [low, high].", f"pass --zoom_range {sorted(zoom_range)}."
        )
    if numbers.get("val_interval", 1) > 1 and numbers.get("val_per_epoch", 1) > 1:
        raise BundleError(
            f"--val_interval {numbers['val_interval']} and --val_per_epoch {numbers['val_per_epoch']} are both "
            "above 1: validate either every N epochs or N times an epoch.",
            "leave one of them at 1.",
        )
    if numbers.get("val_interval", 1) > numbers.get("epochs", 1):
        raise BundleError(
            f"--val_interval {numbers['val_interval']} is more than --epochs {numbers['epochs']}: the run would "
            "never validate, so it would write no model.pt.",
            f"pass --val_interval {numbers['epochs']} or less, or more --epochs.",
        )
    if numbers.get("val_frac", 0) + numbers.get("test_frac", 0) >= 1:
        total = numbers["val_frac"] + numbers["test_frac"]
        raise BundleError(
            f"--val_frac {keys['val_frac']} and --test_frac {keys['test_frac']} sum to {total:g}, "
            "leaving no training data.",
            "make their sum less than 1 (the defaults are 0.1 and 0.1).",
        )
    for key, value in PER_SAMPLE.items() if pipeline == "per_sample" else ():
        given = flags.get(key, numbers.get(key))
        if given is not None and given != value:
            raise BundleError(
                f"--{key} {keys[key]!r}: configs/per_sample.json's per-sample pipeline always runs with {value}.",
                f"drop --{key}, or train with the default pipeline (configs/train.json alone).",
            )


def check_batches(images: int, batch_size: int) -> None:
    """Stop unless the training set fills at least one batch: each epoch leaves out the last partial batch."""
    if images < batch_size:
        raise BundleError(
            f"--batch_size {batch_size} is more than the {images} training images.",
            f"pass --batch_size {max(1, images)} or less, or train on more images.",
        )
