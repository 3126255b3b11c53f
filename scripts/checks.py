"""Command-line values, checked before any work: each key's rule is declared once in :data:`RULES`; a workflow's
``check`` gives the keys it uses and gets back their values converted (``"false"`` to ``False``), which the
components then read, so that a key with no rule, or a rule no workflow checks, is an error, never silently
unchecked. The command line's keys must be the configs' (``--epoch`` is refused: "did you mean --epochs?")."""

from __future__ import annotations

import difflib
import math
import operator
import os
import re

import torch

from . import networks
from .errors import BundleError, report_errors_briefly

# the options of `python -m monai.bundle run` itself, and the keys MONAI's experiment tracking adds
RUN_OPTIONS = {"run_id", "init_id", "final_id", "meta_file", "config_file", "logging_file", "tracking", "args_file"}
TRACKING_KEYS = {"tracking_uri", "experiment_name", "run_name", "save_execute_config", "output_dir"}
TRUE, FALSE = ("true", "1", "yes", "y", "on"), ("false", "0", "no", "n", "off")
MAX_CLASSES = 1000
CLASS_NAME = re.compile(r"[^\W_][\w .+-]{0,63}")  # a letter or digit first, so that no CSV cell is a formula


def as_bool(value, key: str) -> bool:
    """``value`` as a bool; the command line hands ``--amp false`` over as the (truthy) string ``"false"``."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in TRUE:
        return True
    if text in FALSE:
        return False
    raise BundleError(f"--{key} {value!r} is not a boolean.", f"pass --{key} true or --{key} false.")


def integer(minimum: int):
    def rule(key, value):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise BundleError(
                f"--{key} {value!r} is not an integer >= {minimum}.", f"pass e.g. --{key} {max(minimum, 1)}."
            )
        return value

    return rule


def number(low: float, high: float | None = None, closed: bool = False):
    """A float in (low, high), or [low, high] with ``closed``."""

    def rule(key, value):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        below = operator.le if closed else operator.lt
        ok = ok and below(low, value) and (high is None or below(value, high))
        if not ok:
            bounds = f"in [{low}, {high}]" if closed else f"in ({low}, {high})" if high is not None else f"> {low}"
            raise BundleError(f"--{key} {value!r} is not a number {bounds}.", f"pass a value {bounds}.")
        return float(value)

    return rule


def one_of(*choices):
    def rule(key, value):
        if isinstance(value, bool) or value not in choices:
            listed = " or ".join(repr(c) if isinstance(c, str) else str(c) for c in choices)
            raise BundleError(f"--{key} {value!r} is not {listed}.", f"pass --{key} {choices[0]}.")
        return value

    return rule


def optional(rule):
    return lambda key, value: None if value is None else rule(key, value)


def flag(key, value) -> bool:
    return as_bool(value, key)


def bf16_setting(key, value):
    return "auto" if str(value).strip().lower() == "auto" else as_bool(value, key)


def check_device(key, device) -> torch.device:
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


def image_size(key, value) -> list[int]:
    """Two integers in [32, 4096] (DenseNet121 halves the image five times)."""
    ok = isinstance(value, (list, tuple)) and len(value) == 2
    if not ok or any(isinstance(s, bool) or not isinstance(s, int) or not 32 <= s <= 4096 for s in value):
        raise BundleError(f"--{key} {value!r} is not two integers in [32, 4096].", f"pass e.g. --{key} [64,64].")
    return list(value)


def port(key, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise BundleError(f"--{key} {value!r} is not a port number in [1, 65535].", f"pass e.g. --{key} 8080.")
    return value


def zoom_range(key, value) -> list[float]:
    ok = isinstance(value, (list, tuple)) and len(value) == 2
    if not ok or not all(isinstance(z, (int, float)) and not isinstance(z, bool) and z > 0 for z in value):
        raise BundleError(f"--{key} {value!r} is not two numbers above 0.", f"pass e.g. --{key} [0.9,1.1].")
    if value[0] > value[1]:
        raise BundleError(f"--{key} {value!r} is not [low, high].", f"pass --{key} {sorted(value)}.")
    return [float(z) for z in value]


def text(key, value):
    if value is not None and not isinstance(value, str):
        raise BundleError(f"--{key} {value!r} is not a text.", f"pass --{key} NAME.")
    return value


def inputs(key, value):
    """A path or a list of paths (or none)."""
    return [path(key, v) for v in value] if isinstance(value, (list, tuple)) else path(key, value)


def path(key, value):
    """A file or folder path (or none): not checked for existence here, by the step that reads it."""
    if value is not None and not isinstance(value, (str, os.PathLike)):
        raise BundleError(f"--{key} {value!r} is not a path.", f"pass --{key} PATH.")
    return None if value in (None, "") else os.fspath(value)


RULES = {  # every key a workflow's check gives, with its rule
    "epochs": integer(1),
    "epoch_length": optional(integer(1)),
    "batch_size": integer(1),
    "accumulation_steps": integer(1),
    "learning_rate": number(0.0),
    "lr_warmup": number(0, 1, closed=True),
    "val_frac": number(0.0, 1.0),
    "test_frac": number(0.0, 1.0),
    "val_interval": integer(1),
    "val_per_epoch": integer(1),
    "target_accuracy": number(0, 1, closed=True),
    "val_batch_size": integer(1),
    "early_stop_patience": integer(1),
    "num_workers": integer(0),
    "cache_num_workers": integer(1),
    "seed": integer(0),
    "quick_images": integer(1),
    "augment_prob": number(0, 1, closed=True),
    "rotate_degrees": number(0, 180, closed=True),
    "zoom_range": zoom_range,
    "flip_axis": one_of(0, 1),
    "in_channels": one_of(1, 3),
    "image_size": image_size,
    "class_weights": one_of("none", "balanced"),
    "pretrained_lr_factor": number(0, 1, closed=True),
    "pretrained": path,
    "datalist": path,
    "dataset_dir": path,
    "device": check_device,
    "cpu_bf16": bf16_setting,
    "cpu_threads": integer(0),
    "amp": flag,
    "channels_last": flag,
    "augment": flag,
    "download": flag,
    "resume": flag,
    "skip_unreadable": flag,
    "low_confidence": number(0, 1, closed=True),
    "max_image_pixels": integer(1),
    "visualize": optional(lambda key, value: "auto" if value == "auto" else as_bool(value, key)),
    "gradcam_layer": text,
    "pipeline": one_of("batched", "per_sample"),
    "download_md5": text,
    "input": inputs,
    "host": text,
    "port": port,
    "replicas": integer(1),
    "token_file": path,
    "insecure": flag,
    "max_request_bytes": integer(1),
    "max_file_bytes": integer(1),
    "batch_wait_s": number(0, 1, closed=True),
    "max_queued": integer(1),
    "network": lambda key, value: networks.classifier(value) and value,
    **dict.fromkeys(
        ("bundle_root", "output_dir", "ckpt_dir", "ckpt_path", "split_file", "tensorboard_dir", "download_url",
         "input_list", "model_file", "eval_dir"),
        path,
    ),  # fmt: skip
}


def check_command_line(argv: list[str], known: set[str]) -> None:
    """Refuse a ``--key`` of ``python -m monai.bundle run`` (``argv``) that is not one of the ``known`` keys the
    workflow checks (``a#b`` keys, overriding a component's argument, aside), naming the closest
    (``--epoch`` -> ``--epochs``): MONAI would add it to the config and ignore it."""
    if not argv or not argv[0].endswith(os.path.join("monai", "bundle", "__main__.py")) or "run" not in argv[1:2]:
        return  # not the command line (ConfigWorkflow, tests, the Model Zoo's CI)
    options = {}  # --key value and --key=value, as fire reads them
    for i, arg in enumerate(argv[2:], 2):
        if arg.startswith("--") and len(arg) > 2:
            key, _, value = arg[2:].partition("=")
            options[key.replace("-", "_")] = value or (argv[i + 1] if i + 1 < len(argv) else "")
    known = set(known) | RUN_OPTIONS
    if "tracking" in options:
        known |= TRACKING_KEYS
        if not options["tracking"].lower().endswith((".json", ".yaml", ".yml")):
            raise BundleError(
                f"--tracking {options['tracking']}: MONAI's built-in tracking settings read the loss of every "
                "iteration as a list, which this bundle's batched training does not give.",
                "pass --tracking configs/mlflow.json (this bundle's MLflow settings, see README).",
            )
    for key in options:
        if key not in known and "#" not in key:
            close = difflib.get_close_matches(key, sorted(known - RUN_OPTIONS), n=1, cutoff=0.6)
            hint = f"did you mean --{close[0]}? " if close else ""
            raise BundleError(f"--{key} is not a key of this workflow.", f"{hint}The keys are those the README lists.")


def check_values(argv=None, **keys) -> dict:
    """The first step of every workflow: from here on a ``BundleError`` ending the process prints as one message
    (:func:`~scripts.errors.report_errors_briefly`); then the command line ``argv`` (the configs give
    ``sys.argv``; None from Python) and ``keys``, checked by their :data:`RULES` and converted: one message naming
    the key and the fix for the first bad one."""
    report_errors_briefly()
    unknown = set(keys) - set(RULES)
    if unknown:
        raise TypeError(f"check_values got keys without a rule in scripts.checks.RULES: {sorted(unknown)}")
    check_command_line(argv or [], set(keys))
    return {key: RULES[key](key, value) for key, value in keys.items()}


def check_training(**keys) -> dict:
    """The training keys (:func:`check_values`), then the rules between them: one message naming the key and the
    fix if one is out of range, two contradict each other, or ``per_sample`` (configs/per_sample.json) cannot
    honour one."""
    values = check_values(**keys)
    if values.get("val_interval", 1) > 1 and values.get("val_per_epoch", 1) > 1:
        raise BundleError(
            f"--val_interval {values['val_interval']} and --val_per_epoch {values['val_per_epoch']} are both "
            "above 1: validate either every N epochs or N times an epoch.",
            "leave one of them at 1.",
        )
    if values.get("val_interval", 1) > values.get("epochs", 1):
        raise BundleError(
            f"--val_interval {values['val_interval']} is more than --epochs {values['epochs']}: the run would "
            "never validate, so it would write no model.pt.",
            f"pass --val_interval {values['epochs']} or less, or more --epochs.",
        )
    if values.get("val_frac", 0) + values.get("test_frac", 0) >= 1:
        total = values["val_frac"] + values["test_frac"]
        raise BundleError(
            f"--val_frac {keys['val_frac']} and --test_frac {keys['test_frac']} sum to {total:g}, "
            "leaving no training data.",
            "make their sum less than 1 (the defaults are 0.1 and 0.1).",
        )
    if values.get("pipeline") == "per_sample" and values.get("augment", True) is not True:  # it always augments
        raise BundleError(
            f"--augment {keys['augment']!r}: configs/per_sample.json's per-sample pipeline always runs with True.",
            "drop --augment, or train with the default pipeline (configs/train.json alone).",
        )
    return values


def check_class_names(classes, source: str) -> list[str]:
    """``classes`` as a list of 2 to :data:`MAX_CLASSES` distinct names of :data:`CLASS_NAME`'s form."""
    names = list(classes) if isinstance(classes, (list, tuple)) else None
    if names is None or not 2 <= len(names) <= MAX_CLASSES:
        raise BundleError(f"{source} names {len(names or ())} classes.", "a classifier needs 2 to 1000 classes.")
    from .predictions import AFTER, BEFORE

    bad = [n for n in names if not isinstance(n, str) or not CLASS_NAME.fullmatch(n)]
    if bad:
        raise BundleError(
            f"{source} has the class name {str(bad[0])[:70]!r}.",
            "name classes with letters, digits, spaces and . + - _ (a letter or digit first, 64 at most).",
        )
    owned = {n.lower() for n in (*BEFORE, *AFTER, "macro_avg", "weighted_avg")}  # predictions.csv's, metrics'
    taken = [n for n in names if n.lower() in owned]
    if taken:
        raise BundleError(
            f"{source} has the class name {taken[0]!r}, a column of predictions.csv (or a name of metrics.json).",
            f"rename it (e.g. {taken[0]}_class): the outputs own the names {', '.join(sorted(owned))}.",
        )
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise BundleError(f"{source} names the class {twice[0]!r} twice.", "give each class one name.")
    return names
