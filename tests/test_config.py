"""Bundle structure: MONAI's Python API and CLI from any folder, properties, metadata, network in/out, and the
message for each bad override."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import BUNDLE, CONFIGS, FAST, INFERENCE, META, TRAIN, bundle_error, run_bundle, run_workflow

BAD = [
    ({"epochs": 0}, "--epochs 0 is not an integer >= 1"),
    ({"accumulation_steps": 0}, "--accumulation_steps 0 is not an integer >= 1"),
    ({"batch_size": 0}, "--batch_size 0 is not an integer >= 1"),
    ({"val_batch_size": 0}, "--val_batch_size 0 is not an integer >= 1"),
    ({"val_frac": 1.5}, "--val_frac 1.5 is not a number in (0.0, 1.0)"),
    ({"test_frac": 0}, "--test_frac 0 is not a number in (0.0, 1.0)"),
    ({"val_frac": 0.5, "test_frac": 0.5}, "sum to 1, leaving no training data"),
    ({"amp": "maybe"}, "--amp 'maybe' is not a boolean"),
    ({"cache_num_workers": 0}, "--cache_num_workers 0 is not an integer >= 1"),
    ({"device": "cuda:7"}, "--device cuda:7"),  # no machine running the tests has 8 GPUs
    ({"device": "tpu"}, "--device 'tpu' is not a device"),
    ({"image_size": [1, 1]}, "--image_size [1, 1] is not two integers in [32, 4096]"),
    ({"val_interval": 2, "epochs": 1}, "the run would never validate, so it would write no model.pt"),
    ({"val_interval": 2, "val_per_epoch": 3, "epochs": 4}, "validate either every N epochs or N times an epoch"),
    ({"target_accuracy": 99}, "--target_accuracy 99 is not a number in [0, 1]"),
    ({"lr_warmup": 2}, "--lr_warmup 2 is not a number in [0, 1]"),
    ({"epoch_length": 0}, "--epoch_length 0 is not an integer >= 1"),
    ({"augment_prob": 5}, "--augment_prob 5 is not a number in [0, 1]"),
    ({"rotate_degrees": "abc"}, "--rotate_degrees 'abc' is not a number in [0, 180]"),
    ({"flip_axis": 3}, "--flip_axis 3 is not 0 or 1"),
    ({"zoom_range": [1.1]}, "--zoom_range [1.1] is not two numbers above 0"),
    ({"zoom_range": [1.1, 0.9]}, "--zoom_range [1.1, 0.9] is not [low, high]"),
]


@pytest.fixture(scope="module")
def elsewhere(tmp_path_factory):
    """A folder outside the bundle, with no ``scripts`` package: commands run from here need ``--bundle_root``."""
    return tmp_path_factory.mktemp("elsewhere")


def test_cli_from_another_folder_without_pythonpath(elsewhere, mednist, trained):
    """`run training|inference` with --bundle_root and absolute config paths, from a folder without `scripts`, with
    no PYTHONPATH set (`run evaluating`: test_evaluate's fixture)."""
    folders = {"output_dir": elsewhere / "cli", "ckpt_dir": elsewhere / "cli-models"}
    short = {"epochs": 1, "epoch_length": 2, **FAST}
    proc = run_bundle("run", "training", "--config_file", TRAIN, cwd=elsewhere, bundle_root=BUNDLE,
                      dataset_dir=mednist, **folders, **short)  # fmt: skip
    assert "val_acc" in proc.stdout and "device: cpu" in proc.stdout and "cached 96 images" in proc.stdout
    logs = proc.stdout + proc.stderr
    assert "\x1b[" not in logs and "\r" not in logs  # piped: progress as plain lines, no redraws
    assert re.search(r"^Training.*\[2/2\] 100%", logs, re.M) and re.search(r"^Validating.*100%", logs, re.M)
    image = os.path.join(mednist, "MedNIST", "Hand", "000000.jpeg")
    run_bundle("run", "inference", "--config_file", INFERENCE, cwd=elsewhere, bundle_root=BUNDLE, input=image,
               output_dir=elsewhere / "inf", ckpt_dir=trained / "models")  # fmt: skip
    assert "Hand" in (elsewhere / "inf" / "predictions.csv").read_text()


def test_python_api_from_another_folder(elsewhere, mednist, trained):
    """From a folder without `scripts` and no PYTHONPATH: `ConfigWorkflow(...).check_properties()` for the train and
    infer workflows, `monai.bundle.load` of a downloaded copy (only its folder known) for both, and MONAI FL's
    `MonaiAlgo` given the bundle root once, its folders relative to the working directory."""
    bundles = elsewhere / "bundles"
    copy = bundles / "mednist_classification"
    shutil.copytree(BUNDLE, copy, ignore=shutil.ignore_patterns(".*", "tests", "tools", "__pycache__", "models"))
    os.makedirs(copy / "models")
    shutil.copy(trained / "models" / "model.pt", copy / "models" / "model.pt")
    code = f"""
import os, monai.bundle, torch
from monai.bundle import ConfigWorkflow
common = dict(bundle_root={BUNDLE!r}, output_dir={str(elsewhere / "api")!r})
train = ConfigWorkflow(config_file={TRAIN!r}, workflow_type="train", dataset_dir={mednist!r}, **common)
train.initialize()
print("train properties missing:", train.check_properties(), train.max_epochs, len(train.train_dataset_data))
infer = ConfigWorkflow(config_file={INFERENCE!r}, workflow_type="infer", input={mednist!r}, **common)
infer.initialize()
print("infer properties missing:", infer.check_properties(), len(infer.dataset))
for kind in ("train", "inference"):
    net = monai.bundle.load("mednist_classification", bundle_dir={str(bundles)!r}, workflow_type=kind, progress=False)
    print(kind, type(net).__name__, tuple(net.cpu()(torch.rand(2, 1, 64, 64)).shape))
from monai.fl.client import MonaiAlgo  # as NVIDIA FLARE's MONAI examples call it: the bundle root given once
from monai.fl.utils.exchange_object import ExchangeObject
site = dict(dataset_dir={mednist!r}, output_dir="fl/out", ckpt_dir="fl/models", batch_size=16, download=False)
evaluation = dict(site, output_dir="fl/eval", split_file="fl/out/split.json")  # the test split training made
algo = MonaiAlgo(bundle_root={BUNDLE!r}, local_epochs=1, train_kwargs=site, eval_kwargs=evaluation)
algo.initialize(extra={{"CLIENT_NAME": "site-1"}})
weights = torch.load({str(trained / "models" / "model.pt")!r}, weights_only=True)
print("fl accuracy", algo.evaluate(ExchangeObject(weights=weights)).metrics["accuracy"])
algo.train(ExchangeObject(weights=weights))
print("fl trained", sorted(os.listdir("fl/models")), algo.get_weights().weight_type)
algo.finalize()
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "train properties missing: [] 5 96" in proc.stdout and "infer properties missing: [] 120" in proc.stdout
    assert "train DenseNet121 (2, 6)" in proc.stdout and "inference DenseNet121 (2, 6)" in proc.stdout
    accuracy = float(proc.stdout.split("fl accuracy ")[1].split()[0])
    with open(elsewhere / "fl" / "eval" / "metrics.json") as f:  # relative to where it was called from
        assert accuracy == pytest.approx(json.load(f)["accuracy"]) and accuracy > 0.5  # the weights it was sent
    assert "'model.pt', 'network.json', 'network_data_format.json'] fl_weight_diff" in proc.stdout  # the server's


def test_metadata_has_mandatory_keys():
    meta = json.load(open(META))
    for key in ("schema", "version", "changelog", "monai_version", "pytorch_version", "numpy_version",
                "required_packages_version", "name", "task", "description", "authors", "copyright", "data_source",
                "data_type", "intended_use", "references", "network_data_format"):  # fmt: skip
        assert meta.get(key), key
    assert meta["version"] in meta["changelog"]
    image = meta["network_data_format"]["inputs"]["image"]
    assert (image["num_channels"], image["spatial_shape"], image["dtype"]) == (1, [64, 64], "float32")
    pred = meta["network_data_format"]["outputs"]["pred"]
    assert pred["num_channels"] == 6 and pred["type"] == "probabilities"
    assert list(pred["channel_def"].values()) == ["AbdomenCT", "BreastMRI", "CXR", "ChestCT", "Hand", "HeadCT"]
    with open(os.path.join(BUNDLE, "requirements.txt")) as f:
        pins = dict(line.strip().split("==") for line in f if "==" in line)
    for name, version in meta["required_packages_version"].items():  # the metadata pins what the bundle installs
        assert pins[name] == version, name
    assert pins["monai"] == meta["monai_version"]


def test_verify_net_in_out():
    from monai.bundle import verify_net_in_out

    verify_net_in_out(net_id="network_def", meta_file=META, config_file=TRAIN)  # raises on a mismatch


@pytest.mark.parametrize("key, value", [("augment", "false")])
def test_per_sample_pipeline_refuses_what_it_does_not_do(key, value, tmp_path, mednist):
    """configs/per_sample.json's per-sample transforms always augment: asking otherwise is refused, not ignored."""
    with bundle_error(f"--{key} {value!r}: configs/per_sample.json's per-sample pipeline always runs with") as found:
        run_workflow(("train", "per_sample"), "training", dataset_dir=mednist, output_dir=tmp_path, **{key: value})
    assert "drop --" in found[0].fix and not os.listdir(tmp_path)


def test_bad_quick_images_is_named(tmp_path, mednist):
    with bundle_error("--quick_images 0 is not an integer >= 1"):
        run_workflow(("train", "quick"), "training", dataset_dir=mednist, output_dir=tmp_path, quick_images=0)
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("overrides, message", BAD)
def test_bad_hyperparameter_is_named(overrides, message, tmp_path, mednist):
    with bundle_error(message) as found:  # initialize checks the keys
        run_workflow(("train",), "training", dataset_dir=mednist, output_dir=tmp_path, **overrides)
    assert found[0].fix
    assert not os.listdir(tmp_path)  # stopped before any work


def test_config_file_that_does_not_exist_is_named(tmp_path):
    """MONAI reads the config files before any of the bundle's code runs: its error names the missing file
    (README, Commands)."""
    proc = run_bundle("run", "training", "--config_file", "configs/trian.json", check=False)
    assert proc.returncode == 1 and "FileNotFoundError" in proc.stderr and "configs/trian.json" in proc.stderr


def test_bad_override_on_the_command_line_is_one_message(tmp_path, mednist):
    proc = run_bundle("run", "training", "--config_file", TRAIN, dataset_dir=mednist, output_dir=tmp_path,
                      check=False, epochs=0)  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-2:] == [
        "ERROR: --epochs 0 is not an integer >= 1.",
        "  Fix: pass e.g. --epochs 1.",
    ]
    assert "Traceback" not in proc.stderr and not os.listdir(tmp_path)


def test_bundle_error_arrives_through_monai_as_the_readme_says(tmp_path, mednist):
    """Through ConfigWorkflow (and monai.bundle.load) MONAI wraps the BundleError of a component in its own
    RuntimeError; the BundleError, a ValueError, is its cause (README, Commands)."""
    from scripts.errors import BundleError

    with pytest.raises(RuntimeError, match="Failed to instantiate component 'scripts.checks.check_training'") as err:
        run_workflow(("train",), "training", dataset_dir=mednist, output_dir=tmp_path, epochs=0)
    assert isinstance(err.value.__cause__, BundleError) and isinstance(err.value.__cause__, ValueError)
    assert str(err.value.__cause__).startswith("ERROR: --epochs 0 is not an integer >= 1.")


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"batch_size": 0}, "--batch_size 0 is not an integer >= 1"),
        ({"device": "cuda:7"}, "--device cuda:7"),
        ({"image_size": [1, 1]}, "--image_size [1, 1] is not two integers in [32, 4096]"),
        ({"low_confidence": "abc"}, "--low_confidence 'abc' is not a number in [0, 1]"),
        ({"low_confidence": 2}, "--low_confidence 2 is not a number in [0, 1]"),
        ({"max_image_pixels": -5}, "--max_image_pixels -5 is not an integer >= 1"),
        ({"gradcam_layer": "features.nonsense"}, "--gradcam_layer 'features.nonsense' is not a layer of the network"),
    ],
)
def test_bad_inference_override_is_named(overrides, message, tmp_path, trained, mednist):
    with bundle_error(message):
        run_workflow(("inference",), "inference", input=mednist, output_dir=tmp_path / "out", **overrides)
    assert not os.listdir(tmp_path)


MAIN = os.path.join("site-packages", "monai", "bundle", "__main__.py")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config_file", TRAIN, "--epoch", "1"], "did you mean --epochs?"),
        (["--config_file", TRAIN, "--ouptut_dir", "x"], "did you mean --output_dir?"),
        ([f"--config_file={INFERENCE}", "--bach_size=4"], "did you mean --batch_size?"),
        (["--config_file", f"['{TRAIN}','{os.path.join(CONFIGS, 'evaluate.json')}']", "--eval_dri", "x"], "--eval_dir"),
    ],
)
def test_unknown_command_line_key_is_refused_with_the_closest(args, message):
    from scripts.checks import check_command_line

    with bundle_error("is not a key of this workflow") as found:
        check_command_line([MAIN, "run", "training", *args], checked_keys(args))
    assert message in found[0].fix


def checked_keys(args) -> set[str]:
    """The keys the workflow of the ``--config_file`` in ``args`` gives its ``check``: those of each file's
    ``check`` and ``check#key``."""
    given = next(a.partition("=")[2] or args[i + 1] for i, a in enumerate(args) if a.startswith("--config_file"))
    keys = set()
    for path in given.strip("[]").split(","):
        config = json.load(open(path.strip("'")))
        keys |= {k for k in config.get("check", {}) if k[0] != "_"} | {k[6:] for k in config if k[:6] == "check#"}
    return keys


def test_known_command_line_keys_pass():
    from scripts.checks import check_command_line

    nested = ["--epoch_length", "2", "--tracking", "configs/mlflow.json", "--tracking_uri", "sqlite:///m.db"]
    args = ["--config_file", TRAIN, "--epochs", "1", "--bundle_root", ".", "--train#trainer#max_epochs", "1"]
    check_command_line([MAIN, "run", "training", *args, *nested], checked_keys(args))
    check_command_line(["pytest", "--epoch", "1"], set())  # not monai.bundle's command line: nothing to check


def test_monai_builtin_tracking_is_refused_naming_the_bundle_settings():
    """MONAI's built-in ``--tracking mlflow`` reads the loss as a decollated list and failed at the first
    iteration, after the data was cached: refused before any work, naming configs/mlflow.json."""
    from scripts.checks import check_command_line

    with bundle_error("--tracking mlflow: MONAI's built-in tracking settings") as found:
        check_command_line([MAIN, "run", "training", "--config_file", TRAIN, "--tracking", "mlflow"], set())
    assert "configs/mlflow.json" in found[0].fix


def test_every_hyper_parameter_is_checked_and_tracked():
    """Each value train.json declares above ``check`` (its paths and hyper-parameters) goes through ``check`` by a
    rule in ``scripts.checks.RULES``, so a new key cannot go unchecked (nor its command-line override refused),
    and configs/mlflow.json tracks what ``check`` returns."""
    from scripts.checks import RULES

    config = json.load(open(TRAIN))
    header = list(config)[1 : list(config).index("check")]  # after "imports"
    declared = set(header) - {"on_cuda"}
    checked = {key for key, value in config["check"].items() if value == f"@{key}"}
    assert declared - checked == set() and checked <= set(RULES)
    assert "$@check" in json.dumps(json.load(open(os.path.join(CONFIGS, "mlflow.json"))))


def test_progress_bars_are_plain_lines_when_piped():
    """tqdm's redraws (carriage returns, cursor codes) become a line each 10% of a bar, and one at 100%."""
    import io

    from scripts.progress import PlainLines

    out = io.StringIO()
    plain = PlainLines(out)
    for epoch in (1, 2):
        for n in range(0, 51):
            plain.write(f"\r\x1b[ATraining [{epoch}/2]: [{n}/50] {2 * n:3d}% [00:00<00:00]")
        plain.write(f"\rTraining [{epoch}/2]: [50/50] 100% [00:01<00:00]\n")
    lines = out.getvalue().splitlines()
    assert "\x1b" not in out.getvalue() and "\r" not in out.getvalue()
    assert [int(re.search(r"(\d+)%", line).group(1)) for line in lines] == [*range(0, 101, 10)] * 2
    assert lines[0].startswith("Training [1/2]: [0/50]") and lines[-1].startswith("Training [2/2]: [50/50] 100%")
