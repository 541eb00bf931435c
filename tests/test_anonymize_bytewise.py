"""The byte-level nested pass: same output as the object walk, exact bytes where it rewrites.

``engine._Run._byte_sequence`` walks raw sequences on their bytes; whatever it does not
handle itself it hands to the object walk (``_walk_sequence``). Each test here compares the
two (the object walk is forced by making ``_byte_sequence`` decline) and checks exact values.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file
from pydicom.dataelem import RawDataElement
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from transforms import dicomio, engine
from transforms.engine import apply
from transforms.errors import InputError
from transforms.identity import Key
from transforms.request import parse_anonymize

from .conftest import SAMPLES, missing_samples, sample

KEY = Key.from_bytes(b"bytewise-test-key-0123456789")
DEFAULT = parse_anonymize({})
KEEP_PRIVATE = parse_anonymize({"KeepPrivateTags": True})
MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
_LONG = {b"OB", b"OW", b"SQ", b"UN", b"UT", b"UC", b"UR"}


def _uid(kind: str, value: str) -> str:
    return KEY.uid(f"anonymize.{kind}", value)


def _object_walk(monkeypatch: pytest.MonkeyPatch, plan, ds) -> bytes:
    """The output with the byte-level pass switched off (every sequence gets the object walk)."""
    with monkeypatch.context() as patch:
        patch.setattr(engine._Run, "_byte_sequence", lambda self, elem, tag: engine._FALLBACK)
        return dicomio.write_dataset(apply(plan, ds, KEY))


def _byte_results(monkeypatch: pytest.MonkeyPatch, plan, ds) -> tuple[bytes, list]:
    """The output with the byte-level pass on, and what ``_byte_sequence`` returned."""
    seen: list = []
    original = engine._Run._byte_sequence

    def spy(self, elem, tag):
        result = original(self, elem, tag)
        seen.append(result)
        return result

    with monkeypatch.context() as patch:
        patch.setattr(engine._Run, "_byte_sequence", spy)
        return dicomio.write_dataset(apply(plan, ds, KEY)), seen


# ---------------------------------------------------------------- crafted explicit VR LE files


def _el(tag: int, vr: bytes, value: bytes, *, reserved: int = 0) -> bytes:
    if len(value) % 2:
        value += b"\x00" if vr == b"UI" else b" "
    if vr in _LONG:
        return struct.pack("<HH2sHL", tag >> 16, tag & 0xFFFF, vr, reserved, len(value)) + value
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, len(value)) + value


def _item(body: bytes, *, defined: bool = True) -> bytes:
    if defined:
        return struct.pack("<HHL", 0xFFFE, 0xE000, len(body)) + body
    return (struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF) + body
            + struct.pack("<HHL", 0xFFFE, 0xE00D, 0))


def _sq(tag: int, items: bytes, *, defined: bool = True, delimiter_length: int = 0) -> bytes:
    if defined:
        return struct.pack("<HH2sHL", tag >> 16, tag & 0xFFFF, b"SQ", 0, len(items)) + items
    return (struct.pack("<HH2sHL", tag >> 16, tag & 0xFFFF, b"SQ", 0, 0xFFFFFFFF) + items
            + struct.pack("<HHL", 0xFFFE, 0xE0DD, delimiter_length))


def _dataset(*elements: tuple[int, bytes]):
    """A Part 10 file of the required identifiers plus ``elements`` ((tag, bytes)), read back."""
    base = [(0x00080016, _el(0x00080016, b"UI", MR_STORAGE.encode())),
            (0x00080018, _el(0x00080018, b"UI", b"1.2.826.0.1.3680043.2.1125.1")),
            (0x0020000D, _el(0x0020000D, b"UI", b"1.2.826.0.1.3680043.2.1125.2")),
            (0x0020000E, _el(0x0020000E, b"UI", b"1.2.826.0.1.3680043.2.1125.3"))]
    body = b"".join(data for _, data in sorted(base + list(elements)))
    meta = dicomio.encode_file_meta(MR_STORAGE, "1.2.826.0.1.3680043.2.1125.1",
                                    ExplicitVRLittleEndian)
    return dicomio.read_dataset(meta + body)


def test_changed_sequence_is_rewritten_to_the_exact_bytes(monkeypatch):
    """Items get defined lengths, unchanged bytes are copied, changed elements re-encoded."""
    nested = _sq(0x00081199, _item(_el(0x00081150, b"UI", CT_STORAGE.encode())
                                   + _el(0x00081155, b"UI", b"1.2.4"), defined=False),
                 defined=False)
    first = (_el(0x00081155, b"UI", b"1.2.3") + nested + _el(0x00090010, b"LO", b"PRIVATE")
             + _el(0x0020000E, b"UI", b"1.2.5"))
    second = _item(_el(0x00081150, b"UI", CT_STORAGE.encode()))
    codes = _sq(0x00081032, _item(_el(0x00080100, b"SH", b"ABC") + _el(0x00080102, b"SH", b"L")))
    source = _dataset((0x00081115, _sq(0x00081115, _item(first, defined=False) + second)),
                      (0x00081032, codes))

    out = apply(DEFAULT, source, KEY)

    expected_nested = _sq(0x00081199, _item(_el(0x00081150, b"UI", CT_STORAGE.encode())
                                            + _el(0x00081155, b"UI",
                                                  _uid("instance", "1.2.4").encode())))
    expected = (_item(_el(0x00081155, b"UI", _uid("instance", "1.2.3").encode())
                      + expected_nested
                      + _el(0x0020000E, b"UI", _uid("series", "1.2.5").encode()))
                + second)
    changed = out._dict[0x00081115]
    assert type(changed) is RawDataElement
    assert (changed.VR, changed.length, changed.value) == ("SQ", len(expected), expected)
    # An unchanged sequence stays the element read from the file (its bytes are copied).
    assert out._dict[0x00081032] is source._dict[0x00081032]
    assert dicomio.write_dataset(out) == _object_walk(monkeypatch, DEFAULT, source)


def test_implicit_vr_changed_nested_sequences_get_undefined_lengths(monkeypatch):
    source = _dataset((0x00081115, _sq(0x00081115, _item(
        _sq(0x00081199, _item(_el(0x00081155, b"UI", b"1.2.4")))))))
    implicit = dicomio.read_dataset(dicomio.write_dataset(source, ImplicitVRLittleEndian))
    output, seen = _byte_results(monkeypatch, DEFAULT, implicit)
    assert output == _object_walk(monkeypatch, DEFAULT, implicit)
    assert not any(result is engine._FALLBACK for result in seen)
    changed = apply(DEFAULT, implicit, KEY)._dict[0x00081115]
    uid = _uid("instance", "1.2.4").encode()
    uid += b"\x00" * (len(uid) % 2)
    inner = struct.pack("<HHL", 0x0008, 0x1155, len(uid)) + uid
    nested = (struct.pack("<HHL", 0x0008, 0x1199, 0xFFFFFFFF) + _item(inner)
              + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0))
    assert (changed.VR, changed.length, changed.value) == (None, 0xFFFFFFFF, _item(nested))


def test_repeated_nested_sequences_are_rewritten_alike(monkeypatch):
    """Per-frame groups repeat identical nested sequences (walked once per dataset); one that
    differs only in a UID, and a value holding the delimiter pattern, still come out right."""
    lut = struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)  # a sequence delimiter inside a value

    def source_image(uid: bytes) -> bytes:
        purpose = _sq(0x0040A170, _item(_el(0x00080100, b"SH", b"121322"), defined=False),
                      defined=False)
        return _sq(0x00082112, _item(_el(0x00081150, b"UI", MR_STORAGE.encode())
                                     + _el(0x00081155, b"UI", uid) + _el(0x00281201, b"OW", lut)
                                     + purpose, defined=False), defined=False)

    def frame(uid: bytes, index: int) -> bytes:
        derivation = _sq(0x00089124, _item(source_image(uid), defined=False), defined=False)
        content = _sq(0x00209111, _item(_el(0x00209157, b"UL", struct.pack("<L", index))))
        return _item(derivation + content, defined=False)

    uids = [b"1.2.3", b"1.2.3", b"1.2.4", b"1.2.3"]
    per_frame = b"".join(frame(uid, index) for index, uid in enumerate(uids))
    source = _dataset((0x52009230, _sq(0x52009230, per_frame, defined=False)))

    output, seen = _byte_results(monkeypatch, DEFAULT, source)

    assert len(seen) == 1 and seen[0] is not engine._FALLBACK
    assert output == _object_walk(monkeypatch, DEFAULT, source)
    frames = dicomio.read_dataset(output).PerFrameFunctionalGroupsSequence
    for index, (item, uid) in enumerate(zip(frames, uids)):
        image = item.DerivationImageSequence[0].SourceImageSequence[0]
        assert image.ReferencedSOPInstanceUID == _uid("instance", uid.decode())
        assert image[0x00281201].value == lut
        assert image.PurposeOfReferenceCodeSequence[0].CodeValue == "121322"
        assert item.FrameContentSequence[0].DimensionIndexValues == index


@pytest.mark.parametrize("undefined_first", [False, True], ids=["defined-first", "undefined-first"])
def test_one_nested_sequence_in_both_length_encodings(monkeypatch, undefined_first):
    """The same nested sequence in two items, once with a defined length and once with an
    undefined one (legal, if unusual): its bytes up to the delimiter are the other's whole
    value, and the two memos of nested sequences shared one dictionary under the same key. The
    second walk took the first's entry for its own (ValueError or TypeError: an internal
    error). Found reading the code; each encoding now has its memo."""
    reference = _item(_el(0x00081150, b"UI", MR_STORAGE.encode()) + _el(0x00081155, b"UI", b"1.2.3.4.5.6.7"))
    both = [_sq(0x0008114A, reference), _sq(0x0008114A, reference, defined=False)]
    if undefined_first:
        both.reverse()
    source = _dataset((0x00081115, _sq(0x00081115, b"".join(_item(sequence) for sequence in both))))

    output, seen = _byte_results(monkeypatch, DEFAULT, source)

    assert len(seen) == 1 and seen[0] is not engine._FALLBACK
    assert output == _object_walk(monkeypatch, DEFAULT, source)
    series = dicomio.read_dataset(output).ReferencedSeriesSequence
    assert [item.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID for item in series] == [
        _uid("instance", "1.2.3.4.5.6.7")] * 2


@pytest.mark.parametrize("case", ["group length", "unsorted", "reserved bytes",
                                  "delimiter length", "explicit UN", "non-ASCII name"])
def test_layouts_left_to_the_object_walk(monkeypatch, case):
    """Items whose re-encoding is not their own bytes, and values the object walk decodes,
    are handed over whole; the output is the object walk's, with the exact new values."""
    uid = _el(0x00081155, b"UI", b"1.2.3")
    extra: list[tuple[int, bytes]] = []
    if case == "group length":
        body = _el(0x00080000, b"UL", struct.pack("<L", len(uid))) + uid
    elif case == "unsorted":
        body = uid + _el(0x00081150, b"UI", CT_STORAGE.encode())
    elif case == "reserved bytes":
        body = uid + _el(0x00081160, b"UN", b"\x01\x00", reserved=0x5555)
    elif case == "delimiter length":
        body = uid + _sq(0x00081199, _item(_el(0x00081150, b"UI", CT_STORAGE.encode())),
                         defined=False, delimiter_length=4)
    elif case == "explicit UN":
        body = uid + _el(0x00081199, b"UN", _item(_el(0x00081155, b"UI", b"1.2.4")))
    else:
        extra.append((0x00080005, _el(0x00080005, b"CS", b"ISO_IR 100")))
        body = uid + _el(0x00100010, b"PN", "Müller^Jürgen".encode("latin-1"))
    source = _dataset((0x00081115, _sq(0x00081115, _item(body))), *extra)

    output, seen = _byte_results(monkeypatch, DEFAULT, source)

    assert seen == [engine._FALLBACK]
    assert output == _object_walk(monkeypatch, DEFAULT, source)
    item = dicomio.read_dataset(output)[0x00081115].value[0]
    assert item.ReferencedSOPInstanceUID == _uid("instance", "1.2.3")
    if case == "group length":
        assert 0x00080000 not in item
    if case == "explicit UN":
        assert item[0x00081199].value[0].ReferencedSOPInstanceUID == _uid("instance", "1.2.4")
    if case == "non-ASCII name":
        assert item.PatientName == KEY.patient_name("Müller^Jürgen")


def _malformed(defect: str) -> bytes:
    if defect == "element past its item":
        return struct.pack("<HHL", 0xFFFE, 0xE000, 12) + _el(0x00081155, b"UI", b"1.2.3.4.5")
    if defect == "no item delimiter":
        return struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF) + _el(0x00081155, b"UI", b"1.2")
    if defect == "unknown VR":
        return _item(_el(0x00081155, b"UI", b"1.2.3") + _el(0x00081160, b"Q\x91", b"\x01\x00"))
    value = b""
    for _ in range(70):
        value = _item(_sq(0x00081199, value, defined=False), defined=False)
    return value


@pytest.mark.parametrize(("defect", "reason", "message"), [
    ("element past its item", "truncated", "an element runs past the end of its sequence item"),
    ("runaway nesting", "too_deep", "sequences nested more than 64 levels deep"),
    ("unknown VR", "not_dicom", "element (0008,1160) has no valid VR in an explicit VR data set"),
])
def test_reader_refuses_damaged_nested_elements(defect, reason, message):
    """Unchanged sequences are copied byte for byte, so the reader checks every nested element
    header: a damaged one would otherwise pass into an output that pydicom cannot read."""
    with pytest.raises(InputError) as refused:
        _dataset((0x00081115, _sq(0x00081115, _malformed(defect))))
    assert (refused.value.reason, str(refused.value)) == (reason, message)


def test_reader_refuses_item_tags_where_elements_should_be():
    """An item whose length swallows the next item's header (pydicom then reads that header as
    an element of the item), and fragments left at top level when a header was cut off."""
    uid = _el(0x00081155, b"UI", b"1.2.3")
    swallowing = struct.pack("<HHL", 0xFFFE, 0xE000, len(uid) + 8 + len(uid)) + uid + _item(uid)
    stray = struct.pack("<HHL", 0xFFFE, 0xE000, 4) + b"\x00\x01\x02\x03"
    for elements in ([(0x00081115, _sq(0x00081115, swallowing))], [(0xFFFEE000, stray)]):
        with pytest.raises(InputError) as refused:
            _dataset(*elements)
        assert (refused.value.reason, str(refused.value)) == \
            ("not_dicom", "an item or delimiter tag (FFFE,E000) stands where a data element should be")


def test_reader_checks_defined_length_items_inside_undefined_length_sequences():
    value = _item(_el(0x00081155, b"UI", b"1.2.3") + _el(0x00081160, b"Q\x91", b"\x01\x00"))
    with pytest.raises(InputError) as refused:
        _dataset((0x00081115, _sq(0x00081115, value, defined=False)))
    assert refused.value.reason == "not_dicom"
    intact = _dataset((0x00081115, _sq(0x00081115, _item(_el(0x00081155, b"UI", b"1.2.3")), defined=False)))
    assert intact[0x00081115].value[0].ReferencedSOPInstanceUID == "1.2.3"


@pytest.mark.parametrize("defect", ["element past its item", "no item delimiter",
                                    "runaway nesting"])
def test_malformed_sequences_fail_as_the_object_walk_does(monkeypatch, defect):
    """The reader refuses these (next test); the engine's two walks must still agree on them
    (a data set built without the reader's nested check)."""
    with monkeypatch.context() as patch:
        patch.setattr(dicomio, "_check_items", lambda *args: None)
        source = _dataset((0x00081115, _sq(0x00081115, _malformed(defect))))
    with pytest.raises(InputError) as byte_walk:
        apply(DEFAULT, source, KEY)
    with monkeypatch.context() as patch:
        patch.setattr(engine._Run, "_byte_sequence", lambda self, elem, tag: engine._FALLBACK)
        with pytest.raises(InputError) as object_walk:
            apply(DEFAULT, source, KEY)
    assert (byte_walk.value.reason, str(byte_walk.value)) == \
        (object_walk.value.reason, str(object_walk.value))
    assert byte_walk.value.reason == ("too_deep" if defect == "runaway nesting" else "truncated")


# ---------------------------------------------------------------- every real file


def _inputs() -> list[tuple[str, bytes]]:
    paths = sorted(SAMPLES.glob("**/*.dcm")) if SAMPLES.is_dir() else []
    paths += [Path(get_testdata_file(name)) for name in
              ("rtstruct.dcm", "nested_priv_SQ.dcm", "liver_expb_1frame.dcm", "CT_small.dcm")]
    return [(str(path), path.read_bytes()) for path in paths]


def test_byte_walk_matches_object_walk_on_every_sample(monkeypatch):
    """Every readable sample, as stored and re-encoded in implicit VR and big endian, with and
    without private tags: the byte-level pass writes exactly what the object walk writes."""
    if not SAMPLES.is_dir():
        missing_samples(f"shared DICOM samples not found at {SAMPLES}")
    used = declined = 0
    for name, data in _inputs():
        try:
            source = dicomio.read_dataset(data, check_uids=False)
        except InputError:
            continue
        variants = [source]
        if len(data) < 1_000_000:
            for syntax in (ImplicitVRLittleEndian, ExplicitVRBigEndian):
                try:
                    encoded = dicomio.write_dataset(source, syntax)
                except ValueError:  # pydicom refuses big endian for many files
                    continue
                variants.append(dicomio.read_dataset(encoded, check_uids=False))
        for ds in variants:
            for plan in (DEFAULT, KEEP_PRIVATE):
                try:
                    expected = _object_walk(monkeypatch, plan, ds)
                except InputError as exc:
                    with pytest.raises(InputError) as info:
                        apply(plan, ds, KEY)
                    assert info.value.reason == exc.reason, name
                    continue
                output, seen = _byte_results(monkeypatch, plan, ds)
                assert output == expected, (name, ds.original_encoding, plan.describe())
                used += sum(result is not engine._FALLBACK for result in seen)
                declined += sum(result is engine._FALLBACK for result in seen)
    assert used > 1000
    assert declined < used / 20


def test_byte_walk_handles_every_sequence_of_the_common_files(monkeypatch):
    """No fallback on typical MR and multi-frame files (the fast path is the one taken)."""
    for name in ("Knee/T1/IM-0001-0001.dcm", "Brainix/Flair/IM-0001-0001.dcm", "DicomSeg.dcm",
                 "Issue22-NoPixelData.dcm"):
        source = dicomio.read_dataset(sample(name).read_bytes())
        _, seen = _byte_results(monkeypatch, DEFAULT, source)
        assert seen and not any(result is engine._FALLBACK for result in seen), name
        assert any(result is None for result in seen) or name == "DicomSeg.dcm"
