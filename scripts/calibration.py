"""Calibrated confidence and the out-of-distribution score, fitted after training and kept with the model.

Temperature scaling (Guo et al., 2017) divides the logits by the ``T`` that minimises the validation negative
log-likelihood. The out-of-distribution score is the Mahalanobis distance (Lee et al., 2018) of an image's features
(the input of the network's classifier layer) to the nearest class mean, with the training images' within-class covariance
shrunk as Ledoit and Wolf (2004) do; without features (an export), the energy ``-T * logsumexp(logits / T)``
(Liu et al., 2020). Thresholds: the validation scores' 97th percentile, so about 3% of unseen MedNIST is flagged.
``calibration.json`` and ``calibration.npz`` (no pickle) sit beside ``model.pt``, bound to its weights' hash;
exports carry the JSON part inside them.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import re
import zipfile

import numpy as np
import torch
from monai.metrics import calibration_binning

from .errors import BundleError
from .files import atomic_write, is_main_process, read_json, read_limited
from .model_file import load_model
from .outputs import Outputs
from .progress import progress_bar

logger = logging.getLogger(__name__)
UNFLAGGED = 0.97  # share of validation images below the out-of-distribution thresholds
STATISTICS_IMAGES = 6000  # training images, stratified, that make the class means and covariance
TEMPERATURES = (0.01, 100.0)  # what a fitted temperature can be: beyond, softmax is all or nothing, or flat
REFIT = "fit it again: run calibrating (README: Commands), or delete it."


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature minimising the negative log-likelihood of ``labels`` under ``softmax(logits / T)``; 1, with a
    warning, when every image is right (the likelihood then only grows as T shrinks: no finite optimum); within
    :data:`TEMPERATURES` (the bound, with a warning, for a model wrong on most images)."""
    logits, labels = logits.double(), labels.long()
    if len(labels) and bool((logits.argmax(1) == labels).all()):
        logger.warning(
            f"all {len(labels)} validation images are classified correctly: no temperature can be fitted from "
            "them (any T < 1 only sharpens); keeping T = 1"
        )
        return 1.0
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    fitted = float(log_t.detach().exp())
    if not TEMPERATURES[0] <= fitted <= TEMPERATURES[1]:  # a model wrong on most images: softmax flat or certain
        logger.warning(f"the fitted temperature {fitted:.3g} is outside {list(TEMPERATURES)}: kept at the bound")
        fitted = min(max(fitted, TEMPERATURES[0]), TEMPERATURES[1])
    return fitted


def energy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Energy score of each row of ``logits``: higher means less like the training data."""
    return -temperature * torch.logsumexp(logits.double() / temperature, dim=1)


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """ECE: the gap between confidence and accuracy over ``bins`` equal-width confidence bins (MONAI's
    ``calibration_binning`` of the top label's confidence against its correctness)."""
    confidence, predicted = probs.double().max(1)
    correct = (predicted == labels).double()
    mean_p, mean_correct, counts = calibration_binning(confidence[None, None], correct[None, None], bins, right=True)
    return float(torch.nansum(counts * (mean_p - mean_correct).abs()) / counts.sum())


def calibration_figures(logits: torch.Tensor, labels: torch.Tensor, calibration: Calibration) -> dict:
    """The temperature, and the expected calibration error and negative log-likelihood of ``labels`` before and
    after calibration."""
    probs = {"uncalibrated": torch.softmax(logits.float(), 1), "calibrated": calibration.probabilities(logits)}
    return {
        "temperature": calibration.temperature,
        "ece": {name: expected_calibration_error(p, labels) for name, p in probs.items()},
        "nll": {
            name: float(torch.nn.functional.nll_loss(p.double().clamp_min(1e-12).log(), labels.long()))
            for name, p in probs.items()
        },
    }


def ledoit_wolf(centred: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The Ledoit-Wolf covariance of the rows of ``centred`` (zero mean): the sample covariance shrunk towards
    ``mu * I`` by the shrinkage that minimises the expected squared error, and that shrinkage."""
    x = centred.double()
    n, p = x.shape
    sample = x.T @ x / n
    mu = float(torch.trace(sample)) / p
    delta = float(((sample - mu * torch.eye(p, dtype=x.dtype)) ** 2).sum()) / p
    squares = x**2
    beta = float((squares.T @ squares).sum() / n - (sample**2).sum()) / (p * n)
    shrinkage = 0.0 if delta == 0 else min(beta, delta) / delta
    return (1 - shrinkage) * sample + shrinkage * mu * torch.eye(p, dtype=x.dtype), shrinkage


def mahalanobis(features: torch.Tensor, means: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """Squared Mahalanobis distance of each row of ``features`` to the nearest of ``means`` (one shared
    ``precision`` matrix): (x - m)' P (x - m) = x'Px - 2 m'Px + m'Pm, so one product by P per image for all means."""
    x, m, p = features.double(), means.double(), precision.double()
    px = x @ p
    return ((px * x).sum(1, keepdim=True) - 2 * px @ m.T + ((m @ p) * m).sum(1)).min(1).values


def weights_sha256(network: torch.nn.Module) -> str:
    """A hash of ``network``'s state dict (names, shapes, values): the same for a model.pt and its exports."""
    digest = hashlib.sha256()
    for name, tensor in sorted(network.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class Calibration:
    """A temperature and out-of-distribution statistics fitted for ``weights``; unfitted: T = 1, no threshold."""

    def __init__(self, temperature=1.0, energy_threshold=None, weights="", counts=None, feature_layer=""):
        self.temperature, self.energy_threshold = float(temperature), energy_threshold
        self.weights, self.counts, self.feature_layer = weights, dict(counts or {}), feature_layer
        self.means = self.precision = self.feature_threshold = None

    @property
    def fitted(self) -> bool:
        return self.energy_threshold is not None

    @classmethod
    def fit(cls, validation: dict, statistics: dict | None, weights: str, feature_layer: str = "") -> Calibration:
        """The temperature and thresholds from ``validation``, the class statistics from ``statistics`` (training
        images), each ``Outputs.gathered()``."""
        logits, labels = validation["logits"], validation["labels"]
        temperature = fit_temperature(logits, labels)
        threshold = float(np.quantile(energy(logits, temperature).numpy(), UNFLAGGED))
        counts = {"threshold_images": len(labels)}
        calibration = cls(temperature, threshold, weights, counts, feature_layer)
        if statistics is not None and statistics["features"] is not None and validation["features"] is not None:
            features, classes = statistics["features"].double(), statistics["labels"].long()
            present = sorted(set(classes.tolist()))
            means = torch.stack([features[classes == c].mean(0) for c in present])
            centred = torch.cat([features[classes == c] - means[i] for i, c in enumerate(present)])
            covariance, shrinkage = ledoit_wolf(centred)
            calibration.means, calibration.precision = means, torch.linalg.inv(covariance)
            scores = mahalanobis(validation["features"], calibration.means, calibration.precision)
            calibration.feature_threshold = float(np.quantile(scores.numpy(), UNFLAGGED))
            calibration.counts.update(statistics_images=len(classes), shrinkage=round(shrinkage, 4))
        return calibration

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits.float() / self.temperature, dim=1)

    def ood_score(self, logits: torch.Tensor, features: torch.Tensor | None = None):
        """The out-of-distribution score of each image, its threshold (None when not fitted) and its kind:
        ``mahalanobis`` with features, else ``energy``."""
        if features is not None and self.means is not None:
            return mahalanobis(features, self.means, self.precision), self.feature_threshold, "mahalanobis"
        return energy(logits, self.temperature), self.energy_threshold, "energy"

    def to_json(self) -> dict:
        return {
            "temperature": self.temperature,
            "energy_threshold": self.energy_threshold,
            "feature_threshold": self.feature_threshold,
            "feature_layer": self.feature_layer,
            "unflagged_validation_share": UNFLAGGED,
            "weights_sha256": self.weights,
            **self.counts,
        }

    @classmethod
    def from_json(cls, saved: dict, source: str) -> Calibration:
        """The calibration in ``saved``, each value checked for sense: a finite temperature in
        :data:`TEMPERATURES`, finite thresholds (or none), the weights' SHA-256."""

        def finite(key):
            value = saved.get(key)
            if value is None:
                return None
            try:  # an integer of 400 digits overflows a float
                ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
            except OverflowError:
                ok = False
            if not ok:
                raise ValueError(f"{key} {repr(value)[:40]} is not a finite number")
            return float(value)

        try:
            if not isinstance(saved, dict) or not re.fullmatch(r"[0-9a-f]{64}|", str(saved.get("weights_sha256"))):
                raise ValueError("it names no weights_sha256")
            temperature = finite("temperature")
            if temperature is None or not TEMPERATURES[0] <= temperature <= TEMPERATURES[1]:
                raise ValueError(f"temperature {repr(saved.get('temperature'))[:40]} is not in {list(TEMPERATURES)}")
            threshold, features = finite("energy_threshold"), finite("feature_threshold")
            counts = {k: finite(k) for k in saved if k.endswith("_images") or k == "shrinkage"}
        except ValueError as e:
            raise BundleError(f"{source} is not a calibration this bundle wrote ({e}).", REFIT) from e
        calibration = cls(temperature, threshold, saved["weights_sha256"], counts)
        calibration.feature_threshold = features
        return calibration

    def save(self, path: str) -> None:
        """The arrays first, then the JSON naming their SHA-256: a kill between the two leaves arrays that the old
        JSON refuses, never other arrays taken for its own."""
        saved = self.to_json()
        if self.means is not None:
            arrays = io.BytesIO()
            np.savez(arrays, means=self.means.float().numpy(), precision=self.precision.float().numpy())
            saved["arrays_sha256"] = hashlib.sha256(arrays.getvalue()).hexdigest()
            atomic_write(arrays_path(path), lambda f: f.write(arrays.getvalue()), mode="wb")
        atomic_write(path, lambda f: json.dump(saved, f, indent=1))

    @classmethod
    def load(cls, path: str, classes: int, features: int | None) -> Calibration:
        """The calibration saved at ``path`` and its arrays beside it (``classes`` x ``features`` means, a
        ``features``-square precision matrix; not read for a network without features), or a ``BundleError``
        naming the file."""
        saved = read_json(path, "calibration", REFIT)
        calibration = cls.from_json(saved, path)
        arrays = arrays_path(path)
        if calibration.feature_threshold is None or features is None:
            return calibration
        if not os.path.lexists(arrays):
            logger.warning(f"no {arrays} beside {path}: ood_score is the energy (copy it with calibration.json)")
            calibration.feature_threshold = None
            return calibration
        expected = {"means": (classes, features), "precision": (features, features)}
        try:
            data = read_limited(arrays, sum(4 * math.prod(s) for s in expected.values()) + (1 << 16))
            if "arrays_sha256" not in saved:  # written before calibration.json named them: kept working
                logger.warning(f"{path} names no SHA-256 of {arrays}: fit the calibration again to bind them")
            elif hashlib.sha256(data).hexdigest() != str(saved["arrays_sha256"]):
                raise ValueError(f"its SHA-256 is not the one {os.path.basename(path)} names")
            loaded = npz_arrays(data, expected)
        except (OSError, ValueError) as e:
            raise BundleError(
                f"{arrays} cannot be used with {path}: {e}.",
                f"delete both files, or {REFIT}",
            ) from e
        calibration.means, calibration.precision = (torch.from_numpy(loaded[k]) for k in ("means", "precision"))
        return calibration


def npz_arrays(data: bytes, expected: dict[str, tuple]) -> dict[str, np.ndarray]:
    """The float32 arrays of an ``np.savez`` archive holding exactly ``expected`` (name: shape), read by numpy
    without pickle. ``data`` is bounded by the caller to what those arrays take, and its entries must be stored,
    as ``np.savez`` writes them: a deflated one could declare and inflate any size."""
    try:
        if any(i.compress_type != zipfile.ZIP_STORED for i in zipfile.ZipFile(io.BytesIO(data)).infolist()):
            raise ValueError("its arrays are compressed (np.savez stores them)")
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            if sorted(archive.files) != sorted(expected):
                raise ValueError(f"it holds {sorted(archive.files)[:4]}, not the arrays {sorted(expected)}")
            arrays = {name: archive[name] for name in expected}
    except (zipfile.BadZipFile, EOFError, OSError, MemoryError) as e:
        raise ValueError(f"not an np.savez archive of its arrays ({type(e).__name__}: {e})") from e
    for name, shape in expected.items():
        if arrays[name].shape != tuple(shape) or arrays[name].dtype != np.dtype("<f4"):
            raise ValueError(f"its {name} is {arrays[name].shape} {arrays[name].dtype}, not {tuple(shape)} float32")
    return arrays


def calibration_path(model_path: str) -> str:
    """Where the calibration of the model file ``model_path`` lies: ``calibration.json`` beside it."""
    return os.path.join(os.path.dirname(os.path.abspath(model_path)), "calibration.json")


def arrays_path(path: str) -> str:
    return os.path.splitext(path)[0] + ".npz"


def calibration_for(model_path: str | None, network: torch.nn.Module, description) -> Calibration:
    """The calibration of the loaded model file ``model_path`` (its ``network``, its ``description``): the one an
    export carries, else ``calibration.json`` beside it, refused if fitted for other weights; unfitted, with a
    warning, where there is none."""
    if not model_path or not os.path.isfile(model_path):
        return Calibration()
    carried = getattr(network, "calibration", None)
    if carried:
        return Calibration.from_json(json.loads(carried), model_path)
    path = calibration_path(model_path)
    if not os.path.lexists(path):
        logger.warning(f"no calibration beside {model_path}: probabilities are not calibrated, rows flagged")
        return Calibration()
    layer = dict(network.named_modules()).get(description.feature_layer)  # its input: the features (none: an export)
    features = layer.in_features if isinstance(layer, torch.nn.Linear) else None
    calibration = Calibration.load(path, len(description.classes), features)
    found = weights_sha256(network) if any(True for _ in network.state_dict()) else ""
    if calibration.weights != found:
        raise BundleError(
            f"{path} was fitted for other weights than {model_path} (sha256 {calibration.weights[:12]} against "
            f"{found[:12] or 'unknown: an ONNX model carries its own'}).",
            f"fit it for this model (run calibrating, README: Commands), or remove it. {REFIT}",
        )
    return calibration


def statistics_subset(items: list[dict], limit: int = STATISTICS_IMAGES) -> list[dict]:
    """At most ``limit`` of ``items``, the same share of each class, in a fixed order."""
    if len(items) <= limit:
        return items
    by_class: dict = {}
    for item in items:
        by_class.setdefault(int(item["label"]), []).append(item)
    share = limit / len(items)
    return [item for members in by_class.values() for item in members[:: max(1, round(1 / share))]][:limit]


class CalibrationFit:
    """The step after training (main process) :meth:`run`: the model file ``model_path`` (rebuilt from its
    description), its features on a stratified subset of the ``training`` items and its logits and features on
    ``validation`` (a loader) through MONAI evaluators (fp32, as evaluation and inference run), fitted and saved
    beside it."""

    def __init__(self, model_path: str, training, validation, batch_size: int, device):
        self.model_path, self.training, self.validation = str(model_path), training, validation
        self.batch_size, self.device, self.path = int(batch_size), device, None

    def run(self) -> Calibration | None:
        from monai.data import DataLoader
        from monai.engines import SupervisedEvaluator

        from .model_file import ModelDescription

        if not is_main_process() or not os.path.isfile(self.model_path):
            return None
        description = ModelDescription.beside(self.model_path)
        network = load_model(self.model_path, self.device, description=description)
        subset = statistics_subset(list(self.training))
        logger.info(
            f"fitting the calibration of {self.model_path}: features of {len(subset)} training images, logits and "
            f"features of {len(self.validation.dataset)} validation images"
        )
        collected = {}
        loader = DataLoader(subset, batch_size=self.batch_size, shuffle=False)
        for name, data in (("statistics", loader), ("validation", self.validation)):
            outputs = Outputs(network, description.feature_layer, keep=True)
            evaluator = SupervisedEvaluator(self.device, data, network, val_handlers=[outputs], decollate=False)
            progress_bar(f"Calibration ({name})").attach(evaluator)
            evaluator.run()
            outputs.hook.handle.remove()
            collected[name] = outputs.gathered()
        weights = weights_sha256(network)
        calibration = Calibration.fit(
            collected["validation"], collected["statistics"], weights, description.feature_layer
        )
        self.path = calibration_path(self.model_path)
        calibration.save(self.path)
        logits, labels = collected["validation"]["logits"], collected["validation"]["labels"]
        figures = calibration_figures(logits, labels, calibration)
        ece, nll = figures["ece"], figures["nll"]
        logger.info(
            f"calibration: temperature {calibration.temperature:.3f} ({calibration.counts['threshold_images']} "
            f"validation images), ECE {ece['uncalibrated']:.4f} -> {ece['calibrated']:.4f}, NLL "
            f"{nll['uncalibrated']:.4f} -> {nll['calibrated']:.4f}; out-of-distribution statistics from "
            f"{calibration.counts.get('statistics_images', 0)} training images (shrinkage "
            f"{calibration.counts.get('shrinkage', 0)}), thresholds {calibration.feature_threshold:.1f} (features), "
            f"{calibration.energy_threshold:.3f} (energy); wrote {self.path}"
        )
        return calibration
