"""Speed pieces the configs plug into MONAI: a cache filled by processes, batches sliced on the device, batched
augmentation, CPU bf16 autocast.

``ProcessCacheDataset`` fills MONAI's ``CacheDataset`` with forked processes instead of threads (its transforms
are Python-bound, so threads wait on each other). ``DeviceBatches`` (opt-in) keeps that cache as one tensor on the
training device and slices each batch from it. MONAI's random transforms work on one sample at a time in
Python (about 2.4 ms per 64x64 image here); ``PrepareBatch`` applies the same three augmentations to a whole
batch with one ``grid_sample`` call on the batch's device. ``AutocastInferer`` adds CPU bf16 autocast, which
MONAI's ``amp`` flag (CUDA only) lacks.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import pickle
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import CacheDataset, MetaTensor
from monai.engines.utils import default_prepare_batch
from monai.inferers import SimpleInferer
from monai.transforms import RandomizableTrait, Transform
from monai.utils import optional_import

from scripts.errors import BundleError

tqdm, has_tqdm = optional_import("tqdm", name="tqdm")
logger = logging.getLogger(__name__)
_filling: CacheDataset | None = None  # the dataset a forked worker fills the cache from (inherited, not pickled)


def _pack(items: list[dict]) -> list:
    """Items of one chunk, columns per key: MetaTensors of one shape as one stacked array plus their metadata.

    Pickled one by one, a MetaTensor costs about 0.27 ms to load here, which made the parent process the
    bottleneck; as one array plus plain metadata, loading and rebuilding costs about 0.06 ms an item.
    """
    if any(item.keys() != items[0].keys() for item in items):
        return [(None, items)]
    columns = []
    for key in items[0]:
        values = [item[key] for item in items]
        if all(isinstance(v, MetaTensor) for v in values) and len({(v.shape, v.dtype) for v in values}) == 1:
            metas = [{k: m.numpy() if torch.is_tensor(m) else m for k, m in v.meta.items()} for v in values]
            ops = [v.applied_operations for v in values]
            columns.append((key, (np.stack([v.numpy() for v in values]), metas, ops)))
        else:
            columns.append((key, values))
    return columns


def _unpack(columns: list) -> list[dict]:
    """The items ``_pack`` packed; stacked MetaTensors become views of one tensor."""
    if columns[0][0] is None:  # items of different keys, sent as they are
        return columns[0][1]
    keys, values = [key for key, _ in columns], []
    for _, column in columns:
        if isinstance(column, tuple):
            stacked, metas, ops = column
            tensor = torch.from_numpy(stacked)
            column = [MetaTensor(tensor[i], meta=m, applied_operations=o) for i, (m, o) in enumerate(zip(metas, ops))]
        values.append(column)
    return [dict(zip(keys, item)) for item in zip(*values)]


def _fill_chunk(indices: list[int]) -> tuple[bytes | None, tuple[str, str] | None]:
    """In a forked worker: the cached items for ``indices``, packed and pickled in one piece, or the problem and fix."""
    try:
        items = [_filling._load_cache_item(i) for i in indices]  # type: ignore[union-attr]
    except BundleError as e:  # its constructor takes (problem, fix): send those, not the exception
        return None, (e.problem, e.fix)
    # plain pickle: torch's multiprocessing pickler would move every small tensor through shared memory
    return pickle.dumps(_pack(items), protocol=pickle.HIGHEST_PROTOCOL), None


class ProcessCacheDataset(CacheDataset):
    """``CacheDataset`` whose cache is built by ``num_workers`` forked processes, and which names unreadable files.

    MONAI builds the cache with a thread pool, but LoadImage and the other transforms spend most of their time
    in Python, so threads contend for the GIL: on 2 cores, 2 threads built it 1.3x slower than 1. Forked
    processes each take chunks of the data and send back their items packed in one piece (see ``_pack``). With
    ``num_workers`` 1, or off Linux (macOS and Windows have no safe ``fork``), the cache is built in this
    process. An image that cannot be read stops the run with its path, whichever way the cache is built.
    """

    def _load_cache_item(self, idx: int):
        try:
            return super()._load_cache_item(idx)
        except Exception as e:
            cause = e
            while cause.__cause__ is not None:  # MONAI wraps the reader's error in "applying transform ..."
                cause = cause.__cause__
            item = self.data[idx]
            raise BundleError(
                f"cannot read {item.get('image', item) if isinstance(item, dict) else item}: {cause}",
                "replace it with a readable image, or delete it and train with a new --output_dir (a new split).",
            ) from e

    def _fill_cache(self, indices=None) -> list:
        global _filling
        indices = list(range(self.cache_num) if indices is None else indices)
        workers, start = self.num_workers or 1, time.perf_counter()
        bar = tqdm(total=len(indices), desc="Loading dataset") if self.progress and has_tqdm else None
        cache: list = []
        try:
            if workers <= 1 or not sys.platform.startswith("linux"):  # fork is safe on Linux only
                # in this process, not MONAI's thread pool: a BundleError (a SystemExit) would kill its thread
                workers = 1
                for i in indices:
                    cache.append(self._load_cache_item(i))
                    if bar is not None:
                        bar.update(1)
                return cache
            size = max(1, min(256, len(indices) // (4 * workers)))
            chunks = [indices[i : i + size] for i in range(0, len(indices), size)]
            _filling = self  # what the forked workers inherit
            # one torch thread per worker, as DataLoader's workers: forked OpenMP pools must not be reused
            fork = multiprocessing.get_context("fork")
            pool = ProcessPoolExecutor(workers, mp_context=fork, initializer=torch.set_num_threads, initargs=(1,))
            try:
                for payload, problem in pool.map(_fill_chunk, chunks):
                    if problem:
                        raise BundleError(*problem)
                    cache += _unpack(pickle.loads(payload))
                    if bar is not None:
                        bar.update(len(cache) - bar.n)
            finally:  # on a problem, stop at once: drop the chunks not started yet
                pool.shutdown(wait=True, cancel_futures=True)
        except BrokenProcessPool as e:  # a worker was killed, e.g. by the out-of-memory killer
            raise BundleError(
                f"a process building the data cache died ({e}).",
                f"pass a smaller --cache_num_workers (it was {workers}; 1 builds it in the training process) "
                "or a --cache_rate below 1.0 if memory is short.",
            ) from e
        finally:
            _filling = None
            if bar is not None:
                bar.close()
            if len(cache) == len(indices):
                logger.info(f"cached {len(cache)} items in {time.perf_counter() - start:.1f} s ({workers} process(es))")
        return cache


class DeviceBatches:
    """Training batches sliced from the whole cached dataset, held as one tensor per key on ``device``.

    A ``DataLoader`` over the cache still gathers ``batch_size`` items and collates their MetaTensors and
    metadata for every step, on the CPU: about 14 ms for a batch of 512 on this project's CPU, against 1.4 ms to
    index one stacked tensor. This stacks the dataset once (on first use), moves it to ``device``, and each epoch
    yields ``{"image": ..., "label": ...}`` batches indexed by a new permutation (drawn from ``seed`` and the
    epoch) or in order, the last one possibly smaller, as a ``DataLoader`` would. The items must be fixed: the
    dataset wholly cached, with no per-image random transforms (augment whole batches with ``PrepareBatch``).
    """

    def __init__(
        self, dataset, batch_size: int, device="cpu", shuffle: bool = True, seed: int = 0, keys=("image", "label")
    ):
        self.dataset, self.batch_size, self.device = dataset, int(batch_size), torch.device(device)
        self.shuffle, self.seed, self.keys = shuffle, int(seed), tuple(keys)
        self.epoch, self.data = 0, None

    def __len__(self) -> int:
        return math.ceil(len(self.dataset) / self.batch_size)

    def _stack(self) -> dict[str, torch.Tensor]:
        ds = self.dataset

        def changes(t) -> bool:  # what CacheDataset runs after its cache, on every access
            return isinstance(t, RandomizableTrait) or not isinstance(t, Transform)

        cached = isinstance(ds, CacheDataset) and ds.cache_num == len(ds)
        if not cached or ds.transform.get_index_of_first(changes) is not None:
            raise BundleError(
                "device_batches stacks the training images once, so it needs them all cached and without "
                "per-image random transforms.",
                "keep --cache_rate 1.0 and --batch_augment true (the defaults), or pass --device_batches false.",
            )
        items = [ds[i] for i in range(len(ds))]  # the cached items themselves (no random transform copies them)
        data = {}
        for key in self.keys:
            plain = [
                v.as_tensor() if isinstance(v, MetaTensor) else torch.as_tensor(v) for v in (i[key] for i in items)
            ]
            data[key] = torch.stack(plain).to(self.device)
        return data

    def __iter__(self):
        if self.data is None:
            self.data = self._stack()
        n = len(self.dataset)
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
    drawn uniformly in [-``rotate_range``, ``rotate_range``] radians, a flip along ``flip_axis`` (0: the first
    spatial axis, as ``RandFlipd(spatial_axis=0)``) and a zoom drawn uniformly in [``min_zoom``, ``max_zoom``]
    (>1 zooms in, as ``RandZoomd``). All three are folded into one affine matrix per image and resampled bilinearly with
    border padding, as ``RandRotated`` does.
    """

    def __init__(
        self,
        augment: bool = True,
        rotate_range: float = math.radians(15),
        min_zoom: float = 0.9,
        max_zoom: float = 1.1,
        prob: float = 0.5,
        flip_axis: int = 0,
    ):
        self.enabled, self.rotate_range, self.zoom, self.prob, self.flip_axis = (
            augment,
            rotate_range,
            (min_zoom, max_zoom),
            prob,
            flip_axis,
        )

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
