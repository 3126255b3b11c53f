"""Augmentation of whole batches on their device, as MONAI's engines hand them to ``prepare_batch``."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.engines.utils import default_prepare_batch


class PrepareBatch:
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
        self.enabled, self.rotate_range = bool(augment), math.radians(rotate_degrees)
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
        images, labels = default_prepare_batch(batchdata, device, non_blocking, **kwargs)
        images = images.as_tensor() if isinstance(images, MetaTensor) else images
        if isinstance(labels, MetaTensor):
            labels = labels.as_tensor()
        return (self.augment(images) if self.enabled else images), labels
