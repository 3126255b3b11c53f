"""Export the trained network to a ``torch.export`` program (.pt2) or ONNX (.onnx), and load any export back.

TorchScript (.ts) export is MONAI's own ``python -m monai.bundle ckpt_export`` (see README). From the bundle
folder::

    python -m scripts.export pt2    # models/model.pt -> models/model.pt2
    python -m scripts.export onnx   # models/model.pt -> models/model.onnx (needs onnx, onnxscript, onnxruntime)

Both take ``--ckpt_path`` and ``--out``. The network comes from ``network_def`` in configs/inference.json.
"""

from __future__ import annotations

import logging
import os

import fire
import torch

from .utils import BUNDLE_ROOT, BundleError

logger = logging.getLogger(__name__)
EXPORT_SUFFIXES = (".ts", ".pt2", ".onnx")


def load_network(ckpt_path: str) -> tuple[torch.nn.Module, list[int]]:
    """``network_def`` of configs/inference.json with the checkpoint's weights, in eval mode, on the CPU, and the
    config's ``image_size``."""
    from monai.bundle import ConfigParser

    from .evaluate import check_checkpoint

    parser = ConfigParser()
    parser.read_config(os.path.join(BUNDLE_ROOT, "configs", "inference.json"))
    net = parser.get_parsed_content("network_def")
    check_checkpoint(ckpt_path, net)
    net.load_state_dict(torch.load(ckpt_path, map_location="cpu", weights_only=True))
    return net.eval(), parser.get_parsed_content("image_size")


def export_pt2(ckpt_path: str = "models/model.pt", out: str = "models/model.pt2") -> str:
    """Write a ``torch.export`` program with a dynamic batch dimension."""
    net, size = load_network(ckpt_path)
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(net, (torch.rand(2, 1, *size),), dynamic_shapes=({0: batch},))
    torch.export.save(program, out)
    logger.info(f"exported {ckpt_path} to {out}")
    return out


def export_onnx(ckpt_path: str = "models/model.pt", out: str = "models/model.onnx", opset: int = 18) -> str:
    """Write an ONNX model (input ``image`` N x 1 x 64 x 64, output ``logits`` N x 6) with a dynamic batch."""
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise BundleError(f"ONNX export needs {e.name}.", "pip install onnx onnxscript onnxruntime") from e
    net, size = load_network(ckpt_path)
    torch.onnx.export(
        net,
        (torch.rand(2, 1, *size),),
        out,
        input_names=["image"],
        output_names=["logits"],
        dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
        opset_version=opset,
        dynamo=True,
        external_data=False,
    )
    logger.info(f"exported {ckpt_path} to {out}")
    return out


class OnnxModule(torch.nn.Module):
    """An ONNX model run by onnxruntime behind the ``nn.Module`` call the engines use."""

    def __init__(self, path: str):
        super().__init__()
        try:
            import onnxruntime
        except ImportError as e:
            raise BundleError("running an .onnx model needs onnxruntime.", "pip install onnxruntime") from e
        self.session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input_name: x.detach().cpu().float().numpy()})[0]
        return torch.from_numpy(out).to(x.device)


class ExportedProgramModule(torch.nn.Module):
    """A ``torch.export`` program behind a plain ``nn.Module`` (the program's own module refuses ``.eval()``)."""

    def __init__(self, program_module):
        super().__init__()
        object.__setattr__(self, "program", program_module)  # not a child: eval()/train() do not reach it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.program(x)


def load_exported(path: str | None, device="cpu") -> torch.nn.Module | None:
    """A callable network from a .ts (TorchScript), .pt2 (torch.export) or .onnx file; None without a path."""
    if not path:
        return None
    if not os.path.isfile(path):
        raise BundleError(f"exported model {path} does not exist.", "export it first (see README) or fix --model_file.")
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in EXPORT_SUFFIXES:
        raise BundleError(f"--model_file {path} is not a .ts, .pt2 or .onnx file.", "pass an exported model.")
    try:
        if suffix == ".ts":
            return torch.jit.load(path, map_location=device).eval()
        if suffix == ".pt2":
            return ExportedProgramModule(torch.export.load(path).module().to(device))
        return OnnxModule(path)
    except BundleError:
        raise
    except Exception as e:
        raise BundleError(f"cannot load exported model {path}: {type(e).__name__}: {e}", "re-export it.") from e


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s - %(name)s - %(levelname)s - %(message)s")
    fire.Fire({"pt2": export_pt2, "onnx": export_onnx})
