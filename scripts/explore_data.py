"""Explore a MedNIST-layout folder: class counts, image sizes and intensity statistics, sample grid PNG.

python -m scripts.explore_data --data_dir data/MedNIST [--out samples.png] [--per_class 5]
"""

from __future__ import annotations

import os

import fire
import numpy as np
from PIL import Image

from .data import CLASSES, IMAGE_FORMATS, check_class_folders, mednist_root
from .utils import BundleError, pyplot, save_figure


def explore(
    data_dir: str = "data/MedNIST", out: str = "outputs/mednist_samples.png", per_class: int = 5, seed: int = 0
):
    """Print the per-class table and save a grid of ``per_class`` random samples per class to ``out``."""
    if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1:
        raise BundleError(f"--per_class {per_class!r} is not an integer >= 1.", "pass e.g. --per_class 5.")
    data_dir = mednist_root(data_dir)  # the class folders' parent, or the dataset_dir that holds MedNIST/
    found = check_class_folders(data_dir, key="data_dir")
    rng = np.random.default_rng(seed)
    print(f"{'class':<12}{'images':>8}{'size (WxH)':>16}{'mean':>8}{'std':>8}{'min':>6}{'max':>6}")
    samples = {}
    for cls in CLASSES:
        files = found[cls]
        picked = rng.choice(len(files), size=min(len(files), max(per_class, 200)), replace=False)
        sizes, pixels = set(), []
        for i in picked:
            with Image.open(os.path.join(data_dir, cls, files[i]), formats=IMAGE_FORMATS) as img:
                sizes.add(img.size)
                pixels.append(np.asarray(img.convert("L"), dtype=np.float32).ravel())
        allpx = np.concatenate(pixels)
        size = " ".join(f"{w}x{h}" for w, h in sorted(sizes)[:2]) + (" ..." if len(sizes) > 2 else "")
        print(
            f"{cls:<12}{len(files):>8}{size:>16}{allpx.mean():>8.1f}{allpx.std():>8.1f}"
            f"{allpx.min():>6.0f}{allpx.max():>6.0f}"
        )
        samples[cls] = [os.path.join(data_dir, cls, files[i]) for i in picked[:per_class]]
    print(f"{'total':<12}{sum(len(f) for f in found.values()):>8}   (statistics from up to 200 images a class)")
    _grid(samples, per_class, out)
    print(f"sample grid written to {out}")


def _grid(samples: dict, per_class: int, out: str) -> None:
    fig, axes = pyplot().subplots(len(CLASSES), per_class, figsize=(1.6 * per_class, 1.7 * len(CLASSES)), squeeze=False)
    for r, cls in enumerate(CLASSES):
        for c in range(per_class):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(samples[cls]):
                with Image.open(samples[cls][c], formats=IMAGE_FORMATS) as img:
                    ax.imshow(np.asarray(img.convert("L")), cmap="gray", vmin=0, vmax=255)
            if c == 0:
                ax.set_title(cls, fontsize=9, loc="left")
    fig.tight_layout()
    save_figure(fig, out, dpi=80)


if __name__ == "__main__":
    fire.Fire(explore)
