"""Differential test: our /modify against a live Orthanc 1.10.1, tag by tag.

Each case sends one body to Orthanc (``POST /instances/{id}/modify``, or a study/series job)
and runs the same body through our engine on the same file, then compares every element
(file meta included, recursively into sequences) except the UIDs that both sides regenerate;
those are compared by structure (``tests/compare.py``). A few exact values per case make sure
the body did what it says on both sides.

Differences we keep on purpose are listed in ``DELIBERATE_DIFFERENCES`` with their reason.
Needs ``/usr/sbin/Orthanc`` (skipped otherwise) and ``../shared/dicom-samples``.
"""

from __future__ import annotations

import base64
import dataclasses
from typing import Any

import pytest

from tests.compare import (
    WRITER_DIFFERENCES,
    Deliberate,
    UidStructure,
    deliberate,
    check_expectations,
    collect_identifiers,
    compare_datasets,
    engine_modules,
    judge,
    ours_for,
    read,
    sweep_params,
)
from tests.conftest import SAMPLES, missing_samples, sample
from tests.orthanc_ref import TEST_DICTIONARY, OrthancClient, orthanc, orthanc_process  # noqa: F401

pytestmark = pytest.mark.orthanc

#: Differences between our output and Orthanc 1.10.1's that we keep on purpose.
DELIBERATE_DIFFERENCES: list[Deliberate] = [
    *WRITER_DIFFERENCES,
    deliberate("FrameIncrementPointer", ["value"], "top",
               reason="every value of a multi-valued AT (VM 1-n) is written; Orthanc 1.10.1 "
                      "silently keeps only the first (case at-list)"),
]


@dataclasses.dataclass(frozen=True)
class ModifyCase:
    """One body on one sample file; ``expect`` maps a path to the value both outputs must have
    (None = absent)."""

    name: str
    file: str
    body: dict[str, Any]
    expect: dict[str, Any]


_PDF_LIKE = b"%PDF-1.4 not really a document\n"
_SECRET = b"secret!!"
_OW_BYTES = bytes(range(16))


def _data_uri(data: bytes) -> str:
    return "data:application/octet-stream;base64," + base64.b64encode(data).decode("ascii")


CASES = [
    ModifyCase(
        "replace-strings", "DummyCT.dcm",
        {"Replace": {"PatientName": "hello", "StudyDescription": "Some study"}},
        {"PatientName": "hello", "StudyDescription": "Some study"}),
    ModifyCase(  # TC-01 test_modify_instance
        "remove-private-tags", "PrivateTags.dcm",
        {"Replace": {"PatientName": "hello"}, "Remove": ["StationName"], "RemovePrivateTags": True},
        {"PatientName": "hello", "StationName": None, "(6003,1010)": None, "(7fe1,1001)": None}),
    ModifyCase(  # Replace beats Remove, so removing a main identifier is not refused here
        "remove-and-replace-sop-uid", "Knee/T1/IM-0001-0001.dcm",
        {"Remove": ["SOPInstanceUID", "StationName"], "Replace": {"SOPInstanceUID": "1.2.3.4.5.6"}, "Force": True},
        {"SOPInstanceUID": "1.2.3.4.5.6", "StationName": None}),
    ModifyCase(  # no SOPClassUID left: both write DCMTK's generic file class in the meta
        "remove-sop-class", "Knee/T1/IM-0001-0001.dcm", {"Remove": ["SOPClassUID"]},
        {"SOPClassUID": None}),
    ModifyCase(  # ... where DCMTK takes a functional group's SOPClassUID (deliberate)
        "remove-sop-class-nested", "Issue22-NoPixelData.dcm", {"Remove": ["SOPClassUID"]},
        {"SOPClassUID": None}),
    ModifyCase(  # ... or a source image's (SourceImageSequence[0].SOPClassUID; deliberate)
        "remove-sop-class-source-image", "ColorTestImageJ.dcm", {"Remove": ["SOPClassUID"]},
        {"SOPClassUID": None, "SourceImageSequence[0].SOPClassUID": "1.2.840.10008.5.1.4.1.1.7"}),
    ModifyCase(  # Remove names private elements: only those go, their creators stay
        "remove-named-private-tags", "PrivateTags.dcm",
        {"Remove": ["7fe1,1001", "(6003,1010)"]},
        {"(6003,1010)": None, "(7fe1,1001)": None, "(6003,0010)": "GEMS_Ultrasound_ImageGroup_001",
         "(7fe1,0010)": "GEMS_Ultrasound_MovieGroup_001"}),
    ModifyCase(
        "remove-tags", "Knee/T1/IM-0001-0001.dcm",
        {"Remove": ["StationName", "InstitutionName", "0008-0090", "ReferencedImageSequence",
                    "0010,1000"]},
        {"StationName": None, "InstitutionName": None, "ReferringPhysicianName": None,
         "ReferencedImageSequence": None, "OtherPatientIDs": None, "PatientID": "887"}),
    ModifyCase(  # orthanc-behavior.md section 13
        "keep-sop-with-force", "Brainix/Flair/IM-0001-0001.dcm",
        {"Replace": {"PatientName": "Jodogne", "InstitutionName": "Nowhere"},
         "Keep": ["SOPInstanceUID"], "Force": True},
        {"PatientName": "Jodogne", "InstitutionName": "Nowhere",
         "SOPInstanceUID": "1.3.46.670589.11.0.0.11.4.2.0.8743.5.5396.2006120114314079549"}),
    ModifyCase(  # TC-25 test_modify_subsequences (instance route)
        "subsequence-paths", "Issue22-NoPixelData.dcm",
        {"Replace": {
            "PatientName": "Hello1",
            "DimensionIndexSequence[1].DimensionDescriptionLabel": "Hello2",
            "DimensionIndexSequence[*].PatientName": "Hello3",
            "ReferencedImageEvidenceSequence[2].ReferencedSeriesSequence[0]"
            ".ReferencedSOPSequence[0].ReferencedSOPInstanceUID": "Hello4",
            "DimensionOrganizationSequence[0].DimensionOrganizationUID": "1.2.3.4"},
         "Remove": [
            "ReferencedPerformedProcedureStepSequence",
            "PerformedProtocolCodeSequence[0].CodeValue",
            "SharedFunctionalGroupsSequence[*].ReferencedImageSequence[*].ReferencedSOPInstanceUID",
            "SharedFunctionalGroupsSequence[*].ReferencedImageSequence[1].ReferencedSOPClassUID",
            "SharedFunctionalGroupsSequence[2].ReferencedImageSequence"]},
        {"PatientName": "Hello1",
         "DimensionIndexSequence[0].DimensionDescriptionLabel": "Stack ID",
         "DimensionIndexSequence[1].DimensionDescriptionLabel": "Hello2",
         "DimensionIndexSequence[2].PatientName": "Hello3",
         "ReferencedImageEvidenceSequence[2].ReferencedSeriesSequence[0]"
         ".ReferencedSOPSequence[0].ReferencedSOPInstanceUID": "Hello4",
         "ReferencedPerformedProcedureStepSequence": None,
         "PerformedProtocolCodeSequence[0].CodeValue": None,
         "SharedFunctionalGroupsSequence[0].ReferencedImageSequence[1].ReferencedSOPInstanceUID": None,
         "SharedFunctionalGroupsSequence[0].ReferencedImageSequence[1].ReferencedSOPClassUID": None,
         "SharedFunctionalGroupsSequence[0].ReferencedImageSequence[2].ReferencedSOPClassUID":
             "1.2.840.10008.5.1.4.1.1.4.1",
         "DimensionOrganizationSequence[0].DimensionOrganizationUID": "1.2.3.4"}),
    ModifyCase(
        "private-subsequence-paths", "Issue22-NoPixelData.dcm",
        {"Replace": {"PerFrameFunctionalGroupsSequence[*].2005,140f[*].SOPInstanceUID": "1.2.3",
                     "(5200,9230)[1].2005,140f[0].(0008,0023)": "20010101"},
         "Remove": ["PerFrameFunctionalGroupsSequence[*].2005,140f[*].(0008,0033)",
                    "PerFrameFunctionalGroupsSequence[3].FrameContentSequence"]},
        {"PerFrameFunctionalGroupsSequence[5].(2005,140f)[0].SOPInstanceUID": "1.2.3",
         "PerFrameFunctionalGroupsSequence[1].(2005,140f)[0].ContentDate": "20010101",
         "PerFrameFunctionalGroupsSequence[2].(2005,140f)[0].ContentDate": "20141008",
         "PerFrameFunctionalGroupsSequence[2].(2005,140f)[0].ContentTime": None,
         "PerFrameFunctionalGroupsSequence[3].FrameContentSequence": None}),
    ModifyCase(  # TC-08 test_modify_sequence
        "replace-sequence-json", "PrivateTags.dcm",
        {"Replace": {"PatientName": "hello", "ReferencedStudySequence": [
            {"StudyDescription": "Hello^", "ReferencedStudySequence": [
                {"StudyDescription": "Toto"}, {"StudyDescription": "Tata"}]},
            {"StudyDescription": "Sebastien^", "StudyDate": "19700202"}]}},
        {"ReferencedStudySequence[0].ReferencedStudySequence[1].StudyDescription": "Tata",
         "ReferencedStudySequence[1].StudyDate": "19700202"}),
    ModifyCase(
        "data-uri-binary", "sample-pdf.dcm",
        {"Replace": {
            "EncryptedContent": _data_uri(_SECRET),
            "RedPaletteColorLookupTableData": _data_uri(_OW_BYTES),
            "EncryptedAttributesSequence": [
                {"EncryptedContentTransferSyntaxUID": "1.2.840.10008.1.2.1",
                 "EncryptedContent": _data_uri(_SECRET)}]}},
        {"EncryptedContent": _SECRET, "RedPaletteColorLookupTableData": _OW_BYTES,
         "EncryptedAttributesSequence[0].EncryptedContent": _SECRET}),
    ModifyCase(  # level detected as Study: new Series and SOP UIDs too
        "study-level-by-replace", "Brainix/Epi/IM-0001-0001.dcm",
        {"Replace": {"StudyInstanceUID": "1.2.3.4.5", "StudyDescription": "moved"}, "Force": True},
        {"StudyInstanceUID": "1.2.3.4.5", "StudyDescription": "moved"}),
    ModifyCase(
        "series-level-by-replace", "Knee/T2/IM-0001-0001.dcm",
        {"Replace": {"SeriesInstanceUID": "1.2.3.4.6", "SeriesDescription": "re-series"},
         "Force": True},
        {"SeriesInstanceUID": "1.2.3.4.6",
         "StudyInstanceUID": "2.16.840.1.113669.632.20.121711.10000160881"}),
    ModifyCase(
        "patient-level-by-replace", "DicomSeg.dcm",
        {"Replace": {"PatientID": "new-patient", "PatientName": "New^Patient"}, "Force": True},
        {"PatientID": "new-patient", "PatientName": "New^Patient"}),
    ModifyCase(
        "insert-absent-tags", "Knee/T1/IM-0001-0002.dcm",
        {"Replace": {"PatientComments": "added", "0010,21b0": "history", "ImageComments": "c"}},
        {"PatientComments": "added", "AdditionalPatientHistory": "history", "ImageComments": "c"}),
    ModifyCase(
        "null-and-empty", "Brainix/Epi/IM-0001-0002.dcm",
        {"Replace": {"InstitutionName": None, "StudyDescription": "",
                     "ReferencedImageSequence": "", "PatientWeight": ""}},
        {"InstitutionName": "", "StudyDescription": "", "PatientWeight": ""}),
    ModifyCase(  # UTF-8 in the body, ISO_IR 100 in the file
        "non-ascii-latin1", "Brainix/Flair/IM-0001-0005.dcm",
        {"Replace": {"PatientName": "J\u00f6dogne^S\u00e9bastien", "StudyDescription": "cr\u00e2ne"}},
        {"PatientName": "J\u00f6dogne^S\u00e9bastien", "StudyDescription": "cr\u00e2ne",
         "SpecificCharacterSet": "ISO_IR 100"}),
    ModifyCase(  # an explicit ISO_IR 6 is ASCII: what does not fit is dropped (no Latin-1 bytes)
        "non-ascii-iso-ir-6", "Encodings/Lena-ascii.dcm",
        {"Replace": {"PatientName": "J\u00f6dogne", "InstitutionName": "Z\u00fcrich"}},
        {"PatientName": "Jdogne", "InstitutionName": "Zrich"}),
    ModifyCase(  # no SpecificCharacterSet in the file
        "non-ascii-no-charset", "PrivateTags.dcm",
        {"Replace": {"InstitutionName": "S\u00e9bastien"}},
        {"InstitutionName": "S\u00e9bastien"}),
    ModifyCase(
        "at-list", "DummyCT.dcm",
        {"Replace": {"FrameIncrementPointer": "0018,1063\\0018,1065"}},
        {}),
    ModifyCase(  # characters ISO_IR 126 cannot encode
        "unrepresentable-characters", "Encodings/Lena-greek.dcm",
        {"Replace": {"InstitutionalDepartmentName": "Sw\u00e9ep \u03a9\u03bc\u03ad\u03b3\u03b1"}},
        {"SpecificCharacterSet": "ISO_IR 126"}),
    ModifyCase(  # ISO_IR 13: romaji and half-width katakana mix in one value (pydicom wrote "?")
        "iso-ir-13-romaji-and-katakana", "Encodings/Lena-shift-jis.dcm",
        {"Replace": {"StudyDescription": "\uff83\uff7d\uff84 1", "InstitutionName": "A\uff88",
                     "ReferencedStudySequence": [{"StudyDescription": "B\uff88"}]}},
        {"SpecificCharacterSet": "ISO_IR 13", "StudyDescription": "\uff83\uff7d\uff84 1", "InstitutionName": "A\uff88",
         "ReferencedStudySequence[0].StudyDescription": "B\uff88"}),
    ModifyCase(  # implicit VR little endian: inserted elements must be written implicit too
        "implicit-vr-file", "TransferSyntaxes/1.2.840.10008.1.2.dcm",
        {"Replace": {"PatientName": "Implicit", "ImageComments": "inserted",
                     "ReferencedStudySequence": [{"StudyDescription": "nested"}]},
         "Remove": ["StudyDescription"]},
        {"PatientName": "Implicit", "ImageComments": "inserted",
         "ReferencedStudySequence[0].StudyDescription": "nested", "StudyDescription": None}),
    ModifyCase(  # explicit VR big endian
        "big-endian-file", "TransferSyntaxes/1.2.840.10008.1.2.2.dcm",
        {"Replace": {"PatientName": "Big^Endian", "Rows": "512", "PatientWeight": "61.5",
                     "ImageComments": "inserted"}},
        {"PatientName": "Big^Endian", "Rows": 512, "ImageComments": "inserted"}),
    ModifyCase(  # TC-35 test_bitbucket_issue_140, on a file without that private block
        "private-tag-with-creator", "DummyCT.dcm",
        {"Replace": {"RadioButton3": "aaabbbccc"}, "PrivateCreator": "RadioLogic"},
        {"(4321,1012)": "aaabbbccc"}),
    ModifyCase(
        "keep-beats-replace-beats-remove", "Brainix/Flair/IM-0001-0002.dcm",
        {"Remove": ["StationName", "InstitutionName", "Manufacturer"],
         "Replace": {"InstitutionName": "x", "StationName": "y"}, "Keep": ["StationName"]},
        {"StationName": "intera", "InstitutionName": "x", "Manufacturer": None}),
    ModifyCase(  # JSON members are visited in sorted order: the last spelling wins
        "tag-spellings", "DummyCT.dcm",
        {"Replace": {"0008,1030": "comma", "0008-103E": "dash", "00081030": "plain",
                     "(0008,1090)": "parenthesised"}},
        {"StudyDescription": "plain", "SeriesDescription": "dash",
         "ManufacturerModelName": "parenthesised"}),
    ModifyCase(  # two spellings in one sequence item: the first in name order wins there
        "item-tag-spellings", "DummyCT.dcm",
        {"Replace": {"ReferencedStudySequence": [{"CodeMeaning": "keyword", "0008,0104": "hex"}]}},
        {"ReferencedStudySequence[0].CodeMeaning": "hex"}),
    ModifyCase(  # a Replace value that Keep or a later spelling overrides is never cast
        "overridden-values-unchecked", "DummyCT.dcm",
        {"Replace": {"Rows": "abc", "0028,0011": "abc", "Columns": "7"}, "Keep": ["Rows"]},
        {"Rows": 512, "Columns": 7}),
    ModifyCase(  # keywords of repeating groups name their first group (6000,xxxx)
        "repeating-group-keywords", "PatientWith2studies/TEST_1_study_1234.dcm",
        {"Replace": {"OverlayDescription": "replaced", "OverlayLabel": "inserted"},
         "Remove": ["OverlayRows"], "Keep": ["OverlayColumns"]},
        {"(6000,0022)": "replaced", "(6000,1500)": "inserted", "(6000,0010)": None}),
    ModifyCase(  # text for an unknown private tag (UN) is converted to the file's character set
        "private-un-text-charset", "Encodings/Lena-latin1.dcm",
        {"Replace": {"0011,1010": "J\u00f6dogne\u8a9e", "0011,1011": "ascii"}},
        {"(0011,1010)": b"J\xf6dogne\x00", "(0011,1011)": b"ascii\x00"}),
    ModifyCase(  # binary values of OB-or-OW tags are written OW, as little-endian words
        "pixel-data-data-uri", "TransferSyntaxes/1.2.840.10008.1.2.1.dcm",
        {"Replace": {"PixelData": _data_uri(_OW_BYTES)}},
        {"PixelData": _OW_BYTES}),
    ModifyCase(  # ... swapped into a big endian file's byte order; other OB-or-OW tags are OB
        "ow-data-uri-big-endian", "TransferSyntaxes/1.2.840.10008.1.2.2.dcm",
        {"Replace": {"PixelData": _data_uri(_OW_BYTES),
                     "RedPaletteColorLookupTableData": _data_uri(_OW_BYTES),
                     "AirCounts": _data_uri(_OW_BYTES)}},
        {"AirCounts": _OW_BYTES}),
    ModifyCase(  # nested: groups no data set holds are dropped; a nested SOP UID may be null
        "nested-non-data-set-groups-and-null-uid", "DicomSeg.dcm",
        {"Replace": {"DimensionIndexSequence[1].0000,0900": "1", "DimensionIndexSequence[1].0001,0010": "x",
                     "DimensionIndexSequence[1].0007,0010": "x", "DimensionIndexSequence[1].FFFF,0010": "x",
                     "DimensionIndexSequence[1].SOPInstanceUID": None,
                     "ReferencedStudySequence": [{"0000,0900": "1", "ReferencedSOPInstanceUID": "1.3"}]}},
        {"DimensionIndexSequence[1].(0001,0010)": None, "DimensionIndexSequence[1].(ffff,0010)": None,
         "DimensionIndexSequence[1].SOPInstanceUID": "", "ReferencedStudySequence[0].ReferencedSOPInstanceUID": "1.3"}),
    ModifyCase(  # OB-or-OW tags other than PixelData and OverlayData are written OB, odd lengths padded
        "ob-or-ow-written-ob", "TransferSyntaxes/1.2.840.10008.1.2.1.dcm",
        {"Replace": {"WaveformData": "abc", "AirCounts": _data_uri(b"\x01\x02\x03")}},
        {"WaveformData": b"abc\x00", "AirCounts": b"\x01\x02\x03\x00"}),
    ModifyCase(  # TC-24 test_modify_attribute for AT
        "numeric-and-at-values", "Knee/T1/IM-0001-0003.dcm",
        {"Replace": {"PatientWeight": "70.5", "SeriesNumber": "42", "Rows": "256",
                     "ImagePositionPatient": "1\\2\\3.5", "0020,9165": "0020,9056"}},
        {"PatientWeight": "70.5", "SeriesNumber": "42", "Rows": 256,
         "ImagePositionPatient": ("1", "2", "3.5"), "DimensionIndexPointer": 0x00209056}),
]


#: The body of the sweep over SWEEP_FILES (ASCII only: character sets have their own case).
SWEEP_BODY = {"Replace": {"PatientName": "Sweep^Name", "InstitutionName": "Sweep",
                          "ImageComments": "swept"},
              "Remove": ["StationName", "StudyDescription"], "RemovePrivateTags": True}


@dataclasses.dataclass(frozen=True)
class JobCase:
    """A body sent to /{level}/{id}/modify over several files of one study."""

    name: str
    level: str  # 'studies' or 'series'
    files: tuple[str, ...]
    body: dict[str, Any]
    expect: dict[str, Any]


JOB_CASES = [
    JobCase(  # TC-03 test_modify_study: two series, new study/series/SOP UIDs
        "study-job", "studies",
        ("Brainix/Flair/IM-0001-0003.dcm", "Brainix/Flair/IM-0001-0004.dcm",
         "Brainix/Epi/IM-0001-0003.dcm", "Brainix/Epi/IM-0001-0004.dcm"),
        {"Replace": {"PatientName": "Jodogne", "StudyDescription": "study job"},
         "Remove": ["InstitutionName"]},
        {"PatientName": "Jodogne", "InstitutionName": None, "PatientID": "5Yp0E"}),
    JobCase(  # TC-06: series level keeps StudyInstanceUID
        "series-job", "series",
        ("Knee/T1/IM-0001-0004.dcm", "Knee/T1/IM-0001-0005.dcm"),
        {"Replace": {"SeriesDate": "19990101", "SeriesDescription": "series job"}},
        {"SeriesDate": "19990101",
         "StudyInstanceUID": "2.16.840.1.113669.632.20.121711.10000160881"}),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_instance_modify_matches_orthanc(orthanc: OrthancClient, case: ModifyCase) -> None:
    data = sample(case.file).read_bytes()
    reference = read(orthanc.modify_instance(orthanc.upload_sample(case.file), case.body))
    assert check_expectations(reference, case.expect, "Orthanc") == []

    request = engine_modules()[0]
    ours = ours_for(request.parse_modify(case.body, dictionary=TEST_DICTIONARY), data)
    assert check_expectations(ours, case.expect, "ours") == []
    uids = UidStructure(collect_identifiers([read(data)]))
    label = f"{case.file} [{case.name}]"
    judge([(label, compare_datasets(ours, reference, uids=uids, where=label))],
          DELIBERATE_DIFFERENCES)


@pytest.mark.parametrize("relative", sweep_params())
def test_instance_modify_sweep_matches_orthanc(orthanc: OrthancClient, relative: str) -> None:
    data = sample(relative).read_bytes()
    reference = read(orthanc.modify_instance(orthanc.upload_sample(relative), SWEEP_BODY))
    expect = {"PatientName": "Sweep^Name", "StationName": None, "ImageComments": "swept"}
    assert check_expectations(reference, expect, "Orthanc") == []

    request = engine_modules()[0]
    ours = ours_for(request.parse_modify(SWEEP_BODY, dictionary=TEST_DICTIONARY), data)
    assert check_expectations(ours, expect, "ours") == []
    uids = UidStructure(collect_identifiers([read(data)]))
    label = f"{relative} [sweep]"
    judge([(label, compare_datasets(ours, reference, uids=uids, where=label))],
          DELIBERATE_DIFFERENCES)


_LEVEL_OF_ROUTE = {"studies": "Study", "series": "Series"}


@pytest.mark.parametrize("case", JOB_CASES, ids=[c.name for c in JOB_CASES])
def test_job_modify_matches_orthanc(orthanc: OrthancClient, case: JobCase) -> None:
    data = {relative: sample(relative).read_bytes() for relative in case.files}
    study, by_id = orthanc.upload_study(data)
    route_id = study if case.level == "studies" else orthanc.instance_parent(next(iter(by_id)), "series")
    job = orthanc.run_job(case.level, route_id, "modify", case.body)
    assert job["InstancesCount"] == len(case.files) and job["FailedInstancesCount"] == 0
    if case.level == "series":  # the new series stays in the source study
        results = {}
        for instance in orthanc.get_json(f"/series/{job['ID']}/instances"):
            source = orthanc.metadata("instances", instance["ID"], "ModifiedFrom")
            results[source] = orthanc.instance_file(instance["ID"])
    else:
        results = orthanc.job_results(job, "ModifiedFrom")
    assert set(results) == set(by_id)

    request = engine_modules()[0]
    plan = request.parse_modify(case.body, dictionary=TEST_DICTIONARY,
                                level=_LEVEL_OF_ROUTE[case.level])
    uids = UidStructure(collect_identifiers(read(b) for b in data.values()))
    compared = []
    for source_id, reference_bytes in sorted(results.items(), key=lambda kv: by_id[kv[0]]):
        relative = by_id[source_id]
        reference = read(reference_bytes)
        assert check_expectations(reference, case.expect, f"Orthanc {relative}") == []
        ours = ours_for(plan, data[relative])
        assert check_expectations(ours, case.expect, f"ours {relative}") == []
        label = f"{relative} [{case.name}]"
        compared.append((label, compare_datasets(ours, reference, uids=uids, where=label)))
    judge(compared, DELIBERATE_DIFFERENCES)


def test_orthanc_listens_on_loopback_only(orthanc_process: Any) -> None:
    from tests.orthanc_ref import listening_addresses

    assert listening_addresses(orthanc_process.pid) == {f"127.0.0.1:{orthanc_process.port}"}


def test_samples_present_or_skipped() -> None:
    if not SAMPLES.is_dir():
        missing_samples(f"shared DICOM samples not found at {SAMPLES}")
    assert len(CASES) >= 10 and all((SAMPLES / c.file).is_file() for c in CASES)
