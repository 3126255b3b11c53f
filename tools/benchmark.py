"""Measure the bundle's training and inference against its bare network on this machine.

    python -m tools.benchmark --dataset_dir /path/holding/MedNIST [--num_images 2048] [--repeats 3]
                                [--per_sample false] [--choices false] [--load 0] [--out outputs/benchmark.json]
                                [--network resnet18.json] [--train_json_key value]
    python -m tools.benchmark --decisions 20 [--load 1] [--probe_only false] [--out outputs/decisions.json]

Developer tooling, run from the repository root (not part of the bundle's release). Each round runs in a fresh
process and interleaves each bundle iteration with one bare step, so that the machine's drift touches both
sides of each ratio alike:

- the bundle's training: one epoch of train.json's trainer over ``num_images`` training images (cached,
  augmented, with its handlers), and after each of its iterations one bare training step: train.json's
  network, loss, optimizer and inferer (the precision ``--cpu_bf16 auto`` chose, and why) on one fixed random
  batch, no data and no engine. Also timed: the whole run with its validation and saving;
- the bundle's inference on the ``num_images`` training image files, read from disk (decode, preprocess,
  predict, calibrate, write predictions.csv) at the training batch size, with the model just trained, and after
  each of its batches one bare forward pass (inference.json's network, eval mode, no gradient) of that size.

Each ratio is the bundle's time per batch against the bare step's, over the same iterations (training from its
second, inference from its third, both without the last, which may be partial).

With ``--choices true``, each round also times the bare step (384 images after a warm-up) for each precision and
memory format at the default batch, batches 32 and 128 and half the threads at the default precision: how far
the default is from the best choice here.
With ``--per_sample true``, each round also times configs/per_sample.json, the original project's pipeline
(MONAI's per-sample transforms on each decoded JPEG, batch 4 x 2, fp32), over the same images. The table gives
each figure's median over the rounds. Extra ``--key value`` pairs override train.json (not per_sample.json).

With ``--load N``, N competing CPU-bound processes (a Python loop each) run beside every round, started and
stopped by the benchmark: a busy machine, repeatable. Thread settings come from the environment
(``OMP_NUM_THREADS``, ``OMP_WAIT_POLICY``), which each round's process inherits.
With ``--decisions N``, N fresh processes each make ``--cpu_bf16 auto``'s decision (with ``--probe_only true``,
the probe's alone, as on a processor whose flags cannot be read) and the table counts their picks and times.
"""

from __future__ import annotations

import atexit
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import fire

from scripts.data import ImageData, images_by_class
from scripts.errors import BundleError
from scripts.files import remove_stale
from tools.bundle import BUNDLE_ROOT as BUNDLE
from tools.bundle import workflow

TARGETS = {"training_of_bare": 0.95, "inference_of_bare": 0.80}
BENCHMARK, DECISIONS = "outputs/benchmark.json", "outputs/decisions.json"
CHOICE_IMAGES = 384  # images timed for each choice, after two warm-up steps


def cpu_name() -> str:
    """The processor's model name (Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _parser(names: list[str], work: str, dataset_dir: str, num_images: int, overrides: dict):
    """The parser of the bundle's training workflow (initialized, checked) on a subset of ``num_images``; an
    override ``network`` is a JSON holding another network_def."""
    stride = f"max(1, len(@split['training']) // {num_images})"
    overrides = dict(overrides)
    network = [os.path.abspath(overrides.pop("network"))] if overrides.get("network") else []
    flow = workflow(
        *(name.removesuffix(".json") for name in names),
        *network,
        run_id="training",
        dataset_dir=dataset_dir,
        output_dir=os.path.join(work, "out"),
        ckpt_dir=os.path.join(work, "models"),
        epochs=1,
        bench_train=f"$@split['training'][::{stride}][:{num_images}]",
        bench_val=f"$@split['validation'][::{stride}][:{max(1, num_images // 4)}]",
        **overrides,
    )
    flow.parser.get_parsed_content("check")  # the checks of the bundle's run
    return flow.parser


def training_step(parser):
    """One step of the bundle's network, loss, optimizer and inferer on one fixed random batch, warmed up."""
    import torch

    network, optimizer, loss = (parser.get_parsed_content(k) for k in ("network", "optimizer", "loss"))
    inferer, batch = parser.get_parsed_content("train#inferer"), parser.get_parsed_content("batch_size")
    channels, size = parser.get_parsed_content("in_channels"), parser.get_parsed_content("image_size")
    images = torch.rand(batch, channels, *size)
    labels = torch.randint(0, len(parser.get_parsed_content("classes")), (batch,))

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss(inferer(images, network), labels).backward()
        optimizer.step()

    for _ in range(2):  # warm-up: oneDNN picks and caches its kernels in the first steps
        step()
    return step


def forward_step(network, batch: int, size, channels: int = 1):
    """One forward pass of ``network`` in eval mode without gradients on one fixed random batch, warmed up."""
    import torch

    images = torch.rand(batch, channels, *size)

    def step():
        with torch.no_grad():
            network(images)

    step()
    return step


def steps_rate(step, steps: int, batch: int) -> float:
    """Images/s of ``steps`` calls of ``step``."""
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - start)


def bare_training(parser, steps: int) -> float:
    """Images/s of the bundle's training step on one fixed random batch."""
    return steps_rate(training_step(parser), steps, parser.get_parsed_content("batch_size"))


def bare_forward(network, batch: int, size, steps: int) -> float:
    """Images/s of ``network``'s forward pass in eval mode without gradients, one fixed random batch."""
    return steps_rate(forward_step(network, batch, size), steps, batch)


def timed(engine) -> list:
    """The times of ``engine``'s completed iterations, as it runs."""
    from ignite.engine import Events

    times: list[float] = []
    engine.add_event_handler(Events.ITERATION_COMPLETED, lambda _: times.append(time.perf_counter()))
    return times


def rate(times: list, skip: int, batch: int) -> float:
    """Images/s between the completions of iteration ``skip`` + 1 and the last (fewer skipped for short runs)."""
    times = times[min(skip, len(times) - 2) :]
    return (len(times) - 1) * batch / (times[-1] - times[0])


def _interleaved(engine, bare_step) -> list:
    """Runs ``bare_step`` after each of ``engine``'s iterations; returns, as it runs, pairs of (the engine's own
    time for an iteration, counted from the end of the previous bare step, the bare step's time after it)."""
    from ignite.engine import Events

    pairs: list[tuple[float, float]] = []
    ended: list[float] = []  # when the last bare step ended

    def after_iteration(_):
        now = time.perf_counter()
        bare_step()
        end = time.perf_counter()
        if ended:
            pairs.append((now - ended[-1], end - now))
        ended[:] = [end]

    engine.add_event_handler(Events.ITERATION_COMPLETED, after_iteration)
    return pairs


def _pair_rates(pairs: list, skip: int, batch: int) -> tuple[float, float]:
    """Images/s of the engine and of the bare step over the same iterations: from the ``skip``-th pair (fewer for
    short runs), without the last pair (a partial batch) where there are others."""
    pairs = pairs[: max(1, len(pairs) - 1)]
    pairs = pairs[min(skip, len(pairs) - 1) :]
    own, bare = (sum(p[i] for p in pairs) for i in (0, 1))
    return len(pairs) * batch / own, len(pairs) * batch / bare


def _measure(dataset_dir: str, num_images: int, overrides: dict) -> dict:
    """One round of the bundle and its bare network, in this process."""
    import torch

    from scripts.precision import bf16_speedup

    work = _scratch()
    subset = {"train#dataset#data": "@bench_train", "validate#dataset#data": "@bench_val"}
    parser = _parser(["train.json"], work, dataset_dir, num_images, {**overrides, **subset})
    batch = parser.get_parsed_content("batch_size")
    result = {"bf16_speedup": round(bf16_speedup(), 2), "batch": batch, "threads": torch.get_num_threads()}
    precision = parser.get_parsed_content("train#inferer").precision
    result["precision"] = "bf16" if precision.decide() else "fp32"
    result["precision_evidence"] = precision.evidence
    bare_step = training_step(_parser(["train.json"], work, dataset_dir, num_images, overrides))
    root = parser.get_parsed_content("data").root
    parser.get_parsed_content("data").prepare()
    start = time.perf_counter()
    train_images = len(parser.get_parsed_content("train#dataset"))
    result["cache_build_s"] = round(time.perf_counter() - start, 1)
    pairs = _interleaved(parser.get_parsed_content("train#trainer"), bare_step)
    start = time.perf_counter()
    parser.get_parsed_content("training")  # the bundle's run: one epoch, its validation, saving, calibration
    result["training_run_s"] = round(time.perf_counter() - start, 1)
    rates = _pair_rates(pairs, 0, batch)
    result["training_img_per_s"], result["bare_training_img_per_s"] = (round(r, 1) for r in rates)

    with open(os.path.join(work, "out", "split.json")) as f:  # image files, read from disk by inference
        training = json.load(f)["training"]
    files = [os.path.join(root, d["image"]) for d in training[:: max(1, len(training) // num_images)]]
    inference = workflow("inference", run_id="inference", input=files[:num_images], batch_size=batch,
                         output_dir=os.path.join(work, "inference"), ckpt_dir=os.path.join(work, "models")).parser  # fmt: skip
    inference.get_parsed_content("model").load()
    network, size = inference.get_parsed_content("network_def"), inference.get_parsed_content("image_size")
    pairs = _interleaved(inference.get_parsed_content("evaluator"), forward_step(network, batch, size))
    inference.get_parsed_content("inference")
    result["inference_images"] = len(files[:num_images])
    rates = _pair_rates(pairs, 1, batch)
    result["inference_img_per_s"], result["bare_forward_img_per_s"] = (round(r, 1) for r in rates)
    result["training_of_bare"] = round(result["training_img_per_s"] / result["bare_training_img_per_s"], 3)
    result["inference_of_bare"] = round(result["inference_img_per_s"] / result["bare_forward_img_per_s"], 3)
    result["train_images"] = train_images
    return {**result, "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}


def _measure_choices(dataset_dir: str, num_images: int, overrides: dict) -> dict:
    """The bare training step for each choice a CPU default stands for: precision and memory format at the
    default batch, other batches and half the threads at the default precision."""
    import torch

    work, rates = _scratch(), {}
    bare_training(_parser(["train.json"], work, dataset_dir, num_images, overrides), 2)  # the process warms up
    for bf16 in ("false", "true"):
        for channels_last in ("true", "false"):
            choice = {**overrides, "cpu_bf16": bf16, "channels_last": channels_last}
            parser = _parser(["train.json"], work, dataset_dir, num_images, choice)
            name = f"{'bf16' if bf16 == 'true' else 'fp32'}, {'channels-last' if channels_last == 'true' else 'NCHW'}"
            rates[name] = round(bare_training(parser, CHOICE_IMAGES // parser.get_parsed_content("batch_size")), 1)
    for batch in (32, 128):
        parser = _parser(["train.json"], work, dataset_dir, num_images, {**overrides, "batch_size": batch})
        rates[f"default precision, batch {batch}"] = round(bare_training(parser, CHOICE_IMAGES // batch), 1)
    threads = torch.get_num_threads()
    if threads > 1:  # torch's default, every core, against half of them
        parser = _parser(["train.json"], work, dataset_dir, num_images, overrides)
        torch.set_num_threads(threads // 2)
        steps = CHOICE_IMAGES // parser.get_parsed_content("batch_size")
        rates[f"default precision, {threads // 2} of {threads} threads"] = round(bare_training(parser, steps), 1)
        torch.set_num_threads(threads)
    return {"choices": rates}


def _measure_per_sample(dataset_dir: str, num_images: int) -> dict:
    """One epoch of configs/per_sample.json over the same training images."""
    work = _scratch()
    subset = {"train#dataset#data": "@bench_train", "validate#dataset#data": "@bench_val"}
    parser = _parser(["train.json", "per_sample.json"], work, dataset_dir, num_images, subset)
    times = timed(parser.get_parsed_content("train#trainer"))
    parser.get_parsed_content("training")
    batch = parser.get_parsed_content("batch_size")
    return {"per_sample_training_img_per_s": round(rate(times, 0, batch), 1)}


def _measure_decision(dataset_dir: str, num_images: int, overrides: dict) -> dict:
    """One ``--cpu_bf16 auto`` decision in this fresh process, timed; the probe's alone with ``probe_only``."""
    import torch

    from scripts.precision import Processor, decide, timed_ratios

    processor = Processor.here()
    if str(overrides.get("probe_only")).lower() in ("true", "1"):
        processor = Processor(None, processor.capability, processor.onednn_isa)
    start = time.perf_counter()
    bf16, evidence = decide(processor, timed_ratios)
    seconds = time.perf_counter() - start
    return {"bf16": bf16, "evidence": evidence, "seconds": round(seconds, 3), "threads": torch.get_num_threads()}


def competitors(count: int) -> list:
    """``count`` CPU-bound processes, stopped when this one exits (also by a plain kill)."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(int(count))]
    atexit.register(lambda: [p.kill() for p in procs])
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    return procs


def count_decisions(count: int, probe_only: bool, load: int, out: str) -> None:
    """``count`` fresh processes' ``--cpu_bf16 auto`` decisions: the picks, their evidence and times."""
    import torch

    competitors(load)
    runs = [_run_one("decision", "", 0, {"probe_only": probe_only}) for _ in range(int(count))]
    for i, run in enumerate(runs):
        print(f"{i + 1}: {'bf16' if run['bf16'] else 'fp32'} in {run['seconds']:.2f} s ({run['evidence']})")
    picks = sum(run["bf16"] for run in runs)
    seconds = sorted(run["seconds"] for run in runs)
    print(
        f"{torch.backends.cpu.get_cpu_capability()} ({cpu_name()}), {load} competing process(es)"
        f"{', probe only' if probe_only else ''}: bf16 in {picks} of {count}, fp32 in {count - picks}; decision "
        f"{statistics.median(seconds):.2f} s (median), {seconds[-1]:.2f} s (longest)"
    )
    _save(out, {"load": load, "probe_only": probe_only, "bf16_picks": picks, "runs": runs})


def _save(out: str, report: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=2)


def _scratch() -> str:
    """A scratch folder removed at exit, also by a plain kill; a killed benchmark's folders are removed first."""
    os.chdir(BUNDLE)
    sys.path.insert(0, BUNDLE)
    remove_stale(tempfile.gettempdir(), "bench-")
    work = tempfile.mkdtemp(prefix=f"bench-{os.getpid()}-")
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    return work


def _run_one(kind: str, dataset_dir: str, num_images: int, overrides: dict) -> dict:
    cmd = [sys.executable, "-m", "tools.benchmark", "--dataset_dir", dataset_dir, "--num_images", str(num_images)]
    # repr: fire reads each value back with ast.literal_eval, so strings, numbers, bools and lists survive as typed
    cmd += ["--_one", kind, *[x for k, v in overrides.items() for x in (f"--{k}", repr(v))]]
    proc = subprocess.run(cmd, cwd=BUNDLE, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.exit(f"ERROR: the {kind} benchmark failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def _median(values: list):
    """The median of the rounds' values: one of them for counts, rounded for rates and ratios."""
    if all(isinstance(v, int) for v in values):
        return statistics.median_low(values)
    return round(statistics.median(values), 3)


def benchmark(
    dataset_dir: str = "",
    num_images: int = 2048,
    repeats: int = 3,
    per_sample: bool = False,
    choices: bool = False,
    load: int = 0,
    decisions: int = 0,
    probe_only: bool = False,
    out: str = "",
    _one: str = "",
    **overrides,
) -> None:
    """Run ``repeats`` rounds, print each round and the medians against the targets, save them as JSON."""
    if _one:
        measure = {"bundle": _measure, "choices": _measure_choices, "decision": _measure_decision}.get(
            _one, lambda d, n, o: _measure_per_sample(d, n)
        )
        settings = {**overrides, "probe_only": probe_only} if _one == "decision" else overrides
        print("RESULT " + json.dumps(measure(dataset_dir, num_images, settings)), flush=True)
        return
    import torch

    for name, value, least in (("repeats", repeats, 1), ("load", load, 0), ("decisions", decisions, 0)):
        if not isinstance(value, int) or value < least:
            sys.exit(f"ERROR: --{name} must be a whole number of at least {least}, got {value!r}.")
    if decisions:
        return count_decisions(decisions, str(probe_only).lower() in ("true", "1"), load, out or DECISIONS)
    if not dataset_dir:
        sys.exit("ERROR: --dataset_dir is missing. Fix: point it at the folder holding MedNIST (or its images).")
    config = workflow("train").parser
    unknown = [key for key in overrides if key not in config and key != "network"]
    if unknown:  # checked once here, before any round starts a process
        sys.exit(f"ERROR: no key {', '.join(unknown)} in configs/train.json. Fix: override keys that train.json has.")
    try:
        data = ImageData(dataset_dir, "", download=False)
        if data.kind == "download":
            raise BundleError(f"--dataset_dir {dataset_dir} holds no images.", "point it at the data to train on.")
        images_by_class(data.root, data.classes, "dataset_dir")
    except BundleError as e:
        sys.exit(str(e))
    asked = {"per_sample": per_sample, "choices": choices}
    kinds = ["bundle"] + [kind for kind, on in asked.items() if str(on).lower() in ("true", "1")]
    competitors(load)
    runs = []
    for round_ in range(int(repeats)):
        row = {}
        for kind in kinds:
            row.update(_run_one(kind, dataset_dir, num_images, overrides))
        runs.append(row)
        print(
            f"round {round_ + 1}/{repeats}: training {row['training_img_per_s']} img/s of bare "
            f"{row['bare_training_img_per_s']} ({row['training_of_bare']:.0%}); inference "
            f"{row['inference_img_per_s']} img/s of bare forward {row['bare_forward_img_per_s']} "
            f"({row['inference_of_bare']:.0%})",
            flush=True,
        )
    median = {k: (_median([r[k] for r in runs]) if isinstance(v, (int, float)) else v) for k, v in runs[0].items()}
    if "choices" in median:
        median["choices"] = {k: _median([r["choices"][k] for r in runs]) for k in runs[0]["choices"]}
    machine = {
        "cpu": cpu_name(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "competing_processes": load,
    }
    print(
        f"machine: {machine['cpu']}, {machine['capability']}, {machine['cores']} cores, torch {machine['torch']}, "
        f"{load} competing process(es)"
    )
    print(
        f"precision: {median['precision']} ({median['precision_evidence']}), batch {median['batch']}, "
        f"{median['threads']} threads; the bf16 probe's steps ran {median['bf16_speedup']}x as fast as fp32; "
        f"medians of {repeats} round(s)" + (f"; overrides {overrides}" if overrides else "")
    )
    print("| metric | median |\n|---|---|")
    for key, value in median.items():
        if key != "choices":
            print(f"| {key} | {value} |")
    for key, target in TARGETS.items():
        verdict = "met" if median[key] >= target else "NOT met"
        print(f"{key}: {median[key]:.0%} (target >= {target:.0%}: {verdict})")
    if "choices" in median:
        best = max(median["choices"].values())
        print("bare training step for each choice (images/s, median):")
        default = f"{median['precision']}, channels-last"
        for choice, speed in median["choices"].items():
            print(f"  {choice}: {speed} ({speed / best:.0%} of the best){' (default)' if choice == default else ''}")
    if "per_sample_training_img_per_s" in median:
        speedup = median["training_img_per_s"] / median["per_sample_training_img_per_s"]
        print(f"training speed-up over the per-sample pipeline: {speedup:.1f}x")
    report = {"machine": machine, "repeats": repeats, "overrides": overrides, "median": median, "runs": runs}
    _save(out or BENCHMARK, report)


if __name__ == "__main__":
    fire.Fire(benchmark)
