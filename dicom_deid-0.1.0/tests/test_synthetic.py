"""The synthetic study generator: valid files, planted PHI really present, references that resolve."""

from __future__ import annotations

import pydicom
import pytest
from pydicom import config
from pydicom.uid import ComprehensiveSRStorage, CTImageStorage, RTStructureSetStorage

from tests import synthetic
from tests.synthetic import (
    PATIENT_ID,
    PATIENT_NAME,
    PHI,
    PLANTED,
    dataset_bytes,
    expected_survivors,
    fingerprint,
    make_study,
    original_uids,
    planted_paths,
    study_uids,
    write_study,
)
from transforms.dicomio import read_dataset


@pytest.fixture
def strict_pydicom():
    """Make pydicom raise on any value that does not fit its VR, reading and writing."""
    saved = config.settings.reading_validation_mode, config.settings.writing_validation_mode
    config.settings.reading_validation_mode = config.RAISE
    config.settings.writing_validation_mode = config.RAISE
    yield
    config.settings.reading_validation_mode, config.settings.writing_validation_mode = saved


@pytest.fixture(scope="module")
def study():
    return make_study()


def test_shape_of_the_study(study):
    assert [ds.Modality for ds in study] == ["CT", "CT", "CT", "RTSTRUCT", "SR"]
    assert [ds.SOPClassUID for ds in study] == [CTImageStorage] * 3 + [RTStructureSetStorage, ComprehensiveSRStorage]
    assert len({ds.SOPInstanceUID for ds in study}) == 5
    assert len({ds.StudyInstanceUID for ds in study}) == 1
    assert len({ds.SeriesInstanceUID for ds in study}) == 3
    assert [ds.Modality for ds in make_study(n_ct=1, rtstruct=False)] == ["CT", "SR"]
    with pytest.raises(ValueError, match="n_ct"):
        make_study(n_ct=0)


def test_deterministic_from_the_seed():
    assert fingerprint(make_study(seed=5)) == fingerprint(make_study(seed=5))
    a, b = make_study(seed=0), make_study(seed=1)
    assert fingerprint(a) != fingerprint(b)
    assert not original_uids(a) & original_uids(b)
    assert a[0].PatientName == b[0].PatientName == PATIENT_NAME
    assert a[0].PixelData != b[0].PixelData
    assert a[0].StudyInstanceUID == study_uids(0)["study"]
    assert a[0].StudyInstanceUID.startswith(synthetic.UID_PREFIX)


def test_datasets_share_nothing():
    a = make_study()
    a[0].OtherPatientIDsSequence[0].PatientID = "CHANGED"
    a[3].ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID = "1.2.3"
    assert a[1].OtherPatientIDsSequence[0].PatientID == PHI["other_ids_seq_id"]
    assert fingerprint(make_study()[1:3]) == fingerprint(a[1:3])


def test_files_round_trip_through_pydicom(tmp_path, strict_pydicom):
    datasets = make_study(seed=3, n_ct=4)
    paths = write_study(datasets, tmp_path / "study")
    assert [p.name for p in paths] == ["000_CT.dcm", "001_CT.dcm", "002_CT.dcm", "003_CT.dcm", "004_RTSTRUCT.dcm", "005_SR.dcm"]
    for path, original in zip(paths, datasets):
        back = pydicom.dcmread(path)
        assert back.preamble == b"\0" * 128
        assert back.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
        assert back.file_meta.MediaStorageSOPInstanceUID == original.SOPInstanceUID
        for elem in back.iterall():
            _ = elem.value  # converts the raw value: raises here if it does not fit its VR
        assert back == original
        assert path.read_bytes() == dataset_bytes(original)
    ct = pydicom.dcmread(paths[0])
    assert ct.pixel_array.shape == (16, 16)
    assert 0 <= int(ct.pixel_array.min()) and int(ct.pixel_array.max()) < 4096


def test_files_read_through_the_project_reader(study):
    for ds in study:
        back = read_dataset(dataset_bytes(ds))
        assert back.SOPInstanceUID == ds.SOPInstanceUID
        assert back.PatientName == PATIENT_NAME


def test_every_planted_value_and_original_uid_is_in_the_bytes(study):
    blob = b"".join(dataset_bytes(ds) for ds in study)
    assert [v for v in PLANTED if v.encode("latin-1") not in blob] == []
    uids = original_uids(study)
    assert len(uids) == 13  # study, 3 series, FoR, 3 CT + RTSTRUCT + SR, 3 irradiation events
    assert [u for u in uids if u.encode("ascii") not in blob] == []
    assert set(study_uids(0).values()) == uids
    # Standard UIDs are not "original" identifiers.
    assert CTImageStorage not in uids and synthetic.DETACHED_STUDY_MANAGEMENT not in uids


def test_phi_is_planted_at_top_level_nested_and_private(study):
    where = planted_paths(study)
    assert all(where[v] for v in PLANTED)
    patient_name = 0x00100010
    assert (patient_name,) in where[PATIENT_NAME]
    assert (0x00100026, patient_name) in where[PATIENT_NAME]  # SourcePatientGroupIdentificationSequence
    assert (0x00091014, patient_name) in where[PATIENT_NAME]  # inside a private sequence
    assert (0x00100026, 0x00100020) in where[PATIENT_ID]
    assert (0x00101002, 0x00100020) in where[PHI["other_ids_seq_id"]]  # OtherPatientIDsSequence
    assert (0x0018A001, 0x00080080) in where[PHI["contributing_institution"]]  # nested InstitutionName
    assert (0x0040A370, 0x00080050) in where[PHI["accession_number"]]  # ReferencedRequestSequence
    assert (0x0040A730, 0x0040A123) in where[PHI["sr_person_name"]]  # SR PNAME content item
    assert (0x00081140, 0x00111010) in where[PHI["private_nested_note"]]  # private inside a kept sequence
    assert (0x00090010,) in where[PHI["private_creator"]]
    assert (0x00091013,) in where[PHI["private_ob"]]
    assert (0x60004000,) in where[PHI["overlay_comment"]]
    assert (0x50002500,) in where[PHI["curve_label"]]


def test_private_elements(study):
    ct = study[0]
    block = ct.private_block(0x0009, PHI["private_creator"])
    assert block[0x10].value == PHI["private_note"]
    assert block[0x12].VR == "UI" and block[0x12].value == ct.StudyInstanceUID
    assert block[0x13].value == PHI["private_ob"].encode()
    assert block[0x14].value[0].PatientName == PATIENT_NAME
    assert study[3].private_block(0x3009, PHI["private_creator"])[0x11].value == PHI["private_pn"]
    nested = study[1].ReferencedImageSequence[0]
    assert nested.private_block(0x0011, PHI["private_creator"])[0x10].value == PHI["private_nested_note"]


def test_references_resolve(study):
    cts, rt, sr = study[:3], study[3], study[4]
    ct_uids = [ds.SOPInstanceUID for ds in cts]
    frame = cts[0].FrameOfReferenceUID
    assert {ds.FrameOfReferenceUID for ds in cts} == {frame}
    assert [ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID for ds in cts[1:]] == [ct_uids[0]] * 2

    ref_frame = rt.ReferencedFrameOfReferenceSequence[0]
    assert ref_frame.FrameOfReferenceUID == frame
    ref_study = ref_frame.RTReferencedStudySequence[0]
    assert ref_study.ReferencedSOPInstanceUID == cts[0].StudyInstanceUID
    ref_series = ref_study.RTReferencedSeriesSequence[0]
    assert ref_series.SeriesInstanceUID == cts[0].SeriesInstanceUID
    assert [i.ReferencedSOPInstanceUID for i in ref_series.ContourImageSequence] == ct_uids
    assert rt.StructureSetROISequence[0].ReferencedFrameOfReferenceUID == frame
    contours = rt.ROIContourSequence[0].ContourSequence
    assert [c.ContourImageSequence[0].ReferencedSOPInstanceUID for c in contours] == ct_uids

    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == cts[0].StudyInstanceUID
    series = {s.SeriesInstanceUID: [r.ReferencedSOPInstanceUID for r in s.ReferencedSOPSequence]
              for s in evidence.ReferencedSeriesSequence}
    assert series == {cts[0].SeriesInstanceUID: ct_uids, rt.SeriesInstanceUID: [rt.SOPInstanceUID]}
    uidref = sr.ContentSequence[1]
    assert uidref.ValueType == "UIDREF" and uidref.UID == cts[0].StudyInstanceUID
    image = sr.ContentSequence[2].ContentSequence[0]
    assert image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == ct_uids[0]


def test_second_patient(tmp_path):
    other = make_study(seed=7, patient_name="SECONDFAMILY^PAT", patient_id="PID-SECOND-2")
    blob = b"".join(dataset_bytes(ds) for ds in other)
    assert PATIENT_NAME.encode() not in blob and PATIENT_ID.encode() not in blob
    assert blob.count(b"SECONDFAMILY^PAT") == 4 * 5  # top level, nested, private sequence (SQ, UN) in 5 objects
    assert {ds.PatientID for ds in other} == {"PID-SECOND-2"}


def test_expected_survivors_per_profile(study):
    assert expected_survivors(study, "2023b") == set()
    assert expected_survivors(study, "2021b") == {
        PHI["acquisition_date"],  # inside ContributingEquipmentSequence's ContributionDateTime
        PHI["acquisition_datetime"],  # ContributionDateTime: cleared only from 2023b
    }
    assert expected_survivors(study, "2017c") == {
        PHI["acquisition_date"],
        PHI["acquisition_datetime"],
        PHI["structure_set_label"],
        PHI["structure_set_name"],
        PHI["structure_set_date"],
        PHI["roi_name"],
        PHI["roi_description"],
        PHI["roi_interpreter"],
    }
    survivors_2008 = expected_survivors(study, "2008")
    irradiation = {study_uids(0)[f"irradiation{i}"] for i in range(3)}
    assert irradiation <= survivors_2008  # IrradiationEventUID is not in the 2008 UID list
    assert PHI["study_date"] in survivors_2008 and PHI["overlay_comment"] in survivors_2008
    assert PATIENT_NAME not in survivors_2008 and PHI["private_note"] not in survivors_2008
    assert study_uids(0)["study"] not in survivors_2008
    # Each of these values has a path none of whose elements is in Orthanc's 2008 list (54
    # tags, no 50xx/60xx ranges: ../shared/reference/orthanc-profiles.json, profiles "2008";
    # checked tag by tag), private or an identifier that is always replaced: dates and times
    # (0008,0020/0021/0022/0023/002A/0030; ContributionDateTime 0018,A002), CurveLabel
    # (50xx,2500), OverlayComments (60xx,4000), IssuerOfPatientID 0010,0021 (top level and in
    # SourcePatientGroupIdentificationSequence 0010,0026), PatientMotherBirthName 0010,1060,
    # RequestedProcedureID 0040,1001 under ReferencedRequestSequence 0040,A370 (the path
    # through RequestAttributesSequence 0040,0275, which the list has, is gone), the RT
    # structure set's label/name/date 3006,0002/0004/0008, ROIName/ROIDescription
    # 3006,0026/0028 (StructureSetROISequence 3006,0020), ROIInterpreter 3006,00A6,
    # VerifyingObserverSequence 0040,A073 and its items, and IrradiationEventUID 0008,3010.
    assert survivors_2008 == irradiation | {PHI[name] for name in (
        "study_date", "series_date", "acquisition_date", "content_date", "acquisition_datetime",
        "study_time", "curve_label", "overlay_comment", "issuer_of_patient_id", "nested_issuer",
        "mother_birth_name", "requested_procedure_id", "structure_set_label", "structure_set_name",
        "structure_set_date", "roi_name", "roi_description", "roi_interpreter", "verifying_observer",
        "verifying_organization", "verification_datetime")}  # fmt: skip


def test_expected_survivors_explicit_values(study):
    assert expected_survivors(study, "2023b", ["Synth 1", PATIENT_NAME]) == {"Synth 1"}  # ManufacturerModelName
    assert expected_survivors(study, "2023b", ["not anywhere"]) == set()
