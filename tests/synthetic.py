"""Synthetic studies with planted PHI, for de-identification tests.

``make_study(seed)`` builds one patient's study: a CT series of ``n_ct`` slices sharing a
FrameOfReferenceUID, an RTSTRUCT whose contours reference those slices, and a Comprehensive SR
whose evidence and content reference the CT and the RTSTRUCT. Identifying values are planted
in standard elements at top level, in nested sequences (including sequences no profile
removes), in private elements (top level, nested, inside a private sequence, in the same
sequence written as UN with a defined length, in an OB) and in
curve/overlay groups. Everything is deterministic from ``seed``: UIDs, pixels, file bytes.

- ``PLANTED``: every planted PHI string (with the default ``patient_name``/``patient_id``),
  long and distinctive enough to be searched for in output bytes.
- ``original_uids(datasets)``: every non-standard UID value of the inputs, at any depth.
- ``expected_survivors(datasets, version)``: the planted strings and original UIDs that the
  given PS3.15 profile legitimately keeps (e.g. StudyDate under 2008). A "nothing survives" test
  checks ``PLANTED + original_uids - expected_survivors``.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Iterator, Sequence
from io import BytesIO
from pathlib import Path

import numpy as np
from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    UID_dictionary,
    ComprehensiveSRStorage,
    CTImageStorage,
    ExplicitVRLittleEndian,
    RTStructureSetStorage,
    generate_uid,
)

# pydicom's registered root, so synthetic originals never look like our 2.25 outputs.
UID_PREFIX = "1.2.826.0.1.3680043.8.498."
DETACHED_STUDY_MANAGEMENT = "1.2.840.10008.3.1.2.3.1"  # RTReferencedStudySequence's class

PATIENT_NAME = "PLANTEDFAMILY^PLANTEDGIVEN"
PATIENT_ID = "PID-PLANTED-0001"

# label -> planted value. Dates and times are chosen so they cannot occur inside a 2.25 UID
# or in the (binary) pixel data by chance.
PHI: dict[str, str] = {
    "patient_name": PATIENT_NAME,
    "patient_name_family": "PLANTEDFAMILY",
    "patient_name_given": "PLANTEDGIVEN",
    "patient_id": PATIENT_ID,
    "birth_date": "19450317",
    "patient_address": "12 Planted Street, Leakville",
    "other_patient_ids": "OPID-PLANTED-77",
    "other_patient_names": "OTHERPLANTED^ALIAS",
    "other_ids_seq_id": "OPIDSEQ-PLANTED-88",
    "issuer_of_patient_id": "Planted Issuer Hospital",
    "mother_birth_name": "MOTHERPLANTED^MAIDEN",
    "patient_telephone": "+99-555-PLANTED",
    "patient_comments": "Planted patient comment",
    "patient_history": "Planted additional history",
    "institution_name": "Planted General Hospital",
    "institution_address": "1 Planted Way, Leakville",
    "referring_physician": "REFPLANTED^DOCTOR",
    "operators_name": "OPPLANTED^TECH",
    "performing_physician": "PERFPLANTED^DOCTOR",
    "accession_number": "ACCPLANTED42",
    "study_id": "SIDPLANTED9",
    "study_description": "Planted study description",
    "series_description": "Planted series description",
    "station_name": "STATIONPLANTED",
    "device_serial": "SNPLANTED123",
    "protocol_name": "Planted protocol name",
    "study_date": "19990713",
    "study_time": "101112.131415",
    "series_date": "19990714",
    "acquisition_date": "19990715",
    "content_date": "19990716",
    "acquisition_datetime": "19990715101530.161718",
    "image_comments": "Planted image comment",
    "requested_procedure_id": "RPIDPLANTED",
    "scheduled_step_id": "SPSPLANTED",
    "contributing_institution": "Planted Contributing Clinic",
    "nested_issuer": "Planted Nested Issuer",
    "private_creator": "PLANTEDCORP 1.0",
    "private_note": "Private planted note",
    "private_pn": "PRIVPLANTED^NAME",
    "private_nested_note": "Nested private planted",
    "private_ob": "PLANTED-OB-BYTES",
    "private_in_private_seq": "Planted inside private sequence",
    "overlay_comment": "Planted overlay comment",
    "curve_label": "PLANTEDCURVE",
    "structure_set_label": "PLANTEDSSLABEL",
    "structure_set_name": "Planted structure set name",
    "structure_set_date": "19990720",
    "roi_name": "PLANTED GTV ROI",
    "roi_description": "Planted ROI description",
    "roi_interpreter": "INTERPPLANTED^DOC",
    "sr_person_name": "SRPNPLANTED^PERSON",
    "sr_text": "Planted finding text",
    "verifying_observer": "VERIFPLANTED^OBS",
    "verifying_organization": "Planted Verifying Org",
    "verification_datetime": "19990721120000.222324",
}
PLANTED: list[str] = list(PHI.values())


def _uid(seed: int, *label: object) -> str:
    return str(generate_uid(prefix=UID_PREFIX, entropy_srcs=[f"dicom-deid synthetic {seed}", *map(str, label)]))


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _item(**elements: object) -> Dataset:
    item = Dataset()
    for keyword, value in elements.items():
        setattr(item, keyword, value)
    return item


def _file_meta(ds: Dataset) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.preamble = b"\0" * 128


def _patient_and_study(ds: Dataset, ids: dict[str, str], patient_name: str, patient_id: str) -> None:
    """Patient, General Study and General Equipment modules, shared by every object."""
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.IssuerOfPatientID = PHI["issuer_of_patient_id"]
    ds.PatientBirthDate = PHI["birth_date"]
    ds.PatientSex = "F"
    ds.PatientAge = "054Y"
    ds.PatientAddress = PHI["patient_address"]
    ds.PatientTelephoneNumbers = PHI["patient_telephone"]
    ds.OtherPatientIDs = [PHI["other_patient_ids"], "OPID-SECOND"]
    ds.OtherPatientNames = PHI["other_patient_names"]
    ds.OtherPatientIDsSequence = DicomSequence(
        [_item(PatientID=PHI["other_ids_seq_id"], IssuerOfPatientID=PHI["issuer_of_patient_id"], TypeOfPatientID="TEXT")]
    )
    ds.PatientMotherBirthName = PHI["mother_birth_name"]
    ds.PatientComments = PHI["patient_comments"]
    ds.AdditionalPatientHistory = PHI["patient_history"]
    # A sequence no profile removes, holding the patient's identifiers: only a nested pass
    # that treats PatientName/PatientID like the top level catches these.
    ds.SourcePatientGroupIdentificationSequence = DicomSequence(
        [_item(PatientID=patient_id, PatientName=patient_name, IssuerOfPatientID=PHI["nested_issuer"])]
    )
    ds.StudyInstanceUID = ids["study"]
    ds.StudyDate = PHI["study_date"]
    ds.StudyTime = PHI["study_time"]
    ds.AccessionNumber = PHI["accession_number"]
    ds.StudyID = PHI["study_id"]
    ds.StudyDescription = PHI["study_description"]
    ds.ReferringPhysicianName = PHI["referring_physician"]
    ds.InstitutionName = PHI["institution_name"]
    ds.InstitutionAddress = PHI["institution_address"]
    ds.StationName = PHI["station_name"]
    ds.DeviceSerialNumber = PHI["device_serial"]
    ds.Manufacturer = "dicom-deid synthetic"
    ds.ManufacturerModelName = "Synth 1"
    ds.OperatorsName = PHI["operators_name"]
    ds.PerformingPhysicianName = PHI["performing_physician"]
    ds.SeriesDescription = PHI["series_description"]
    ds.ContributingEquipmentSequence = DicomSequence(
        [
            _item(
                Manufacturer="Planted Modifier Inc",
                InstitutionName=PHI["contributing_institution"],
                ContributionDateTime=PHI["acquisition_datetime"],
                PurposeOfReferenceCodeSequence=DicomSequence([_code("109103", "DCM", "Modifying Equipment")]),
            )
        ]
    )


def _private(ds: Dataset, group: int, nested_pn: str) -> None:
    block = ds.private_block(group, PHI["private_creator"], create=True)
    block.add_new(0x10, "LO", PHI["private_note"])
    block.add_new(0x11, "PN", PHI["private_pn"])
    block.add_new(0x12, "UI", ds.StudyInstanceUID)
    block.add_new(0x13, "OB", PHI["private_ob"].encode("ascii"))
    inner = _item(PatientName=nested_pn, ImageComments=PHI["private_in_private_seq"])
    block.add_new(0x14, "SQ", DicomSequence([inner]))
    # The same sequence as a converter that lost its VR writes it: UN, defined length, items
    # in implicit VR little endian (PS3.5 6.2.2); a reader sees bytes unless it looks inside.
    block.add_new(0x15, "UN", _implicit_items(inner))


def _implicit_items(*items: Dataset) -> bytes:
    """``items`` as the value of a sequence of unknown VR: defined-length items, implicit VR
    little endian."""
    out = b""
    for item in items:
        buffer = DicomBytesIO()
        buffer.is_little_endian, buffer.is_implicit_VR = True, True
        write_dataset(buffer, item)
        body = buffer.getvalue()
        out += struct.pack("<HHL", 0xFFFE, 0xE000, len(body)) + body
    return out


def _ct(seed: int, index: int, ids: dict[str, str], rows: int, columns: int,
        patient_name: str, patient_id: str) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = ids[f"ct{index}"]
    _patient_and_study(ds, ids, patient_name, patient_id)
    ds.Modality = "CT"
    ds.SeriesInstanceUID = ids["ct_series"]
    ds.SeriesNumber = 1
    ds.SeriesDate = PHI["series_date"]
    ds.AcquisitionDate = PHI["acquisition_date"]
    ds.ContentDate = PHI["content_date"]
    ds.AcquisitionDateTime = PHI["acquisition_datetime"]
    ds.ProtocolName = PHI["protocol_name"]
    ds.ImageComments = PHI["image_comments"]
    ds.InstanceNumber = index + 1
    ds.FrameOfReferenceUID = ids["frame_of_reference"]
    ds.PositionReferenceIndicator = ""
    ds.IrradiationEventUID = ids[f"irradiation{index}"]
    ds.RequestAttributesSequence = DicomSequence(
        [_item(RequestedProcedureID=PHI["requested_procedure_id"], ScheduledProcedureStepID=PHI["scheduled_step_id"])]
    )
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImagePositionPatient = [0.0, 0.0, float(index * 2)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.SliceThickness = 2.0
    ds.PixelSpacing = [1.0, 1.0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.KVP = 120
    rng = np.random.default_rng([seed, index])
    ds.PixelData = rng.integers(0, 4096, (rows, columns), dtype=np.uint16).astype("<u2").tobytes()
    if index > 0:
        # Kept by every profile (X/Z/U*) with its UIDs remapped; carries a private element.
        ref = _item(ReferencedSOPClassUID=CTImageStorage, ReferencedSOPInstanceUID=ids["ct0"])
        ref.private_block(0x0011, PHI["private_creator"], create=True).add_new(0x10, "LO", PHI["private_nested_note"])
        ds.ReferencedImageSequence = DicomSequence([ref])
    else:
        # Curve and overlay groups: removed by the PS3.15 ranges (2017c+), even at top level.
        ds.add_new(0x60000010, "US", rows)
        ds.add_new(0x60000011, "US", columns)
        ds.add_new(0x60000040, "CS", "G")
        ds.add_new(0x60000050, "SS", [1, 1])
        ds.add_new(0x60000100, "US", 1)
        ds.add_new(0x60000102, "US", 0)
        bits = (rows * columns + 7) // 8
        ds.add_new(0x60003000, "OW", bytes(rng.integers(0, 256, bits + bits % 2, dtype=np.uint8)))
        ds.add_new(0x60004000, "LT", PHI["overlay_comment"])
        ds.add_new(0x50002500, "LO", PHI["curve_label"])
    _private(ds, 0x0009, patient_name)
    _file_meta(ds)
    return ds


def _rtstruct(ids: dict[str, str], n_ct: int, patient_name: str, patient_id: str) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = RTStructureSetStorage
    ds.SOPInstanceUID = ids["rtstruct"]
    _patient_and_study(ds, ids, patient_name, patient_id)
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = ids["rt_series"]
    ds.SeriesNumber = 2
    ds.InstanceNumber = 1
    ds.StructureSetLabel = PHI["structure_set_label"]
    ds.StructureSetName = PHI["structure_set_name"]
    ds.StructureSetDate = PHI["structure_set_date"]
    ds.StructureSetTime = "080910.111213"

    def contour_images(indices: Iterable[int]) -> DicomSequence:
        return DicomSequence(
            [_item(ReferencedSOPClassUID=CTImageStorage, ReferencedSOPInstanceUID=ids[f"ct{i}"]) for i in indices]
        )

    series = _item(SeriesInstanceUID=ids["ct_series"], ContourImageSequence=contour_images(range(n_ct)))
    study = _item(
        ReferencedSOPClassUID=DETACHED_STUDY_MANAGEMENT,
        # RT quirk: a *study* UID under ReferencedSOPInstanceUID (Orthanc maps it with the study map).
        ReferencedSOPInstanceUID=ids["study"],
        RTReferencedSeriesSequence=DicomSequence([series]),
    )
    ds.ReferencedFrameOfReferenceSequence = DicomSequence(
        [_item(FrameOfReferenceUID=ids["frame_of_reference"], RTReferencedStudySequence=DicomSequence([study]))]
    )
    ds.StructureSetROISequence = DicomSequence(
        [
            _item(
                ROINumber=1,
                ReferencedFrameOfReferenceUID=ids["frame_of_reference"],
                ROIName=PHI["roi_name"],
                ROIDescription=PHI["roi_description"],
                ROIGenerationAlgorithm="MANUAL",
            )
        ]
    )
    contours = [
        _item(
            ContourImageSequence=contour_images([i]),
            ContourGeometricType="CLOSED_PLANAR",
            NumberOfContourPoints=4,
            ContourData=[2.0, 2.0, i * 2.0, 6.0, 2.0, i * 2.0, 6.0, 6.0, i * 2.0, 2.0, 6.0, i * 2.0],
        )
        for i in range(n_ct)
    ]
    ds.ROIContourSequence = DicomSequence(
        [_item(ReferencedROINumber=1, ROIDisplayColor=[255, 0, 0], ContourSequence=DicomSequence(contours))]
    )
    ds.RTROIObservationsSequence = DicomSequence(
        [
            _item(
                ObservationNumber=1,
                ReferencedROINumber=1,
                RTROIInterpretedType="GTV",
                ROIInterpreter=PHI["roi_interpreter"],
            )
        ]
    )
    _private(ds, 0x3009, patient_name)
    _file_meta(ds)
    return ds


def _sr(ids: dict[str, str], n_ct: int, patient_name: str, patient_id: str) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = ComprehensiveSRStorage
    ds.SOPInstanceUID = ids["sr"]
    _patient_and_study(ds, ids, patient_name, patient_id)
    ds.Modality = "SR"
    ds.SeriesInstanceUID = ids["sr_series"]
    ds.SeriesNumber = 3
    ds.InstanceNumber = 1
    ds.ContentDate = PHI["content_date"]
    ds.ContentTime = "121314.151617"
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "VERIFIED"
    ds.VerifyingObserverSequence = DicomSequence(
        [
            _item(
                VerifyingObserverName=PHI["verifying_observer"],
                VerifyingOrganization=PHI["verifying_organization"],
                VerificationDateTime=PHI["verification_datetime"],
                VerifyingObserverIdentificationCodeSequence=DicomSequence(),
            )
        ]
    )
    ct_refs = DicomSequence(
        [_item(ReferencedSOPClassUID=CTImageStorage, ReferencedSOPInstanceUID=ids[f"ct{i}"]) for i in range(n_ct)]
    )
    rt_refs = DicomSequence([_item(ReferencedSOPClassUID=RTStructureSetStorage, ReferencedSOPInstanceUID=ids["rtstruct"])])
    ds.CurrentRequestedProcedureEvidenceSequence = DicomSequence(
        [
            _item(
                StudyInstanceUID=ids["study"],
                ReferencedSeriesSequence=DicomSequence(
                    [
                        _item(SeriesInstanceUID=ids["ct_series"], ReferencedSOPSequence=ct_refs),
                        _item(SeriesInstanceUID=ids["rt_series"], ReferencedSOPSequence=rt_refs),
                    ]
                ),
            )
        ]
    )
    # Not in any profile: its nested AccessionNumber/RequestedProcedureID need the nested pass.
    ds.ReferencedRequestSequence = DicomSequence(
        [
            _item(
                StudyInstanceUID=ids["study"],
                AccessionNumber=PHI["accession_number"],
                RequestedProcedureID=PHI["requested_procedure_id"],
                RequestedProcedureCodeSequence=DicomSequence(),
                PlacerOrderNumberImagingServiceRequest="",
                FillerOrderNumberImagingServiceRequest="",
            )
        ]
    )
    ds.PerformedProcedureCodeSequence = DicomSequence()
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = DicomSequence([_code("126000", "DCM", "Imaging Measurement Report")])
    ds.ContinuityOfContent = "SEPARATE"
    image = _item(
        RelationshipType="CONTAINS",
        ValueType="IMAGE",
        ConceptNameCodeSequence=DicomSequence([_code("121112", "DCM", "Source of Measurement")]),
        ReferencedSOPSequence=DicomSequence(
            [_item(ReferencedSOPClassUID=CTImageStorage, ReferencedSOPInstanceUID=ids["ct0"])]
        ),
    )
    ds.ContentSequence = DicomSequence(
        [
            _item(
                RelationshipType="HAS OBS CONTEXT",
                ValueType="PNAME",
                ConceptNameCodeSequence=DicomSequence([_code("121008", "DCM", "Person Observer Name")]),
                PersonName=PHI["sr_person_name"],
            ),
            _item(
                RelationshipType="HAS OBS CONTEXT",
                ValueType="UIDREF",
                ConceptNameCodeSequence=DicomSequence([_code("121018", "DCM", "Procedure Study Instance UID")]),
                UID=ids["study"],
            ),
            _item(
                RelationshipType="CONTAINS",
                ValueType="TEXT",
                ConceptNameCodeSequence=DicomSequence([_code("121071", "DCM", "Finding")]),
                TextValue=PHI["sr_text"],
                ContentSequence=DicomSequence([image]),
            ),
        ]
    )
    _private(ds, 0x0029, patient_name)
    _file_meta(ds)
    return ds


def study_uids(seed: int = 0, n_ct: int = 3) -> dict[str, str]:
    """The original UIDs ``make_study(seed, n_ct)`` uses, by role (``study``, ``ct0``, ...)."""
    roles = ["study", "ct_series", "rt_series", "sr_series", "frame_of_reference", "rtstruct", "sr"]
    roles += [f"ct{i}" for i in range(n_ct)] + [f"irradiation{i}" for i in range(n_ct)]
    return {role: _uid(seed, role) for role in roles}


def make_study(
    seed: int = 0,
    n_ct: int = 3,
    patient_name: str = PATIENT_NAME,
    patient_id: str = PATIENT_ID,
    *,
    rows: int = 16,
    columns: int = 16,
    rtstruct: bool = True,
    sr: bool = True,
) -> list[Dataset]:
    """One patient's study: ``n_ct`` CT slices, then an RTSTRUCT and an SR referencing them.

    Every call returns new, independent datasets (nothing shared between them), identical for
    equal arguments. Different seeds give different UIDs and pixels but the same PHI strings;
    pass ``patient_name``/``patient_id`` to make a second patient.
    """
    if n_ct < 1:
        raise ValueError("n_ct must be at least 1")
    ids = study_uids(seed, n_ct)
    datasets = [_ct(seed, i, ids, rows, columns, patient_name, patient_id) for i in range(n_ct)]
    if rtstruct:
        datasets.append(_rtstruct(ids, n_ct, patient_name, patient_id))
    if sr:
        datasets.append(_sr(ids, n_ct, patient_name, patient_id))
    return datasets


def dataset_bytes(ds: Dataset) -> bytes:
    """The Part 10 file bytes of ``ds`` (explicit VR little endian, 128-byte preamble)."""
    buffer = BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def write_study(datasets: Sequence[Dataset], folder: str | Path) -> list[Path]:
    """Write ``datasets`` as ``NNN_<modality>.dcm`` files under ``folder`` (created)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, ds in enumerate(datasets):
        path = folder / f"{index:03d}_{ds.Modality}.dcm"
        path.write_bytes(dataset_bytes(ds))
        paths.append(path)
    return paths


# ---------------------------------------------------------------- what must not survive


def _walk(ds: Dataset, path: tuple[int, ...] = ()) -> Iterator[tuple[tuple[int, ...], str, object]]:
    """(tag path, VR, value) of every element at every depth; sequences are descended."""
    for elem in ds:
        here = (*path, int(elem.tag))
        if elem.VR == "SQ":
            for item in elem.value:
                yield from _walk(item, here)
        else:
            yield here, elem.VR, elem.value


def _texts(vr: str, value: object) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (bytes, bytearray)):
        return [bytes(value).decode("latin-1")]
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [t for v in value for t in _texts(vr, v)]  # type: ignore[union-attr]
    return [str(value)]


def original_uids(datasets: Iterable[Dataset]) -> set[str]:
    """Every UI value of the inputs, at any depth and in private elements, except standard
    UIDs (SOP classes, transfer syntaxes, ...), which de-identification must keep."""
    found: set[str] = set()
    for ds in datasets:
        for _path, vr, value in _walk(ds):
            if vr != "UI":
                continue
            for uid in _texts(vr, value):
                uid = uid.strip("\0 ")
                if uid and uid not in UID_dictionary:
                    found.add(uid)
    return found


def planted_paths(datasets: Iterable[Dataset], values: Iterable[str] = PLANTED) -> dict[str, set[tuple[int, ...]]]:
    """Where each value occurs: value -> set of tag paths (outermost first) holding it."""
    wanted = list(values)
    where: dict[str, set[tuple[int, ...]]] = {v: set() for v in wanted}
    for ds in datasets:
        for path, vr, value in _walk(ds):
            for text in _texts(vr, value):
                for v in wanted:
                    if v in text:
                        where[v].add(path)
    return where


def expected_survivors(datasets: Sequence[Dataset], version: str, values: Iterable[str] | None = None) -> set[str]:
    """Values (default: ``PLANTED`` and ``original_uids``) that a standard-conformant
    anonymization with ``DicomVersion`` ``version`` and an empty body legitimately keeps.

    A value is gone if every path holding it crosses an element the profile removes, clears
    or remaps (at any depth, ranges included), a private element, PatientName/PatientID or a
    hierarchy UID. Anything else survives: e.g. StudyDate under 2008.
    """
    from transforms.profiles import get_profile

    profile = get_profile(version)
    replaced = (
        profile.removals
        | profile.clearings
        | profile.uids
        | {profile.study_uid_tag, profile.series_uid_tag, profile.sop_uid_tag}
        | {profile.patient_id_tag, profile.patient_name_tag}
    )

    def gone(path: tuple[int, ...]) -> bool:
        return any(tag in replaced or (tag >> 16) % 2 == 1 or profile.in_removed_range(tag) for tag in path)

    if values is None:
        values = [*PLANTED, *sorted(original_uids(datasets))]
    where = planted_paths(datasets, values)
    return {value for value, paths in where.items() if any(not gone(p) for p in paths)}


def fingerprint(datasets: Sequence[Dataset]) -> str:
    """SHA-256 over the file bytes of ``datasets``: equal iff the study is byte-identical."""
    digest = hashlib.sha256()
    for ds in datasets:
        digest.update(dataset_bytes(ds))
    return digest.hexdigest()


# --------------------------------------------------------------------------- every profile tag

#: A plausible value for each VR (UIDs are numbered per element, see ``every_profile_tag``).
_VALUE_FOR_VR: dict[str, object] = {
    "AE": "AETITLE", "AS": "030Y", "CS": "CODE", "DA": "20200102", "DS": "1.5", "DT": "20200102030405",
    "IS": "3", "LO": "LOVALUE", "LT": "LT value", "PN": "Family^Given", "SH": "SHVAL", "ST": "ST value",
    "TM": "030405", "UC": "UC value", "UR": "http://example.org/x", "UT": "UT value",
    "FL": 1.5, "FD": 2.5, "SL": -7, "SS": -3, "UL": 7, "US": 3, "SV": -9, "UV": 9,
    "OB": b"\x01\x02", "OW": b"\x01\x02", "OD": b"\0" * 8, "OF": b"\0" * 4, "OL": b"\0" * 4, "OV": b"\0" * 8,
    "UN": b"UN", "AT": 0x00100010,
}
#: Sequences that hold every profile tag again, one item each: one the profile keeps and
#: remaps (ReferencedImageSequence), one it removes (RequestAttributesSequence), one it does
#: not list (CTDIPhantomTypeCodeSequence).
EVERY_TAG_HOLDERS = (0x00081140, 0x00400275, 0x00189346)


def _fill_every_tag(ds: Dataset, tags: Iterable[int], number: int, *, sequences: bool) -> int:
    from pydicom.datadict import dictionary_VR

    for tag in sorted(tags):
        if tag >> 16 in (0x0000, 0x0002, 0xFFFE) or tag == 0x7FE00010:
            continue
        vr = dictionary_VR(tag).split(" or ")[0]
        if vr == "SQ":
            if sequences:
                item = Dataset()
                item.CodeValue = "C1"
                item.ReferencedSOPInstanceUID = f"{UID_PREFIX}98.{number}"
                item.PatientName = "Nested^Name"
                ds.add_new(tag, "SQ", DicomSequence([item]))
        else:
            ds.add_new(tag, vr, f"{UID_PREFIX}99.{number}" if vr == "UI" else _VALUE_FOR_VR[vr])
        number += 1
    return number


def every_profile_tag(version: str) -> Dataset:
    """One instance holding every tag the ``version`` profile removes, empties or remaps (a
    value per VR; each sequence with one item holding a UID reference and a PatientName),
    at the top level and again inside one item of each of ``EVERY_TAG_HOLDERS``."""
    from transforms.profiles import get_profile

    profile = get_profile(version)
    tags = profile.removals | profile.clearings | profile.uids
    ds = Dataset()
    number = _fill_every_tag(ds, tags, 1, sequences=True)
    holder = Dataset()
    _fill_every_tag(holder, tags, number, sequences=False)
    for tag in EVERY_TAG_HOLDERS:
        ds.add_new(tag, "SQ", DicomSequence([holder]))
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture
    # (identifiers of their own per version: a server storing two of them keeps both)
    edition = "".join(c for c in version if c.isdigit())
    ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = (f"{UID_PREFIX}97.{edition}.{i}" for i in (1, 2, 3))
    ds.PatientID, ds.PatientName, ds.Modality = "PID-EVERY-TAG", "Top^Name", "OT"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds
