"""Shared fixtures: a small synthetic MedNIST-like dataset, the bundle's workflows run in this process
(``ConfigWorkflow``, as MONAI's Python API runs them) and, for what only a process shows, the real CLI."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile

import nibabel as nib
import numpy as np
import pytest
from monai.bundle import ConfigWorkflow
from PIL import Image

BUNDLE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, BUNDLE)
CONFIGS = os.path.join(BUNDLE, "configs")
TRAIN = os.path.join(CONFIGS, "train.json")
EVALUATE = f"['{TRAIN}','{os.path.join(CONFIGS, 'evaluate.json')}']"
INFERENCE = os.path.join(CONFIGS, "inference.json")
META = os.path.join(CONFIGS, "metadata.json")
CLASSES = ("AbdomenCT", "BreastMRI", "CXR", "ChestCT", "Hand", "HeadCT")
FAST = {"batch_size": 16, "accumulation_steps": 1, "learning_rate": 0.001}
from tools.dicom import write_dicom  # noqa: E402,F401  (the tests' DICOM files, as the tools write them)

CALIBRATION = ("calibration.json", "calibration.npz")  # written to ckpt_dir at the end of training
# the fresh exports that loading an export compares with, kept for this session only (not in the user's cache)
os.environ["MEDNIST_CLASSIFICATION_CACHE"] = tempfile.mkdtemp(prefix="mednist-fresh-exports-")


@contextlib.contextmanager
def bundle_error(message: str):
    """Expect the block to fail with a ``BundleError`` (however MONAI wrapped it) whose text holds ``message``;
    yields a list that then holds the error."""
    found: list = []
    with pytest.raises(Exception) as err:
        yield found
    cause = err.value
    while cause is not None and type(cause).__name__ != "BundleError":
        cause = cause.__cause__
    assert cause is not None, f"not a BundleError: {err.value!r}"
    assert message in str(cause), str(cause)
    found.append(cause)


def config_files(*names: str) -> list[str]:
    """Paths of configs/<name>.json (or of a path given), in order (train.json first for an override such as
    evaluate)."""
    return [name if name.endswith(".json") else os.path.join(CONFIGS, f"{name}.json") for name in names]


def workflow(names, run_id: str, **overrides) -> ConfigWorkflow:
    """The bundle's ``ConfigWorkflow`` for ``configs/<names>.json`` with ``overrides``, initialized, not run."""
    wf = ConfigWorkflow(
        config_file=config_files(*names),
        meta_file=META,
        logging_file=os.path.join(CONFIGS, "logging.conf"),
        run_id=run_id,
        bundle_root=BUNDLE,
        **{k: str(v) if isinstance(v, os.PathLike) else v for k, v in overrides.items()},
    )
    wf.initialize()
    return wf


def parser(names, run_id: str = "run", **overrides):
    """The parser of the bundle's initialized workflow of ``configs/<names>.json``: the objects it builds."""
    return workflow(names, run_id, **overrides).parser


def run_workflow(names, run_id: str, **overrides) -> ConfigWorkflow:
    """Run a workflow in this process, as ``python -m monai.bundle run`` does; returns it (its parser holds the
    objects it made)."""
    wf = workflow(names, run_id, **overrides)
    wf.run()
    wf.finalize()
    return wf


def train(dataset_dir, folder, names=("train",), **overrides) -> ConfigWorkflow:
    """Training on ``dataset_dir``, outputs in ``folder/out``, checkpoints in ``folder/models``."""
    paths = {"dataset_dir": dataset_dir, "output_dir": folder / "out", "ckpt_dir": folder / "models"}
    return run_workflow(names, "training", **{**paths, **overrides})


def evaluate(trained_folder, output_dir, **overrides) -> ConfigWorkflow:
    """Evaluation of the model and split of a training run in ``trained_folder``."""
    paths = {"split_file": trained_folder / "out" / "split.json", "ckpt_dir": trained_folder / "models"}
    return run_workflow(("train", "evaluate"), "evaluating", output_dir=output_dir, **{**paths, **overrides})


def infer(trained_folder, output_dir, input, **overrides) -> ConfigWorkflow:
    """Inference on ``input`` with the model of ``trained_folder`` (unless ``model_file`` is given)."""
    folders = {"output_dir": output_dir, "ckpt_dir": trained_folder / "models"}
    return run_workflow(("inference",), "inference", input=input, **{**folders, **overrides})


def class_image(label: int, rng: np.random.Generator, size: int = 64, body: bool = False) -> np.ndarray:
    """A 64x64 uint8 image whose pattern tells its class apart, with random jitter and noise; with ``body``, the
    pattern fills only a body-like ellipse at a random place on a dark background, as MedNIST's anatomy does."""
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
    if body:
        (ex, ey), (ax, ay) = rng.uniform(0.35, 0.65, 2), rng.uniform(0.2, 0.28, 2)
        inside = ((xx - ex) / ax) ** 2 + ((yy - ey) / ay) ** 2 < 1
        img = np.where(inside, 70 + 140 * pattern, 10) + rng.normal(0, 5, (size, size))
    return np.clip(img, 0, 255).astype(np.uint8)


def write_mednist(root: str, per_class: int = 20, seed: int = 0, body: bool = False) -> str:
    """Write ``root/MedNIST/<class>/NNNNNN.jpeg`` like MedNIST's layout (images of :func:`class_image`); returns
    ``root``."""
    rng = np.random.default_rng(seed)
    for label, cls in enumerate(CLASSES):
        os.makedirs(os.path.join(root, "MedNIST", cls), exist_ok=True)
        for i in range(per_class):
            Image.fromarray(class_image(label, rng, body=body)).save(
                os.path.join(root, "MedNIST", cls, f"{i:06d}.jpeg")
            )
    return root


@pytest.fixture(scope="session")
def mednist(tmp_path_factory) -> str:
    """A dataset_dir holding a synthetic MedNIST (20 images a class)."""
    return write_mednist(str(tmp_path_factory.mktemp("data")))


@pytest.fixture(scope="session")
def mixed_folder(mednist, tmp_path_factory) -> dict:
    """Good images in every supported format, and one file of each bad kind; maps file name -> expected error."""
    d = tmp_path_factory.mktemp("mixed")
    src = os.path.join(mednist, "MedNIST")
    shutil.copy(os.path.join(src, "Hand", "000000.jpeg"), d / "hand.jpeg")
    shutil.copy(os.path.join(src, "CXR", "000000.jpeg"), d / "cxr.jpg")
    gray = np.asarray(Image.open(os.path.join(src, "BreastMRI", "000000.jpeg")))
    Image.fromarray(gray).convert("RGB").save(d / "rgb.png")
    Image.fromarray(gray).convert("RGBA").save(d / "rgba.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(d / "gray16.png")
    Image.fromarray(gray).resize((300, 200)).save(d / "large.png")
    os.makedirs(d / "sub")
    nib.save(nib.Nifti1Image(gray.T.astype(np.float32), np.eye(4)), d / "sub" / "slice.nii.gz")
    nib.save(nib.Nifti1Image(gray.T[..., None].astype(np.float32), np.eye(4)), d / "sub" / "slice1.nii")
    bad = {
        "empty.png": "file is empty",
        "truncated.jpeg": "cannot read image",
        "text.png": "cannot read image",
        "notes.txt": "unsupported file type '.txt'",
        "volume.nii.gz": "is not a 2D image (3D volume?)",
        "folder.png": "is a directory",
        "bomb.png": "over the 25,000,000 limit",
    }
    (d / "empty.png").write_bytes(b"")
    (d / "truncated.jpeg").write_bytes((d / "hand.jpeg").read_bytes()[:200])
    (d / "text.png").write_text("this is not a PNG")
    (d / "notes.txt").write_text("hello")
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 8), np.float32), np.eye(4)), d / "volume.nii.gz")
    os.makedirs(d / "folder.png")
    Image.new("L", (6000, 6000)).save(d / "bomb.png")  # 36 MP, a few kB compressed
    Image.fromarray(gray).save(d / "camera.jpg", format="MPO", save_all=True, append_images=[Image.fromarray(gray)])
    Image.new("L", (1, 1), 128).save(d / "dot.png")  # 2D, however small: predicted and flagged
    Image.fromarray(gray[:1, :40]).save(d / "line.png")
    write_dicom(d / "scan.dcm", gray)
    good = ["hand.jpeg", "cxr.jpg", "rgb.png", "rgba.png", "gray16.png", "large.png", "slice.nii.gz", "slice1.nii"]
    good += ["camera.jpg", "dot.png", "line.png", "scan.dcm"]
    return {"dir": d, "bad": bad, "good": good}


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
    """One 2-epoch training run on the synthetic data, shared by the tests that need a model: its folder."""
    out = tmp_path_factory.mktemp("trained")
    train(mednist, out, epochs=2, **FAST)
    return out


@pytest.fixture(scope="session")
def exported(trained, tmp_path_factory):
    """The model of ``trained`` exported to TorchScript (MONAI's ``ckpt_export``, as the README's command), .pt2
    and .onnx (``scripts.export``, which writes the model's description beside them): their folder."""
    from monai.bundle import ckpt_export

    from scripts.export import export

    out = tmp_path_factory.mktemp("export") / "models"  # made by the first export
    ckpt = str(trained / "models" / "model.pt")
    export("pt2", ckpt, str(out / "model.pt2"))
    ckpt_export(net_id="network_def", filepath=str(out / "model.ts"), ckpt_file=ckpt, meta_file=META,
                config_file=INFERENCE, bundle_root=BUNDLE)  # fmt: skip
    export("onnx", ckpt, str(out / "model.onnx"))
    for name in CALIBRATION:  # MONAI's TorchScript export carries none: it is found beside the file
        shutil.copy(trained / "models" / name, out / name)
    return out


# Runs the bundle's CLI with os.replace patched to SIGKILL the process at the n-th rename onto a chosen file name,
# right before it (the new file is complete on disk under its temporary name) or right after.
KILL_AT_RENAME = """
import os, runpy, signal, sys
when, target, nth = sys.argv[1], sys.argv[2], int(sys.argv[3])
real_replace, seen = os.replace, []
def replace(src, dst, *args, **kwargs):
    hit = os.path.basename(str(dst)) == target and len(seen) == nth - 1
    seen.extend([1] if os.path.basename(str(dst)) == target else [])
    if hit and when == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    real_replace(src, dst, *args, **kwargs)
    if hit and when == "after":
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
sys.argv = ["monai.bundle", *sys.argv[4:]]
runpy.run_module("monai.bundle", run_name="__main__")
"""


def killed_at_rename(args, when: str, target: str, nth: int = 1) -> subprocess.CompletedProcess:
    """``python -m monai.bundle <args>`` killed by SIGKILL right ``when`` ("before"/"after") its ``nth`` rename
    onto a file named ``target``."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    cmd = [sys.executable, "-c", KILL_AT_RENAME, when, target, str(nth), *map(str, args)]
    return subprocess.run(cmd, cwd=BUNDLE, capture_output=True, text=True, env=env, timeout=300)


def run_bundle(
    *args: str, timeout: int = 600, check: bool = True, cwd: str = BUNDLE, **overrides
) -> subprocess.CompletedProcess:
    """Run ``python -m monai.bundle <args> --key value ...`` in ``cwd`` (the bundle folder), as a user types it,
    without this process's PYTHONPATH."""
    cmd = [sys.executable, "-m", "monai.bundle", *args]
    for key, value in overrides.items():
        cmd += [f"--{key}", str(value)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
        )
    return proc
