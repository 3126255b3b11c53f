"""The trained model an evaluation or inference predicts with: its file, its description (classes, channels,
image size) read when the workflow is built, and its weights or program and calibration loaded in one step."""

from __future__ import annotations

import os

import torch

from .calibration import Calibration, calibration_for
from .checks import check_values
from .errors import BundleError
from .model_file import ExportedModel, ModelDescription, load_model


class TrainedModel:
    """The model file ``path``: its :class:`~scripts.model_file.ModelDescription` (beside it, else MedNIST's;
    checked when built), how many images a batch may hold (``batch_limit``), its ``network`` (for a ``.pt`` the
    untrained network it describes; for an export a stand-in module), and after :meth:`load`, the workflow step
    that reads the file, its weights (or program) on ``device`` and ``calibration``."""

    def __init__(self, path, device="cpu"):
        self.path, self.device = str(path), device
        self.description = ModelDescription.beside(self.path)
        self.classes = list(self.description.classes)
        self.exported = os.path.splitext(self.path)[1].lower() != ".pt"
        self.network = ExportedModel() if self.exported else self.description.network()  # moved by load()
        self.batch_limit = self.description.batch_limit(self.path, None if self.exported else self.network)
        self.calibration, self.loaded = Calibration(), False

    @property
    def explainable(self) -> torch.nn.Module | None:
        """The network whose layers Grad-CAM can read (None for an export)."""
        return None if self.exported else self.network

    def load(self) -> TrainedModel:
        """Read the model file once (refused unless written by this bundle for its description), then its
        calibration (carried inside an export, or beside the file, bound to these weights)."""
        if self.loaded:
            return self
        if self.exported:
            exported = load_model(self.path, self.device, description=self.description)
            self.network.set(exported.program, exported.calibration)
        else:
            load_model(self.path, self.device, network=self.network, description=self.description)
            self.network.to(self.device, memory_format=torch.channels_last).eval()  # faster convolutions
        self.calibration = calibration_for(self.path, self.network, self.description)
        self.loaded = True
        return self


def check_inference(model: TrainedModel, argv=None, **keys) -> dict:
    """The inference (or evaluation) keys (:func:`~scripts.checks.check_values`), refused where they disagree
    with the ``model``'s description (image size, channels) or name a Grad-CAM layer its network lacks."""
    values = check_values(argv, **keys)
    described = model.description
    for key, own in (("image_size", list(described.image_size)), ("in_channels", described.in_channels)):
        if key in values and values[key] != own:
            raise BundleError(
                f"--{key} {values[key]} differs from the model's {own} ({model.path} and its description).",
                f"drop --{key}: the model's description beside it sets it.",
            )
    layer = values.get("gradcam_layer")
    if layer and model.explainable is not None and layer not in dict(model.network.named_modules()):
        raise BundleError(
            f"--gradcam_layer {layer!r} is not a layer of the network.",
            f"pass a module name of the model's network, e.g. {model.description.gradcam_layer} (its own).",
        )
    return values
