"""The CPU's training precision: bf16 autocast where this processor computes bf16 natively, fp32 where it emulates
it, decided once in a workflow step (MONAI's ``amp`` is CUDA only), and the inferer that applies it.

The processor's flags decide where they can, because they do not change with load: a timed probe on a busy
machine measures the neighbour as much as the processor. Only where the flags cannot settle it (no
``/proc/cpuinfo``, another architecture, ATen's kernels limited below oneDNN's) does a probe decide, from pairs of
steps repeated until they agree with a margin, falling back to fp32, which no processor emulates."""

from __future__ import annotations

import logging
import os
import platform
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from monai.inferers import SimpleInferer

from .checks import as_bool

logger = logging.getLogger(__name__)
BF16_MIN_SPEEDUP = 1.15  # the probe's threshold: below it, fp32
MARGIN = 1.1  # the probe decides when its pairs clear the threshold by this factor, either way
AGREEING_PAIRS = 3  # ... in this many pairs, all but the most extreme one
MAX_PAIRS, PROBE_SECONDS = 12, 1.0  # then the fallback

# oneDNN's ISA names (ONEDNN_MAX_CPU_ISA) in increasing order; native bf16 from AVX512_CORE_BF16, AMX above
ONEDNN_ISAS = (
    "SSE41 AVX AVX2 AVX2_VNNI AVX2_VNNI_2 AVX512_CORE AVX512_CORE_VNNI AVX512_CORE_BF16 AVX10_1_512 "
    "AVX512_CORE_FP16 AVX10_1_512_AMX AVX512_CORE_AMX AVX10_1_512_AMX_FP16 AVX512_CORE_AMX_FP16 AVX10_2_512 "
    "AVX10_2_512_AMX_2"
).split()
BF16_ISA, AMX_ISA = ONEDNN_ISAS.index("AVX512_CORE_BF16"), ONEDNN_ISAS.index("AVX10_1_512_AMX")


@dataclass(frozen=True)
class Processor:
    """What this processor and its libraries say they can run: the CPU flags (``None`` where unknown), ATen's
    kernel level (``torch.backends.cpu.get_cpu_capability()``, which follows ``ATEN_CPU_CAPABILITY``) and oneDNN's
    limit (``ONEDNN_MAX_CPU_ISA``, ``""`` when unset)."""

    flags: frozenset | None
    capability: str
    onednn_isa: str = ""

    @classmethod
    def here(cls) -> Processor:
        flags = None
        if platform.machine().lower() in ("x86_64", "amd64", "i686", "x86"):
            try:
                with open("/proc/cpuinfo") as f:
                    line = next((line for line in f if line.startswith("flags")), "")
                flags = frozenset(line.partition(":")[2].split()) or None
            except OSError:
                pass
        isa = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA", "")
        return cls(flags, torch.backends.cpu.get_cpu_capability(), isa.strip().upper())

    def native_bf16(self) -> tuple[bool | None, str]:
        """Whether bf16 training runs natively here (``None``: the flags cannot tell), and why."""
        if self.flags is None:
            return None, f"no x86 CPU flags to read on this {platform.machine()} {self.capability} machine"
        amx = "amx_bf16" in self.flags
        if not amx and "avx512_bf16" not in self.flags:
            if "avx_ne_convert" in self.flags:  # AVX2 with bf16 conversions: oneDNN runs some bf16 on it
                return None, "the CPU flags show AVX-NE-CONVERT without AVX-512 BF16"
            return False, f"no AVX-512 BF16 or AMX in the CPU flags ({self.capability}): bf16 would be emulated"
        found = "AMX and AVX-512 BF16" if amx else "AVX-512 BF16 (no AMX)"
        isa = self.onednn_isa
        if isa and isa not in ("ALL", "DEFAULT"):
            if isa not in ONEDNN_ISAS:
                return None, f"ONEDNN_MAX_CPU_ISA={isa} is not an ISA name known here"
            if ONEDNN_ISAS.index(isa) < BF16_ISA:
                return False, f"{found} in the CPU flags, but ONEDNN_MAX_CPU_ISA={isa} limits oneDNN below it"
            if amx and ONEDNN_ISAS.index(isa) < AMX_ISA:
                found = f"AVX-512 BF16 (AMX off: ONEDNN_MAX_CPU_ISA={isa})"
        if not self.capability.startswith("AVX512"):
            return None, f"{found} in the CPU flags, but ATen's kernels run at {self.capability}"
        return True, f"{found} in the CPU flags, oneDNN and ATen at {self.capability}"


def probe_decision(ratios: Iterable[float]) -> tuple[bool | None, str]:
    """Reads pair ratios (fp32 time / bf16 time of two adjacent steps) until all but the most extreme of the
    last ``AGREEING_PAIRS`` + 1 clear ``BF16_MIN_SPEEDUP`` by ``MARGIN`` on the same side; ``None`` when they never
    do within ``ratios`` (the caller's budget)."""
    seen: list[float] = []
    for ratio in ratios:
        seen.append(ratio)
        last = sorted(seen[-(AGREEING_PAIRS + 1) :])
        if len(last) <= AGREEING_PAIRS:
            continue
        low, high = last[1], last[-2]  # all but the most extreme: one disturbed pair does not decide
        if low >= BF16_MIN_SPEEDUP * MARGIN or high * MARGIN <= BF16_MIN_SPEEDUP:
            chosen = low >= BF16_MIN_SPEEDUP * MARGIN
            middle = sorted(last[1:-1])[len(last[1:-1]) // 2]
            return chosen, f"{len(seen)} pairs of timed steps agree: bf16 ran {middle:.2f}x as fast as fp32"
    if not seen:
        return None, "no timed step"
    return None, f"{len(seen)} pairs of timed steps did not agree (bf16 {min(seen):.2f}x to {max(seen):.2f}x fp32)"


def decide(processor: Processor, ratios: Callable[[], Iterable[float]]) -> tuple[bool, str]:
    """bf16 or not, and the evidence: the processor's flags where they settle it, else the probe's pairs
    (``ratios()``, called only then), else fp32."""
    native, why = processor.native_bf16()
    if native is not None:
        return native, f"decided by the processor: {why}"
    chosen, measured = probe_decision(ratios())
    if chosen is not None:
        return chosen, f"decided by a probe, as {why}: {measured}"
    return False, f"fp32 by default, as {why} and {measured}"


def _probe_block():
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

    return step


def timed_ratios(seconds: float = PROBE_SECONDS, pairs: int = MAX_PAIRS):
    """Yields fp32/bf16 time ratios of adjacent training steps of a DenseNet block (alternating which runs first,
    so that drift touches both alike), for at most ``pairs`` pairs or ``seconds`` after a warm-up."""
    step = _probe_block()
    for bf16 in (False, True):  # warm-up: oneDNN builds its kernels
        step(bf16)
    deadline = time.perf_counter() + seconds
    for i in range(pairs):
        if i % 2:
            bf16_time, fp32_time = step(True), step(False)
        else:
            fp32_time, bf16_time = step(False), step(True)
        yield fp32_time / bf16_time
        if time.perf_counter() > deadline:
            return


def bf16_speedup() -> float:
    """The probe's median fp32/bf16 time ratio over its whole budget, for reports (``check_gpu``, benchmarks)."""
    ratios = sorted(timed_ratios())
    return ratios[len(ratios) // 2]


class CpuPrecision:
    """Whether CPU training uses bf16 autocast: ``setting`` ``True``/``False`` as given, ``"auto"`` by
    :func:`decide` (every process of a distributed run must find bf16); never on CUDA (MONAI's ``amp``).
    :meth:`decide` is the step, logged with its evidence."""

    def __init__(self, setting="auto", device="cpu"):
        setting = "auto" if str(setting).strip().lower() == "auto" else as_bool(setting, "cpu_bf16")
        self.setting, self.on_cpu, self.bf16 = setting, torch.device(device).type == "cpu", None
        self.evidence = ""  # why, once decided

    def decide(self) -> bool:
        if self.bf16 is not None:
            return self.bf16
        if not self.on_cpu:
            self.bf16, self.evidence = False, "not on the CPU"
            return False
        if self.setting != "auto":
            self.bf16, self.evidence = bool(self.setting), f"--cpu_bf16 {str(self.setting).lower()}"
            logger.info(f"CPU precision: {'bf16 autocast' if self.bf16 else 'fp32'} ({self.evidence})")
            return self.bf16
        chosen, evidence = decide(Processor.here(), timed_ratios)
        if torch.distributed.is_initialized():
            vote = torch.tensor(int(chosen))
            torch.distributed.all_reduce(vote, op=torch.distributed.ReduceOp.MIN)
            if bool(vote) != chosen:
                evidence += "; another process found otherwise"
            chosen = bool(vote)
        logger.info(
            f"CPU precision: {'bf16 autocast' if chosen else 'fp32'} (--cpu_bf16 auto, {evidence}; "
            "--cpu_bf16 true|false overrides)"
        )
        self.bf16, self.evidence = chosen, evidence
        return chosen


class AutocastInferer(SimpleInferer):
    """``SimpleInferer`` under CPU bf16 autocast when :class:`CpuPrecision` (``setting``, ``device``) decides so, at
    its first call (logged with the evidence); returns float32 logits."""

    def __init__(self, setting="auto", device="cpu"):
        super().__init__()
        self.precision = CpuPrecision(setting, device)

    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs):
        if not self.precision.decide():
            return super().__call__(inputs, network, *args, **kwargs)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return super().__call__(inputs, network, *args, **kwargs).float()
