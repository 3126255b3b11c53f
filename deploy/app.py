"""This bundle as a MONAI Deploy application (App SDK 4): a folder of images in (single-frame DICOM: CR, DX, CT, MR,
a series giving one row per slice; also PNG and JPEG), the SDK's generic ``MonaiBundleInferenceOperator`` on the
bundle folder (or its ``models/model.ts``), and out a DICOM SR per image (the SDK's
``DICOMTextSRWriterOperator``: label and confidence) and ``summary.json``::

    pip install -r deploy/requirements.txt
    python deploy/app.py -i INPUT_FOLDER -o OUTPUT_FOLDER -m BUNDLE_FOLDER_OR_MODEL_TS

Images are read by the bundle's own reader (``scripts.images``): DICOM as a viewer shows it (rescale, window,
MONOCHROME1 inverted), and every image in MONAI's (W, H) order, as ``LoadImage`` gives it to the bundle in
training. The SDK's own MedNIST example reads images with PIL as (H, W) and so feeds the model transposed images:
the orientation pitfall this app avoids. The operator drops the bundle's loader and runs the rest of its
``preprocessing`` (a channel-first step, scaling, resizing) and its ``postprocessing`` (probabilities, then the
label); the confidence is read from the probabilities the postprocessing keeps.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Dict

BUNDLE = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(BUNDLE))  # the bundle's reader, which this app shares with the bundle

from monai.deploy.conditions import CountCondition  # noqa: E402
from monai.deploy.core import AppContext, Application, Fragment, Image, IOType, Operator, OperatorSpec  # noqa: E402
from monai.deploy.operators.dicom_text_sr_writer_operator import (  # noqa: E402
    DICOMTextSRWriterOperator,
    EquipmentInfo,
    ModelInfo,
)
from monai.deploy.operators.monai_bundle_inference_operator import (  # noqa: E402
    IOMapping,
    MonaiBundleInferenceOperator,
)

from scripts.files import atomic_write  # noqa: E402
from scripts.images import image_suffix, read_image  # noqa: E402
from scripts.inputs import walk  # noqa: E402
from scripts.model_file import ModelDescription  # noqa: E402

logger = logging.getLogger(__name__)


def readable_images(folder: Path, channels: int) -> tuple[list[str], list[dict]]:
    """The image files under ``folder`` the bundle reads, and a row for each other file saying why not."""
    images, refused = [], []
    for path in walk(str(folder)):
        try:
            if not image_suffix(path):
                raise ValueError("not an image of the accepted kinds")
            read_image(path, channels)
            images.append(path)
        except ValueError as e:
            refused.append({"path": path, "error": str(e)})
    return images, refused


class ImageFiles(Operator):
    """Emits, one a compute, each image of ``paths`` as an SDK ``Image`` of the bundle's (W, H) array (a channel
    last for RGB), and its path."""

    def __init__(self, fragment: Fragment, *args, paths: list[str], channels: int = 1, **kwargs):
        self.paths, self.channels, self.index = paths, channels, 0
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.output("image")
        spec.output("path")

    def compute(self, op_input, op_output, context):
        path = self.paths[self.index]
        self.index += 1
        array, _ = read_image(path, self.channels)
        op_output.emit(Image(array), "image")
        op_output.emit(path, "path")


class BundleInference(MonaiBundleInferenceOperator):
    """The SDK's bundle operator, which emits the label its ``postprocessing`` gives (``pred``), also emitting the
    confidence: the largest of the probabilities the postprocessing keeps under ``probabilities``."""

    def setup(self, spec: OperatorSpec):
        super().setup(spec)
        spec.output("confidence")

    def post_process(self, data: Any, *args, **kwargs):
        out = super().post_process(data, *args, **kwargs)
        self.confidence = (
            float(out["probabilities"].max()) if isinstance(out, dict) and "probabilities" in out else None
        )
        return out

    def compute(self, op_input, op_output, context):
        super().compute(op_input, op_output, context)
        op_output.emit(self.confidence, "confidence")


class Summary(Operator):
    """Per image: the SR's text (``label (confidence c)``) for the SR writer, and a row of ``summary.json`` in
    ``output_folder`` (rewritten after each image, the refused files first)."""

    def __init__(self, fragment: Fragment, *args, output_folder: Path, refused: list[dict], **kwargs):
        self.path = Path(output_folder) / "summary.json"
        self.rows = list(refused)
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.input("pred")
        spec.input("confidence")
        spec.input("path")
        spec.output("text")

    def compute(self, op_input, op_output, context):
        pred, confidence, path = (op_input.receive(name) for name in ("pred", "confidence", "path"))
        label = pred["result"][0]
        self.rows.append({"path": path, "label": label, "confidence": confidence, "error": ""})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(str(self.path), lambda f: json.dump({"images": self.rows}, f, indent=1))
        shown = f"{confidence:.3f}" if confidence is not None else "unknown"
        op_output.emit(f"{label} (confidence {shown}) for {os.path.basename(path)}", "text")


class App(Application):
    """Input folder -> bundle inference -> a DICOM SR per image and summary.json."""

    def compose(self):
        context: AppContext = Application.init_app_context(self.argv)
        inputs, outputs, bundle = Path(context.input_path), Path(context.output_path), Path(context.model_path)
        if bundle.is_dir():  # a bundle folder: the operator reads its configs and models/, not a loaded model file
            context.models = None
        description = ModelDescription.beside(str(bundle / "models" / "model.pt" if bundle.is_dir() else bundle))
        images, refused = readable_images(inputs, description.in_channels)
        if not images:
            outputs.mkdir(parents=True, exist_ok=True)
            atomic_write(str(outputs / "summary.json"), lambda f: json.dump({"images": refused}, f, indent=1))
            raise SystemExit(f"ERROR: no image under {inputs} the bundle reads ({len(refused)} other files).")
        source = ImageFiles(self, CountCondition(self, len(images)), paths=images, channels=description.in_channels,
                            name="images")  # fmt: skip
        bundle_op = BundleInference(
            self,
            app_context=context,
            input_mapping=[IOMapping("image", Image, IOType.IN_MEMORY)],
            output_mapping=[IOMapping("pred", Dict[str, Any], IOType.IN_MEMORY)],
            bundle_path=bundle,
            name="bundle",
        )
        summary = Summary(self, output_folder=outputs, refused=refused, name="summary")
        sr_writer = DICOMTextSRWriterOperator(
            self,
            copy_tags=False,
            model_info=ModelInfo("MedNIST classification bundle developers", "mednist_classification", "", ""),
            equipment_info=EquipmentInfo(manufacturer="MONAI Deploy App SDK", manufacturer_model="DICOM SR Writer"),
            custom_tags={"SeriesDescription": "Not for clinical use: research and education only."},
            output_folder=outputs,
            name="sr_writer",
        )
        self.add_flow(source, bundle_op, {("image", "image")})
        self.add_flow(source, summary, {("path", "path")})
        self.add_flow(bundle_op, summary, {("pred", "pred"), ("confidence", "confidence")})
        self.add_flow(summary, sr_writer, {("text", "text")})


if __name__ == "__main__":
    App().run()
