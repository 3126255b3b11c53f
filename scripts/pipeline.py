"""Speed pieces the configs plug into MONAI's engines: batched augmentation (optionally at a lower resolution),
batches sliced on the device, CPU bf16 autocast, the learning-rate schedule.

MONAI's random transforms work on one sample at a time in Python (about 2.4 ms per 64x64 image here);
``PrepareBatch`` applies the same three augmentations to a whole batch with one ``grid_sample`` call on the
batch's device. ``DeviceBatches`` (opt-in, configs/device_batches.json) keeps the preprocessed training set as
one tensor on the training device and slices each batch from it. ``AutocastInferer`` adds CPU bf16 autocast,
which MONAI's ``amp`` flag (CUDA only) lacks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.engines.utils import default_prepare_batch
from monai.inferers import SimpleInferer


class DeviceBatches:
    """Training batches sliced from the whole preprocessed training set, held as one tensor per key on ``device``.

    A ``DataLoader`` still gathers ``batch_size`` items and collates them for every step, on the CPU. This
    stacks ``data`` (the items of ``scripts.data.preload``) once, on first use, moves it to ``device``, and each
    epoch yields ``{"image": ..., "label": ...}`` batches indexed by a new permutation (drawn from ``seed`` and
    the epoch) or in order, the last one possibly smaller, as a ``DataLoader`` would. Augment whole batches with
    ``PrepareBatch``.
    """

    def __init__(
        self, data, batch_size: int, device="cpu", shuffle: bool = True, seed: int = 0, keys=("image", "label")
    ):
        self.items, self.batch_size, self.device = data, int(batch_size), torch.device(device)
        self.shuffle, self.seed, self.keys = shuffle, int(seed), tuple(keys)
        self.epoch, self.data = 0, None

    def __len__(self) -> int:
        return math.ceil(len(self.items) / self.batch_size)

    def __iter__(self):
        if self.data is None:
            self.data = {k: torch.stack([torch.as_tensor(i[k]) for i in self.items]).to(self.device) for k in self.keys}
        n = len(self.items)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(n)
        self.epoch += 1
        for index in order.to(self.device).split(self.batch_size):
            yield {key: values[index] for key, values in self.data.items()}


class PrepareBatch:
    """A ``prepare_batch`` for MONAI's engines: batch to device, as plain tensors, optionally augmented there.

    Images leave as plain ``torch.Tensor``: a ``MetaTensor`` through DenseNet121 costs about 40% of the
    training throughput on a CPU (its ``__torch_function__`` wraps each of the network's operations).

    With ``augment``, each image independently gets, with probability ``prob`` each: a rotation by an angle
    drawn uniformly in [-``rotate_degrees``, ``rotate_degrees``], a flip along ``flip_axis`` (0: the first
    spatial axis, as ``RandFlipd(spatial_axis=0)``) and a zoom drawn uniformly in ``zoom_range`` (>1 zooms in, as
    ``RandZoomd``). All three are folded into one affine matrix per image and resampled bilinearly with border
    padding, as ``RandRotated`` does.

    ``size`` (set by ``scripts.handlers.ProgressiveResize``; ``None``: unchanged) resamples the training images
    to a lower resolution in the same call (an area average for a factor of 2), a fraction of the work per image;
    DenseNet's global pooling takes any size.
    """

    def __init__(
        self,
        augment: bool = True,
        rotate_degrees: float = 15.0,
        zoom_range: tuple[float, float] = (0.9, 1.1),
        prob: float = 0.5,
        flip_axis: int = 0,
    ):
        self.enabled, self.rotate_range = augment, math.radians(rotate_degrees)
        self.zoom, self.prob, self.flip_axis = tuple(zoom_range), prob, flip_axis
        self.size: tuple[int, int] | None = None

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
        grid = F.affine_grid(theta, [*images.shape[:2], *(self.size or images.shape[2:])], align_corners=False)
        return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def __call__(self, batchdata, device=None, non_blocking: bool = False, **kwargs):
        images, labels = default_prepare_batch(batchdata, device, non_blocking, **kwargs)
        images = images.as_tensor() if isinstance(images, MetaTensor) else images
        if isinstance(labels, MetaTensor):
            labels = labels.as_tensor()
        if self.enabled:
            images = self.augment(images)
        elif self.size is not None and tuple(images.shape[2:]) != tuple(self.size):
            images = F.interpolate(images, size=self.size, mode="area")
        return images, labels


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup: float):
    """A per-iteration schedule: the learning rate rises linearly over the first ``warmup`` fraction of
    ``total_steps``, then follows a half cosine down to 0 at ``total_steps`` (and stays there).

    As ``monai.optimizers.WarmupCosineSchedule``, except that the length is not part of the scheduler's state:
    a checkpoint restores the step reached, and the length follows the resumed run's ``--epochs``, so resuming
    with more epochs goes on along the longer schedule instead of restarting the cosine.
    """
    total, ramp = max(1, int(total_steps)), max(1, round(float(warmup) * int(total_steps)))

    def factor(step: int) -> float:
        if step < ramp:
            return (step + 1) / ramp
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - ramp) / max(1, total - ramp))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class AutocastInferer(SimpleInferer):
    """``SimpleInferer`` under ``torch.autocast(device_type, dtype)`` when enabled; returns float32 logits."""

    def __init__(self, enabled: bool = False, device_type: str = "cpu", dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.enabled, self.device_type, self.dtype = enabled, device_type, dtype

    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs):
        if not self.enabled:
            return super().__call__(inputs, network, *args, **kwargs)
        with torch.autocast(self.device_type, dtype=self.dtype):
            return super().__call__(inputs, network, *args, **kwargs).float()
