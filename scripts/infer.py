"""Inference on users' own files: find the inputs, load each with MONAI's ``LoadImage`` (a file that cannot be
used gets its reason in its row of ``predictions.csv``, ``scripts.predictions``, and the others are still
predicted), draw pictures with Grad-CAM++."""

from __future__ import annotations

import glob
import logging
import math
import os

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.data import PILReader, get_track_meta, set_track_meta
from monai.transforms import Compose, LoadImage, MapTransform, Resized

from .calibration import Outputs
from .data import CLASSES, IMAGE_FORMATS, IMAGE_SUFFIXES, checked_gray
from .predictions import read_predictions
from .utils import BundleError, as_bool, atomic_write, pyplot, root_cause

logger = logging.getLogger(__name__)
NIFTI_SUFFIXES = (".nii", ".nii.gz")


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
                    os.path.join(dirpath, d) for d in dirnames if d.lower().endswith(IMAGE_SUFFIXES + NIFTI_SUFFIXES)
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


def check_file(path: str, max_pixels: int) -> None:
    """``ValueError`` saying why ``path`` cannot be used, from its header alone (no pixels decoded); a .jpeg, .jpg
    or .png file must hold one of :data:`~scripts.data.IMAGE_FORMATS`."""
    if not os.path.exists(path):
        raise ValueError("file does not exist")
    if os.path.isdir(path):
        raise ValueError("is a directory, not an image file")
    if os.path.getsize(path) == 0:
        raise ValueError("file is empty")
    name = path.lower()
    try:
        if name.endswith(IMAGE_SUFFIXES):
            from PIL import Image, UnidentifiedImageError

            try:
                with Image.open(path, formats=IMAGE_FORMATS) as img:
                    shape = img.size
            except UnidentifiedImageError:
                raise ValueError(f"cannot read image: its content is not {' or '.join(IMAGE_FORMATS)}") from None
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
    if len(shape) < 2 or sum(s > 1 for s in shape) > 2:  # a 1x1 image is 2D; a NIfTI slice may be (W, H, 1)
        raise ValueError(f"image of shape {shape} is not a 2D image (3D volume?): pass one 2D slice")
    if math.prod(shape) > max_pixels:
        size = "x".join(str(s) for s in shape if s > 1)
        raise ValueError(f"image is {size} pixels, over the {max_pixels:,} limit (decompression bomb?)")


class LoadImageSafelyd(MapTransform):
    """Load ``keys`` with MONAI's ``LoadImage`` as a (1, W, H) tensor, as training does, its smaller side under
    ``min_side``; a file that cannot be used becomes zeros of ``image_size`` with the reason under ``error``.
    Pillow decodes only :data:`~scripts.data.IMAGE_FORMATS` (not EPS, which it renders by running Ghostscript)."""

    def __init__(self, keys="image", image_size=(64, 64), max_pixels: int = 25_000_000):
        super().__init__(keys)
        self.image_size, self.max_pixels = tuple(image_size), max_pixels
        self.loader = LoadImage(image_only=True, dtype=np.float32)
        self.loader.register(PILReader(converter=checked_gray))  # tried first for .png/.jpeg; NIfTI goes to nibabel

    def load(self, path: str) -> torch.Tensor:
        check_file(path, self.max_pixels)
        try:
            image = self.loader(path)
        except Exception as e:  # truncated or corrupt pixel data
            cause = root_cause(e)
            raise ValueError(f"cannot read image: {type(cause).__name__}: {cause}") from e
        image = torch.as_tensor(image)
        while image.ndim > 2 and 1 in image.shape:  # a NIfTI slice is (W, H, 1)
            image = image.squeeze(image.shape.index(1))
        if image.ndim != 2 or not torch.isfinite(image).all():
            raise ValueError("image is not one 2D channel of finite values")
        return image[None]

    def __call__(self, data):
        d = dict(data)
        d["error"], d["min_side"] = "", 0
        for key in self.keys:
            try:
                d[key] = self.load(str(d[key]))
                d["min_side"] = min(d[key].shape[1:])
            except ValueError as e:
                d[key], d["error"] = torch.zeros(1, *self.image_size), str(e)
        return d


class WithoutMetadata(Compose):
    """MONAI's ``Compose`` with metadata tracking off while it runs (``set_track_meta``, restored after): inference
    needs only the pixels, and a ``MetaTensor`` at each transform costs more than decoding a 64x64 image."""

    def __call__(self, input_, start=0, end=None, threading=False, lazy=None):
        tracking = get_track_meta()
        set_track_meta(False)
        try:
            return super().__call__(input_, start, end, threading, lazy)
        finally:
            set_track_meta(tracking)


class ResizeIfNeededd(Resized):
    """MONAI's ``Resized``, skipped for images already of its ``spatial_size``, which it would only copy."""

    def __call__(self, data, lazy=None):
        size = tuple(self.resizer.spatial_size)
        if all(tuple(data[key].shape[1:]) == size for key in self.key_iterator(data)):
            return dict(data)
        return super().__call__(data, lazy)


def gradcam_maps(network: torch.nn.Module, images: torch.Tensor, target_layer: str, plus: bool = True):
    """The Grad-CAM++ heat map (MONAI's ``GradCAMpp``; ``GradCAM`` without ``plus``) of each image (N x 1 x H x W)
    for its predicted class: a list of H x W arrays in [0, 1], 1 = hot."""
    from monai.visualize import GradCAM, GradCAMpp

    network.eval()
    # cloned here, after the evaluator's no-grad/inference mode, so that Grad-CAM++ can backpropagate
    x = images.detach().clone().to(next(network.parameters()).device)
    # MONAI's default normaliser maps (min, max) to (1, 0), which flips the heat map; keep max = hot
    cam = (GradCAMpp if plus else GradCAM)(nn_module=network, target_layers=target_layer, postprocessing=_unit_range)
    with torch.enable_grad():  # one image at a time: MONAI's CAMs mix classes across a batch
        return [cam(x=x[i : i + 1]).detach().cpu().numpy()[0, 0] for i in range(len(x))]


class PredictionPicture:
    """One figure, built once and updated for every picture (faster than a new one each): the image, its class
    probabilities and its Grad-CAM++ map, or, for an export, a line saying why there is none."""

    def __init__(self):
        plt = pyplot()
        self.fig, axes = plt.subplots(1, 3, figsize=(12.6, 4), gridspec_kw={"width_ratios": [1, 1.15, 1.15]})
        self.ax_image, self.ax_bars, self.ax_cam = axes
        blank = np.zeros((64, 64))
        self.image = self.ax_image.imshow(blank, cmap="gray")
        self.ax_image.axis("off")
        self.bars = self.ax_bars.barh(CLASSES, np.zeros(len(CLASSES)))
        self.ax_bars.set(
            xlim=(0, 1), ylim=(len(CLASSES) - 0.5, -0.5), xlabel="probability", title="class probabilities"
        )
        self.texts = [self.ax_bars.text(0, i, "", va="center") for i in range(len(CLASSES))]
        self.under = self.ax_cam.imshow(blank, cmap="gray")
        self.cam = self.ax_cam.imshow(blank, cmap="jet", alpha=0.45, vmin=0, vmax=1)
        self.ax_cam.axis("off")
        self.ax_cam.set_title("Grad-CAM++")
        self.fig.colorbar(self.cam, ax=self.ax_cam, fraction=0.046, pad=0.04, label="Grad-CAM++ (max = 1)")
        self.no_cam = self.ax_cam.text(
            0.5, 0.5, "no heat map:\nan exported model\nhas no layers to explain", ha="center", va="center",
            transform=self.ax_cam.transAxes,
        )  # fmt: skip
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
        for artist in (self.under, self.cam, self.cam.colorbar.ax):
            artist.set_visible(cam is not None)
        self.no_cam.set_visible(cam is None)
        if cam is not None:
            self.under.set_data(shown)
            self.under.set_clim(shown.min(), shown.max())
            self.cam.set_data(cam.T)
        atomic_write(path, lambda f: self.fig.savefig(f, format="png", dpi=72), mode="wb")

    def close(self) -> None:
        pyplot().close(self.fig)


def _unit_range(cams: torch.Tensor) -> torch.Tensor:
    """Scale each map of a batch to [0, 1], keeping the largest activation at 1."""
    flat = cams.flatten(1)
    low, high = flat.min(1).values.view(-1, 1, 1, 1), flat.max(1).values.view(-1, 1, 1, 1)
    return (cams - low) / (high - low).clamp_min(1e-12)


class PictureWriter:
    """With ``visualize`` (``auto``: when ``num_inputs`` is 1), a picture per predicted image in
    ``output_dir/visualizations`` with its calibrated probabilities and the Grad-CAM++ map of ``network`` on
    ``target_layer`` (none for an export), numbered on across a resumed run."""

    def __init__(self, output_dir, outputs: Outputs, calibration, network=None, visualize=None, num_inputs=None,
                 target_layer: str = "features.transition2.relu"):  # fmt: skip
        self.folder = os.path.join(output_dir, "visualizations")
        self.outputs, self.calibration, self.network, self.target_layer = outputs, calibration, network, target_layer
        auto = visualize in (None, "", "auto")
        self.enabled = num_inputs == 1 if auto else as_bool(visualize, "visualize")
        self.picture, self.drawn = None, 0

    def attach(self, engine: Engine) -> None:
        if self.enabled:
            engine.add_event_handler(Events.STARTED, self.started)
            engine.add_event_handler(Events.ITERATION_COMPLETED, self.draw)
            engine.add_event_handler(Events.COMPLETED, self.close)

    def started(self, engine: Engine) -> None:
        """Number on from the rows a resumed run kept (the prediction writer, attached first, has kept them)."""
        done = read_predictions(os.path.join(os.path.dirname(self.folder), "predictions.csv"))
        self.drawn = sum(not r["error"] for r in done)

    def draw(self, engine: Engine) -> None:
        last = self.outputs.last
        good = [i for i, error in enumerate(last["batch"]["error"]) if not error]
        if not good:
            return
        images, probs = last["batch"]["image"][good], self.calibration.probabilities(last["logits"][good]).numpy()
        cams = [None] * len(good)
        if isinstance(self.network, torch.nn.Module):
            cams = gradcam_maps(self.network, images, self.target_layer)
        os.makedirs(self.folder, exist_ok=True)
        self.picture = self.picture or PredictionPicture()
        for i, image, p, cam in zip(good, images.detach().cpu(), probs, cams):
            stem = os.path.basename(last["batch"]["path"][i]).split(".")[0]
            title = f"{CLASSES[p.argmax()]} ({p.max():.1%})"
            self.picture.draw(
                image[0].numpy(), p, cam, title, os.path.join(self.folder, f"{self.drawn:04d}_{stem}.png")
            )
            self.drawn += 1
        logger.info(f"wrote {len(good)} picture(s) to {self.folder}")

    def close(self, engine: Engine | None = None) -> None:
        if self.picture is not None:
            self.picture.close()
            self.picture = None
