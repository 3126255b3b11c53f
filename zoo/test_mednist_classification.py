# Copyright (c) MONAI Consortium
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.

import csv
import json
import os
import shutil
import tempfile
import unittest

import numpy as np
import torch
from monai.bundle import ConfigWorkflow
from PIL import Image
from utils import check_workflow

BUNDLE_ROOT = "models/mednist_classification"
CLASSES = ["AbdomenCT", "BreastMRI", "CXR", "ChestCT", "Hand", "HeadCT"]

TEST_CASE_TRAIN = {  # train, then evaluate the test split
    "bundle_root": BUNDLE_ROOT,
    "train#trainer#max_epochs": 1,
    "batch_size": 8,
    "cache_num_workers": 1,
}

TEST_CASE_INFER = {"bundle_root": BUNDLE_ROOT, "batch_size": 4}


def test_order(test_name1, test_name2):
    def get_order(name):
        if "train" in name:
            return 1
        if "infer" in name:
            return 2
        return 3

    return get_order(test_name1) - get_order(test_name2)


class TestMedNISTClassification(unittest.TestCase):
    def setUp(self):
        self.dataset_dir = tempfile.mkdtemp()
        self.output_dir = tempfile.mkdtemp()
        rng = np.random.default_rng(0)
        for label, name in enumerate(CLASSES):
            folder = os.path.join(self.dataset_dir, "MedNIST", name)
            os.makedirs(folder)
            for i in range(10):
                image = rng.integers(0, 40, (64, 64)) + 30 * label  # six intensity levels, one a class
                Image.fromarray(image.astype(np.uint8)).save(os.path.join(folder, f"{i:06d}.jpeg"))

    def tearDown(self):
        shutil.rmtree(self.dataset_dir)
        shutil.rmtree(self.output_dir)

    def workflow(self, workflow_type, config_files, run_id, override):
        return ConfigWorkflow(
            workflow_type=workflow_type,
            config_file=[os.path.join(BUNDLE_ROOT, "configs", f) for f in config_files],
            logging_file=os.path.join(BUNDLE_ROOT, "configs/logging.conf"),
            meta_file=os.path.join(BUNDLE_ROOT, "configs/metadata.json"),
            run_id=run_id,
            **override,
        )

    def test_train_eval_config(self):
        override = {**TEST_CASE_TRAIN, "dataset_dir": self.dataset_dir, "download": False}
        override.update(output_dir=self.output_dir, ckpt_dir=os.path.join(self.output_dir, "models"))
        trainer = self.workflow("train", ["train.json"], "training", override)
        check_workflow(trainer, check_properties=True)
        self.assertTrue(os.path.isfile(os.path.join(self.output_dir, "models", "model.pt")))

        # override train.json, thus set the workflow to "train" rather than "eval"
        evaluator = self.workflow("train", ["train.json", "evaluate.json"], "evaluating", override)
        check_workflow(evaluator, check_properties=True)
        with open(os.path.join(self.output_dir, "metrics.json")) as f:
            metrics = json.load(f)
        self.assertEqual(metrics["num_images"], 6)  # 10% of each class's 10 images
        with open(os.path.join(self.output_dir, "predictions.csv")) as f:
            rows = list(csv.DictReader(f))
        self.assertAlmostEqual(metrics["accuracy"], sum(r["label"] == r["true_label"] for r in rows) / len(rows))

    def test_infer_config(self):
        models = os.path.join(self.output_dir, "models")
        os.makedirs(models)
        network = self.workflow("infer", ["inference.json"], "inference", {**TEST_CASE_INFER, "ckpt_dir": models})
        network.initialize()  # weights of the bundle's network, as the Zoo's verify_bundle.py makes them
        torch.save(network.network_def.state_dict(), os.path.join(models, "model.pt"))
        images = os.path.join(self.dataset_dir, "MedNIST", "Hand")
        override = {**TEST_CASE_INFER, "input": images, "output_dir": self.output_dir, "ckpt_dir": models}
        inferrer = self.workflow("infer", ["inference.json"], "inference", override)
        check_workflow(inferrer, check_properties=True)
        with open(os.path.join(self.output_dir, "predictions.csv")) as f:
            rows = list(csv.DictReader(f))
        self.assertEqual(len(rows), 10)  # one row per image
        self.assertTrue(all(row["label"] in CLASSES and not row["error"] for row in rows))


if __name__ == "__main__":
    loader = unittest.TestLoader()
    loader.sortTestMethodsUsing = test_order
    unittest.main(testLoader=loader)
