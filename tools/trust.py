"""Measure what tells a user when to trust a prediction: the out-of-distribution flag on the test split and on
images that are not MedNIST, calibration, and where the Grad-CAM++ maps of inference point.

    python -m tools.trust --dataset_dir /tmp/mednist --output_dir outputs --ckpt_dir models --work_dir /tmp/trust

``output_dir`` is the training run's (its split.json names the test split), ``ckpt_dir`` holds model.pt and
calibration.json. Runs the bundle's inference command on the test split and on a set of images that are not
MedNIST (the photographs that ship with scikit-image and scikit-learn, each also cut in four; linear and radial
gradients; text; clip art; uniform and Gaussian noise; constant images; checkerboards; tiny images), then prints
the share of each set flagged, the AUROC of ``ood_score`` between them, and, for each of ``methods``
(``gradcampp``: Grad-CAM++, inference's; ``gradcam``: plain Grad-CAM) on each of ``layers``, the share of the heat
map's mass on the foreground (pixels above the image's background level) against the foreground's share of the
image, per class, and the time per picture. Needs `pip install scikit-image scikit-learn` (tested with 0.26.0 and
1.9.1).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import time

import fire
import numpy as np

from scripts.errors import BundleError
from tools import commands
from tools.bundle import workflow

LAYERS = "features.transition2.relu,features.transition1.relu,class_layers.relu"
METHODS = "gradcampp,gradcam"


def not_mednist(folder: str, seed: int = 0) -> dict[str, str]:
    """Write the non-MedNIST images to ``folder``; file name -> kind."""
    import skimage.data
    from PIL import Image
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    kinds = {}

    def save(name: str, kind: str, image: np.ndarray) -> None:
        Image.fromarray(image).save(os.path.join(folder, f"{name}.png"))
        kinds[f"{name}.png"] = kind

    photos = {}
    for name in ("astronaut", "brick", "camera", "cat", "chelsea", "clock", "coffee", "coins", "grass", "gravel",
                 "horse", "hubble_deep_field", "immunohistochemistry", "moon", "page", "text", "rocket", "retina"):  # fmt: skip
        photos[name] = getattr(skimage.data, name)()
    for name, image in zip(("china", "flower"), load_sample_images().images):
        photos[name] = image
    for name, image in photos.items():
        gray = np.asarray(Image.fromarray(np.asarray(image)).convert("L"))
        save(f"photo_{name}", "photograph", gray)
        h, w = gray.shape
        for i, (y, x) in enumerate(((0, 0), (0, w // 2), (h // 2, 0), (h // 2, w // 2))):
            save(f"photo_{name}_part{i}", "photograph", gray[y : y + h // 2, x : x + w // 2])
    yy, xx = np.mgrid[0:64, 0:64] / 63
    for i in range(10):
        angle = np.pi * i / 10
        save(
            f"gradient_linear_{i}",
            "gradient",
            (255 * (np.cos(angle) * xx + np.sin(angle) * yy + 1) / 2).astype(np.uint8),
        )
        radial = np.clip(np.hypot(xx - i / 9, yy - 0.5) * 255, 0, 255).astype(np.uint8)
        save(f"gradient_radial_{i}", "gradient", radial)
        save(f"text_{i}", "text", _drawn(lambda d: d.text((2 + i, 4), f"MedNIST {i}\nnot an\nimage {i * 7}", fill=0)))
        save(f"clipart_{i}", "clip art", _drawn(lambda d: _clip_art(d, rng)))
    for i in range(10):
        save(f"noise_uniform_{i}", "noise", rng.integers(0, 256, (64, 64), dtype=np.uint8))
        save(f"noise_gaussian_{i}", "noise", np.clip(rng.normal(128, 40, (64, 64)), 0, 255).astype(np.uint8))
        save(f"constant_{i}", "constant", np.full((64, 64), 25 * i, np.uint8))
        square = 2 + 3 * i
        board = ((np.arange(64)[:, None] // square + np.arange(64)[None] // square) % 2 * 255).astype(np.uint8)
        save(f"checkerboard_{square}", "checkerboard", board)
        side = 2 + i
        save(f"tiny_{side}x{side}", "tiny", rng.integers(0, 256, (side, side), dtype=np.uint8))
    return kinds


def _infer(input_dir: str, out: str, ckpt_dir: str) -> list[dict]:
    commands.inference(input_dir, out, ckpt_dir)
    with open(os.path.join(out, "predictions.csv")) as f:
        return list(csv.DictReader(f))


def _drawn(draw) -> np.ndarray:
    """A 64x64 white image with ``draw(ImageDraw)`` applied."""
    from PIL import Image, ImageDraw

    image = Image.new("L", (64, 64), 255)
    draw(ImageDraw.Draw(image))
    return np.asarray(image)


def _clip_art(draw, rng) -> None:
    """Flat shapes in a few gray levels, as clip art."""
    for _ in range(4):
        x, y = rng.integers(0, 48, 2)
        w, h = rng.integers(8, 24, 2)
        fill = int(rng.choice([0, 60, 120, 180]))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x, y, x + w, y + h], fill=fill, outline=0)


def foreground_share(image: np.ndarray, cam: np.ndarray) -> tuple[float, float]:
    """The share of the heat map's mass on the foreground (pixels above the image's background level, its 5th
    percentile, by a tenth of its range), and the foreground's share of the image."""
    low = np.percentile(image, 5)
    foreground = image > low + 0.1 * (image.max() - low)
    return float((cam * foreground).sum() / max(cam.sum(), 1e-12)), float(foreground.mean())


def gradcam_figures(test: list[dict], ckpt_dir: str, layers: list[str], methods: list[str], per_class: int, work: str):
    """Foreground share of the heat maps of each method (``gradcampp``, ``gradcam``) and layer, per class, on
    ``per_class`` test images a class, and seconds per picture (the first method and layer, and the PNG)."""
    import torch

    from scripts.pictures import PredictionPicture, gradcam_maps

    parser = workflow("inference", input=[d["image"] for d in test[:1]], ckpt_dir=ckpt_dir).parser
    model = parser.get_parsed_content("model").load()
    net, classes = model.network, model.classes
    preprocessing = parser.get_parsed_content("preprocessing")
    chosen = [d for c in range(len(classes)) for d in [x for x in test if x["label"] == c][:per_class]]
    images = torch.stack([torch.as_tensor(preprocessing({"image": d["image"]})["image"]) for d in chosen])
    figures = {}
    for method in methods:
        for layer in layers:
            shares = {c: [] for c in classes}
            for d, x, heat in zip(chosen, images, gradcam_maps(net, images, layer, plus=method == "gradcampp")):
                shares[classes[d["label"]]].append(foreground_share(x[0].numpy(), heat))
            figures[f"{method} {layer}"] = {
                c: {"heat_on_foreground": float(np.mean([s[0] for s in v])), "foreground_area": float(np.mean([s[1] for s in v]))}
                for c, v in shares.items()
            }  # fmt: skip
    picture, start = PredictionPicture(classes), time.perf_counter()
    for i, x in enumerate(images[:30]):
        (heat,) = gradcam_maps(net, x[None], layers[0], plus=methods[0] == "gradcampp")
        with torch.no_grad():
            probs = torch.softmax(net(x[None]), 1)[0].numpy()
        picture.draw(x.numpy(), probs, heat, "test", os.path.join(work, f"picture_{i}.png"))
    picture.close()
    figures["seconds_per_picture"] = (time.perf_counter() - start) / min(30, len(images))
    return figures


def trust(
    dataset_dir: str,
    output_dir: str,
    ckpt_dir: str,
    work_dir: str,
    layers: str = LAYERS,
    methods: str = METHODS,
    per_class: int = 20,
    held_out: str = "",
):
    """Measure and print; writes ``trust.json`` to ``work_dir``. The in-distribution images are the test split,
    or the images of the folder ``held_out`` (real images not used to train or calibrate)."""
    from sklearn.metrics import roc_auc_score

    split_file = os.path.join(output_dir, "split.json")
    if not os.path.isfile(split_file) or not os.path.isfile(os.path.join(ckpt_dir, "calibration.json")):
        raise BundleError(f"need {split_file} and {ckpt_dir}/calibration.json.", "train first (it writes both).")
    os.makedirs(work_dir, exist_ok=True)
    train = workflow("train", dataset_dir=dataset_dir, output_dir=output_dir, ckpt_dir=ckpt_dir, download=False).parser
    test = train.get_parsed_content("split")["test"]
    test_dir, other_dir = held_out or os.path.join(work_dir, "test"), os.path.join(work_dir, "not_mednist")
    if not held_out:
        shutil.rmtree(test_dir, ignore_errors=True)
        os.makedirs(test_dir)
        for i, d in enumerate(test):
            os.symlink(d["image"], os.path.join(test_dir, f"{i:05d}_{os.path.basename(d['image'])}"))
    kinds = not_mednist(other_dir)
    rows_in = _infer(test_dir, os.path.join(work_dir, "pred_test"), ckpt_dir)
    rows_out = _infer(other_dir, os.path.join(work_dir, "pred_not_mednist"), ckpt_dir)
    report = {"held_out": held_out or "test split", "test_images": len(rows_in), "not_mednist_images": len(rows_out)}
    report["test_flagged"] = float(np.mean([bool(r["flag"]) for r in rows_in]))
    report["test_flags"] = {f: sum(r["flag"] == f for r in rows_in) for f in sorted({r["flag"] for r in rows_in})}
    report["not_mednist_flagged"] = float(np.mean([bool(r["flag"]) for r in rows_out]))
    by_kind = {}
    for r in rows_out:
        by_kind.setdefault(kinds[os.path.basename(r["path"])], []).append(bool(r["flag"]))
    report["not_mednist_flagged_by_kind"] = {k: f"{sum(v)}/{len(v)}" for k, v in by_kind.items()}
    scores = [float(r["ood_score"]) for r in rows_in + rows_out]
    report["ood_score_auroc"] = float(roc_auc_score([0] * len(rows_in) + [1] * len(rows_out), scores))
    report["gradcam"] = gradcam_figures(test, ckpt_dir, layers.split(","), methods.split(","), per_class, work_dir)
    with open(os.path.join(work_dir, "trust.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    fire.Fire(trust)
