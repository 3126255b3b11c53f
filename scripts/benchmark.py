"""Measure the bundle's training pipeline against the common per-sample pipeline, on this machine.

    python -m scripts.benchmark --dataset_dir /path/holding/MedNIST [--num_images 2048] [--out outputs/benchmark.json]

Each pipeline runs in its own process (so peak memory is its own) from configs/train.json, for one epoch over
the same ``num_images`` training images and one pass over ``num_images // 4`` validation images:

- ``bundle``: the defaults: deterministic preprocessing cached in memory (CacheDataset), augmentation on whole
  batches on the device, plain-tensor batches, channels_last, CPU bf16 autocast (CUDA: fp16 AMP), batch 64.
- ``per_sample``: the original project's pipeline: MONAI ``Dataset`` decoding each JPEG from disk with
  per-sample transforms (RandRotated/RandFlipd/RandZoomd), batch 4 with 2 accumulation steps, fp32.

Training images/s cover a whole epoch, data loading included; the cache build is reported separately.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import fire

BUNDLE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIPELINES = {
    "bundle": {},
    "per_sample": {
        "batch_size": 4,
        "accumulation_steps": 2,
        "cpu_bf16": False,
        "amp": False,
        "channels_last": False,
        "batch_augment": False,
        "train#dataset": {"_target_": "Dataset", "data": "@bench_train", "transform": "@train#preprocessing"},
        "validate#dataset": {"_target_": "Dataset", "data": "@bench_val", "transform": "@validate#preprocessing"},
        "validate#dataloader#batch_size": 4,
    },
}


def _measure(pipeline: str, dataset_dir: str, num_images: int) -> dict:
    import torch
    from monai.bundle import ConfigParser

    os.chdir(BUNDLE)
    sys.path.insert(0, BUNDLE)
    work = tempfile.mkdtemp(prefix="bench-")
    parser = ConfigParser()
    parser.read_config(os.path.join(BUNDLE, "configs", "train.json"))
    stride = f"max(1, len(@datalist['training']) // {num_images})"
    parser.update(
        {
            "dataset_dir": dataset_dir,
            "output_dir": os.path.join(work, "out"),
            "ckpt_dir": os.path.join(work, "models"),
            "epochs": 1,
            "bench_train": f"$@datalist['training'][::{stride}][:{num_images}]",
            "bench_val": f"$@datalist['validation'][::{stride}][:{num_images // 4}]",
            "train#dataset#data": "@bench_train",
            "validate#dataset#data": "@bench_val",
            **PIPELINES[pipeline],
        }
    )
    parser.get_parsed_content("initialize")  # checks and seeding, as the bundle's run does
    parser.get_parsed_content("datalist")
    start = time.perf_counter()
    train_ds, val_ds = parser.get_parsed_content("train#dataset"), parser.get_parsed_content("validate#dataset")
    cache_s = time.perf_counter() - start
    trainer, evaluator = parser.get_parsed_content("train#trainer"), parser.get_parsed_content("validate#evaluator")
    device = torch.device(parser.get_parsed_content("device"))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    parser.get_parsed_content("early_stop").set_trainer(trainer)
    evaluator.run()  # warm-up, and evaluation speed
    start = time.perf_counter()
    evaluator.run()
    eval_s = time.perf_counter() - start
    start = time.perf_counter()
    parser.get_parsed_content("training")  # the bundle's run: one epoch, including one validation pass
    epoch_s = time.perf_counter() - start - eval_s
    result = {
        "pipeline": pipeline,
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "train_images": len(train_ds),
        "val_images": len(val_ds),
        "batch": f"{parser['batch_size']} x {parser['accumulation_steps']}",
        "cache_build_s": round(cache_s, 1),
        "epoch_s": round(epoch_s, 1),
        "train_img_per_s": round(len(train_ds) / epoch_s, 1),
        "eval_img_per_s": round(len(val_ds) / eval_s, 1),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }
    if device.type == "cuda":
        result["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return result


def benchmark(dataset_dir: str, num_images: int = 2048, out: str = "outputs/benchmark.json", _one: str = "") -> None:
    """Run both pipelines, print a table and the speed-up, and save the figures as JSON."""
    if _one:
        print("RESULT " + json.dumps(_measure(_one, dataset_dir, num_images)), flush=True)
        return
    import torch

    results = []
    for pipeline in PIPELINES:
        cmd = [sys.executable, "-m", "scripts.benchmark", "--dataset_dir", dataset_dir, "--num_images", str(num_images)]
        proc = subprocess.run([*cmd, "--_one", pipeline], cwd=BUNDLE, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not lines:
            sys.exit(f"ERROR: the {pipeline} benchmark failed:\n{proc.stderr[-3000:]}")
        results.append(json.loads(lines[-1][len("RESULT ") :]))
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    keys = [k for k in results[0] if k != "pipeline"]
    print(f"machine: {machine}")
    print("| metric | " + " | ".join(r["pipeline"] for r in results) + " |")
    print("|---|" + "---|" * len(results))
    for k in keys:
        print(f"| {k} | " + " | ".join(str(r.get(k, "")) for r in results) + " |")
    ratio = results[0]["train_img_per_s"] / results[1]["train_img_per_s"]
    eval_ratio = results[0]["eval_img_per_s"] / results[1]["eval_img_per_s"]
    print(f"training speed-up (bundle / per_sample): {ratio:.1f}x; evaluation: {eval_ratio:.1f}x")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(
            {"machine": machine, "results": results, "train_speedup": ratio, "eval_speedup": eval_ratio}, f, indent=2
        )


if __name__ == "__main__":
    fire.Fire(benchmark)
