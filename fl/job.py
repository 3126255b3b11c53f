"""Federated training of this bundle across simulated hospitals: NVIDIA FLARE's ``FedAvgRecipe`` in its simulator
(``SimEnv``), each site running ``fl/client.py`` (MONAI FL's ``MonaiAlgo``) on its own shard of the images:
MedNIST, or any data the bundle trains on (``--dataset_dir`` of class folders, or ``--datalist`` a CSV; colour with
``--in_channels 3``).

    pip install -r requirements-fl.txt
    python fl/job.py --dataset_dir /path/holding/MedNIST --work_dir /tmp/fl [--sites 3] [--shards iid|skewed]
                     [--images 9600] [--rounds 3] [--local_epochs 1] [--test_frac 0.01] [--central true]
                     [--network resnet18.json] [--datalist labels.csv] [--in_channels 3]

From the repository root. The development images are split as the bundle splits them (seed 0): the test split
is held aside, the rest (``--images`` of it, stratified) is sharded over the sites: ``iid`` (each class evenly)
or ``skewed`` (site-1 mostly CT, site-2 mostly radiographs, site-3 mostly MRI; with other numbers of sites, a
rotating share). After ``--rounds`` rounds of FedAvg, the global model is saved as ``WORK/global/models/model.pt``
and evaluated on the test split with the bundle's ``run evaluating``; with ``--central true`` the same images are
trained on centrally for ``rounds x local_epochs`` epochs and evaluated alike. Per-round metrics go to
TensorBoard (``tensorboard --logdir WORK/flare``); ``WORK/fl.json`` holds the figures. Each site (and the
central run) keeps 10% of its images for validation and ``--test_frac`` for its own test split.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import sys
import time

import fire
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scripts.data import ImageData, file_hash, images_by_class, split_by_content  # noqa: E402
from tools.bundle import BUNDLE_ROOT, workflow  # noqa: E402

SKEW = {  # share of each class (AbdomenCT, BreastMRI, CXR, ChestCT, Hand, HeadCT) held by each of 3 sites
    "site-1": (0.7, 0.1, 0.1, 0.7, 0.1, 0.7),  # mostly CT
    "site-2": (0.15, 0.1, 0.7, 0.15, 0.7, 0.15),  # mostly radiographs
    "site-3": (0.15, 0.8, 0.2, 0.15, 0.2, 0.15),  # mostly MRI
}


def shares(sites: int, shards: str, classes: int) -> dict[str, tuple]:
    """Each site's share of each class (``skewed`` for MedNIST's six classes and 3 sites: :data:`SKEW`)."""
    names = [f"site-{i + 1}" for i in range(sites)]
    if shards == "iid":
        return {name: (1 / sites,) * classes for name in names}
    if sites == 3 and classes == 6:
        return SKEW
    rotate = [tuple(0.7 if (c + i) % sites == 0 else 0.3 / (sites - 1) for c in range(classes)) for i in range(sites)]
    return dict(zip(names, rotate))


def link_folder(folder: str, items: list[dict], root: str, classes: list[str]) -> None:
    """A folder of class folders (``classes``) of links to ``items`` (``{"image": path under root, "label": i,
    "name": unique}``); the links are absolute, so that they resolve from anywhere."""
    for item in items:
        target = os.path.join(folder, classes[item["label"]], item["name"])
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.symlink(os.path.abspath(os.path.join(root, item["image"])), target)


def prepare_site(site_dir: str, val_frac: float, test_frac: float, batch_size: int, seed: int) -> list[str]:
    """A site's data prepared as the bundle's ``preparing`` run does (its split saved in ``site_dir/out``), which
    MONAI FL's ``MonaiAlgo`` then reads; the site's classes."""
    out = os.path.join(site_dir, "out")
    images, models = os.path.join(site_dir, "images"), os.path.join(site_dir, "models")
    flow = workflow("train", "prepare", run_id="preparing", dataset_dir=images, output_dir=out, ckpt_dir=models,
                    val_frac=val_frac, test_frac=test_frac, batch_size=batch_size, seed=seed, download=False)  # fmt: skip
    flow.run()
    flow.finalize()
    return flow.parser.get_parsed_content("classes")


def prepare(dataset_dir: str, datalist: str, work: str, sites: int, shards: str, images: int, seed: int) -> dict:
    """The test split in ``work/test``, the pool of training images in ``work/pool``, the sites' shards in
    ``work/sites/<site>/images`` (each a folder of class folders) from ``dataset_dir``'s class folders or the CSV
    ``datalist``; returns their sizes and the classes."""
    data = ImageData(os.path.abspath(dataset_dir or "."), "", datalist=datalist or None, download=False)
    if data.kind == "download":
        sys.exit(f"ERROR: --dataset_dir {dataset_dir} holds no images. Fix: pass a folder of class folders "
                 "(MedNIST's or your own), or --datalist a CSV.")  # fmt: skip
    classes, root = data.classes, data.root
    if data.kind == "csv":
        items = data.csv_items()[0]
    else:
        found = images_by_class(root, classes, "dataset_dir")
        items = [{"image": f, "label": i} for i, c in enumerate(classes) for f in found[c]]
    for i, item in enumerate(items):  # a name unique in its class folder, whatever folders the images came from
        item["name"] = f"{i:06d}-{os.path.basename(item['image'])}"
    split = split_by_content(items, [file_hash(os.path.join(root, d["image"])) for d in items], 0.1, 0.1, seed)
    pool = split["training"] + split["validation"]
    generator = torch.Generator().manual_seed(seed)
    by_class = [[d for d in pool if d["label"] == c] for c in range(len(classes))]
    by_class = [[members[i] for i in torch.randperm(len(members), generator=generator)] for members in by_class]
    keep = min(1.0, images / len(pool))
    by_class = [members[: round(keep * len(members))] for members in by_class]
    link_folder(os.path.join(work, "test"), split["test"], root, classes)
    link_folder(os.path.join(work, "pool"), [d for members in by_class for d in members], root, classes)
    sizes, start = {}, [0] * len(classes)
    for site, share in shares(sites, shards, len(classes)).items():
        taken = []
        for c, members in enumerate(by_class):
            count = round(share[c] * len(members))
            taken += members[start[c] : start[c] + count]
            start[c] += count
        # beside each site's images: out/, models/, eval/
        link_folder(os.path.join(work, "sites", site, "images"), taken, root, classes)
        sizes[site] = {cls: sum(d["label"] == c for d in taken) for c, cls in enumerate(classes)}
    return {"test": len(split["test"]), "pool": sum(map(len, by_class)), "sites": sizes, "classes": classes}


def run(names: list[str], run_id: str, **overrides) -> None:
    """The bundle's workflow of ``configs/<names>.json`` with ``overrides``, run in this process and finalized."""
    flow = workflow(*names, run_id=run_id, **overrides)
    flow.run()
    flow.finalize()


def evaluate(work: str, models: str, name: str) -> float:
    """The bundle's evaluation of ``models/model.pt`` on the held-out test split: its accuracy."""
    out = os.path.join(work, name, "eval")
    run(["train", "evaluate"], "evaluating", eval_dir=os.path.join(work, "test"), ckpt_dir=models,
        output_dir=out, dataset_dir=os.path.join(work, "pool"))  # fmt: skip
    with open(os.path.join(out, "metrics.json")) as f:
        return json.load(f)["accuracy"]


def federated(
    dataset_dir: str = "",
    work_dir: str = "",
    sites: int = 3,
    shards: str = "iid",
    images: int = 9600,
    rounds: int = 3,
    local_epochs: int = 1,
    batch_size: int = 64,
    test_frac: float = 0.01,
    central: bool = False,
    seed: int = 0,
    network: str = "",
    datalist: str = "",
    in_channels: int = 1,
) -> None:
    """Shard, train with FedAvg in FLARE's simulator, evaluate the global model (and a central one); ``network``: a
    JSON holding another ``network_def`` (README: Use another network) for every site and the central run."""
    from nvflare.apis.dxo import DataKind
    from nvflare.app_opt.pt.recipes.fedavg import FedAvgRecipe
    from nvflare.recipe import SimEnv, add_experiment_tracking

    if not work_dir or not (dataset_dir or datalist):
        sys.exit(
            "ERROR: no --work_dir, or no data. Fix: pass --work_dir DIR and --dataset_dir DIR (or --datalist CSV)."
        )
    if shards not in ("iid", "skewed") or sites < 2:
        sys.exit("ERROR: --shards is iid or skewed, and --sites at least 2.")
    work = os.path.abspath(work_dir)
    if os.path.exists(work):
        sys.exit(f"ERROR: {work} exists. Fix: pass a new --work_dir.")
    report = {"sites": sites, "shards": shards, "rounds": rounds, "local_epochs": local_epochs}
    report["data"] = prepare(dataset_dir, datalist, work, sites, shards, images, seed)
    for site, counts in report["data"]["sites"].items():  # a split needs each class in each of its three parts
        short = [c for c, n in counts.items() if n < 3]
        if short:
            shutil.rmtree(work)  # only links to the images, in the folder this run made
            sys.exit(f"ERROR: {site} would get {counts[short[0]]} image(s) of {short[0]}: a site's training, "
                     "validation and test parts need one of every class each. Fix: fewer --sites, --shards iid, "
                     "or more images.")  # fmt: skip
    for site in report["data"]["sites"]:  # each site's split, which MonaiAlgo reads; every site has each class
        site_classes = prepare_site(os.path.join(work, "sites", site), 0.1, test_frac, batch_size, seed)
        if site_classes != report["data"]["classes"]:
            sys.exit(f"ERROR: {site} has the classes {site_classes}, not {report['data']['classes']}. "
                     "Fix: give every site images of every class (more --images).")  # fmt: skip
    configs = ["train", os.path.abspath(network)] if network else ["train"]
    args = f"--bundle_root {BUNDLE_ROOT} --sites_dir {os.path.join(work, 'sites')} --local_epochs {local_epochs}"
    args += f" --epochs {rounds * local_epochs} --batch_size {batch_size} --test_frac {test_frac}"
    args += f" --in_channels {in_channels} --threads {max(1, (os.cpu_count() or 1) // sites)}"  # sites share cores
    args += f" --network {configs[-1]}" if network else ""
    # the network as FLARE's server builds it: network_def as data (the bundle's description), for the data's
    # classes; each site's model folder holds it, so that the global model is evaluated before a site trains
    flow = workflow(*configs, dataset_dir=os.path.join(work, "pool"), batch_size=batch_size, download=False,
                    in_channels=in_channels)  # fmt: skip
    description = flow.parser.get_parsed_content("description")
    for site in report["data"]["sites"]:
        description.write(os.path.join(work, "sites", site, "models"))
    arguments = {k: v for k, v in description.network_def.items() if k != "_target_"}
    recipe = FedAvgRecipe(
        name="mednist_fedavg",
        model={"class_path": description.network_def["_target_"], "args": arguments},
        min_clients=sites,
        num_rounds=rounds,
        train_script=os.path.join(BUNDLE_ROOT, "fl", "client.py"),
        train_args=args,
        aggregator_data_kind=DataKind.WEIGHT_DIFF,
    )
    add_experiment_tracking(recipe, tracking_type="tensorboard")
    start = time.perf_counter()
    # one simulator thread per site: a site's process (its trainer, optimizer and schedule) lives through all rounds
    run = recipe.execute(SimEnv(num_clients=sites, num_threads=sites, workspace_root=os.path.join(work, "flare")))
    report["federated_wall_s"], report["result"] = round(time.perf_counter() - start, 1), run.get_result()
    (saved,) = glob.glob(os.path.join(work, "flare", "**", "FL_global_model.pt"), recursive=True)
    state = torch.load(saved, map_location="cpu", weights_only=True)
    state = state.get("model", state)
    models = os.path.join(work, "global", "models")
    os.makedirs(models)
    torch.save(state, os.path.join(models, "model.pt"))
    description.write(models)  # the global model's description travels with it
    report["bytes_per_round"] = 2 * sites * sum(v.numel() * v.element_size() for v in state.values())
    report["federated_test_accuracy"] = evaluate(work, models, "global")
    if str(central).lower() in ("true", "1"):
        out, models = os.path.join(work, "central", "out"), os.path.join(work, "central", "models")
        start = time.perf_counter()
        run(configs, "training", dataset_dir=os.path.join(work, "pool"), output_dir=out, ckpt_dir=models,
            epochs=rounds * local_epochs, batch_size=batch_size, val_frac=0.1, test_frac=test_frac, seed=seed,
            in_channels=in_channels)  # fmt: skip
        report["central_wall_s"] = round(time.perf_counter() - start, 1)
        report["central_test_accuracy"] = evaluate(work, models, "central")
    with open(os.path.join(work, "fl.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    fire.Fire(federated)
