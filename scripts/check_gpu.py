"""Report the compute device: versions, each GPU, a timed matrix product, autocast support and, on a
CPU, the bf16 probe's speed and the precision ``--cpu_bf16 auto`` gives training, with its evidence. Fails only
with ``--require_gpu``.

    python -m scripts.check_gpu [--require_gpu true] [--size 2048]
"""

from __future__ import annotations

import platform
import sys
import time

import fire
import torch

from .checks import as_bool
from .precision import Processor, bf16_speedup, decide, timed_ratios


def _timed_matmul(device: torch.device, size: int, dtype=torch.float32) -> float:
    a, b = torch.rand(size, size, device=device, dtype=dtype), torch.rand(size, size, device=device, dtype=dtype)
    (a @ b).sum().item()  # warm-up
    start, reps = time.perf_counter(), 5
    for _ in range(reps):
        c = a @ b
    c.sum().item()  # waits for the GPU
    return 2 * size**3 * reps / (time.perf_counter() - start) / 1e9


def _autocast_works(device_type: str, dtype: torch.dtype) -> str:
    try:
        x = torch.rand(8, 8, device=device_type)
        with torch.autocast(device_type, dtype=dtype):
            y = x @ x
        return f"yes ({y.dtype})" if y.dtype == dtype else f"no (ran in {y.dtype})"
    except Exception as e:
        return f"no ({type(e).__name__}: {e})"


def check_gpu(require_gpu: bool = False, size: int = 2048) -> None:
    import monai

    print(f"python {platform.python_version()}, torch {torch.__version__}, MONAI {monai.__version__}")
    print(f"CUDA build: {torch.version.cuda or 'none (CPU-only torch)'}; cuDNN: {torch.backends.cudnn.version()}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p, dev = torch.cuda.get_device_properties(i), torch.device("cuda", i)
            print(
                f"GPU {i}: {p.name}, {p.total_memory / 2**30:.1f} GiB, compute capability {p.major}.{p.minor}, "
                f"{p.multi_processor_count} multiprocessors"
            )
            for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
                print(f"  matmul {size}x{size} {name}: {_timed_matmul(dev, size, dtype):.0f} GFLOP/s")
        print(f"fp16 autocast: {_autocast_works('cuda', torch.float16)}")
        bf16 = f"{_autocast_works('cuda', torch.bfloat16)} (bf16 supported: {torch.cuda.is_bf16_supported()})"
        print(f"bf16 autocast: {bf16}")
        return
    print(f"No CUDA GPU is available: training runs on the CPU ({torch.get_num_threads()} threads).")
    print(f"  CPU matmul {size}x{size} fp32: {_timed_matmul(torch.device('cpu'), size):.1f} GFLOP/s")
    bf16, evidence = decide(Processor.here(), timed_ratios)
    print(f"  CPU bf16 autocast: {_autocast_works('cpu', torch.bfloat16)}")
    print(
        f"  CPU bf16 speed: a training step ran {bf16_speedup():.2f}x as fast as fp32 on this "
        f"{torch.backends.cpu.get_cpu_capability()} CPU; training uses {'bf16' if bf16 else 'fp32'} "
        f"(--cpu_bf16 auto, {evidence})"
    )
    print(
        "To use an NVIDIA GPU, install a CUDA build of torch that matches your driver, e.g.\n"
        "  pip install torch --index-url https://download.pytorch.org/whl/cu128\nand check `nvidia-smi` lists it."
    )
    if as_bool(require_gpu, "require_gpu"):
        sys.exit("ERROR: --require_gpu was given but no GPU is usable.")


if __name__ == "__main__":
    fire.Fire(check_gpu)
