"""Peak memory and speed of the bundle's inference command against the number of input images.

    python -m tools.inference_memory --images /path/to/MedNIST --ckpt_dir models [--counts 2000,20000]

For each count, links that many images (every class, in a fixed order) into a scratch folder and runs
``python -m monai.bundle run inference`` on it in a fresh process, the counts alternating for ``repeats`` rounds;
prints each process's peak resident memory, wall time and images per second, then the medians and the ratio of
the largest count's median peak to the smallest's.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import statistics
import sys
import tempfile

import fire

from scripts.errors import BundleError
from scripts.files import remove_stale
from tools import commands


def inference_memory(
    images: str, ckpt_dir: str = "models", counts="2000,20000", batch_size: int = 64, repeats: int = 3
) -> dict:
    """Run inference on ``counts`` images of ``images`` (a MedNIST folder) and report memory and speed."""
    files = sorted(glob.glob(os.path.join(images, "*", "*.jpeg")))
    counts = [int(c) for c in (counts.split(",") if isinstance(counts, str) else counts)]
    if not files or max(counts) > len(files):
        raise BundleError(f"{images} holds {len(files)} images, fewer than {max(counts)}.", "pass --counts lower.")
    ckpt_dir = os.path.abspath(ckpt_dir)
    remove_stale(tempfile.gettempdir(), "infmem-")
    work = tempfile.mkdtemp(prefix=f"infmem-{os.getpid()}-")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    runs: dict[int, list] = {n: [] for n in counts}
    try:
        for n in counts:
            folder = os.path.join(work, f"in{n}")
            os.makedirs(folder)
            step = len(files) / n
            for i in range(n):
                src = files[int(i * step)]
                os.symlink(src, os.path.join(folder, f"{i:06d}_{os.path.basename(src)}"))
        for r in range(repeats):
            for n in counts:
                run = commands.inference(
                    os.path.join(work, f"in{n}"),
                    os.path.join(work, f"out{n}-{r}"),
                    ckpt_dir,
                    "--batch_size",
                    str(batch_size),
                )
                wall, peak = run["wall_s"], run["peak_rss_mib"]
                runs[n].append({"wall_s": round(wall, 1), "img_per_s": round(n / wall, 1), "peak_mib": round(peak, 1)})
                print(
                    f"round {r + 1}: {n:>7} images, {wall:6.1f} s, {n / wall:6.1f} images/s, peak RSS {peak:6.1f} MiB"
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    median = {n: {k: statistics.median(x[k] for x in rows) for k in rows[0]} for n, rows in runs.items()}
    for n, m in median.items():
        print(f"median {n:>7} images: {m['wall_s']} s, {m['img_per_s']} images/s, peak RSS {m['peak_mib']} MiB")
    ratio = median[counts[-1]]["peak_mib"] / median[counts[0]]["peak_mib"]
    print(f"median peak RSS, {counts[-1]} against {counts[0]} images: {ratio:.3f}x")
    return {"runs": runs, "median": median, "peak_ratio": round(ratio, 3)}


if __name__ == "__main__":
    fire.Fire(inference_memory)
