"""DICOM files of given pixels, as a scanner or PACS would export them: the tests' and the tools' one writer."""

from __future__ import annotations

import numpy as np


def write_dicom(path, pixels, photometric="MONOCHROME2", syntax=None, encapsulate=False, **tags) -> str:
    """A DICOM file of ``pixels`` (uint8/uint16 rows x columns, or frames x rows x columns with NumberOfFrames;
    None: a text report, no image) in transfer ``syntax`` (explicit little endian by default; RLE compressed
    by pydicom, deflated, or ``encapsulate``d as stand-in compressed bytes), with ``tags``."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate as encapsulated
    from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid

    image = "1.2.840.10008.5.1.4.1.1.7" if pixels is not None else "1.2.840.10008.5.1.4.1.1.88.11"
    ds, ds.file_meta = Dataset(), FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = image
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Modality, ds.PatientName, ds.PatientID = "OT", "Test^Synthetic", "0"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    if pixels is not None:
        pixels = np.asarray(pixels)
        ds.Rows, ds.Columns = pixels.shape[-2:]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
        ds.BitsAllocated = ds.BitsStored = pixels.dtype.itemsize * 8
        ds.HighBit, ds.PixelRepresentation = ds.BitsStored - 1, 0
        for key, value in tags.items():
            setattr(ds, key, value)
        ds.PixelData = encapsulated([pixels.tobytes()[:100]]) if encapsulate else pixels.tobytes()
        if syntax == RLELossless:
            ds.compress(RLELossless)
        elif syntax:
            ds.file_meta.TransferSyntaxUID = syntax
    ds.save_as(str(path), enforce_file_format=True)
    return str(path)
