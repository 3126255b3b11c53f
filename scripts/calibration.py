"""Calibrated confidence and the out-of-distribution score, fitted after training and kept with the model.

Temperature scaling (Guo et al., 2017) divides the logits by the ``T`` that minimises the validation negative
log-likelihood. The out-of-distribution score is the Mahalanobis distance (Lee et al., 2018) of an image's pooled
features (``class_layers.flatten``) to the nearest class mean, with the training images' within-class covariance
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

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.metrics import calibration_binning

from .model_file import load_model
from .utils import BundleError, atomic_write, is_main_process

logger = logging.getLogger(__name__)
UNFLAGGED = 0.97  # share of validation images below the out-of-distribution thresholds
FEATURE_LAYER = "class_layers.flatten"
STATISTICS_IMAGES = 6000  # training images, stratified, that make the class means and covariance


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature minimising the negative log-likelihood of ``labels`` under ``softmax(logits / T)``; 1, with a
    warning, when every image is right (the likelihood then only grows as T shrinks: no finite optimum)."""
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
    return float(log_t.detach().exp())


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


def negative_log_likelihood(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean ``-log p(label)``."""
    return float(torch.nn.functional.nll_loss(probs.double().clamp_min(1e-12).log(), labels.long()))


def calibration_figures(logits: torch.Tensor, labels: torch.Tensor, calibration: Calibration) -> dict:
    """The temperature, and the expected calibration error and negative log-likelihood of ``labels`` before and
    after calibration."""
    probs = {"uncalibrated": torch.softmax(logits.float(), 1), "calibrated": calibration.probabilities(logits)}
    return {
        "temperature": calibration.temperature,
        "ece": {name: expected_calibration_error(p, labels) for name, p in probs.items()},
        "nll": {name: negative_log_likelihood(p, labels) for name, p in probs.items()},
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

    def __init__(self, temperature=1.0, energy_threshold=None, weights="", counts=None):
        self.temperature, self.energy_threshold = float(temperature), energy_threshold
        self.weights, self.counts = weights, dict(counts or {})
        self.means = self.precision = self.feature_threshold = None

    @property
    def fitted(self) -> bool:
        return self.energy_threshold is not None

    @classmethod
    def fit(cls, validation: dict, statistics: dict | None, weights: str) -> Calibration:
        """The temperature and thresholds from ``validation``, the class statistics from ``statistics`` (training
        images), each ``Outputs.gathered()``."""
        logits, labels = validation["logits"], validation["labels"]
        temperature = fit_temperature(logits, labels)
        threshold = float(np.quantile(energy(logits, temperature).numpy(), UNFLAGGED))
        counts = {"threshold_images": len(labels)}
        calibration = cls(temperature, threshold, weights, counts)
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
            "feature_layer": FEATURE_LAYER,
            "unflagged_validation_share": UNFLAGGED,
            "weights_sha256": self.weights,
            **self.counts,
        }

    @classmethod
    def from_json(cls, saved: dict, source: str) -> Calibration:
        try:
            temperature, threshold = float(saved["temperature"]), saved["energy_threshold"]
            assert math.isfinite(temperature) and temperature > 0 and isinstance(saved["weights_sha256"], str)
            assert threshold is None or math.isfinite(float(threshold))
        except (KeyError, TypeError, ValueError, AssertionError) as e:
            raise BundleError(
                f"{source} is not a calibration this bundle wrote ({type(e).__name__}: {e}).",
                "fit it again: python -m scripts.calibration (see README), or delete it.",
            ) from e
        counts = {k: v for k, v in saved.items() if k.endswith("_images") or k == "shrinkage"}
        return cls(temperature, threshold, saved["weights_sha256"], counts)

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
    def load(cls, path: str) -> Calibration:
        """The calibration saved at ``path`` (and its arrays beside it), or a ``BundleError`` naming the file."""
        try:
            with open(path) as f:
                saved = json.load(f)
        except (OSError, ValueError) as e:
            raise BundleError(f"{path} is not readable JSON ({e}).", "fit it again, or delete it.") from e
        calibration = cls.from_json(saved, path)
        arrays = arrays_path(path)
        if saved.get("feature_threshold") is None:
            return calibration
        if not os.path.isfile(arrays):
            logger.warning(f"no {arrays} beside {path}: ood_score is the energy (copy it with calibration.json)")
            return calibration
        try:
            with open(arrays, "rb") as f:
                data = f.read()
            if "arrays_sha256" not in saved:  # written before calibration.json named them: kept working
                logger.warning(f"{path} names no SHA-256 of {arrays}: fit the calibration again to bind them")
            elif hashlib.sha256(data).hexdigest() != saved["arrays_sha256"]:
                raise ValueError(f"its SHA-256 is not the one {os.path.basename(path)} names")
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                means, precision = npz["means"], npz["precision"]
            if means.ndim != 2 or precision.shape != (means.shape[1],) * 2:
                raise ValueError(f"means of shape {means.shape} and a precision matrix of {precision.shape}")
        except (OSError, ValueError, KeyError) as e:
            raise BundleError(
                f"{arrays} cannot be used with {path}: {e}.",
                "fit the calibration again: python -m scripts.calibration (see README), or delete both files.",
            ) from e
        calibration.means, calibration.precision = torch.from_numpy(means), torch.from_numpy(precision)
        calibration.feature_threshold = float(saved["feature_threshold"])
        return calibration


def calibration_path(model_path: str) -> str:
    """Where the calibration of the model file ``model_path`` lies: ``calibration.json`` beside it."""
    return os.path.join(os.path.dirname(os.path.abspath(model_path)), "calibration.json")


def arrays_path(path: str) -> str:
    return os.path.splitext(path)[0] + ".npz"


def calibration_for(model_path: str | None) -> Calibration:
    """The calibration of the model file ``model_path``: the one an export carries, else ``calibration.json`` beside
    it, refused if fitted for other weights; unfitted, with a warning, where there is none."""
    if not model_path or not os.path.isfile(model_path):
        return Calibration()
    network = load_model(model_path)
    carried = getattr(network, "calibration", None)
    if carried:
        return Calibration.from_json(json.loads(carried), model_path)
    path = calibration_path(model_path)
    if not os.path.isfile(path):
        logger.warning(f"no calibration beside {model_path}: probabilities are not calibrated, rows flagged")
        return Calibration()
    calibration = Calibration.load(path)
    found = weights_sha256(network) if any(True for _ in network.state_dict()) else ""
    if calibration.weights != found:
        raise BundleError(
            f"{path} was fitted for other weights than {model_path} (sha256 {calibration.weights[:12]} against "
            f"{found[:12] or 'unknown: an ONNX model carries its own'}).",
            "fit it for this model: python -m scripts.calibration --ckpt_dir DIR (see README), or remove it.",
        )
    return calibration


class FeatureHook:
    """The pooled features of a network's last forward pass (a hook on ``FEATURE_LAYER``; None for an export)."""

    def __init__(self, network):
        self.features, self.handle = None, None
        layer = dict(network.named_modules()).get(FEATURE_LAYER) if isinstance(network, torch.nn.Module) else None
        if layer is not None and not isinstance(layer, torch.jit.ScriptModule):  # TorchScript takes no hooks
            self.handle = layer.register_forward_hook(self.keep)

    def keep(self, module, inputs, output) -> None:
        self.features = output.detach().float().cpu()

    def take(self) -> torch.Tensor | None:
        features, self.features = self.features, None
        return features


class Outputs:
    """The one collector of what an engine predicts, read by calibration, evaluation and inference: after each
    iteration ``last`` holds the batch's ``logits``, ``features``, ``labels`` (or None) and ``batch``; with
    ``keep``, :meth:`gathered` joins every iteration's."""

    def __init__(self, network, keep: bool = False):
        self.hook, self.keep, self.last, self.kept = FeatureHook(network), keep, None, []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda _: self.kept.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)

    def collect(self, engine: Engine) -> None:
        output = engine.state.output
        label = output.get("label")
        self.last = {
            "logits": output["pred"].detach().float().cpu(),
            "features": self.hook.take(),
            "labels": None if label is None else torch.as_tensor(label).detach().cpu().long().view(-1),
            "batch": engine.state.batch,
        }
        if self.keep:
            self.kept.append(self.last)

    def gathered(self) -> dict:
        """Every iteration's logits, features and labels, concatenated (features None if any batch had none)."""
        joined = {}
        for key in ("logits", "features", "labels"):
            parts = [part[key] for part in self.kept]
            joined[key] = torch.cat(parts) if parts and all(p is not None for p in parts) else None
        return joined


def statistics_subset(items: list[dict], limit: int = STATISTICS_IMAGES) -> list[dict]:
    """At most ``limit`` of ``items``, the same share of each class, in a fixed order."""
    if len(items) <= limit:
        return items
    by_class: dict = {}
    for item in items:
        by_class.setdefault(int(item["label"]), []).append(item)
    share = limit / len(items)
    return [item for members in by_class.values() for item in members[:: max(1, round(1 / share))]][:limit]


def fit_calibration(network, model_path: str, training, validation, prepare_batch, batch_size: int, device):
    """After training (main process): ``model_path``'s weights into ``network``, its features on a stratified subset
    of the ``training`` items and its logits and features on ``validation`` through MONAI evaluators (with
    ``prepare_batch``, fp32, as evaluation and inference run), fitted and saved beside ``model_path``."""
    from monai.data import DataLoader
    from monai.engines import SupervisedEvaluator

    if not is_main_process() or not os.path.isfile(model_path):
        return None
    load_model(model_path, network, device)
    collected = {}
    subset = DataLoader(statistics_subset(training), batch_size=batch_size, shuffle=False)
    for name, loader in (("statistics", subset), ("validation", validation)):
        outputs = Outputs(network, keep=True)
        evaluator = SupervisedEvaluator(
            device, loader, network, prepare_batch=prepare_batch, val_handlers=[outputs], decollate=False
        )
        evaluator.run()
        outputs.hook.handle.remove()
        collected[name] = outputs.gathered()
    calibration = Calibration.fit(collected["validation"], collected["statistics"], weights_sha256(network))
    out_path = calibration_path(model_path)
    calibration.save(out_path)
    figures = calibration_figures(collected["validation"]["logits"], collected["validation"]["labels"], calibration)
    ece, nll = figures["ece"], figures["nll"]
    logger.info(
        f"calibration: temperature {calibration.temperature:.3f} ({calibration.counts['threshold_images']} "
        f"validation images), ECE {ece['uncalibrated']:.4f} -> {ece['calibrated']:.4f}, NLL "
        f"{nll['uncalibrated']:.4f} -> {nll['calibrated']:.4f}; out-of-distribution statistics from "
        f"{calibration.counts.get('statistics_images', 0)} training images (shrinkage "
        f"{calibration.counts.get('shrinkage', 0)}), thresholds {calibration.feature_threshold:.1f} (features), "
        f"{calibration.energy_threshold:.3f} (energy); wrote {out_path}"
    )
    return calibration


def calibrate(config_file: str = "configs/train.json", **overrides) -> str:
    """Fit and save the calibration of a trained ``<ckpt_dir>/model.pt`` on its ``<output_dir>/split.json``, as
    training's last step does; ``overrides`` are training keys (``--dataset_dir``, ``--ckpt_dir``, ...)."""
    from monai.bundle import ConfigParser

    from .utils import BUNDLE_ROOT

    parser = ConfigParser()
    parser.read_config(os.path.join(BUNDLE_ROOT, config_file) if not os.path.isabs(config_file) else config_file)
    parser.update({"bundle_root": BUNDLE_ROOT, "download": False, **overrides})
    subset = {"_target_": "scripts.calibration.statistics_subset", "items": "$@datalist['training']"}
    parser["cache#data#training"] = subset  # only the training images the statistics need are preprocessed
    split_file, model_path = parser.get_parsed_content("split_file"), parser.get_parsed_content("ckpt_path")
    for path in (split_file, model_path):
        if not os.path.isfile(path):
            raise BundleError(f"{path} does not exist.", "pass the --output_dir and --ckpt_dir of a training run.")
    parser.get_parsed_content("calibrate")
    return calibration_path(model_path)


if __name__ == "__main__":
    import fire

    logging.basicConfig(level=logging.INFO, format="%(asctime)s - %(name)s - %(levelname)s - %(message)s")
    fire.Fire(calibrate)
