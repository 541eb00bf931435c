"""Merge planning and per-instance application (pure core, no Beam) on real and generated files."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pydicom
import pytest

from tests.test_split_synthetic import (
    B_SOPS,
    CT_SERIES,
    CT_SOPS,
    LONG_COMMENT,
    MR_SERIES,
    MR_SOPS,
    RT_SOP,
    SR_SOP,
    STUDY_A,
    STUDY_B,
    referenced_uids,
    write_reference_studies,
)
from tests.conftest import documented_uid, operation_digest
from transforms import splitmerge as sm
from transforms.dicomio import read_dataset, write_dataset
from transforms.errors import RequestError
from transforms.identity import Key
from transforms.orthanc_ids import orthanc_ids

SECRET = b"split-merge-test-key-0123456789"
KEY = Key.from_bytes(SECRET)
BRAINIX_STUDY_UID = "2.16.840.1.113669.632.20.1211.10000357775"
KNEE_STUDY_ID = "0a9b3153-2512774b-2d9580de-1fc3dcf6-3bd83918"
UID_RE = re.compile(r"^2\.25\.[1-9][0-9]{0,38}$")


def index_of(paths: list[Path], target: str) -> list[sm.IndexEntry]:
    return [sm.index_entry(str(p), read_dataset(p.read_bytes()), study_tags_for=target) for p in paths]


def applied(plan: sm.Plan, path: Path) -> pydicom.Dataset:
    new = sm.apply_plan(plan, read_dataset(path.read_bytes()), str(path))
    return pydicom.dcmread(io.BytesIO(write_dataset(new)))


def first_instance(index: list[sm.IndexEntry], study_uid: str) -> Path:
    """The merge's tag source, computed independently: smallest Orthanc instance id."""
    return Path(min((e.instance, e.source) for e in index if e.study_uid == study_uid)[1])


def assert_module_tags_copied(merged: pydicom.Dataset, target: pydicom.Dataset) -> None:
    for tag in sm.MODULE_TAGS:
        elem = target.get(tag)
        if elem is None or elem.VR == "SQ" or len(str(elem.value)) > 256:
            assert tag not in merged, pydicom.datadict.keyword_for_tag(tag)
        else:
            assert merged[tag].value == elem.value, pydicom.datadict.keyword_for_tag(tag)


@pytest.fixture
def brainix_and_comunix(samples: Path) -> list[Path]:
    return sorted((samples / "Brainix").rglob("*.dcm")) + sorted((samples / "Comunix").rglob("*.dcm"))


def test_merge_comunix_pet_into_brainix(brainix_and_comunix: list[Path], samples: Path) -> None:
    index = index_of(brainix_and_comunix, BRAINIX_STUDY_UID)
    pet = [e for e in index if "/Pet/" in e.source]
    brainix_id = next(e.study for e in index if e.study_uid == BRAINIX_STUDY_UID)
    plan = sm.plan_merge(index, sm.parse_merge(BRAINIX_STUDY_UID, {"Resources": [pet[0].series]}), KEY)
    assert sorted(plan.moves) == sorted(e.source for e in pet)
    assert plan.study_uid == BRAINIX_STUDY_UID and plan.study_id == brainix_id
    target = pydicom.dcmread(first_instance(index, BRAINIX_STUDY_UID), stop_before_pixels=True)
    assert "ReferencedStudySequence" in target  # a sequence: not copied, removed from the merged
    for entry in pet:
        merged = applied(plan, Path(entry.source))
        source = pydicom.dcmread(entry.source)
        assert_module_tags_copied(merged, target)
        assert merged.PatientName == "BRAINIX" and merged.PatientID == "5Yp0E"
        assert merged.StudyDescription == "IRM cérébrale, neuro-crâne"
        assert "ReferencedStudySequence" not in merged and "ReferencedStudySequence" in source
        assert merged.SeriesInstanceUID == plan.series_map[entry.series_uid] and UID_RE.match(merged.SeriesInstanceUID)
        assert merged.SOPInstanceUID == plan.sop_map[entry.sop_uid]
        ids = orthanc_ids(merged.PatientID, merged.StudyInstanceUID, merged.SeriesInstanceUID, merged.SOPInstanceUID)
        assert ids["study"] == brainix_id
        # Everything outside the two modules and the three UIDs is untouched.
        touched = set(sm.MODULE_TAGS) | {0x0020000E, 0x00080018}
        assert [e.tag for e in source if e.tag not in touched] == [e.tag for e in merged if e.tag not in touched]
        assert merged.PixelData == source.PixelData
        assert (merged.Modality, merged.SeriesDescription) == ("PT", "PET WB")


def test_merge_one_instance_by_orthanc_id(samples: Path) -> None:
    """Orthanc's test_merge_instances: Knee T1-1 joins Brainix and takes its patient."""
    paths = sorted((samples / "Brainix" / "Flair").glob("*.dcm"))[:3] + [samples / "Knee" / "T1" / "IM-0001-0001.dcm"]
    index = index_of(paths, BRAINIX_STUDY_UID)
    knee = index[-1]
    brainix_study = index[0].study
    plan = sm.plan_merge(index, sm.parse_merge(brainix_study, {"Resources": [knee.instance], "KeepSource": True}), KEY)
    assert plan.keep_source is True and list(plan.moves) == [knee.source]
    merged = applied(plan, Path(knee.source))
    assert (merged.PatientName, merged.PatientID, merged.StudyInstanceUID) == ("BRAINIX", "5Yp0E", BRAINIX_STUDY_UID)
    assert merged.InstanceNumber == 1
    assert_module_tags_copied(merged, pydicom.dcmread(first_instance(index, BRAINIX_STUDY_UID), stop_before_pixels=True))


def test_merge_a_whole_study_by_uid(samples: Path) -> None:
    paths = sorted((samples / "Knee").rglob("*.dcm")) + sorted((samples / "Brainix" / "Epi").glob("*.dcm"))[:2]
    index = index_of(paths, BRAINIX_STUDY_UID)
    plan = sm.plan_merge(index, sm.parse_merge(BRAINIX_STUDY_UID, {"Resources": ["2.16.840.1.113669.632.20.121711.10000160881"]}), KEY)
    assert len(plan.moves) == 50 and len(plan.series_map) == 2
    assert plan.partial == plan.partial_studies == frozenset()
    assert plan.study_map == {"2.16.840.1.113669.632.20.121711.10000160881": BRAINIX_STUDY_UID}
    assert plan.describe() == "merge: 50 instance(s) in 2 series; KeepSource false"


def test_merge_follows_references_and_copies_tags(tmp_path: Path) -> None:
    refs = write_reference_studies(tmp_path)
    index = index_of(list(refs.values()), STUDY_B)
    plan = sm.plan_merge(index, sm.parse_merge(STUDY_B, {"Resources": [STUDY_A]}), KEY)
    assert len(plan.moves) == 7 and len(plan.series_map) == 4
    assert plan.set_tags == (
        (0x00080020, "20210404"), (0x00080030, "090909"), (0x00080050, "ACC-B"), (0x00081030, "Study B"),
        (0x00100010, "Beta^Bob"), (0x00100020, "PAT-B"), (0x00100030, "19800303"), (0x00100040, "M"),
        (0x00101000, "B-OLD-1\\B-OLD-2"), (0x00200010, "B1"),
    )  # fmt: skip
    assert 0x00104000 in plan.remove_tags  # PatientComments, 300 characters: over Orthanc's 256
    assert 0x00081110 in plan.remove_tags  # ReferencedStudySequence: a sequence
    assert 0x00102160 in plan.remove_tags  # EthnicGroup: absent from the target
    assert plan.study_id == orthanc_ids("PAT-B", STUDY_B, "", "")["study"]
    rt = applied(plan, refs["A/rtstruct.dcm"])
    sr = applied(plan, refs["A/sr.dcm"])
    new = {**plan.sop_map, **plan.series_map, STUDY_A: STUDY_B}
    original_rt = pydicom.dcmread(refs["A/rtstruct.dcm"])
    assert referenced_uids(rt) == [(k, new.get(v, v)) for k, v in referenced_uids(original_rt)]
    assert ("ReferencedSOPInstanceUID", STUDY_B) in referenced_uids(rt)
    assert ("SeriesInstanceUID", plan.series_map[CT_SERIES]) in referenced_uids(rt)
    original_sr = pydicom.dcmread(refs["A/sr.dcm"])
    assert referenced_uids(sr) == [(k, new.get(v, v)) for k, v in referenced_uids(original_sr)]
    assert ("StudyInstanceUID", STUDY_B) in referenced_uids(sr)
    for ds in (rt, sr):
        assert (ds.PatientName, ds.PatientID, ds.StudyInstanceUID) == ("Beta^Bob", "PAT-B", STUDY_B)
        assert ds.OtherPatientIDs == ["B-OLD-1", "B-OLD-2"]
        assert "EthnicGroup" not in ds and "PatientComments" not in ds and "ReferencedStudySequence" not in ds
    assert plan.sop_map.keys() == {*CT_SOPS, RT_SOP, *MR_SOPS, SR_SOP}
    assert not set(plan.sop_map) & set(B_SOPS)
    assert LONG_COMMENT not in plan.describe()


def test_merge_copies_target_values_up_to_a_nul_as_orthanc(tmp_path: Path) -> None:
    """Orthanc 1.10.1 reads the target's values as C strings: "desc\\0tail" merges as "desc"
    (checked against it); a NUL also lets a value longer than 256 bytes through, cut short."""
    refs = write_reference_studies(tmp_path)
    target = pydicom.dcmread(refs["B/ct1.dcm"])
    target.StudyDescription = "desc\0tail"
    target.AccessionNumber = "A\0B"
    target.PatientComments = "short\0" + "x" * 300
    target.save_as(refs["B/ct1.dcm"])
    index = index_of(list(refs.values()), STUDY_B)
    assert first_instance(index, STUDY_B) == refs["B/ct1.dcm"]
    plan = sm.plan_merge(index, sm.parse_merge(STUDY_B, {"Resources": [STUDY_A]}), KEY)
    tags = dict(plan.set_tags)
    assert (tags[0x00081030], tags[0x00080050], tags[0x00104000]) == ("desc", "A", "short")
    merged = applied(plan, refs["A/ct1.dcm"])
    assert (merged.StudyDescription, merged.AccessionNumber, merged.PatientComments) == ("desc", "A", "short")


def test_merge_one_series_keeps_study_references_elsewhere(tmp_path: Path) -> None:
    """Only the MR series joins study B: the SR that stays is not an output; the MR images'
    own hierarchy changes, and study A is partial (its CT, RTSTRUCT and SR stay)."""
    refs = write_reference_studies(tmp_path)
    index = index_of(list(refs.values()), STUDY_B)
    plan = sm.plan_merge(index, sm.parse_merge(STUDY_B, {"Resources": [MR_SERIES]}), KEY)
    assert sorted(plan.moves) == sorted(str(refs[f"A/mr{i}.dcm"]) for i in (1, 2))
    assert STUDY_A in plan.partial_studies and MR_SERIES not in plan.partial | plan.partial_studies
    assert plan.staying == {*CT_SOPS, RT_SOP, SR_SOP}
    mr = applied(plan, refs["A/mr2.dcm"])
    assert (mr.StudyInstanceUID, mr.SeriesInstanceUID) == (STUDY_B, plan.series_map[MR_SERIES])


def test_merge_switches_to_utf8_when_the_target_name_does_not_fit(samples: Path) -> None:
    """A Greek patient name (ISO_IR 126 target) into a Latin-1 instance with accented text."""
    greek = samples / "Encodings" / "Lena-greek.dcm"
    flair = samples / "Brainix" / "Flair" / "IM-0001-0001.dcm"
    target_uid = str(pydicom.dcmread(greek, stop_before_pixels=True).StudyInstanceUID)
    index = index_of([greek, flair], target_uid)
    plan = sm.plan_merge(index, sm.parse_merge(target_uid, {"Resources": [index[1].instance]}), KEY)
    merged = applied(plan, flair)
    source = pydicom.dcmread(flair)
    assert merged.SpecificCharacterSet == "ISO_IR 192"
    assert merged.PatientName == "Test-Θ"
    assert merged.RequestedProcedureDescription == "IRM cérébrale, neuro-crâne" == source.RequestedProcedureDescription
    assert merged.PerformedProtocolCodeSequence[0].CodeMeaning == "IRM cérébrale, neuro-crâne"
    assert merged.RequestAttributesSequence[0].ScheduledProcedureStepDescription == "IRM cérébrale, neuro-crâne"
    assert "StudyDescription" not in merged  # the target has none


def test_the_utf8_switch_decodes_only_text(samples: Path, tmp_path: Path) -> None:
    """A Greek name into an ISO_IR 13 (katakana) instance whose DS holds a stray byte 0xBD
    (found by a split/merge mutation run): the switch used to decode every element, and the
    DS, read as katakana, could not be written back (an internal error). Only text is decoded
    now; every other value keeps the bytes read."""
    greek = samples / "Encodings" / "Lena-greek.dcm"
    original = (samples / "Encodings" / "ISO_IR13.dcm").read_bytes()
    damaged = tmp_path / "ISO_IR13-damaged.dcm"
    damaged.write_bytes(original.replace(b"\x18\x00\x95\x00DS\x04\x00150 ", b"\x18\x00\x95\x00DS\x04\x00150\xbd"))
    target_uid = str(pydicom.dcmread(greek, stop_before_pixels=True).StudyInstanceUID)
    index = index_of([greek, damaged], target_uid)
    plan = sm.plan_merge(index, sm.parse_merge(target_uid, {"Resources": [index[1].instance]}), KEY)
    out = write_dataset(sm.apply_plan(plan, read_dataset(damaged.read_bytes()), str(damaged)))
    merged, source = pydicom.dcmread(io.BytesIO(out)), pydicom.dcmread(damaged)
    assert (merged.SpecificCharacterSet, merged.PatientName) == ("ISO_IR 192", "Test-Θ")
    assert b"\x18\x00\x95\x00DS\x04\x00150\xbd" in out  # as read
    texts = [e.tag for e in source.iterall() if e.VR in ("SH", "LO", "ST", "LT", "UT", "PN") and e.tag not in sm.MODULE_TAGS]
    assert len(texts) > 5 and all(merged[t].value == source[t].value for t in texts if t in source)


def test_a_specific_character_set_damaged_into_vr_us_reads_as_written(samples: Path, tmp_path: Path) -> None:
    """One flipped byte made a Latin-1 instance's SpecificCharacterSet VR US (found by a
    split/merge mutation run): pydicom decodes it as numbers it then cannot look up, and both a
    split (its reference pass) and a merge (its UTF-8 switch) ended in an internal error. Its
    bytes still say ISO_IR 100, and are read so, as the modification engine reads them."""
    greek = samples / "Encodings" / "Lena-greek.dcm"
    flair = samples / "Brainix" / "Flair" / "IM-0001-0021.dcm"
    damaged = tmp_path / "flair-damaged.dcm"
    charset = b"\x08\x00\x05\x00CS\n\x00ISO_IR 100"
    assert flair.read_bytes().count(charset) == 1
    damaged.write_bytes(flair.read_bytes().replace(charset, b"\x08\x00\x05\x00US\n\x00ISO_IR 100"))
    target_uid = str(pydicom.dcmread(greek, stop_before_pixels=True).StudyInstanceUID)
    index = index_of([greek, damaged], target_uid)
    plan = sm.plan_merge(index, sm.parse_merge(target_uid, {"Resources": [index[1].instance]}), KEY)
    merged = pydicom.dcmread(io.BytesIO(write_dataset(sm.apply_plan(plan, read_dataset(damaged.read_bytes()), str(damaged)))))
    assert (merged.SpecificCharacterSet, merged.PatientName) == ("ISO_IR 192", "Test-Θ")
    assert merged.RequestedProcedureDescription == "IRM cérébrale, neuro-crâne"
    study, series = index[1].study_uid, index[1].series_uid
    split = sm.plan_split(index_of([damaged], None), sm.parse_split(study, {"Series": [series], "Replace": {"PatientName": "Moved^Here"}}), KEY)
    moved = read_dataset(write_dataset(sm.apply_plan(split, read_dataset(damaged.read_bytes()), str(damaged))))
    assert (moved.StudyInstanceUID, moved.PatientName) == (split.study_uid, "Moved^Here")
    assert moved.RequestedProcedureDescription == "IRM cérébrale, neuro-crâne"


def test_a_specific_character_set_damaged_into_a_sequence_does_not_stop_a_split(tmp_path: Path) -> None:
    """CT_small with its SpecificCharacterSet replaced by a sequence of one item referencing
    the instance (the structured split/merge run, seed 53, retagged a sequence so): the
    reference pass parsed sequences with pydicom's own character set lookup, which raised
    TypeError on it (an internal error). It reads the default, as the modification engine
    does, and the references in both sequences follow the instance."""
    import struct

    from pydicom.data import get_testdata_file
    from pydicom.dataset import Dataset

    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    reference = Dataset()  # a reference to the instance itself: the reference pass parses it
    reference.ReferencedSOPClassUID, reference.ReferencedSOPInstanceUID = ct.SOPClassUID, ct.SOPInstanceUID
    ct.ReferencedImageSequence = [reference]
    buffer = io.BytesIO()
    ct.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    charset = b"\x08\x00\x05\x00CS\x0a\x00ISO_IR 100"
    assert data.count(charset) == 1
    uid = ct.SOPInstanceUID.encode() + b"\0" * (len(ct.SOPInstanceUID) % 2)
    element = b"\x08\x00\x55\x11UI" + struct.pack("<H", len(uid)) + uid  # a ReferencedSOPInstanceUID
    item = struct.pack("<HHI", 0xFFFE, 0xE000, len(element)) + element
    damaged = tmp_path / "ct.dcm"
    damaged.write_bytes(data.replace(charset, b"\x08\x00\x05\x00SQ\x00\x00" + struct.pack("<I", len(item)) + item))
    source = read_dataset(damaged.read_bytes())
    study, series = str(source.StudyInstanceUID), str(source.SeriesInstanceUID)
    split = sm.plan_split(index_of([damaged], None),
                          sm.parse_split(study, {"Series": [series], "Replace": {"PatientName": "Moved^Here"}}), KEY)
    moved = read_dataset(write_dataset(sm.apply_plan(split, read_dataset(damaged.read_bytes()), str(damaged))))
    assert (moved.StudyInstanceUID, moved.PatientName) == (split.study_uid, "Moved^Here")
    assert moved.ReferencedImageSequence[0].ReferencedSOPInstanceUID == moved.SOPInstanceUID != ct.SOPInstanceUID
    assert moved[0x00080005].value[0].ReferencedSOPInstanceUID == moved.SOPInstanceUID


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({}, "merge: Resources is mandatory (an array of study, series or instance ids)"),
        ({"Resources": []}, "merge: Resources is empty: nothing to merge"),
        ({"Resources": "1.2"}, "merge: Resources must be an array of identifiers"),
        ({"Resources": [""]}, "merge: Resources[0]: expected a DICOM UID or an Orthanc id (a non-empty string)"),
        ({"Resources": ["1.2"], "KeepSource": 1}, "merge: KeepSource must be true or false, got number"),
        ({"Resources": ["1.2"], "Replace": {}}, "merge: unknown key(s) 'Replace'; allowed: KeepSource, Resources "
                                                "(and Orthanc's job keys, ignored)"),
        ("[]", "merge: the body must be a JSON object"),
    ],
)
def test_refused_bodies(body: object, message: str) -> None:
    with pytest.raises(RequestError, match=f"^{re.escape(message)}$"):
        sm.parse_merge("1.2.3", body)


def test_refused_against_the_index(samples: Path) -> None:
    paths = sorted((samples / "Knee" / "T1").glob("*.dcm"))[:2] + sorted((samples / "Brainix" / "Flair").glob("*.dcm"))[:2]
    index = index_of(paths, KNEE_STUDY_ID)
    knee, brainix = index[0], index[-1]

    def refused(target: str, resources: list[str], message: str) -> None:
        with pytest.raises(RequestError, match=f"^{re.escape(message)}$"):
            sm.plan_merge(index, sm.parse_merge(target, {"Resources": resources}), KEY)

    unknown_target = "merge: --study: no instance of this target study in INPUT (cannot merge into an unknown or empty study)"
    refused("1.2.3", [brainix.study], unknown_target)
    refused(brainix.series, [knee.study], unknown_target)  # a series id is not a study
    refused(KNEE_STUDY_ID, [brainix.study, "1.2.3"], "merge: Resources[1]: no study, series or instance in INPUT has this identifier")
    refused(KNEE_STUDY_ID, [brainix.patient],
            "merge: Resources[0]: this is a patient, neither a study, nor a series, nor an instance")
    refused(KNEE_STUDY_ID, [KNEE_STUDY_ID],
            "merge: Resources[0]: this study is already in the target study (a study cannot be merged into itself)")
    refused(knee.study_uid, [brainix.instance, knee.series_uid],
            "merge: Resources[1]: this series is already in the target study (a study cannot be merged into itself)")
    refused(KNEE_STUDY_ID, [knee.sop_uid],
            "merge: Resources[0]: this instance is already in the target study (a study cannot be merged into itself)")


def test_index_without_target_tags_is_a_programming_error(samples: Path) -> None:
    paths = sorted((samples / "Knee" / "T1").glob("*.dcm"))[:1] + sorted((samples / "Brainix" / "Flair").glob("*.dcm"))[:1]
    index = index_of(paths, "1.2.3")
    with pytest.raises(ValueError, match="study_tags_for"):
        sm.plan_merge(index, sm.parse_merge(KNEE_STUDY_ID, {"Resources": [index[1].study]}), KEY)


def test_merge_is_deterministic_and_keyed(tmp_path: Path) -> None:
    refs = write_reference_studies(tmp_path)
    index = index_of(list(refs.values()), STUDY_B)
    request = sm.parse_merge(STUDY_B, {"Resources": [STUDY_A]})
    plan = sm.plan_merge(index, request, KEY)
    assert sm.plan_merge(list(reversed(index)), request, KEY) == plan
    other = sm.plan_merge(index, request, Key.from_bytes(b"another-key-0123456789abcdef"))
    assert set(other.series_map.values()).isdisjoint(plan.series_map.values())
    assert other.study_uid == plan.study_uid == STUDY_B
    # plan_merge's documented derivation: an operation seed keyed from a digest of the target
    # study and the moved instances (Orthanc ids, sorted), then key.uid('merge-series',
    # f"{seed}|{old SeriesInstanceUID}"); the literal pins it, since past runs carry it.
    read = [pydicom.dcmread(p, stop_before_pixels=True) for p in refs.values()]
    ids = [orthanc_ids(ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID) for ds in read]
    [target] = {i["study"] for ds, i in zip(read, ids) if ds.StudyInstanceUID == STUDY_B}
    moved = sorted(i["instance"] for ds, i in zip(read, ids) if ds.StudyInstanceUID == STUDY_A)
    seed = documented_uid(SECRET, "merge-operation", operation_digest(["merge", target, *moved]))
    assert plan.series_map[CT_SERIES] == documented_uid(SECRET, "merge-series", f"{seed}|{CT_SERIES}")
    assert plan.series_map[CT_SERIES] == "2.25.34613562177338514172135443155282628531"


def test_the_read_only_reference_scan_keeps_no_list_of_every_token():
    """Which elements mention a moved UID is found by scanning raw values for UID-shaped
    tokens, into a set. ``findall`` built the list of every token first: 18 MB of "11\\" (six
    million tokens) took 320 MB where the set keeps three; now a value over 1 MB is streamed."""
    import tracemalloc

    from pydicom.dataelem import RawDataElement
    from pydicom.tag import BaseTag

    value = b"11\\" * 600_000  # 1.8 MB
    elem = RawDataElement(BaseTag(0x00081155), "UI", len(value), value, 0, True, True)
    tracemalloc.start()
    try:
        tokens = set(sm._tokens(elem))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert tokens == {"11", "1", ""}
    assert peak < 1 << 20, peak  # the list alone: 600,000 bytes objects, ~25 MB


def test_multi_valued_references_are_compared_up_to_a_bound_per_file(tmp_path: Path, monkeypatch) -> None:
    """A moved instance whose references hold many values (each split into a string, compared
    and maybe mapped to a ~44-character UID): past ``paths.MAX_MAPPED_VALUES`` (1,000,000;
    1,000 here) the instance is ``too_large``, counted before the values are split, as in
    de-identification."""
    from pydicom.data import get_testdata_file
    from pydicom.dataset import Dataset

    from transforms import paths
    from transforms.errors import InputError

    monkeypatch.setattr(paths, "MAX_MAPPED_VALUES", 1000)
    target, moved = Path(get_testdata_file("CT_small.dcm")), tmp_path / "mr.dcm"
    target_uid = str(pydicom.dcmread(target, stop_before_pixels=True).StudyInstanceUID)

    def merged(count: int) -> tuple[pydicom.Dataset, str]:
        ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
        ref = Dataset()
        ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = ds.SOPClassUID, [ds.SOPInstanceUID] * count
        ds.ReferencedImageSequence = [ref]
        ds.save_as(moved, enforce_file_format=True)
        index = index_of([target, moved], target_uid)
        plan = sm.plan_merge(index, sm.parse_merge(target_uid, {"Resources": [index[1].instance]}), KEY)
        return applied(plan, moved), plan.sop_map[str(ds.SOPInstanceUID)]

    out, new_sop = merged(999)
    assert list(out.ReferencedImageSequence[0].ReferencedSOPInstanceUID) == [new_sop] * 999
    message = r"too many values of multi-valued UIDs to compare in one file \(at most 1,000\)"
    with pytest.raises(InputError, match=message) as raised:
        merged(1001)
    assert raised.value.reason == "too_large"


def test_merge_copies_a_target_value_whose_padding_takes_it_past_256_bytes(tmp_path: Path) -> None:
    """Orthanc 1.10.1's limit of 256 counts the value without its trailing padding: a
    PatientComments of "Allergic to contrast" padded to 320 bytes is copied (checked against
    it; it used to be removed), and so are 256 characters plus two spaces; 257 are not."""
    refs = write_reference_studies(tmp_path)
    target = pydicom.dcmread(refs["B/ct1.dcm"])
    target.PatientComments = "Allergic to contrast" + " " * 300
    target.StudyDescription = "x" * 256 + "  "
    target.AccessionNumber = "y" * 257
    target.save_as(refs["B/ct1.dcm"])
    raw = read_dataset(refs["B/ct1.dcm"].read_bytes())
    assert (raw._dict[0x00104000].length, raw._dict[0x00081030].length) == (320, 258)  # (written as padded)
    index = index_of(list(refs.values()), STUDY_B)
    assert first_instance(index, STUDY_B) == refs["B/ct1.dcm"]
    plan = sm.plan_merge(index, sm.parse_merge(STUDY_B, {"Resources": [STUDY_A]}), KEY)
    tags = dict(plan.set_tags)
    assert (tags[0x00104000], tags[0x00081030]) == ("Allergic to contrast", "x" * 256)
    assert 0x00080050 in plan.remove_tags and 0x00080050 not in tags
    merged = applied(plan, refs["A/ct1.dcm"])
    assert (merged.PatientComments, merged.StudyDescription) == ("Allergic to contrast", "x" * 256)
    assert "AccessionNumber" not in merged
