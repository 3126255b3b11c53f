"""Calibrated confidence and the out-of-distribution flag, fitted on the validation split after training.

Temperature scaling (Guo et al., 2017): one temperature ``T`` divides the logits so that the validation split's
negative log-likelihood is smallest; accuracy is unchanged, probabilities become honest.

The out-of-distribution score is the Mahalanobis distance (Lee et al., 2018) of an image's pooled features
(the 1,024 inputs of the classifier, ``class_layers.flatten``) to the nearest class mean of the validation
split, under their shared within-class covariance: large for images unlike the training data. Where the
features cannot be read (an exported model), it is the energy score (Liu et al., 2020),
``-T * logsumexp(logits / T)``. Each threshold is the validation split's 97th percentile, so about 97% of
in-distribution images pass. The temperature and thresholds are saved to ``calibration.json`` beside
``model.pt`` (plain JSON), the class means and precision matrix to ``calibration.npz`` (read with
``allow_pickle=False``): nothing is unpickled.
"""

from __future__ import annotations

import json
import logging
import math
import os

import numpy as np
import torch

from .model_file import load_model
from .utils import atomic_write, is_main_process

logger = logging.getLogger(__name__)
UNFLAGGED = 0.97  # share of validation images below the out-of-distribution thresholds
FEATURE_LAYER = "class_layers.flatten"


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature minimising the negative log-likelihood of ``labels`` under ``softmax(logits / T)``.

    When every image is classified correctly the likelihood only grows as T shrinks: there is no finite
    optimum, and any fitted T < 1 would make the network more confident than the data can show. Then T = 1
    (the network's own probabilities), with a warning.
    """
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
    """ECE: the gap between confidence and accuracy, averaged over ``bins`` equal-width confidence bins."""
    confidence, predicted = probs.max(1)
    correct = (predicted == labels).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    ece = 0.0
    for low, high in zip(edges[:-1], edges[1:]):
        inside = (confidence > low) & (confidence <= high)
        if inside.any():
            ece += inside.double().mean().item() * abs(confidence[inside].mean().item() - correct[inside].mean().item())
    return ece


def negative_log_likelihood(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean ``-log p(label)``."""
    return float(-torch.log(probs.double().gather(1, labels.long().view(-1, 1)).clamp_min(1e-12)).mean())


def calibration_figures(logits: torch.Tensor, labels: torch.Tensor, calibration: Calibration) -> dict:
    """The temperature, and the expected calibration error and negative log-likelihood of ``labels`` before and
    after calibration."""
    probs = {"uncalibrated": torch.softmax(logits.float(), 1), "calibrated": calibration.probabilities(logits)}
    return {
        "temperature": calibration.temperature,
        "ece": {name: expected_calibration_error(p, labels) for name, p in probs.items()},
        "nll": {name: negative_log_likelihood(p, labels) for name, p in probs.items()},
    }


def mahalanobis(features: torch.Tensor, means: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """Squared Mahalanobis distance of each row of ``features`` to the nearest of ``means`` (one shared
    ``precision`` matrix): (x - m)' P (x - m) = x'Px - 2 m'Px + m'Pm, so one product by P per image for all means."""
    x, m, p = features.double(), means.double(), precision.double()
    px = x @ p
    return ((px * x).sum(1, keepdim=True) - 2 * px @ m.T + ((m @ p) * m).sum(1)).min(1).values


class Calibration:
    """A fitted temperature and out-of-distribution statistics; the identity (T = 1, no threshold) when not
    fitted."""

    def __init__(self, temperature=1.0, energy_threshold=None, means=None, precision=None, feature_threshold=None):
        self.temperature, self.energy_threshold = float(temperature), energy_threshold
        self.means, self.precision, self.feature_threshold = means, precision, feature_threshold
        self.fitted_on = 0

    @classmethod
    def fit(cls, logits: torch.Tensor, labels: torch.Tensor, features: torch.Tensor | None = None) -> Calibration:
        temperature = fit_temperature(logits, labels)
        calibration = cls(temperature, float(np.quantile(energy(logits, temperature).numpy(), UNFLAGGED)))
        if features is not None:
            features, labels = features.double(), labels.long()
            classes = sorted(set(labels.tolist()))
            means = torch.stack([features[labels == c].mean(0) for c in classes])
            centred = torch.cat([features[labels == c] - means[i] for i, c in enumerate(classes)])
            covariance = torch.cov(centred.T) + 1e-3 * torch.eye(features.shape[1], dtype=torch.float64)
            calibration.means, calibration.precision = means, torch.linalg.inv(covariance)
            scores = mahalanobis(features, calibration.means, calibration.precision)
            calibration.feature_threshold = float(np.quantile(scores.numpy(), UNFLAGGED))
        calibration.fitted_on = len(labels)
        return calibration

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits.float() / self.temperature, dim=1)

    def ood_score(self, logits: torch.Tensor, features: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
        """The out-of-distribution score of each image and its threshold (None when not fitted)."""
        if features is not None and self.means is not None:
            return mahalanobis(features, self.means, self.precision), self.feature_threshold
        return energy(logits, self.temperature), self.energy_threshold

    def save(self, path: str) -> None:
        content = {
            "temperature": self.temperature,
            "energy_threshold": self.energy_threshold,
            "feature_threshold": self.feature_threshold,
            "feature_layer": FEATURE_LAYER,
            "unflagged_validation_share": UNFLAGGED,
            "fitted_on_validation_images": self.fitted_on,
        }
        atomic_write(path, lambda f: json.dump(content, f, indent=1))
        if self.means is not None:
            arrays = {"means": self.means.float().numpy(), "precision": self.precision.float().numpy()}
            atomic_write(os.path.splitext(path)[0] + ".npz", lambda f: np.savez(f, **arrays), mode="wb")

    @classmethod
    def load(cls, path: str | None) -> Calibration:
        """The calibration saved at ``path``; the identity, with a warning, if there is none."""
        if not path or not os.path.isfile(path):
            logger.warning(f"no calibration at {path}: probabilities are not calibrated, no out-of-distribution flag")
            return cls()
        with open(path) as f:
            saved = json.load(f)
        if not math.isfinite(saved.get("temperature", float("nan"))) or saved["temperature"] <= 0:
            logger.warning(f"{path} holds no valid temperature: probabilities are not calibrated")
            return cls()
        calibration = cls(saved["temperature"], saved.get("energy_threshold"))
        calibration.fitted_on = saved.get("fitted_on_validation_images", 0)
        arrays = os.path.splitext(path)[0] + ".npz"
        if saved.get("feature_threshold") is not None and os.path.isfile(arrays):
            with np.load(arrays, allow_pickle=False) as npz:
                calibration.means, calibration.precision = torch.from_numpy(npz["means"]), torch.from_numpy(
                    npz["precision"]
                )
            calibration.feature_threshold = saved["feature_threshold"]
        return calibration


class FeatureHook:
    """The pooled features of a PyTorch network's last forward pass (a forward hook on ``FEATURE_LAYER``);
    ``features`` is None for a network without that layer (an exported model)."""

    def __init__(self, network):
        self.features, self.handle = None, None
        if isinstance(network, torch.nn.Module):
            try:
                layer = network.get_submodule(FEATURE_LAYER)
            except AttributeError:
                return
            self.handle = layer.register_forward_hook(self.keep)

    def keep(self, module, inputs, output) -> None:
        self.features = output.detach().float().cpu()

    def take(self) -> torch.Tensor | None:
        features, self.features = self.features, None
        return features


def fit_calibration(network: torch.nn.Module, model_path: str, loader, device, out_path: str) -> Calibration | None:
    """After training: load the best weights (``model_path``) into ``network``, fit a :class:`Calibration` on
    ``loader``'s images (the validation split) and save it to ``out_path``. The main process only."""
    if not is_main_process() or not os.path.isfile(model_path):
        return None
    load_model(model_path, network, device)
    hook, logits, labels, features = FeatureHook(network), [], [], []
    with torch.no_grad():
        for batch in loader:
            logits.append(network(batch["image"].to(device)).float().cpu())
            labels.append(torch.as_tensor(batch["label"]).long().view(-1))
            features.append(hook.take())
    hook.handle.remove()
    logits, labels, features = torch.cat(logits), torch.cat(labels), torch.cat(features)
    calibration = Calibration.fit(logits, labels, features)
    calibration.save(out_path)
    figures = calibration_figures(logits, labels, calibration)
    ece, nll = figures["ece"], figures["nll"]
    logger.info(
        f"calibration on {len(labels)} validation images: temperature {calibration.temperature:.3f}, "
        f"ECE {ece['uncalibrated']:.4f} -> {ece['calibrated']:.4f}, NLL {nll['uncalibrated']:.4f} -> "
        f"{nll['calibrated']:.4f}, "
        f"out-of-distribution thresholds {calibration.feature_threshold:.1f} (features), "
        f"{calibration.energy_threshold:.3f} (energy); wrote {out_path}"
    )
    return calibration


def calibrate(config_file: str = "configs/train.json", **overrides) -> str:
    """Fit and save the calibration of an already trained model (e.g. one trained before calibration existed):
    the validation split of ``<output_dir>/split.json`` through ``<ckpt_dir>/model.pt``, as training's last step
    does. ``overrides`` are training keys (``--dataset_dir``, ``--output_dir``, ``--ckpt_dir``, ...)."""
    from monai.bundle import ConfigParser

    from .utils import BUNDLE_ROOT, BundleError

    parser = ConfigParser()
    parser.read_config(os.path.join(BUNDLE_ROOT, config_file) if not os.path.isabs(config_file) else config_file)
    parser.update({"bundle_root": BUNDLE_ROOT, "download": False, **overrides})
    parser["cache#data"] = {"validation": "$@datalist['validation']"}  # the training images are not needed
    split_file, model_path = parser.get_parsed_content("split_file"), parser.get_parsed_content("ckpt_path")
    for path in (split_file, model_path):
        if not os.path.isfile(path):
            raise BundleError(f"{path} does not exist.", "pass the --output_dir and --ckpt_dir of a training run.")
    parser.get_parsed_content("calibrate")
    return parser.get_parsed_content("calibration_path")


if __name__ == "__main__":
    import fire

    logging.basicConfig(level=logging.INFO, format="%(asctime)s - %(name)s - %(levelname)s - %(message)s")
    fire.Fire(calibrate)
