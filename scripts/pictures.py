"""Pictures of predictions: the image, its class probabilities and its Grad-CAM++ heat map (MONAI's ``GradCAMpp``),
one file per image, named by a number and the input's shortened name; a picture that cannot be drawn costs only a
warning."""

from __future__ import annotations

import io
import logging
import os
import re

import numpy as np
import torch

from .checks import as_bool
from .files import atomic_write, pyplot

logger = logging.getLogger(__name__)
NAME_CHARS = 40  # of an input's name in its picture's file name


def gradcam_maps(network: torch.nn.Module, images: torch.Tensor, target_layer: str, plus: bool = True):
    """The Grad-CAM++ heat map (MONAI's ``GradCAMpp``; ``GradCAM`` without ``plus``) of each image (N x C x H x W)
    for its predicted class: a list of H x W arrays in [0, 1], 1 = hot."""
    from monai.visualize import GradCAM, GradCAMpp

    network.eval()
    # cloned here, after the evaluator's no-grad/inference mode, so that Grad-CAM++ can backpropagate
    x = images.detach().clone().to(next(network.parameters()).device)
    # MONAI's default normaliser maps (min, max) to (1, 0), which flips the heat map; keep max = hot
    cam = (GradCAMpp if plus else GradCAM)(nn_module=network, target_layers=target_layer, postprocessing=unit_range)
    with torch.enable_grad():  # one image at a time: MONAI's CAMs mix classes across a batch
        return [cam(x=x[i : i + 1]).detach().cpu().numpy()[0, 0] for i in range(len(x))]


def overlay_png(network: torch.nn.Module, image: torch.Tensor, target_layer: str, scale: int = 4) -> bytes:
    """A PNG of ``image`` (C x H x W, its first channel) under its Grad-CAM++ heat map (jet, half opaque),
    ``scale`` times its size: what a service returns for a page to show."""
    from matplotlib import colormaps
    from PIL import Image

    (cam,) = gradcam_maps(network, image[None], target_layer)
    gray = image[0].detach().cpu().float().numpy().T  # MONAI's (W, H) as rows of pixels
    gray = (gray - gray.min()) / max(float(gray.max() - gray.min()), 1e-12)
    blended = 0.55 * np.repeat(gray[..., None], 3, -1) + 0.45 * colormaps["jet"](cam.T)[..., :3]
    picture = Image.fromarray((255 * blended).astype(np.uint8)).resize((gray.shape[1] * scale, gray.shape[0] * scale))
    out = io.BytesIO()
    picture.save(out, "PNG")
    return out.getvalue()


def unit_range(cams: torch.Tensor) -> torch.Tensor:
    """Scale each map of a batch to [0, 1], keeping the largest activation at 1."""
    flat = cams.flatten(1)
    low, high = flat.min(1).values.view(-1, 1, 1, 1), flat.max(1).values.view(-1, 1, 1, 1)
    return (cams - low) / (high - low).clamp_min(1e-12)


def picture_name(number: int, path: str) -> str:
    """``0007_<name>.png``: the input's file name without suffix, at most :data:`NAME_CHARS` safe characters."""
    stem = os.path.basename(str(path)).split(".")[0]
    return f"{number:04d}_{re.sub(r'[^A-Za-z0-9_.+-]', '_', stem)[:NAME_CHARS] or 'image'}.png"


class PredictionPicture:
    """One figure, built once and updated for every picture (faster than a new one each): the image, its class
    probabilities and its Grad-CAM++ map, or, for an export, a line saying why there is none."""

    def __init__(self, classes):
        plt = pyplot()
        self.classes = list(classes)
        height = max(4, 0.35 * len(self.classes))
        self.fig, axes = plt.subplots(1, 3, figsize=(12.6, height), gridspec_kw={"width_ratios": [1, 1.15, 1.15]})
        self.ax_image, self.ax_bars, self.ax_cam = axes
        blank = np.zeros((64, 64))
        self.image = self.ax_image.imshow(blank, cmap="gray")
        self.ax_image.axis("off")
        self.bars = self.ax_bars.barh(self.classes, np.zeros(len(self.classes)))
        self.ax_bars.set(
            xlim=(0, 1), ylim=(len(self.classes) - 0.5, -0.5), xlabel="probability", title="class probabilities"
        )
        self.texts = [self.ax_bars.text(0, i, "", va="center") for i in range(len(self.classes))]
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
        """Write the picture of one image (C, W, H; the first channel shown, or RGB), its probabilities and its
        heat map (W, H) or None to ``path``."""
        shown = image[0].T if image.shape[0] == 1 else np.moveaxis(image, 0, -1).swapaxes(0, 1)
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
            gray = image.mean(0).T
            self.under.set_data(gray)
            self.under.set_clim(gray.min(), gray.max())
            self.cam.set_data(cam.T)
        atomic_write(path, lambda f: self.fig.savefig(f, format="png", dpi=72), mode="wb")

    def close(self) -> None:
        pyplot().close(self.fig)


class Pictures:
    """With ``visualize`` (``auto``: when ``num_inputs`` is 1), a picture of each predicted image in
    ``output_dir/visualizations``, with the Grad-CAM++ map of ``network`` on ``target_layer`` (none for an export),
    numbered on across a resumed run. Drawn by the prediction writer for each batch it writes."""

    def __init__(self, output_dir, classes, network=None, visualize=None, num_inputs=None,
                 target_layer: str = "features.transition2.relu"):  # fmt: skip
        self.folder, self.classes = os.path.join(str(output_dir), "visualizations"), list(classes)
        self.network, self.target_layer = network, target_layer
        auto = visualize in (None, "", "auto")
        self.enabled = num_inputs == 1 if auto else as_bool(visualize, "visualize")
        self.picture, self.drawn = None, 0

    def draw(self, images: torch.Tensor, probs: np.ndarray, paths: list[str]) -> None:
        """A picture of each of ``images`` (N x C x H x W) with its calibrated ``probs``."""
        if not self.enabled or not len(paths):
            return
        cams = [None] * len(paths)
        if isinstance(self.network, torch.nn.Module):
            cams = gradcam_maps(self.network, images, self.target_layer)
        os.makedirs(self.folder, exist_ok=True)
        self.picture = self.picture or PredictionPicture(self.classes)
        for image, p, cam, path in zip(images.detach().cpu().float().numpy(), probs, cams, paths):
            target = os.path.join(self.folder, picture_name(self.drawn, path))
            try:
                self.picture.draw(image, p, cam, f"{self.classes[int(p.argmax())]} ({p.max():.1%})", target)
            except (OSError, ValueError) as e:
                logger.warning(f"{path}: no picture written ({type(e).__name__}: {e})")
            self.drawn += 1
        logger.info(f"wrote {len(paths)} picture(s) to {self.folder}")

    def close(self) -> None:
        if self.picture is not None:
            self.picture.close()
            self.picture = None
