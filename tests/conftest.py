"""Shared fixtures: a small synthetic MedNIST-like dataset and a helper that runs the real bundle CLI."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

BUNDLE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, BUNDLE)
from scripts.data import CLASSES  # noqa: E402

TRAIN = os.path.join(BUNDLE, "configs", "train.json")
EVALUATE = f"['{TRAIN}','{os.path.join(BUNDLE, 'configs', 'evaluate.json')}']"
INFERENCE = os.path.join(BUNDLE, "configs", "inference.json")


def class_image(label: int, rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """A 64x64 uint8 image whose pattern tells its class apart, with random jitter and noise."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    cx, cy = 0.5 + rng.uniform(-0.1, 0.1, 2)
    r = np.hypot(xx - cx, yy - cy)
    f = rng.uniform(3, 5)
    pattern = [
        r < 0.3,  # disc
        np.sin(2 * np.pi * f * yy) > 0,  # horizontal stripes
        np.sin(2 * np.pi * f * xx) > 0,  # vertical stripes
        (np.sin(2 * np.pi * f * xx) > 0) ^ (np.sin(2 * np.pi * f * yy) > 0),  # checkerboard
        xx + 0.2 * rng.standard_normal() > 0.5,  # half plane
        (r > 0.2) & (r < 0.35),  # ring
    ][label]
    img = 40 + 170 * pattern.astype(float) + rng.normal(0, 12, (size, size))
    return np.clip(img, 0, 255).astype(np.uint8)


def write_mednist(root: str, per_class: int = 20, seed: int = 0) -> str:
    """Write ``root/MedNIST/<class>/NNNNNN.jpeg`` like MedNIST's layout; returns ``root``."""
    rng = np.random.default_rng(seed)
    for label, cls in enumerate(CLASSES):
        os.makedirs(os.path.join(root, "MedNIST", cls), exist_ok=True)
        for i in range(per_class):
            Image.fromarray(class_image(label, rng)).save(os.path.join(root, "MedNIST", cls, f"{i:06d}.jpeg"))
    return root


@pytest.fixture(scope="session")
def mednist(tmp_path_factory) -> str:
    """A dataset_dir holding a synthetic MedNIST (20 images a class)."""
    return write_mednist(str(tmp_path_factory.mktemp("data")))


def train_bundle(dataset_dir, folder, check: bool = True, **overrides) -> subprocess.CompletedProcess:
    """``run training`` on ``dataset_dir`` with outputs in ``folder/out`` and checkpoints in ``folder/models``."""
    return run_bundle(
        "run",
        "training",
        "--config_file",
        TRAIN,
        dataset_dir=dataset_dir,
        output_dir=folder / "out",
        ckpt_dir=folder / "models",
        check=check,
        **overrides,
    )


def evaluate_bundle(trained_folder, output_dir, check: bool = True, **overrides) -> subprocess.CompletedProcess:
    """``run evaluating`` with the model and split of a training run in ``trained_folder``."""
    return run_bundle(
        "run",
        "evaluating",
        "--config_file",
        EVALUATE,
        split_file=trained_folder / "out" / "split.json",
        ckpt_dir=trained_folder / "models",
        output_dir=output_dir,
        check=check,
        **overrides,
    )


@pytest.fixture(scope="session")
def http_server(tmp_path_factory):
    """A static file server on 127.0.0.1 for a temporary folder; yields (folder, base URL)."""
    import http.server
    import threading

    root = tmp_path_factory.mktemp("served")

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(root), **k)

        def log_message(self, *args):  # keep test output quiet
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="session")
def trained(mednist, tmp_path_factory):
    """One 2-epoch training run on the synthetic data, shared by the tests that need a model: (folder, process)."""
    out = tmp_path_factory.mktemp("trained")
    proc = train_bundle(mednist, out, epochs=2, batch_size=16, accumulation_steps=1, learning_rate=0.001)
    return out, proc


def run_bundle(
    *args: str, timeout: int = 600, check: bool = True, cwd: str = BUNDLE, **overrides
) -> subprocess.CompletedProcess:
    """Run ``python -m monai.bundle <args> --key value ...`` from the bundle folder, as a user types it."""
    cmd = [sys.executable, "-m", "monai.bundle", *args]
    for key, value in overrides.items():
        cmd += [f"--{key}", str(value)]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
        )
    return proc
