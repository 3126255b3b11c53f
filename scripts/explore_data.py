"""Explore a dataset folder (MedNIST, or one subfolder of images per class): images per class, sizes and intensity
statistics, and a grid of samples::

    python -m scripts.explore_data --data_dir data [--out outputs/samples.png] [--per_class 5]
"""

from __future__ import annotations

import os

import fire
import numpy as np

from .data import ImageData, images_by_class
from .errors import BundleError
from .files import pyplot, save_figure
from .images import read_image


def explore(data_dir: str = "data", out: str = "outputs/samples.png", per_class: int = 5, seed: int = 0):
    """Print the per-class table and save a grid of ``per_class`` random samples per class to ``out``."""
    if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1:
        raise BundleError(f"--per_class {per_class!r} is not an integer >= 1.", "pass e.g. --per_class 5.")
    if not os.path.isdir(data_dir):
        raise BundleError(f"--data_dir {data_dir} does not exist.", "point it at MedNIST or a folder of class folders.")
    data = ImageData(data_dir, split_file="", download=False)
    if data.kind == "download":
        raise BundleError(
            f"--data_dir {data_dir} holds no images.", "point it at MedNIST or a folder of class folders."
        )
    found = images_by_class(data.root, data.classes, "data_dir")
    rng = np.random.default_rng(seed)
    print(f"{'class':<16}{'images':>8}{'size (WxH)':>16}{'mean':>8}{'std':>8}{'min':>6}{'max':>6}")
    samples = {}
    for cls, files in found.items():
        picked = rng.choice(len(files), size=min(len(files), max(per_class, 200)), replace=False)
        sizes, pixels = set(), []
        for i in picked:
            try:
                image, _ = read_image(os.path.join(data.root, files[i]))
            except ValueError:
                continue
            sizes.add(image.shape[:2])
            pixels.append(image.ravel())
        allpx = np.concatenate(pixels) if pixels else np.zeros(1)
        size = " ".join(f"{w}x{h}" for w, h in sorted(sizes)[:2]) + (" ..." if len(sizes) > 2 else "")
        print(
            f"{cls[:15]:<16}{len(files):>8}{size:>16}{allpx.mean():>8.1f}{allpx.std():>8.1f}"
            f"{allpx.min():>6.0f}{allpx.max():>6.0f}"
        )
        samples[cls] = [os.path.join(data.root, files[i]) for i in picked[:per_class]]
    print(f"{'total':<16}{sum(len(f) for f in found.values()):>8}   (statistics from up to 200 images a class)")
    _grid(samples, per_class, out)
    print(f"sample grid written to {out}")


def _grid(samples: dict, per_class: int, out: str) -> None:
    rows = len(samples)
    fig, axes = pyplot().subplots(rows, per_class, figsize=(1.6 * per_class, 1.7 * rows), squeeze=False)
    for r, (cls, paths) in enumerate(samples.items()):
        for c in range(per_class):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(paths):
                try:
                    image, _ = read_image(paths[c])
                    ax.imshow(image.T, cmap="gray")
                except ValueError:
                    pass
            if c == 0:
                ax.set_title(cls, fontsize=9, loc="left")
    fig.tight_layout()
    save_figure(fig, out, dpi=80)


if __name__ == "__main__":
    fire.Fire(explore)
