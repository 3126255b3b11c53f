"""Measure the bundle's training pipeline against the common per-sample pipeline, on this machine.

    python -m tools.benchmark --dataset_dir /path/holding/MedNIST [--num_images 2048] [--repeats 3]
                                [--out outputs/benchmark.json] [--any_train_json_key value ...]

Developer tooling, run from the repository root (not part of the bundle's release). Each pipeline runs in its
own process (so peak memory is its own) from configs/train.json, for one epoch over
the same ``num_images`` training images and one pass over ``num_images // 4`` validation images; the rounds
alternate the pipelines and the table gives each figure's median:

- ``bundle``: the defaults: deterministic preprocessing cached in memory (CacheDataset), augmentation on whole
  batches on the device, plain-tensor batches, channels_last, CPU bf16 autocast (CUDA: fp16 AMP), batch 64,
  fused Adam, gradients set to None rather than zeroed.
- ``per_sample``: the original project's pipeline, configs/original.json: MONAI ``Dataset`` decoding each JPEG
  from disk with per-sample transforms (RandRotated/RandFlipd/RandZoomd), MONAI's default ``prepare_batch``
  (MetaTensor batches into the network), batch 4 with 2 accumulation steps, fp32, PyTorch's default Adam and
  zero_grad.
- ``model_only``: the bundle's network, loss, optimizer and autocast stepping on one fixed random batch, no data
  and no engine: the ceiling the bundle's pipeline can reach on this machine.

Training images/s cover a whole epoch, data loading included; the cache build is reported separately. Extra
``--key value`` pairs override train.json for ``bundle`` and ``model_only`` (not for ``per_sample``, which stays
the original project's), so a lever can be measured against the same baseline: e.g. ``--batch_size 128``.
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

from scripts.utils import BUNDLE_ROOT as BUNDLE
from scripts.utils import remove_stale

PIPELINES = {"bundle": [], "per_sample": ["original.json"], "model_only": []}  # override files of train.json
SUBSET = {"cache#data#training": "@bench_train", "cache#data#validation": "@bench_val"}
PER_SAMPLE_SUBSET = {"train#dataset#data": "@bench_train", "validate#dataset#data": "@bench_val"}


def _model_only(parser, device, num_images: int) -> dict:
    """The bundle's network, loss, optimizer and autocast alone, on one fixed random batch: its speed ceiling."""
    import torch

    network, optimizer, loss = (parser.get_parsed_content(k) for k in ("network", "optimizer", "loss"))
    inferer = parser.get_parsed_content("train#inferer")
    batch, val_batch = parser.get_parsed_content("batch_size"), parser.get_parsed_content("val_batch_size")
    images = torch.rand(batch, 1, *parser.get_parsed_content("image_size"), device=device)
    labels = torch.randint(0, parser.get_parsed_content("num_classes"), (batch,), device=device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def timed(step, steps: int) -> float:
        step()  # warm-up
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        return time.perf_counter() - start

    amp = bool(parser.get_parsed_content("use_amp"))  # CUDA fp16 with a GradScaler, as the trainer's amp flag
    scaler = torch.amp.GradScaler("cuda", enabled=amp)

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            value = loss(inferer(images, network), labels)
        scaler.scale(value).backward()
        scaler.step(optimizer)
        scaler.update()

    train_steps, val_steps = max(1, num_images // batch), max(1, num_images // 4 // val_batch)
    train_s = timed(train_step, train_steps)
    network.eval()
    with torch.no_grad():
        val_images = torch.rand(val_batch, 1, *parser.get_parsed_content("image_size"), device=device)
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            eval_s = timed(lambda: inferer(val_images, network), val_steps)
    return {
        "train_images": train_steps * batch,
        "val_images": val_steps * val_batch,
        "cache_build_s": 0.0,
        "epoch_s": round(train_s, 1),
        "train_img_per_s": round(train_steps * batch / train_s, 1),
        "eval_img_per_s": round(val_steps * val_batch / eval_s, 1),
    }


def _measure(pipeline: str, dataset_dir: str, num_images: int, overrides: dict) -> dict:
    import torch
    from monai.bundle import ConfigParser

    os.chdir(BUNDLE)
    sys.path.insert(0, BUNDLE)
    remove_stale(tempfile.gettempdir(), "bench-")  # what a killed benchmark left
    work = tempfile.mkdtemp(prefix=f"bench-{os.getpid()}-")
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a plain kill still runs the clean-up
    parser = ConfigParser()
    parser.read_config([os.path.join(BUNDLE, "configs", name) for name in ["train.json", *PIPELINES[pipeline]]])
    stride = f"max(1, len(@datalist['training']) // {num_images})"
    parser.update(
        {
            "dataset_dir": dataset_dir,
            "output_dir": os.path.join(work, "out"),
            "ckpt_dir": os.path.join(work, "models"),
            "epochs": 1,
            "bench_train": f"$@datalist['training'][::{stride}][:{num_images}]",
            "bench_val": f"$@datalist['validation'][::{stride}][:{num_images // 4}]",
            **(PER_SAMPLE_SUBSET if pipeline == "per_sample" else {**SUBSET, **overrides}),
        }
    )
    parser.get_parsed_content("initialize")  # seeding, as the bundle's run does
    parser.get_parsed_content("args")  # the checks of the bundle's run
    device = torch.device(parser.get_parsed_content("device"))
    result = {
        "pipeline": pipeline,
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "batch": f"{parser.get_parsed_content('batch_size')} x {parser.get_parsed_content('accumulation_steps')}",
    }
    if pipeline == "model_only":
        return {**result, **_model_only(parser, device, num_images), **_peak_memory(device)}
    parser.get_parsed_content("datalist")
    start = time.perf_counter()
    train_ds, val_ds = parser.get_parsed_content("train#dataset"), parser.get_parsed_content("validate#dataset")
    cache_s = time.perf_counter() - start
    evaluator = parser.get_parsed_content("validate#evaluator")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    evaluator.run()  # warm-up, and evaluation speed
    start = time.perf_counter()
    evaluator.run()
    eval_s = time.perf_counter() - start
    start = time.perf_counter()
    parser.get_parsed_content("training")  # the bundle's run: one epoch, including one validation pass
    epoch_s = time.perf_counter() - start - eval_s
    result.update(
        train_images=len(train_ds),
        val_images=len(val_ds),
        cache_build_s=round(cache_s, 1),
        epoch_s=round(epoch_s, 1),
        train_img_per_s=round(len(train_ds) / epoch_s, 1),
        eval_img_per_s=round(len(val_ds) / eval_s, 1),
    )
    return {**result, **_peak_memory(device)}


def _peak_memory(device) -> dict:
    import torch

    peak = {"peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}
    if device.type == "cuda":
        peak["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return peak


def _run_one(pipeline: str, dataset_dir: str, num_images: int, overrides: dict) -> dict:
    cmd = [sys.executable, "-m", "tools.benchmark", "--dataset_dir", dataset_dir, "--num_images", str(num_images)]
    # repr: fire reads each value back with ast.literal_eval, so strings, numbers, bools and lists survive as typed
    cmd += ["--_one", pipeline, *[x for k, v in overrides.items() for x in (f"--{k}", repr(v))]]
    proc = subprocess.run(cmd, cwd=BUNDLE, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.exit(f"ERROR: the {pipeline} benchmark failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def _median(runs: list[dict]) -> dict:
    """One row per pipeline: the median of each numeric figure over the runs, the other fields as measured."""
    row = dict(runs[0])
    for key, value in row.items():
        if isinstance(value, (int, float)):
            row[key] = round(statistics.median(r[key] for r in runs), 2)
    return row


def benchmark(
    dataset_dir: str,
    num_images: int = 2048,
    repeats: int = 3,
    out: str = "outputs/benchmark.json",
    _one: str = "",
    **overrides,
) -> None:
    """Run both pipelines ``repeats`` times, alternating, print the medians and the speed-up, save them as JSON.

    Alternating the pipelines and taking medians keeps a noisy machine (a shared VM's neighbours, CPU boost)
    from favouring either side; each round's own ratio is printed too, so the spread is visible.
    """
    if _one:
        print("RESULT " + json.dumps(_measure(_one, dataset_dir, num_images, overrides)), flush=True)
        return
    import torch
    from monai.bundle import ConfigParser

    if int(repeats) < 1:
        sys.exit(f"ERROR: --repeats must be at least 1, got {repeats!r}.")
    config = ConfigParser()
    config.read_config(os.path.join(BUNDLE, "configs", "train.json"))
    unknown = [key for key in overrides if key not in config]
    if unknown:  # checked once here, before any round starts a process
        sys.exit(f"ERROR: no key {', '.join(unknown)} in configs/train.json. Fix: override keys that train.json has.")
    runs: dict[str, list[dict]] = {pipeline: [] for pipeline in PIPELINES}
    for round_ in range(int(repeats)):
        for pipeline in PIPELINES:
            runs[pipeline].append(_run_one(pipeline, dataset_dir, num_images, overrides))
        print(
            f"round {round_ + 1}/{repeats}: training img/s "
            + ", ".join(f"{p} {runs[p][-1]['train_img_per_s']}" for p in PIPELINES)
            + f" -> {runs['bundle'][-1]['train_img_per_s'] / runs['per_sample'][-1]['train_img_per_s']:.2f}x",
            flush=True,
        )
    results = [_median(runs[pipeline]) for pipeline in PIPELINES]
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    keys = [k for k in results[0] if k != "pipeline"]
    print(
        f"machine: {machine}; medians of {repeats} run(s) per pipeline"
        + (f"; overrides {overrides}" if overrides else "")
    )
    print("| metric | " + " | ".join(r["pipeline"] for r in results) + " |")
    print("|---|" + "---|" * len(results))
    for k in keys:
        print(f"| {k} | " + " | ".join(str(r.get(k, "")) for r in results) + " |")
    ratio = results[0]["train_img_per_s"] / results[1]["train_img_per_s"]
    eval_ratio = results[0]["eval_img_per_s"] / results[1]["eval_img_per_s"]
    print(f"training speed-up (bundle / per_sample): {ratio:.1f}x; evaluation: {eval_ratio:.1f}x")
    ceiling = results[0]["train_img_per_s"] / results[2]["train_img_per_s"]
    print(f"the bundle's training runs at {ceiling:.0%} of its network's own speed (model_only)")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    speed = {"train_speedup": round(ratio, 2), "eval_speedup": round(eval_ratio, 2), "of_model_only": round(ceiling, 2)}
    with open(out, "w") as f:
        json.dump(
            {"machine": machine, "repeats": repeats, "overrides": overrides, "results": results, "runs": runs, **speed},
            f,
            indent=2,
        )


if __name__ == "__main__":
    fire.Fire(benchmark)
