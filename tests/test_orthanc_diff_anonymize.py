"""Differential test: our /anonymize against a live Orthanc 1.10.1, tag by tag.

Study cases send a body to ``POST /studies/{id}/anonymize`` (a synchronous job) and anonymize
every instance of the same study on our side with one plan and one key; instances are matched
through Orthanc's ``AnonymizedFrom`` metadata. Instance cases use
``POST /instances/{id}/anonymize``. Every element is compared (file meta included, recursively)
except regenerated identifiers, which must have the same *structure*: one shared
``UidStructure`` per study checks that whatever Orthanc made equal (a ReferencedSOPInstanceUID
and the new SOPInstanceUID of the referenced instance, a FrameOfReferenceUID shared by a
series, the PatientID and PatientName of one patient) is equal in ours too, and nothing more.

Orthanc 1.10.1 knows DicomVersion 2008, 2017c and 2021b (it refuses 2023b, and its default
is 2021b while ours is 2023b), so every body names its version explicitly.

Differences we keep on purpose are listed in ``DELIBERATE_DIFFERENCES`` with their reason.
Needs ``/usr/sbin/Orthanc`` (skipped otherwise) and ``../shared/dicom-samples``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from pydicom.dataset import Dataset

from tests import synthetic
from tests.compare import (
    WRITER_DIFFERENCES,
    Deliberate,
    UidStructure,
    check_expectations,
    collect_identifiers,
    compare_datasets,
    deliberate,
    engine_modules,
    judge,
    ours_for,
    read,
    sweep_params,
)
from tests.conftest import sample
from tests.orthanc_ref import TEST_DICTIONARY, OrthancClient, orthanc, orthanc_process  # noqa: F401

pytestmark = pytest.mark.orthanc

VERSIONS = ("2008", "2017c", "2021b")

PATIENT_NAME = 0x00100010

#: Differences between our output and Orthanc 1.10.1's that we keep on purpose (the team's
#: design, README "Deliberate differences from Orthanc").
DELIBERATE_DIFFERENCES: list[Deliberate] = [
    *WRITER_DIFFERENCES,
    deliberate("DeidentificationMethod", where="top",
               reason="names dicom-deid and its version, not 'Orthanc 1.10.1'; written for "
                      "customised requests too (Orthanc 1.10.1 then writes nothing)"),
    deliberate("DeidentificationMethodCodeSequence", ["extra"], "top",
               reason="we add the PS3.16 CID 7050 code of the basic profile (113100)"),
    deliberate("PatientName", ["uid-structure"], "top", detail="ours is empty",
               reason="an empty or absent PatientName stays empty (nothing to pseudonymize); "
                      "Orthanc writes 'Anonymized<N>'"),
    deliberate("PatientID", ["uid-structure"], "top", detail="ours is empty",
               reason="an empty PatientID stays empty (nothing to pseudonymize); Orthanc "
                      "maps '' to a fresh UUID"),
    deliberate(0, ["uid-structure"], "nested", mask=0, detail="ours is empty",
               reason="empty identifiers inside sequences stay empty; Orthanc maps '' to a "
                      "fresh UID (e.g. an empty nested ReferencedSOPInstanceUID)"),
    deliberate("PatientID", ["uid-structure"], "nested",
               detail="Orthanc kept the original identifier, we changed it",
               reason="nested PatientID stays pseudonymized when the user replaces the "
                      "top-level one (only Keep exempts it); Orthanc then leaks the nested "
                      "originals"),
    deliberate(0, ["vr"], "top", mask=0, reference="UN", sample="2022-03-08-RicSmi.dcm",
               reason="identifiers stored with explicit VR UN (PatientID, FrameOfReferenceUID "
                      "of 2022-03-08-RicSmi.dcm) are pseudonymized or remapped according to "
                      "their dictionary VR; Orthanc treats UN as opaque bytes and leaks them"),
    deliberate("PatientName", ["uid-structure"], "nested",
               reason="a nested PatientName is pseudonymized like the top-level one; "
                      "Orthanc leaks it (orthanc-behavior.md 5.7)"),
    deliberate(0x00011015, ["vr"], "top", mask=0x0001FFFF, ours="SQ", reference="UN",
               sample="synthetic",
               reason="a kept private sequence written as UN with a defined length (the "
                      "synthetic studies' gggg,1015) gets the nested pass and is written back "
                      "as SQ; Orthanc copies its bytes, the planted PatientName included"),
    deliberate(0x50000000, ["missing"], "top", mask=0xFF000000,
               reason="curve data (50xx,xxxx) removed at top level too, as PS3.15 says; "
                      "Orthanc only removes nested occurrences (orthanc-behavior.md 5.8)"),
    deliberate(0x60003000, ["missing"], "top", mask=0xFF00FFFF,
               reason="overlay data (60xx,3000) removed at top level too (PS3.15 X)"),
    deliberate(0x60004000, ["missing"], "top", mask=0xFF00FFFF,
               reason="overlay comments (60xx,4000) removed at top level too (PS3.15 X)"),
]

_HIERARCHY_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")


def forced_uid_differences(body: dict[str, Any]) -> list[Deliberate]:
    """The deliberate differences a ``body`` that forces hierarchy UIDs brings (README, "Forced
    UIDs across instances"): a nested reference to *another* file's original UID, which Orthanc
    sets to the forced value when its job met the referenced file first (its map keeps the
    first value, orthanc-behavior.md 3 step 1), keeps our keyed UID of that original. Any
    nested tag: a forced SOPInstanceUID reaches ReferencedSOPInstanceUID through the same map."""
    replace = body.get("Replace") or {}
    if not body.get("Force"):
        return []
    return [deliberate(0, ["uid-structure"], "nested", mask=0, reference=replace[tag],
                       reason="a forced UID follows references inside its own file only; "
                              "Orthanc's nested references follow it in the order its job met the files")
            for tag in _HIERARCHY_UIDS if isinstance(replace.get(tag), str)]


STUDIES: dict[str, tuple[str, ...]] = {
    "brainix": ("Brainix/Flair/IM-0001-0001.dcm", "Brainix/Flair/IM-0001-0002.dcm",
                "Brainix/Epi/IM-0001-0001.dcm", "Brainix/Epi/IM-0001-0002.dcm"),
    "knee": ("Knee/T1/IM-0001-0001.dcm", "Knee/T1/IM-0001-0002.dcm", "Knee/T2/IM-0001-0001.dcm"),
    "sr-mr": ("HierarchicalAnonymization/StructuredReports/IM0",
              "HierarchicalAnonymization/StructuredReports/IM631"),
    "cr-pr": ("HierarchicalAnonymization/2019-03-28/CR000000.dcm",
              "HierarchicalAnonymization/2019-03-28/PR000000.dcm"),
    "comunix-ct": ("Comunix/Ct/IM-0001-0001.dcm", "Comunix/Ct/IM-0001-0002.dcm"),
    "private-tags": ("PrivateTags.dcm",),
    "issue22": ("Issue22-NoPixelData.dcm",),
    "seg": ("DicomSeg.dcm",),
    "pdf": ("sample-pdf.dcm",),
    "overlay": ("PatientWith2studies/TEST_1_study_1234.dcm",),
    # CT x3 + RTSTRUCT + SR with PHI planted in nested, private and overlay/curve elements.
    "synthetic": ("synthetic",),
}


def study_files(name: str) -> dict[str, bytes]:
    """{label: file bytes} of one study (sample files, or the synthetic study)."""
    if name == "synthetic":
        datasets = synthetic.make_study(seed=11, n_ct=3)
        return {f"synthetic/{i:03d}_{ds.Modality}": synthetic.dataset_bytes(ds)
                for i, ds in enumerate(datasets)}
    return {relative: sample(relative).read_bytes() for relative in STUDIES[name]}


@dataclasses.dataclass(frozen=True)
class StudyCase:
    """``body`` (DicomVersion included) sent to /studies/{id}/anonymize for ``study``;
    ``expect`` maps a path to the value every output instance must have (None = absent)."""

    name: str
    study: str
    body: dict[str, Any]
    expect: dict[str, Any] = dataclasses.field(default_factory=dict)


_ALWAYS = {"PatientIdentityRemoved": "YES"}

STUDY_CASES = [
    StudyCase(f"{study}-{version}-default", study, {"DicomVersion": version}, _ALWAYS)
    for study in STUDIES for version in VERSIONS
] + [
    StudyCase(  # TC-05 test_anonymize_study
        "brainix-replace-name", "brainix",
        {"DicomVersion": "2021b", "Replace": {"PatientName": "Jodogne"}},
        {**_ALWAYS, "PatientName": "Jodogne"}),
    StudyCase(
        "brainix-keep-replace-remove", "brainix",
        {"DicomVersion": "2017c", "Keep": ["StudyDescription", "SeriesDescription", "InstitutionName"],
         "Replace": {"StationName": "station", "ReferringPhysicianName": "Doe^John"},
         "Remove": ["Manufacturer", "ImageType"]},
        {"StudyDescription": "IRM c\u00e9r\u00e9brale, neuro-cr\u00e2ne", "StationName": "station",
         "ReferringPhysicianName": "Doe^John", "Manufacturer": None, "ImageType": None}),
    StudyCase(  # Keep of hierarchy UIDs (orthanc-behavior.md 4.4: nested ones still remapped)
        "brainix-keep-study-series-uids", "brainix",
        {"DicomVersion": "2021b", "Keep": ["StudyInstanceUID", "SeriesInstanceUID"], "Force": True},
        {"StudyInstanceUID": "2.16.840.1.113669.632.20.1211.10000357775"}),
    StudyCase(  # TC-14 test_anonymize_relationships_5b: forced UID propagates to references
        "knee-force-study-uid", "knee",
        {"DicomVersion": "2021b", "Replace": {"StudyInstanceUID": "1.2.3.4"}, "Force": True},
        {"StudyInstanceUID": "1.2.3.4"}),
    StudyCase(
        "knee-keep-patient-replace-id", "knee",
        {"DicomVersion": "2021b", "Keep": ["PatientName"], "Replace": {"PatientID": "anon-1"},
         "Force": True},
        {"PatientName": "KNEE", "PatientID": "anon-1"}),
    StudyCase(  # TC-11 test_anonymize_relationships_3
        "sr-mr-keep-content", "sr-mr",
        {"DicomVersion": "2021b", "Keep": ["ContentSequence"]}),
    StudyCase(  # non-hierarchy UID kept: nested copies are not (orthanc-behavior.md 4.4)
        "comunix-keep-frame-of-reference", "comunix-ct",
        {"DicomVersion": "2017c", "Keep": ["FrameOfReferenceUID"]}),
    StudyCase(
        "private-tags-keep-private", "private-tags",
        {"DicomVersion": "2021b", "KeepPrivateTags": True}),
    StudyCase(
        "private-tags-keep-one-private", "private-tags",
        {"DicomVersion": "2017c", "Keep": ["6003,1010"]}),
    StudyCase(  # TC-25 test_modify_subsequences, anonymization half
        "issue22-subsequences", "issue22",
        {"DicomVersion": "2021b", "KeepPrivateTags": True,
         "Replace": {"DimensionIndexSequence[1].DimensionDescriptionLabel": "Hello1",
                     "DimensionOrganizationSequence[0].DimensionOrganizationUID": "1.2.3.4"},
         "Remove": ["SharedFunctionalGroupsSequence[*].ReferencedImageSequence[*].ReferencedSOPInstanceUID"],
         "Keep": ["ReferencedImageEvidenceSequence", "DimensionIndexSequence",
                  "PerFrameFunctionalGroupsSequence[*].2005,140f[*].SOPInstanceUID",
                  "(5200,9230)[*].2005,140f[*].(0008,0023)",
                  "(5200,9230)[*].2005,140f[*].(0008,0033)"]},
        {"DimensionIndexSequence[1].DimensionDescriptionLabel": "Hello1",
         "DimensionOrganizationSequence[0].DimensionOrganizationUID": "1.2.3.4",
         "SharedFunctionalGroupsSequence[0].ReferencedImageSequence[0].ReferencedSOPInstanceUID": None}),
    StudyCase(  # a replaced non-hierarchy UID: nested copies keep their value (4.4)
        "synthetic-replace-frame-of-reference", "synthetic",
        {"DicomVersion": "2021b", "Replace": {"FrameOfReferenceUID": "1.2.3.4.5.6"}},
        {"StudyDescription": None}),
    StudyCase(  # a replaced top-level sequence still goes through the nested pass (5.6)
        "synthetic-replace-sequence", "synthetic",
        {"DicomVersion": "2017c", "Replace": {"ReferencedStudySequence": [
            {"StudyDescription": "gone", "ReferencedSOPInstanceUID": "1.2.3",
             "ReferencedSOPClassUID": "1.2.840.10008.3.1.2.3.1"}]}},
        {"ReferencedStudySequence[0].StudyDescription": None,
         "ReferencedStudySequence[0].ReferencedSOPClassUID": "1.2.840.10008.3.1.2.3.1"}),
    StudyCase(  # path edits run after the nested pass: never remapped (3, step 8)
        "synthetic-path-edits", "synthetic",
        {"DicomVersion": "2021b",
         "Replace": {"ReferencedImageSequence[*].ReferencedSOPInstanceUID": "1.2.9"},
         "Remove": ["ReferencedFrameOfReferenceSequence[*].RTReferencedStudySequence"]},
        {"ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence": None}),
    StudyCase(  # Keep StudyInstanceUID: top level kept, nested references still remapped
        "synthetic-keep-study-uid", "synthetic",
        {"DicomVersion": "2021b", "Keep": ["StudyInstanceUID"], "Force": True}),
    StudyCase(
        "synthetic-replace-patient-id-keep-private", "synthetic",
        {"DicomVersion": "2008", "KeepPrivateTags": True, "Replace": {"PatientID": "x"},
         "Force": True},
        {"PatientID": "x"}),
    StudyCase(
        "pdf-remove-and-replace", "pdf",
        {"DicomVersion": "2008", "Remove": ["ConversionType"],
         "Replace": {"StudyDescription": "pdf study", "PatientName": "Pdf^Patient"}},
        {"ConversionType": None, "StudyDescription": "pdf study", "PatientName": "Pdf^Patient"}),
]


@dataclasses.dataclass(frozen=True)
class InstanceCase:
    name: str
    file: str
    body: dict[str, Any]
    expect: dict[str, Any] = dataclasses.field(default_factory=dict)


INSTANCE_CASES = [
    InstanceCase("dummyct-2021b", "DummyCT.dcm", {"DicomVersion": "2021b"}, _ALWAYS),
    InstanceCase("dummyct-2008", "DummyCT.dcm", {"DicomVersion": "2008"}, _ALWAYS),
    InstanceCase("seg-2017c", "DicomSeg.dcm", {"DicomVersion": "2017c"}, _ALWAYS),
    InstanceCase(  # TC-07 step 5 (on a file with a public-only header)
        "knee-keep-descriptions", "Knee/T1/IM-0001-0003.dcm",
        {"DicomVersion": "2021b", "Replace": {"PatientName": "hello", "0010-0020": "world"},
         "Keep": ["StudyDescription", "SeriesDescription"], "KeepPrivateTags": True, "Force": True},
        {"PatientName": "hello", "PatientID": "world", "InstitutionName": None}),
    InstanceCase(  # TC-07 steps 2 and 4: a top-level private element kept, then replaced
        "private-keep-and-replace", "PrivateTags.dcm",
        {"DicomVersion": "2021b", "Keep": ["PatientName", "7fe1,1001"],
         "Replace": {"6003,1010": ""}},
        {"(7fe1,1001)": "1 items", "(6003,1010)": "", "(7fe1,0010)": None}),
    InstanceCase("pdf-2017c", "sample-pdf.dcm", {"DicomVersion": "2017c"}, _ALWAYS),
    InstanceCase(  # SOPClassUID stored as UN, SOPInstanceUID kept: DCMTK's meta differs
        "un-class-keep-sop", "2022-03-08-RicSmi.dcm",
        {"DicomVersion": "2021b", "Keep": ["SOPInstanceUID"], "Force": True},
        _ALWAYS),
]


def _datasets(data: dict[str, bytes]) -> list[Dataset]:
    return [read(b) for b in data.values()]


def _differences(ours: Dataset, reference: Dataset, uids: UidStructure, label: str) -> tuple[str, list[Any]]:
    return label, compare_datasets(ours, reference, uids=uids, structural_tags=[PATIENT_NAME],
                                   where=label, anonymized=True)


@pytest.mark.parametrize("case", STUDY_CASES, ids=[c.name for c in STUDY_CASES])
def test_study_anonymize_matches_orthanc(orthanc: OrthancClient, case: StudyCase) -> None:
    data = study_files(case.study)
    study, by_id = orthanc.upload_study(data)
    job = orthanc.anonymize_study(study, case.body)
    assert (job["InstancesCount"], job["FailedInstancesCount"]) == (len(data), 0)
    results = orthanc.job_results(job, "AnonymizedFrom")
    assert set(results) == set(by_id)
    references = {by_id[s]: read(b) for s, b in results.items()}
    assert [p for r, ds in sorted(references.items())
            for p in check_expectations(ds, case.expect, f"Orthanc {r}")] == []

    request = engine_modules()[0]
    plan = request.parse_anonymize(case.body, dictionary=TEST_DICTIONARY)
    uids = UidStructure(collect_identifiers(_datasets(data), extra_tags=[PATIENT_NAME]))
    compared = []
    for label, reference in sorted(references.items()):
        ours = ours_for(plan, data[label])
        assert check_expectations(ours, case.expect, f"ours {label}") == []
        assert ours.SOPClassUID == reference.SOPClassUID
        compared.append(_differences(ours, reference, uids, f"{label} [{case.name}]"))
    judge(compared, DELIBERATE_DIFFERENCES)


@pytest.mark.parametrize("case", INSTANCE_CASES, ids=[c.name for c in INSTANCE_CASES])
def test_instance_anonymize_matches_orthanc(orthanc: OrthancClient, case: InstanceCase) -> None:
    data = sample(case.file).read_bytes()
    reference = read(orthanc.anonymize_instance(orthanc.upload_sample(case.file), case.body))
    assert check_expectations(reference, case.expect, "Orthanc") == []

    request = engine_modules()[0]
    ours = ours_for(request.parse_anonymize(case.body, dictionary=TEST_DICTIONARY), data)
    assert check_expectations(ours, case.expect, "ours") == []
    uids = UidStructure(collect_identifiers(_datasets({case.file: data}), extra_tags=[PATIENT_NAME]))
    judge([_differences(ours, reference, uids, f"{case.file} [{case.name}]")], DELIBERATE_DIFFERENCES)


@pytest.fixture(scope="module")
def orthanc_named_a_patient(orthanc: OrthancClient) -> None:
    """Orthanc names the N-th patient it anonymizes 'Anonymized<N>', and 2022-03-08-RicSmi.dcm's
    PatientName is 'Anonymized1': on a fresh server (this sweep run alone, e.g. ``-k RicSmi``)
    Orthanc's new name would equal the original, which the structure check reads as "Orthanc
    kept the original identifier". One throw-away anonymization moves the counter past 1."""
    orthanc.anonymize_instance(orthanc.upload_once(sample("DummyCT.dcm").read_bytes()), {"DicomVersion": "2021b"})


@pytest.mark.parametrize("relative", sweep_params())
@pytest.mark.usefixtures("orthanc_named_a_patient")
def test_instance_anonymize_sweep_matches_orthanc(orthanc: OrthancClient, relative: str) -> None:
    body = {"DicomVersion": "2021b"}
    data = sample(relative).read_bytes()
    reference = read(orthanc.anonymize_instance(orthanc.upload_sample(relative), body))
    assert check_expectations(reference, _ALWAYS, "Orthanc") == []

    request = engine_modules()[0]
    ours = ours_for(request.parse_anonymize(body, dictionary=TEST_DICTIONARY), data)
    assert check_expectations(ours, _ALWAYS, "ours") == []
    uids = UidStructure(collect_identifiers(_datasets({relative: data}), extra_tags=[PATIENT_NAME]))
    judge([_differences(ours, reference, uids, f"{relative} [sweep 2021b]")], DELIBERATE_DIFFERENCES)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("extra", [{}, {"KeepPrivateTags": True}, {"Keep": ["ReferencedImageSequence"]}],
                         ids=["profile", "keep-private", "keep-sequence"])
def test_every_profile_tag_matches_orthanc(orthanc: OrthancClient, version: str, extra: dict) -> None:
    """A generated instance holding every tag of the profile (a value per VR), at the top level
    and inside a kept, a removed and an unlisted sequence: the whole table, not only the tags
    the sample files happen to hold."""
    data = synthetic.dataset_bytes(synthetic.every_profile_tag(version))
    body = {"DicomVersion": version, **extra}
    reference = read(orthanc.anonymize_instance(orthanc.upload_once(data), body))
    request = engine_modules()[0]
    ours = ours_for(request.parse_anonymize(body, dictionary=TEST_DICTIONARY), data)
    source = read(data)
    assert len(source) > {"2008": 50, "2017c": 250, "2021b": 400}[version]  # (the table is there)
    assert len(reference) < len(source) * 2 // 3  # (and Orthanc applied it)
    uids = UidStructure(collect_identifiers([source], extra_tags=[PATIENT_NAME]))
    judge([_differences(ours, reference, uids, f"every {version} tag {extra}")], DELIBERATE_DIFFERENCES)


def test_orthanc_refuses_2023b(orthanc: OrthancClient) -> None:
    """Why no case names 2023b: Orthanc 1.10.1 does not know it."""
    from tests.orthanc_ref import OrthancHTTPError

    sample("DummyCT.dcm")
    instance = orthanc.upload_sample("DummyCT.dcm")
    with pytest.raises(OrthancHTTPError) as refused:
        orthanc.anonymize_instance(instance, {"DicomVersion": "2023b"})
    assert refused.value.status == 400
