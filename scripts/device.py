"""The training's compute device: logged when training starts (GPU, CUDA, memory; or CPU threads) and ends (its
time, peak GPU memory), and on a CPU, threads that hold up when another process is busy on the same cores.

With every core's thread in use, OpenMP's threads meet at a barrier after each operation: when another process
holds one core, the thread waiting on it stalls the others, and a training step slows several-fold, not by the
share of the CPU it lost (the model card measures it). :class:`Device` keeps torch's default (every core)
while it is the faster and half the threads while they are, by trials: a few iterations timed with each count,
the faster kept (every core unless half is ``MARGIN`` faster). A trial runs once early in the run, whenever steps
at every core become ``SLOWER`` than their best (a neighbour started), and every ``period`` iterations while at
half (has it stopped?): a quiet machine runs one trial in all. ``--cpu_threads N`` fixes the count instead.
"""

from __future__ import annotations

import collections
import logging
import statistics
import time

import torch
from ignite.engine import Engine, Events

logger = logging.getLogger(__name__)
MARGIN = 1.2  # half the threads must be this much faster: a quiet machine keeps every core
SLOWER = 1.5  # steps at every core this much slower than their best: time to try half
RECENT = 5  # steps whose median is compared with the best


def choose(full: list[float], half: list[float], threads: tuple[int, int]) -> tuple[int, float]:
    """The thread count of ``threads`` (every core, half) whose iterations (seconds) ran faster, and the ratio of
    their medians (full / half: above 1, half was faster)."""
    ratio = statistics.median(full) / statistics.median(half)
    return (threads[1] if ratio >= MARGIN else threads[0]), ratio


class Device:
    """Ignite handler of the training engine: logs the device at the start and the run's time (and peak GPU
    memory) at the end; on a CPU, ``threads`` 0 adapts (see the module), N fixes N threads. A trial times
    ``trial`` iterations at every core, then ``trial`` at half; the first starts at iteration ``first``; a
    change is logged."""

    def __init__(self, device, threads: int = 0, period: int = 200, trial: int = 3, first: int = 4):
        self.device = torch.device(device)
        self.on_cpu = self.device.type == "cpu"
        self.setting, self.period, self.trial, self.first = int(threads), int(period), int(trial), int(first)
        self.full = torch.get_num_threads()
        self.threads = (self.full, max(1, self.full // 2))
        self.chosen, self.start, self.best = self.full, 0.0, float("inf")
        self.trial_at, self.last_trial = int(first), 0
        self.recent: collections.deque = collections.deque(maxlen=RECENT)
        self.times: dict[int, list[float]] = {}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.log_device)
        engine.add_event_handler(Events.COMPLETED, self.log_time)
        if not self.on_cpu:
            return
        if self.setting:
            torch.set_num_threads(self.setting)
            logger.info(f"CPU threads: {self.setting} (--cpu_threads; 0 adapts to the load)")
            return
        if self.full > 1:
            engine.add_event_handler(Events.ITERATION_STARTED, self.started)
            engine.add_event_handler(Events.ITERATION_COMPLETED, self.completed)

    def log_device(self, engine: Engine) -> None:
        self.t0 = time.perf_counter()
        if torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
            logger.info(f"rank {rank} of {world} ({torch.distributed.get_backend()})")
        if self.device.type == "cuda":
            p = torch.cuda.get_device_properties(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            about = f"{p.name}, CUDA {torch.version.cuda}, {p.total_memory / 2**30:.1f} GiB"
        else:
            about = f"({torch.get_num_threads()} threads)"
        logger.info(f"device: {self.device} {about}, torch {torch.__version__}")

    def log_time(self, engine: Engine) -> None:
        peak = torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else None
        memory = f", peak GPU memory {peak:.2f} GiB" if peak is not None else ""
        logger.info(f"run finished in {time.perf_counter() - self.t0:.1f} s{memory}")

    def phase(self, iteration: int) -> int | None:
        """The thread count ``iteration`` is timed at in a trial, or None outside one."""
        at = iteration - self.trial_at
        return self.threads[at // self.trial] if 0 <= at < 2 * self.trial else None

    def started(self, engine: Engine) -> None:
        torch.set_num_threads(self.phase(engine.state.iteration) or self.chosen)
        self.start = time.perf_counter()

    def completed(self, engine: Engine) -> None:
        iteration, seconds = engine.state.iteration, time.perf_counter() - self.start
        count = self.phase(iteration)
        if count is not None:
            self.times.setdefault(count, []).append(seconds)
            if count == self.threads[1] and len(self.times[count]) == self.trial:
                self.decide(iteration)
            return
        self.recent.append(seconds)
        if len(self.recent) < RECENT or iteration < self.trial_at:
            return
        typical = statistics.median(self.recent)
        if self.chosen == self.full:
            self.best = min(self.best, typical)
            if typical > SLOWER * self.best:  # slowed down: a neighbour may have started
                self.trial_at = iteration + 1
        elif iteration - self.last_trial >= self.period:  # at half: has the neighbour stopped?
            self.trial_at = iteration + 1

    def decide(self, iteration: int) -> None:
        chosen, ratio = choose(self.times[self.threads[0]], self.times[self.threads[1]], self.threads)
        if chosen != self.chosen:
            why = "another process is busy on the cores" if chosen < self.full else "the cores are free again"
            logger.info(
                f"CPU threads: {chosen} of {self.full} (steps ran {ratio:.2f}x as fast with {self.threads[1]} as "
                f"with {self.full}: {why}; --cpu_threads N fixes it)"
            )
        if chosen == self.full:
            self.best = statistics.median(self.times[self.full])
        self.chosen, self.times, self.last_trial = chosen, {}, iteration
        self.recent.clear()
        torch.set_num_threads(chosen)
