"""JSON -> DICOM value casting (orthanc-behavior.md §7)."""

from __future__ import annotations

import pickle
import re

import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset

from transforms.errors import RequestError
from transforms.tags import parse_dictionary
from transforms.values import Value, build_element, prepare_value

ROWS, WINDOW_CENTER = 0x00280010, 0x00281050
BOOK_BINARY = "data:application/octet-stream;base64,SSB3YXMgaGVyZSBpbiAyMDE5LiAgTWFydHkgTWNGbHku"


def _prepare(tag, value, **kwargs):
    return prepare_value(tag, value, key="Replace", **kwargs)


@pytest.mark.parametrize(
    ("tag", "json_value", "expected"),
    [
        (0x00100010, "Hello^World", Value(0x00100010, "PN", "Hello^World")),
        (0x00080008, "ORIGINAL\\PRIMARY", Value(0x00080008, "CS", "ORIGINAL\\PRIMARY")),
        (0x00080018, "instance", Value(0x00080018, "UI", "instance")),  # not validated
        (ROWS, "512", Value(ROWS, "US", (512,))),
        (ROWS, "", Value(ROWS, "US", None)),  # top-level "" empties any VR
        (0x00280106, "-12", Value(0x00280106, "SS", (-12,))),  # US or SS: sign decides
        (0x00280106, "12", Value(0x00280106, "US", (12,))),
        (0x00181310, "0\\256\\256\\0", Value(0x00181310, "US", (0, 256, 256, 0))),
        (0x00186020, "-5", Value(0x00186020, "SL", (-5,))),
        (0x00200012, "3", Value(0x00200012, "IS", "3")),
        (WINDOW_CENTER, "40.5\\-2e3", Value(WINDOW_CENTER, "DS", "40.5\\-2e3")),
        (0x00200032, "1\\\\3", Value(0x00200032, "DS", "1\\\\3")),  # an empty value in a list (PS3.5 6.4)
        (0x00200013, "-2147483648", Value(0x00200013, "IS", "-2147483648")),
        (0x00101030, "  ", Value(0x00101030, "DS", None)),  # only padding: an empty value
        (WINDOW_CENTER, "40\\ ", Value(WINDOW_CENTER, "DS", "40\\ ")),  # and an empty one in a list
        (0x00200013, " 7 ", Value(0x00200013, "IS", " 7 ")),  # spaces around: PS3.5 allows them
        (0x00180050, "-1.234567890e-10", Value(0x00180050, "DS", "-1.234567890e-10")),  # 16 characters
        (0x00189327, "1.25", Value(0x00189327, "FD", (1.25,))),
        (0x00209165, "0020,9056", Value(0x00209165, "AT", (0x00209056,))),  # test_modify_attribute
        (0x00209165, "StackID", Value(0x00209165, "AT", (0x00209056,))),
        (0x00100020, None, Value(0x00100020, "LO", None)),  # null: cast of "" -> empty
        (0x00340005, "13", Value(0x00340005, "OB", b"13")),  # binary VR: the UTF-8 bytes
        (0x00340005, "abc", Value(0x00340005, "OB", b"abc\x00")),  # padded to even length
        (0x00340005, BOOK_BINARY, Value(0x00340005, "OB",
                                        b"I was here in 2019.  Marty McFly.\x00")),
        # OB or OW: OW for PixelData and OverlayData, OB for the others (as DCMTK, so Orthanc)
        (0x54001010, "abc", Value(0x54001010, "OB", b"abc\x00")),  # WaveformData
        (0x00143070, "data:application/octet-stream;base64,AQID", Value(0x00143070, "OB", b"\x01\x02\x03\x00")),
        (0x60023000, "data:application/octet-stream;base64,AQIDBA==", Value(0x60023000, "OW", b"\x01\x02\x03\x04")),
        (0x00143070, "", Value(0x00143070, "OB", None)),
        (0x00081140, "", Value(0x00081140, "SQ", None)),  # empty sequence at top level
        (0x00660016, "101.1\\102.2", Value(0x00660016, "OF", (101.1, 102.2))),
        (0x00660041, "20\\30\\42", Value(0x00660041, "OL", (20, 30, 42))),
        (0x00081030, "abc\0\0", Value(0x00081030, "LO", "abc")),  # trailing NULs: padding
        (0x0020000D, "data:application/octet-stream;base64,MS4yLjMA", Value(0x0020000D, "UI", "1.2.3")),
        (0x7FE00010, "data:application/octet-stream;base64,AAEC/w==", Value(0x7FE00010, "OW", b"\x00\x01\x02\xff")),
        (0x00111010, "J\u00f6", Value(0x00111010, "UN", "J\u00f6")),  # encoded when built
        # two spellings of one tag in a sequence item: the first in name order, as Orthanc
        (0x00081110, [{"CodeMeaning": "keyword", "0008,0104": "hex"}],
         Value(0x00081110, "SQ", ((Value(0x00080104, "LO", "hex"),),))),
    ],
)
def test_cast(tag, json_value, expected):
    assert _prepare(tag, json_value) == expected


def test_sequences_nested_and_binary_items():
    body = [{"StudyDescription": "Hello^",
             "ReferencedStudySequence": [{"StudyDescription": "Toto"}, {"StudyDescription": "Tata"}]},
            {"StudyDescription": "Sébastien^", "StudyDate": "19700202"}, []]
    value = _prepare(0x00081110, body)
    assert value.vr == "SQ"
    assert value.value == (
        (Value(0x00081030, "LO", "Hello^"),
         Value(0x00081110, "SQ", ((Value(0x00081030, "LO", "Toto"),),
                                  (Value(0x00081030, "LO", "Tata"),)))),
        (Value(0x00080020, "DA", "19700202"), Value(0x00081030, "LO", "Sébastien^")),
        (),
    )
    encrypted = _prepare(0x04000500, [{"EncryptedContentTransferSyntaxUID": "1.2.840.10008.1.2",
                                       "EncryptedContent": BOOK_BINARY}])
    assert encrypted.value[0] == (Value(0x04000510, "UI", "1.2.840.10008.1.2"),
                                  Value(0x04000520, "OB", b"I was here in 2019.  Marty McFly.\x00"))
    assert pickle.loads(pickle.dumps(value)) == value


def test_private_tag_with_pydicoms_ob_ow_spelling():
    assert _prepare(0x70191080, "", private_creator="TOSHIBA_MEC_OT3") == Value(0x70191080, "OB", None)
    assert _prepare(0x70191080, "abc", private_creator="TOSHIBA_MEC_OT3") == Value(0x70191080, "OB", b"abc\x00")


def test_private_tag_uses_dictionary_vr_with_its_creator():
    dictionary = parse_dictionary({"4321,1012": ["LO", "RadioButton3", 1, 1, "RadioLogic"]})
    assert _prepare(0x43211012, "aaabbbccc", dictionary=dictionary,
                    private_creator="RadioLogic") == Value(0x43211012, "LO", "aaabbbccc")
    assert _prepare(0x43211012, "Hello", dictionary=dictionary) == \
        Value(0x43211012, "UN", b"Hello\x00")


@pytest.mark.parametrize(
    ("tag", "json_value", "message"),
    [
        (ROWS, "abc", "Replace: tag 'Rows' (0028,0010) (US): 'abc' is not an integer in 0..65535"),
        (ROWS, "70000", "'70000' is not an integer in 0..65535"),
        (ROWS, None, "Replace: tag 'Rows' (0028,0010) (US): '' is not an integer"),
        (ROWS, 512, "Replace: tag 'Rows' (0028,0010) (US): expected a string, null or (for a "
                    "sequence) an array of objects, got a number"),
        (ROWS, True, "got a boolean"),
        (ROWS, {"a": 1}, "got an object"),
        (ROWS, [{}], "Replace: tag 'Rows' (0028,0010) (US): an array is only allowed for a "
                     "sequence (SQ)"),
        (0x00200012, "x1", "Replace: tag 'AcquisitionNumber' (0020,0012) (IS): 'x1' is not an "
                           "integer string"),
        (WINDOW_CENTER, "abc", "(DS): 'abc' is not a decimal string"),
        # PS3.5 Table 6.2-1 (Orthanc 1.10.1 writes these invalid values)
        (0x00200013, "2147483648", "(IS): '2147483648' is not an IS value (at most 12 characters, "
                                   "within -2147483648..2147483647)"),
        (0x00200013, "-000000000001", "(IS): '-000000000001' is not an IS value"),
        (0x00180050, "12345678901234567", "(DS): '12345678901234567' is not a DS value (at most 16 "
                                          "characters, within a double's range)"),
        (0x00180050, "1e400", "(DS): '1e400' is not a DS value"),
        (WINDOW_CENTER, "1\\\\x", "(DS): 'x' is not a decimal string"),
        (0x00189327, "fast", "(FD): 'fast' is not a 64-bit float"),
        (0x00081140, "x", "Replace: tag 'ReferencedImageSequence' (0008,1140) (SQ): a sequence "
                          "takes an array of objects"),
        (0x00081140, None, "a sequence takes an array of objects"),
        (0x00081140, ["x"], "item 0 must be an object of tag names to values"),
        (0x00081140, [{"NoSuchTag": "1"}], "Replace: unknown tag 'NoSuchTag'"),
        (0x00081140, [{"Rows": "abc"}], "tag 'Rows' (0028,0010) (US): 'abc' is not an integer"),
        (0x00340005, "data:application/octet-stream;base64,!!!", "malformed base64"),
        (0x00281201, "abc", "(OW): OW needs an even number of bytes, got 3"),
        (0x00660016, "data:application/octet-stream;base64,AAAA",
         "Replace: tag 'PointCoordinatesData' (0066,0016) (OF): give OF values as backslash-separated numbers "
         "('1.5\\\\2'), not as a data: URI (Orthanc refuses it too)"),
        (0x00209165, "Nope", "Replace: unknown tag 'Nope'"),
        # ASCII-only VRs and strict numbers (Python's int()/float() take more than Orthanc does)
        (0x00080060, "\u03a9", "Replace: tag 'Modality' (0008,0060) (CS): CS values are ASCII only (this VR has no character set)"),
        (0x00080020, "2024\u00e9", "(DA): DA values are ASCII only"),
        (0x00200011, "\u0667", "(IS): IS values are ASCII only"),
        (ROWS, " 5", "' 5' is not an integer in 0..65535"),
        (ROWS, "1_0", "'1_0' is not an integer in 0..65535"),
        (0x00189087, " 1.5", "(FD): ' 1.5' is not a 64-bit float"),
        (0x00189087, "1_5", "(FD): '1_5' is not a 64-bit float"),
        (0x00081140, [{"Modality": "\u03a9"}], "(CS): CS values are ASCII only"),
        (0x00081030, "a\0b", "(LO): the value holds a NUL character, which LO values cannot contain"),
        (0x00081030, "data:application/octet-stream;base64,YQBi", "holds a NUL character"),
        (0x00281201, "\u00e9\u00e9", "(OW): text for an OW value must be ASCII"),
        (0x7FE00010, "data:application/octet-stream;base64,YWJj", "(OW): OW needs an even number of bytes"),
        # both spellings of one tag in an item are cast, though only the first is kept
        (0x00081140, [{"Rows": "5", "0028,0010": "abc"}], "'abc' is not an integer"),
    ],
)
def test_refusals_name_key_tag_and_vr(tag, json_value, message):
    with pytest.raises(RequestError, match=re.escape(message)):
        _prepare(tag, json_value)


def test_empty_string_inside_items_and_paths_is_cast():
    with pytest.raises(RequestError, match=re.escape("'' is not an integer")):
        _prepare(ROWS, "", top_level=False)
    assert _prepare(0x00100010, "", top_level=False) == Value(0x00100010, "PN", None)


def test_built_elements_round_trip_through_bytes():
    values = [
        _prepare(0x00100010, "Sébastien^Jodogne"),
        _prepare(ROWS, "512"),
        _prepare(0x00181310, "0\\256\\256\\0"),
        _prepare(WINDOW_CENTER, "40.5\\-20"),
        _prepare(0x00209165, "0020,9056"),
        _prepare(0x00660016, "1.5\\2.5"),
        _prepare(0x00340005, BOOK_BINARY),
        _prepare(0x00081110, [{"StudyDescription": "A"}, []]),
        _prepare(0x00080020, ""),
    ]
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    for value in values:
        ds[value.tag] = build_element(value)
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    fp.seek(0)
    back = read_dataset(fp, False, True)
    assert back.PatientName == "Sébastien^Jodogne"
    assert back.Rows == 512
    assert list(back.AcquisitionMatrix) == [0, 256, 256, 0]
    assert [float(v) for v in back.WindowCenter] == [40.5, -20.0]
    assert back[0x00209165].value == 0x00209056
    assert back[0x00660016].value == b"\x00\x00\xc0?\x00\x00\x20@"
    assert back[0x00340005].value == b"I was here in 2019.  Marty McFly.\x00"
    assert len(back.ReferencedStudySequence) == 2
    assert back.ReferencedStudySequence[0].StudyDescription == "A"
    assert len(back.ReferencedStudySequence[1]) == 0
    assert back.StudyDate == ""


@pytest.mark.parametrize(("tag", "text"), [(ROWS, "1\\2"), (0x00189087, "1.5\\2"), (0x00200013, "1\\2"),
                                           (0x00180050, "1.5\\2")])  # InstanceNumber, SliceThickness
def test_numbers_for_single_valued_tags_refuse_lists(tag, text):
    with pytest.raises(RequestError, match=re.escape("takes a single value (VM 1), got 2 "
                                                     "backslash-separated values")):
        _prepare(tag, text)


def test_attribute_tag_lists_only_for_multi_valued_tags():
    with pytest.raises(RequestError, match=re.escape("(AT): takes a single value (VM 1)")):
        _prepare(0x00209165, "0020,9056\\0020,9057")
    assert _prepare(0x00280009, "0020,9056\\FrameTime") == \
        Value(0x00280009, "AT", (0x00209056, 0x00181063))  # FrameIncrementPointer, VM 1-n


@pytest.mark.parametrize(
    ("charset", "encoded"),
    [
        (["iso8859"], b"J\xf6dogne\x00"),  # Latin-1; the kanji cannot be held and is dropped
        (["ascii"], b"Jdogne"),
        (["UTF8"], "J\u00f6dogne\u8a9e".encode() + b"\x00"),
    ],
)
def test_text_for_binary_vrs_is_written_in_the_data_sets_character_set(charset, encoded):
    value = _prepare(0x00111010, "J\u00f6dogne\u8a9e")
    assert build_element(value, encodings=charset).value == encoded


def test_ow_request_bytes_are_little_endian_words():
    value = _prepare(0x00281201, "data:application/octet-stream;base64,AAECAw==")
    assert build_element(value).value == b"\x00\x01\x02\x03"
    assert build_element(value, little_endian=False).value == b"\x01\x00\x03\x02"
    ob = _prepare(0x00340005, "data:application/octet-stream;base64,AAECAw==")
    assert build_element(ob, little_endian=False).value == b"\x00\x01\x02\x03"
