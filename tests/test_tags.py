"""Tag names as Orthanc accepts them (orthanc-behavior.md §2.3) and VRs of new elements."""

from __future__ import annotations

import pickle
import re

import pytest

from transforms.errors import RequestError
from transforms.tags import (
    describe_tag,
    is_private,
    parse_dictionary,
    parse_tag,
    vr_for_new_element,
)

RADIO = {"4321,1012": ["LO", "RadioButton3", 1, 1, "RadioLogic"],
         "00e1,10c2": ["UI", "PET-CT Multi Modality Name", 1, 1, "ELSCINT1"]}


@pytest.mark.parametrize(
    ("name", "tag"),
    [
        ("PatientName", 0x00100010),
        ("0010,0010", 0x00100010),
        ("0010-1001", 0x00101001),
        ("00100020", 0x00100020),
        ("0008-103E", 0x0008103E),
        ("0008,103e", 0x0008103E),
        ("00e1-10c2", 0x00E110C2),
        ("OtherPatientIDs", 0x00101000),
        ("  StudyDescription ", 0x00081030),
        ("ReferencedImageSequence", 0x00081140),
        ("OverlayRows", 0x60000010),  # repeating groups: the first group, as DCMTK
        ("OverlayData", 0x60003000),
        ("CurveData", 0x50003000),
        ("RETIRED_CurveData", 0x50003000),
        ("SourceImageIDs", 0x00203100),
    ],
)
def test_parse_tag_accepts_orthanc_spellings(name, tag):
    assert parse_tag(name, key="Replace") == tag


def test_parentheses_only_inside_paths():
    assert parse_tag("(0008,0023)", key="Keep", allow_parentheses=True) == 0x00080023
    with pytest.raises(RequestError, match=re.escape("Keep: unknown tag '(0008,0023)'")):
        parse_tag("(0008,0023)", key="Keep")


def test_keywords_are_case_sensitive_and_unknown_names_are_request_errors():
    with pytest.raises(RequestError) as info:
        parse_tag("patientname", key="Remove")
    message = str(info.value)
    assert message.startswith("Remove: unknown tag 'patientname'")
    assert "did you mean 'PatientName'?" in message
    assert info.value.reason == "refused_by_request"


@pytest.mark.parametrize("bad", ["0010,001", "0010,00100", "gggg,0010", "0010;0010"])
def test_malformed_hex_is_an_unknown_tag(bad):
    with pytest.raises(RequestError, match="Replace: unknown tag"):
        parse_tag(bad, key="Replace")


def test_empty_name_is_refused():
    with pytest.raises(RequestError, match=re.escape("Keep: empty tag name")):
        parse_tag("  ", key="Keep")


def test_private_dictionary_names_and_vrs():
    dictionary = parse_dictionary(RADIO)
    assert parse_tag("RadioButton3", key="Replace", dictionary=dictionary) == 0x43211012
    assert vr_for_new_element(0x43211012, dictionary=dictionary,
                              private_creator="RadioLogic") == "LO"
    # Orthanc: without the matching private creator the lookup fails and the VR is UN.
    assert vr_for_new_element(0x43211012, dictionary=dictionary) == "UN"
    assert vr_for_new_element(0x43211012, dictionary=dictionary, private_creator="Other") == "UN"
    assert pickle.loads(pickle.dumps(dictionary)) == dictionary


def test_vr_for_new_element_public_private_and_creators():
    assert vr_for_new_element(0x00280010) == "US"
    assert vr_for_new_element(0x00280106) == "US or SS"
    assert vr_for_new_element(0x00430010) == "LO"  # private creator element
    assert vr_for_new_element(0x00091001) == "UN"
    assert vr_for_new_element(0x00091001, private_creator="GEMS_IDEN_01") == "LO"
    assert vr_for_new_element(0x60003000) == "OB or OW"  # repeating group
    # pydicom's private dictionary spells this one's VR 'OB_OW': an empty Replace of it used to
    # pass the body check and then fail every file (internal_error)
    assert vr_for_new_element(0x70191080, private_creator="TOSHIBA_MEC_OT3") == "OB or OW"
    assert vr_for_new_element(0x00291008, private_creator="SIEMENS CSA HEADER") == "CS"


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ([1, 2], "Dictionary: expected an object"),
        ({"4321-10": ["LO", "X"]}, "Dictionary: key '4321-10' is not a tag"),
        ({"4321,1012": "LO"}, "Dictionary: entry '4321,1012' must be"),
        ({"4321,1012": ["ZZ", "X", 1, 1, "C"]}, "Dictionary: entry '4321,1012' has unknown VR"),
        ({"4321,1012": ["LO", "X", 1, 1, 7]}, "private creator must be a string"),
    ],
)
def test_dictionary_errors_name_the_key(config, message):
    with pytest.raises(RequestError, match=re.escape(message)):
        parse_dictionary(config)


def test_small_helpers():
    assert is_private(0x00091001) and not is_private(0x00100010)
    assert describe_tag(0x00280010) == "'Rows' (0028,0010)"
    assert describe_tag(0x00091001) == "(0009,1001)"
