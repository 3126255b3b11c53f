"""Checks of the command-line overrides, run in the configs' ``initialize`` before any work starts."""

from __future__ import annotations

from scripts.errors import BundleError

_TRUE, _FALSE = ("true", "1", "yes", "y", "on"), ("false", "0", "no", "n", "off")


def as_bool(value, key: str) -> bool:
    """``value`` as a bool; fire hands ``--amp false`` over as the (truthy) string ``"false"``."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise BundleError(f"--{key} {value!r} is not a boolean.", f"pass --{key} true or --{key} false.")


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


def check_train_args(
    epochs,
    batch_size,
    accumulation_steps,
    learning_rate,
    val_frac,
    test_frac,
    val_interval,
    early_stop_patience,
    lr_patience,
    lr_factor,
    num_workers,
    cache_num_workers,
    seed,
    **flags,
) -> bool:
    """Stop with a message naming the key and the fix if any training hyper-parameter is out of range.

    ``flags`` are the boolean keys (``amp=@amp``, ...), each checked with :func:`as_bool`.
    """
    for key, value in flags.items():
        as_bool(value, key)
    for key, value, minimum in (
        ("epochs", epochs, 1),
        ("batch_size", batch_size, 1),
        ("accumulation_steps", accumulation_steps, 1),
        ("val_interval", val_interval, 1),
        ("early_stop_patience", early_stop_patience, 1),
        ("lr_patience", lr_patience, 0),
        ("num_workers", num_workers, 0),
        ("cache_num_workers", cache_num_workers, 1),
        ("seed", seed, 0),
    ):
        _integer(key, value, minimum)
    _number("learning_rate", learning_rate, 0.0)
    _number("lr_factor", lr_factor, 0.0, 1.0)
    _number("val_frac", val_frac, 0.0, 1.0)
    _number("test_frac", test_frac, 0.0, 1.0)
    if val_frac + test_frac >= 1:
        raise BundleError(
            f"--val_frac {val_frac} and --test_frac {test_frac} sum to {val_frac + test_frac:g}, "
            "leaving no training data.",
            "make their sum less than 1 (the defaults are 0.1 and 0.1).",
        )
    return True
