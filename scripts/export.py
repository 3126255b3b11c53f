"""Export a trained model to a ``torch.export`` program (.pt2), ONNX (.onnx) or TorchScript (.ts), carrying its
calibration (.pt2, .onnx; beside a .ts) and, for MONAI Deploy, a .ts carries the bundle's inference config and the
model's own metadata; its description (classes, channels, size) is written beside it. Each is renamed into place
only once loaded back by the bundle's own loader with the checkpoint's logits::

    python -m scripts.export pt2|onnx|ts [--ckpt_path models/model.pt] [--out models/model.pt2|.onnx|.ts]
"""

from __future__ import annotations

import json
import logging
import os
import shutil

import fire
import torch

from .calibration import calibration_for
from .errors import BundleError
from .files import FolderLock, fsync_folder, temporary_folder
from .model_file import DESCRIPTION_FILES, ModelDescription, load_model, model_metadata
from .programs import write_onnx, write_pt2

logger = logging.getLogger(__name__)
CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def check_parity(ckpt_path: str, path: str, description: ModelDescription, atol: float = 1e-4) -> float:
    """Load the checkpoint and its export ``path`` as inference does, and stop unless their logits on random
    images agree within ``atol``; returns the largest difference."""
    images = torch.rand(5, description.in_channels, *description.image_size, generator=torch.Generator().manual_seed(0))
    exported = load_model(path, description=description)
    with torch.no_grad():
        expected = load_model(ckpt_path, description=description)(images)
        try:
            got = exported(images)
        except Exception as e:
            problem = f"the export {path} fails on {len(images)} images ({type(e).__name__}: {e})."
            raise BundleError(problem, "report it.") from e
    gap = float((expected - got).abs().max())
    if not gap <= atol:
        raise BundleError(f"the export {path} gives other logits than its checkpoint (by {gap:.3g}).", "report it.")
    return gap


def write_ts(network: torch.nn.Module, path: str, description: ModelDescription) -> None:
    """TorchScript of ``network`` (as MONAI's ``ckpt_export`` scripts it) carrying, as MONAI Deploy reads them,
    the bundle's inference config and the model's metadata (its classes, channels and size)."""
    from monai.data import save_net_with_metadata

    with open(os.path.join(CONFIGS, "inference.json"), "rb") as f:  # carried as a file, as MONAI Deploy reads it
        config = f.read()
    with open(os.path.join(CONFIGS, "metadata.json"), "rb") as f:
        metadata = model_metadata(json.loads(f.read(1 << 20)), description)
    with torch.no_grad():
        scripted = torch.jit.script(network.eval())
    save_net_with_metadata(scripted, path, include_config_vals=False, meta_values=metadata,
                           more_extra_files={"inference.json": config})  # fmt: skip


def export(kind: str, ckpt_path: str = "models/model.pt", out: str | None = None) -> str:
    """Export ``ckpt_path`` as ``kind`` (``pt2``, ``onnx`` or ``ts``) to ``out`` (default: beside it)."""
    suffix = f".{kind}"
    if kind not in ("pt2", "onnx", "ts"):
        raise BundleError(f"{kind!r} is not an export kind.", "pass pt2, onnx or ts.")
    out = str(out or os.path.join(os.path.dirname(str(ckpt_path)), f"model{suffix}"))
    if not out.lower().endswith(suffix):
        raise BundleError(f"--out {out} does not end in {suffix}.", f"pass e.g. --out models/model{suffix}.")
    if kind == "onnx":
        try:
            import onnx  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError as e:
            raise BundleError(f"ONNX export needs {e.name}.", "pip install onnx onnxscript onnxruntime") from e
    folder = os.path.dirname(os.path.abspath(out))
    lock = FolderLock([folder]).acquire()
    try:
        description = ModelDescription.beside(ckpt_path)
        network = load_model(str(ckpt_path), description=description)
        calibration = calibration_for(str(ckpt_path), network, description)
        carried = json.dumps(calibration.to_json()) if calibration.fitted else None
        logger.info(f"exporting {ckpt_path} to {out} ({kind}): tracing, writing, then loading it back to compare")
        staging = temporary_folder(folder)  # a folder of its own: the archive inside is named as the file will be
        tmp = os.path.join(staging, os.path.basename(out))
        try:
            if kind == "pt2":
                write_pt2(network, tmp, description.image_size, carried)
            elif kind == "onnx":
                write_onnx(network, tmp, description.image_size, carried)
            else:
                write_ts(network, tmp, description)
            gap = check_parity(str(ckpt_path), tmp, description)
            source = os.path.dirname(os.path.abspath(str(ckpt_path)))
            if source != folder:  # what travels beside the model: its description, a .ts's calibration
                extra = ["calibration.json"] if kind == "ts" and calibration.fitted else []
                for name in [*DESCRIPTION_FILES, *extra]:
                    if os.path.isfile(os.path.join(source, name)):
                        shutil.copyfile(os.path.join(source, name), os.path.join(folder, name))
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, out)
            fsync_folder(folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    finally:
        lock.release()
    logger.info(f"exported {ckpt_path} to {out} (largest logit difference {gap:.2g})")
    return out


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s - %(name)s - %(levelname)s - %(message)s")
    fire.Fire(export)
