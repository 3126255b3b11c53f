"""Checks of the command-line overrides, run first in each workflow, before any work starts."""

from __future__ import annotations

from .utils import BundleError, as_bool


def _integer(key: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise BundleError(f"--{key} {value!r} is not an integer >= {minimum}.", f"pass e.g. --{key} {max(minimum, 1)}.")
    return value


def _number(key: str, value, low: float, high: float | None = None) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > low
    if not ok or (high is not None and value >= high):
        bounds = f"in ({low}, {high})" if high is not None else f"> {low}"
        raise BundleError(f"--{key} {value!r} is not a number {bounds}.", f"pass a value {bounds}.")
    return float(value)


INTEGERS = {
    "epochs": 1,
    "batch_size": 1,
    "accumulation_steps": 1,
    "val_interval": 1,
    "val_batch_size": 1,
    "early_stop_patience": 1,
    "lr_patience": 0,
    "num_workers": 0,
    "cache_num_workers": 1,
    "seed": 0,
}
FLAGS = ("amp", "cpu_bf16", "channels_last", "augment", "download", "resume", "skip_unreadable")


def check_train_args(learning_rate, lr_factor, val_frac, test_frac, **args) -> dict:
    """The training keys, checked: stop with a message naming the key and the fix if one is out of range.

    ``args`` holds the integer keys of :data:`INTEGERS` and the boolean keys of :data:`FLAGS`; the result maps
    every key to its value, the booleans parsed (``--amp false`` arrives as a string).
    """
    unknown = set(args) - set(INTEGERS) - set(FLAGS)
    if unknown:
        raise TypeError(f"check_train_args got unexpected keys {sorted(unknown)}")
    checked = {key: as_bool(args[key], key) for key in FLAGS if key in args}
    checked.update({key: _integer(key, args[key], low) for key, low in INTEGERS.items() if key in args})
    checked["learning_rate"] = _number("learning_rate", learning_rate, 0.0)
    checked["lr_factor"] = _number("lr_factor", lr_factor, 0.0, 1.0)
    checked["val_frac"] = _number("val_frac", val_frac, 0.0, 1.0)
    checked["test_frac"] = _number("test_frac", test_frac, 0.0, 1.0)
    if val_frac + test_frac >= 1:
        raise BundleError(
            f"--val_frac {val_frac} and --test_frac {test_frac} sum to {val_frac + test_frac:g}, "
            "leaving no training data.",
            "make their sum less than 1 (the defaults are 0.1 and 0.1).",
        )
    return checked
