"""Build classification tasks that are not MedNIST's six classes from a copy of MedNIST, to measure the bundle on
"your own images" (the model card's figures):

    python -m tools.own_data --dataset_dir /path/holding/MedNIST --out /tmp/tasks [--holdout_split split.json]
                             [--per_class 800] [--seed 0]

Developer tooling (not part of the release). Writes, under ``out``:

- ``modality/{CT,MR,Radiograph}/``: colour PNGs of 96x80 (width x height), each image given a random tint so that
  colour tells no class apart, imbalanced 3:2:1: ``per_class`` images of each of AbdomenCT, ChestCT and HeadCT are
  CT, of CXR and Hand Radiograph, of BreastMRI MR. With ``--holdout_split`` (a training run's split.json) the
  images come from its test split only, so that a model trained on that run never saw them;
- ``fewshot.csv``: the same images as a CSV with a ``split`` column: 10 of each class for training, 10 for
  validation, 300 for test (fine-tuning against training from scratch);
- ``chest_or_abdomen.csv``: a two-class task from a CSV (ChestCT as ``chest``, AbdomenCT as ``abdomen``, 1,500
  of each, MedNIST's own JPEGs named by paths relative to the CSV), the bundle making the split.
"""

from __future__ import annotations

import csv
import json
import os
import random
import sys

import fire
import numpy as np
from PIL import Image

from scripts.data import ImageData, images_by_class

MODALITY = {"CT": ("AbdomenCT", "ChestCT", "HeadCT"), "Radiograph": ("CXR", "Hand"), "MR": ("BreastMRI",)}
SIZE = (96, 80)  # width, height
FEWSHOT = {"training": 10, "validation": 10, "test": 300}


def _pool(root: str, holdout_split: str | None) -> dict[str, list[str]]:
    """MedNIST's image paths per class: all of them, or only a split file's test images."""
    if not holdout_split:
        found = images_by_class(root, sorted({c for cs in MODALITY.values() for c in cs}), "dataset_dir")
        return {c: [os.path.join(root, f) for f in files] for c, files in found.items()}
    with open(holdout_split) as f:
        test = json.load(f)["test"]
    pool: dict[str, list[str]] = {}
    for item in test:
        pool.setdefault(item["image"].split("/")[-2], []).append(os.path.join(root, item["image"]))
    return pool


def _tinted(source: str, target: str, rng: np.random.Generator) -> None:
    gray = np.asarray(Image.open(source).convert("L").resize(SIZE, Image.BILINEAR), np.float32)
    rgb = gray[..., None] * rng.uniform(0.6, 1.0, 3)
    Image.fromarray(rgb.clip(0, 255).astype(np.uint8), "RGB").save(target)


def own_data(dataset_dir: str, out: str, holdout_split: str = "", per_class: int = 800, seed: int = 0) -> None:
    root = ImageData(dataset_dir, "", download=False).root
    if os.path.exists(out):
        sys.exit(f"ERROR: {out} exists. Fix: pass a new --out.")
    pool, rand, rng = _pool(root, holdout_split or None), random.Random(seed), np.random.default_rng(seed)
    short = {c: len(pool.get(c, [])) for cs in MODALITY.values() for c in cs if len(pool.get(c, [])) < per_class}
    if short:
        sys.exit(f"ERROR: fewer than --per_class {per_class} images of {short}. Fix: a smaller --per_class.")
    rows = []
    for modality, sources in MODALITY.items():
        os.makedirs(os.path.join(out, "modality", modality))
        for source in sources:
            for path in rand.sample(pool[source], per_class):
                name = f"{source}_{os.path.splitext(os.path.basename(path))[0]}.png"
                _tinted(path, os.path.join(out, "modality", modality, name), rng)
                rows.append({"image": os.path.join("modality", modality, name), "label": modality})
    with open(os.path.join(out, "fewshot.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, ["image", "label", "split"])
        writer.writeheader()
        for modality in MODALITY:
            mine = rand.sample([r for r in rows if r["label"] == modality], sum(FEWSHOT.values()))
            splits = [s for s, n in FEWSHOT.items() for _ in range(n)]
            writer.writerows({**row, "split": split} for row, split in zip(mine, splits))
    everything = images_by_class(root, ["ChestCT", "AbdomenCT"], "dataset_dir")
    with open(os.path.join(out, "chest_or_abdomen.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, ["image", "label"])
        writer.writeheader()
        for source, label in (("ChestCT", "chest"), ("AbdomenCT", "abdomen")):
            for name in rand.sample(everything[source], 1500):
                writer.writerow({"image": os.path.relpath(os.path.join(root, name), out), "label": label})
    counts = {m: len(os.listdir(os.path.join(out, "modality", m))) for m in MODALITY}
    print(f"wrote {out}: modality/ {counts}, fewshot.csv {FEWSHOT} per class, chest_or_abdomen.csv 2 x 1500")


if __name__ == "__main__":
    fire.Fire(own_data)
