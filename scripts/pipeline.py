"""Speed pieces the configs plug into MONAI's engines: augmentation of whole batches on their device, batches
sliced on the device, CPU bf16 autocast where a timed probe finds it faster (MONAI's ``amp`` is CUDA only), the
learning-rate schedule."""

from __future__ import annotations

import functools
import logging
import math
import time

import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.engines.utils import default_prepare_batch
from monai.inferers import SimpleInferer

from .utils import as_bool

logger = logging.getLogger(__name__)


class DeviceBatches:
    """Batches sliced from the preprocessed training set (``scripts.data.preload``'s items), stacked once on
    ``device`` (configs/device_batches.json): each epoch a new permutation from ``seed`` and the epoch, or in
    order; the last partial batch left out, as the training ``DataLoader``'s ``drop_last``."""

    def __init__(self, data, batch_size: int, device="cpu", shuffle: bool = True, seed: int = 0):
        self.items, self.batch_size, self.device = data, int(batch_size), torch.device(device)
        self.shuffle, self.seed = shuffle, int(seed)
        self.epoch, self.data = 0, None

    def __len__(self) -> int:
        return len(self.items) // self.batch_size

    def __iter__(self):
        if self.data is None:
            keys = ("image", "label")
            self.data = {k: torch.stack([torch.as_tensor(i[k]) for i in self.items]).to(self.device) for k in keys}
        n = len(self.items)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(n)
        self.epoch += 1
        for index in order[: len(self) * self.batch_size].to(self.device).split(self.batch_size):
            yield {key: values[index] for key, values in self.data.items()}


def to_device(network: torch.nn.Module, device, channels_last=True) -> torch.nn.Module:
    """``network`` on ``device``, in the channels-last memory format (faster for DenseNet's convolutions on CPUs
    with and without bf16) unless ``channels_last`` is false."""
    memory_format = torch.channels_last if as_bool(channels_last, "channels_last") else torch.preserve_format
    return network.to(device, memory_format=memory_format)


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
        images, labels = default_prepare_batch(batchdata, device, non_blocking, **kwargs)
        images = images.as_tensor() if isinstance(images, MetaTensor) else images
        if isinstance(labels, MetaTensor):
            labels = labels.as_tensor()
        return (self.augment(images) if self.enabled else images), labels


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


BF16_MIN_SPEEDUP = 1.15  # below it, fp32 (the probe's noise stays well away from it on both kinds of CPU)


def bf16_speedup() -> float:
    """How many times faster a training step of a DenseNet block runs under CPU bf16 autocast than in fp32 here:
    over 1 where the processor computes bf16 natively (AVX-512 BF16, AMX), well under 1 where it emulates it
    (AVX2). Timed, so it follows ``ONEDNN_MAX_CPU_ISA`` / ``ATEN_CPU_CAPABILITY`` too; under a second."""
    torch.manual_seed(0)
    nn = torch.nn
    layers = [nn.BatchNorm2d(128), nn.ReLU(), nn.Conv2d(128, 128, 1, bias=False), nn.BatchNorm2d(128), nn.ReLU()]
    block = nn.Sequential(*layers, nn.Conv2d(128, 32, 3, padding=1, bias=False)).to(memory_format=torch.channels_last)
    x = torch.rand(32, 128, 16, 16).to(memory_format=torch.channels_last).requires_grad_()

    def step(bf16: bool) -> float:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = block(x)
        y.float().sum().backward()
        return time.perf_counter() - start

    for autocast in (False, True):  # warm-up: oneDNN builds its kernels
        step(autocast)
    fp32, bf16 = [], []
    for _ in range(4):  # interleaved, so that another process's load slows both alike; the fastest of each
        fp32.append(step(False))
        bf16.append(step(True))
        if bf16[-1] > 3 * min(fp32):  # clearly slower: no need to look closer
            break
    return min(fp32) / min(bf16)


@functools.lru_cache(maxsize=None)
def use_cpu_bf16(setting="auto") -> bool:
    """Whether CPU training uses bf16 autocast: ``true``/``false`` as given, ``auto`` when :func:`bf16_speedup`
    finds it at least ``BF16_MIN_SPEEDUP`` times as fast as fp32 (every process of a distributed run must find
    so). Logged with the reason."""
    text = str(setting).strip().lower()
    if text != "auto":
        chosen = as_bool(setting, "cpu_bf16")
        logger.info(f"CPU precision: {'bf16 autocast' if chosen else 'fp32'} (--cpu_bf16 {text})")
        return chosen
    speedup = bf16_speedup()
    chosen = speedup >= BF16_MIN_SPEEDUP
    if torch.distributed.is_initialized():
        vote = torch.tensor(int(chosen))
        torch.distributed.all_reduce(vote, op=torch.distributed.ReduceOp.MIN)
        chosen = bool(vote)
    capability = torch.backends.cpu.get_cpu_capability()
    logger.info(
        f"CPU precision: {'bf16 autocast' if chosen else 'fp32'} (--cpu_bf16 auto: a bf16 training step ran "
        f"{speedup:.2f}x as fast as fp32 on this {capability} CPU; --cpu_bf16 true|false overrides)"
    )
    return chosen


class AutocastInferer(SimpleInferer):
    """``SimpleInferer`` under CPU bf16 autocast when ``bf16`` (``true``, ``false`` or ``auto``: see
    :func:`use_cpu_bf16`) says so and ``device`` is a CPU (on CUDA, MONAI's ``amp`` flag does fp16); returns
    float32 logits."""

    def __init__(self, bf16="auto", device="cpu"):
        super().__init__()
        self.enabled = torch.device(device).type == "cpu" and use_cpu_bf16(bf16)

    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs):
        if not self.enabled:
            return super().__call__(inputs, network, *args, **kwargs)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return super().__call__(inputs, network, *args, **kwargs).float()
