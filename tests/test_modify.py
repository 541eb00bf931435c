"""The modification engine on real files: Orthanc's /modify cases with exact values."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from transforms import dicomio
from transforms.engine import apply
from transforms.identity import Key
from transforms.request import parse_modify

from .conftest import sample

KEY = Key.from_bytes(b"modify-test-key-0123456789")
OTHER_KEY = Key.from_bytes(b"another-test-key-0123456789")
BOOK_BINARY = "data:application/octet-stream;base64,SSB3YXMgaGVyZSBpbiAyMDE5LiAgTWFydHkgTWNGbHku"


def _read(path: Path | str) -> Dataset:
    return dicomio.read_dataset(Path(path).read_bytes(), check_uids=False)


def _modify(body: dict, ds: Dataset, key: Key = KEY, **kwargs) -> Dataset:
    """Apply, write, read back (as Orthanc's /instances/{id}/modify answers a file)."""
    before = dicomio.write_dataset(ds)
    out = apply(parse_modify(body, **kwargs), ds, key)
    assert dicomio.write_dataset(ds) == before, "the input dataset was modified"
    return dicomio.read_dataset(dicomio.write_dataset(out), check_uids=False)


def _new_uid(plan, kind: str, original: str) -> str:
    """The UID a modification derives (namespaces: transforms.engine._Tables)."""
    return KEY.uid(f"modify.{plan.fingerprint}.{kind}", original)


def _ids(ds: Dataset) -> tuple[str, str, str, str]:
    return (ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)


def test_modify_instance_private_tags_and_station_name():  # TC-01
    source = _read(sample("PrivateTags.dcm"))
    result = _modify({"Replace": {"PatientName": "hello"}, "Remove": ["StationName"],
                      "RemovePrivateTags": True}, source)
    assert result.PatientName == "hello"
    assert "StationName" not in result
    assert [e.tag for e in result if e.tag.is_private] == []
    assert source.StationName == "LOGIQBOOK" and 0x60031010 in source
    assert source.PatientName != "hello"
    # Instance level: only the SOP Instance UID is new.
    assert result.StudyInstanceUID == source.StudyInstanceUID
    assert result.SeriesInstanceUID == source.SeriesInstanceUID
    assert result.SOPInstanceUID != source.SOPInstanceUID
    assert result.file_meta.MediaStorageSOPInstanceUID == result.SOPInstanceUID


def test_private_tags_survive_without_remove_private_tags():
    source = _read(sample("PrivateTags.dcm"))
    result = _modify({"Replace": {"PatientName": "hello"}}, source)
    assert [str(e.tag) for e in result if e.tag.is_private] == \
        ["(6003,0010)", "(6003,1010)", "(7FE1,0010)", "(7FE1,1001)"]
    assert result.StationName == "LOGIQBOOK"


@pytest.mark.parametrize(("value", "stored"), [("unknowntext", b"unknowntext\x00"),
                                               ("data:application/octet-stream;base64,AAAA", b"\x00" * 4),
                                               (None, b"")])
def test_a_private_sequence_replaced_by_a_value_has_no_items_for_a_path(value, stored):
    """(6003,1010) of PrivateTags.dcm is a private sequence the dictionaries do not know:
    replaced by text, bytes or null it is that value (UN), and a path below it reaches no
    item, as in Orthanc 1.10.1. The path used to read the new bytes as items (pydicom's
    private dictionary says SQ): the value was lost to one invented item, or the valid input
    was refused as not_dicom."""
    source = _read(sample("PrivateTags.dcm"))
    for path in ("6003,1010[*].DerivationDescription", "(6003,1010)[0].(0008,2111)"):
        result = _modify({"Replace": {"6003,1010": value, path: "x"}}, source)
        elem = result._dict[0x60031010]
        assert (elem.VR, elem.value) == ("UN", stored)
    edited = _modify({"Replace": {"6003,1010[*].DerivationDescription": "x"}}, source)  # not replaced: items
    assert [item.DerivationDescription for item in edited[0x60031010].value] == ["x", "x"]

@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"])
def test_path_edits_reach_into_a_sequence_the_same_body_replaces(syntax):
    """Found by a differential fuzz against Orthanc 1.10.1: in an implicit VR file the replaced
    sequence is a raw element without a VR, and the path edits below it were dropped
    (ProcedureCodeSequence[0].CodeMeaning stayed unset, a Remove below it kept its element);
    explicit VR files were right. Both now give Orthanc's result."""
    ds = _read(get_testdata_file("CT_small.dcm"))
    ds.file_meta.TransferSyntaxUID = syntax
    source = dicomio.read_dataset(dicomio.write_dataset(ds), check_uids=False)
    assert source.original_encoding[0] is (syntax == "1.2.840.10008.1.2")
    result = _modify({"Replace": {"ProcedureCodeSequence": [{}, {"CodeValue": "A"}],
                                  "ProcedureCodeSequence[0].CodeMeaning": "DELTA-X",
                                  "ReferencedSeriesSequence": [{"SeriesInstanceUID": "1.2.3", "Modality": "CT"}],
                                  "ReferencedStudySequence": [{"PatientName": "Inner^Name"}],
                                  "ReferencedStudySequence[*].PatientName": "Mull^J"},
                      "Remove": ["ReferencedSeriesSequence[0].SeriesInstanceUID"]}, source)
    assert [(i.get("CodeValue"), i.get("CodeMeaning")) for i in result.ProcedureCodeSequence] == \
        [(None, "DELTA-X"), ("A", None)]
    assert [sorted(i.dir()) for i in result.ReferencedSeriesSequence] == [["Modality"]]
    assert [str(i.PatientName) for i in result.ReferencedStudySequence] == ["Mull^J"]


def test_modify_subsequences():  # TC-25, modification half
    source = _read(sample("Issue22-NoPixelData.dcm"))
    result = _modify({
        "Replace": {
            "PatientName": "Hello1",
            "DimensionIndexSequence[1].DimensionDescriptionLabel": "Hello2",
            "DimensionIndexSequence[*].PatientName": "Hello3",
            "ReferencedImageEvidenceSequence[2].ReferencedSeriesSequence[0]"
            ".ReferencedSOPSequence[0].ReferencedSOPInstanceUID": "Hello4",
            "DimensionOrganizationSequence[0].DimensionOrganizationUID": "1.2.3.4",
        },
        "Remove": [
            "ReferencedPerformedProcedureStepSequence",
            "PerformedProtocolCodeSequence[0].CodeValue",
            "SharedFunctionalGroupsSequence[*].ReferencedImageSequence[*].ReferencedSOPInstanceUID",
            "SharedFunctionalGroupsSequence[*].ReferencedImageSequence[1].ReferencedSOPClassUID",
            "SharedFunctionalGroupsSequence[2].ReferencedImageSequence",
        ],
    }, source)
    assert source.PatientName == "Anonymized1" and result.PatientName == "Hello1"
    assert [(i.DimensionDescriptionLabel, i.PatientName) for i in result.DimensionIndexSequence] \
        == [("Stack ID", "Hello3"), ("Hello2", "Hello3"), ("Effective Echo Time", "Hello3")]
    assert all("PatientName" not in i for i in source.DimensionIndexSequence)
    evidence = result.ReferencedImageEvidenceSequence
    assert evidence[2].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]\
        .ReferencedSOPInstanceUID == "Hello4"
    assert evidence[1].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]\
        .ReferencedSOPInstanceUID == "1.3.46.670589.11.22237.5.20.1.1.7512.2014100814064168452"
    assert "ReferencedPerformedProcedureStepSequence" in source
    assert "ReferencedPerformedProcedureStepSequence" not in result
    assert "CodeValue" in source.PerformedProtocolCodeSequence[0]
    assert "CodeValue" not in result.PerformedProtocolCodeSequence[0]
    refs = result.SharedFunctionalGroupsSequence[0].ReferencedImageSequence
    assert [("ReferencedSOPInstanceUID" in r, "ReferencedSOPClassUID" in r) for r in refs] == \
        [(False, True), (False, False), (False, True)]
    assert source.DimensionOrganizationSequence[0].DimensionOrganizationUID == \
        "1.3.46.670589.11.22237.5.0.11272.2014100816243076000"
    assert result.DimensionOrganizationSequence[0].DimensionOrganizationUID == "1.2.3.4"
    # Untouched nested content keeps its values (modification has no nested pass).
    assert len(result.PerFrameFunctionalGroupsSequence) == 24
    assert result.PerFrameFunctionalGroupsSequence[5][0x2005140F][0].SOPInstanceUID == \
        source.PerFrameFunctionalGroupsSequence[5][0x2005140F][0].SOPInstanceUID


def test_shanon_2_levels_follow_the_replaced_identifiers():  # TC-33
    source = _read(sample("DummyCT.dcm"))
    p, st, se, sop = _ids(source)

    def ids(replace):
        return _ids(_modify({"Replace": replace, "Force": True}, source))

    r = ids({})
    assert r[:3] == (p, st, se) and r[3] != sop
    assert ids({"SOPInstanceUID": "instance"}) == (p, st, se, "instance")
    r = ids({"SeriesInstanceUID": "series"})
    assert r[:3] == (p, st, "series") and r[3] != sop
    r = ids({"StudyInstanceUID": "study"})
    assert r[:2] == (p, "study") and r[2] != se and r[3] != sop
    r = ids({"PatientID": "patient"})
    assert r[0] == "patient" and r[1] != st and r[2] != se and r[3] != sop
    assert ids({"PatientID": "patient", "StudyInstanceUID": "study",
                "SeriesInstanceUID": "series", "SOPInstanceUID": "instance"}) == \
        ("patient", "study", "series", "instance")


@pytest.mark.parametrize(
    ("level", "same"),
    [("Instance", (True, True, True)), ("Series", (True, True, False)),
     ("Study", (True, False, False))],
)
def test_levels_regenerate_consistently_across_instances(level, same):
    first = _read(sample("Brainix/Flair/IM-0001-0001.dcm"))
    second = _read(sample("Brainix/Flair/IM-0001-0002.dcm"))
    a = _modify({"Replace": {"SeriesDescription": "x"}}, first, level=level)
    b = _modify({"Replace": {"SeriesDescription": "x"}}, second, level=level)
    for index, kept in enumerate(same):
        original = _ids(first)[index]
        assert (_ids(a)[index] == original) is kept
        assert _ids(a)[index] == _ids(b)[index] if index < 3 else True
    assert a.SOPInstanceUID != b.SOPInstanceUID
    assert a.SOPInstanceUID.startswith("2.25.")
    # Same key and body: same result on a rerun. Another key or body: other UIDs.
    assert _modify({"Replace": {"SeriesDescription": "x"}}, first, level=level).SOPInstanceUID \
        == a.SOPInstanceUID
    assert _modify({"Replace": {"SeriesDescription": "x"}}, first, OTHER_KEY,
                   level=level).SOPInstanceUID != a.SOPInstanceUID
    assert _modify({"Replace": {"SeriesDescription": "y"}}, first,
                   level=level).SOPInstanceUID != a.SOPInstanceUID


def test_patient_level_regenerates_all_three_uids():
    source = _read(sample("Brainix/Flair/IM-0001-0001.dcm"))
    body = {"Replace": {"PatientID": "Hello", "PatientName": "Sample patient name"}, "Force": True}
    result = _modify(body, source, level="Patient")
    assert result.PatientID == "Hello" and result.PatientName == "Sample patient name"
    plan = parse_modify(body, level="Patient")
    assert _ids(result)[1:] == tuple(_new_uid(plan, kind, old) for kind, old in
                                     zip(("study", "series", "instance"), _ids(source)[1:]))


def test_keep_and_force_alter_an_instance_keeping_its_identity():  # §13
    source = _read(sample("DummyCT.dcm"))
    result = _modify({"Replace": {"StationName": "NEW"}, "Keep": ["SOPInstanceUID"],
                      "Force": True}, source)
    assert result.StationName == "NEW"
    assert _ids(result) == _ids(source)
    assert result.file_meta.MediaStorageSOPInstanceUID == source.SOPInstanceUID


def test_modification_does_not_remap_other_uids():  # TC-34
    source = _read(sample("Issue94.dcm"))
    result = _modify({"Replace": {"PatientID": "toto"}, "Force": True}, source)
    assert result.PatientID == "toto"
    assert result.FrameOfReferenceUID == source.FrameOfReferenceUID


def test_replace_sequences_nested_and_utf8():  # TC-08
    source = _read(sample("PrivateTags.dcm"))
    result = _modify({"Replace": {"PatientName": "hello", "ReferencedStudySequence": [
        {"StudyDescription": "Hello^", "ReferencedStudySequence": [
            {"StudyDescription": "Toto"}, {"StudyDescription": "Tata"}]},
        {"StudyDescription": "Sébastien^", "StudyDate": "19700202"}]}}, source)
    seq = result.ReferencedStudySequence
    assert len(seq) == 2
    assert [i.StudyDescription for i in seq[0].ReferencedStudySequence] == ["Toto", "Tata"]
    assert seq[1].StudyDate == "19700202"
    assert "ReferencedStudySequence" not in source


def test_book_examples_procedure_code_and_encrypted_binary():
    source = _read(get_testdata_file("CT_small.dcm"))
    result = _modify({"Replace": {
        "ProcedureCodeSequence": [{"CodeValue": "2", "CodingSchemeDesignator": "1",
                                   "CodeMeaning": "1"}],
        "EncryptedAttributesSequence": [{
            "EncryptedContentTransferSyntaxUID": "1.2.840.10008.1.2",
            "EncryptedContent": BOOK_BINARY}]}}, source)
    code = result.ProcedureCodeSequence[0]
    assert (code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning) == ("2", "1", "1")
    encrypted = result.EncryptedAttributesSequence[0]
    assert encrypted.EncryptedContentTransferSyntaxUID == "1.2.840.10008.1.2"
    assert encrypted.EncryptedContent == b"I was here in 2019.  Marty McFly.\x00"


def test_insert_absent_tags_null_empties_and_attribute_tags():  # TC-07.8, TC-24
    source = _read(sample("DummyCT.dcm"))
    assert 0x00209165 not in source and "InstitutionName" in source  # one tag inserted, the others replaced
    result = _modify({"Replace": {"StudyDescription": "hello", "Modality": "world",
                                  "StationName": None, "0020,9165": "0020,9056",
                                  "InstitutionName": ""}}, source)
    assert result.StudyDescription == "hello" and result.Modality == "world"
    assert result.StationName == "" and result.InstitutionName == ""
    assert result[0x00209165].value == 0x00209056
    assert result[0x00209165].VR == "AT"


def test_replacing_sop_class_keeps_file_meta_in_step():
    source = _read(get_testdata_file("CT_small.dcm"))
    out = apply(parse_modify({"Replace": {"SOPClassUID": "1.2.840.10008.5.1.4.1.1.7"}}),
                source, KEY)
    assert out.file_meta.MediaStorageSOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
    assert source.file_meta.MediaStorageSOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
    written = dicomio.read_dataset(dicomio.write_dataset(out))
    assert written.file_meta.MediaStorageSOPClassUID == "1.2.840.10008.5.1.4.1.1.7"


def _radio_logic_instance() -> Dataset:
    """An Issue140-like instance: private (4321,1012) LO with creator RadioLogic."""
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = "1.2.3.4.5.6"
    ds.StudyInstanceUID = "1.2.3.4"
    ds.SeriesInstanceUID = "1.2.3.4.5"
    ds.PatientID = "issue-4321"
    block = ds.private_block(0x4321, "RadioLogic", create=True)
    block.add_new(0x12, "LO", "jklmopq")
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    data = dicomio.write_dataset(ds, ExplicitVRLittleEndian)
    return dicomio.read_dataset(data)


def test_private_creator_gives_the_dictionary_vr():  # TC-35
    source = _radio_logic_instance()
    config = {"4321,1012": ["LO", "RadioButton3", 1, 1, "RadioLogic"]}
    result = _modify({"Replace": {"RadioButton3": "aaabbbccc"}, "PrivateCreator": "RadioLogic"},
                     source, dictionary=config)
    assert result[0x43211012].VR == "LO" and result[0x43211012].value == "aaabbbccc"
    assert result[0x43210010].value == "RadioLogic"
    assert source[0x43211012].value == "jklmopq"
    # Without the creator, Orthanc cannot find the VR: the value is stored as UN bytes.
    unknown = _modify({"Replace": {"4321,1012": "Hello"}}, source, dictionary=config)
    assert unknown[0x43211012].VR == "UN" and unknown[0x43211012].value == b"Hello\x00"


def test_remove_private_tags_keeps_a_private_replacement():
    source = _radio_logic_instance()
    result = _modify({"Replace": {"4321,1012": "x"}, "RemovePrivateTags": True}, source)
    assert [str(e.tag) for e in result if e.tag.is_private] == ["(4321,1012)"]


def test_modify_implicit_vr_file_without_preamble():
    source = _read(get_testdata_file("rtstruct.dcm"))
    result = _modify({"Replace": {"StructureSetLabel": "label",
                                  "StructureSetROISequence[2].ROIName": "iso"},
                      "Remove": ["StructureSetROISequence[0].ROIName"]}, source)
    assert result.StructureSetLabel == "label"
    assert [i.get("ROIName") for i in result.StructureSetROISequence] == \
        [None, "Isocenter 1", "iso"]
    assert result.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2"


def test_characters_the_file_charset_cannot_encode_are_dropped():
    source = _read(sample("Encodings/Lena-greek.dcm"))
    assert source.SpecificCharacterSet == "ISO_IR 126"
    result = _modify({"Replace": {"InstitutionalDepartmentName": "Sw\u00e9ep \u03a9\u03bc\u03ad\u03b3\u03b1",
                                  "ReferencedStudySequence": [{"StudyDescription": "\u00e9\u03a9"}]}},
                     source)
    assert result.InstitutionalDepartmentName == "Swep \u03a9\u03bc\u03ad\u03b3\u03b1"
    assert result.ReferencedStudySequence[0].StudyDescription == "\u03a9"



def _item_charset_file(top: str | None, item: str | None) -> Dataset:
    """CT_small with a ReferencedPatientSequence item that declares its own character set."""
    import io

    import pydicom

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    if top is None:
        del ds.SpecificCharacterSet
    else:
        ds.SpecificCharacterSet = top
    inner = Dataset()
    if item is not None:
        inner.SpecificCharacterSet = item
    inner.PatientID = "REF"
    ds.ReferencedPatientSequence = [inner]
    buffer = io.BytesIO()
    ds.save_as(buffer)
    return dicomio.read_dataset(buffer.getvalue(), check_uids=False)


@pytest.mark.parametrize(("top", "item", "expected"), [
    ("ISO_IR 100", "ISO_IR 144", "\u041f\u0440\u0438"),    # Cyrillic fits the item, é does not
    (None, "ISO_IR 192", "\u041f\u0440\u0438 \u00e9"),     # UTF-8 item in a Latin-1 file
    ("ISO_IR 192", "ISO_IR 100", " \u00e9"),               # Latin-1 item in a UTF-8 file
    ("ISO_IR 144", None, "\u041f\u0440\u0438"),            # no charset in the item: the file's
])
def test_text_written_into_an_item_fits_the_items_own_character_set(top, item, expected):
    """PS3.5 7.5.3: an item's SpecificCharacterSet governs its text. A replacement is cut to
    that repertoire and encoded in it, never "?" for what the file's repertoire had and the
    item's lacks (Orthanc fits and encodes in the top level's: mojibake in such items)."""
    import io

    import pydicom

    text = "\u041f\u0440\u0438 \u00e9"
    for body in ({"Replace": {"ReferencedPatientSequence[0].StudyDescription": text}},
                 {"Replace": {"ReferencedPatientSequence": [
                     {**({"SpecificCharacterSet": item} if item else {}), "StudyDescription": text}]}}):
        out = dicomio.write_dataset(apply(parse_modify(body), _item_charset_file(top, item), KEY))
        back = pydicom.dcmread(io.BytesIO(out))
        described = back.ReferencedPatientSequence[0]
        assert b"?" not in described.get_item(0x00081030).value, body  # raw, before decoding
        assert described.StudyDescription == expected, body


def test_an_item_relabelled_by_the_same_body_drops_what_its_new_set_lacks():
    """PatientComments sorts before SpecificCharacterSet, so it is fitted to the file's Latin-1
    and then written in the item's new Cyrillic set: "é" is dropped, never written as "?";
    StudyDescription, after it, fits the new set."""
    import io
    import warnings

    import pydicom

    body = {"Replace": {"ReferencedPatientSequence[0].PatientComments": "\u041f\u0440\u0438 \u00e9",
                        "ReferencedPatientSequence[0].SpecificCharacterSet": "ISO_IR 144",
                        "ReferencedPatientSequence[0].StudyDescription": "\u041f\u0440\u0438 \u00e9"}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # pydicom warns where it writes "?"
        out = dicomio.write_dataset(apply(parse_modify(body), _item_charset_file("ISO_IR 100", None), KEY))
    item = pydicom.dcmread(io.BytesIO(out)).ReferencedPatientSequence[0]
    assert item.get_item(0x00104000).value == b"  "
    assert item.get_item(0x00081030).value == b"\xbf\xe0\xd8 "
    assert item.StudyDescription == "\u041f\u0440\u0438"
def test_od_of_ol_arrays_are_written_as_binary_lists():  # TC-41 (Orthanc >= 1.12.11)
    import io

    import numpy as np
    import pydicom

    source = _read(sample("DummyCT.dcm"))
    result = _modify({"Replace": {"0066,0016": "101.1\\102.2\\103.3", "0070,150d": "110.1\\120.2\\130.3",
                                  "0066,0041": "20\\30\\42"}}, source)
    back = pydicom.dcmread(io.BytesIO(dicomio.write_dataset(result)))
    assert back[0x00660016].VR == "OF" and back[0x0070150D].VR == "OD" and back[0x00660041].VR == "OL"
    assert np.frombuffer(back[0x00660016].value, "<f4").tolist() == np.float32([101.1, 102.2, 103.3]).tolist()
    assert np.frombuffer(back[0x0070150D].value, "<f8").tolist() == [110.1, 120.2, 130.3]
    assert np.frombuffer(back[0x00660041].value, "<u4").tolist() == [20, 30, 42]
    assert 0x00660016 not in source and 0x0070150D not in source and 0x00660041 not in source


def test_study_level_modify_of_a_file_without_patient_id():  # TC-18
    source = _read(get_testdata_file("CT_small.dcm"))
    del source.PatientID
    plan = parse_modify({}, level="Study")
    result = apply(plan, source, KEY)
    assert "PatientID" not in result and "PatientID" not in source
    assert result.StudyInstanceUID == _new_uid(plan, "study", source.StudyInstanceUID)
    assert result.SeriesInstanceUID == _new_uid(plan, "series", source.SeriesInstanceUID)
    assert result.SOPInstanceUID == _new_uid(plan, "instance", source.SOPInstanceUID)
    again = apply(parse_modify({}, level="Study"), source, KEY)
    assert again.StudyInstanceUID == result.StudyInstanceUID  # keyed: the same study every time


def test_iso_ir_13_keeps_single_byte_katakana_and_drops_kanji():
    """ISO_IR 13 (JIS X 0201) holds romaji and half-width katakana only: kanji are dropped like
    any character the declared repertoire lacks (pydicom would write "?"; Orthanc writes
    Shift-JIS bytes that ISO_IR 13 does not define)."""
    import io

    import pydicom

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.SpecificCharacterSet = "ISO_IR 13"
    buffer = io.BytesIO()
    ds.save_as(buffer)
    plan = parse_modify({"Replace": {"PatientName": "Yamada^\u5c71\u7530^\uff71\uff72"}})
    out = dicomio.write_dataset(apply(plan, dicomio.read_dataset(buffer.getvalue()), KEY))
    assert b"?" not in out.split(b"Yamada", 1)[1][:12]
    assert pydicom.dcmread(io.BytesIO(out)).PatientName == "Yamada^^\uff71\uff72"


def test_pixel_data_replacement_needs_uncompressed_pixels():
    """Raw bytes under a compressed transfer syntax would be an image no reader decodes
    (Orthanc 1.10.1 answers 400): the file is refused; an uncompressed one takes the bytes."""
    from transforms.errors import DeidError

    body = {"Replace": {"PixelData": "data:application/octet-stream;base64,AQIDBA=="}}
    jpeg = _read(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"))
    assert jpeg.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"
    with pytest.raises(DeidError, match="Replace PixelData: the file's pixel data is compressed") as info:
        apply(parse_modify(body), jpeg, KEY)
    assert info.value.reason == "refused_by_request"
    plain = _read(get_testdata_file("CT_small.dcm"))
    assert _modify(body, plain).PixelData == b"\x01\x02\x03\x04"
