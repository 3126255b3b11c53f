"""Export the trained network to a ``torch.export`` program (.pt2) or ONNX (.onnx) carrying its calibration,
renamed into place only once loaded back by ``scripts.model_file`` with the checkpoint's logits (TorchScript:
MONAI's ``ckpt_export``, see README)::

    python -m scripts.export pt2|onnx [--ckpt_path models/model.pt] [--out models/model.pt2|.onnx]
"""

from __future__ import annotations

import json
import logging
import os

import fire
import torch

from .calibration import calibration_for
from .model_file import CALIBRATION_ENTRY, inference_config, load_model
from .utils import TMP_PREFIX, BundleError, fsync_folder

logger = logging.getLogger(__name__)
MAX_BATCH = 4096


def check_parity(ckpt_path: str, path: str, atol: float = 1e-4) -> float:
    """Load the checkpoint and its export ``path`` as inference does, and stop unless their logits on random
    images agree within ``atol``; returns the largest difference."""
    images = torch.rand(5, 1, *image_size(), generator=torch.Generator().manual_seed(0))
    exported = load_model(path)
    with torch.no_grad():
        expected = load_model(ckpt_path)(images)
        try:
            got = exported(images)
        except Exception as e:
            problem = f"the export {path} fails on {len(images)} images ({type(e).__name__}: {e})."
            raise BundleError(problem, "report it.") from e
    gap = float((expected - got).abs().max())
    if not gap <= atol:
        raise BundleError(f"the export {path} gives other logits than its checkpoint (by {gap:.3g}).", "report it.")
    return gap


def image_size() -> list[int]:
    """``image_size`` of configs/inference.json: the size the network sees."""
    return inference_config()["image_size"]


def _export(ckpt_path: str, out: str, write, suffix: str) -> str:
    """``write(network, path, calibration JSON or None)`` to a temporary file beside ``out`` (named ``*suffix``),
    parity-checked, then renamed to ``out``."""
    if not str(out).lower().endswith(suffix):
        raise BundleError(f"--out {out} does not end in {suffix}.", f"pass e.g. --out models/model{suffix}.")
    calibration = calibration_for(ckpt_path)
    carried = json.dumps(calibration.to_json()) if calibration.fitted else None
    folder = os.path.dirname(os.path.abspath(out))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f"{TMP_PREFIX}{os.getpid()}-export{suffix}")
    try:
        write(load_model(ckpt_path), tmp, carried)
        gap = check_parity(ckpt_path, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
        fsync_folder(folder)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    logger.info(f"exported {ckpt_path} to {out} (largest logit difference {gap:.2g})")
    return out


def write_pt2(network: torch.nn.Module, path: str, calibration: str | None) -> None:
    """A ``torch.export`` program of ``network`` with a dynamic batch dimension, carrying ``calibration``."""
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    program = torch.export.export(network, (torch.rand(2, 1, *image_size()),), dynamic_shapes=({0: batch},))
    torch.export.save(program, path, extra_files={CALIBRATION_ENTRY: calibration} if calibration else None)


def export_pt2(ckpt_path: str = "models/model.pt", out: str = "models/model.pt2") -> str:
    """Write a ``torch.export`` program with a dynamic batch dimension."""
    return _export(ckpt_path, out, write_pt2, ".pt2")


def export_onnx(ckpt_path: str = "models/model.pt", out: str = "models/model.onnx", opset: int = 18) -> str:
    """Write an ONNX model (input ``image`` N x 1 x 64 x 64, output ``logits`` N x 6) with a dynamic batch."""
    try:
        import onnx
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise BundleError(f"ONNX export needs {e.name}.", "pip install onnx onnxscript onnxruntime") from e

    def write(network, path, calibration):
        torch.onnx.export(
            network,
            (torch.rand(2, 1, *image_size()),),
            path,
            input_names=["image"],
            output_names=["logits"],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=MAX_BATCH)},),
            opset_version=opset,
            dynamo=True,
            external_data=False,
        )
        if calibration:
            model = onnx.load(path)
            onnx.helper.set_model_props(model, {CALIBRATION_ENTRY: calibration})
            onnx.save(model, path)

    return _export(ckpt_path, out, write, ".onnx")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s - %(name)s - %(levelname)s - %(message)s")
    fire.Fire({"pt2": export_pt2, "onnx": export_onnx})
