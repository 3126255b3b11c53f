"""What an engine predicts, collected once for calibration, evaluation and inference: logits, labels, the batch and
the features the out-of-distribution score reads (the input of the network's classifier layer)."""

from __future__ import annotations

import torch
from ignite.engine import Engine, Events


class FeatureHook:
    """The input of ``network``'s layer ``name`` (its classifier) in its last forward pass; None for an export."""

    def __init__(self, network, name: str):
        self.features, self.handle = None, None
        layer = dict(network.named_modules()).get(name) if isinstance(network, torch.nn.Module) else None
        if layer is not None and not isinstance(layer, torch.jit.ScriptModule):  # TorchScript takes no hooks
            self.handle = layer.register_forward_pre_hook(self.keep)

    def keep(self, module, inputs) -> None:
        self.features = inputs[0].detach().float().cpu()

    def take(self) -> torch.Tensor | None:
        features, self.features = self.features, None
        return features


class Outputs:
    """The one collector of what an engine predicts, read by calibration, evaluation and inference: after each
    iteration ``last`` holds the batch's ``logits``, ``features`` (the input of ``feature_layer``), ``labels`` (or
    None) and ``batch``; with ``keep``, :meth:`gathered` joins every iteration's."""

    def __init__(self, network, feature_layer: str, keep: bool = False):
        self.hook, self.keep, self.last, self.kept = FeatureHook(network, feature_layer), keep, None, []

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
