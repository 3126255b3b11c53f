"""CPU speed levers weighed against the bundle's choices, on this machine, with a trained model:

    python -m tools.levers --images /path/to/MedNIST --ckpt_dir models [--num_images 2048]

- ONNX Runtime against torch for the forward pass of the model's ONNX export (batch 64, eval mode);
- ``torch.compile`` of the training step (the bundle's network, loss, optimizer and inferer): the time of its
  first two steps (compiling) and its steady speed against eager;
- inference's image decoding in one DataLoader worker process against the main thread (``num_workers`` 1 or 0):
  the bundle's inference speed on ``num_images`` files from its third batch, the mean of two runs each.

Developer tooling, run from the repository root; prints one JSON line. Each figure is one measurement.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
import time

import fire
import torch

from tools.benchmark import bare_forward, rate, steps_rate, timed
from tools.bundle import workflow


def _warm_rate(step, batch: int, steps: int) -> float:
    """Images/s of a training ``step`` after one warm-up call."""
    step()
    return round(steps_rate(step, steps, batch), 1)


def _inference_rate(files: list, ckpt_dir: str, work: str, num_workers: int) -> float:
    """The bundle's inference speed on ``files`` from its third batch, as ``tools.benchmark`` times it."""
    output = {"output_dir": f"{work}/nw{num_workers}", "dataloader#num_workers": num_workers}
    parser = workflow("inference", run_id="inference", input=files, ckpt_dir=ckpt_dir, **output).parser
    times = timed(parser.get_parsed_content("evaluator"))
    parser.get_parsed_content("inference")
    parser.get_parsed_content("finalize")
    return round(rate(times, 2, parser["batch_size"]), 1)


def levers(images: str, ckpt_dir: str = "models", num_images: int = 2048) -> None:
    """Measure each lever once and print the figures as one JSON line."""
    from scripts.export import export
    from scripts.model_file import load_model

    ckpt_dir = os.path.abspath(ckpt_dir)
    work = tempfile.mkdtemp(prefix="levers-")
    out = {"capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads()}
    try:
        files = sorted(glob.glob(os.path.join(images, "*", "*.jpeg")))
        files = files[:: max(1, len(files) // num_images)][:num_images]
        rates = {0: [], 1: []}  # alternated, before torch.compile starts its compile workers
        for workers in (0, 1, 0, 1):
            rates[workers].append(_inference_rate(files, ckpt_dir, work, workers))
        for workers, measured in rates.items():
            out[f"inference_num_workers_{workers}_img_per_s"] = round(sum(measured) / len(measured), 1)
        x = torch.rand(64, 1, 64, 64)
        network = load_model(os.path.join(ckpt_dir, "model.pt")).to(memory_format=torch.channels_last)
        out["torch_forward_img_per_s"] = round(bare_forward(network, 64, (64, 64), 10), 1)
        onnx = load_model(export("onnx", os.path.join(ckpt_dir, "model.pt"), os.path.join(work, "model.onnx")))
        out["onnxruntime_forward_img_per_s"] = round(bare_forward(onnx, 64, (64, 64), 10), 1)

        train = workflow("train").parser
        model, optimizer = train.get_parsed_content("network"), train.get_parsed_content("optimizer")
        loss, inferer = train.get_parsed_content("loss"), train.get_parsed_content("train#inferer")
        labels = torch.randint(0, 6, (64,))

        def step(net):
            optimizer.zero_grad(set_to_none=True)
            loss(inferer(x, net), labels).backward()
            optimizer.step()

        out["eager_train_img_per_s"] = _warm_rate(lambda: step(model), 64, 6)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(work, "inductor")  # a cold compile, as a user's first
        try:
            compiled = torch.compile(model)
            start = time.perf_counter()
            for _ in range(2):
                step(compiled)
            out["compile_first_two_steps_s"] = round(time.perf_counter() - start, 1)
            out["compiled_train_img_per_s"] = _warm_rate(lambda: step(compiled), 64, 6)
        except Exception as e:  # no C++ compiler, or inductor cannot handle the graph here
            out["compile_error"] = f"{type(e).__name__}: {e}"[:300]

    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(out))


if __name__ == "__main__":
    fire.Fire(levers)
