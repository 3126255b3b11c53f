"""Preprocessed images held in memory: a dataset built once, at its first use, in worker processes (the transforms
hold Python's lock, so threads would not run them in parallel), with what the data report needs of each image (its
file's kind and size, whether it is constant); and batches sliced from it on the device."""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from functools import partial

import numpy as np
import torch
from monai.data import MetaTensor
from monai.utils import convert_to_numpy

from .checks import as_bool
from .errors import BundleError, root_cause
from .progress import tqdm_bar

logger = logging.getLogger(__name__)
_worker_transform = None  # set in each worker process by _start_worker


def _die_with_parent(parent: int) -> None:
    """Linux: have the kernel kill this process when its parent dies, so no orphan holds memory."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the call above
        os._exit(1)


def _start_worker(transform, parent: int) -> None:
    """A worker's initializer: killed with its parent, one torch thread (a forked OpenMP pool must not be
    reused), and the transform, inherited through ``fork`` rather than pickled."""
    global _worker_transform
    _die_with_parent(parent)
    torch.set_num_threads(1)
    _worker_transform = transform


def _preprocess_in_worker(items: list[dict]) -> tuple:
    return _preprocess(_worker_transform, items)


def _preprocess(transform, items: list[dict]) -> tuple:
    """``items`` through ``transform``, packed as one stacked image array plus the other fields, the
    ``(path, reason)`` of every image that could not be read, and per image its file's kind and size and whether
    it is constant."""
    images, rest, failed, seen = [], [], [], []
    for item in items:
        try:
            out = transform(dict(item))
        except Exception as e:
            cause = root_cause(e)
            failed.append((str(item["image"]), f"{type(cause).__name__}: {cause}"))
            continue
        meta = out["image"].meta if isinstance(out["image"], MetaTensor) else {}
        image = convert_to_numpy(out["image"], dtype=np.float32)
        size = tuple(int(s) for s in meta.get("spatial_shape", image.shape[1:]))
        seen.append((str(meta.get("mode", "")), size, bool(image.max() == image.min())))
        images.append(image)
        rest.append({k: v for k, v in out.items() if k != "image"} | {"path": str(item["image"])})
    return (np.stack(images) if images else None), rest, failed, seen


class CachedDataset(torch.utils.data.Dataset):
    """A dataset of ``data`` through ``transform`` (the deterministic preprocessing), held in memory: built once, at
    first use, each item ``{"image": float32 tensor, "path": its file, ...}``. Chunks go to ``num_workers`` forked
    processes (Linux; else this process) that die with it. Unreadable images are named together, or with
    ``skip_unreadable`` left out and counted (``failed``); ``seen``: each image's file kind and size, the constant
    ones, for the data report."""

    def __init__(self, data, transform, num_workers: int = 1, skip_unreadable=False, chunk_size: int = 256):
        self.data, self.transform, self.workers = data, transform, max(1, int(num_workers))
        self.skip_unreadable, self.chunk_size = as_bool(skip_unreadable, "skip_unreadable"), chunk_size
        self.items: list[dict] | None = None
        self.failed: list[tuple] = []
        self.seen = {"modes": Counter(), "sizes": Counter(), "constant": []}

    def __len__(self) -> int:
        return len(self.build())

    def __getitem__(self, index: int) -> dict:
        return self.build()[index]

    def build(self) -> list[dict]:
        if self.items is not None:
            return self.items
        listed = list(self.data)
        workers = self.workers if self.workers > 1 and sys.platform.startswith("linux") else 1  # fork: Linux only
        chunks = [listed[i : i + self.chunk_size] for i in range(0, len(listed), self.chunk_size)]
        bar = tqdm_bar(len(listed), "Loading dataset")
        items, pool, start = [], None, time.perf_counter()
        try:
            if workers > 1:
                fork = multiprocessing.get_context("fork")
                init = (self.transform, os.getpid())
                pool = ProcessPoolExecutor(workers, mp_context=fork, initializer=_start_worker, initargs=init)
            results = (
                pool.map(_preprocess_in_worker, chunks) if pool else map(partial(_preprocess, self.transform), chunks)
            )
            for stacked, rest, bad, seen in results:
                self.failed += bad
                if stacked is not None:
                    tensor = torch.from_numpy(stacked)
                    items += [{"image": tensor[i], **other} for i, other in enumerate(rest)]
                for (mode, size, constant), other in zip(seen, rest):
                    self.seen["modes"][mode] += 1
                    self.seen["sizes"][size] += 1
                    if constant:
                        self.seen["constant"].append(other["path"])
                bar.update(len(rest) + len(bad))
        except BrokenProcessPool as e:  # a worker was killed, e.g. by the out-of-memory killer
            raise BundleError(
                f"a process preprocessing the images died ({e}).",
                f"pass a smaller --cache_num_workers (it was {workers}; 1 works in the training process).",
            ) from e
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
            bar.close()
        logger.info(f"cached {len(items)} images in {time.perf_counter() - start:.1f} s ({workers} process(es))")
        if self.failed:
            listed = "\n".join(f"    {path}: {reason}" for path, reason in self.failed)
            if not self.skip_unreadable:
                raise BundleError(
                    f"cannot read {len(self.failed)} image(s):\n{listed}",
                    "replace or delete them (and train with a new --output_dir, for a new split), "
                    "or pass --skip_unreadable true to leave them out.",
                )
            logger.warning(f"skipped {len(self.failed)} unreadable image(s) (--skip_unreadable true):\n{listed}")
        self.items = items
        return items


class DeviceBatches:
    """Batches sliced from the preprocessed training set (:class:`Cache`'s items), stacked once on ``device``
    (configs/device_batches.json): each epoch a new permutation from ``seed`` and the epoch, or in order; the last
    partial batch left out, as the training ``DataLoader``'s ``drop_last``."""

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
