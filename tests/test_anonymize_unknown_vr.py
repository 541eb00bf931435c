"""Sequences whose VR the file does not say: the nested pass looks into them too.

A private sequence in an implicit VR file, an unknown (or private) sequence written in explicit
VR as ``UN`` with a defined length (PS3.5 6.2.2 encodes its items in implicit VR little
endian), or an explicit-VR sequence whose VR alone was lost: pydicom reads all of them as
opaque bytes. Orthanc leaves such values alone, so a PatientName or an original UID nested
in them survived anonymization (with ``KeepPrivateTags``, or in an unknown public tag). Here
the nested rules apply to them as to any sequence, and a value that only starts like an item
stays as it is.

Building item objects costs ~1 KB per item however small the item: the last tests pin the
per-file limit (``paths.MAX_WALKED_ITEMS``) on every path that builds them (the object walk,
values of unknown VR, sequences named by ``Replace``/``Remove`` paths), and that the
byte-level walk keeps no object per unchanged item. A property test ends the module: random
nestings of such sequences, where nothing planted survives and both walks agree.
"""

from __future__ import annotations

import re
import struct
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from tests.pipeline_support import pydicom_converts_all
from transforms import dicomio, engine, paths
from transforms.engine import apply
from transforms.errors import InputError
from transforms.identity import Key
from transforms.request import parse_anonymize, parse_modify

KEY = Key.from_bytes(b"unknown-vr-test-key-0123456789")
KEEP_PRIVATE = parse_anonymize({"KeepPrivateTags": True})
DEFAULT = parse_anonymize({})
CT = "1.2.840.10008.5.1.4.1.1.2"
SOP, STUDY, SERIES = "1.2.826.0.1.3680043.2.1125.71", "1.2.826.0.1.3680043.2.1125.72", "1.2.826.0.1.3680043.2.1125.73"
OTHER_SOP = "1.2.826.0.1.3680043.2.1125.79"
SECRET = b"Nested^Secret"
UNKNOWN_PUBLIC = 0x00189999  # not in the dictionary
PRIVATE_CREATOR, PRIVATE_SQ = 0x00090010, 0x00091001  # block 0x10 of "ACME"
REFERENCED_IMAGE_SQ = 0x00081140
TOO_MANY = ("too many sequence items to de-identify in one file (at most 1000, or one per 64 bytes "
            "of a sequence)")  # with MAX_WALKED_ITEMS patched to 1000


def _pad(value: bytes, vr: bytes) -> bytes:
    return value + (b"\x00" if vr == b"UI" else b" ") if len(value) % 2 else value


def _implicit(tag: int, value: bytes, vr: bytes = b"LO") -> bytes:
    value = _pad(value, vr)
    return struct.pack("<HHL", tag >> 16, tag & 0xFFFF, len(value)) + value


def _explicit(tag: int, vr: bytes, value: bytes) -> bytes:
    value = _pad(value, vr)
    if vr in (b"SQ", b"UN", b"OB", b"OW", b"UT"):
        return struct.pack("<HH2sHL", tag >> 16, tag & 0xFFFF, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, len(value)) + value


def _item(body: bytes) -> bytes:
    return struct.pack("<HHL", 0xFFFE, 0xE000, len(body)) + body


def _secret_item(implicit: bool) -> bytes:
    """An item naming a patient (SECRET) and referencing this instance."""
    if implicit:
        return _item(_implicit(0x00081150, CT.encode(), b"UI") + _implicit(0x00081155, SOP.encode(), b"UI")
                     + _implicit(0x00100010, SECRET, b"PN"))
    return _item(_explicit(0x00081150, b"UI", CT.encode()) + _explicit(0x00081155, b"UI", SOP.encode())
                 + _explicit(0x00100010, b"PN", SECRET))


def _file(elements: list[tuple[int, bytes]], implicit: bool) -> bytes:
    ids = [(0x00080016, CT), (0x00080018, SOP), (0x0020000D, STUDY), (0x0020000E, SERIES)]
    base = [(tag, _implicit(tag, v.encode(), b"UI") if implicit else _explicit(tag, b"UI", v.encode()))
            for tag, v in ids]
    base.append((0x00100010, _implicit(0x00100010, b"Top^Secret", b"PN") if implicit
                 else _explicit(0x00100010, b"PN", b"Top^Secret")))
    body = b"".join(data for _, data in sorted(base + elements))
    syntax = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    return dicomio.encode_file_meta(CT, SOP, syntax) + body


def _anonymize(data: bytes, plan=DEFAULT) -> tuple[bytes, object]:
    out = dicomio.write_dataset(apply(plan, dicomio.read_dataset(data), KEY))
    return out, dicomio.read_dataset(out)


def _items_of(elem) -> list:
    if elem.VR == "SQ":
        return list(elem.value)
    items = engine.parse_items(elem.value, True, True, None)
    assert items is not None, "not a run of implicit VR items"
    return items


def _new_sop() -> str:
    return KEY.uid("anonymize.instance", SOP)


def test_unknown_public_tag_written_as_un_is_walked():
    data = _file([(UNKNOWN_PUBLIC, _explicit(UNKNOWN_PUBLIC, b"UN", _secret_item(implicit=True)))], implicit=False)
    assert data.count(SECRET) == 1
    out, ds = _anonymize(data)
    assert SECRET not in out and SOP.encode() not in out
    elem = ds[UNKNOWN_PUBLIC]
    assert elem.VR == "SQ" and len(elem.value) == 1
    item = elem.value[0]
    assert item.ReferencedSOPInstanceUID == _new_sop() == ds.SOPInstanceUID
    assert item.ReferencedSOPClassUID == CT  # SOP classes are never touched
    assert item.PatientName == KEY.patient_name("Nested^Secret")  # as in any sequence


@pytest.mark.parametrize("implicit", [True, False], ids=["implicit-vr-file", "explicit-vr-file-un"])
def test_items_under_a_known_text_tag_are_refused(implicit):
    """Manufacturer (LO) holding a sequence's items: pydicom reads them back as text, names and
    UIDs included, so the nested pass cannot clean them and copying them would leak them."""
    manufacturer = 0x00080070
    value = (_implicit(manufacturer, _secret_item(True)) if implicit
             else _explicit(manufacturer, b"UN", _secret_item(True)))
    data = _file([(manufacturer, value)], implicit=implicit)
    with pytest.raises(InputError, match=re.escape("element (0008,0070) holds sequence items, but the dictionary "
                                                   "gives it VR LO")) as info:
        apply(DEFAULT, dicomio.read_dataset(data), KEY)
    assert info.value.reason == "invalid_value" and "Secret" not in str(info.value)


@pytest.mark.parametrize("implicit", [True, False], ids=["implicit-vr-file", "explicit-vr-file-un"])
def test_kept_private_sequence_of_unknown_vr_is_walked(implicit):
    creator = _implicit(PRIVATE_CREATOR, b"ACME") if implicit else _explicit(PRIVATE_CREATOR, b"LO", b"ACME")
    private = (_implicit(PRIVATE_SQ, _secret_item(True)) if implicit
               else _explicit(PRIVATE_SQ, b"UN", _secret_item(True)))
    data = _file([(PRIVATE_CREATOR, creator), (PRIVATE_SQ, private)], implicit=implicit)
    out, ds = _anonymize(data, KEEP_PRIVATE)
    assert SECRET not in out and SOP.encode() not in out
    assert ds[PRIVATE_CREATOR].value == "ACME"  # the private tags are kept ...
    assert PRIVATE_SQ in ds
    # ... and their items follow the nested rules (explicit VR writes them back as SQ;
    # implicit VR as they came, items pydicom cannot tell from bytes without the dictionary).
    items = _items_of(ds[PRIVATE_SQ])
    assert ds[PRIVATE_SQ].VR == ("UN" if implicit else "SQ")
    assert len(items) == 1
    assert items[0].ReferencedSOPInstanceUID == _new_sop()
    assert items[0].PatientName == KEY.patient_name("Nested^Secret")


def test_private_sequence_whose_vr_was_lost_in_explicit_vr_is_walked():
    """Explicit-VR items under a ``UN`` header (a writer that dropped only the VR)."""
    data = _file([(PRIVATE_CREATOR, _explicit(PRIVATE_CREATOR, b"LO", b"ACME")),
                  (PRIVATE_SQ, _explicit(PRIVATE_SQ, b"UN", _secret_item(False)))], implicit=False)
    out, ds = _anonymize(data, KEEP_PRIVATE)
    assert SECRET not in out and SOP.encode() not in out
    assert ds[PRIVATE_SQ].VR == "SQ"
    assert ds[PRIVATE_SQ].value[0].ReferencedSOPInstanceUID == _new_sop()


def _nested_private_file() -> bytes:
    """Implicit VR: ReferencedImageSequence > item > private sequence (defined length) > item."""
    outer = _item(_implicit(0x00081150, CT.encode(), b"UI") + _implicit(0x00081155, OTHER_SOP.encode(), b"UI")
                  + _implicit(PRIVATE_CREATOR, b"ACME") + _implicit(PRIVATE_SQ, _secret_item(True)))
    return _file([(REFERENCED_IMAGE_SQ, _implicit(REFERENCED_IMAGE_SQ, outer))], implicit=True)


def test_nested_private_sequence_is_walked_by_both_passes(monkeypatch):
    data = _nested_private_file()
    out, ds = _anonymize(data, KEEP_PRIVATE)
    assert SECRET not in out and SOP.encode() not in out and OTHER_SOP.encode() not in out
    outer = ds.ReferencedImageSequence[0]
    assert outer.ReferencedSOPInstanceUID == KEY.uid("anonymize.instance", OTHER_SOP)
    inner = _items_of(outer[PRIVATE_SQ])
    assert inner[0].ReferencedSOPInstanceUID == _new_sop()
    assert inner[0].PatientName == KEY.patient_name("Nested^Secret")
    # The byte-level pass hands such a sequence to the object walk: same bytes either way.
    with monkeypatch.context() as patch:
        patch.setattr(engine._Run, "_byte_sequence", lambda self, elem, tag: engine._FALLBACK)
        assert dicomio.write_dataset(apply(KEEP_PRIVATE, dicomio.read_dataset(data), KEY)) == out


@pytest.mark.parametrize(
    "value",
    [
        b"\xfe\xff\x00\xe0" + b"\x01" * 12,  # an item header whose length runs past the value
        _item(b"\x10\x00\x10\x00\xff\xff\x00\x00abcd"),  # an item whose element does not fit
        _item(_implicit(0x00100010, SECRET, b"PN")) + b"\x00\x00",  # trailing bytes after items
    ],
    ids=["length-past-end", "bad-element", "trailing-bytes"],
)
def test_values_that_only_start_like_items_stay_opaque(value):
    data = _file([(UNKNOWN_PUBLIC, _explicit(UNKNOWN_PUBLIC, b"UN", value))], implicit=False)
    out, ds = _anonymize(data)
    assert ds[UNKNOWN_PUBLIC].VR == "UN"
    assert ds[UNKNOWN_PUBLIC].value == value  # unchanged, and no error for the file
    assert out.count(value) == 1


def test_too_many_items_of_unknown_vr_fail_the_file_instead_of_filling_memory():
    """8-byte empty items would each become a Dataset: a few megabytes, gigabytes of objects."""
    items = struct.pack("<HHL", 0xFFFE, 0xE000, 0) * (engine._MAX_OPAQUE_ITEMS + 1)
    data = _file([(UNKNOWN_PUBLIC, _explicit(UNKNOWN_PUBLIC, b"UN", items))], implicit=False)
    with pytest.raises(InputError) as info:
        apply(DEFAULT, dicomio.read_dataset(data), KEY)
    assert info.value.reason == "too_large"
    assert str(info.value) == (f"(0018,9999): a value of unknown VR holding {engine._MAX_OPAQUE_ITEMS + 1} "
                               f"items (more than {engine._MAX_OPAQUE_ITEMS}), too many to de-identify")
    # At the limit it is walked (empty items: nothing to change, the bytes stay as they were).
    items = struct.pack("<HHL", 0xFFFE, 0xE000, 0) * engine._MAX_OPAQUE_ITEMS
    data = _file([(UNKNOWN_PUBLIC, _explicit(UNKNOWN_PUBLIC, b"UN", items))], implicit=False)
    _, ds = _anonymize(data)
    assert ds[UNKNOWN_PUBLIC].VR == "UN" and ds[UNKNOWN_PUBLIC].value == items


def _many_items_then_one_for_the_object_walk(empty: int) -> bytes:
    """ReferencedImageSequence: ``empty`` empty items, then one holding an item-shaped UN value
    (which the byte-level walk leaves to the object walk, for the whole sequence)."""
    odd = _item(_explicit(UNKNOWN_PUBLIC, b"UN", _item(b"")))
    value = struct.pack("<HHL", 0xFFFE, 0xE000, 0) * empty + odd
    return _file([(REFERENCED_IMAGE_SQ, _explicit(REFERENCED_IMAGE_SQ, b"SQ", value))], implicit=False)


def _count_built_items(monkeypatch) -> list[int]:
    """From now on, each parse of items appends how many it built (-1: it refused)."""
    built: list[int] = []
    original = engine._items

    def spy(*args, **kwargs):
        try:
            result = original(*args, **kwargs)
        except InputError:
            built.append(-1)
            raise
        built.append(len(result))
        return result

    monkeypatch.setattr(engine, "_items", spy)
    return built


def test_object_walk_builds_a_bounded_number_of_items(monkeypatch):
    """A crafted file of 8 MB of empty items took ~1 GB in the object walk; it now stops at
    MAX_WALKED_ITEMS items (bounded memory) and the file fails as too_large."""
    monkeypatch.setattr(paths, "MAX_WALKED_ITEMS", 1000)
    fits = _many_items_then_one_for_the_object_walk(998)  # 999 items, and 1 nested: 1000
    _, ds = _anonymize(fits)
    assert len(ds.ReferencedImageSequence) == 999
    built = _count_built_items(monkeypatch)
    with pytest.raises(InputError) as info:
        apply(DEFAULT, dicomio.read_dataset(_many_items_then_one_for_the_object_walk(1000)), KEY)
    assert info.value.reason == "too_large"
    assert str(info.value) == TOO_MANY
    assert built == [-1]  # stopped while parsing, not after building every item


def test_sequences_named_by_paths_are_bounded_too(monkeypatch):
    """modify with a [*] path decodes the sequence it names (pydicom): refused before it
    builds more items than the limit (the crafted 8 MB file took 1.5 GB and 55 s)."""
    from transforms.request import parse_modify

    monkeypatch.setattr(paths, "MAX_WALKED_ITEMS", 1000)
    plan = parse_modify({"Replace": {"ReferencedImageSequence[*].ReferencedSOPClassUID": CT}})
    empty = struct.pack("<HHL", 0xFFFE, 0xE000, 0)
    fits = _file([(REFERENCED_IMAGE_SQ, _explicit(REFERENCED_IMAGE_SQ, b"SQ", empty * 1000))], implicit=False)
    _, ds = _anonymize(fits, plan)
    assert len(ds.ReferencedImageSequence) == 1000
    assert {item.ReferencedSOPClassUID for item in ds.ReferencedImageSequence} == {CT}
    built = _count_built_items(monkeypatch)
    too_many = _file([(REFERENCED_IMAGE_SQ, _explicit(REFERENCED_IMAGE_SQ, b"SQ", empty * 1001))], implicit=False)
    with pytest.raises(InputError) as info:
        apply(plan, dicomio.read_dataset(too_many), KEY)
    assert (info.value.reason, str(info.value)) == ("too_large", TOO_MANY)
    assert built == [-1]  # counted (at most 1001 built) before pydicom decoded anything


@pytest.mark.parametrize("vr", [b"OB", b"OW", b"LO", b"UT"])
@pytest.mark.parametrize("nested", [False, True], ids=["top-level", "in-an-item"])
def test_a_sequence_tag_stored_under_another_vr_is_refused(vr, nested):
    """ReferencedImageSequence written with VR OB (or OW, LO, UT) around a patient's items: the
    file's VR makes it opaque here, so its names and UIDs were copied; a reader that goes by
    the dictionary (the same output transcoded to implicit VR) read them back. Refused, at any
    depth and by both walks, naming the element without its content."""
    element = _explicit(REFERENCED_IMAGE_SQ, vr, _secret_item(implicit=True))
    if nested:  # inside SourceImageSequence's item
        element = _explicit(0x00082112, b"SQ", _item(element))
    data = _file([(0x00082112 if nested else REFERENCED_IMAGE_SQ, element)], implicit=False)
    for body in ({}, {"Transcode": "1.2.840.10008.1.2"}, {"DicomVersion": "2017c"}):
        with pytest.raises(InputError) as info:
            apply(parse_anonymize(body), dicomio.read_dataset(data), KEY)
        assert (info.value.reason, str(info.value)) == (
            "invalid_value", f"element (0008,1140) is a sequence stored with VR {vr.decode()}: readers that go by "
            "the dictionary read its items, which cannot be de-identified under that VR")
    # what holds nothing, what the profile removes anyway, and a modification are not refused
    empty = _file([(REFERENCED_IMAGE_SQ, _explicit(REFERENCED_IMAGE_SQ, vr, b""))], implicit=False)
    assert _anonymize(empty)[1][REFERENCED_IMAGE_SQ].VR == vr.decode()
    request_attributes = 0x00400275  # X in every profile
    removed = _file([(request_attributes, _explicit(request_attributes, vr, _secret_item(implicit=True)))],
                    implicit=False)
    out, ds = _anonymize(removed)
    assert request_attributes not in ds and SECRET not in out
    modified = apply(parse_modify({}), dicomio.read_dataset(data), KEY)
    assert SECRET in dicomio.write_dataset(modified)


@pytest.mark.parametrize("vr", [b"OB", b"OW"])
def test_items_under_a_binary_vr_on_an_unknown_public_tag_are_refused(vr):
    """(0018,9999), unknown to the dictionary, as OB around a patient's items: a sequence whose
    VR was lost (walked when that VR is UN); under OB its items were copied unread."""
    data = _file([(UNKNOWN_PUBLIC, _explicit(UNKNOWN_PUBLIC, vr, _secret_item(implicit=True)))], implicit=False)
    with pytest.raises(InputError) as info:
        apply(DEFAULT, dicomio.read_dataset(data), KEY)
    assert (info.value.reason, str(info.value)) == (
        "invalid_value", f"element (0018,9999) of VR {vr.decode()} holds sequence items, which cannot be "
        "de-identified under that VR")
    opaque = b"\xfe\xff\x00\xe0" + b"\x01" * 12  # only starts like an item: binary, kept
    out, ds = _anonymize(_file([(UNKNOWN_PUBLIC, _explicit(UNKNOWN_PUBLIC, vr, opaque))], implicit=False))
    assert ds[UNKNOWN_PUBLIC].value == opaque


def test_explicit_vr_items_of_an_unknown_tag_in_an_implicit_vr_file_are_walked():
    """A writer that converted an explicit VR file to implicit VR copied the bytes of a sequence
    it did not know: explicit VR items in an implicit VR file. They were tried in implicit VR
    only, failed to parse and were copied, a PatientName in them."""
    data = _file([(UNKNOWN_PUBLIC, _implicit(UNKNOWN_PUBLIC, _secret_item(implicit=False)))], implicit=True)
    assert data.count(SECRET) == 1
    out, ds = _anonymize(data)
    assert SECRET not in out and SOP.encode() not in out
    (item,) = _items_of(ds[UNKNOWN_PUBLIC])
    assert item.ReferencedSOPInstanceUID == _new_sop()
    assert item.PatientName == KEY.patient_name("Nested^Secret")


@pytest.mark.parametrize("implicit", [True, False], ids=["implicit-vr", "explicit-vr-un"])
def test_known_tag_of_another_vr_is_never_taken_for_items(implicit):
    """RedPaletteColorLookupTableData (OW, which the profile keeps) whose bytes happen to be a
    run of items: the dictionary says what it is, so it is copied as it is."""
    tag = 0x00281201
    value = _secret_item(implicit=True)
    element = _implicit(tag, value, b"OW") if implicit else _explicit(tag, b"UN", value)
    out, ds = _anonymize(_file([(tag, element)], implicit=implicit))
    assert ds[tag].value == value
    assert out.count(SECRET) == 1


def test_walked_items_that_cannot_be_re_encoded_fail_the_file_without_quoting_values():
    """Items read from a UN value in an explicit VR file are re-encoded in explicit VR; an
    element whose value does not fit its VR (26 bytes for FL) fails the file as
    invalid_value, naming the tag only (pydicom's own error quotes the value)."""
    inner = _item(_implicit(0x00100010, SECRET, b"PN") + _implicit(0x00220010, b"PLANTEDFAMILY^PLANTEDGIVEN", b"FL"))
    data = _file([(PRIVATE_CREATOR, _explicit(PRIVATE_CREATOR, b"LO", b"ACME")),
                  (PRIVATE_SQ, _explicit(PRIVATE_SQ, b"UN", inner))], implicit=False)
    with pytest.raises(InputError) as info:
        apply(KEEP_PRIVATE, dicomio.read_dataset(data), KEY)
    assert (info.value.reason, str(info.value)) == (
        "invalid_value", "(0022,0010) cannot be re-encoded: its value does not fit its VR")
    assert info.value.__cause__ is None and info.value.__suppress_context__
    # In implicit VR the same items keep their bytes: written, the name pseudonymized.
    data = _file([(PRIVATE_CREATOR, _implicit(PRIVATE_CREATOR, b"ACME")),
                  (PRIVATE_SQ, _implicit(PRIVATE_SQ, inner))], implicit=True)
    out, _ = _anonymize(data, KEEP_PRIVATE)
    assert SECRET not in out and b"PLANTEDFAMILY^PLANTEDGIVEN" in out


@pytest.mark.parametrize("defined", [True, False], ids=["defined-length-items", "undefined-length-items"])
def test_byte_walk_memory_does_not_grow_with_unchanged_items(defined):
    """20,000 empty items and one that changes, walked on the bytes: no object per unchanged
    item (a tuple per item took ~180 bytes each; 20,000 of them ~3.6 MB)."""
    empty = (struct.pack("<HHL", 0xFFFE, 0xE000, 0) if defined else
             struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF) + struct.pack("<HHL", 0xFFFE, 0xE00D, 0))
    changed = _item(_explicit(0x00100010, b"PN", SECRET))
    value = empty * 20_000 + changed
    data = _file([(REFERENCED_IMAGE_SQ, _explicit(REFERENCED_IMAGE_SQ, b"SQ", value))], implicit=False)
    ds = dicomio.read_dataset(data)
    seen: list = []
    original = engine._Run._byte_sequence

    def spy(self, elem, tag):
        seen.append(result := original(self, elem, tag))
        return result

    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(engine._Run, "_byte_sequence", spy)
            new = apply(DEFAULT, ds, KEY)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert seen and seen[0] is not engine._FALLBACK  # the byte-level walk did it
    assert len(new.ReferencedImageSequence) == 20_001
    assert new.ReferencedImageSequence[20_000].PatientName == KEY.patient_name("Nested^Secret")
    assert peak < 3 * len(value) + (2 << 20), peak  # the input and the output, about


def test_a_large_sequence_may_build_one_item_per_64_bytes_beyond_the_file_limit(monkeypatch):
    """Real sequences of many items are large (a slide's per-frame items: ~200 bytes each):
    past the per-file limit a sequence may still build one item per 64 bytes of its value."""
    monkeypatch.setattr(paths, "MAX_WALKED_ITEMS", 100)
    plan = parse_anonymize({"Keep": ["ReferencedImageSequence[0].ReferencedSOPClassUID"]})  # the object walk
    reference = _item(_explicit(0x00081150, b"UI", CT.encode()) + _explicit(0x00081155, b"UI", OTHER_SOP.encode()))
    assert len(reference) >= 64
    data = _file([(REFERENCED_IMAGE_SQ, _explicit(REFERENCED_IMAGE_SQ, b"SQ", reference * 500))], implicit=False)
    _, ds = _anonymize(data, plan)  # 500 items > 100, in 500 x 80 bytes: allowed
    assert len(ds.ReferencedImageSequence) == 500
    assert {i.ReferencedSOPInstanceUID for i in ds.ReferencedImageSequence} == {KEY.uid("anonymize.instance", OTHER_SOP)}
    small = struct.pack("<HHL", 0xFFFE, 0xE000, 0) * 500  # 500 empty items in 4,000 bytes: 62 allowed
    data = _file([(REFERENCED_IMAGE_SQ, _explicit(REFERENCED_IMAGE_SQ, b"SQ", small + reference))], implicit=False)
    with pytest.raises(InputError) as info:
        apply(plan, dicomio.read_dataset(data), KEY)
    assert info.value.reason == "too_large"


# --------------------------------------------------------------------------- property


PLANTED = b"PLANTED^NAME"


def _element(tag: int, vr: bytes, value: bytes, implicit: bool) -> bytes:
    return _implicit(tag, value, vr) if implicit else _explicit(tag, vr, value)


def _nested_items(draw, depth: int, implicit: bool) -> bytes:
    """Items of random content: a planted name, a reference to this instance, text, and
    (not too deep) sequences of unknown VR holding more of the same."""
    items = b""
    for _ in range(draw(st.integers(1, 3))):
        elements: list[tuple[int, bytes]] = []
        if draw(st.booleans()):
            elements.append((0x00100010, _element(0x00100010, b"PN", PLANTED, implicit)))
        if draw(st.booleans()):
            elements.append((0x00081155, _element(0x00081155, b"UI", SOP.encode(), implicit)))
        if draw(st.booleans()):
            elements.append((0x00204000, _element(0x00204000, b"LT", b"free text", implicit)))
        if depth < 2 and draw(st.booleans()):
            inner = _nested_items(draw, depth + 1, True)  # UN content: implicit VR (PS3.5 6.2.2)
            if draw(st.booleans()):
                elements.append((PRIVATE_CREATOR, _element(PRIVATE_CREATOR, b"LO", b"ACME", implicit)))
                tag = PRIVATE_SQ
            else:
                tag = UNKNOWN_PUBLIC
            elements.append((tag, _implicit(tag, inner) if implicit else _explicit(tag, b"UN", inner)))
        items += _item(b"".join(data for _, data in sorted(elements)))
    return items


@pytest.mark.parametrize("keep_private", [False, True], ids=["private-removed", "private-kept"])
def test_property_no_planted_name_or_uid_survives_and_both_walks_agree(keep_private):
    """Random nestings of sequences of unknown VR (private or unknown tags, implicit or UN
    written) under a known sequence, an unknown one or a private one, in implicit or explicit
    VR files: the planted name and the original UID never survive, and the byte-level walk
    gives the object walk's bytes."""
    plan = KEEP_PRIVATE if keep_private else DEFAULT

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(data=st.data())
    def check(data) -> None:
        implicit = data.draw(st.booleans(), "implicit VR file")
        holder = data.draw(st.sampled_from([REFERENCED_IMAGE_SQ, UNKNOWN_PUBLIC, PRIVATE_SQ]), "holder")
        # A known sequence holds items in the file's encoding; the others as UN would.
        items = _nested_items(data.draw, 0, implicit or holder != REFERENCED_IMAGE_SQ)
        if holder == REFERENCED_IMAGE_SQ:
            element = _implicit(holder, items) if implicit else _explicit(holder, b"SQ", items)
        else:
            element = _implicit(holder, items) if implicit else _explicit(holder, b"UN", items)
        elements = [(holder, element)]
        if holder == PRIVATE_SQ:
            elements.append((PRIVATE_CREATOR, _element(PRIVATE_CREATOR, b"LO", b"ACME", implicit)))
        source = _file(elements, implicit)
        out = dicomio.write_dataset(apply(plan, dicomio.read_dataset(source), KEY))
        assert PLANTED not in out
        assert SOP.encode() not in out
        dicomio.read_dataset(out)  # our own output reads back
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(engine._Run, "_byte_sequence", lambda self, elem, tag: engine._FALLBACK)
            assert dicomio.write_dataset(apply(plan, dicomio.read_dataset(source), KEY)) == out

    check()


def test_a_mapped_identifier_under_a_vr_that_cannot_hold_it_gets_its_own_vr():
    """A PatientID of VR UL, a SOPInstanceUID of VR IS, a FrameOfReferenceUID of VR FD, a
    nested ReferencedSOPInstanceUID of VR SL (damaged files; the structured mutation runs,
    seeds 50 and 51): their pseudonym or new UID kept the old VR, and the output held 22 bytes
    of UL that no reader converts, or an IS that is no number. They get their own VR, as an
    explicit UN does; a free-text VR long enough for the value (PatientID as LT) is kept, and a
    short one (SH: 16 characters) is not (Orthanc 1.10.1 keeps SH)."""
    referenced = _explicit(REFERENCED_IMAGE_SQ, b"SQ", _item(_explicit(0x00081150, b"UI", CT.encode())
                                                               + _explicit(0x00081155, b"SL", b"1.23")))
    damaged = _file([(0x00100020, _explicit(0x00100020, b"UL", b"1234")),
                     (0x00200052, _explicit(0x00200052, b"FD", b"1.2.3.45")),
                     (REFERENCED_IMAGE_SQ, referenced)], implicit=False)
    damaged = damaged.replace(b"\x08\x00\x18\x00UI", b"\x08\x00\x18\x00IS", 1)
    out, ds = _anonymize(damaged)
    assert (ds["PatientID"].VR, ds.PatientID) == ("LO", KEY.patient_id("1234"))
    assert (ds["SOPInstanceUID"].VR, ds.SOPInstanceUID) == ("UI", _new_sop())
    clean = _file([(0x00200052, _explicit(0x00200052, b"UI", b"1.2.3.45")),
                   (0x00100020, _explicit(0x00100020, b"LT", b"1234"))], implicit=False)
    _, expected = _anonymize(clean)
    assert (ds["FrameOfReferenceUID"].VR, ds.FrameOfReferenceUID) == ("UI", expected.FrameOfReferenceUID)
    assert expected.FrameOfReferenceUID.startswith("2.25.")
    assert (expected["PatientID"].VR, expected.PatientID) == ("LT", ds.PatientID)
    short = _file([(0x00100020, _explicit(0x00100020, b"SH", b"1234"))], implicit=False)
    assert _anonymize(short)[1]["PatientID"].VR == "LO" and len(ds.PatientID) > 16
    item = ds.ReferencedImageSequence[0]
    assert (item["ReferencedSOPInstanceUID"].VR, item.ReferencedSOPInstanceUID) == (
        "UI", KEY.uid("anonymize.instance", "1.23"))
    assert pydicom_converts_all(out)


def test_a_sequence_tag_holding_what_is_not_a_sequence_is_not_dicom():
    """PerFrameFunctionalGroupsSequence as an explicit UN of 4 bytes ("YES "; the structured
    mutation run, seed 50, rewrote a tag): pydicom parses a known sequence's UN value as
    items and cannot. The file is malformed (``not_dicom``), not unreadable (``read_error``
    is the storage's)."""
    data = _file([(0x52009230, _explicit(0x52009230, b"UN", b"YES "))], implicit=False)
    with pytest.raises(InputError, match=re.escape("sequence (5200,9230) cannot be parsed")) as info:
        apply(DEFAULT, dicomio.read_dataset(data), KEY)
    assert info.value.reason == "not_dicom"


def test_a_sequence_pydicom_cannot_read_as_items_is_not_dicom(monkeypatch: pytest.MonkeyPatch):
    """An item whose SpecificCharacterSet holds a NUL: pydicom's sequence parser raises
    ValueError on it, then retries the bytes as other VRs and returns them as text under VR SQ
    (the structured mutation run, seed 51). Walked as items, that text raised AttributeError,
    and pydicom's own ``ds[tag]`` raised TypeError (internal errors); now ``not_dicom``, both where a
    path edits the sequence and where the nested pass leaves a layout to pydicom."""
    body = _explicit(0x00080005, b"CS", b"AB\x00C") + _explicit(0x00081150, b"UI", CT.encode()) \
        + _explicit(0x00081155, b"UI", b"1.2.3")
    data = _file([(REFERENCED_IMAGE_SQ, _explicit(REFERENCED_IMAGE_SQ, b"SQ", _item(body)))], implicit=False)
    message = re.escape("sequence (0008,1140) cannot be parsed")
    edit = parse_modify({"Replace": {"ReferencedImageSequence[0].ReferencedSOPClassUID": "1.2"}})
    with pytest.raises(InputError, match=message) as info:
        apply(edit, dicomio.read_dataset(data), KEY)
    assert info.value.reason == "not_dicom"
    monkeypatch.setattr(engine, "parse_items", lambda *args: None)  # a layout our item scanner leaves to pydicom
    with pytest.raises(InputError, match=message) as info:
        apply(parse_anonymize({"Keep": ["ReferencedImageSequence[0].ReferencedSOPClassUID"]}), dicomio.read_dataset(data), KEY)
    assert info.value.reason == "not_dicom"


def test_a_sequence_tag_on_bytes_pydicom_cannot_read_is_not_dicom_when_written():
    """StructureSetROISequence as an explicit UN of 2 bytes ("2D"; the structured split/merge
    run, seed 53): a request that leaves it alone reaches pydicom's writer, which parses it to
    re-encode text and raised OSError (an internal error). ``not_dicom`` now, as when the
    nested pass meets it."""
    data = _file([(0x30060020, _explicit(0x30060020, b"UN", b"2D"))], implicit=False)
    big_endian = parse_modify({"Transcode": "1.2.840.10008.1.2.2", "Replace": {"PatientName": "X"}})
    new = apply(big_endian, dicomio.read_dataset(data), KEY)
    with pytest.raises(InputError, match=re.escape("sequence (3006,0020) cannot be parsed")) as info:
        dicomio.write_dataset(new, "1.2.840.10008.1.2.2")
    assert info.value.reason == "not_dicom"


@pytest.mark.filterwarnings("ignore:The value for the data element .0020,0052. exceeds")  # pydicom: UI -> UN
def test_a_mapped_value_too_long_for_its_vr_is_written_as_un(monkeypatch):
    """A nested ReferencedSOPInstanceUID of 10,000 short values (48,889 bytes of UI, within its
    16-bit length) maps to 10,000 UIDs of ~44 characters; a damaged file's nested LUTData (US,
    32,768 bytes) retagged as StudyInstanceUID maps its 16,384 numbers to 731,948 bytes of
    UIDs (the structured mutation run, seed 58). Packing that length into the 16-bit field raised
    struct.error (``internal_error``) in both walks; it is written as UN with a 32-bit length,
    as CP 1066 added to PS3.5 6.2.2 and as pydicom's writer does for the same value at top
    level."""
    values = [str(i) for i in range(10_000)]
    lut = b"".join(bytes((0x5C, 0x80 + i % 100)) for i in range(16_384))  # not ASCII: the object walk
    referenced = _explicit(REFERENCED_IMAGE_SQ, b"SQ", _item(
        _explicit(0x00081150, b"UI", CT.encode()) + _explicit(0x00081155, b"UI", "\\".join(values).encode())))
    voi_lut = _explicit(0x00283010, b"SQ", _item(
        _explicit(0x00080005, b"CS", b"ISO_IR 100") + _explicit(0x0020000D, b"US", lut)))
    data = _file([(REFERENCED_IMAGE_SQ, referenced), (0x00200052, _explicit(0x00200052, b"UI", "\\".join(values).encode())),
                  (0x00283010, voi_lut)], implicit=False)
    out, ds = _anonymize(data)
    expected = "\\".join(KEY.uid("anonymize.instance", v) for v in values).encode()
    expected += b"\x00" * (len(expected) % 2)
    nested = ds.ReferencedImageSequence[0]["ReferencedSOPInstanceUID"]
    assert (nested.VR, nested.value) == ("UN", expected) and len(expected) > 0xFFFF
    top = ds["FrameOfReferenceUID"]  # written by pydicom's writer: the same rule
    assert top.VR == "UN" and len(top.value) > 0xFFFF
    study = ds.VOILUTSequence[0]["StudyInstanceUID"]
    numbers = struct.unpack(f"<{len(lut) // 2}H", lut)  # a value of VR US is read as its numbers
    mapped = "\\".join(KEY.uid("anonymize.study", str(n)) for n in numbers).encode()
    assert (study.VR, study.value.rstrip(b"\x00")) == ("UN", mapped.rstrip(b"\x00")) and len(mapped) > 0xFFFF
    # The byte-level walk encodes the ASCII one itself (the LUT's goes to the object walk):
    # the same bytes as the object walk's.
    fell_back = []
    byte_sequence = engine._Run._byte_sequence

    def spy(self, elem, tag):
        new = byte_sequence(self, elem, tag)
        if new is engine._FALLBACK:
            fell_back.append(tag)
        return new

    with monkeypatch.context() as patch:
        patch.setattr(engine._Run, "_byte_sequence", spy)
        assert dicomio.write_dataset(apply(DEFAULT, dicomio.read_dataset(data), KEY)) == out
    assert fell_back == [0x00283010]
    with monkeypatch.context() as patch:
        patch.setattr(engine._Run, "_byte_sequence", lambda self, elem, tag: engine._FALLBACK)
        assert dicomio.write_dataset(apply(DEFAULT, dicomio.read_dataset(data), KEY)) == out


# --------------------------------------------------------------------------- found by a review
# of the byte-level paths (each leaked the planted name before its fix)


def _undefined_item(body: bytes) -> bytes:
    return struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF) + body + struct.pack("<HHL", 0xFFFE, 0xE00D, 0)


def _secret_body() -> bytes:
    return _secret_item(True)[8:]


@pytest.mark.parametrize("layout", ["undefined", "defined-then-undefined"])
@pytest.mark.parametrize("implicit", [True, False], ids=["implicit-vr-file", "explicit-vr-file-un"])
def test_items_of_undefined_length_in_a_value_of_unknown_vr_are_walked(implicit, layout):
    """A defined-length value of unknown VR whose items have undefined lengths (legal): the
    tiling check took only items of defined length, so the whole value stayed opaque and was
    copied as it was, the nested PatientName and UIDs with it (unknown public tag: default
    profile; private: KeepPrivateTags)."""
    value = _undefined_item(_secret_body())
    if layout == "defined-then-undefined":
        value = _item(_implicit(0x00081150, CT.encode(), b"UI")) + value
    unknown = _implicit(UNKNOWN_PUBLIC, value) if implicit else _explicit(UNKNOWN_PUBLIC, b"UN", value)
    data = _file([(UNKNOWN_PUBLIC, unknown)], implicit=implicit)
    assert data.count(SECRET) == 1
    out, ds = _anonymize(data)
    assert SECRET not in out and SOP.encode() not in out
    items = _items_of(ds[UNKNOWN_PUBLIC])
    assert items[-1].ReferencedSOPInstanceUID == _new_sop()
    assert items[-1].PatientName == KEY.patient_name("Nested^Secret")


def _big_endian_file(elements: list[tuple[int, bytes]]) -> bytes:
    from pydicom.uid import ExplicitVRBigEndian

    def element(tag: int, vr: bytes, value: bytes) -> bytes:
        value = _pad(value, vr)
        if vr in (b"SQ", b"UN", b"OB"):
            return struct.pack(">HH2sHL", tag >> 16, tag & 0xFFFF, vr, 0, len(value)) + value
        return struct.pack(">HH2sH", tag >> 16, tag & 0xFFFF, vr, len(value)) + value

    ids = [(0x00080016, CT), (0x00080018, SOP), (0x0020000D, STUDY), (0x0020000E, SERIES)]
    base = [(tag, element(tag, b"UI", v.encode())) for tag, v in ids]
    base += [(tag, element(tag, b"UN", value)) for tag, value in elements]
    return dicomio.encode_file_meta(CT, SOP, ExplicitVRBigEndian) + b"".join(data for _, data in sorted(base))


@pytest.mark.parametrize("tag", [REFERENCED_IMAGE_SQ, UNKNOWN_PUBLIC])
def test_a_sequence_written_as_un_in_a_big_endian_file_is_walked(tag):
    """PS3.5 6.2.2: the items of a sequence written as UN are implicit VR little endian, in a
    big endian file too. pydicom read ReferencedImageSequence's in the file's byte order (one
    garbage item): nothing matched, and the value was copied with the name in it."""
    data = _big_endian_file([(tag, _secret_item(True))])
    out, ds = _anonymize(data)
    assert SECRET not in out and SOP.encode() not in out
    item = ds[tag].value[0]
    assert item.ReferencedSOPInstanceUID == _new_sop()
    assert item.PatientName == KEY.patient_name("Nested^Secret")


def _hidden_after_delimiter(where: str, implicit: bool) -> bytes:
    hidden = _implicit(0x00100010, SECRET, b"PN") if implicit else _explicit(0x00100010, b"PN", SECRET)
    reference = _implicit(0x00081150, CT.encode(), b"UI") if implicit else _explicit(0x00081150, b"UI", CT.encode())
    if where == "item":
        return _item(reference + struct.pack("<HHL", 0xFFFE, 0xE00D, 0) + hidden)
    return _item(reference) + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0) + _item(hidden)


@pytest.mark.parametrize("where", ["item", "sequence"])
@pytest.mark.parametrize("implicit", [True, False], ids=["implicit-vr-file", "explicit-vr-file"])
def test_data_hidden_after_a_delimiter_is_refused(where, implicit):
    """Elements after an item delimiter inside a defined-length item (or after a sequence
    delimiter inside a defined-length sequence): readers stop at the delimiter and never see
    them, and the unchanged raw value used to be copied, the hidden name with it."""
    value = _hidden_after_delimiter(where, implicit)
    sequence = (_implicit(REFERENCED_IMAGE_SQ, value) if implicit
                else _explicit(REFERENCED_IMAGE_SQ, b"SQ", value))
    data = _file([(REFERENCED_IMAGE_SQ, sequence)], implicit=implicit)
    what = "a sequence item of defined length" if where == "item" else "a sequence of defined length"
    with pytest.raises(InputError, match=f"^{what} goes on after its delimiter \\(data that readers skip\\)$") as info:
        apply(DEFAULT, dicomio.read_dataset(data), KEY)
    assert info.value.reason == "not_dicom"


def test_data_hidden_after_a_delimiter_in_a_value_of_unknown_vr_is_refused():
    """The same inside a value of unknown VR whose items tile it, which the reader does not
    walk: refused, not walked without the hidden part. (A sequence delimiter between items
    makes the value no run of items at all: opaque bytes, kept as they are, like the values
    that only start like items above.)"""
    data = _file([(UNKNOWN_PUBLIC, _explicit(UNKNOWN_PUBLIC, b"UN", _hidden_after_delimiter("item", True)))],
                 implicit=False)
    with pytest.raises(InputError, match="^a sequence item of defined length goes on after its delimiter") as info:
        apply(DEFAULT, dicomio.read_dataset(data), KEY)
    assert info.value.reason == "not_dicom"
    value = _hidden_after_delimiter("sequence", True)
    _, ds = _anonymize(_file([(UNKNOWN_PUBLIC, _explicit(UNKNOWN_PUBLIC, b"UN", value))], implicit=False))
    assert ds[UNKNOWN_PUBLIC].VR == "UN" and ds[UNKNOWN_PUBLIC].value == value


def test_an_unchanged_input_item_re_encoded_in_another_syntax_is_not_modified():
    """A sequence written as UN with an undefined length (implicit VR items, which pydicom
    reads): re-encoding its unchanged private item in explicit VR went through pydicom's VR
    lookup, which read the private creator through ``item[tag]`` and so replaced the input's
    raw element by a decoded one. The engine never modifies its input."""
    from pydicom.dataelem import RawDataElement

    items = (_undefined_item(_implicit(0x00081155, OTHER_SOP.encode(), b"UI"))
             + _undefined_item(_implicit(PRIVATE_CREATOR, b"ACME 1.0") + _implicit(0x00091001, b"kept")))
    sequence = (struct.pack("<HH2sHL", 0x3006, 0x0010, b"UN", 0, 0xFFFFFFFF) + items
                + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0))
    source = dicomio.read_dataset(_file([(0x30060010, sequence)], implicit=False))
    private_item = source[0x30060010].value[1]
    assert type(private_item._dict[PRIVATE_CREATOR]) is RawDataElement
    out = dicomio.read_dataset(dicomio.write_dataset(apply(KEEP_PRIVATE, source, KEY)))
    assert type(private_item._dict[PRIVATE_CREATOR]) is RawDataElement
    assert out[0x30060010].value[0].ReferencedSOPInstanceUID == KEY.uid("anonymize.instance", OTHER_SOP)
    assert out[0x30060010].value[1][0x00091001].value == b"kept"


@pytest.mark.parametrize("implicit", [True, False], ids=["implicit-vr", "explicit-vr"])
@pytest.mark.parametrize("dropped_vr_too", [False, True], ids=["sq", "un"])
def test_a_tag_repeated_in_an_item_is_refused(implicit, dropped_vr_too):
    """PatientName twice in one item, the second copy empty: the item's elements are a dict,
    which saw only the empty copy, so nothing changed and the item's bytes were copied, first
    copy included, which DCMTK (hence Orthanc) reads back. PS3.5 7.1 allows one; refused."""
    if implicit:
        names = _implicit(0x00100010, SECRET, b"PN") + _implicit(0x00100010, b"", b"PN")
        body = _item(_implicit(0x00081150, CT.encode(), b"UI") + names)
        tag = UNKNOWN_PUBLIC if dropped_vr_too else REFERENCED_IMAGE_SQ
        element = _implicit(tag, body)
    else:
        names = _explicit(0x00100010, b"PN", SECRET) + _explicit(0x00100010, b"PN", b"")
        body = _item(_explicit(0x00081150, b"UI", CT.encode()) + names)
        tag = UNKNOWN_PUBLIC if dropped_vr_too else REFERENCED_IMAGE_SQ
        element = _explicit(tag, b"UN" if dropped_vr_too else b"SQ", body)
    data = _file([(tag, element)], implicit=implicit)
    for plan in (DEFAULT, KEEP_PRIVATE, parse_anonymize({"Transcode": "1.2.840.10008.1.2.1"})):
        with pytest.raises(InputError) as info:
            apply(plan, dicomio.read_dataset(data), KEY)
        assert (info.value.reason, str(info.value)) == (
            "invalid_value", "a sequence item holds element (0010,0010) twice")


@pytest.mark.parametrize("tag", [0x00000902, 0x00020016, 0x00030010, 0x00100000])
@pytest.mark.parametrize("implicit", [True, False], ids=["implicit-vr", "explicit-vr"])
def test_groups_no_data_set_may_hold_are_dropped_from_items(tag, implicit):
    """ErrorComment (0000,0902), a file meta AE title (0002,0016), a reserved odd group's
    element, a group length holding text: the writer drops them at top level, and an item kept
    them (the command group's free text in the clear, read back by pydicom). Dropped at every
    depth, by both walks, KeepPrivateTags or not."""
    text = b"Nested^Secret AE"
    stray = _implicit(tag, text) if implicit else _explicit(tag, b"LO" if tag >> 16 != 2 else b"AE", text)
    ids = (_implicit(0x00081150, CT.encode(), b"UI") if implicit else _explicit(0x00081150, b"UI", CT.encode()))
    item = _item(stray + ids)
    element = _implicit(REFERENCED_IMAGE_SQ, item) if implicit else _explicit(REFERENCED_IMAGE_SQ, b"SQ", item)
    data = _file([(REFERENCED_IMAGE_SQ, element)], implicit=implicit)
    for plan in (DEFAULT, KEEP_PRIVATE):
        out, ds = _anonymize(data, plan)
        assert SECRET not in out
        (kept,) = ds.ReferencedImageSequence
        assert tag not in kept and kept.ReferencedSOPClassUID == CT


def test_data_after_a_delimiter_in_a_nested_sequence_is_refused_by_the_byte_walk_too():
    """Implicit VR: an unknown tag's item holds ReferencedImageSequence of defined length laid
    out as [item][sequence delimiter][item naming the patient]. The object walk refused it; the
    byte walk stopped at the delimiter, dropped where it stopped and copied the rest."""
    first = _item(_implicit(0x00081150, CT.encode(), b"UI"))
    hidden = _item(_implicit(0x00100010, SECRET, b"PN"))
    inner = first + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0) + hidden
    outer = _item(_implicit(REFERENCED_IMAGE_SQ, inner))
    data = _file([(UNKNOWN_PUBLIC, _implicit(UNKNOWN_PUBLIC, outer))], implicit=True)
    with pytest.raises(InputError) as info:
        apply(DEFAULT, dicomio.read_dataset(data), KEY)
    assert info.value.reason == "not_dicom"
    assert str(info.value).startswith("a sequence of defined length goes on after its delimiter")


@pytest.mark.parametrize("vr", [b"UT", b"LO", b"CS", b"FD", b"UL"])
@pytest.mark.parametrize("nested", [False, True], ids=["top-level", "in-an-item"])
def test_items_under_a_text_or_number_vr_on_an_unknown_public_tag_are_refused(vr, nested):
    """(0018,9999), newer than the dictionary, labelled UT (or LO, CS, FD, UL) around a patient's
    items: neither walked nor refused, and a Transcode to implicit VR dropped the label, so a
    reader whose dictionary knows the tag as a sequence read the name back. Refused like the
    OB and OW case, at any depth; a tag the dictionary knows keeps what its text holds."""
    element = _explicit(UNKNOWN_PUBLIC, vr, _secret_item(implicit=True))
    if vr in (b"FD", b"UL"):  # a short header: the value must fit 16 bits, as it does
        assert len(_secret_item(implicit=True)) < 0x10000
    if nested:
        element = _explicit(0x00082112, b"SQ", _item(element))
    data = _file([(0x00082112 if nested else UNKNOWN_PUBLIC, element)], implicit=False)
    for body in ({}, {"Transcode": "1.2.840.10008.1.2"}):
        with pytest.raises(InputError) as info:
            apply(parse_anonymize(body), dicomio.read_dataset(data), KEY)
        assert (info.value.reason, str(info.value)) == (
            "invalid_value", f"element (0018,9999) of VR {vr.decode()} holds sequence items, which cannot be "
            "de-identified under that VR")
    known = 0x00081030  # StudyDescription (LO, kept by 2017c): its own text, whatever it holds
    plain = _file([(known, _explicit(known, b"LO", b"\xfe\xff\x00\xe0\x00\x00\x00\x00"))], implicit=False)
    assert _anonymize(plain, parse_anonymize({"DicomVersion": "2017c", "Keep": ["StudyDescription"]}))[1][known].VR == "LO"


@pytest.mark.parametrize("keep", [False, True], ids=["byte-walk", "object-walk"])
def test_an_empty_sequence_written_as_un_is_no_internal_error(keep):
    """PerFrameFunctionalGroupsSequence written as UN with length 0 (a mutated RicSmi file): its
    value reads as None, which the object walk (a Keep path takes the plan there) handed to the
    item parser: internal_error (TypeError). It holds nothing and is copied."""
    tag = 0x52009230
    data = _file([(tag, _explicit(tag, b"UN", b""))], implicit=False)
    # a bare data set (no file meta): read by pydicom's reader, which leaves an empty value None
    bare = data[len(dicomio.encode_file_meta(CT, SOP, ExplicitVRLittleEndian)):]
    source = dicomio.read_dataset(bare, check_uids=False)
    assert source._dict[tag].value is None and source._dict[tag].VR == "UN"
    plan = parse_anonymize({"Keep": ["ReferencedImageSequence[*].ReferencedSOPInstanceUID"]} if keep else {})
    out = dicomio.write_dataset(apply(plan, source, KEY))
    ds = dicomio.read_dataset(out, check_uids=False)
    assert ds[tag].VR in ("UN", "SQ") and not ds[tag].value and SECRET not in out


def test_a_vendor_s_transfer_syntax_in_a_kept_private_item_is_kept():
    """GE's (6003,1010) items in PrivateTags.dcm name with TransferSyntaxUID (0002,0010) the
    encoding of the private bytes beside it: KeepPrivateTags keeps it, though other file meta
    elements are dropped from items."""
    from tests.conftest import sample

    source = dicomio.read_dataset(sample("PrivateTags.dcm").read_bytes())
    items = source[0x60031010].value
    assert [0x00020010 in item for item in items] == [True, True]
    out, ds = _anonymize(dicomio.write_dataset(source), KEEP_PRIVATE)
    assert [item[0x00020010].value for item in ds[0x60031010].value] == [item[0x00020010].value for item in items]
