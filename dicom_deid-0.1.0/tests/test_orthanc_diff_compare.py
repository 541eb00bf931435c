"""The comparison helper of the differential tests, checked on pydicom's real CT_small.dcm.

These run without Orthanc: they make sure ``compare.py`` reports what differs (and only that),
so that a passing differential test means something.
"""

from __future__ import annotations

import copy

import pytest
from pydicom import examples
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from tests.compare import (
    Difference,
    UidStructure,
    collect_identifiers,
    compare_datasets,
    deliberate,
    format_differences,
    split_deliberate,
)

ORIGINAL_SOP = "1.3.6.1.4.1.5962.1.1.1.1.1.20040119072730.12322"


def _with_reference(ds: Dataset, referenced_sop: str) -> Dataset:
    result = copy.deepcopy(ds)
    item = Dataset()
    item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    item.ReferencedSOPInstanceUID = referenced_sop
    result.ReferencedImageSequence = Sequence([item])
    return result


@pytest.fixture
def ct() -> Dataset:
    ds = examples.ct
    assert ds.SOPInstanceUID == ORIGINAL_SOP
    return copy.deepcopy(ds)


def test_identical_datasets_have_no_difference(ct: Dataset) -> None:
    uids = UidStructure(collect_identifiers([ct]))
    assert compare_datasets(copy.deepcopy(ct), ct, uids=uids) == []


def test_value_missing_extra_and_vr_differences_are_named(ct: Dataset) -> None:
    ours, reference = copy.deepcopy(ct), copy.deepcopy(ct)
    ours.PatientName = "Ours^Name"
    reference.PatientName = "Orthanc^Name"
    del ours.StudyID
    ours.InstitutionName = "Extra"
    del reference.InstitutionName
    uids = UidStructure(collect_identifiers([ct]))
    found = [str(d) for d in compare_datasets(ours, reference, uids=uids)]
    assert found == [
        "InstitutionName (0008,0080): extra: ours='Extra' orthanc=None",
        "PatientName (0010,0010): value: ours='Ours^Name' orthanc='Orthanc^Name'",
        "StudyID (0020,0010): missing: ours=None orthanc='1CT1'",
    ]


def test_nested_difference_names_the_path(ct: Dataset) -> None:
    ours = _with_reference(ct, ORIGINAL_SOP)
    reference = _with_reference(ct, ORIGINAL_SOP)
    ours.ReferencedImageSequence[0].ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    uids = UidStructure(collect_identifiers([ct, ours]))
    [difference] = compare_datasets(ours, reference, uids=uids)
    assert str(difference).startswith(
        "ReferencedImageSequence[0].ReferencedSOPClassUID (0008,1150): uid-structure: "
        "ours='1.2.840.10008.5.1.4.1.1.4' orthanc='1.2.840.10008.5.1.4.1.1.2'")
    assert difference.nested


def test_sequence_length_difference(ct: Dataset) -> None:
    ours = _with_reference(ct, ORIGINAL_SOP)
    reference = _with_reference(ct, ORIGINAL_SOP)
    reference.ReferencedImageSequence.append(copy.deepcopy(reference.ReferencedImageSequence[0]))
    uids = UidStructure(collect_identifiers([ct]))
    assert [(d.keyword, d.kind, d.ours, d.reference)
            for d in compare_datasets(ours, reference, uids=uids)] == [
        ("ReferencedImageSequence", "items", 1, 2)]


def test_uid_structure_accepts_a_consistent_renaming_across_instances(ct: Dataset) -> None:
    # Instance B references instance A. Orthanc renamed A to X (and the reference with it);
    # we renamed A to 2.25.1: same structure, no difference.
    source_b = _with_reference(ct, ORIGINAL_SOP)
    source_b.SOPInstanceUID = "1.2.3.99"
    uids = UidStructure(collect_identifiers([ct, source_b]))
    ref_a, ours_a = copy.deepcopy(ct), copy.deepcopy(ct)
    ref_a.SOPInstanceUID, ours_a.SOPInstanceUID = "1.2.276.0.7230010.3.1.4.1", "2.25.1"
    ref_b, ours_b = _with_reference(ct, "1.2.276.0.7230010.3.1.4.1"), _with_reference(ct, "2.25.1")
    ref_b.SOPInstanceUID, ours_b.SOPInstanceUID = "1.2.276.0.7230010.3.1.4.2", "2.25.2"
    assert compare_datasets(ours_a, ref_a, uids=uids) == []
    assert compare_datasets(ours_b, ref_b, uids=uids) == []
    assert uids.forward["1.2.276.0.7230010.3.1.4.1"] == "2.25.1"


def test_uid_structure_reports_a_broken_reference(ct: Dataset) -> None:
    uids = UidStructure(collect_identifiers([ct]))
    ref_a, ours_a = copy.deepcopy(ct), copy.deepcopy(ct)
    ref_a.SOPInstanceUID, ours_a.SOPInstanceUID = "9.9.1", "2.25.1"
    assert compare_datasets(ours_a, ref_a, uids=uids, where="a.dcm") == []
    # Orthanc's B references A's new UID; ours references something else.
    ref_b, ours_b = _with_reference(ct, "9.9.1"), _with_reference(ct, "2.25.7")
    ref_b.SOPInstanceUID, ours_b.SOPInstanceUID = "9.9.2", "2.25.2"
    [difference] = compare_datasets(ours_b, ref_b, uids=uids, where="b.dcm")
    assert difference.kind == "uid-structure"
    assert difference.detail == (
        "Orthanc uses this new value also at a.dcm: SOPInstanceUID (0008,0018), where ours is "
        "'2.25.1'")
    # The reverse conflict: ours reuses a value Orthanc kept distinct.
    ref_c, ours_c = copy.deepcopy(ct), copy.deepcopy(ct)
    ref_c.SOPInstanceUID, ours_c.SOPInstanceUID = "9.9.3", "2.25.1"
    [reverse] = compare_datasets(ours_c, ref_c, uids=uids)
    assert "ours equals the value at a.dcm: SOPInstanceUID" in reverse.detail


def test_uid_structure_reports_kept_versus_regenerated(ct: Dataset) -> None:
    uids = UidStructure(collect_identifiers([ct]))
    kept_by_orthanc, changed_by_us = copy.deepcopy(ct), copy.deepcopy(ct)
    changed_by_us.SOPInstanceUID = "2.25.5"
    [first] = compare_datasets(changed_by_us, kept_by_orthanc, uids=uids)
    assert first.detail == "Orthanc kept the original identifier, we changed it"
    [second] = compare_datasets(kept_by_orthanc, changed_by_us, uids=uids)
    assert second.detail == "Orthanc generated a new identifier, we kept the original"


def test_file_meta_is_compared_except_software_fields(ct: Dataset) -> None:
    ours, reference = copy.deepcopy(ct), copy.deepcopy(ct)
    ours.file_meta.ImplementationClassUID = "2.25.42"
    ours.file_meta.ImplementationVersionName = "OURS"
    reference.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2"
    uids = UidStructure(collect_identifiers([ct]))
    [difference] = compare_datasets(ours, reference, uids=uids)
    assert (difference.keyword, difference.kind) == ("TransferSyntaxUID", "uid-structure")


def test_split_deliberate_by_tag_range_and_depth() -> None:
    overlay = Difference((), 0x60023000, "missing", None, b"\x00\x01")
    nested_name = Difference(((0x00081140, 0),), 0x00100010, "value", "A", "B")
    top_name = Difference((), 0x00100010, "value", "A", "B")
    table = [
        deliberate(0x60003000, ["missing"], "top", mask=0xFF00FFFF, reason="overlay removed"),
        deliberate("PatientName", ["value"], "nested", reason="nested names pseudonymized"),
    ]
    assert table[0].name == "60xx,3000"
    unexpected, known = split_deliberate([overlay, nested_name, top_name], table)
    assert unexpected == [top_name]
    assert [(d, rule.reason) for d, rule in known] == [
        (overlay, "overlay removed"), (nested_name, "nested names pseudonymized")]
    assert format_differences(unexpected, "header") == (
        "header\n  PatientName (0010,0010): value: ours='A' orthanc='B'")


def test_uid_structure_reports_an_emptied_identifier(ct: Dataset) -> None:
    uids = UidStructure(collect_identifiers([ct]))
    ours, reference = copy.deepcopy(ct), copy.deepcopy(ct)
    ours.PatientID, reference.PatientID = "", "0b51d862-9f0a-4f5e-96db-ebaa14a61233"
    [difference] = compare_datasets(ours, reference, uids=uids)
    assert (difference.keyword, difference.detail) == ("PatientID", "ours is empty, Orthanc's is not")
    assert uids.forward == {}  # an empty value never enters the bijection


def test_read_keeps_un_so_a_vr_change_is_reported(ct: Dataset) -> None:
    from io import BytesIO

    from tests.compare import read

    ct.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"  # explicit VR
    buffer = BytesIO()
    ct.save_as(buffer, enforce_file_format=True)
    as_pn = buffer.getvalue()
    header = b"\x10\x00\x10\x00PN\x16\x00"  # PatientName, 22 bytes
    assert as_pn.count(header) == 1
    as_un = as_pn.replace(header, b"\x10\x00\x10\x00UN\x00\x00\x16\x00\x00\x00")
    a, b = read(as_un), read(as_pn)
    assert (a["PatientName"].VR, b["PatientName"].VR) == ("UN", "PN")
    uids = UidStructure(collect_identifiers([ct]))
    assert [(d.keyword, d.kind, d.ours, d.reference)
            for d in compare_datasets(a, b, uids=uids)] == [("PatientName", "vr", "UN", "PN")]
