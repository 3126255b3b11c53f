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
from .utils import BundleError, as_bool, pyplot, root_cause, save_figure

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


def read_predictions(path: str) -> list[dict]:
    """The complete rows of a ``predictions.csv`` (a last line cut short by a kill is left out)."""
    if not os.path.isfile(path):
        return []
    with open(path, newline="") as f:
        lines = f.readlines()
    if lines and not lines[-1].endswith("\n"):
        lines = lines[:-1]
    rows = list(csv.DictReader(lines))
    return [r for r in rows if None not in r and None not in r.values()]  # every column, no extra field


def skip_done(data: list[dict], output_dir: str, resume=False) -> list[dict]:
    """``data`` without the inputs ``predictions.csv`` in ``output_dir`` already holds a row for, with
    ``resume``; all of ``data`` without."""
    if not as_bool(resume, "resume"):
        return data
    done = {r["path"] for r in read_predictions(os.path.join(output_dir, "predictions.csv"))}
    todo = [d for d in data if d["path"] not in done]
    logger.info(f"resuming: {len(data) - len(todo)} of {len(data)} input(s) already predicted")
    return todo


class PredictionWriter:
    """Write each batch's predictions to ``predictions.csv`` as soon as it is predicted, and the pictures.

    The file grows batch by batch and is flushed each time, so a killed run keeps every row written, and
    ``resume`` appends to it (after dropping a last line cut short). Nothing is held across batches: memory
    stays flat in the number of inputs. ``visualize`` None means: pictures when there is exactly one input
    (``num_inputs``). Grad-CAM (``monai.visualize.GradCAM`` on ``target_layer``) needs the PyTorch network;
    with an exported model the pictures have no heat map.
    """

    def __init__(
        self,
        output_dir: str,
        visualize=None,
        network=None,
        num_inputs: int | None = None,
        resume=False,
        target_layer: str = "class_layers.relu",
    ):
        self.output_dir, self.network, self.target_layer = output_dir, network, target_layer
        self.path = os.path.join(output_dir, "predictions.csv")
        auto = visualize in (None, "", "auto")
        self.pictures = num_inputs == 1 if auto else as_bool(visualize, "visualize")
        self.resume = as_bool(resume, "resume")
        self.rows = self.predicted = self.drawn = 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.open)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.COMPLETED, self.close)

    def open(self, engine: Engine | None = None) -> None:
        kept = read_predictions(self.path) if self.resume else []
        self.drawn = sum(not r["error"] for r in kept)  # pictures are numbered on across a resumed run
        self.file = open(self.path, "w", newline="")
        self.csv = csv.DictWriter(self.file, fieldnames=COLUMNS, extrasaction="ignore")
        self.csv.writeheader()
        self.csv.writerows(kept)
        self.file.flush()

    def collect(self, engine: Engine) -> None:
        batch = engine.state.batch
        probs = torch.softmax(engine.state.output["pred"].float(), 1).detach().cpu().numpy()
        rows, good = [], []
        for i, (path, error) in enumerate(zip(batch["path"], batch["error"])):
            row = {"path": path, "error": error}
            if error:
                logger.warning(f"{path}: {error}")
            else:
                row.update({"label": CLASSES[probs[i].argmax()], "confidence": f"{probs[i].max():.6f}"})
                row.update({c: f"{p:.6f}" for c, p in zip(CLASSES, probs[i])})
                good.append(i)
            rows.append(row)
        self.csv.writerows(rows)
        self.file.flush()
        self.rows, self.predicted = self.rows + len(rows), self.predicted + len(good)
        if self.pictures and good:
            self.plot([rows[i] for i in good], engine.state.output["image"][good], probs[good])

    def close(self, engine: Engine | None = None) -> None:
        self.file.close()
        logger.info(f"{self.predicted} of {self.rows} input(s) predicted; wrote {self.path}")

    def plot(self, rows: list[dict], images: torch.Tensor, probs: np.ndarray) -> None:
        cams = [None] * len(rows)
        if isinstance(self.network, torch.nn.Module):
            from monai.visualize import GradCAM

            self.network.eval()
            # cloned here, after the evaluator's no-grad/inference mode, so that Grad-CAM can backpropagate
            x = images.detach().clone().to(next(self.network.parameters()).device)
            # MONAI's default normaliser maps (min, max) to (1, 0), which flips the heat map; keep max = hot
            cam = GradCAM(nn_module=self.network, target_layers=self.target_layer, postprocessing=_unit_range)
            with torch.enable_grad():  # one image at a time: MONAI's GradCAM mixes classes across a batch
                cams = [cam(x=x[i : i + 1]).detach().cpu().numpy()[0, 0] for i in range(len(x))]
        folder = os.path.join(self.output_dir, "visualizations")
        os.makedirs(folder, exist_ok=True)
        for r, image, p, c in zip(rows, images.detach().cpu(), probs, cams):
            stem = os.path.basename(r["path"]).split(".")[0]
            title = f"{r['label']} ({float(r['confidence']):.1%})"
            plot_prediction(image[0].numpy(), p, c, title, os.path.join(folder, f"{self.drawn:04d}_{stem}.png"))
            self.drawn += 1
        logger.info(f"wrote {len(rows)} picture(s) to {folder}")

    def finish(self, skipped: int = 0) -> int:
        """After the evaluator's run: stop with a non-zero exit if nothing was predicted (and nothing was left to
        predict by an earlier run, ``skipped``)."""
        if self.predicted == 0 and not (skipped and self.rows == 0):
            raise BundleError(
                f"no image could be predicted ({self.rows} input(s), all failed).",
                f"see the error column of {self.path}.",
            )
        return self.predicted
