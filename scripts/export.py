"""Export the trained network to a ``torch.export`` program (.pt2) or ONNX (.onnx), and load any export back.

TorchScript (.ts) export is MONAI's own ``python -m monai.bundle ckpt_export`` (see README). From the bundle
folder::

    python -m scripts.export pt2    # models/model.pt -> models/model.pt2
    python -m scripts.export onnx   # models/model.pt -> models/model.onnx (needs onnx, onnxscript, onnxruntime)

Both take ``--ckpt_path`` and ``--out``. The network comes from ``network_def`` in configs/inference.json.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import tokenize
import warnings
import zipfile

import fire
import numpy as np
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


# What a torch.export archive of this bundle's network holds; anything else is refused before torch reads it.
PT2_FILES = re.compile(
    r"archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id|extra/[^/]+|models/\w+\.json"
    r"|data/(weights|constants)/\w+_config\.json|data/weights/weight_\d+|data/constants/tensor_\w+"
    r"|data/sample_inputs/\w+\.pt"
)
PT2_TARGET = re.compile(r"torch\.ops\.aten\.\w+\.\w+|_operator\.\w+|torch\.sym_\w+|math\.\w+")
SYMPY_NAMES = {
    "Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Mod", "Max", "Min", "Eq", "Ne", "Lt", "Le",
    "Gt", "Ge", "FloorDiv", "CeilToInt", "FloorToInt", "TruncToInt", "PythonMod", "IntTrueDiv", "floor",
    "ceiling", "positive", "integer", "True", "False", "oo",
}  # fmt: skip


def _safe_expression(text: str) -> bool:
    """Whether a symbolic shape expression (parsed by sympy with ``eval``) holds only sympy's shape vocabulary:
    the names above, symbols such as ``'s77'``, numbers and operators."""
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
    except (tokenize.TokenError, SyntaxError):
        return False
    for tok in tokens:
        if tok.type == tokenize.NAME and tok.string not in SYMPY_NAMES and not re.fullmatch(r"[a-z]\d+", tok.string):
            return False
        if tok.type == tokenize.STRING and not re.fullmatch(r"'[a-z]\d+'", tok.string):
            return False
        if tok.type == tokenize.OP and tok.string not in set("()+-*/%,=<>") | {"**", "//", "==", "!=", "<=", ">="}:
            return False
    return True


def _unsafe_graph_entries(node) -> list[str]:
    """Operator targets and symbolic expressions of a serialized program that are outside the safe vocabulary."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "target" and isinstance(value, str) and not PT2_TARGET.fullmatch(value):
                found.append(f"operator {value!r}")
            elif key == "expr_str" and isinstance(value, str) and not _safe_expression(value):
                found.append(f"expression {value[:60]!r}")
            else:
                found += _unsafe_graph_entries(value)
    elif isinstance(node, list):
        for value in node:
            found += _unsafe_graph_entries(value)
    return found


def check_program(path: str) -> None:
    """Stop with a message unless ``path`` is a torch.export archive that loads without running code.

    ``torch.export.load`` unpickles (with no restriction) weights marked ``use_pickle``, custom and opaque
    objects, legacy weight files and sample inputs that the restricted unpickler refuses, loads AOTInductor
    libraries, and parses symbolic shapes with sympy (``eval``). Before it is called, every archive entry must
    be one this bundle's export writes, no payload may be pickled, the sample inputs must load with
    ``torch.load(weights_only=True)``, and the graph may only name ATen/operator functions and plain shape
    expressions.
    """
    fix = "use a model exported by this bundle (python -m scripts.export pt2) from a source you trust."
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            top = names[0].split("/")[0] + "/" if names else ""
            rel = {n: n[len(top) :] for n in names if n.startswith(top) and not n.endswith("/")}
            problems = [f"unexpected entry {n!r}" for n in names if not PT2_FILES.fullmatch(rel.get(n, n))]
            for name, entry in rel.items():
                if entry.endswith("_config.json"):
                    for key, meta in json.loads(zf.read(name)).get("config", {}).items():
                        if meta.get("use_pickle") or not re.fullmatch(
                            r"(weight|tensor)_\w+", meta.get("path_name", "")
                        ):
                            problems.append(f"pickled payload {key!r}")
                elif entry.startswith("data/sample_inputs/"):
                    try:
                        with warnings.catch_warnings():
                            warnings.simplefilter("ignore")
                            torch.load(io.BytesIO(zf.read(name)), weights_only=True)
                    except Exception:
                        problems.append(f"sample inputs {entry!r} that need unrestricted unpickling")
                elif entry.startswith("models/"):
                    problems += _unsafe_graph_entries(json.loads(zf.read(name)))
    except (zipfile.BadZipFile, OSError, ValueError, KeyError) as e:
        raise BundleError(f"{path} is not a readable torch.export archive ({type(e).__name__}: {e}).", fix) from e
    if not any(e.startswith("models/") for e in rel.values()):
        problems.append("no program in models/")
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise BundleError(f"refused to load {path}: it holds {problems[0]}{more}.", fix)


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
            check_program(path)
            return ExportedProgramModule(torch.export.load(path).module().to(device))
        return OnnxModule(path)
    except BundleError:
        raise
    except Exception as e:
        raise BundleError(f"cannot load exported model {path}: {type(e).__name__}: {e}", "re-export it.") from e


def check_model_file(path: str) -> None:
    """Stop with a message naming ``path`` unless it is a complete model this bundle can load without running
    code: a ``model.pt`` of weights for ``network_def`` (``torch.load(weights_only=True)``), its
    ``calibration.json``, a safe .pt2 archive, a TorchScript file, or an ONNX model (checked when ``onnx`` is
    installed)."""
    from monai.bundle import ConfigParser

    from .evaluate import check_checkpoint

    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".json":  # calibration.json
        try:
            with open(path) as f:
                temperature = json.load(f)["temperature"]
            assert isinstance(temperature, (int, float)) and temperature > 0
        except Exception as e:
            raise BundleError(f"{path} is not a calibration saved by training ({e!r}).", "train again.") from e
        return
    if suffix == ".npz":  # calibration.npz: arrays only
        try:
            with np.load(path, allow_pickle=False) as npz:
                assert {"means", "precision"} <= set(npz.files)
        except Exception as e:
            raise BundleError(f"{path} is not a calibration saved by training ({e!r}).", "train again.") from e
        return
    if suffix == ".pt":
        parser = ConfigParser()
        parser.read_config(os.path.join(BUNDLE_ROOT, "configs", "inference.json"))
        check_checkpoint(path, parser.get_parsed_content("network_def"))
        return
    if suffix == ".pt2":
        check_program(path)
    try:
        if suffix == ".pt2":
            torch.export.load(path)
        elif suffix == ".ts":
            torch.jit.load(path, map_location="cpu")
        elif suffix == ".onnx":
            try:
                import onnx
            except ImportError:
                logger.warning(f"{path} not checked: onnx is not installed")
                return
            onnx.checker.check_model(path)
    except Exception as e:
        raise BundleError(f"{path} cannot be loaded ({type(e).__name__}: {e}).", "export it again.") from e


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s - %(name)s - %(levelname)s - %(message)s")
    fire.Fire({"pt2": export_pt2, "onnx": export_onnx})
