"""Model files, read into memory once and loaded from exactly the bytes checked, so that none runs code.

- ``model.pt``: ``torch.load(weights_only=True)``; every key and shape must be ``network_def``'s.
- ``.pt2``: ``torch.export.load`` would unpickle ``use_pickle`` weights, custom objects and sample inputs, ``eval``
  shape expressions and compile guard code; every zip entry is checked (:func:`check_pt2`) and torch loads an
  archive rebuilt from the checked entries alone.
- ``.ts``: TorchScript's loader (its C++ unpickler makes no Python objects); its program may use any operator.
- ``.onnx``: onnxruntime, from the bytes (no external data files).
"""

from __future__ import annotations

import ast
import io
import itertools
import json
import os
import re
import warnings
import zipfile

import torch

from .utils import BUNDLE_ROOT, BundleError

SUFFIXES = (".pt", ".ts", ".pt2", ".onnx")
MAX_FILE_BYTES = 1 << 30  # far above any model file of DenseNet121
MAX_ENTRIES = 4096
TRUSTED = "use a model exported by this bundle (python -m scripts.export) from a source you trust."
# the entries of a torch.export archive of this bundle's network, under its top folder
PT2_ENTRY = re.compile(
    r"archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id|extra/\w[\w.-]*"
    r"|models/\w+\.json|data/(weights|constants)/\w+_config\.json|data/weights/weight_\d+"
    r"|data/constants/tensor_\w+|data/sample_inputs/\w+\.pt"
)
TOP_FOLDER = re.compile(r"(?!\.{1,2}$)[\w.-]{1,200}")  # a name, not . or ..
PT2_TARGET = re.compile(
    r"torch\.ops\.aten\.\w+\.\w+|_operator\.(getitem|add|sub|mul|floordiv|mod|neg|eq|ne|lt|le|gt|ge)"
    r"|torch\.sym_(int|float|max|min|not)|math\.(floor|ceil|trunc)"
)
PT2_METADATA = {  # what each small entry of this bundle's exports holds
    "archive_format": re.compile(rb"pt2"),
    "archive_version": re.compile(rb"\d{1,3}"),
    "byteorder": re.compile(rb"little|big"),
    ".data/version": re.compile(rb"\d{1,3}\n?"),
    ".data/serialization_id": re.compile(rb"\d{1,64}"),
}
ELEMENT_BYTES = {5: 8, 7: 4}  # torch.export's serialized dtypes this bundle's exports hold: int64, float32
CALIBRATION_ENTRY = "calibration.json"  # the calibration an export carries: an extra file, ONNX metadata


def inference_config():
    """configs/inference.json, parsed (MONAI's ``ConfigParser``)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(os.path.join(BUNDLE_ROOT, "configs", "inference.json"))
    return parser


def network_def() -> torch.nn.Module:
    """``network_def`` of configs/inference.json: the bundle's network, untrained."""
    return inference_config().get_parsed_content("network_def")


def read_model_file(path: str) -> bytes:
    """The bytes of ``path``, read once, or a ``BundleError`` naming what is wrong with it."""
    suffix = os.path.splitext(str(path))[1].lower()
    if suffix not in SUFFIXES:
        raise BundleError(f"model file {path} is not a .pt, .ts, .pt2 or .onnx file.", "pass a model of this bundle.")
    if not os.path.isfile(path):
        raise BundleError(
            f"model file {path} does not exist.",
            "train first (it writes models/model.pt), export one (see README), or fix the path.",
        )
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size > MAX_FILE_BYTES:
            raise BundleError(f"model file {path} is over {MAX_FILE_BYTES >> 20} MiB.", TRUSTED)
        data = f.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise BundleError(f"model file {path} is over {MAX_FILE_BYTES >> 20} MiB.", TRUSTED)
    return data


def load_model(path: str, network: torch.nn.Module | None = None, device="cpu") -> torch.nn.Module:
    """The network of the model file ``path`` on ``device``, in eval mode (``network`` with a ``.pt``'s weights, or
    an export's program), or a ``BundleError`` naming the file if missing, not of this bundle or running code."""
    path, device = str(path), torch.device(device)
    data = read_model_file(path)
    suffix = os.path.splitext(path)[1].lower()
    if network is not None and suffix != ".pt":
        raise BundleError(f"{path} is an export, not weights (a .pt).", "pass exports with --model_file.")
    if suffix == ".pt":
        if network is None:
            network = network_def()
        load_weights(data, network, path)
        return network.to(device).eval()
    if suffix == ".pt2":
        data = checked_pt2(data, path)
    try:
        if suffix == ".ts":
            return torch.jit.load(io.BytesIO(data), map_location=device).eval()
        if suffix == ".pt2":
            extra: dict = {}
            program = torch.export.load(io.BytesIO(data), extra_files=extra).module().to(device)
            return ExportedProgramModule(program, extra.get(CALIBRATION_ENTRY))
        return OnnxModule(data, path)
    except BundleError:
        raise
    except Exception as e:
        raise BundleError(f"cannot load model file {path}: {type(e).__name__}: {e}", "export it again.") from e


def load_weights(data: bytes, network: torch.nn.Module, path: str) -> None:
    """Load the state dict ``data`` (a ``model.pt``, or a training checkpoint's ``model``) into ``network``."""
    fix = "train first (it writes models/model.pt) or pass --ckpt_path with a model.pt saved by this bundle."
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise BundleError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e}).", fix) from e
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # a full training checkpoint
    expected = network.state_dict()
    if not isinstance(state, dict) or set(state) != set(expected):
        raise BundleError(f"checkpoint {path} does not hold DenseNet121 weights for this bundle.", fix)
    bad = [k for k, v in state.items() if getattr(v, "shape", None) != expected[k].shape]
    if bad:
        raise BundleError(f"checkpoint {path} has weights of the wrong shape, e.g. {bad[0]}.", fix)
    network.load_state_dict(state)


def zip_entries(data: bytes, path: str, allowed: re.Pattern) -> dict[str, bytes]:
    """Each entry of the zip archive ``data``, read once: ``{name under the top folder: bytes}``. Refused before
    any is read: over ``MAX_ENTRIES`` entries or the size bound, names outside one top folder or not ``allowed``
    (no ``..``, absolute path or backslash), names equal but for case, encrypted or unusual compression.
    ``zipfile`` checks each local header's name and CRC as it reads."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = archive.infolist()
    except (zipfile.BadZipFile, ValueError, EOFError) as e:
        raise BundleError(f"{path} is not a readable zip archive ({e}).", TRUSTED) from e
    declared = sum(info.file_size for info in infos)
    problem = None
    if len(infos) > MAX_ENTRIES:
        problem = f"{len(infos)} entries"
    elif declared > MAX_FILE_BYTES:
        problem = f"entries declaring {declared:,} bytes"
    seen, tops = set(), set()
    for info in infos if problem is None else ():
        top, _, name = info.filename.partition("/")
        tops.add(top)
        if not TOP_FOLDER.fullmatch(top) or not allowed.fullmatch(name):
            problem = f"unexpected entry {info.filename!r}"
        elif len(tops) > 1:
            problem = f"a second top folder {top!r}"
        elif info.filename.lower() in seen:
            problem = f"a second entry named {info.filename!r}"
        elif info.flag_bits & 1 or info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            problem = f"an encrypted or unusually compressed entry {info.filename!r}"
        if problem:
            break
        seen.add(info.filename.lower())
    if problem:
        raise BundleError(f"refused to load {path}: it holds {problem}.", TRUSTED)
    entries = {}
    try:
        for info in infos:
            with archive.open(info) as f:
                content = f.read(info.file_size + 1)
            if len(content) != info.file_size:
                raise zipfile.BadZipFile(f"entry {info.filename!r} is not of its declared size")
            entries[info.filename.partition("/")[2]] = content
    except (zipfile.BadZipFile, ValueError, EOFError, OSError, NotImplementedError) as e:
        raise BundleError(f"{path} is not a readable zip archive ({e}).", TRUSTED) from e
    return entries


def checked_pt2(data: bytes, path: str) -> bytes:
    """A new torch.export archive holding exactly the checked entries of ``data``, or a ``BundleError``."""
    entries = zip_entries(data, path, PT2_ENTRY)
    problems = check_pt2(entries)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise BundleError(f"refused to load {path}: it holds {problems[0]}{more}.", TRUSTED)
    rebuilt = io.BytesIO()
    with zipfile.ZipFile(rebuilt, "w", zipfile.ZIP_STORED) as archive:
        for name, content in entries.items():
            archive.writestr(f"model/{name}", content)
    return rebuilt.getvalue()


def check_pt2(entries: dict[str, bytes]) -> list[str]:
    """What in a torch.export archive's ``entries`` would run code or is not this bundle's: pickled or custom
    payloads, weight files not of their tensors' size, sample inputs needing unrestricted unpickling, operators
    other than ATen's and a few of Python's, shape expressions outside :func:`shape_expression_ok`, guard code."""
    problems = [
        f"a {name} entry of {entries.get(name, b'')[:20]!r}"
        for name, form in PT2_METADATA.items()
        if not form.fullmatch(entries.get(name, b""))
    ]
    programs = [name for name in entries if name.startswith("models/")]
    if not programs:
        problems.append("no program in models/")
    try:
        for name, content in entries.items():
            if name.endswith("_config.json"):
                problems += _payload_problems(json.loads(content), name.split("/")[1], entries)
            elif name.startswith("data/sample_inputs/"):
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        torch.load(io.BytesIO(content), weights_only=True)
                except Exception:
                    problems.append(f"sample inputs {name!r} that need unrestricted unpickling")
        for name in programs:
            problems += _graph_problems(json.loads(entries[name]))
    except (ValueError, TypeError, AttributeError, KeyError, RecursionError) as e:
        problems.append(f"a malformed entry ({type(e).__name__}: {str(e)[:80]})")
    return problems


def _payload_problems(config: dict, folder: str, entries: dict[str, bytes]) -> list[str]:
    """Weights/constants that are pickled, custom, or whose file is not exactly their tensors' bytes."""
    problems, extent = [], {}
    for key, meta in config["config"].items():
        name, tensor = meta["path_name"], meta.get("tensor_meta")
        pattern = r"weight_\d+" if folder == "weights" else r"tensor_\w+"
        if meta.get("use_pickle") or not re.fullmatch(pattern, name) or not isinstance(tensor, dict):
            problems.append(f"pickled or custom payload {key!r}")
            continue
        sizes = [s["as_int"] for s in tensor["sizes"]]
        strides = [s["as_int"] for s in tensor["strides"]]
        offset = tensor["storage_offset"]["as_int"]
        size = ELEMENT_BYTES.get(tensor["dtype"])
        numbers = sizes + strides + [offset]
        if size is None or not all(isinstance(n, int) and n >= 0 for n in numbers) or len(sizes) != len(strides):
            problems.append(f"payload {key!r} of an unexpected dtype or layout")
            continue
        span = 0 if 0 in sizes else offset + 1 + sum((n - 1) * s for n, s in zip(sizes, strides))
        extent[name] = max(extent.get(name, 0), span * size)
    for name, needed in extent.items():
        found = entries.get(f"data/{folder}/{name}")
        if found is None or len(found) != needed:
            problems.append(f"payload file {name!r} that is not its tensors' {needed} bytes")
    return problems


def _graph_problems(node) -> list[str]:
    """Operators, shape expressions, guard code and custom objects of a serialized program that are not safe."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "target" and not (isinstance(value, str) and PT2_TARGET.fullmatch(value)):
                found.append(f"operator {str(value)[:60]!r}")
            elif key == "expr_str" and not (isinstance(value, str) and shape_expression_ok(value)):
                found.append(f"shape expression {str(value)[:60]!r}")
            elif key in ("guards_code", "custom_obj_values") and value:
                found.append(f"{key} {str(value)[:60]!r}")
            else:
                found += _graph_problems(value)
    elif isinstance(node, list):
        for value in node:
            found += _graph_problems(value)
    return found


SHAPE_FUNCTIONS = {"Add", "Mul", "Max", "Min", "Mod", "PythonMod", "FloorDiv", "CeilDiv", "Eq", "Ne", "Lt", "Le"}
SHAPE_FUNCTIONS |= {"Gt", "Ge", "Integer", "Symbol"}
SHAPE_TEXT = re.compile(r"[\w ()+\-*/%,=']{1,512}")  # no comments, attributes, subscripts or line breaks
SHAPE_NODES = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Call, ast.Name, ast.Constant, ast.keyword, ast.Load)
SHAPE_OPERATORS = (ast.Add, ast.Sub, ast.Mult, ast.FloorDiv, ast.Mod, ast.Pow, ast.USub)


def shape_expression_ok(text: str) -> bool:
    """Whether a shape expression (sympy ``eval``s it) keeps to a strict grammar, parsed by ``ast``, never run: at
    most 512 characters of symbols (``s77``), integers under 20 digits, ``+ - * // % **`` (powers of a symbol or
    integer by an integer up to 8), :data:`SHAPE_FUNCTIONS` of such, ``flag=True/False``, strings as symbols."""
    depth = max(itertools.accumulate({"(": 1, ")": -1}.get(c, 0) for c in text), default=0)
    if not SHAPE_TEXT.fullmatch(text) or depth > 20:
        return False
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError):
        return False
    functions = {id(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)}
    for node in ast.walk(tree):
        if not isinstance(node, SHAPE_NODES + SHAPE_OPERATORS):
            return False
        if isinstance(node, ast.Name) and id(node) not in functions and not re.fullmatch(r"[a-z]\d{1,6}", node.id):
            return False
        if isinstance(node, ast.Constant) and not (
            type(node.value) is bool
            or (type(node.value) is int and node.value < 10**19)
            or re.fullmatch(r"[a-z]\d{1,6}", str(node.value))
        ):
            return False
        if isinstance(node, ast.Call) and not (isinstance(node.func, ast.Name) and node.func.id in SHAPE_FUNCTIONS):
            return False
        if isinstance(node, ast.keyword) and not (
            isinstance(node.value, ast.Constant) and type(node.value.value) is bool
        ):
            return False
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
            base_ok = isinstance(node.left, (ast.Name, ast.Constant)) or (
                isinstance(node.left, ast.Call) and node.left.func.id == "Symbol"
            )
            if not (base_ok and isinstance(node.right, ast.Constant) and type(node.right.value) is int):
                return False
            if node.right.value > 8:
                return False
    return True


class ExportedProgramModule(torch.nn.Module):
    """A ``torch.export`` program as a plain ``nn.Module`` (the program's refuses ``.eval()``), its weights as
    ``state_dict``, and the calibration JSON it carries (or None)."""

    def __init__(self, program_module, calibration: str | None = None):
        super().__init__()
        object.__setattr__(self, "program", program_module)  # not a child: eval()/train() do not reach it
        self.calibration = calibration

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.program(x)

    def state_dict(self, *args, **kwargs):
        return self.program.state_dict(*args, **kwargs)


class OnnxModule(torch.nn.Module):
    """An ONNX model run by onnxruntime as the engines' ``nn.Module``, and the calibration JSON it carries."""

    def __init__(self, data: bytes, path: str):
        super().__init__()
        try:
            import onnxruntime
        except ImportError as e:
            raise BundleError("running an .onnx model needs onnxruntime.", "pip install onnxruntime") from e
        try:
            import onnx
            from onnx.external_data_helper import uses_external_data
        except ImportError:
            onnx = None
        if onnx is not None and any(uses_external_data(t) for t in onnx.load_from_string(data).graph.initializer):
            raise BundleError(f"refused to load {path}: it reads its weights from other files.", TRUSTED)
        self.session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.calibration = self.session.get_modelmeta().custom_metadata_map.get(CALIBRATION_ENTRY)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input_name: x.detach().cpu().float().numpy()})[0]
        return torch.from_numpy(out).to(x.device)
