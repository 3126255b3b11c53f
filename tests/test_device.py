"""The CPU thread governor (scripts/device.py): every core while it is the faster, half while a busy neighbour
makes every core slower, back when the neighbour stops; driven by an Ignite engine whose steps take the time a
thread count is given (a clock injected, no timing luck)."""

from __future__ import annotations

import logging

import pytest
import torch
from ignite.engine import Engine

import scripts.device
from scripts.device import MARGIN, Device, choose


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_half_the_threads_only_when_clearly_faster():
    assert choose([3.0, 3.1, 2.9], [1.0, 1.1, 0.9], (2, 1)) == (1, pytest.approx(3.0))
    assert choose([1.0, 1.0, 5.0], [0.9, 0.95, 0.9], (2, 1))[0] == 2  # 1.05x: within the margin, every core
    assert choose([1.0] * 3, [1.0 / MARGIN] * 3, (2, 1))[0] == 1


def run_governed(monkeypatch, costs_at, iterations: int, **kwargs) -> list[int]:
    """An engine of ``iterations`` steps under a Device, each step taking ``costs_at(iteration)[threads]``
    seconds of an injected clock: the thread count of each step."""
    clock, used = {"now": 0.0}, []
    monkeypatch.setattr(scripts.device.time, "perf_counter", lambda: clock["now"])

    def step(engine, batch):
        used.append(torch.get_num_threads())
        clock["now"] += costs_at(engine.state.iteration)[used[-1]]

    engine = Engine(step)
    Device("cpu", threads=0, **kwargs).attach(engine)
    engine.run(range(iterations), max_epochs=1)
    return used


BUSY, QUIET = {2: 3.0, 1: 1.2}, {2: 1.0, 1: 1.7}  # seconds a step takes at 2 and 1 threads


def test_the_governor_follows_a_neighbour_that_starts_and_stops(two_threads, monkeypatch, caplog):
    with caplog.at_level(logging.INFO, logger="scripts.device"):
        used = run_governed(monkeypatch, lambda i: BUSY if 11 <= i <= 30 else QUIET, 50, period=10, trial=2, first=2)
    # used[i - 1]: iteration i. The first trial (2-5) keeps every core; steps at 11-13 slow down: a trial at 14-17
    # changes to half; at half, a trial every 10 iterations: 28-31 (still busy), 42-45 (quiet again: every core)
    assert used[1:5] == [2, 2, 1, 1] and used[5:13] == [2] * 8
    assert used[13:17] == [2, 2, 1, 1] and used[17:27] == [1] * 10
    assert used[27:31] == [2, 2, 1, 1] and used[31:41] == [1] * 10
    assert used[41:45] == [2, 2, 1, 1] and used[45:] == [2] * 5
    changes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("CPU threads:")]
    assert len(changes) == 2 and "CPU threads: 1 of 2" in changes[0] and "another process is busy" in changes[0]
    assert "CPU threads: 2 of 2" in changes[1] and "free again" in changes[1]


def test_a_quiet_machine_runs_one_trial_in_all(two_threads, monkeypatch):
    jitter = [QUIET, {2: 1.3, 1: 1.7}, QUIET, {2: 1.2, 1: 1.7}]  # noise under the SLOWER margin
    used = run_governed(monkeypatch, lambda i: jitter[i % 4], 600)
    assert used.count(1) == 3 and used[6:9] == [1, 1, 1]  # half the threads only for the first trial's 3 steps


def test_a_fixed_count_and_other_devices(two_threads, caplog):
    engine = Engine(lambda e, b: None)
    with caplog.at_level(logging.INFO, logger="scripts.device"):
        Device("cpu", threads=1).attach(engine)
    assert torch.get_num_threads() == 1 and "CPU threads: 1 (--cpu_threads" in caplog.text
    torch.set_num_threads(2)
    governor = Device("cuda", threads=1)
    governor.attach(engine)  # not the CPU's business
    assert torch.get_num_threads() == 2 and not engine.has_event_handler(governor.started)
