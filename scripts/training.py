"""What a training run adds to MONAI's trainer: the network on its device (optionally started from a model of this
bundle, layer by layer), the optimizer's parameter groups, the learning-rate schedule and the loss's class
weights."""

from __future__ import annotations

import logging
import math

import torch
from monai.networks.utils import copy_model_state

from .errors import BundleError
from .model_file import load_model

logger = logging.getLogger(__name__)


def to_device(network: torch.nn.Module, device, channels_last: bool = True) -> torch.nn.Module:
    """``network`` on ``device``, in the channels-last memory format (faster for DenseNet's convolutions on CPUs
    with and without bf16) unless ``channels_last`` is false."""
    return network.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)


class Pretrained:
    """Starting weights from ``path`` (a ``model.pt`` of this bundle, read by the safe loader, with the description
    beside it): :meth:`load`, a workflow step, copies every weight whose name and shape fit into ``network`` and
    logs what was not (the classifier when the classes differ, the first convolution when the channels do); the
    loaded weights then learn at ``lr_factor`` times the rate (:meth:`parameter_groups`)."""

    def __init__(self, path, network: torch.nn.Module, lr_factor: float = 1.0):
        self.path, self.network, self.lr_factor = path, network, float(lr_factor)
        self.loaded: set[str] | None = None

    def load(self) -> set[str]:
        if self.loaded is not None:
            return self.loaded
        self.loaded = set()
        if not self.path:
            return self.loaded
        if not str(self.path).lower().endswith(".pt"):
            raise BundleError(f"--pretrained {self.path} is not a model.pt.", "pass a model.pt trained by this bundle.")
        source = load_model(str(self.path))
        _, updated, unchanged = copy_model_state(self.network, source.state_dict(), inplace=True)
        self.loaded = set(updated)
        fresh = sorted({k.rsplit(".", 1)[0] for k in unchanged})
        logger.info(
            f"pretrained: {len(updated)} of {len(updated) + len(unchanged)} tensors loaded from {self.path}; "
            f"started afresh: {', '.join(fresh) or 'none'}"
        )
        return self.loaded

    def parameter_groups(self, learning_rate: float) -> list[dict]:
        """The optimizer's groups: the loaded parameters at ``lr_factor`` x ``learning_rate``, the rest at it."""
        loaded = self.load()
        named = list(self.network.named_parameters())
        if not loaded or self.lr_factor == 1.0:
            return [{"params": [p for _, p in named], "lr": learning_rate}]
        groups = [
            {"params": [p for n, p in named if n in loaded], "lr": learning_rate * self.lr_factor},
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
