"""Image files, read the same safe way by training, evaluation and inference: each file read once (bounded), its
kind told by its content (PNG, JPEG, NIfTI, DICOM), its header checked against what the bundle needs before any
pixel is decoded, then decoded from those bytes as one plane of gray (or three of RGB) in MONAI's (W, H) order.

Only these decoders run: Pillow restricted to PNG and JPEG (it would render EPS by running Ghostscript), nibabel
on a header without extensions, pydicom. DICOM pixels are what a viewer shows: the modality LUT (rescale), then
the first VOI LUT or window, MONOCHROME1 inverted.
"""

from __future__ import annotations

import gzip
import io
import math
import os
import struct
import zlib

import numpy as np
from monai.data import ImageReader
from monai.utils import ensure_tuple

from .files import open_regular, read_limited

IMAGE_SUFFIXES = (".png", ".jpeg", ".jpg", ".nii", ".nii.gz", ".dcm", ".dicom")
MAX_FILE_BYTES = 512 << 20  # far above a 25-megapixel image in any of the formats
MAX_PIXELS = 25_000_000
MAX_JPEG_SCANS = 100  # a progressive JPEG has about 10; each scan decodes the whole image again
MAX_NIFTI_EXTENSIONS = 1 << 20  # bytes of header extensions (nibabel reads them all, whatever they declare)
GRAY_MODES = ("L", "I;16", "I;16B", "I;16L", "I", "F")
NIFTI_TYPES = {2: np.uint8, 4: np.int16, 8: np.int32, 16: np.float32, 64: np.float64, 256: np.int8}
NIFTI_TYPES |= {512: np.uint16, 768: np.uint32}
DICOM_DECODERS = "pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg"
DEFLATED, IMPLICIT, BIG_ENDIAN = "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2", "1.2.840.10008.1.2.2"
PIXEL_DATA = 0x7FE00010
MAX_ELEMENTS, MAX_HEADER_BYTES = 10_000, 1 << 20  # a DICOM header's, before the pixel data (a CT's: ~300, 10 KB)
MAX_DECODED_BYTES = 512 << 20  # a DICOM image's decoded pixels, LUT outputs and float32 copy
DECLARED = (0x00280010, 0x00280011, 0x00280002, 0x00280100)  # Rows, Columns, SamplesPerPixel, BitsAllocated
LUTS = ((0x00281053, 0x00281052, 0x00283000), (0x00281050, 0x00283010))  # rescale or modality LUT; window or VOI


def image_suffix(path: str) -> bool:
    """Whether ``path`` is named like an image the bundle reads (DICOM files may have no suffix)."""
    name = os.path.basename(str(path)).lower()
    return name.endswith(IMAGE_SUFFIXES) or ("." not in name and is_dicom(path))


def is_dicom(path: str) -> bool:
    """Whether ``path`` is a regular file starting with DICOM's 128-byte preamble and ``DICM`` marker."""
    try:
        with open_regular(path) as f:
            return f.read(132)[128:] == b"DICM"
    except (OSError, ValueError):
        return False


def read_bytes(path: str) -> bytes:
    """The bytes of ``path``, read once, or a ``ValueError`` saying why it cannot be an image."""
    if not os.path.exists(path):
        raise ValueError("file does not exist")
    if os.path.isdir(path):
        raise ValueError("is a directory, not an image file")
    try:
        data = read_limited(path, MAX_FILE_BYTES)
    except OSError as e:  # a /proc file that fails to read
        raise ValueError(f"cannot read the file ({e.strerror or e})") from e
    return data


def content_kind(path: str, data: bytes) -> str:
    """``PNG``, ``JPEG``, ``NIfTI`` (plain or gzipped) or ``DICOM`` by the file's content alone (a service is sent
    no file name); an unreadable one is refused naming its suffix."""
    name = os.path.basename(str(path)).lower()
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data[128:132] == b"DICM":
        return "DICOM"
    head = data[:4]
    if data.startswith(b"\x1f\x8b"):  # gzip: a NIfTI's header inside?
        try:
            head = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data, 4)
        except zlib.error:
            head = b""
    if head and (int.from_bytes(head, "little") in (348, 540) or int.from_bytes(head, "big") in (348, 540)):
        return "NIfTI"
    if not name.endswith(IMAGE_SUFFIXES) and "." in name:
        suffix = os.path.splitext(name)[1]
        raise ValueError(f"unsupported file type {suffix!r}: use .png, .jpeg, .jpg, .nii, .nii.gz or DICOM")
    raise ValueError("cannot read image: its content is not PNG, JPEG, NIfTI or DICOM")


def check_size(width: int, height: int, max_pixels: int) -> None:
    if width < 1 or height < 1:
        raise ValueError(f"image of {width}x{height} pixels has no pixels")
    if width * height > max_pixels:
        raise ValueError(f"image is {width}x{height} pixels, over the {max_pixels:,} limit (decompression bomb?)")


def png_size(data: bytes) -> tuple[int, int]:
    if data[12:16] != b"IHDR" or len(data) < 24:
        raise ValueError("cannot read image: a PNG without its header")
    return struct.unpack(">II", data[16:24])


def jpeg_size(data: bytes) -> tuple[int, int]:
    """(width, height) of the first picture of a JPEG, from its markers alone; a ``ValueError`` for a corrupt one or
    one of more than :data:`MAX_JPEG_SCANS` scans (each decodes the whole picture again: a decoding bomb)."""
    i, size, scans, n = 2, None, 0, len(data)
    while i < n:
        if data[i] != 0xFF:
            raise ValueError("cannot read image: a corrupt JPEG")
        while i < n and data[i] == 0xFF:
            i += 1
        if i >= n:
            break
        marker = data[i]
        i += 1
        if marker == 0xD9:  # end of the first picture (an MPO's others follow)
            break
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:
            continue
        if i + 2 > n:
            break
        length = int.from_bytes(data[i : i + 2], "big")
        frame_header = 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) or marker == 0xF7  # F7: JPEG-LS
        if frame_header and i + 7 <= n:
            height, width = struct.unpack(">HH", data[i + 3 : i + 7])
            size = (width, height)
        i += length
        if marker == 0xDA:  # a scan: entropy-coded data up to the next marker that is not a stuffed byte or RST
            scans += 1
            if scans > MAX_JPEG_SCANS:
                raise ValueError(f"a JPEG of more than {MAX_JPEG_SCANS} scans (a decoding bomb?)")
            while True:
                i = data.find(b"\xff", i)
                if i < 0 or i + 1 >= n:
                    i = n
                    break
                if data[i + 1] == 0 or 0xD0 <= data[i + 1] <= 0xD7:
                    i += 2
                    continue
                break
    if size is None:
        raise ValueError("cannot read image: a JPEG without a frame header")
    return size


def decode_pillow(data: bytes, kind: str, channels: int, max_pixels: int):
    """A PNG or JPEG as (W, H) or (W, H, 3) and its Pillow mode, its size checked from its header first."""
    from PIL import Image

    check_size(*(png_size(data) if kind == "PNG" else jpeg_size(data)), max_pixels)
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"] if kind == "PNG" else ["JPEG", "MPO"]) as img:
            check_size(*img.size, max_pixels)
            mode = img.mode
            if channels == 3:
                img = img.convert("RGB")
            elif img.mode not in GRAY_MODES:
                img = img.convert("L")  # luma, ITU-R 601-2
            array = np.asarray(img)
    except ValueError:
        raise
    except Exception as e:  # truncated or corrupt pixel data
        raise ValueError(f"cannot read image: {type(e).__name__}: {e}") from e
    return np.swapaxes(array, 0, 1), mode


def nifti_header(head: bytes):
    """The header of a single-file NIfTI-1 or NIfTI-2 image, read by nibabel from its first 348 or 540 bytes
    (nothing more: nibabel would read every extension it declares), or a ``ValueError``."""
    import nibabel as nib

    for kind in (nib.Nifti1Header, nib.Nifti2Header):
        size = kind.template_dtype.itemsize
        if len(head) >= size + 4 and size in (struct.unpack("<i", head[:4])[0], struct.unpack(">i", head[:4])[0]):
            try:
                header = kind(binaryblock=head[:size], check=False)
            except Exception as e:
                raise ValueError(f"cannot read image: a corrupt NIfTI header ({type(e).__name__})") from e
            if header["magic"] not in (b"n+1", b"n+2"):
                raise ValueError("cannot read image: a NIfTI header of a .hdr/.img pair, not a .nii file")
            return header
    raise ValueError("cannot read image: its content is not a NIfTI header")


def decode_nifti(data: bytes, max_pixels: int):
    """A 2D NIfTI image (singleton dimensions dropped) as (W, H), from a copy holding its header, no extensions
    and its pixels: the sizes, data type and offset it declares are checked before anything is decompressed."""
    import nibabel as nib

    stream = gzip.GzipFile(fileobj=io.BytesIO(data)) if data.startswith(b"\x1f\x8b") else io.BytesIO(data)
    try:
        head = stream.read(544)
        header = nifti_header(head)
        ndim = int(header["dim"][0])
        if not 1 <= ndim <= 7:
            raise ValueError(f"cannot read image: a NIfTI header declaring {ndim} dimensions")
        shape = tuple(int(d) for d in header["dim"][1 : ndim + 1])
        if any(d < 1 for d in shape):
            raise ValueError(f"image of shape {shape} has no pixels")
        if sum(d > 1 for d in shape) > 2:
            raise ValueError(f"image of shape {shape} is not a 2D image (3D volume?): pass one 2D slice")
        plane = [d for d in shape if d > 1] + [1, 1]
        check_size(plane[0], plane[1], max_pixels)
        dtype = NIFTI_TYPES.get(int(header["datatype"]))
        if dtype is None or np.dtype(dtype).itemsize * 8 != int(header["bitpix"]):
            raise ValueError(f"cannot read image: NIfTI data type {header['datatype']} is not a supported gray type")
        start, offset = header.sizeof_hdr + 4, float(header["vox_offset"])
        if not (math.isfinite(offset) and start <= offset <= start + MAX_NIFTI_EXTENSIONS):
            raise ValueError(f"cannot read image: a NIfTI header with pixels at offset {offset}")
        offset = int(offset)
        pixels = math.prod(shape) * np.dtype(dtype).itemsize
        rest = stream.read(max(0, offset + pixels - len(head)))  # never more than the header says
    except (OSError, EOFError, zlib.error, struct.error) as e:
        raise ValueError(f"cannot read image: a corrupt NIfTI file ({type(e).__name__}: {e})") from e
    body = (head + rest)[offset : offset + pixels]
    if len(body) != pixels:
        raise ValueError("cannot read image: a NIfTI file shorter than its header says")
    clean = head[: header.sizeof_hdr] + bytes(4 + offset - start) + body  # extension flag 0: nibabel reads none
    kind = nib.Nifti1Image if header.sizeof_hdr == 348 else nib.Nifti2Image
    try:
        array = np.asanyarray(kind.from_bytes(clean).dataobj, dtype=np.float32)
    except Exception as e:
        raise ValueError(f"cannot read image: {type(e).__name__}: {e}") from e
    return array.reshape(plane[:2]), f"NIfTI {np.dtype(dtype).name}"


VRS = frozenset(
    b"AE AS AT CS DA DS DT FL FD IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV".split()
)
NATIVE_SYNTAXES = {IMPLICIT, "1.2.840.10008.1.2.1", BIG_ENDIAN, DEFLATED}
RLE_SYNTAX = "1.2.840.10008.1.2.5"
JPEG_SYNTAXES = {f"1.2.840.10008.1.2.4.{n}" for n in (50, 51, 57, 70, 80, 81)}  # JPEG and JPEG-LS
JPEG2000_SYNTAXES = {"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"}
PHOTOMETRICS = {1: ("MONOCHROME1", "MONOCHROME2"), 3: ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT")}


def dicom_meta(data: bytes) -> tuple[str, int]:
    """The transfer syntax UID of a DICOM file's meta information and where that group ends; a ``ValueError``
    unless the group is as the standard writes it (explicit VR little endian, every VR a real one), so that it
    reads the same here and in pydicom."""
    i, syntax = 132, ""
    while i + 8 <= len(data) and data[i : i + 2] == b"\x02\x00":
        element, vr = struct.unpack("<H", data[i + 2 : i + 4])[0], data[i + 4 : i + 6]
        if vr not in VRS:
            raise ValueError("cannot read image: a DICOM file whose meta information is not explicit VR")
        if vr in (b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"):
            length, start = struct.unpack("<I", data[i + 8 : i + 12])[0], i + 12
        else:
            length, start = struct.unpack("<H", data[i + 6 : i + 8])[0], i + 8
        if element == 0x0010:
            syntax = data[start : start + length].rstrip(b"\0 ").decode("ascii", "replace")
        i = start + length
    if not syntax:
        raise ValueError("cannot read image: a DICOM file naming no transfer syntax in its meta information")
    return syntax, i


def rle_lengths(frame: bytes, most: int) -> list[int]:
    """The decoded length of each segment of an RLE frame, counted from its runs (stopping past ``most``)."""
    count = struct.unpack("<I", frame[:4])[0] if len(frame) >= 64 else 0
    if not 1 <= count <= 15:
        raise ValueError("cannot read image: a corrupt RLE frame")
    offsets = [*struct.unpack("<15I", frame[4:64])[:count], len(frame)]
    lengths = []
    for start, end in zip(offsets, offsets[1:]):
        i, n = start, 0
        while i < end and n <= most:
            c = frame[i]
            n, i = (n + c + 1, i + c + 2) if c < 128 else (n + 257 - c, i + 2) if c > 128 else (n, i + 1)
        lengths.append(n)
    return lengths


def check_dicom_pixels(ds, syntax: str, rows: int, columns: int) -> None:
    """Before pydicom decodes: the pixel data holds exactly the image its header declares (native: its byte
    count; compressed: the frame's own size, from its JPEG or JPEG 2000 markers or its RLE runs)."""
    from pydicom.encaps import generate_frames
    from pydicom.pixels import get_decoder
    from pydicom.pixels.utils import get_expected_length
    from pydicom.uid import UID

    if syntax in NATIVE_SYNTAXES:
        expected = get_expected_length(ds, unit="bytes")
        if len(ds.PixelData) not in (expected, expected + 1):  # one byte of padding to an even length
            raise ValueError(f"pixel data of {len(ds.PixelData):,} bytes, not the {expected:,} its header declares")
        return
    if syntax not in JPEG_SYNTAXES | JPEG2000_SYNTAXES | {RLE_SYNTAX}:
        raise ValueError(
            f"transfer syntax {syntax} is not one the bundle reads (native, deflate, RLE, JPEG, JPEG 2000)"
        )
    if not get_decoder(syntax).is_available:
        raise ValueError(f"cannot decode its transfer syntax {UID(syntax).name}: {DICOM_DECODERS}")
    try:
        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    except Exception as e:
        raise ValueError(f"cannot read image: corrupt encapsulated pixel data ({type(e).__name__})") from e
    if syntax == RLE_SYNTAX:
        pixels = rows * columns  # a segment's even-length padding may decode to a few bytes more
        if any(not pixels <= n <= pixels + 256 for n in rle_lengths(frame, pixels + 256)):
            raise ValueError(f"an RLE frame that does not decode to its {columns}x{rows} pixels")
        return
    if syntax in JPEG_SYNTAXES:
        size = jpeg_size(frame)
    else:
        at = frame.find(b"\xff\x4f\xff\x51")  # the codestream's start and SIZ marker
        if at < 0 or len(frame) < at + 24:
            raise ValueError("cannot read image: a JPEG 2000 frame without its size marker")
        width, height, left, top = struct.unpack(">IIII", frame[at + 8 : at + 24])
        size = (width - left, height - top)
    if size != (columns, rows):
        raise ValueError(f"a compressed frame of {size[0]}x{size[1]} pixels in a {columns}x{rows} DICOM image")


def check_dicom_header(header: bytes, syntax: str) -> None:
    """Before pydicom builds a dataset: its elements before the pixel data, read by pydicom's element generator
    from at most :data:`MAX_HEADER_BYTES` (larger values skipped), are at most :data:`MAX_ELEMENTS` and end at
    the pixel data (millions of empty elements take gigabytes as a dataset), and decoding the image they
    declare takes at most :data:`MAX_DECODED_BYTES`: its pixels at their bit depth, the float64 outputs of the
    rescale and window pydicom applies, the bundle's float32 copy."""
    from pydicom.filereader import data_element_generator

    seen, values = [], {}

    def stop(tag, vr, length) -> bool:
        seen.append(tag)
        return tag == PIXEL_DATA or len(seen) > MAX_ELEMENTS

    order = "big" if syntax == BIG_ENDIAN else "little"
    try:
        for element in data_element_generator(io.BytesIO(header), syntax == IMPLICIT, order == "little", stop, 64):
            values[int(element.tag)] = element.value
    except Exception:  # the header cut at its bound, or corrupt: judged by what was seen
        pass
    if len(seen) > MAX_ELEMENTS:
        raise ValueError(f"a DICOM header of over {MAX_ELEMENTS:,} elements (a bomb?)")
    if (not seen or seen[-1] != PIXEL_DATA) and len(header) >= MAX_HEADER_BYTES:  # shorter: a dataset without pixels
        raise ValueError(f"a DICOM header of over {MAX_HEADER_BYTES >> 20} MiB before its pixel data (a bomb?)")
    rows, columns, samples, bits = (int.from_bytes((values.get(t) or b"")[:2], order) for t in DECLARED)
    luts = sum(any(t in values for t in lut) for lut in LUTS)  # each gives pydicom's float64 output
    decoded = rows * columns * max(samples, 1) * (bits / 8 + 4 + 8 * luts * (samples < 2))
    if decoded > MAX_DECODED_BYTES:
        raise ValueError(f"decoding its {columns}x{rows} pixels of {bits} bits would take {decoded / 2**20:,.0f} "
                         f"MiB, over the {MAX_DECODED_BYTES >> 20} MiB an image may")  # fmt: skip


def decode_dicom(data: bytes, channels: int, max_pixels: int):
    """A single-frame DICOM image as a viewer shows it, as (W, H) (or (W, H, 3) of RGB), and its kind."""
    from pydicom.filereader import read_partial
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    syntax, end = dicom_meta(data)
    header = data[end : end + MAX_HEADER_BYTES]
    if syntax == DEFLATED:  # pydicom inflates the whole dataset at once: its size counted first, a MiB at a time
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        try:
            header = inflater.decompress(data[end:], MAX_HEADER_BYTES)
            size, out = len(header), header
            while out and size <= MAX_FILE_BYTES:
                out = inflater.decompress(inflater.unconsumed_tail, 1 << 20)
                size += len(out)
        except zlib.error as e:
            raise ValueError(f"cannot read image: a corrupt deflated DICOM ({e})") from e
        if size > MAX_FILE_BYTES:
            raise ValueError(f"a deflated DICOM inflating to over {MAX_FILE_BYTES >> 20} MiB (a bomb?)")
    check_dicom_header(header, syntax)
    try:  # the elements after the pixel data are never read
        ds = read_partial(io.BytesIO(data), stop_when=lambda tag, vr, length: tag > PIXEL_DATA)
    except Exception as e:
        raise ValueError(f"cannot read image: not a readable DICOM file ({type(e).__name__}: {e})") from e
    if str(ds.file_meta.get("TransferSyntaxUID", "")) != syntax:
        raise ValueError("cannot read image: a DICOM file whose meta information reads two ways")
    if "PixelData" not in ds:
        what = getattr(ds.get("SOPClassUID"), "name", "") or "a DICOM object"
        raise ValueError(f"it holds no image ({what}): pass DICOM images")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise ValueError(f"a multi-frame DICOM ({frames} frames): pass single-frame images")
    rows, columns = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    check_size(columns, rows, max_pixels)
    photometric = str(ds.get("PhotometricInterpretation", ""))
    samples, bits = int(ds.get("SamplesPerPixel", 1)), int(ds.get("BitsAllocated", 0))
    if samples not in PHOTOMETRICS or bits not in (1, 8, 16, 32) or not 1 <= ds.get("BitsStored", bits) <= bits:
        raise ValueError(f"cannot read image: a DICOM image of {samples} samples of {ds.get('BitsAllocated')} bits")
    if photometric not in PHOTOMETRICS[samples]:
        allowed = " or ".join(PHOTOMETRICS[samples])
        raise ValueError(f"a DICOM image in {photometric or 'no'} colour space: the bundle reads {allowed}")
    check_dicom_pixels(ds, syntax, rows, columns)
    try:
        array = ds.pixel_array
    except Exception as e:
        name = getattr(ds.file_meta.get("TransferSyntaxUID"), "name", syntax)
        if isinstance(e, (NotImplementedError, RuntimeError)) and "plugin" in str(e).lower():
            raise ValueError(f"cannot decode its transfer syntax {name}: {DICOM_DECODERS}") from e
        raise ValueError(f"cannot read image: its pixel data ({name}): {type(e).__name__}: {e}") from e
    if array.ndim == 3:  # RGB (pydicom has converted YBR)
        array = array.astype(np.float32)
        gray = array @ np.array([0.299, 0.587, 0.114], np.float32)
        array = array if channels == 3 else gray
    else:
        array = apply_voi_lut(apply_modality_lut(array, ds), ds, index=0).astype(np.float32)
        if photometric == "MONOCHROME1":  # bright is low: inverted, as a viewer shows it
            array = -array
        if channels == 3:
            array = np.repeat(array[..., None], 3, axis=-1)
    bits = ds.get("BitsStored", ds.get("BitsAllocated"))
    return np.swapaxes(array, 0, 1), f"DICOM {photometric} {bits}-bit"


def dicom_uid(source) -> str:
    """The SOPInstanceUID of a DICOM file (a path, or its bytes) the reader has accepted, else ``""``: what a row
    names of a DICOM image besides its path (never a patient's name, ID or birth date)."""
    import pydicom

    try:
        if isinstance(source, bytes):
            data = source
        elif is_dicom(source):
            data = read_limited(source, MAX_FILE_BYTES)
        else:
            return ""
        if data[128:132] != b"DICM":
            return ""
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
        return str(ds.get("SOPInstanceUID", ""))
    except Exception:
        return ""


def read_image(path: str, channels: int = 1, max_pixels: int = MAX_PIXELS):
    """The image file ``path`` as a float32 array, (W, H) for ``channels`` 1 (colour to luma) or (W, H, 3) for 3
    (gray repeated), and its kind (``PNG L``, ``DICOM MONOCHROME2 16-bit``...); a ``ValueError`` saying why not."""
    return decode_image(read_bytes(path), channels, max_pixels, path)


def decode_image(data: bytes, channels: int = 1, max_pixels: int = MAX_PIXELS, path: str = ""):
    """An image file's bytes ``data`` decoded as :func:`read_image` does (its kind told by its content; ``path``
    only names an unknown suffix in the refusal)."""
    if not data:
        raise ValueError("file is empty")
    if len(data) > MAX_FILE_BYTES:
        raise ValueError(f"file is over {MAX_FILE_BYTES:,} bytes")
    kind = content_kind(path, data)
    if kind in ("PNG", "JPEG"):
        array, mode = decode_pillow(data, kind, channels, max_pixels)
        mode = f"{kind} {mode}"
    elif kind == "DICOM":
        array, mode = decode_dicom(data, channels, max_pixels)
    else:
        array, mode = decode_nifti(data, max_pixels)
    array = np.asarray(array, dtype=np.float32)
    if channels == 3 and array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if not np.isfinite(array).all():
        raise ValueError("image has values that are not finite numbers")
    return array, mode


class Unreadable:
    """What :meth:`SafeImageReader.read` returns for a file it refuses: its reason, raised by ``get_data`` (MONAI's
    ``LoadImage`` would fold an error raised while reading into a message of its own)."""

    __slots__ = ("error",)

    def __init__(self, error: ValueError):
        self.error = error


class SafeImageReader(ImageReader):
    """MONAI ``ImageReader`` of PNG, JPEG, 2D NIfTI and single-frame DICOM files through :func:`read_image`: one
    channel (``channels`` 1: ``no_channel``) or RGB last (3), ``spatial_shape`` (W, H) and the file's ``mode``."""

    def __init__(self, channels: int = 1, max_pixels: int = MAX_PIXELS):
        super().__init__()
        self.channels, self.max_pixels = int(channels), int(max_pixels)

    def verify_suffix(self, filename) -> bool:
        return all(image_suffix(str(f)) for f in ensure_tuple(filename))

    def read(self, data, **kwargs):
        """A file's path, or its bytes (a service's input), read to (array, kind), or an :class:`Unreadable`."""
        try:
            if isinstance(data, bytes):
                return decode_image(data, self.channels, self.max_pixels)
            paths = ensure_tuple(data)
            if len(paths) != 1:
                raise ValueError(f"one file at a time, not {len(paths)}")
            return read_image(str(paths[0]), self.channels, self.max_pixels)
        except ValueError as e:
            return Unreadable(e)

    def get_data(self, img) -> tuple[np.ndarray, dict]:
        if isinstance(img, Unreadable):
            raise img.error
        array, mode = img
        meta = {"original_channel_dim": "no_channel" if array.ndim == 2 else -1, "mode": mode}
        meta["spatial_shape"] = np.asarray(array.shape[:2])
        return array, meta
