"""What a training run adds to MONAI's trainer: the optimizer's parameter groups (optionally started from a model of
this bundle, layer by layer), the loss's class weights, the learning-rate schedule and batches augmented on their
device."""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from monai.engines.utils import default_prepare_batch
from monai.networks.utils import copy_model_state
from monai.utils import convert_to_tensor

from .checks import as_bool
from .errors import BundleError
from .model_file import load_model

logger = logging.getLogger(__name__)


def parameter_groups(network: torch.nn.Module, learning_rate: float, pretrained=None, lr_factor=1.0) -> list[dict]:
    """The optimizer's parameter groups, once ``network`` starts from ``pretrained`` (a ``model.pt`` of this
    bundle, read by the safe loader with the description beside it: every weight whose name and shape fit, the
    rest logged): its loaded parameters at ``lr_factor`` x ``learning_rate``, the others at it."""
    named, loaded = list(network.named_parameters()), set()
    if pretrained:
        if not str(pretrained).lower().endswith(".pt"):
            raise BundleError(
                f"--pretrained {pretrained} is not a model.pt.", "pass a model.pt trained by this bundle."
            )
        _, updated, unchanged = copy_model_state(network, load_model(str(pretrained)).state_dict(), inplace=True)
        loaded = set(updated)
        fresh = sorted({k.rsplit(".", 1)[0] for k in unchanged})
        logger.info(
            f"pretrained: {len(updated)} of {len(updated) + len(unchanged)} tensors loaded from {pretrained}; "
            f"started afresh: {', '.join(fresh) or 'none'}"
        )
    if not loaded or float(lr_factor) == 1.0:
        return [{"params": [p for _, p in named], "lr": learning_rate}]
    groups = [
        {"params": [p for n, p in named if n in loaded], "lr": learning_rate * float(lr_factor)},
        {"params": [p for n, p in named if n not in loaded], "lr": learning_rate},
    ]
    return [g for g in groups if g["params"]]


def class_weights(setting: str, labels: list[int], classes: int, device="cpu") -> torch.Tensor | None:
    """The cross-entropy's weight of each class: none, or with ``balanced`` the inverse of its share of the
    training ``labels`` (``n / (classes * n_c)``), so that each class weighs as much in the loss."""
    if setting != "balanced":
        return None
    counts = torch.bincount(torch.as_tensor(labels, dtype=torch.long), minlength=classes).double()
    weights = counts.sum() / (classes * counts.clamp_min(1))
    logger.info(f"class weights (balanced): {', '.join(f'{w:.3g}' for w in weights.tolist())}")
    return weights.float().to(device)


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup: float):
    """Linear warm-up over the first ``warmup`` fraction of ``total_steps``, then a half cosine to 0. Unlike
    MONAI's ``WarmupCosineSchedule`` the length is not in the saved state, so a run resumed with more
    ``--epochs`` follows the longer schedule."""
    total, ramp = max(1, int(total_steps)), max(1, round(float(warmup) * int(total_steps)))

    def factor(step: int) -> float:
        if step < ramp:
            return (step + 1) / ramp
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - ramp) / max(1, total - ramp))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class AugmentBatch:
    """A ``prepare_batch`` for MONAI's engines: the batch on its device as plain tensors (a ``MetaTensor`` would
    wrap every network operation), with ``augment`` each image rotated in +-``rotate_degrees``, flipped along
    ``flip_axis`` and zoomed in ``zoom_range``, each with probability ``prob``: one affine ``grid_sample`` per
    batch, bilinear with border padding (as MONAI's ``RandRotated``, ``RandFlipd``, ``RandZoomd``)."""

    def __init__(
        self,
        augment: bool = True,
        rotate_degrees: float = 15.0,
        zoom_range: tuple[float, float] = (0.9, 1.1),
        prob: float = 0.5,
        flip_axis: int = 0,
    ):
        self.enabled, self.rotate_range = as_bool(augment, "augment"), math.radians(rotate_degrees)
        self.zoom, self.prob, self.flip_axis = tuple(zoom_range), prob, flip_axis

    def augment(self, images: torch.Tensor) -> torch.Tensor:
        b, dev = images.shape[0], images.device

        def chosen():
            return torch.rand(b, device=dev) < self.prob

        angle = torch.empty(b, device=dev).uniform_(-self.rotate_range, self.rotate_range) * chosen()
        zoom = torch.where(chosen(), torch.empty(b, device=dev).uniform_(*self.zoom), torch.ones(b, device=dev))
        flip = torch.where(chosen(), -1.0, 1.0)
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        theta = torch.zeros(b, 2, 3, device=dev)
        theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
        # affine_grid's rows are (x: last axis, y: first spatial axis); a flip negates that input coordinate
        theta[:, 1 - self.flip_axis] *= flip[:, None]
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def __call__(self, batchdata, device=None, non_blocking: bool = False, **kwargs):
        batch = default_prepare_batch(batchdata, device, non_blocking, **kwargs)
        images, labels = (convert_to_tensor(x, track_meta=False) for x in batch)
        return (self.augment(images) if self.enabled else images), labels
