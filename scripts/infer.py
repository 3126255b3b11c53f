"""Inference on users' own files: find the inputs, load each with MONAI's ``LoadImage`` (the reader training
uses), write predictions and pictures.

Every input gets one row in ``predictions.csv``; a file that cannot be used (missing, empty, truncated, not an
image, a 3D volume, a directory, too many pixels) gets its reason in the ``error`` column while every other
file is still predicted.
"""

from __future__ import annotations

import csv
import glob
import logging
import os

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.data import PILReader
from monai.transforms import LoadImage, MapTransform

from .data import CLASSES
from .utils import BundleError, as_bool, atomic_write, pyplot, root_cause, save_figure

logger = logging.getLogger(__name__)
PIL_SUFFIXES = (".jpeg", ".jpg", ".png")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
COLUMNS = ("path", "label", "confidence", *CLASSES, "error")


def find_inputs(input) -> list[dict]:
    """One item per input: a file, every file under a folder (recursively), every match of a glob, or a list."""
    if input is None or input == "" or input == []:
        raise BundleError("no input given.", "pass --input PATH (an image, a folder or a glob such as 'imgs/*.png').")
    items = []
    for path in input if isinstance(input, (list, tuple)) else [input]:
        path = str(path)
        if os.path.isdir(path):
            before = len(items)
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames.sort()
                # a folder named like an image is reported, as a user may have meant it as one
                items += [
                    os.path.join(dirpath, d) for d in dirnames if d.lower().endswith(PIL_SUFFIXES + NIFTI_SUFFIXES)
                ]
                items += [os.path.join(dirpath, f) for f in sorted(filenames)]
            if len(items) == before:
                items.append(path)  # an empty folder still gets its row
        elif not os.path.exists(path) and glob.has_magic(path):
            matches = sorted(glob.glob(path, recursive=True))
            items += matches if matches else [path]
        else:
            items.append(path)  # a file, or a path that does not exist (reported in its row)
    return [{"image": p, "path": p} for p in items]


def to_gray(image):
    """``PILReader``'s converter: RGB(A), palette and 1-bit images to one luma channel; grayscale (8/16-bit, float)
    images as they are, as training's grayscale JPEGs."""
    return image if image.mode in ("L", "I;16", "I;16B", "I;16L", "I", "F") else image.convert("L")


def check_file(path: str, max_pixels: int) -> None:
    """``ValueError`` saying why ``path`` cannot be used, from its header alone (no pixels decoded)."""
    if not os.path.exists(path):
        raise ValueError("file does not exist")
    if os.path.isdir(path):
        raise ValueError("is a directory, not an image file")
    if os.path.getsize(path) == 0:
        raise ValueError("file is empty")
    name = path.lower()
    try:
        if name.endswith(PIL_SUFFIXES):
            from PIL import Image

            with Image.open(path) as img:
                shape = img.size
        elif name.endswith(NIFTI_SUFFIXES):
            import nibabel as nib

            shape = tuple(int(s) for s in nib.load(path).shape)
        else:
            suffix = os.path.splitext(name)[1] or "(none)"
            raise ValueError(f"unsupported file type {suffix!r}: use .jpeg, .jpg, .png, .nii or .nii.gz")
    except ValueError:
        raise
    except Exception as e:  # not an image at all, a corrupt header, a decompression bomb
        raise ValueError(f"cannot read image: {type(e).__name__}: {e}") from e
    spatial = [s for s in shape if s > 1]
    if len(spatial) != 2:
        raise ValueError(f"image of shape {shape} is not a 2D image (3D volume?): pass one 2D slice")
    if spatial[0] * spatial[1] > max_pixels:
        raise ValueError(
            f"image is {spatial[0]}x{spatial[1]} pixels, over the {max_pixels:,} limit (decompression bomb?)"
        )


class LoadImageSafelyd(MapTransform):
    """Load ``keys`` with MONAI's ``LoadImage`` as a (1, W, H) image, as training's ``LoadImaged`` and
    ``EnsureChannelFirstd`` do; a file that cannot be used becomes zeros of ``image_size`` with the reason under
    ``error``."""

    def __init__(self, keys="image", image_size=(64, 64), max_pixels: int = 25_000_000, error_key: str = "error"):
        super().__init__(keys)
        self.image_size, self.max_pixels, self.error_key = tuple(image_size), max_pixels, error_key
        self.loader = LoadImage(image_only=True, dtype=np.float32)
        self.loader.register(PILReader(converter=to_gray))  # tried first for .png/.jpeg; NIfTI goes to nibabel

    def load(self, path: str) -> torch.Tensor:
        check_file(path, self.max_pixels)
        try:
            image = self.loader(path)
        except Exception as e:  # truncated or corrupt pixel data
            cause = root_cause(e)
            raise ValueError(f"cannot read image: {type(cause).__name__}: {cause}") from e
        image = image.squeeze()  # a NIfTI slice of shape (W, H, 1)
        if image.ndim != 2 or not torch.isfinite(image).all():
            raise ValueError("image is not one 2D channel of finite values")
        return image[None]

    def __call__(self, data):
        d = dict(data)
        d[self.error_key] = ""
        for key in self.keys:
            try:
                d[key] = self.load(str(d[key]))
            except ValueError as e:
                d[key], d[self.error_key] = torch.zeros(1, *self.image_size), str(e)
        return d


def plot_prediction(image: np.ndarray, probs: np.ndarray, cam: np.ndarray | None, title: str, path: str) -> None:
    """The image, its class-probability bars and, if given, the Grad-CAM heat map over it, in one PNG."""
    panels = 3 if cam is not None else 2
    fig, axes = pyplot().subplots(1, panels, figsize=(4.2 * panels, 4))
    axes[0].imshow(image.T, cmap="gray")
    axes[0].set_title(title)
    axes[0].axis("off")
    colors = ["tab:gray"] * len(CLASSES)
    colors[int(probs.argmax())] = "tab:blue"
    axes[1].barh(CLASSES, probs, color=colors)
    axes[1].set_xlim(0, 1)
    axes[1].invert_yaxis()
    axes[1].set_xlabel("probability")
    axes[1].set_title("class probabilities")
    for i, p in enumerate(probs):
        axes[1].text(min(p + 0.02, 0.8), i, f"{p:.3f}", va="center")
    if cam is not None:
        axes[2].imshow(image.T, cmap="gray")
        axes[2].imshow(cam.T, cmap="jet", alpha=0.45, vmin=0, vmax=1)
        axes[2].set_title("Grad-CAM")
        axes[2].axis("off")
    fig.tight_layout()
    save_figure(fig, path, dpi=90)


def _unit_range(cams: torch.Tensor) -> torch.Tensor:
    """Scale each map of a batch to [0, 1], keeping the largest activation at 1."""
    flat = cams.flatten(1)
    low, high = flat.min(1).values.view(-1, 1, 1, 1), flat.max(1).values.view(-1, 1, 1, 1)
    return (cams - low) / (high - low).clamp_min(1e-12)


class PredictionWriter:
    """Collect the evaluator's predictions; at the end write ``predictions.csv`` (atomically), then the pictures.

    ``visualize`` None means: pictures when there is exactly one input. Grad-CAM (``monai.visualize.GradCAM``
    on ``target_layer``) needs the PyTorch network; with an exported model the pictures have no heat map.
    """

    def __init__(self, output_dir: str, visualize=None, network=None, target_layer: str = "class_layers.relu"):
        self.output_dir, self.visualize, self.network, self.target_layer = output_dir, visualize, network, target_layer
        self.rows: list[dict] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.COMPLETED, self.write)

    def reset(self, engine: Engine) -> None:
        self.rows, self.images = [], []

    def collect(self, engine: Engine) -> None:
        batch = engine.state.batch
        probs = torch.softmax(engine.state.output["pred"].float(), 1).detach().cpu().numpy()
        images = engine.state.output["image"].detach().cpu()
        for i, (path, error) in enumerate(zip(batch["path"], batch["error"])):
            row = {"path": path, "error": error}
            if error:
                logger.warning(f"{path}: {error}")
            else:
                row.update({"label": CLASSES[probs[i].argmax()], "confidence": f"{probs[i].max():.6f}"})
                row.update({c: f"{p:.6f}" for c, p in zip(CLASSES, probs[i])})
                row["_probs"], row["_image"] = probs[i], images[i]
            self.rows.append(row)

    @property
    def num_predicted(self) -> int:
        return sum(not r["error"] for r in self.rows)

    def write(self, engine: Engine | None = None) -> None:
        def _csv(f):
            w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
            w.writeheader()
            w.writerows(self.rows)

        path = os.path.join(self.output_dir, "predictions.csv")
        atomic_write(path, _csv)
        logger.info(f"{self.num_predicted} of {len(self.rows)} input(s) predicted; wrote {path}")

    def plot(self) -> None:
        good = [r for r in self.rows if not r["error"]]
        if not good:
            return
        cams = [None] * len(good)
        if isinstance(self.network, torch.nn.Module):
            from monai.visualize import GradCAM

            self.network.eval()
            # cloned here, after the evaluator's no-grad/inference mode, so that Grad-CAM can backpropagate
            x = torch.stack([r["_image"].clone() for r in good]).to(next(self.network.parameters()).device)
            # MONAI's default normaliser maps (min, max) to (1, 0), which flips the heat map; keep max = hot
            cam = GradCAM(nn_module=self.network, target_layers=self.target_layer, postprocessing=_unit_range)
            with torch.enable_grad():  # one image at a time: MONAI's GradCAM mixes classes across a batch
                cams = [cam(x=x[i : i + 1]).detach().cpu().numpy()[0, 0] for i in range(len(x))]
        folder = os.path.join(self.output_dir, "visualizations")
        os.makedirs(folder, exist_ok=True)
        for i, (r, c) in enumerate(zip(good, cams)):
            stem = os.path.basename(r["path"]).split(".")[0]
            title = f"{r['label']} ({float(r['confidence']):.1%})"
            plot_prediction(r["_image"][0].numpy(), r["_probs"], c, title, os.path.join(folder, f"{i:04d}_{stem}.png"))
        logger.info(f"wrote {len(good)} picture(s) to {folder}")

    def finish(self) -> int:
        """After the evaluator's run: the pictures if asked for; stop with a non-zero exit if nothing was predicted."""
        auto = self.visualize in (None, "", "auto")
        if len(self.rows) == 1 if auto else as_bool(self.visualize, "visualize"):
            self.plot()
        if not self.rows or self.num_predicted == 0:
            raise BundleError(
                f"no image could be predicted ({len(self.rows)} input(s), all failed).",
                f"see the error column of {os.path.join(self.output_dir, 'predictions.csv')}.",
            )
        return self.num_predicted
