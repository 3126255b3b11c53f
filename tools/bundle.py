"""The bundle as the developer tools and the federated job use it: its folder, and its workflows built and
initialized by MONAI's ``ConfigWorkflow`` as ``python -m monai.bundle run`` builds them."""

from __future__ import annotations

import os

BUNDLE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def workflow(*names: str, run_id: str = "run", **overrides):
    """The initialized ``ConfigWorkflow`` of ``configs/<names>.json`` (or of a path given; merged in order) with
    ``overrides``; its ``parser`` gives the objects it builds."""
    from monai.bundle import ConfigWorkflow

    configs = [n if n.endswith(".json") else os.path.join(BUNDLE_ROOT, "configs", f"{n}.json") for n in names]
    flow = ConfigWorkflow(config_file=configs, meta_file=os.path.join(BUNDLE_ROOT, "configs", "metadata.json"),
                          run_id=run_id, workflow_type=None, bundle_root=BUNDLE_ROOT, **overrides)  # fmt: skip
    flow.initialize()
    return flow
