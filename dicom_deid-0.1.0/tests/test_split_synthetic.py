"""Generated studies whose instances reference each other, for the split and merge tests.

Study A (patient ``PAT-A``): a CT series (3 images, one frame of reference), an RTSTRUCT whose
contours lie on the CT images, an MR series (2 images) and an SR whose evidence is the MR
series. Study B (patient ``PAT-B``): one CT series (2 images) with a rich set of Patient and
General Study module tags, the merge target. UIDs are fixed so failures are readable.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
RTSTRUCT = "1.2.840.10008.5.1.4.1.1.481.3"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
STUDY_COMPONENT = "1.2.840.10008.3.1.2.3.2"  # RT Referenced Study: Study Component Management

ROOT = "1.2.826.0.1.3680043.10.1234"
STUDY_A = f"{ROOT}.1"
STUDY_B = f"{ROOT}.2"
FRAME_A = f"{ROOT}.1.9"
CT_SERIES = f"{ROOT}.1.1"
RT_SERIES = f"{ROOT}.1.2"
MR_SERIES = f"{ROOT}.1.3"
SR_SERIES = f"{ROOT}.1.4"
B_SERIES = f"{ROOT}.2.1"
CT_SOPS = tuple(f"{ROOT}.1.1.{i}" for i in (1, 2, 3))
RT_SOP = f"{ROOT}.1.2.1"
MR_SOPS = tuple(f"{ROOT}.1.3.{i}" for i in (1, 2))
SR_SOP = f"{ROOT}.1.4.1"
B_SOPS = tuple(f"{ROOT}.2.1.{i}" for i in (1, 2))
LONG_COMMENT = "x" * 300  # longer than Orthanc's 256: a merge removes it


def _base(sop_class: str, study: str, series: str, sop: str, modality: str, number: int) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.Modality = modality
    ds.InstanceNumber = number
    ds.SeriesNumber = int(series.rsplit(".", 1)[1])
    return ds


def _patient_a(ds: Dataset) -> Dataset:
    ds.PatientName = "Alpha^Ann"
    ds.PatientID = "PAT-A"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.StudyDate = "20200202"
    ds.StudyTime = "101010"
    ds.StudyID = "A1"
    ds.AccessionNumber = "ACC-A"
    ds.StudyDescription = "Study A"
    ds.ReferringPhysicianName = "Ref^A"
    ds.EthnicGroup = "Ethnic A"  # absent from the merge target: a merge removes it
    return ds


def _patient_b(ds: Dataset) -> Dataset:
    ds.PatientName = "Beta^Bob"
    ds.PatientID = "PAT-B"
    ds.PatientBirthDate = "19800303"
    ds.PatientSex = "M"
    ds.OtherPatientIDs = ["B-OLD-1", "B-OLD-2"]
    ds.PatientComments = LONG_COMMENT
    ds.StudyDate = "20210404"
    ds.StudyTime = "090909"
    ds.StudyID = "B1"
    ds.AccessionNumber = "ACC-B"
    ds.StudyDescription = "Study B"
    item = Dataset()
    item.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    item.ReferencedSOPInstanceUID = f"{ROOT}.77"
    ds.ReferencedStudySequence = Sequence([item])  # a sequence: a merge removes it
    return ds


def _image(ds: Dataset, frame: str | None) -> Dataset:
    if frame:
        ds.FrameOfReferenceUID = frame
    ds.Rows = ds.Columns = 2
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = bytes(range(8))
    return ds


def _ref(sop_class: str, sop: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop
    return item


def _rtstruct() -> Dataset:
    ds = _patient_a(_base(RTSTRUCT, STUDY_A, RT_SERIES, RT_SOP, "RTSTRUCT", 1))
    series_item = Dataset()
    series_item.SeriesInstanceUID = CT_SERIES
    series_item.ContourImageSequence = Sequence([_ref(CT_IMAGE, sop) for sop in CT_SOPS])
    study_item = _ref(STUDY_COMPONENT, STUDY_A)  # the RT quirk: a study UID in ReferencedSOPInstanceUID
    study_item.RTReferencedSeriesSequence = Sequence([series_item])
    frame_item = Dataset()
    frame_item.FrameOfReferenceUID = FRAME_A
    frame_item.RTReferencedStudySequence = Sequence([study_item])
    ds.ReferencedFrameOfReferenceSequence = Sequence([frame_item])
    roi = Dataset()
    roi.ROINumber = 1
    roi.ReferencedFrameOfReferenceUID = FRAME_A
    roi.ROIName = "Body"
    ds.StructureSetROISequence = Sequence([roi])
    contour = Dataset()
    contour.ContourImageSequence = Sequence([_ref(CT_IMAGE, CT_SOPS[1])])
    contour.ContourGeometricType = "POINT"
    contour.NumberOfContourPoints = 1
    contour.ContourData = [0.0, 0.0, 0.0]
    roi_contour = Dataset()
    roi_contour.ReferencedROINumber = 1
    roi_contour.ContourSequence = Sequence([contour])
    ds.ROIContourSequence = Sequence([roi_contour])
    return ds


def _sr() -> Dataset:
    ds = _patient_a(_base(COMPREHENSIVE_SR, STUDY_A, SR_SERIES, SR_SOP, "SR", 1))
    series_item = Dataset()
    series_item.SeriesInstanceUID = MR_SERIES
    series_item.ReferencedSOPSequence = Sequence([_ref(MR_IMAGE, sop) for sop in MR_SOPS])
    evidence = Dataset()
    evidence.StudyInstanceUID = STUDY_A
    evidence.ReferencedSeriesSequence = Sequence([series_item])
    ds.CurrentRequestedProcedureEvidenceSequence = Sequence([evidence])
    content = Dataset()
    content.RelationshipType = "CONTAINS"
    content.ValueType = "IMAGE"
    content.ReferencedSOPSequence = Sequence([_ref(MR_IMAGE, MR_SOPS[0])])
    ds.ValueType = "CONTAINER"
    ds.ContentSequence = Sequence([content])
    return ds


def make_reference_studies() -> dict[str, Dataset]:
    """File name -> dataset for studies A and B (see the module docstring)."""
    files: dict[str, Dataset] = {}
    for i, sop in enumerate(CT_SOPS, 1):
        files[f"A/ct{i}.dcm"] = _image(_patient_a(_base(CT_IMAGE, STUDY_A, CT_SERIES, sop, "CT", i)), FRAME_A)
    files["A/rtstruct.dcm"] = _rtstruct()
    for i, sop in enumerate(MR_SOPS, 1):
        files[f"A/mr{i}.dcm"] = _image(_patient_a(_base(MR_IMAGE, STUDY_A, MR_SERIES, sop, "MR", i)), None)
    files["A/sr.dcm"] = _sr()
    for i, sop in enumerate(B_SOPS, 1):
        files[f"B/ct{i}.dcm"] = _image(_patient_b(_base(CT_IMAGE, STUDY_B, B_SERIES, sop, "CT", i)), f"{ROOT}.2.9")
    return files


def write_reference_studies(folder: Path) -> dict[str, Path]:
    """Write :func:`make_reference_studies` under ``folder``; returns name -> path."""
    paths = {}
    for name, ds in make_reference_studies().items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        paths[name] = path
    return paths


def referenced_uids(ds: Dataset) -> list[tuple[str, str]]:
    """(keyword, value) of every UI element inside sequences, in document order."""
    found: list[tuple[str, str]] = []

    def walk(item: Dataset, depth: int) -> None:
        for elem in item:
            if elem.VR == "SQ":
                for sub in elem.value:
                    walk(sub, depth + 1)
            elif elem.VR == "UI" and depth > 0:
                found.append((elem.keyword, str(elem.value)))

    walk(ds, 0)
    return found


def test_generated_references_resolve(tmp_path: Path) -> None:
    paths = write_reference_studies(tmp_path)
    read = {name: pydicom.dcmread(path) for name, path in paths.items()}
    sops = {str(ds.SOPInstanceUID) for ds in read.values()}
    series = {str(ds.SeriesInstanceUID) for ds in read.values()}
    studies = {str(ds.StudyInstanceUID) for ds in read.values()}
    rt_refs = referenced_uids(read["A/rtstruct.dcm"])
    assert ("ReferencedSOPInstanceUID", STUDY_A) in rt_refs
    assert [v for k, v in rt_refs if k == "ReferencedSOPInstanceUID" and v in sops] == [*CT_SOPS, CT_SOPS[1]]
    sr_refs = referenced_uids(read["A/sr.dcm"])
    assert sr_refs == [  # tag order: evidence (0040,A375) before content (0040,A730)
        ("ReferencedSOPClassUID", MR_IMAGE),
        ("ReferencedSOPInstanceUID", MR_SOPS[0]),
        ("ReferencedSOPClassUID", MR_IMAGE),
        ("ReferencedSOPInstanceUID", MR_SOPS[1]),
        ("SeriesInstanceUID", MR_SERIES),
        ("StudyInstanceUID", STUDY_A),
        ("ReferencedSOPClassUID", MR_IMAGE),
        ("ReferencedSOPInstanceUID", MR_SOPS[0]),
    ]
    assert {MR_SERIES, CT_SERIES} <= series
    assert studies == {STUDY_A, STUDY_B}
    assert len(read) == 9
