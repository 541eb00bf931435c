"""Pseudonyms of names depend on the name, not on how the file encodes it.

A patient's pseudonym is the keyed hash of the decoded name. Two encodings used to leak into
it: a sequence item's own SpecificCharacterSet (PS3.5 7.5.3) was ignored, so a Latin-1 name
nested in a UTF-8 file was decoded with U+FFFD in place of its accented letters (and names
differing only there shared a pseudonym); and ISO 2022 IR 87 Japanese is 7-bit, so the ASCII
shortcut hashed its escape sequences instead of the name. Found by a review of the engine.
"""

from __future__ import annotations

import io

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from transforms import dicomio
from transforms.engine import apply
from transforms.identity import Key
from transforms.request import parse_anonymize

KEY = Key.from_bytes(b"charset-test-key-0123456789abcdef")
PLAN = parse_anonymize({})


def _file(charset: str | list[str], name: str, item_charset: str | None = None, nested: str | None = None) -> bytes:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.SpecificCharacterSet = charset
    ds.PatientName = name
    item = Dataset()
    if item_charset is not None:
        item.SpecificCharacterSet = item_charset
    item.PatientName = nested if nested is not None else name
    item.ReferencedSOPClassUID = ds.SOPClassUID
    item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    ds.ReferencedImageSequence = Sequence([item])
    buffer = io.BytesIO()
    ds.save_as(buffer)
    return buffer.getvalue()


def _names(data: bytes) -> tuple[str, str]:
    out = dicomio.read_dataset(dicomio.write_dataset(apply(PLAN, dicomio.read_dataset(data), KEY)))
    return str(out.PatientName), str(out.ReferencedImageSequence[0].PatientName)


@pytest.mark.parametrize("name", ["M\u00fcller^Hans", "M\u00f6ller^Hans"])
def test_a_nested_name_in_its_items_own_character_set(name: str):
    data = _file("ISO_IR 192", name, item_charset="ISO_IR 100")
    assert name.encode("latin-1") in data and name.encode("utf-8") in data  # both encodings are there
    assert _names(data) == (KEY.patient_name(name),) * 2


def test_names_differing_only_in_accented_letters_keep_different_pseudonyms():
    first = _names(_file("ISO_IR 192", "Ren\u00e9", item_charset="ISO_IR 100", nested="M\u00fcller^Hans"))[1]
    second = _names(_file("ISO_IR 192", "Ren\u00e9", item_charset="ISO_IR 100", nested="M\u00f6ller^Hans"))[1]
    assert first != second


def test_iso_2022_ir_87_names_get_the_pseudonym_of_the_name():
    name = "Yamada^Tarou=\u5c71\u7530^\u592a\u90ce=\u3084\u307e\u3060^\u305f\u308d\u3046"
    iso_2022 = _file(["", "ISO 2022 IR 87"], name)
    assert b"\x1b$B" in iso_2022  # the name is 7-bit: escape sequences and JIS pairs
    utf8 = _file("ISO_IR 192", name)
    assert _names(iso_2022) == _names(utf8) == (KEY.patient_name(name),) * 2


@pytest.mark.parametrize("charset", ["ISO 2022 IR 87", "ISO 2022 IR 159"])
def test_an_empty_value_in_a_list_under_iso_2022_multibyte_sets(charset: str):
    """pydicom 3.0's encoders for these read the value's first character: an empty value inside
    a replaced list ('a\\\\b' in JSON) was an internal error for every file; Orthanc writes
    ['a', '', 'b'] (found by a differential run against it)."""
    from transforms.request import parse_modify

    data = open(get_testdata_file("CT_small.dcm"), "rb").read()
    plan = parse_modify({"Replace": {"SpecificCharacterSet": charset, "StudyDescription": "a\\\\b",
                                     "OperatorsName": "Doe^^John"}})
    with pytest.warns(UserWarning):  # pydicom: ASCII is not in a lone ISO 2022 multi-byte set
        out = dicomio.write_dataset(apply(plan, dicomio.read_dataset(data), KEY))
    written = pydicom.dcmread(io.BytesIO(out))
    assert list(written.StudyDescription) == ["a", "", "b"]
    assert written.get_item("OperatorsName").value == b"Doe^^John "  # an empty name component too


def test_a_name_whose_characters_its_iso_2022_set_cannot_hold_is_no_internal_error():
    """Mutation seed 103: UTF-8 Cyrillic bytes under ISO 2022 IR 87 alone. pydicom decodes
    them as replacement characters, then re-encodes the name (to keep its original string)
    through the project's encoder, which dropped every character it could not hold and
    handed pydicom an empty group: its IR 87 encoder read the first character (IndexError,
    'internal_error' for the file). The name gets the pseudonym of what was read."""
    data = _file("ISO_IR 192", "\u0413\u0443\u0441\u0435\u0432\u0430^\u0410\u043c\u0443\u0440")
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.SpecificCharacterSet = "ISO 2022 IR 87"
    buffer = io.BytesIO()
    ds.save_as(buffer)
    raw = buffer.getvalue()
    assert "\u0413\u0443\u0441\u0435\u0432\u0430".encode("utf-8") in raw  # bytes IR 87 does not define
    source = dicomio.read_dataset(raw)
    read_name = str(pydicom.dcmread(io.BytesIO(raw)).PatientName)
    out = dicomio.read_dataset(dicomio.write_dataset(apply(PLAN, source, KEY)))
    assert str(out.PatientName) == KEY.patient_name(read_name)
