"""Exported programs (``.pt2``, ``.ts``, ``.onnx``): written by the bundle, and read back only if the file's program
is the one the bundle writes for the network. Each file is compared with a fresh export of the (untrained) network
made here by the installed torch; what then loads is that fresh program, rebuilt with the file's weights alone.
Neither ``torch.export.load``, ``torch.jit.load`` nor ONNX Runtime ever sees the file's own program, pickles, code,
guards or external references: anything the bundle would not have written is refused before.

- ``.pt2``: the graph (``models/model.json``) equal to the fresh one but for its nodes' source metadata, every
  other entry equal, each weight file of its tensor's size; only ``extra/calibration.json`` may be added.
- ``.ts``: the TorchScript classes (code, type names and local names normalised: TorchScript numbers them by what
  else a process scripted) and the module pickle equal, each storage of its size; ``extra/`` files are unpacked
  but never used.
- ``.onnx``: the model equal to the fresh one but for documentation, metadata and the initializers' values, which
  must be inline and of their declared size; only the ``calibration.json`` property may be added.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import re
import warnings
import zipfile
from collections import Counter
from zipfile import ZIP_DEFLATED, ZIP_STORED

import torch

from .errors import BundleError
from .files import atomic_write

logger = logging.getLogger(__name__)

MAX_BATCH = 4096
MAX_ARCHIVE_BYTES = 1 << 30  # far above any export of DenseNet121
MAX_ENTRIES = 8192
MAX_EXTRA_BYTES = 1 << 20
CALIBRATION_ENTRY = "calibration.json"  # the calibration an export carries: an extra file, an ONNX property
TRUSTED = "use a model exported by this bundle (python -m scripts.export) from a source you trust."
ZIP_NAME = re.compile(r"[\w.-]{1,200}(/[\w.-]{1,200}){1,8}")  # top folder, then a relative path: no .., \ or //
MANGLE = re.compile(rb"(/|\.)___torch_mangle_\d+")
NUMBERED = re.compile(rb"\b([A-Za-z_][A-Za-z_]*?)(\d+)\b")
DECLARATION = re.compile(rb"  \w+ : ")
VALUE_FIELDS = ("float_data", "int32_data", "int64_data", "double_data", "uint64_data")  # an initializer's values


def reexport(path: str) -> str:
    """The fix for an export that is not what the bundle writes for the model described beside it: made from
    another model (stale) or by another torch, or altered."""
    return (
        f"re-export it: export it again from its model.pt with this bundle and torch {torch.__version__} "
        f"(python -m scripts.export {path.rsplit('.', 1)[-1]} --ckpt_path MODEL.pt), or {TRUSTED}"
    )


def refused(path: str, what: str, fix: str | None = None) -> BundleError:
    return BundleError(f"refused to load {path}: {what}.", fix or TRUSTED)


def zip_entries(data: bytes, path: str) -> dict[str, bytes]:
    """Each entry of the zip archive ``data``, read once, by its name under the one top folder. Refused before any
    is read: too many entries or bytes declared, names outside one top folder (``..``, absolute, backslashes),
    names equal but for case, encrypted or compressed entries (the writers store them; ``torch.jit.save`` deflates
    its ``code/``, each far under 1 MiB). ``zipfile`` checks names and CRCs."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = archive.infolist()
    except (zipfile.BadZipFile, ValueError, EOFError) as e:
        raise BundleError(f"{path} is not a readable zip archive ({e}).", TRUSTED) from e
    if len(infos) > MAX_ENTRIES:
        raise refused(path, f"it holds {len(infos)} entries")
    declared = sum(info.file_size for info in infos)
    if declared > MAX_ARCHIVE_BYTES:
        raise refused(path, f"it holds entries declaring {declared:,} bytes")
    seen, tops = set(), set()
    for info in infos:
        tops.add(info.filename.partition("/")[0])
        if not ZIP_NAME.fullmatch(info.filename) or ".." in info.filename.split("/"):
            raise refused(path, f"it holds an unexpected entry {info.filename[:80]!r}")
        if len(tops) > 1:
            raise refused(path, f"it holds a second top folder {info.filename.partition('/')[0]!r}")
        if info.filename.lower() in seen:
            raise refused(path, f"it holds a second entry named {info.filename!r}")
        code = info.filename.partition("/")[2].startswith("code/") and info.file_size <= MAX_EXTRA_BYTES
        if info.flag_bits & 1 or info.compress_type not in ((ZIP_STORED, ZIP_DEFLATED) if code else (ZIP_STORED,)):
            raise refused(path, f"it holds an encrypted or compressed entry {info.filename!r}")
        seen.add(info.filename.lower())
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


def write_zip(entries: dict[str, bytes], top: str = "model") -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name, content in entries.items():
            archive.writestr(f"{top}/{name}", content)
    return buffer.getvalue()


def first_difference(found, expected, where: str = "") -> str | None:
    """Where two JSON values first differ (``graph_module.graph.nodes[3].target``), or None."""
    if type(found) is not type(expected):
        return where or "the whole"
    if isinstance(expected, dict):
        for key in list(expected) + [k for k in found if k not in expected]:
            if key not in found or key not in expected:
                return f"{where}.{key}".lstrip(".")
            difference = first_difference(found[key], expected[key], f"{where}.{key}")
            if difference:
                return difference
        return None
    if isinstance(expected, list):
        if len(found) != len(expected):
            return f"{where} (length {len(found)}, not {len(expected)})"
        for i, (a, b) in enumerate(zip(found, expected)):
            difference = first_difference(a, b, f"{where}[{i}]")
            if difference:
                return difference
        return None
    return None if found == expected else where


def without_metadata(node):
    """A serialized program without its nodes' ``metadata`` (source lines and module paths of the exporting
    machine), which the rebuilt program does not take from the file."""
    if isinstance(node, dict):
        return {k: without_metadata(v) for k, v in node.items() if k != "metadata"}
    if isinstance(node, list):
        return [without_metadata(v) for v in node]
    return node


def export_program(network: torch.nn.Module, image_size) -> torch.export.ExportedProgram:
    """``torch.export`` of ``network`` (eval mode) for N x C x H x W input, the batch dynamic: what every export
    of the bundle is made from."""
    channels = next(m for m in network.modules() if isinstance(m, torch.nn.Conv2d)).in_channels
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    example = (torch.rand(2, channels, *image_size),)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.export.export(network.eval(), example, dynamic_shapes=({0: batch},))


def write_pt2(network: torch.nn.Module, path, image_size, calibration: str | None = None) -> None:
    """A ``torch.export`` program of ``network`` carrying ``calibration`` (JSON) as an extra file; the program,
    without it, is the fresh export loading compares with (:func:`fresh`), if none is known yet."""
    extra = {CALIBRATION_ENTRY: calibration} if calibration else None
    program = export_program(network, image_size)
    fresh("pt2", network, image_size, maker=lambda: saved_program(program))
    torch.export.save(program, path, extra_files=extra)


def saved_program(program: torch.export.ExportedProgram) -> bytes:
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


def onnx_model(network: torch.nn.Module, image_size):
    """The ONNX model (``onnx.ModelProto``) of ``network``, made from its ``torch.export`` program (as the ``.pt2``
    is): input ``image``, output ``logits``, the batch dynamic."""
    program = export_program(network, image_size)
    quiet = logging.getLogger("torch.onnx")  # its notes on operators of packages the network does not use
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            exported = torch.onnx.export(
                program, program.example_inputs[0], input_names=["image"], output_names=["logits"],
                opset_version=18, dynamo=True, external_data=False, optimize=False, verbose=False,
            )  # fmt: skip
    finally:
        quiet.setLevel(level)
    return exported.model_proto


def write_onnx(network: torch.nn.Module, path, image_size, calibration: str | None = None) -> None:
    """An ONNX model of ``network`` made from the same ``torch.export`` program as the ``.pt2``, carrying
    ``calibration`` (JSON) as the model property ``calibration.json``."""
    import onnx

    model = onnx_model(network, image_size)
    fresh("onnx", network, image_size, maker=model.SerializeToString)  # before the calibration property
    if calibration:
        onnx.helper.set_model_props(model, {CALIBRATION_ENTRY: calibration})
    onnx.save(model, str(path))


FRESH: dict[tuple, object] = {}  # this process's fresh exports, by kind, architecture and image size
CACHE_ENV = "MEDNIST_CLASSIFICATION_CACHE"  # the folder of fresh exports kept between runs ("" for none)


def cache_folder() -> str:
    """Where the fresh exports are kept between runs: ``$MEDNIST_CLASSIFICATION_CACHE``, else the user's cache
    (``~/.cache/mednist_classification``), as trusted as the user's own files; "" keeps none."""
    default = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mednist_classification")
    return os.environ.get(CACHE_ENV, default)


def fresh(kind: str, network: torch.nn.Module, image_size, maker=None) -> object:
    """What the bundle writes for ``network`` (only the architecture matters) as ``kind``: the entries of a ``.pt2``
    or ``.ts`` archive, or an ONNX model; made once for each architecture, torch version and size (by ``maker``, the
    bytes of an export this process has just made, else :func:`make_fresh`), and kept in :func:`cache_folder` (an
    unreadable kept one is made again)."""
    image_size = tuple(int(s) for s in image_size)
    shapes = [(k, tuple(v.shape), str(v.dtype)) for k, v in network.state_dict().items()]  # the architecture
    architecture = (type(network).__qualname__, repr(network), shapes, (kind, image_size, torch.__version__))
    key = (kind, hashlib.sha256(repr(architecture).encode()).hexdigest(), image_size)
    if key in FRESH:
        return FRESH[key]
    folder = cache_folder()
    kept = os.path.join(folder, f"{key[1]}.{kind}") if folder else ""
    made = None
    if kept and os.path.isfile(kept):
        try:
            with open(kept, "rb") as f:
                made = parse_fresh(kind, f.read(MAX_ARCHIVE_BYTES + 1))
        except Exception as e:  # made again below
            logger.warning(f"the kept fresh export {kept} is unreadable ({type(e).__name__}): making it again")
    if made is None:
        content = maker() if maker is not None else make_fresh(kind, network.eval(), image_size)
        made = parse_fresh(kind, content)
        if kept:
            try:
                os.makedirs(folder, exist_ok=True)
                atomic_write(kept, lambda f: f.write(content), "wb")
            except OSError as e:  # a read-only home: made again next run
                logger.warning(f"cannot keep the fresh export in {folder} ({e.strerror or e})")
    FRESH[key] = made
    return made


def make_fresh(kind: str, network: torch.nn.Module, image_size) -> bytes:
    """The bytes of the bundle's export of ``network`` as ``kind``."""
    if kind == "onnx":
        return onnx_model(network, image_size).SerializeToString()
    if kind == "pt2":
        return saved_program(export_program(network, image_size))
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(network), buffer)
    return buffer.getvalue()


def parse_fresh(kind: str, content: bytes) -> object:
    """A fresh export's bytes as :func:`fresh` gives them: an ONNX model, or an archive's entries."""
    if len(content) > MAX_ARCHIVE_BYTES:
        raise ValueError(f"over {MAX_ARCHIVE_BYTES:,} bytes")
    if kind == "onnx":
        import onnx

        return onnx.load_model_from_string(content)
    return zip_entries(content, "the fresh export")


def extra_json(content: bytes, path: str, name: str) -> str:
    """An extra file an export may carry: JSON text of bounded size."""
    try:
        if len(content) > MAX_EXTRA_BYTES:
            raise ValueError(f"{len(content):,} bytes")
        text = content.decode("utf-8")
        json.loads(text)
    except (ValueError, RecursionError) as e:  # RecursionError: nested too deep
        raise refused(path, f"its {name} is not JSON of at most {MAX_EXTRA_BYTES:,} bytes ({e})") from e
    return text


def load_pt2(data: bytes, path: str, network: torch.nn.Module, image_size):
    """The program of the ``.pt2`` archive ``data`` if it is the bundle's export of ``network``: the fresh export's
    entries with the file's weights; and the calibration JSON it carries, or None."""
    entries, expected = zip_entries(data, path), fresh("pt2", network, image_size)
    extras = {f"extra/{CALIBRATION_ENTRY}"}
    unknown = sorted(set(entries) - set(expected) - extras)
    if unknown:
        raise refused(
            path, f"it holds {unknown[0]!r}, which the bundle's export of its network has not", reexport(path)
        )
    rebuilt = {}
    for name, content in expected.items():
        found = entries.get(name)
        if found is None and name != ".data/serialization_id":
            raise refused(path, f"it lacks {name!r}", reexport(path))
        if name == ".data/serialization_id":  # a number of its own, not taken from the file
            if found is not None and not re.fullmatch(rb"\d{1,64}", found):
                raise refused(path, f"its {name} is {found[:20]!r}, not a number")
            rebuilt[name] = content
            continue
        if name.startswith("data/sample_inputs/"):  # example inputs: random values, the same archive otherwise
            ours, theirs = zip_entries(content, "the fresh example inputs"), zip_entries(found, path)
            same = set(ours) == set(theirs) and all(
                len(theirs[n]) == len(v) if n.startswith("data/") else theirs[n] == v or n == ".data/serialization_id"
                for n, v in ours.items()
            )
            if not same:
                raise refused(path, f"its {name} is not the example inputs the bundle's export holds")
            rebuilt[name] = content  # the fresh ones: nothing of the file's is unpickled
            continue
        if name.startswith(("data/weights/weight_", "data/constants/tensor_")):
            if len(found) != len(content):
                raise refused(path, f"its {name} is {len(found):,} bytes, not its tensor's {len(content):,}")
            rebuilt[name] = found
            continue
        if len(found) > 4 * len(content) + (1 << 20):  # parsed JSON takes ~20x its text: bounded before parsing
            raise refused(path, f"its {name} is {len(found):,} bytes, the bundle's export's {len(content):,}")
        try:
            ours, theirs = json.loads(content), json.loads(found)
        except (ValueError, RecursionError):
            ours, theirs = content, found
        else:
            if name == "models/model.json":
                ours, theirs = without_metadata(ours), without_metadata(theirs)
        if ours != theirs:
            where = first_difference(theirs, ours) if isinstance(ours, (dict, list)) else None
            version = theirs.get("torch_version") if isinstance(theirs, dict) else None
            written = f", written by torch {version}" if version and version != torch.__version__ else ""
            detail = f" (it differs at {where[:100]}{written})" if where else ""
            raise refused(
                path,
                f"its {name} is not the bundle's program for the network described beside it{detail}",
                reexport(path),
            )
        rebuilt[name] = content
    calibration = None
    if f"extra/{CALIBRATION_ENTRY}" in entries:
        calibration = extra_json(entries[f"extra/{CALIBRATION_ENTRY}"], path, CALIBRATION_ENTRY)
        rebuilt[f"extra/{CALIBRATION_ENTRY}"] = calibration.encode()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.load(io.BytesIO(write_zip(rebuilt))).module()
    except Exception as e:
        raise BundleError(f"cannot load model file {path}: {type(e).__name__}: {e}", reexport(path)) from e
    return program, calibration


def torchscript_classes(entries: dict[str, bytes]) -> Counter:
    """The TorchScript classes of an archive's ``code/`` as a multiset of normalised texts: without type-name
    mangling, with each class's local names renumbered in order of appearance, attribute declarations sorted."""
    classes = Counter()
    for name, text in entries.items():
        if not (name.startswith("code/") and name.endswith(".py")):
            continue
        module, block = MANGLE.sub(b"", name.encode())[:-3], []

        def flush():
            if block:
                names: dict[bytes, bytes] = {}
                text = b"\n".join(l for l in block if not DECLARATION.match(l))
                text += b"\n" + b"\n".join(sorted(l for l in block if DECLARATION.match(l)))
                text = NUMBERED.sub(lambda m: names.setdefault(m.group(), m.group(1) + b"#%d" % len(names)), text)
                classes[(module, text)] += 1

        for line in MANGLE.sub(b"", text).split(b"\n"):
            if line and not line.startswith(b" "):
                flush()
                block = []
            if line.strip():
                block.append(line)
        flush()
    return classes


DEBUG_GLOBALS = {"torch.jit._pickle build_intlist"}  # all TorchScript's source-range pickles call
DEBUG_BANNED = {"INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "BUILD", "STACK_GLOBAL", "PERSID", "BINPERSID"}


def source_ranges_ok(data: bytes) -> bool:
    """Whether a ``.debug_pkl`` (TorchScript's source ranges) is what torch writes: a pickle of tuples, lists,
    numbers and strings, calling nothing but TorchScript's list builder."""
    import pickletools

    try:
        for op, arg, _ in pickletools.genops(data):  # stops at the first opcode torch does not write there
            if op.name in DEBUG_BANNED or op.name.startswith("EXT") or op.name == "GLOBAL" and arg not in DEBUG_GLOBALS:
                return False
    except Exception:
        return False
    return True


def load_ts(data: bytes, path: str, network: torch.nn.Module):
    """The TorchScript module of the archive ``data`` if it is TorchScript of ``network``: the fresh script's code
    and module pickle with the file's storages (``extra/`` files left unread)."""
    entries, expected = zip_entries(data, path), fresh("ts", network, (0, 0))
    if not any(name == "data.pkl" for name in entries):
        raise refused(path, "it is not a TorchScript archive", reexport(path))
    code = {n for n in entries if n.startswith("code/")}
    normalised = {MANGLE.sub(b"", n.encode()) for n in expected if n.startswith("code/")}
    unknown = sorted(
        n for n in entries
        if not n.startswith("extra/") and n not in expected and MANGLE.sub(b"", n.encode()) not in normalised
    )  # fmt: skip
    if unknown:
        raise refused(path, f"it holds {unknown[0]!r}, which the bundle's TorchScript has not", reexport(path))
    if torchscript_classes({n: entries[n] for n in code}) != torchscript_classes(expected):
        raise refused(
            path,
            "its code is not the TorchScript of the network described beside it (another model's?)",
            reexport(path),
        )
    for name in ("data.pkl", "constants.pkl", "version", "byteorder"):
        if name in expected and MANGLE.sub(b"", entries.get(name, b"")) != MANGLE.sub(b"", expected[name]):
            raise refused(path, f"its {name} is not the bundle's", reexport(path))
    ranges = [n for n in entries if n.endswith(".debug_pkl") and not source_ranges_ok(entries[n])]
    if ranges:  # source lines of the exporting machine: not read, but only as torch writes them
        raise refused(path, f"its {ranges[0]} is not TorchScript's source ranges")
    rebuilt = {}
    for name, content in expected.items():
        if re.fullmatch(r"(data|constants)/\d+", name):
            found = entries.get(name)
            if found is None or len(found) != len(content):
                raise refused(path, f"its storage {name} is not of its tensor's {len(content):,} bytes")
            rebuilt[name] = found
        else:
            rebuilt[name] = content
    try:
        return torch.jit.load(io.BytesIO(write_zip(rebuilt)), map_location="cpu"), None
    except Exception as e:
        raise BundleError(f"cannot load model file {path}: {type(e).__name__}: {e}", reexport(path)) from e


def onnx_initializer_bytes(tensor, path: str) -> bytes:
    """An initializer's values as raw little-endian bytes, checked to be inline and of its declared size."""
    import onnx
    from onnx import numpy_helper

    if tensor.data_location != onnx.TensorProto.DEFAULT or len(tensor.external_data):
        raise refused(path, f"its initializer {tensor.name!r} reads its values from another file")
    try:
        array = numpy_helper.to_array(tensor)
    except Exception as e:
        raise refused(path, f"its initializer {tensor.name!r} is not of its declared shape ({type(e).__name__})") from e
    if tuple(array.shape) != tuple(tensor.dims) or array.size != math.prod(tensor.dims):
        raise refused(path, f"its initializer {tensor.name!r} is not of its declared shape")
    return array.astype(array.dtype.newbyteorder("<")).tobytes()


def onnx_structure(model):
    """An ONNX model without what the rebuilt model does not take from the file: documentation, metadata and the
    initializers' values (their names, types, shapes and storage stay)."""
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph
    for proto in (copy, graph, *graph.initializer, *graph.node, *graph.input, *graph.output, *graph.value_info):
        proto.doc_string = ""
        proto.ClearField("metadata_props")
    for tensor in graph.initializer:
        for field in ("raw_data", *VALUE_FIELDS):
            tensor.ClearField(field)
    return copy


class OnnxModule(torch.nn.Module):
    """An ONNX model run by ONNX Runtime (from bytes, CPU) as the engines' ``nn.Module``."""

    def __init__(self, model_bytes: bytes):
        super().__init__()
        import onnxruntime

        self.session = onnxruntime.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input_name: x.detach().cpu().float().numpy()})[0]
        return torch.from_numpy(out).to(x.device)


def load_onnx(data: bytes, path: str, network: torch.nn.Module, image_size):
    """The ONNX model ``data`` run by ONNX Runtime if it is the bundle's export of ``network``: the fresh model with
    the file's initializer values; and the calibration JSON it carries, or None."""
    try:
        import onnx
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise BundleError(f"checking and running an .onnx model needs {e.name}.", "pip install onnx onnxruntime") from e
    expected = fresh("onnx", network, image_size)
    if len(data) > expected.ByteSize() + 2 * MAX_EXTRA_BYTES:  # parsing takes ~80x the bytes: bounded first
        raise refused(path, f"it is {len(data):,} bytes, the bundle's export {expected.ByteSize():,}")
    try:
        found = onnx.ModelProto.FromString(data)
    except Exception as e:
        raise refused(path, f"it is not an ONNX model ({type(e).__name__})") from e
    properties = {p.key: p.value for p in found.metadata_props}
    allowed = {p.key for p in expected.metadata_props} | {CALIBRATION_ENTRY}
    unknown = sorted(set(properties) - allowed)
    if unknown:
        raise refused(path, f"it has the property {unknown[0][:60]!r}, which the bundle's export has not")
    if onnx_structure(found) != onnx_structure(expected):
        raise refused(
            path,
            "its graph is not the bundle's program for the network described beside it (another model's?)",
            reexport(path),
        )
    rebuilt = onnx.ModelProto()
    rebuilt.CopyFrom(expected)
    values = {t.name: t for t in found.graph.initializer}
    for tensor in rebuilt.graph.initializer:
        raw = onnx_initializer_bytes(values[tensor.name], path)
        for field in VALUE_FIELDS:
            tensor.ClearField(field)
        tensor.raw_data = raw
    calibration = None
    if CALIBRATION_ENTRY in properties:
        calibration = extra_json(properties[CALIBRATION_ENTRY].encode(), path, CALIBRATION_ENTRY)
    try:
        return OnnxModule(rebuilt.SerializeToString()), calibration
    except Exception as e:
        raise BundleError(f"cannot load model file {path}: {type(e).__name__}: {e}", reexport(path)) from e
