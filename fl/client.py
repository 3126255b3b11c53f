"""A hospital's side of federated training (NVIDIA FLARE Client API): MONAI FL's ``MonaiAlgo`` runs this bundle on
the site's own images, and only weights travel.

Started by FLARE (see ``fl/job.py``), once per site. Each site ``S`` keeps its images in
``SITES_DIR/S/images/<class>/`` and its split (prepared by the job), outputs and checkpoints in ``SITES_DIR/S/out``
and ``SITES_DIR/S/models``: nothing is shared between sites. Every round: the global weights are evaluated on the
site's test split, trained on for ``--local_epochs``, and the weight difference is sent back with the round's
metrics (also logged to TensorBoard through FLARE).
"""

from __future__ import annotations

import argparse
import os
import sys

import nvflare.client as flare
import torch
from monai.fl.client import MonaiAlgo
from monai.fl.utils.constants import FlStatistics
from monai.fl.utils.exchange_object import ExchangeObject
from nvflare.app_common.abstract.fl_model import ParamsType
from nvflare.client.tracking import SummaryWriter


def site_algo(bundle_root: str, site_dir: str, local_epochs: int, overrides: dict, network: str = "") -> MonaiAlgo:
    """``MonaiAlgo`` on the bundle's own configs (and ``network``, a JSON holding another ``network_def``), with the
    site's folders (and ``overrides``) for training and for evaluating the global weights on the site's test split,
    with the network the site's model folder describes."""
    folders = {"dataset_dir": os.path.join(site_dir, "images"), "output_dir": os.path.join(site_dir, "out")}
    folders["download"] = False  # the site's class folders in images/, its runs' files beside them
    folders["ckpt_dir"] = os.path.join(site_dir, "models")
    common = {**folders, **overrides}  # the bundle root given to MonaiAlgo alone, as FLARE's examples do
    return MonaiAlgo(
        bundle_root=bundle_root,
        local_epochs=local_epochs,
        config_train_filename=["configs/train.json", *([network] if network else [])],
        train_kwargs=dict(common),
        config_evaluate_filename=["configs/train.json", "configs/evaluate.json"],
        eval_kwargs={
            **common,
            "output_dir": os.path.join(site_dir, "eval"),
            "split_file": f"{folders['output_dir']}/split.json",
        },
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bundle_root", required=True)
    parser.add_argument("--sites_dir", required=True)
    parser.add_argument("--local_epochs", type=int, default=1)
    parser.add_argument("--epochs", type=int, required=True, help="rounds x local epochs: the learning-rate schedule")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--val_frac", type=float, default=0.1)
    parser.add_argument("--test_frac", type=float, default=0.01)
    parser.add_argument("--in_channels", type=int, default=1, help="1 (gray) or 3 (colour)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads of this site (0: torch's default)")
    parser.add_argument("--network", default="", help="a JSON holding another network_def")
    args = parser.parse_args()
    # MonaiAlgo sets the workflow's bundle_root only after initialize() has built the trainer from scripts.*
    # (MONAI's ConfigWorkflow.run adds it to sys.path, later still): FLARE starts this script elsewhere
    sys.path.insert(0, os.path.abspath(args.bundle_root))
    if args.threads:
        torch.set_num_threads(args.threads)
    flare.init()
    site = flare.get_site_name()
    overrides = {k: getattr(args, k) for k in ("epochs", "batch_size", "val_frac", "test_frac", "in_channels")}
    algo = site_algo(args.bundle_root, os.path.join(args.sites_dir, site), args.local_epochs, overrides, args.network)
    algo.initialize(extra={"CLIENT_NAME": site})
    writer = SummaryWriter()
    while flare.is_running():
        model = flare.receive()
        weights = ExchangeObject(weights=model.params)
        metrics = algo.evaluate(data=weights).metrics  # the global model on this site's test split
        for key in ("accuracy", "nll_calibrated", "out_of_distribution_flagged"):
            if key in metrics:
                writer.add_scalar(f"global_model/{key}", metrics[key], model.current_round)
        algo.train(data=weights)
        update = algo.get_weights()
        steps = update.statistics.get(FlStatistics.NUM_EXECUTED_ITERATIONS, 0)
        writer.add_scalar("local/iterations", steps, model.current_round)
        flare.send(
            flare.FLModel(
                params=update.weights,
                params_type=ParamsType.DIFF,  # MonaiAlgo sends local minus global weights
                metrics={"accuracy": metrics.get("accuracy", 0.0)},
                meta={"NUM_STEPS_CURRENT_ROUND": steps},
            )
        )
    algo.finalize()


if __name__ == "__main__":
    main()
