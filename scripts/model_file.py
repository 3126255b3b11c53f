"""Model files: read into memory once (bounded), accepted only in the forms the bundle writes, loaded from exactly
the bytes checked; and the model's description that travels beside them.

- ``model.pt`` (and training checkpoints): ``torch.save``'s archive layout, entries stored as torch writes them,
  no more bytes declared than the network's weights need (a checkpoint: four times), then
  ``torch.load(weights_only=True)``; every key and shape must be the network's.
- ``.pt2``, ``.ts``, ``.onnx``: the bundle's own program for the network, with the file's weights
  (:mod:`scripts.programs`).
- ``network_data_format.json`` (classes, channels, image size; MONAI's metadata form) and ``network.json`` (the
  network as data, :mod:`scripts.networks`) beside a model file; without them, MedNIST's DenseNet121.
"""

from __future__ import annotations

import io
import json
import os
import re
import warnings
from dataclasses import astuple, dataclass

import torch

from . import networks, programs
from .checks import check_class_names
from .data import MEDNIST
from .errors import BundleError, first_line
from .files import atomic_write, read_json, read_limited
from .networks import NETWORK_FILE

SUFFIXES = (".pt", ".ts", ".pt2", ".onnx")
MAX_FILE_BYTES = programs.MAX_ARCHIVE_BYTES
FORMAT_FILE = "network_data_format.json"
DESCRIPTION_FILES = (FORMAT_FILE, NETWORK_FILE)  # what travels with a model file
MAX_FORMAT_BYTES = 1 << 20
INFERENCE_MEMORY = 2 << 30  # bytes of layer outputs a batch of inference may take (README: Reliability)
CHECKPOINT_ENTRY = re.compile(
    r"data\.pkl|\.format_version|\.storage_alignment|byteorder|version|\.data/version|\.data/serialization_id|data/\d+"
)
TRAIN_FIRST = "train first (it writes models/model.pt), or pass a model.pt saved by this bundle."


def network_data_format(classes, in_channels: int, image_size) -> dict:
    """The ``network_data_format`` of MONAI's ``metadata.json`` for a model of ``classes``, channels and size."""
    tensor = {"format": "magnitude", "dtype": "float32", "value_range": [0, 1], "is_patch_data": False}
    image = {"type": "image", "modality": "regular", "num_channels": in_channels, "spatial_shape": list(image_size)}
    image["channel_def"] = {"0": "image"} if in_channels == 1 else {"0": "R", "1": "G", "2": "B"}
    pred = {"type": "probabilities", "num_channels": len(classes), "spatial_shape": [len(classes)]}
    pred["channel_def"] = {str(i): name for i, name in enumerate(classes)}
    return {"inputs": {"image": {**tensor, **image}}, "outputs": {"pred": {**tensor, **pred, "format": "classes"}}}


@dataclass(frozen=True)
class ModelDescription:
    """What a model is: its class names (in label order), input channels, image size, network (``network_def`` as
    data) and the two layers the bundle reads in it; beside a model file as ``network_data_format.json`` and
    ``network.json``."""

    classes: tuple
    in_channels: int = 1
    image_size: tuple = (64, 64)
    network_def: dict | None = None
    feature_layer: str = "class_layers.out"
    gradcam_layer: str = "features.transition2.relu"

    def __post_init__(self):
        object.__setattr__(self, "classes", tuple(self.classes))
        object.__setattr__(self, "image_size", tuple(int(s) for s in self.image_size))
        if self.network_def is None:
            default = dict(_target_="monai.networks.nets.DenseNet121", spatial_dims=2, in_channels=self.in_channels)
            object.__setattr__(self, "network_def", {**default, "out_channels": len(self.classes)})

    @classmethod
    def trained(cls, classes, in_channels, image_size, network, recipe, gradcam_layer=None) -> ModelDescription:
        """The description of the model a training makes: ``network`` (network_def) as data (``recipe``, a
        :class:`~scripts.networks.NetworkRecipe`), rebuilt from that data to find its layers: a ``BundleError``,
        before training, for a network the bundle cannot describe, rebuild or read."""
        definition, size = recipe.definition(network), [int(s) for s in image_size]
        rebuilt = networks.build(definition, "network_def")
        found = networks.layers(rebuilt, int(in_channels), size, len(classes), gradcam_layer)
        described = cls(tuple(classes), int(in_channels), tuple(size), definition, **found)
        described.batch_limit("--image_size", rebuilt)  # a model inference could not hold is not trained
        return described

    def batch_limit(self, source: str = "the model", network: torch.nn.Module | None = None) -> int:
        """How many images inference runs at once within :data:`INFERENCE_MEMORY` (every layer's output counted),
        or a ``BundleError`` naming ``source`` if one image takes more: the size a model declares is bounded by
        what inference holds. ``network``: this description's network, if already built."""
        described = (self.network_def, self.in_channels, self.image_size, NETWORK_FILE)
        per_image = networks.activation_bytes(*described, built=network)
        if per_image > INFERENCE_MEMORY:
            network = self.network_def["_target_"].rpartition(".")[2]
            raise BundleError(
                f"{source} is a {network} of {list(self.image_size)} images, which takes {per_image / 2**30:.1f} "
                f"GiB for one, over the {INFERENCE_MEMORY >> 30} GiB inference holds.",
                "train it on smaller images (--image_size), or use a model of this bundle trained so.",
            )
        return max(1, INFERENCE_MEMORY // per_image)

    def network(self, device="cpu") -> torch.nn.Module:
        """The untrained network of ``network_def``, on ``device``, in eval mode."""
        return networks.build(self.network_def, NETWORK_FILE, device)

    def write(self, folder: str) -> None:
        """``network.json``, then ``network_data_format.json``, in ``folder`` (atomically)."""
        network = {"network_def": self.network_def, "feature_layer": self.feature_layer}
        network["gradcam_layer"] = self.gradcam_layer
        described = network_data_format(self.classes, self.in_channels, self.image_size)
        for name, content in ((NETWORK_FILE, network), (FORMAT_FILE, described)):
            atomic_write(os.path.join(folder, name), lambda f, content=content: json.dump(content, f, indent=4))

    @classmethod
    def from_json(cls, described, source: str, network: dict | None = None) -> ModelDescription:
        """The description in a ``network_data_format`` (and a ``network.json``'s content), checked: 2+ class
        names, 1 or 3 channels, two integer sizes in [32, 4096]."""
        try:
            image, pred = described["inputs"]["image"], described["outputs"]["pred"]
            channels, size = image["num_channels"], list(image["spatial_shape"])
            names = [pred["channel_def"][str(i)] for i in range(len(pred["channel_def"]))]
        except (KeyError, TypeError, AttributeError) as e:
            raise BundleError(
                f"{source} is not a network_data_format the bundle writes (it lacks {e}).",
                "train the model with this bundle, or delete the file to use MedNIST's.",
            ) from e
        names = check_class_names(names, source)
        if type(channels) is not int or channels not in (1, 3):
            raise BundleError(f"{source} gives {channels!r} input channels.", "a model of this bundle has 1 or 3.")
        if len(size) != 2 or not all(type(s) is int and 32 <= s <= 4096 for s in size):
            raise BundleError(
                f"{source} gives the image size {size!r}.", "a model of this bundle has two integers in [32, 4096]."
            )
        layers = {k: network[k] for k in ("network_def", "feature_layer", "gradcam_layer")} if network else {}
        return cls(tuple(names), channels, tuple(size), **layers)

    @classmethod
    def beside(cls, model_path: str | None) -> ModelDescription:
        """The description beside ``model_path`` (without ``network.json``: DenseNet121), else MedNIST's."""
        folder = os.path.dirname(os.path.abspath(str(model_path or ".")))
        path, network = os.path.join(folder, FORMAT_FILE), os.path.join(folder, NETWORK_FILE)
        if not model_path or not os.path.lexists(path):  # a device or a link there is refused, not ignored
            return cls(MEDNIST)
        described = read_json(path, "the model's description", "train again, or delete it.", MAX_FORMAT_BYTES)
        return cls.from_json(described, path, networks.read_network(network) if os.path.lexists(network) else None)

    def describes(self, other: ModelDescription) -> str:
        """What differs between two descriptions, in words, or ``""``."""
        problems = []
        if self.classes != other.classes:
            problems.append(f"classes {', '.join(self.classes)} against {', '.join(other.classes)}")
        if self.in_channels != other.in_channels:
            problems.append(f"{self.in_channels} against {other.in_channels} input channels")
        if tuple(self.image_size) != tuple(other.image_size):
            problems.append(f"size {list(self.image_size)} against {list(other.image_size)}")
        if self.network_def != other.network_def:
            problems.append(f"network {self.network_def} against {other.network_def}")
        return "; ".join(problems)


def model_metadata(metadata: dict, description: ModelDescription) -> dict:
    """The bundle's ``metadata`` (configs/metadata.json's content) describing ``description``'s model: its
    network_data_format and, for another model than MedNIST's DenseNet121, its task, network and inputs in words."""
    metadata = {**metadata, "network_data_format": network_data_format(*astuple(description)[:3])}
    if description != ModelDescription(MEDNIST):
        names, size = ", ".join(description.classes), "x".join(str(s) for s in description.image_size)
        colour = "three channels (RGB)" if description.in_channels == 3 else "one channel (gray)"
        network = description.network_def["_target_"].rpartition(".")[2]
        metadata.update(
            task=f"Classification of 2D images into {len(description.classes)} classes ({names})",
            description=f"A {network} trained with this bundle that classifies {size} images as {names}.",
            image_classes=f"{colour} image, intensity scaled to [0, 1], {size} pixels",
            label_classes=", ".join(f"{i}: {name}" for i, name in enumerate(description.classes)),
            pred_classes=f"{len(description.classes)} class probabilities in the order of label_classes",
        )
        if description.classes != MEDNIST:
            metadata["data_source"] = "the images this model was trained on (not MedNIST)"
    return metadata


def read_model_file(path: str, limit: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of ``path`` (its size checked before it is read), read once, or a ``BundleError`` naming what is
    wrong with it."""
    suffix = os.path.splitext(str(path))[1].lower()
    if suffix not in SUFFIXES:
        raise BundleError(f"model file {path} is not a .pt, .ts, .pt2 or .onnx file.", "pass a model of this bundle.")
    if not os.path.exists(path):
        raise BundleError(
            f"model file {path} does not exist.",
            "train first (it writes models/model.pt), export one (see README), or fix the path.",
        )
    try:
        return read_limited(str(path), limit)
    except OSError as e:
        raise BundleError(f"model file {path} cannot be read ({e.strerror or e}).", programs.TRUSTED) from e
    except ValueError as e:
        raise BundleError(f"model file {path} {e}.", programs.TRUSTED) from e


# the operations of torch.save's state-dict and checkpoint pickles (protocol 2)
PICKLE_OPS = frozenset(
    "PROTO GLOBAL BINPUT LONG_BINPUT MEMOIZE BINGET LONG_BINGET EMPTY_TUPLE TUPLE TUPLE1 TUPLE2 TUPLE3 MARK REDUCE "
    "BINUNICODE SHORT_BINUNICODE BININT BININT1 BININT2 LONG1 BINFLOAT NEWFALSE NEWTRUE NONE BINPERSID EMPTY_DICT "
    "SETITEM SETITEMS EMPTY_LIST APPEND APPENDS BUILD STOP".split()
)


def weights_bytes(network: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in network.state_dict().values())


def check_checkpoint_archive(data: bytes, path: str, budget: int) -> None:
    """Refuse, before ``torch.load`` reads it, a ``model.pt`` or checkpoint not in the layout ``torch.save`` writes
    (entries stored, not compressed) or declaring more than ``budget`` bytes."""
    import zipfile

    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = archive.infolist()
    except (zipfile.BadZipFile, ValueError, EOFError) as e:
        raise BundleError(f"checkpoint {path} cannot be read (not a torch.save archive: {e}).", TRAIN_FIRST) from e
    declared = sum(info.file_size for info in infos)
    problem = f"{declared:,} bytes declared, more than its network's weights need" if declared > budget else None
    if not data.startswith(b"PK\x03\x04") or min((i.header_offset for i in infos), default=1) != 0:
        problem = "bytes before its zip archive (torch would read them, not the archive)"
    for info in infos if problem is None else ():
        top, _, name = info.filename.partition("/")
        if not CHECKPOINT_ENTRY.fullmatch(name) or not re.fullmatch(r"[\w.=-]{1,200}", top):
            problem = f"an unexpected entry {info.filename[:80]!r}"
        elif info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 1:
            problem = f"a compressed entry {info.filename!r} (torch.save stores them)"
        if problem:
            break
    pickles = [info for info in infos if info.filename.endswith("/data.pkl")] if problem is None else []
    if problem is None and len(pickles) != 1:
        problem = f"{len(pickles)} data.pkl entries, not one"
    problem = problem or pickle_problem(archive.read(pickles[0]))
    if problem:
        raise BundleError(f"refused to load {path}: it holds {problem}.", TRAIN_FIRST)


def pickle_problem(pickled: bytes) -> str | None:
    """What, in a state dict's pickle, ``torch.save`` never writes: an operation outside :data:`PICKLE_OPS`, or a
    tuple taken again from the memo (hashing a key of such tuples nested n deep costs 2**n), else None."""
    import pickletools

    memo, built = {}, None
    try:
        for op, arg, _ in pickletools.genops(pickled):
            if op.name not in PICKLE_OPS:
                return f"a pickle operation {op.name} that torch.save does not write"
            if op.name in ("BINPUT", "LONG_BINPUT", "MEMOIZE"):
                memo[len(memo) if op.name == "MEMOIZE" else arg] = built
            elif op.name in ("BINGET", "LONG_BINGET") and memo.get(arg) == "tuple":
                return "a pickled tuple used twice (torch.save writes each once)"
            built = "tuple" if op.name.startswith("TUPLE") else op.name
    except ValueError as e:
        return f"a corrupt pickle ({e})"
    return None


def unpickled(data: bytes, path: str, budget: int):
    """``torch.load(weights_only=True)`` of ``data`` once it has ``torch.save``'s layout within ``budget`` bytes."""
    check_checkpoint_archive(data, path, budget)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise BundleError(f"checkpoint {path} cannot be read ({first_line(e, 10**6)}).", TRAIN_FIRST) from e


def read_checkpoint(path: str, weights: int) -> dict:
    """A training checkpoint (``checkpoint_epoch=N.pt``) of a network of ``weights`` bytes, read as a model.pt is:
    at most four times those bytes (the weights and Adam's two moments), ``torch.save``'s layout and pickle."""
    budget = 4 * weights + (4 << 20)
    state = unpickled(read_model_file(path, budget), path, budget)
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise BundleError(f"checkpoint {path} is not a training checkpoint of this bundle.", TRAIN_FIRST)
    return state


def load_weights(data: bytes, network: torch.nn.Module, path: str) -> None:
    """Load the state dict ``data`` (a ``model.pt``, or a training checkpoint's ``model``) into ``network``, every
    key and shape the network's."""
    state = unpickled(data, path, weights_bytes(network) + (4 << 20))
    expected = network.state_dict()
    if not isinstance(state, dict) or set(state) != set(expected):
        raise BundleError(f"checkpoint {path} does not hold the weights of this bundle's network.", TRAIN_FIRST)
    bad = [k for k, v in state.items() if getattr(v, "shape", None) != expected[k].shape]
    if bad:
        problem = f"checkpoint {path} has weights of another shape than its description's network, e.g. {bad[0]}"
        raise BundleError(
            f"{problem} ({tuple(state[bad[0]].shape)}, not {tuple(expected[bad[0]].shape)}).",
            f"keep the {FORMAT_FILE} written with it beside it, or {TRAIN_FIRST}",
        )
    network.load_state_dict(state)


class ExportedModel(torch.nn.Module):
    """An exported program (a ``torch.export`` graph module, TorchScript or ONNX Runtime) as a plain ``nn.Module``
    (a ``torch.export`` module refuses ``.eval()``), its weights as ``state_dict``, and the calibration JSON it
    carries (or None). The program is not a child: ``eval()``/``train()`` do not reach it."""

    def __init__(self, program=None, calibration: str | None = None):
        super().__init__()
        self.set(program, calibration)

    def set(self, program, calibration: str | None = None) -> None:
        object.__setattr__(self, "program", program)
        self.calibration = calibration

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.program is None:
            raise RuntimeError("the exported model is not loaded yet (its workflow step loads it)")
        return self.program(x)

    def state_dict(self, *args, **kwargs):
        state_dict = getattr(self.program, "state_dict", None)
        return state_dict(*args, **kwargs) if callable(state_dict) else {}


def load_model(path: str, device="cpu", network: torch.nn.Module | None = None, description=None) -> torch.nn.Module:
    """The model of the file ``path`` on ``device``, in eval mode: ``network`` (by default the bundle's network for
    the model's description) with a ``.pt``'s weights, or an :class:`ExportedModel` of an export's program; a
    ``BundleError`` naming the file if it is missing or not written by this bundle for that network."""
    path, device = str(path), torch.device(device)
    description = description or ModelDescription.beside(path)
    data = read_model_file(path)
    suffix = os.path.splitext(path)[1].lower()
    network = network if network is not None else description.network()
    if suffix == ".pt":
        load_weights(data, network, path)
        return network.to(device).eval()
    if suffix == ".onnx":
        return ExportedModel(*programs.load_onnx(data, path, network, description.image_size))
    if suffix == ".pt2":
        program, calibration = programs.load_pt2(data, path, network, description.image_size)
    else:
        program, calibration = programs.load_ts(data, path, network)
    return ExportedModel(program.to(device), calibration)
