"""Image files (scripts.images): each kind read as the bundle's one reader reads it, DICOM as a viewer shows it,
and files that declare more than the bundle needs refused from their headers, quickly and in little memory."""

from __future__ import annotations

import gzip
import io
import os
import struct
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from conftest import BUNDLE, class_image, infer, write_dicom
from scripts.images import read_image


@pytest.fixture(scope="module")
def picture():
    """A MedNIST-like 64 x 64 gray image (uint8) and the array the bundle reads from its PNG (W, H)."""
    gray = class_image(4, np.random.default_rng(0))
    return gray, gray.T.astype(np.float32)


def test_each_kind_reads_to_the_same_pixels(picture, tmp_path):
    gray, expected = picture
    Image.fromarray(gray).save(tmp_path / "a.png")
    Image.fromarray(gray).convert("RGB").save(tmp_path / "rgb.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "g16.png")
    nib.save(nib.Nifti1Image(gray.T.astype(np.float32), np.eye(4)), tmp_path / "a.nii.gz")
    nib.save(nib.Nifti2Image(gray.T[..., None].astype(np.int16), np.eye(4)), tmp_path / "b.nii")
    write_dicom(tmp_path / "a.dcm", gray)
    write_dicom(tmp_path / "noext", gray)
    for name in ("a.png", "rgb.png", "a.nii.gz", "b.nii", "a.dcm", "noext"):
        array, kind = read_image(str(tmp_path / name))
        assert array.shape == (64, 64) and np.array_equal(array, expected), (name, kind)
    assert np.array_equal(read_image(str(tmp_path / "g16.png"))[0], expected * 257)
    rgb, _ = read_image(str(tmp_path / "a.png"), channels=3)
    assert rgb.shape == (64, 64, 3) and all(np.array_equal(rgb[..., c], expected) for c in range(3))


@pytest.mark.parametrize(
    "encoding", ["8-bit", "16-bit rescaled and windowed", "MONOCHROME1", "RLE", "deflated", "no suffix"]
)
def test_dicom_is_read_as_a_viewer_shows_it(encoding, picture, tmp_path):
    """The modality LUT, then the window, MONOCHROME1 inverted: after the bundle's min-max scaling, the same
    pixels as the 8-bit rendering (within the rounding of an 8-bit display)."""
    from scripts.images import DEFLATED

    gray, expected = picture
    path = tmp_path / ("image" if encoding == "no suffix" else "image.dcm")
    if encoding == "16-bit rescaled and windowed":
        center, width = 40.0, 400.0  # a soft-tissue window; air and bone far outside it
        hu = gray.astype(np.float64) / 255 * width + center - width / 2
        stored = np.round(hu + 1024).astype(np.uint16)
        stored[:4], stored[-4:] = 0, 3000  # outside the window: shown black and white
        write_dicom(path, stored, RescaleSlope=1.0, RescaleIntercept=-1024.0, WindowCenter=center, WindowWidth=width)
        display = np.clip(gray.astype(np.float64), 0, 255)
        display[:4], display[-4:] = 0, 255
        expected = display.T.astype(np.float32)
    elif encoding == "MONOCHROME1":
        write_dicom(path, 255 - gray, photometric="MONOCHROME1")
    else:
        syntax = {"RLE": "1.2.840.10008.1.2.5", "deflated": DEFLATED}.get(encoding)
        write_dicom(path, gray, syntax=syntax)
    array, kind = read_image(str(path))

    def scaled(x):  # as the bundle's ScaleIntensityd does
        return (x - x.min()) / (x.max() - x.min())

    assert kind.startswith("DICOM") and np.abs(scaled(array) - scaled(expected)).max() < 0.01, kind


def test_dicom_without_one_image_gets_its_reason(picture, tmp_path):
    gray, _ = picture
    write_dicom(tmp_path / "frames.dcm", np.stack([gray, gray]), NumberOfFrames=2)
    write_dicom(tmp_path / "report.dcm", None)
    write_dicom(tmp_path / "jpegls.dcm", gray, syntax="1.2.840.10008.1.2.4.80", encapsulate=True)
    reasons = {}
    for name in ("frames.dcm", "report.dcm", "jpegls.dcm"):
        with pytest.raises(ValueError) as err:
            read_image(str(tmp_path / name))
        reasons[name] = str(err.value)
    assert "a multi-frame DICOM (2 frames)" in reasons["frames.dcm"]
    assert "it holds no image" in reasons["report.dcm"]
    assert "JPEG-LS" in reasons["jpegls.dcm"] and "pip install pylibjpeg" in reasons["jpegls.dcm"]


def nifti_with_extensions(size: int, count: int) -> bytes:
    """A gzipped NIfTI-1 of a 64 x 64 slice whose header announces ``count`` extensions of ``size`` bytes each
    (they compress to almost nothing): what nibabel reads in full."""
    header = nib.Nifti1Header()
    header.set_data_shape((64, 64))
    header.set_data_dtype(np.uint8)
    raw = bytearray(header.binaryblock)
    offset = 352 + count * size
    raw[108:112] = struct.pack("<f", float(offset))
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=1) as f:
        f.write(bytes(raw) + b"\x01\0\0\0")
        for _ in range(count):
            f.write(struct.pack("<ii", size, 4))  # the extension's size counts these 8 bytes
            for _ in range(size // (8 << 20) - 1):
                f.write(b"x" * (8 << 20))  # not zeros: nibabel strips a trailing null padding
            f.write(b"x" * ((8 << 20) - 8))
        f.write(bytes(64 * 64))
    return out.getvalue()


def progressive_jpeg_with_scans(scans: int) -> bytes:
    """A small progressive JPEG with its scans repeated to ``scans`` (each decodes the whole picture again)."""
    buffer = io.BytesIO()
    Image.fromarray(class_image(0, np.random.default_rng(0))).save(buffer, "JPEG", progressive=True)
    data = buffer.getvalue()
    last = data.rindex(b"\xff\xda")
    return data[:last] + data[last:-2] * (scans - data.count(b"\xff\xda") + 1) + b"\xff\xd9"


def read_in_fresh_process(folder, names, timeout: int) -> dict:
    """Each of ``names`` in ``folder`` read by the bundle's reader in a fresh process: per name its refusal
    (``"read"`` if accepted), the process's peak memory (VmHWM, which exec resets) and that peak before any file
    was read (``base_mib``: the imports)."""
    import json

    code = f"""
import json, sys
sys.path.insert(0, {BUNDLE!r})
from scripts.images import read_image
out = {{"base_mib": next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024}}
for name in {list(names)!r}:
    try:
        read_image({str(folder)!r} + "/" + name)
        out[name] = "read"
    except ValueError as e:
        out[name] = str(e)
out["peak_mib"] = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
print(json.dumps(out))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak memory read from /proc")
def test_files_declaring_more_than_the_bundle_needs_are_refused_at_once(tmp_path):
    """Bombs under every size limit: a NIfTI of 2 MB whose header extensions declare 512 MiB, a progressive JPEG
    of 20,000 scans, a PNG of 60,000 x 60,000 pixels, a NIfTI of shape (0, 64): each refused from its header in a
    fresh process whose peak memory (VmHWM, which exec resets) stays under 1 GiB; nibabel alone (the control)
    reads the extensions in full."""
    (tmp_path / "ext.nii.gz").write_bytes(nifti_with_extensions(64 << 20, 8))
    (tmp_path / "scans.jpg").write_bytes(progressive_jpeg_with_scans(20_000))
    png = io.BytesIO()
    Image.new("1", (1, 1)).save(png, "PNG")
    data = png.getvalue()
    ihdr = b"IHDR" + struct.pack(">II", 60_000, 60_000) + data[24:29]
    (tmp_path / "wide.png").write_bytes(data[:8] + struct.pack(">I", 13) + ihdr + struct.pack(">I", 0) + data[33:])
    nib.save(nib.Nifti1Image(np.zeros((0, 64), np.float32), np.eye(4)), tmp_path / "empty.nii")
    assert os.path.getsize(tmp_path / "ext.nii.gz") < 3 << 20
    out = read_in_fresh_process(tmp_path, ["ext.nii.gz", "scans.jpg", "wide.png", "empty.nii"], timeout=300)
    assert "with pixels at offset" in out["ext.nii.gz"]
    assert "more than 100 scans" in out["scans.jpg"]
    assert "over the 25,000,000 limit" in out["wide.png"]
    assert "has no pixels" in out["empty.nii"]
    assert out["peak_mib"] < 1024, out
    control = f"""
import nibabel
image = nibabel.load({str(tmp_path / 'ext.nii.gz')!r})
print(len(image.header.extensions), sum(len(e.get_content()) for e in image.header.extensions) >> 20)
"""
    proc = subprocess.run([sys.executable, "-c", control], capture_output=True, text=True, timeout=300)
    extensions, mib = map(int, proc.stdout.split())
    assert extensions == 8 and mib >= 511, proc.stdout  # nibabel read the 512 MiB the header declared


def test_every_bad_input_costs_its_own_row(trained, mednist, tmp_path, monkeypatch):
    """A NIfTI of shape (0, 64), a 250-character file name with pictures on, file names a spreadsheet would take
    for a formula or MONAI for an expression, given in an input list (never evaluated), a named pipe and a file
    name that is not UTF-8 in a folder: each good image is predicted, each bad one gets its row, and no cell of
    predictions.csv is a formula."""
    import csv
    import shutil

    folder = tmp_path / "in"
    folder.mkdir()
    hand = os.path.join(mednist, "MedNIST", "Hand", "000000.jpeg")
    names = ["h" * 245 + ".jpeg", "=HYPERLINK(1).jpeg", "$__import__('os').jpeg", "+1.jpeg"]
    for name in names:
        shutil.copy(hand, folder / name)
    nib.save(nib.Nifti1Image(np.zeros((0, 64), np.float32), np.eye(4)), folder / "empty.nii")
    (tmp_path / "inputs.txt").write_text(
        "# one path a line\n" + "\n".join(["in/empty.nii", *(f"in/{n}" for n in names)])
    )
    infer(trained, tmp_path / "out", None, input_list=tmp_path / "inputs.txt", visualize="true")
    with open(tmp_path / "out" / "predictions.csv", newline="") as f:
        rows = {os.path.basename(r["path"]): r for r in csv.DictReader(f)}
    assert "has no pixels" in rows["empty.nii"]["error"] and len(rows) == 5
    for name in names:
        assert rows[name]["label"] == "Hand" and not rows[name]["error"], name
    pictures = sorted(os.listdir(tmp_path / "out" / "visualizations"))
    assert len(pictures) == 4 and max(map(len, pictures)) <= len("0000_") + 40 + len(".png")
    os.mkfifo(folder / "pipe.png")  # would block a reader forever
    shutil.copy(hand, os.path.join(os.fsencode(folder), b"\xff-latin1.jpeg"))  # a name that is not UTF-8
    infer(trained, tmp_path / "all", str(folder))
    with open(tmp_path / "all" / "predictions.csv", newline="") as f:
        rows = {os.path.basename(r["path"]): r for r in csv.DictReader(f)}
    assert "not a regular file" in rows["pipe.png"]["error"] and len(rows) == 7
    assert rows["\\udcff-latin1.jpeg"]["label"] == "Hand"  # escaped in the CSV, predicted
    monkeypatch.chdir(folder)  # relative paths: the cells start with the names
    infer(trained, tmp_path / "rel", [names[1], names[3]])  # (a name starting with $ MONAI would evaluate)
    with open(tmp_path / "rel" / "predictions.csv", newline="") as f:
        cells = [r["path"] for r in csv.DictReader(f)]
    assert cells == ["'=HYPERLINK(1).jpeg", "'+1.jpeg"]


def test_an_empty_folder_and_a_symlink_loop(trained, tmp_path):
    from scripts.inputs import find_inputs

    (tmp_path / "empty").mkdir()
    (tmp_path / "loop" / "a").mkdir(parents=True)
    os.symlink("..", tmp_path / "loop" / "a" / "up")
    Image.fromarray(class_image(1, np.random.default_rng(0))).save(tmp_path / "loop" / "a" / "x.png")
    found = find_inputs(f"{tmp_path}/loop/**/*.png")  # the loop not followed: x.png once, not loop/a/up/a/x.png
    assert [d["path"] for d in found] == [f"{tmp_path}/loop/a/x.png"]
    (item,) = find_inputs(str(tmp_path / "empty"))
    assert item["error"].startswith("the folder holds no images of the accepted kinds")


PATIENT = {"PatientName": "Doe^Jane", "PatientID": "PID-8812345", "PatientBirthDate": "19700101"}


def test_dicom_and_its_rendering_get_the_same_prediction(trained, mednist, tmp_path):
    """Each MedNIST-like JPEG and its DICOM encodings (8-bit, 16-bit rescaled with a window that renders to the
    JPEG's pixels, MONOCHROME1, RLE, without suffix) in one inference folder, and as an --eval_dir: the same label
    and probabilities within an 8-bit rendering's rounding; each DICOM row names its SOPInstanceUID, and no file
    the runs write (CSV, pictures, metrics) holds the patient's name, ID or birth date."""
    import csv

    import pydicom

    from conftest import CLASSES, evaluate

    folder, pairs = tmp_path / "in", {}
    folder.mkdir()
    for cls in ("Hand", "HeadCT", "CXR"):
        source = os.path.join(mednist, "MedNIST", cls, "000003.jpeg")
        gray = np.asarray(Image.open(source))
        os.symlink(source, folder / f"{cls}.jpeg")
        names = [f"{cls}_8bit.dcm", f"{cls}_mono1.dcm", f"{cls}_rle.dcm", f"{cls}_nosuffix", f"{cls}_ct16.dcm"]
        write_dicom(folder / names[0], gray, **PATIENT)
        write_dicom(folder / names[1], 255 - gray, photometric="MONOCHROME1", **PATIENT)
        write_dicom(folder / names[2], gray, syntax="1.2.840.10008.1.2.5", **PATIENT)
        write_dicom(folder / names[3], gray, **PATIENT)
        stored = np.round(gray.astype(np.float64) / 255 * 400 + 40 - 200 + 1024).astype(np.uint16)
        window = {"RescaleSlope": 1, "RescaleIntercept": -1024, "WindowCenter": 40, "WindowWidth": 400}
        write_dicom(folder / names[4], stored, **window, **PATIENT)
        pairs[f"{cls}.jpeg"] = names
    infer(trained, tmp_path / "out", folder, visualize="true")
    with open(tmp_path / "out" / "predictions.csv") as f:
        rows = {os.path.basename(r["path"]): r for r in csv.DictReader(f)}
    for jpeg, names in pairs.items():
        expected = np.array([float(rows[jpeg][c]) for c in CLASSES])
        assert rows[jpeg]["sop_instance_uid"] == ""
        for name in names:
            assert rows[name]["error"] == "" and rows[name]["label"] == rows[jpeg]["label"], name
            assert rows[name]["sop_instance_uid"] == pydicom.dcmread(folder / name).SOPInstanceUID, name
            got = np.array([float(rows[name][c]) for c in CLASSES])
            assert np.abs(got - expected).max() < (0.02 if "ct16" in name else 1e-5), name
    eval_dir = tmp_path / "eval" / "Hand"
    eval_dir.mkdir(parents=True)
    for name in pairs["Hand.jpeg"]:
        os.link(folder / name, eval_dir / name)
    evaluate(trained, tmp_path / "metrics", eval_dir=tmp_path / "eval", dataset_dir=mednist)
    with open(tmp_path / "metrics" / "predictions.csv") as f:
        assert {r["label"] for r in csv.DictReader(f)} == {rows["Hand.jpeg"]["label"]}
    written = [p for out in ("out", "metrics") for p in (tmp_path / out).rglob("*") if p.is_file()]
    assert any(p.suffix == ".png" for p in written) and any(p.name == "metrics.json" for p in written)
    for path in written:
        data = path.read_bytes()
        assert not any(value.encode() in data for value in PATIENT.values()), path


def implicit_meta(data: bytes) -> bytes:
    """A DICOM file's bytes with its meta information group rewritten in implicit VR (which the standard forbids
    there, and pydicom accepts)."""
    i, out = 132, bytearray(data[:132])
    while data[i : i + 2] == b"\x02\x00":
        vr = data[i + 4 : i + 6]
        if vr in (b"OB", b"OW", b"UN", b"UT", b"SQ"):
            length, start = struct.unpack("<I", data[i + 8 : i + 12])[0], i + 12
        else:
            length, start = struct.unpack("<H", data[i + 6 : i + 8])[0], i + 8
        out += data[i : i + 4] + struct.pack("<I", length) + data[start : start + length]
        i = start + length
    return bytes(out + data[i:])


def test_hostile_dicom_and_special_files_are_refused_before_decoding(tmp_path):
    """Only DICOM as the standard writes it, and pixel data holding exactly the declared image: a deflated file
    whose meta is implicit VR (20 MB of pixels in 20 KB), an RLE frame of 64 MB runs in a 64x64 image, a JPEG
    frame of 3000x3000 in a 64x64 image, native pixel data twice the declared size, a palette-colour image,
    a named pipe: each refused in one line, in a fresh process under 1 GiB and 5 s each; the control: pydicom
    alone inflates the first in full."""
    import pydicom

    from scripts.images import DEFLATED

    gray = np.zeros((64, 64), np.uint8)
    write_dicom(tmp_path / "deflated.dcm", np.zeros((4000, 5000), np.uint8), syntax=DEFLATED)
    (tmp_path / "implicit-bomb.dcm").write_bytes(implicit_meta((tmp_path / "deflated.dcm").read_bytes()))
    runs = struct.pack("<16I", 1, 64, *[0] * 14) + b"\x81\x00" * (512 << 10)  # each pair: 128 equal bytes
    write_dicom(tmp_path / "rle-bomb.dcm", gray, syntax="1.2.840.10008.1.2.5")
    ds = pydicom.dcmread(tmp_path / "rle-bomb.dcm")
    ds.PixelData = pydicom.encaps.encapsulate([runs])
    ds.save_as(tmp_path / "rle-bomb.dcm")
    big = io.BytesIO()
    Image.new("L", (3000, 3000)).save(big, "JPEG")
    write_dicom(tmp_path / "jpeg-frame.dcm", gray, syntax="1.2.840.10008.1.2.4.50", encapsulate=True)
    ds = pydicom.dcmread(tmp_path / "jpeg-frame.dcm")
    ds.PixelData = pydicom.encaps.encapsulate([big.getvalue()])
    ds.save_as(tmp_path / "jpeg-frame.dcm")
    write_dicom(tmp_path / "oversized.dcm", np.zeros((128, 64), np.uint8), Rows=64)
    write_dicom(tmp_path / "palette.dcm", gray, photometric="PALETTE COLOR")
    os.mkfifo(tmp_path / "pipe.dcm")
    names = ["implicit-bomb.dcm", "rle-bomb.dcm", "jpeg-frame.dcm", "oversized.dcm", "palette.dcm", "pipe.dcm"]
    assert all(os.path.getsize(tmp_path / n) < 2 << 20 for n in names[:3])
    out = read_in_fresh_process(tmp_path, names, timeout=120)
    assert "meta information is not explicit VR" in out["implicit-bomb.dcm"]
    assert "RLE frame that does not decode to its 64x64 pixels" in out["rle-bomb.dcm"]
    assert "a compressed frame of 3000x3000 pixels in a 64x64 DICOM image" in out["jpeg-frame.dcm"]
    assert "pixel data of 8,192 bytes, not the 4,096" in out["oversized.dcm"]
    assert "PALETTE COLOR colour space" in out["palette.dcm"]
    assert "not a regular file" in out["pipe.dcm"]
    assert all("\n" not in out[n] for n in names) and out["peak_mib"] < 1024, out
    inflated = pydicom.dcmread(tmp_path / "implicit-bomb.dcm")  # the control: pydicom inflates it all
    assert len(inflated.PixelData) == 4000 * 5000


ELEMENTS = 250_000  # 25 times the bound of 10,000: a header bomb that pydicom alone reads into ~80 MiB


def with_private_elements(data: bytes, count: int) -> bytes:
    """A DICOM file's bytes with ``count`` empty private elements (explicit VR, 8 bytes each) inserted at the
    start of its dataset."""
    from scripts.images import dicom_meta

    _, end = dicom_meta(data)
    tags = [(group, element) for group in range(0x0009, 0x0100, 2) for element in range(0x1000, 0x10000)][:count]
    return data[:end] + b"".join(struct.pack("<HH2sH", g, e, b"LO", 0) for g, e in tags) + data[end:]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak memory read from /proc")
def test_dicom_headers_and_decoding_are_bounded(tmp_path):
    """A header of 250,000 empty private elements before the pixels (2 MB stored, and deflated), a
    5000 x 5000 32-bit image deflated to under 1 MB whose rescale and window pydicom would apply in float64:
    each refused in one line, in a fresh process whose peak memory grows by under 64 MiB past its imports'; the
    control: pydicom's dcmread of the header bomb takes over 50 MiB more than pydicom's import."""
    import zlib

    from scripts.images import DEFLATED, dicom_meta

    write_dicom(tmp_path / "genuine.dcm", np.zeros((64, 64), np.uint8))
    genuine = (tmp_path / "genuine.dcm").read_bytes()
    (tmp_path / "elements.dcm").write_bytes(with_private_elements(genuine, ELEMENTS))
    write_dicom(tmp_path / "deflated.dcm", np.zeros((64, 64), np.uint8), syntax=DEFLATED)
    deflated = (tmp_path / "deflated.dcm").read_bytes()
    _, end = dicom_meta(deflated)
    plain = with_private_elements(genuine, ELEMENTS)[dicom_meta(genuine)[1] :]
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    (tmp_path / "elements-deflated.dcm").write_bytes(deflated[:end] + packer.compress(plain) + packer.flush())
    lut = {"RescaleSlope": "2", "RescaleIntercept": "-1", "WindowCenter": "100", "WindowWidth": "50"}
    write_dicom(tmp_path / "lut.dcm", np.zeros((5000, 5000), np.uint32), syntax=DEFLATED, **lut)
    names = ["elements.dcm", "elements-deflated.dcm", "lut.dcm"]
    assert (
        os.path.getsize(tmp_path / "elements-deflated.dcm") < 2 << 20
        and os.path.getsize(tmp_path / "lut.dcm") < 1 << 20
    )
    out = read_in_fresh_process(tmp_path, names, timeout=300)
    assert "a DICOM header of over 10,000 elements" in out["elements.dcm"] == out["elements-deflated.dcm"]
    assert "5000x5000 pixels of 32 bits would take" in out["lut.dcm"] and "over the 512 MiB" in out["lut.dcm"]
    assert all("\n" not in out[n] for n in names), out
    assert out["peak_mib"] - out["base_mib"] < 64, out
    control = f"""
import pydicom
peak = lambda: next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
base = peak()
pydicom.dcmread({str(tmp_path / 'elements.dcm')!r})
print(peak() - base)
"""
    proc = subprocess.run([sys.executable, "-c", control], capture_output=True, text=True, timeout=300)
    assert float(proc.stdout.split()[-1]) > 50, proc.stderr[-2000:]
