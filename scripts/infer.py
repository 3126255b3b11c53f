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
from monai.transforms import LoadImage, MapTransform, Resized

from .calibration import Calibration, FeatureHook
from .data import CLASSES
from .utils import BundleError, as_bool, atomic_write, pyplot, root_cause

logger = logging.getLogger(__name__)
PIL_SUFFIXES = (".jpeg", ".jpg", ".png")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
COLUMNS = ("path", "label", "confidence", *CLASSES, "error", "ood_score", "flag")
MIN_SIDE = 32  # pixels: smaller images are flagged (MedNIST's are 64 x 64)


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
    ``EnsureChannelFirstd`` do, its smaller side under ``min_side``; a file that cannot be used becomes zeros of
    ``image_size`` with the reason under ``error``. The image is a plain tensor: the later transforms and the
    network need no metadata, and tracking it would cost more than decoding the image."""

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
        image = image.as_tensor().squeeze()  # a NIfTI slice is (W, H, 1)
        if image.ndim != 2 or not torch.isfinite(image).all():
            raise ValueError("image is not one 2D channel of finite values")
        return image[None]

    def __call__(self, data):
        d = dict(data)
        d[self.error_key], d["min_side"] = "", 0
        for key in self.keys:
            try:
                d[key] = self.load(str(d[key]))
                d["min_side"] = min(d[key].shape[1:])
            except ValueError as e:
                d[key], d[self.error_key] = torch.zeros(1, *self.image_size), str(e)
        return d


class ResizeIfNeededd(Resized):
    """MONAI's ``Resized``, skipped for images that already have its ``spatial_size`` (MedNIST's own 64x64),
    which it would only copy: an exact identity, and a fifth of the preprocessing time."""

    def __call__(self, data, lazy=None):
        size = tuple(self.resizer.spatial_size)
        if all(tuple(data[key].shape[1:]) == size for key in self.key_iterator(data)):
            return dict(data)
        return super().__call__(data, lazy)


def gradcam_maps(network: torch.nn.Module, images: torch.Tensor, target_layer: str) -> list[np.ndarray]:
    """The Grad-CAM++ heat map (MONAI's ``GradCAMpp``) of each image (N x 1 x H x W) for its predicted class,
    H x W in [0, 1], 1 = hot. Grad-CAM++ weighs each channel by its positive gradients only: on MedNIST's test
    split its maps put more of their mass on the anatomy than its share of the image for all six classes, plain
    Grad-CAM's for four (docs/README.md, "Explanations")."""
    from monai.visualize import GradCAMpp

    network.eval()
    # cloned here, after the evaluator's no-grad/inference mode, so that Grad-CAM++ can backpropagate
    x = images.detach().clone().to(next(network.parameters()).device)
    # MONAI's default normaliser maps (min, max) to (1, 0), which flips the heat map; keep max = hot
    cam = GradCAMpp(nn_module=network, target_layers=target_layer, postprocessing=_unit_range)
    with torch.enable_grad():  # one image at a time: MONAI's CAMs mix classes across a batch
        return [cam(x=x[i : i + 1]).detach().cpu().numpy()[0, 0] for i in range(len(x))]


class PredictionPicture:
    """One figure, drawn once and updated for every picture: the image, its class-probability bars and, when
    given, the Grad-CAM++ heat map over the image with its colour bar. Reusing the figure spares matplotlib
    building a new one for every picture."""

    def __init__(self):
        plt = pyplot()
        self.fig, axes = plt.subplots(1, 3, figsize=(12.6, 4), gridspec_kw={"width_ratios": [1, 1.15, 1.15]})
        self.ax_image, self.ax_bars, self.ax_cam = axes
        blank = np.zeros((64, 64))
        self.image = self.ax_image.imshow(blank, cmap="gray")
        self.ax_image.axis("off")
        self.bars = self.ax_bars.barh(CLASSES, np.zeros(len(CLASSES)))
        self.ax_bars.set_xlim(0, 1)
        self.ax_bars.invert_yaxis()
        self.ax_bars.set_xlabel("probability")
        self.ax_bars.set_title("class probabilities")
        self.texts = [self.ax_bars.text(0, i, "", va="center") for i in range(len(CLASSES))]
        self.under = self.ax_cam.imshow(blank, cmap="gray")
        self.cam = self.ax_cam.imshow(blank, cmap="jet", alpha=0.45, vmin=0, vmax=1)
        self.ax_cam.axis("off")
        self.fig.colorbar(self.cam, ax=self.ax_cam, fraction=0.046, pad=0.04, label="Grad-CAM++ (max = 1)")
        self.fig.tight_layout()

    def draw(self, image: np.ndarray, probs: np.ndarray, cam: np.ndarray | None, title: str, path: str) -> None:
        """Write the picture of one image (W, H), its probabilities and its heat map (W, H) or None to ``path``."""
        shown = image.T
        self.image.set_data(shown)
        self.image.set_clim(shown.min(), shown.max())
        self.ax_image.set_title(title)
        for i, (bar, text, p) in enumerate(zip(self.bars, self.texts, probs)):
            bar.set_width(p)
            bar.set_color("tab:blue" if i == int(probs.argmax()) else "tab:gray")
            text.set_x(min(p + 0.02, 0.8))
            text.set_text(f"{p:.3f}")
        self.ax_cam.set_visible(cam is not None)
        self.cam.colorbar.ax.set_visible(cam is not None)
        if cam is not None:
            self.under.set_data(shown)
            self.under.set_clim(shown.min(), shown.max())
            self.cam.set_data(cam.T)
            self.ax_cam.set_title("Grad-CAM++")
        atomic_write(path, lambda f: self.fig.savefig(f, format="png", dpi=72), mode="wb")

    def close(self) -> None:
        pyplot().close(self.fig)


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

    The file grows batch by batch and is flushed to disk (``fsync``) each time, so a killed run, or a power cut,
    keeps every batch written, and ``resume`` appends to it (after dropping a last line cut short). Nothing is
    held across batches: memory stays flat in the number of inputs. ``visualize`` None means: pictures when there
    is exactly one input (``num_inputs``). Grad-CAM++ (``monai.visualize.GradCAMpp`` on ``target_layer``) needs the PyTorch network;
    with an exported model the pictures have no heat map.

    Probabilities are calibrated by ``calibration_path`` (``scripts.calibration``); ``ood_score`` is the feature
    distance (the energy score with an exported model) and ``flag`` says why not to trust a prediction:
    ``constant image``, ``small image`` (a side under 32 pixels), ``out-of-distribution`` (score above the
    threshold fitted on the validation split) or ``low confidence`` (calibrated confidence under
    ``low_confidence``); empty for a confident in-distribution one.
    """

    def __init__(
        self,
        output_dir: str,
        visualize=None,
        network=None,
        num_inputs: int | None = None,
        resume=False,
        calibration_path: str | None = None,
        low_confidence: float = 0.5,
        target_layer: str = "features.transition2.relu",
    ):
        self.output_dir, self.network, self.target_layer = output_dir, network, target_layer
        self.calibration, self.low_confidence = Calibration.load(calibration_path), float(low_confidence)
        self.hook = FeatureHook(network)  # the features of the evaluator's forward pass, for the ood_score
        self.picture = None
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
        """Start ``predictions.csv``: the header and, when resuming, the complete rows it held, written to a
        temporary file renamed over it (a kill at any moment leaves the old or the new file, never fewer rows);
        the rows of this run are then appended."""
        kept = read_predictions(self.path) if self.resume else []
        self.drawn = sum(not r["error"] for r in kept)  # pictures are numbered on across a resumed run

        def start(f) -> None:
            writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(kept)

        atomic_write(self.path, start)
        self.file = open(self.path, "a", newline="")
        self.csv = csv.DictWriter(self.file, fieldnames=COLUMNS, extrasaction="ignore")

    def collect(self, engine: Engine) -> None:
        batch, logits = engine.state.batch, engine.state.output["pred"].detach().float().cpu()
        probs = self.calibration.probabilities(logits).numpy()
        scores, threshold = self.calibration.ood_score(logits, self.hook.take())
        scores = scores.numpy()
        flat = engine.state.output["image"].detach().flatten(1).std(1).cpu().numpy() == 0
        rows, good = [], []
        for i, (path, error) in enumerate(zip(batch["path"], batch["error"])):
            row = {"path": path, "error": error}
            if error:
                logger.warning(f"{path}: {error}")
            else:
                row.update({"label": CLASSES[probs[i].argmax()], "confidence": f"{probs[i].max():.6f}"})
                row.update({c: f"{p:.6f}" for c, p in zip(CLASSES, probs[i])})
                flag = self.flag(probs[i], scores[i], threshold, flat[i], int(batch["min_side"][i]))
                row.update(ood_score=f"{scores[i]:.4f}", flag=flag)
                good.append(i)
            rows.append(row)
        self.csv.writerows(rows)
        self.file.flush()
        os.fsync(self.file.fileno())  # on disk, not only in the operating system's cache: a power cut keeps it
        self.rows, self.predicted = self.rows + len(rows), self.predicted + len(good)
        if self.pictures and good:
            self.plot([rows[i] for i in good], engine.state.output["image"][good], probs[good])

    def flag(self, probs: np.ndarray, score: float, threshold: float | None, constant: bool, min_side: int) -> str:
        """Why not to trust one prediction, or ``""``."""
        if constant:
            return "constant image"
        if min_side < MIN_SIDE:
            return "small image"
        if threshold is not None and score > threshold:
            return "out-of-distribution"
        return "low confidence" if probs.max() < self.low_confidence else ""

    def close(self, engine: Engine | None = None) -> None:
        self.file.close()
        if self.picture is not None:
            self.picture.close()
            self.picture = None
        logger.info(f"{self.predicted} of {self.rows} input(s) predicted; wrote {self.path}")

    def plot(self, rows: list[dict], images: torch.Tensor, probs: np.ndarray) -> None:
        cams = [None] * len(rows)
        if isinstance(self.network, torch.nn.Module):
            cams = gradcam_maps(self.network, images, self.target_layer)
        folder = os.path.join(self.output_dir, "visualizations")
        os.makedirs(folder, exist_ok=True)
        self.picture = self.picture or PredictionPicture()
        for r, image, p, c in zip(rows, images.detach().cpu(), probs, cams):
            stem = os.path.basename(r["path"]).split(".")[0]
            title = f"{r['label']} ({float(r['confidence']):.1%})"
            self.picture.draw(image[0].numpy(), p, c, title, os.path.join(folder, f"{self.drawn:04d}_{stem}.png"))
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
