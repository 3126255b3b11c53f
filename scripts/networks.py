"""The network as data: ``network.json`` beside a model holds its definition (a classifier of MONAI's networks and
plain JSON arguments) and the two layers the bundle reads in it (the classifier's input, for the out-of-distribution
features, and a Grad-CAM layer). Training records the definition while ``network_def`` is built; every later
command rebuilds the network from that file alone, never evaluating anything in it."""

from __future__ import annotations

import copy
import inspect
import json
import logging

import monai.networks.nets as nets
import torch
from torch.nn.modules.module import register_module_module_registration_hook

from .errors import BundleError, first_line
from .files import read_json

logger = logging.getLogger(__name__)
NETWORK_FILE = "network.json"
# MONAI's 2D classifiers (N x C x H x W to N x classes logits) a definition may name: the README's list
CLASSIFIERS = (
    "DenseNet DenseNet121 DenseNet169 DenseNet201 DenseNet264 ResNet resnet10 resnet18 resnet34 resnet50 resnet101 "
    "resnet152 resnet200 SENet SENet154 SEResNet50 SEResNet101 SEResNet152 SEResNext50 SEResNext101 EfficientNetBN"
).split()
MAX_WEIGHT_BYTES = 1 << 30  # what a definition may build: far above any listed classifier for a few classes
ACTIVATIONS = ("torch.nn.modules.activation", "monai.networks.blocks.activation")
CLASSIFIER_LIST = "a classifier of monai.networks.nets listed in the README (" + ", ".join(CLASSIFIERS[:4]) + ", ...)"


def classifier(target) -> object:
    """The MONAI classifier a ``_target_`` names (``DenseNet121`` or ``monai.networks.nets.DenseNet121``), or a
    ``BundleError``."""
    name = target.removeprefix("monai.networks.nets.") if isinstance(target, str) else None
    if name not in CLASSIFIERS:
        raise BundleError(f"network_def's _target_ {str(target)[:80]!r} is not {CLASSIFIER_LIST}.",
                          "name one of them in network_def (README: Use another network).")  # fmt: skip
    return getattr(nets, name)


def plain(value, where: str):
    """``value`` as JSON data (tuples as lists), or a ``BundleError`` naming ``where``."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [plain(v, where) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: plain(v, where) for k, v in value.items()}
    raise BundleError(f"{where} is {type(value).__name__}, not JSON data.", "give network_def plain JSON arguments.")


LISTENING: list = []  # the recipes of this process listening for their target's calls
HOOKED: list = []  # torch's module-registration hook, once a process


def registered(module, name, submodule) -> None:
    """torch's module-registration hook: the arguments of each call in progress of a listened-for target."""
    codes = {recipe.code for recipe in LISTENING}
    frame = inspect.currentframe() if codes else None
    while frame is not None:
        if frame.f_code in codes:
            info = inspect.getargvalues(frame)
            arguments = {n: info.locals[n] for n in info.args if n != "self"}
            arguments.update(info.locals[info.keywords] if info.keywords else {})
            for recipe in LISTENING:
                if recipe.code is frame.f_code and not same(recipe.calls, arguments):
                    recipe.calls = [*recipe.calls[-7:], arguments]
        frame = frame.f_back


def same(calls: list, arguments: dict) -> bool:
    """Whether ``arguments`` are those of the last call (each registration in a call reports it again)."""
    try:
        return bool(calls) and calls[-1] == arguments
    except (RuntimeError, ValueError, TypeError):  # tensors compare element-wise
        return False


class NetworkRecipe:
    """How ``network_def`` is built, as data: made by the workflow's ``initialize``, it has torch's
    module-registration hook keep the arguments of each call of ``target`` (network_def's ``_target_``) while a
    network is built (MONAI hands a component its built object, not its arguments); :meth:`definition` returns
    the call's that rebuilds the trained network, those equal to the defaults left out."""

    def __init__(self, target):
        self.target, self.code, self.calls = target, None, []
        name = str(target).removeprefix("monai.networks.nets.")
        if name in CLASSIFIERS:  # else definition() refuses it
            built = getattr(nets, name)
            self.code = (built.__init__ if inspect.isclass(built) else built).__code__
            LISTENING.append(self)
            if not HOOKED:
                HOOKED.append(register_module_module_registration_hook(registered))

    def definition(self, network: torch.nn.Module) -> dict:
        """network_def as data: ``{"_target_": "monai.networks.nets.X", **arguments}``; a ``BundleError`` if the
        target is not a listed classifier, an argument is not JSON, or no call's data rebuilds ``network``."""
        built = classifier(self.target)
        defaults = {k: p.default for k, p in inspect.signature(built).parameters.items()}
        for arguments in reversed(self.calls):
            args = {k: plain(v, f"network_def's argument {k}") for k, v in arguments.items() if v != defaults.get(k)}
            definition = {"_target_": f"monai.networks.nets.{built.__name__}", **args}
            if repr(build(definition, "network_def")) == repr(network):
                return definition
        raise BundleError(
            "network_def's arguments, as data, do not rebuild the network built (or it was built before the "
            "workflow's initialize step).",
            "give network_def plain JSON arguments, and run it as `python -m monai.bundle run` or MONAI's "
            "ConfigWorkflow do.",
        )


def size_of(definition: dict, source: str = "network_def") -> int:
    """How many bytes of weights the network of ``definition`` has, counted on torch's meta device (nothing is
    allocated)."""
    return sum(t.numel() * t.element_size() for t in meta_state(definition, source).values())


META_STATES: dict[str, dict] = {}  # this process's meta state dicts, by definition (JSON)


def meta_state(definition: dict, source: str) -> dict:
    """The state dict of the network of ``definition``, built on torch's meta device (once a process for each
    definition): shapes, no memory."""
    target, args = checked(definition, source)
    key = json.dumps([target.__module__, target.__qualname__, args], sort_keys=True)
    if key in META_STATES:
        return META_STATES[key]
    try:
        with torch.device("meta"):
            META_STATES[key] = target(**args).state_dict()
            return META_STATES[key]
    except Exception as e:  # the data drives a constructor: whatever it raises is the data's fault
        raise BundleError(f"{source}'s network_def does not build ({first_line(e)}).",
                          "give it arguments its _target_ takes (see MONAI's documentation).") from e  # fmt: skip


def activation_bytes(definition: dict, in_channels: int, image_size, source: str = "network_def", built=None) -> int:
    """An upper bound of the memory one image's forward pass takes: the bytes of every layer's output, counted on
    torch's meta device (nothing is computed or allocated), on a meta copy of ``built`` (the network of
    ``definition`` already built: faster than building it under the meta device)."""
    target, args = checked(definition, source)
    total = []
    try:
        with torch.device("meta"), torch.no_grad():
            network = (copy.deepcopy(built).to("meta") if built is not None else target(**args)).eval()
            for module in network.modules():
                if not any(module.children()):
                    module.register_forward_hook(lambda m, i, o: total.append(o.nbytes if torch.is_tensor(o) else 0))
            network(torch.zeros(1, int(in_channels), *[int(s) for s in image_size]))
    except Exception as e:  # the data drives a constructor and a forward pass: the data's fault
        raise BundleError(f"{source}'s network does not run on {list(image_size)} images ({type(e).__name__}).",
                          "train the model with this bundle.") from e  # fmt: skip
    return sum(total)


def checked(definition, source: str) -> tuple:
    """The classifier and arguments of ``definition``: a listed target, JSON arguments, ``pretrained`` false."""
    if not isinstance(definition, dict):
        raise BundleError(f"{source}'s network_def is not a JSON object.", "train the model with this bundle.")
    target = classifier(definition.get("_target_"))
    args = {k: plain(v, f"{source}'s argument {k}") for k, v in definition.items() if k != "_target_"}
    if "pretrained" in inspect.signature(target).parameters:
        args["pretrained"] = False  # the weights come from the model file: nothing is downloaded
    return target, args


def build(definition: dict, source: str, device="cpu") -> torch.nn.Module:
    """The network of ``definition`` (untrained, eval mode): its target among :data:`CLASSIFIERS`, its arguments
    JSON, no download (``pretrained`` false: the weights come from the model file) and at most
    :data:`MAX_WEIGHT_BYTES` of weights, counted on torch's meta device before any is allocated."""
    size = size_of(definition, source)
    if size > MAX_WEIGHT_BYTES:
        raise BundleError(f"{source}'s network_def has {size:,} bytes of weights, over {MAX_WEIGHT_BYTES:,}.",
                          "train a smaller network with this bundle.")  # fmt: skip
    target, args = checked(definition, source)
    try:
        network = target(**args)
    except Exception as e:  # the data drives a constructor: whatever it raises is the data's fault
        raise BundleError(f"{source}'s network_def does not build ({first_line(e)}).",
                          "give it arguments its _target_ takes (see MONAI's documentation).") from e  # fmt: skip
    return network.to(device).eval()


def layers(network: torch.nn.Module, in_channels: int, image_size, classes: int, gradcam_layer=None) -> dict:
    """The layers the bundle reads, found by one forward pass of zeros: ``feature_layer``, the last ``Linear`` (its
    input is the out-of-distribution features), and ``gradcam_layer`` (given, or the last activation or block run
    once with a map of at least 1/8 of the image's side: deep, yet finer than the last convolution's); a
    ``BundleError`` if the network does not give ``classes`` logits or either layer cannot be found."""
    modules, seen, handles = dict(network.named_modules()), {}, []
    for name, module in modules.items():
        if name:
            hook = lambda m, i, o, name=name: seen.setdefault(name, []).append((m, i, o))  # noqa: E731
            handles.append(module.register_forward_hook(hook))
    size = [int(s) for s in image_size]
    try:
        with torch.no_grad():
            logits = network.eval()(torch.zeros(2, int(in_channels), *size, device=next(network.parameters()).device))
    finally:
        for handle in handles:
            handle.remove()
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (2, classes):
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise BundleError(f"network_def gives {shape} for 2 images, not 2 x {classes} logits.",
                          "use a classifier whose output is one logit a class.")  # fmt: skip
    once = [(n, calls[0]) for n, calls in seen.items() if len(calls) == 1]
    linear = [n for n, (m, i, o) in once if isinstance(m, torch.nn.Linear) and i[0].dim() == 2]
    if not linear:
        raise BundleError("network_def has no Linear layer run once on pooled features.", f"use {CLASSIFIER_LIST}.")
    maps = [(n, m) for n, (m, i, o) in once if isinstance(o, torch.Tensor) and o.dim() == 4]
    large = [(n, m) for n, m in maps if all(8 * o >= s for o, s in zip(seen[n][0][2].shape[2:], size))]
    if gradcam_layer:
        if gradcam_layer not in dict(maps):
            raise BundleError(f"--gradcam_layer {gradcam_layer!r} is not a layer of the network run once on maps.",
                              "pass one of network_def's module names, or leave it out to have one found.")  # fmt: skip
        found = gradcam_layer
    else:
        found = ([n for n, m in large if type(m).__module__ in ACTIVATIONS or any(m.children())] or [None])[-1]
        if found is None:
            raise BundleError("network_def has no layer with maps for Grad-CAM.", "pass --gradcam_layer NAME.")
    return {"feature_layer": linear[-1], "gradcam_layer": found}


def read_network(path: str) -> dict:
    """The ``network.json`` at ``path`` as data: a network_def and two layer names, or a ``BundleError``."""
    saved = read_json(path, "the model's network", "train again, or delete it.", 1 << 16)
    layers = [saved.get(k) for k in ("feature_layer", "gradcam_layer")] if isinstance(saved, dict) else [None]
    if not all(isinstance(name, str) and len(name) < 1000 for name in layers):
        raise BundleError(f"{path} is not a network description this bundle writes.", "train again, or delete it.")
    return saved
