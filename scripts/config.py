"""The bundle's configs as MONAI parses them, for the commands and tools that build pieces of a workflow."""

from __future__ import annotations

import os

BUNDLE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(BUNDLE_ROOT, "configs")


def bundle_parser(*names: str, **overrides):
    """MONAI's ``ConfigParser`` for ``configs/<name>.json`` (merged in order, e.g. ``"train", "evaluate"``) with the
    bundle's metadata and ``overrides``, its ``bundle_root`` this bundle's folder unless given."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([os.path.join(CONFIGS, f"{name}.json") for name in names])
    parser.read_meta(os.path.join(CONFIGS, "metadata.json"))
    parser.update({"bundle_root": BUNDLE_ROOT, **overrides})
    return parser


def preprocessing(image_size, in_channels: int = 1):
    """configs/inference.json's ``preprocessing`` (the one definition, used by training and evaluation too) for
    ``image_size`` and ``in_channels``."""
    return bundle_parser("inference", image_size=list(image_size), in_channels=int(in_channels)).get_parsed_content(
        "preprocessing"
    )
