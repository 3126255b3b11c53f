"""The CPU's training precision: bf16 autocast where this processor runs it faster than fp32, decided in one
workflow step (MONAI's ``amp`` is CUDA only), and the inferer that applies it."""

from __future__ import annotations

import logging
import time

import torch
from monai.inferers import SimpleInferer

logger = logging.getLogger(__name__)
BF16_MIN_SPEEDUP = 1.15  # below it, fp32


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


class CpuPrecision:
    """Whether CPU training uses bf16 autocast: ``setting`` ``True``/``False`` as given, ``"auto"`` when
    :func:`bf16_speedup` finds it at least ``BF16_MIN_SPEEDUP`` times as fast as fp32 (every process of a
    distributed run must find so); never on CUDA (MONAI's ``amp``). :meth:`decide` is the step that probes, logged
    with the reason."""

    def __init__(self, setting="auto", device="cpu"):
        self.setting, self.on_cpu, self.bf16 = setting, torch.device(device).type == "cpu", None

    def decide(self) -> bool:
        if self.bf16 is not None:
            return self.bf16
        if not self.on_cpu:
            self.bf16 = False
            return False
        if self.setting != "auto":
            self.bf16 = bool(self.setting)
            logger.info(
                f"CPU precision: {'bf16 autocast' if self.bf16 else 'fp32'} (--cpu_bf16 {str(self.setting).lower()})"
            )
            return self.bf16
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
        self.bf16 = chosen
        return chosen


class AutocastInferer(SimpleInferer):
    """``SimpleInferer`` under CPU bf16 autocast when ``precision`` (:class:`CpuPrecision`) has decided so (at the
    first call if its step has not run); returns float32 logits."""

    def __init__(self, precision: CpuPrecision):
        super().__init__()
        self.precision = precision

    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs):
        if not self.precision.decide():
            return super().__call__(inputs, network, *args, **kwargs)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return super().__call__(inputs, network, *args, **kwargs).float()
