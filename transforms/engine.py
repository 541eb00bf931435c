"""Apply a :class:`~transforms.request.Plan` to one dataset, in Orthanc's order of operations.

``apply(plan, ds, key)`` returns a new dataset and never modifies ``ds``. Steps (Orthanc
``DicomModification::Apply``, orthanc-behavior.md §3):

1. anonymization: remember user-forced Study/Series/SOP Instance UIDs, so nested references
   to the original follow the forced value;
2. top-level private elements removed (if requested), except those kept;
3. top-level clearings (empty value), 4. top-level removals;
5. top-level replacements (file meta kept in step for SOPClassUID/SOPInstanceUID);
6. hierarchy UIDs regenerated according to the level (Study, Series, SOP Instance);
7. anonymization: identifiers mapped at top level, then the nested pass over every sequence
   (keep paths, private, removed, cleared, hierarchy UIDs, mapped UIDs);
8. nested path removals, then nested path replacements.

Speed: the dataset is a shallow copy whose unchanged elements stay the very raw elements read
from the file (so ``transforms.dicomio.write_dataset`` copies their bytes). Only tags named
by the plan or selected by the profile are decoded. The nested pass reads raw sequences on
their bytes (element headers only, no Datasets), leaves a sequence in which nothing changes
as it was, and rebuilds a changed one from the bytes of its unchanged elements plus the
re-encoded changed ones; other sequences are parsed to be walked. What the engine writes
(mapped UIDs, pseudonyms, emptied values, replacements, changed sequences) is produced as raw
encoded elements, so the writer never runs pydicom's per-element encoder on them. Pixel data
is never decoded.

All new identifiers come from the secret :class:`~transforms.identity.Key`:
``key.uid(namespace, original)``, ``key.patient_id``, ``key.patient_name``. Namespaces keep
Orthanc's four maps (Patient, Study, Series, Instance; every non-hierarchy UID shares the
Instance map) and separate anonymization from modification; modification namespaces also
carry the plan's fingerprint, so two different modifications never produce the same new UID.

Deliberate differences from Orthanc 1.12 (listed for the README):

* PatientID and PatientName become keyed pseudonyms (``ANON-...``/``ANON^...``) instead of a
  random UUID and a server-wide ``Anonymized<N>`` counter; an absent PatientName is written
  empty rather than as a pseudonym;
* nested PatientName is pseudonymized like the top-level one (Orthanc leaks it), and nested
  PatientName/PatientID stay pseudonymized when the user replaces the top-level value (only
  ``Keep`` exempts them);
* curve and overlay data (50xx,xxxx; 60xx,3000; 60xx,4000) are removed at top level too, as
  PS3.15 requires (Orthanc removes them only inside sequences), and overlays a 60xx group
  embeds in the unused bits of native pixel data are cleared (pixel values unchanged);
* free text in compressed pixel data's codestream headers (JPEG comments, Exif, JPEG 2000
  comments) is blanked, lengths kept (``transforms/codestreams.py``);
* DeidentificationMethodCodeSequence (0012,0064) gets the Basic Profile code (113100, DCM) for
  an uncustomised anonymization; a customised one writes DeidentificationMethod
  ``dicom-deid <version>`` (Orthanc >= 1.12.7 style) and no code;
* multi-valued UIDs are mapped value by value (Orthanc maps the whole string to one UID), and
  empty UIDs inside the data stay empty (only the three hierarchy UIDs are always written);
* a forced (``Replace`` + ``Force``) Study/Series/SOP Instance UID replaces nested references
  to the original value of the same instance; references to other instances' originals are
  mapped with the key (Orthanc depends on which instance its job processed first);
* identifiers stored with an explicit VR of UN are read through the dictionary VR and
  anonymized (Orthanc 1.10.1 leaves such PatientID/UID values untouched);
* changed sequences are written with defined lengths (explicit VR) or undefined lengths
  (implicit VR, so unknown private sequences stay recognisable); unchanged ones keep their
  original bytes.
"""

from __future__ import annotations

import struct
import weakref
from array import array
from itertools import compress
from operator import attrgetter
from typing import Any

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import correct_ambiguous_vr_element, write_data_element
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag
from pydicom.uid import UID

from transforms import paths
from transforms.codestreams import blanked_pixel_data

# The header scanner's vocabulary, shared with the reader so the two cannot drift apart.
from transforms.dicomio import (
    _ITEM,
    _ITEM_END,
    _KNOWN_VRS,
    _LONG_VRS,
    _MAX_DEPTH,
    _SEQ_END,
    _STRUCTS,
    _VR_TABLE,
)
from transforms.dicomio import STRING_VRS as _STRING_VRS
from transforms.dicomio import hidden_data_error
from transforms.errors import DeidError, InputError
from transforms.identity import INSTANCE, PATIENT, SERIES, STUDY
from transforms.paths import Workspace, remove_at, replace_at, shallow_copy
from transforms.request import Plan, basic_profile_code
from transforms.tags import (
    PATIENT_ID,
    PATIENT_NAME,
    PIXEL_DATA,
    SERIES_INSTANCE_UID,
    SOP_CLASS_UID,
    SOP_INSTANCE_UID,
    SPECIFIC_CHARACTER_SET,
    SQ_TAGS,
    STUDY_INSTANCE_UID,
)
from transforms.values import Value, build_element
from transforms.values import dataset_encodings as _python_encodings
from transforms.values import fitting_encodings as _fitting


def apply(plan: Plan, ds: Dataset, key: Any) -> Dataset:
    """Return ``ds`` modified or anonymized by ``plan``; ``ds`` itself is untouched.

    Args:
        plan: from :func:`transforms.request.parse_modify` / ``parse_anonymize``.
        ds: a dataset, typically from :func:`transforms.dicomio.read_dataset`.
        key: a :class:`transforms.identity.Key` deriving every new identifier.

    Raises:
        InputError: a sequence of the input cannot be parsed (``too_deep`` for runaway
            nesting, ``not_dicom`` otherwise).
    """
    try:
        return _Run(plan, ds, key).result
    except RecursionError:
        raise InputError("sequences nested too deeply to process", reason="too_deep") from None


_UNDEFINED = 0xFFFFFFFF
_HIERARCHY = {STUDY_INSTANCE_UID: STUDY, SERIES_INSTANCE_UID: SERIES, SOP_INSTANCE_UID: INSTANCE}
_MEDIA_STORAGE = {SOP_CLASS_UID: 0x00020002, SOP_INSTANCE_UID: 0x00020003}
_MEDIA_STORAGE_TAGS = {tag: BaseTag(tag) for tag in _MEDIA_STORAGE.values()}
_REFERENCED_SOP_INSTANCE_UID = 0x00081155
_RT_STUDY_PARENTS = (0x30060010, 0x30060012)  # ReferencedFrameOfReference > RTReferencedStudy
_LEVEL_RANK = {"Patient": 0, "Study": 1, "Series": 2, "Instance": 3}
# Raw VRs that may hold a sequence: SQ, and unknown/UN ones with a sequence's layout.
_MAYBE_SQ_VRS = frozenset({"SQ", "UN", None})
#: The little-endian item tag: the first bytes of a defined-length UN (or unknown implicit-VR)
#: value that holds items (PS3.5 6.2.2: a UN sequence is encoded in implicit VR little endian).
_LE_ITEM_START = b"\xfe\xff\x00\xe0"
_MAX_OPAQUE_ITEMS = 10_000


def _may_hold_items(elem: RawDataElement, tag: int) -> bool:
    """A raw element the nested pass must look into: SQ, undefined length, a sequence tag of
    the dictionary, or a defined-length value of a tag the dictionary does not know (private
    or newer) that starts like an item, as such a sequence written as UN (or in implicit VR)
    does."""
    return _declared_sequence(elem, tag) or (
        type(elem.value) is bytes and _item_shaped(elem.value, 0, len(elem.value), tag))


#: Binary VRs a sequence may hide under (after the top-level maybe-sequence VRs, the ones
#: the top-level scan also looks at).
_BINARY_ITEM_VRS = frozenset({"OB", "OW"})
_CHECKED_TOP_VRS = _MAYBE_SQ_VRS | _BINARY_ITEM_VRS
#: Raw VRs (None: implicit) whose value the byte-level walk looks at for items.
_OPAQUE_VRS = frozenset({None, "UN"}) | _BINARY_ITEM_VRS


def _refuse_disguised_sequence(elem: RawDataElement, tag: int) -> None:
    """Refuse (``invalid_value``) a public element that holds a sequence under another VR, which
    the nested pass would copy unread: a sequence tag of the dictionary stored with a VR other
    than SQ or UN (a reader that goes by the dictionary, such as any reader of the output in
    implicit VR, reads its items, identifiers and all), or a tag the dictionary does not know
    stored under any VR but SQ or UN whose value is a run of items (a sequence whose VR was
    lost, as UN values are walked for: a reader with a newer dictionary reads it as one in
    implicit VR). Empty values hold nothing."""
    if not elem.length or tag >> 16 & 1:
        return
    vr = elem.VR
    if tag in SQ_TAGS:
        if vr not in _MAYBE_SQ_VRS:
            raise InputError(f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) is a sequence stored with VR {vr}: "
                             "readers that go by the dictionary read its items, which cannot be de-identified "
                             "under that VR", reason="invalid_value")
        return
    value = elem.value
    if vr in _MAYBE_SQ_VRS or tag == PIXEL_DATA or type(value) is not bytes or not value.startswith(_LE_ITEM_START):
        return
    # (_item_shaped refuses items under a tag the dictionary calls text; a text VR on one is
    # its own text, whatever it holds)
    if (_item_shaped(value, 0, len(value), tag) if vr in _BINARY_ITEM_VRS else _dict_vr(tag) is None) \
            and _items_tiling(value) is not None:
        raise InputError(f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) of VR {vr} holds sequence items, "
                         "which cannot be de-identified under that VR", reason="invalid_value")


def _items_tiling(data: bytes) -> int | None:
    """How many defined-length items' little-endian headers tile ``data`` from its start, up
    to one of undefined length (whose end only parsing finds); None when item headers do not
    tile it: binary data that only starts like an item, not a sequence's value."""
    pos, end, count = 0, len(data), 0
    while pos < end:
        if pos + 8 > end:
            return None
        group, element, length = _STRUCTS[True][0](data, pos)
        if (group << 16 | element) != _ITEM:
            return None
        if length == _UNDEFINED:
            break
        if pos + 8 + length > end:
            return None
        pos += 8 + length
        count += 1
    return count


def _declared_sequence(elem: RawDataElement, tag: int) -> bool:
    """A raw element the file or the dictionary calls a sequence: SQ, undefined length, or a
    sequence tag of the dictionary."""
    return elem.VR == "SQ" or elem.length == _UNDEFINED or tag in SQ_TAGS


def _item_shaped(data: bytes, start: int, end: int, tag: int) -> bool:
    """Whether ``data[start:end]``, the value of ``tag``, may be the items of a sequence the
    file does not call one: it starts with an item tag and the dictionary does not know the
    tag (a known tag has its VR, and pydicom reads a known sequence stored as UN itself).

    Raises:
        InputError: ``invalid_value``, items under a tag the dictionary calls text.
    """
    if not data.startswith(_LE_ITEM_START, start, end):
        return False
    vr = _dict_vr(tag)
    if vr in _STRING_VRS:
        # Text cannot begin with an item tag (FE FF 00 E0: a NUL inside text): a sequence stored
        # under a known text tag, which pydicom would read back as text, identifiers and all.
        raise InputError(f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) holds sequence items, but the "
                         f"dictionary gives it VR {vr}", reason="invalid_value")
    return vr is None


#: Free-text VRs long enough for any new UID or pseudonym: a mapped value stays in one.
_FREE_TEXT_VRS = frozenset({"LO", "LT", "ST", "UT", "UC"})


def _mapped_vr(old: str | None, vr: str) -> str:
    """The explicit VR of a UID, PatientID or PatientName that replaces a value of VR ``old``:
    ``old`` where it holds the new value, else the value's own ``vr`` (UI, LO, PN), as for an
    explicit UN. A damaged file's PatientName of VR UL, SOPInstanceUID of VR IS or
    ReferencedSOPInstanceUID of VR OB kept it, and the output held 22 bytes of UL, or an IS
    that was no number. (Orthanc 1.10.1 also gives a PatientName of VR UL its VR PN, but keeps
    any text VR: a PatientID of VR SH holds its 36-character UUID.)"""
    return old if old == vr or old in _FREE_TEXT_VRS else vr  # type: ignore[return-value]


# Markers of the per-plan action tables.
_DELETE = object()
_CLEAR = object()
_KEEP = object()
_SKIP = object()  # handled by another step (replaced tags, the PatientName pseudonym)
_REFERENCED = "referenced"  # ReferencedSOPInstanceUID: instance map, except the RT quirk
# Byte-level nested pass: a tag without action (walked when its VR is SQ or its length
# undefined), a dictionary sequence tag without action (also walked with implicit VR), and
# "let the object walk handle this sequence".
_PLAIN = object()
_UNKNOWN = object()  # as _PLAIN, for a public tag the dictionary does not know
_SEQ_TAG = object()
_FALLBACK = object()
_NOTHING = object()  # a kept private tag: not even the nested pass
_SEQUENCE_TAG = object()  # anonymization: a sequence tag of the dictionary without action
_UNKNOWN_TAG = object()  # anonymization: a public tag the dictionary does not know, without action
#: Groups no data set may hold (PS3.5 7.1, 7.8.1; dicomio drops them at top level).
_NOT_NESTED_GROUPS = frozenset({0x0000, 0x0001, 0x0002, 0x0003, 0x0005, 0x0007, 0xFFFF})
#: Except TransferSyntaxUID: vendors' private items name with it the encoding of the private
#: bytes beside it (GE's (6003,1010) items in PrivateTags.dcm), which KeepPrivateTags keeps.
_NESTED_TRANSFER_SYNTAX = 0x00020010
_PSEUDONYM = object()  # PatientName, pseudonymized in step 5
_HIERARCHY_CODES = {tag: object() for tag in (STUDY_INSTANCE_UID, SERIES_INSTANCE_UID,
                                              SOP_INSTANCE_UID)}  # regenerated in step 6
_CAPTURED = frozenset({_PSEUDONYM, *_HIERARCHY_CODES.values()})
_GET_VR = attrgetter("VR")
_BYTE_MAX_DEPTH = _MAX_DEPTH - 4  # below the scanner's limit: deeper input gets the object walk's errors


_OVERLAY_DATA_TAGS = tuple(0x60003000 + (group << 16) for group in range(0, 0x100, 2))  # the removed range


def _pixel_integer(ds: Dataset, tag: int, little: bool) -> int | None:
    """The US value of a pixel-description element (BitsAllocated, ...), or None where it is
    absent or not one plain 16-bit value."""
    elem = ds._dict.get(tag)
    if elem is None:
        return None
    value = elem.value
    if type(elem) is RawDataElement:
        if not isinstance(value, (bytes, bytearray, memoryview)) or len(value) != 2:
            return None
        return int.from_bytes(value, "little" if little else "big")
    return value if type(value) is int else None


#: OverlayBitPosition (60xx,0102) of the overlay groups a viewer draws (6000-601E, PS3.3 C.9.2).
_OVERLAY_BIT_POSITIONS = tuple(0x60000102 + (group << 16) for group in range(0, 0x20, 2))


def _frames(ds: Dataset) -> int | None:
    """NumberOfFrames (IS) as read, 1 when absent, None when it is no plain positive number."""
    elem = ds._dict.get(0x00280008)
    if elem is None:
        return 1
    value = elem.value
    if isinstance(value, (bytes, bytearray, memoryview)):
        text = bytes(value).strip(b" \x00")
        return int(text) if text.isdigit() and 0 < int(text) < 1 << 31 else None
    return int(value) if isinstance(value, int) and value > 0 else None  # (pydicom's IS is an int)


def _embedded_overlays_cleared(ds: Dataset, elem: Any, little: bool) -> Any | None:
    """The native PixelData ``elem`` with the bits of the overlays the data set embeds in it
    set to what the pixel values imply (zero for unsigned data; for signed data, what the
    writer put in its negatives' other bits above HighBit: copies of the sign bit, or zero), or
    None where there are none or they are already so.

    An embedded overlay (retired) is an overlay group 60xx whose OverlayBitPosition (60xx,0102)
    names a bit of the pixel cells above HighBit (OverlayBitPosition 12 in 16-bit words holding
    12-bit pixels); overlay-aware viewers (DCMTK) draw it, so an annotation written there (a
    name, an ID) would survive the removal of OverlayData (60xx,3000). Only the bits such a
    group names change, so every reader that takes BitsStored bits at HighBit reads the same
    values; bits no group declares are left alone (no viewer draws them, and files whose values
    overflow BitsStored keep their words). Only the layout PS3.5 8.1.1 describes for every
    current IOD (HighBit = BitsStored - 1), whole words of 8, 16 or 32 bits, and pixel data of
    exactly the size the image module gives (one pad byte allowed) are handled: a file whose
    transfer syntax says native but whose pixel data is not (found by a review) is left as it is.
    """
    d = ds._dict
    declared = [tag for tag in _OVERLAY_BIT_POSITIONS if tag in d]
    if not declared:
        return None  # the common case: no overlay group at all
    bits = _pixel_integer(ds, 0x00280100, little)
    stored = _pixel_integer(ds, 0x00280101, little)
    if bits not in (8, 16, 32) or stored is None or not 0 < stored < bits:
        return None
    planes = 0
    for tag in declared:
        position = _pixel_integer(ds, tag, little)
        if position is not None and stored <= position < bits:
            planes |= 1 << position
    if not planes:
        return None  # overlays in OverlayData of their own
    high = _pixel_integer(ds, 0x00280102, little)
    if (high is not None and high != stored - 1) or _encapsulated(ds):
        return None
    value = elem.value
    if not isinstance(value, (bytes, bytearray, memoryview)):
        return None
    rows, columns = _pixel_integer(ds, 0x00280010, little), _pixel_integer(ds, 0x00280011, little)
    samples, frames = _pixel_integer(ds, 0x00280002, little) or 1, _frames(ds)
    size = bits // 8
    if not rows or not columns or frames is None:
        return None
    count = rows * columns * samples * frames
    if len(value) not in (count * size, count * size + 1):
        return None
    import numpy as np

    order = "<" if little else ">"
    words = np.frombuffer(value, dtype=f"{order}u{size}", count=count)
    kind = words.dtype.type
    wanted = None  # unsigned data: the planes' bits become zero
    if _pixel_integer(ds, 0x00280103, little):
        # Signed data: they become what the writer put in the other bits above HighBit of its
        # negative values, copies of the sign bit (sign-extended) or zero; copies where no
        # other bit tells (the planes fill every bit above HighBit).
        other = kind(((1 << bits) - 1) & ~((1 << stored) - 1) & ~planes)
        negative = (words >> (stored - 1)) & kind(1)
        if not other or (words[negative.astype(bool)] & other).any():
            wanted = negative * kind(planes)
    held = words & kind(planes)
    if wanted is None:
        if not held.any():
            return None
        fixed = words & kind(~planes & ((1 << bits) - 1))
    else:
        if np.array_equal(held, wanted):
            return None
        fixed = (words & kind(~planes & ((1 << bits) - 1))) | wanted
    data = fixed.astype(words.dtype, copy=False).tobytes() + bytes(value[count * size:])
    if type(elem) is RawDataElement:
        return _raw(elem.tag, elem.VR, len(data), data, elem.value_tell, elem.is_implicit_VR,
                    elem.is_little_endian)
    return DataElement(elem.tag, elem.VR, data)


def _raw(tag: int, vr: str | None, length: int, value: bytes, value_tell: int,
         implicit: bool, little: bool) -> RawDataElement:
    """``RawDataElement(...)`` without the namedtuple's Python-level ``__new__``."""
    return _tuple_new(RawDataElement, (tag, vr, length, value, value_tell, implicit, little)
                      + _RAW_DEFAULTS)


_tuple_new = tuple.__new__
_RAW_DEFAULTS = tuple(RawDataElement._field_defaults[name]  # pydicom 3: is_raw, is_buffered
                      for name in RawDataElement._fields[7:])


def _character_set(ds: Dataset) -> Any:
    """The character set ``ds``'s raw text was encoded with, without decoding in place.

    (``Dataset._character_set`` would store a decoded SpecificCharacterSet back into the
    dataset, which the writer then re-encodes.)
    """
    if SPECIFIC_CHARACTER_SET in ds._dict:
        # A sequence item may declare its own (PS3.5 7.5.3): its text is in that one. Items
        # were read with their parent's (pydicom and the item scanner alike), so a nested
        # Latin-1 'Müller' in a UTF-8 file got the pseudonym of 'M\ufffdller'.
        return _python_encodings(ds)
    original = ds.__dict__.get("_read_charset")
    if original:
        return original
    return _python_encodings(ds)


def _plain_ascii(data: bytes) -> bool:
    """Whether raw text reads the same in every DICOM character set: ASCII without the ESC
    of ISO 2022 code extensions (ISO 2022 IR 87 Japanese is 7-bit: 'ESC $ B' + JIS pairs)."""
    return data.isascii() and b"\x1b" not in data


def _dict_vr(tag: int) -> str | None:
    try:
        return dictionary_VR(tag)
    except KeyError:
        return None


def _vr_of(elem: Any, tag: int) -> str | None:
    vr = elem.VR
    if vr is None or (vr == "UN" and type(elem) is RawDataElement):
        return _dict_vr(tag) or vr
    return vr


def _text_of(elem: Any, ds: Dataset) -> list[str] | None:
    """The values of a text element as strings (None if empty)."""
    if type(elem) is RawDataElement:
        data = elem.value
        if not data:
            return None
        if _plain_ascii(data):  # every DICOM character set is ASCII-compatible
            parts = [p.strip(" \x00") for p in data.decode("ascii").split("\\")]
            return parts if any(parts) else None
        elem = convert_raw_data_element(elem, encoding=_character_set(ds), ds=ds)
    value = elem.value
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        parts = [str(v).strip(" \x00") for v in value]
    elif isinstance(value, bytes):
        parts = [value.decode("ascii", "replace").strip(" \x00")]
    else:
        parts = [str(value).strip(" \x00")]
    return parts if any(parts) else None


def _encapsulated(ds: Dataset) -> bool:
    """Whether the data set's pixel data is encapsulated: its transfer syntax is a compressed
    one, or (a syntax pydicom does not know) its PixelData has an undefined length."""
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if ts:
        try:
            return bool(UID(str(ts)).is_encapsulated)
        except ValueError:  # not a transfer syntax pydicom knows
            pass
    elem = ds._dict.get(PIXEL_DATA)
    return elem is not None and getattr(elem, "length", 0) == _UNDEFINED


class _Run:
    """State for one ``apply`` call."""

    def __init__(self, plan: Plan, ds: Dataset, key: Any) -> None:
        self.plan = plan
        self.key = key
        self.source = ds
        self.out = shallow_copy(ds)
        self.ws = Workspace(self.out)
        implicit, little = ds.original_encoding
        # With a file encoding, new elements are made raw in that encoding.
        self.implicit: bool | None = None if implicit is None else bool(implicit)
        self.little = True if little is None else bool(little)
        self.anonymize = plan.is_anonymization
        self.tables = tables = _tables(plan)
        self.ns = tables.namespaces
        self.nested_actions = tables.nested
        self.top_codes = tables.top_codes
        self.replacements = tables.replacements
        self.replacement_cache = tables.replacement_cache
        self.ranges = plan.removed_ranges
        self.range_lo, self.range_hi = tables.range_lo, tables.range_hi
        self.byte_actions = tables.byte_actions
        self.structs = _BYTE_STRUCTS[self.little]
        self.headers = _HEADER_PACKERS[self.little]
        self.byte_memo: dict[tuple, bytes] = {}  # mapped identifiers of this dataset
        self.sequences_memo: dict[tuple, tuple] = {}  # nested sequences of this dataset
        self.undefined_memo: dict[tuple, list] = {}  # and those of undefined length
        self.items_left = paths.MAX_WALKED_ITEMS  # items the object walk may still build
        self.values_left = paths.MAX_MAPPED_VALUES  # values of multi-valued identifiers still to map
        self.delimiter = _SEQUENCE_DELIMITER[self.little]
        self.forced: dict[tuple[str, str], str] = {}
        self.result = self._run()

    # ------------------------------------------------------------------ identifiers

    def map_uid(self, kind: str, value: str) -> str:
        if self.forced:
            forced = self.forced.get((kind, value))
            if forced is not None:
                return forced
        return self.key.uid(self.ns[kind], value)

    def in_range(self, tag: int) -> bool:
        group, element = tag >> 16, tag & 0xFFFF
        return any(glo <= group <= ghi and elo <= element <= ehi
                   for glo, ghi, elo, ehi in self.ranges)

    def _spend_values(self, count: int) -> None:
        """Count ``count`` more values of multi-valued identifiers mapped in this data set.

        Raises:
            InputError: ``too_large``, past :data:`transforms.paths.MAX_MAPPED_VALUES`.
        """
        self.values_left -= count
        if self.values_left < 0:
            raise InputError(f"too many values of multi-valued UIDs, PatientIDs or PatientNames to map in one "
                             f"file (at most {paths.MAX_MAPPED_VALUES:,})", reason="too_large")

    def _values_of(self, elem: Any, ds: Dataset | None) -> list[str] | None:
        """:func:`_text_of` for values to map, counted (:meth:`_spend_values`) before a raw
        value is split when it holds several."""
        spent = 0
        if type(elem) is RawDataElement and type(elem.value) is bytes and b"\\" in elem.value:
            spent = elem.value.count(b"\\") + 1
            self._spend_values(spent)
        values = _text_of(elem, ds)
        if values is not None and len(values) > max(spent, 1):
            self._spend_values(len(values) - spent)  # decoded by pydicom into more values
        return values

    def _mapped_element(self, tag: int, elem: Any, ds: Dataset, kind: str) -> Any | None:
        """``elem`` with every value mapped in ``kind``'s namespace (None: leave as is)."""
        if type(elem) is RawDataElement:
            data = elem.value
            if not data:
                return None
            if b"\\" not in data and _plain_ascii(data):  # one ASCII value (as _text_of reads it)
                text = data.decode("ascii").strip(" \x00")
                if not text:
                    return None
                if kind != PATIENT:
                    return self._ascii_element(tag, "UI", self.map_uid(kind, text), elem)
                if int(tag) == PATIENT_ID:
                    return self._ascii_element(tag, "LO", self.key.patient_id(text), elem)
                return self._ascii_element(tag, "PN", self.key.patient_name(text), elem)
        values = self._values_of(elem, ds)
        if values is None:
            return None
        if kind == PATIENT:
            if tag == PATIENT_ID:
                return self._ascii_element(tag, "LO", "\\".join(
                    self.key.patient_id(v) if v else "" for v in values), elem)
            return self._ascii_element(tag, "PN", "\\".join(
                self.key.patient_name(v) if v else "" for v in values), elem)
        return self._ascii_element(tag, "UI", "\\".join(
            self.map_uid(kind, v) if v else "" for v in values), elem)

    def _ascii_element(self, tag: int, vr: str, text: str, old: Any = None) -> Any:
        """An element holding ASCII ``text``: raw in the dataset's encoding when it has one
        (pseudonyms and UIDs are ASCII, valid in every DICOM character set)."""
        tag = BaseTag(tag)  # pydicom's hooks need BaseTag on raw elements
        data = text.encode("ascii")
        if len(data) % 2:
            data += b"\x00" if vr == "UI" else b" "
        if type(old) is RawDataElement:
            # Implicit VR writes no VR; an explicit VR is kept where it holds the value.
            raw_vr = None if old.is_implicit_VR else _mapped_vr(old.VR, vr)
            return _raw(tag, raw_vr, len(data), data, old.value_tell, old.is_implicit_VR,
                        old.is_little_endian)
        if self.implicit is not None:
            return _raw(tag, None if self.implicit else vr, len(data), data, 0, self.implicit,
                        self.little)
        return DataElement(tag, vr, text)

    # ------------------------------------------------------------------ steps

    def _run(self) -> Dataset:
        plan = self.plan
        out = self.out
        d = out._dict
        replaced = plan.replaced_tags
        anonymize = self.anonymize

        # 1. Forced hierarchy UIDs: nested references to the original follow the new value.
        if anonymize and plan.forced_uids:
            for value in plan.replacements:
                kind = _HIERARCHY.get(value.tag)
                if kind is None or not isinstance(value.value, str):
                    continue
                elem = d.get(value.tag)
                original = _text_of(elem, out) if elem is not None else None
                if original:
                    self.forced.setdefault((kind, "\\".join(original)), value.value)

        # 2-4 (and the top-level half of 7): each tag's action comes from a per-plan table
        # (looked up with plain ints in C-level maps: BaseTag's Python-level __eq__ would run
        # on every lookup), and only tags with an action are visited.
        tags = list(d)
        values = list(d.values())
        codes = list(map(self.top_codes.__getitem__, array("L", tags).tolist()))
        sequences: list[int] = []
        captured: dict[Any, tuple[BaseTag, Any]] = {}  # by code: (key as in d, element)
        if anonymize:
            for tag, elem, code in compress(zip(tags, values, codes),
                                            map(_CHECKED_TOP_VRS.__contains__,
                                                map(_GET_VR, values))):
                if code is not None and code is not _SEQUENCE_TAG and code is not _UNKNOWN_TAG:
                    continue
                if elem.VR in _BINARY_ITEM_VRS:
                    if type(elem) is RawDataElement:
                        _refuse_disguised_sequence(elem, tag)
                elif elem.VR == "SQ" if type(elem) is not RawDataElement else _may_hold_items(elem, tag):
                    sequences.append(tag)
        for tag, elem, code in compress(zip(tags, values, codes), codes):
            if code is _DELETE:
                del d[tag]
            elif code is _CLEAR:
                d[tag] = self._cleared_top(tag, elem)
            elif code is PATIENT or code is INSTANCE:
                new = self._mapped_element(tag, elem, out, code)
                if new is not None:
                    d[tag] = new
            elif code in _CAPTURED:  # PatientName, hierarchy UIDs: read by steps 5 and 6
                captured[code] = (tag, elem)
            elif code is _SEQUENCE_TAG or code is _UNKNOWN_TAG:
                # walked above when it is a sequence, OB and OW checked there; items under
                # another VR are refused
                if type(elem) is RawDataElement and elem.VR not in _CHECKED_TOP_VRS:
                    _refuse_disguised_sequence(elem, int(tag))
            # _KEEP, _SKIP and _NOTHING: nothing here

        # 5. Replacements, then (anonymization) the PatientName pseudonym.
        if plan.replacements:
            encodings = _python_encodings(out)
            for index, (value, key, walk) in enumerate(self.replacements):
                if value.tag == PIXEL_DATA and _encapsulated(self.source):
                    raise DeidError(
                        "Replace PixelData: the file's pixel data is compressed (encapsulated "
                        "transfer syntax); a replacement value can only be written to an "
                        "uncompressed file", reason="refused_by_request")
                elem = self._replacement(value, encodings, index)
                d[key] = elem  # pydicom's writer needs BaseTag keys
                if value.tag == SPECIFIC_CHARACTER_SET:
                    encodings = _python_encodings(out)
                if value.tag in _MEDIA_STORAGE:
                    self._sync_meta(value.tag, elem)
                if walk:
                    sequences.append(value.tag)  # a replaced sequence gets the nested pass too
        if anonymize and PATIENT_NAME in plan.uids:
            key, elem = captured.get(_PSEUDONYM) or (BaseTag(PATIENT_NAME), None)
            names = self._values_of(elem, self.source) if elem is not None else None
            pseudonym = "\\".join(self.key.patient_name(n) for n in names) if names else ""
            d[key] = self._ascii_element(PATIENT_NAME, "PN", pseudonym, elem)

        # 6. Hierarchy UIDs by level, unless replaced or kept.
        rank = _LEVEL_RANK[plan.level]
        keep = plan.keep
        for tag, kind, needed in ((STUDY_INSTANCE_UID, STUDY, 1), (SERIES_INSTANCE_UID, SERIES, 2),
                                  (SOP_INSTANCE_UID, INSTANCE, 3)):
            if rank > needed or tag in replaced or tag in keep:
                continue
            found = captured.get(_HIERARCHY_CODES[tag])
            if found is None:
                key, elem = BaseTag(tag), d.get(tag)
            else:
                key, elem = found
            original = _text_of(elem, out) if elem is not None else None
            new_uid = self.map_uid(kind, "\\".join(original) if original else "")
            new_elem = self._ascii_element(tag, "UI", new_uid, elem)
            d[key] = new_elem
            self._sync_meta(tag, new_elem)

        # 7. Nested pass over every top-level sequence (anonymization only).
        if anonymize:
            keep_paths = plan.keep_paths
            # The byte-level walk covers plans without nested paths (step 8 edits decoded
            # sequences, Keep paths need item indices); the object walk does the rest.
            bytewise = self.implicit is not None and not (
                keep_paths or plan.remove_paths or plan.replace_paths)
            for tag in sequences:
                if keep_paths and any(p.matches((), tag) for p in keep_paths):
                    continue
                elem = d.get(tag)
                if elem is not None:
                    new = _FALLBACK
                    if bytewise:
                        new = self._byte_sequence(elem, tag)
                    if new is _FALLBACK:
                        new = self._walk_sequence(elem, tag, (), out)
                    if new is not None:
                        d[tag] = new

        # 8. Nested path edits: removals, then replacements, in request order.
        for path in plan.remove_paths:
            remove_at(self.ws, out, path)
            sequences.append(path.parents[0][0])
        for path, value in plan.replace_paths:
            # Text fits the character set of the item it lands in (its own, PS3.5 7.5.3).
            replace_at(self.ws, out, path,
                       lambda owner, value=value: build_element(
                           value, little_endian=self.little,
                           encodings=_fitting(owner, _python_encodings(owner))))
            sequences.append(path.parents[0][0])

        # 9. Overlays a 60xx group embeds in the pixel data's unused high bits (anonymization
        # with the profile's overlay removals): cleared like the OverlayData the profile removes.
        if self.tables.clear_embedded_overlays:
            elem = d.get(PIXEL_DATA)
            if elem is not None:
                cleared = _embedded_overlays_cleared(self.source, elem, self.little)
                if cleared is not None:
                    d[PIXEL_DATA] = cleared

        # 10. Free text in the compressed pixel data's codestream headers (JPEG comments, Exif,
        # JPEG 2000 comments): blanked, lengths kept (transforms/codestreams.py).
        if self.tables.blank_codestream_text:
            elem = d.get(PIXEL_DATA)
            raw = type(elem) is RawDataElement
            if elem is not None and isinstance(elem.value, (bytes, bytearray, memoryview)) and (
                    elem.length == _UNDEFINED if raw else elem.is_undefined_length):
                blanked = blanked_pixel_data(elem.value)
                if blanked is not None:  # (encapsulated pixel data is OB, PS3.5 A.4, some say OW)
                    vr = "OB" if elem.VR == "OW" else elem.VR
                    if raw:
                        d[PIXEL_DATA] = _raw(elem.tag, vr, _UNDEFINED, blanked, elem.value_tell,
                                             elem.is_implicit_VR, elem.is_little_endian)
                    else:
                        d[PIXEL_DATA] = new = DataElement(elem.tag, vr, blanked)
                        new.is_undefined_length = True

        # Changed sequences are encoded here, once, and handed to the writer as raw bytes:
        # pydicom's writer would spend tens of microseconds on every nested element.
        if self.implicit is not None:
            source = self.source._dict
            encodings = None
            for tag in set(sequences):
                elem = d.get(tag)
                if type(elem) is DataElement and elem.VR == "SQ" and source.get(tag) is not elem:
                    if encodings is None:
                        encodings = _python_encodings(out)
                    raw = self._raw_sequence(tag, elem, encodings)
                    if raw is not None:
                        d[tag] = raw
        return out

    def _replacement(self, value: Value, encodings: list[str], index: int) -> Any:
        """The element of a top-level replacement, raw in the dataset's encoding if any.

        Replacement values are constants of the plan: their encoded form is cached and the
        (immutable) raw element shared between outputs.
        """
        fitting = _fitting(self.out, encodings)
        if self.implicit is None:
            return self.ws.owned_element(build_element(value, little_endian=self.little,
                                                       encodings=fitting))
        cache_key = (index, self.implicit, self.little, tuple(encodings), tuple(fitting))
        cached = self.replacement_cache.get(cache_key)
        if cached is not None:
            raw, sequence = cached
            return raw if sequence else self.ws.made(raw)
        elem = build_element(value, little_endian=self.little, encodings=fitting)
        sequence = elem.VR == "SQ"
        if sequence:
            raw = self._raw_sequence(value.tag, elem, encodings)
        else:
            raw = _raw_element(elem, self.implicit, self.little, encodings)
        if raw is None:
            return self.ws.owned_element(elem)
        if len(self.replacement_cache) > 1024:
            self.replacement_cache.clear()
        self.replacement_cache[cache_key] = (raw, sequence)
        # A replaced sequence is items for the path edits below it, also in implicit VR, where
        # its raw element has no VR to say so (its edits were dropped: found by a differential
        # fuzz against Orthanc); anything else is not, whatever its bytes hold.
        return raw if sequence else self.ws.made(raw)

    def _raw_sequence(self, tag: int, elem: DataElement,
                      encodings: list[str]) -> RawDataElement | None:
        implicit = bool(self.implicit)
        if implicit and tag not in SQ_TAGS:
            # As raw bytes, pydicom would read an implicit-VR private sequence back as UN
            # before it is written: keep it decoded.
            return None
        body = _encode_items(elem.value, implicit, self.little, encodings)
        # Implicit VR: undefined length (the writer adds the delimiter).
        return RawDataElement(BaseTag(tag), None if implicit else "SQ",
                              _UNDEFINED if implicit else len(body), body, 0, implicit,
                              self.little)

    def _cleared_top(self, tag: int, elem: Any) -> Any:
        """Top-level clearing: a zero-length element of the same VR (SQ: empty sequence)."""
        if type(elem) is RawDataElement and elem.length != _UNDEFINED:
            vr = _cleared_vr(elem, tag)
            if elem.length == 0 and vr == elem.VR:
                return elem
            return _raw(tag, vr, 0, b"", elem.value_tell, elem.is_implicit_VR,
                        elem.is_little_endian)
        vr = _vr_of(elem, tag) or "UN"
        if vr == "SQ" or (type(elem) is RawDataElement and elem.length == _UNDEFINED):
            return DataElement(tag, "SQ", Sequence())
        if " or " in vr:
            vr = vr.split(" or ")[0]
        return DataElement(tag, vr, None)

    def _sync_meta(self, tag: int, elem: Any) -> None:
        meta_tag = _MEDIA_STORAGE.get(tag)
        if meta_tag is None:
            return
        meta = self.out.__dict__.get("file_meta")
        if meta is None:
            return
        value = elem.value if type(elem) is RawDataElement else None
        if type(value) is bytes and value.isascii() and b"\\" not in value:
            text = value.decode("ascii").strip(" \x00")  # as _text_of reads it
        else:
            values = _text_of(elem, self.out)
            text = values[0] if values else ""
        data = text.encode("ascii", "replace")
        if len(data) % 2:
            data += b"\x00"
        # The file meta group is always explicit VR little endian.
        meta_tag = _MEDIA_STORAGE_TAGS[meta_tag]
        meta._dict[meta_tag] = _raw(meta_tag, "UI", len(data), data, 0, False, True)

    # ------------------------------------------------------------------ nested pass

    def _walk_sequence(self, elem: Any, tag: int, parents: tuple,
                       holder: Dataset) -> DataElement | None:
        """The sequence ``elem`` after the nested rules, or None if nothing in it changes.

        Nothing reachable from the input is modified: a raw sequence is parsed into new
        objects, and a changed item of an already decoded sequence is a shallow copy.
        """
        if type(elem) is RawDataElement and not _declared_sequence(elem, tag):
            # Only shaped like items (see _may_hold_items): walked if it really is a run of
            # items, otherwise opaque bytes (an error only past the item limits).
            items = _opaque_items(elem, _character_set(holder), len(parents),
                                  paths.item_allowance(elem.value, self.items_left))
            if items is None:
                return None
            fresh = True
        elif type(elem) is RawDataElement:
            items = None
            allowance = paths.item_allowance(elem.value, self.items_left)
            if elem.VR == "SQ" or (elem.VR is None and elem.is_implicit_VR):
                items = parse_items(elem.value, elem.is_implicit_VR, elem.is_little_endian,
                                    _character_set(holder), len(parents), allowance)
            elif elem.VR == "UN" and elem.length != _UNDEFINED:
                # A sequence written as UN holds implicit VR little endian items (PS3.5
                # 6.2.2) whatever the file's syntax (or, as some writers leave it, explicit VR
                # little endian): pydicom reads them in a big endian file's byte order, one
                # garbage item, and the value used to be copied unread.
                items = _le_items(elem.value or b"", (True, False), _character_set(holder), len(parents),
                                  allowance)  # (an empty value is None: no item)
            if items is None:  # a layout the item scanner leaves to pydicom
                parsed = paths.convert_sequence(elem, tag, _character_set(holder), holder)
                if parsed.VR != "SQ":
                    return None
                items = parsed.value
                _check_walked(len(items), allowance)
            fresh = True
        elif elem.VR == "SQ":
            items, fresh = elem.value, False
        else:
            return None
        if fresh:
            self.items_left -= len(items)
        new_items = None
        for index, item in enumerate(items):
            new = self._walk_item(item, parents + ((tag, index),), fresh)
            if new is not None:
                if new_items is None:
                    new_items = list(items)
                new_items[index] = new
        if new_items is None:
            return None
        return DataElement(tag, "SQ", Sequence(new_items), already_converted=True)

    def _walk_item(self, item: Dataset, parents: tuple, fresh: bool) -> Dataset | None:
        """Orthanc's nested rules on one item: a changed item (``item`` itself when
        ``fresh``, i.e. parsed for this output, else a copy), or None if nothing changes."""
        actions = self.nested_actions
        keep_paths = self.plan.keep_paths
        remove_private = self.plan.remove_private_tags
        range_lo, range_hi = self.range_lo, self.range_hi
        changes: dict[int, Any] | None = None
        for tag, elem in item._dict.items():
            if keep_paths and any(p.matches(parents, tag) for p in keep_paths):
                continue  # a kept element and its whole subtree are untouched
            group = tag >> 16
            if (group in _NOT_NESTED_GROUPS and tag != _NESTED_TRANSFER_SYNTAX) or not tag & 0xFFFF:
                # Groups no data set may hold (the command group's free-text ErrorComment, file
                # meta, the reserved odd groups), written at top level by no writer of ours, and
                # group lengths (retired; one may hold anything): not copied from an item either.
                new = _DELETE
            elif group & 1:
                # Kept private tags still lose what Remove or a removed range names (Orthanc's
                # nested rule 3 applies to every tag, private ones included).
                if remove_private or actions.get(int(tag)) is _DELETE or (
                        range_lo <= group <= range_hi and self.in_range(tag)):
                    new: Any = _DELETE
                elif type(elem) is RawDataElement and elem.VR not in _MAYBE_SQ_VRS:
                    continue
                else:
                    new = self._nested_sequence(elem, tag, parents, item)
            else:
                action = actions.get(int(tag))  # int: a BaseTag key would call its Python __eq__
                if action is None:
                    if range_lo <= group <= range_hi and self.in_range(tag):
                        new = _DELETE
                    elif type(elem) is RawDataElement and elem.VR not in _MAYBE_SQ_VRS:
                        value = elem.value
                        if tag in SQ_TAGS or (type(value) is bytes and value.startswith(_LE_ITEM_START)):
                            _refuse_disguised_sequence(elem, tag)
                        continue
                    else:
                        new = self._nested_sequence(elem, tag, parents, item)
                elif action is _DELETE:
                    new = _DELETE
                elif action is _CLEAR:
                    new = _nested_cleared(tag, elem)
                else:
                    kind = action
                    if kind is _REFERENCED:
                        kind = STUDY if (len(parents) == 2 and (parents[0][0], parents[1][0])
                                         == _RT_STUDY_PARENTS) else INSTANCE  # RT-STRUCT quirk
                    new = self._mapped_element(tag, elem, item, kind)
            if new is not None:
                if changes is None:
                    changes = {}
                changes[tag] = new
        if changes is None:
            return None
        target = item if fresh else shallow_copy(item)
        target_dict = target._dict
        for tag, new in changes.items():
            if new is _DELETE:
                del target_dict[tag]
            else:
                target_dict[tag] = new
        return target

    # ------------------------------------------------------------------ byte-level nested pass
    #
    # The nested pass straight on the bytes of a raw sequence: element headers are read with
    # struct (no Dataset, no RawDataElement for unaffected elements), each tag's action comes
    # from a per-plan cache, and a changed sequence is rebuilt by copying the bytes of
    # unchanged elements and encoding only the changed ones, exactly as ``_encode_items``
    # writes what the object walk (``_walk_sequence``) produces: items with defined lengths,
    # nested changed sequences with defined (explicit VR) or undefined (implicit VR) lengths.
    # Whatever that walk treats in another way (layouts the item scanner leaves to pydicom,
    # explicit UN sequences, non-ASCII identifiers, items whose re-encoding would not be their
    # original bytes: unsorted tags, group lengths, non-zero reserved bytes or delimiter
    # lengths; truncation and runaway nesting, whose errors the object walk reports) raises
    # _Unusual, and the object walk handles the whole top-level sequence.

    def _byte_sequence(self, elem: Any, tag: int) -> Any:
        """The nested pass on a raw top-level sequence: a new raw element, None (unchanged)
        or ``_FALLBACK`` (use the object walk)."""
        implicit = self.implicit
        if type(elem) is not RawDataElement or elem.is_implicit_VR != implicit \
                or elem.is_little_endian != self.little or type(elem.value) is not bytes \
                or not (elem.VR == "SQ" or (elem.VR is None and implicit)):
            return _FALLBACK
        data = elem.value
        values_left = self.values_left
        try:
            body, stop, closed = self._byte_items(data, 0, len(data), (tag,), 1)
        except (_Unusual, InputError, struct.error):
            self.values_left = values_left  # the object walk counts them again
            return _FALLBACK
        if closed and stop + 8 < len(data):
            self.values_left = values_left
            return _FALLBACK  # bytes after the delimiter: the object walk refuses them
        if body is None:
            return None
        if implicit and tag not in SQ_TAGS:
            return _FALLBACK  # kept decoded for the writer (see _raw_sequence)
        return _raw(BaseTag(tag), None if implicit else "SQ",
                    _UNDEFINED if implicit else len(body), body, 0, implicit, self.little)

    def _byte_items(self, data: bytes, pos: int, end: int, ptags: tuple,
                    depth: int) -> tuple[bytes | None, int, bool]:
        """The items from ``pos`` to ``end`` or to a sequence delimiter: (new encoding of all
        items, or None if nothing in them changes; where the walk stopped; whether a
        delimiter stopped it). Elements are walked inline; nested sequences recurse."""
        if depth > _BYTE_MAX_DEPTH:
            raise _Unusual
        implicit = self.implicit
        tag_len, tag_vr_short, long_len, pack_item = self.structs
        vr_table = _VR_TABLE
        cache = self.byte_actions
        sequences_memo = self.sequences_memo
        # What to write if anything changes: runs of unchanged defined-length items as
        # (start, end), copied as they are; runs of unchanged undefined-length items as
        # (array of their body starts and ends,), re-encoded with defined lengths; and
        # (body start, body end, edits) for changed items. No object per unchanged item: a
        # crafted sequence of a million 8-byte items took ~180 bytes per item.
        entries: list[tuple] = []
        run_start = run_end = -1
        bodies: Any = None  # the open run of unchanged undefined-length items
        changed = closed = noncanonical = False
        while pos < end:
            if pos + 8 > end:
                raise _Unusual
            group, element, length = tag_len(data, pos)
            if group == 0xFFFE and element == 0xE0DD:
                closed = True
                break
            if group != 0xFFFE or element != 0xE000:
                raise _Unusual
            item_start = pos
            pos += 8
            body_start = pos
            defined = length != _UNDEFINED
            if defined:
                item_end = pos + length
                if item_end > end:
                    raise _Unusual
            else:
                item_end = end
            edits: list | None = None
            canonical = True  # its unchanged elements re-encode to their original bytes
            last = -1
            while True:  # the item's elements
                if pos >= item_end:
                    if not defined:
                        raise _Unusual  # no item delimiter
                    body_end = pos
                    break
                start = pos
                if pos + 8 > item_end:
                    raise _Unusual
                if implicit:
                    group, element, length = tag_len(data, pos)
                    vr = None
                    pos += 8
                else:
                    group, element, vr_bytes, length = tag_vr_short(data, pos)
                    if group == 0xFFFE:
                        vr = None
                        pos += 8
                    else:
                        vr_info = vr_table.get(vr_bytes)
                        if vr_info is None:
                            raise _Unusual  # an unknown VR
                        vr, is_long = vr_info
                        if is_long:
                            if length:
                                canonical = False  # reserved bytes, written back as zeros
                            if pos + 12 > item_end:
                                raise _Unusual
                            length = long_len(data, pos + 8)[0]
                            pos += 12
                        else:
                            pos += 8
                if group == 0xFFFE:
                    if element == 0xE00D and not defined:
                        body_end = start
                        pos = start + 8
                        break
                    raise _Unusual
                tag = group << 16 | element
                if tag <= last or not element:
                    canonical = False  # re-encoding sorts and drops group lengths
                last = tag
                action = cache.get(tag)
                if action is None:
                    action = self._byte_action(tag)
                if length == _UNDEFINED:
                    if (vr is not None and vr != "SQ") or tag == PIXEL_DATA:
                        raise _Unusual
                    if action is _PLAIN or action is _SEQ_TAG or action is _UNKNOWN:
                        body, stop = self._byte_undefined(data, pos, item_end, tag, ptags,
                                                          depth)
                    elif action is _DELETE or action is _CLEAR:
                        stop = _sequence_end(data, pos, item_end, implicit, self.little,
                                             depth + 1)
                        body = None
                    else:
                        raise _Unusual  # an identifier with undefined length
                    if tag_len(data, stop)[2]:
                        canonical = False  # the delimiter's length, written back as zero
                    pos = stop + 8
                    if action is _DELETE or action is _CLEAR:  # an emptied sequence is deleted
                        encoded = b""
                    elif body is None:
                        continue
                    else:
                        encoded = self._sequence_bytes(tag, body)
                else:
                    value_end = pos + length
                    if value_end > item_end:
                        raise _Unusual
                    if action is _PLAIN:
                        if vr != "SQ":
                            if vr in _OPAQUE_VRS and _item_shaped(data, pos, value_end, tag):
                                # may be items of unknown VR (_opaque_items), or items under a
                                # binary VR (refused by the object walk)
                                raise _Unusual
                            pos = value_end
                            continue
                    elif action is _SEQ_TAG:
                        if vr == "UN":
                            raise _Unusual  # pydicom decides whether it is a sequence
                        if vr is not None and vr != "SQ":
                            if length:
                                raise _Unusual  # a sequence under another VR: the object walk refuses it
                            pos = value_end
                            continue
                    elif action is _UNKNOWN:
                        if vr != "SQ":
                            if _item_shaped(data, pos, value_end, tag):
                                # items of unknown VR, or under another VR (the object walk
                                # walks the first and refuses the second)
                                raise _Unusual
                            pos = value_end
                            continue
                    if action is _PLAIN or action is _SEQ_TAG or action is _UNKNOWN:
                        # Multi-frame objects repeat identical nested sequences: the result
                        # depends only on these bytes, where they are and how deep.
                        memo_key = (tag, ptags, depth, data[pos:value_end])
                        found = sequences_memo.get(memo_key)
                        if found is None:
                            values_left = self.values_left
                            body, stop, closed = self._byte_items(data, pos, value_end, ptags + (tag,), depth + 1)
                            if closed and stop + 8 < value_end:
                                raise _Unusual  # data after the delimiter: the object walk refuses it
                            found = sequences_memo[memo_key] = (body, values_left - self.values_left)
                        elif found[1]:
                            self._spend_values(found[1])  # its mapped values written again
                        body = found[0]
                        pos = value_end
                        if body is None:
                            continue
                        encoded = self._sequence_bytes(tag, body)
                    elif action is _DELETE:
                        pos = value_end
                        encoded = b""
                    else:
                        encoded = self._byte_changed(data, pos, value_end, tag, vr, action,
                                                     ptags)
                        pos = value_end
                        if encoded is None:
                            continue
                if edits is None:
                    edits = []
                edits.append((start, pos, encoded))
            if not canonical:
                noncanonical = True
            if edits is None and defined:
                if item_start != run_end:
                    if run_end >= 0:
                        entries.append((run_start, run_end))
                    run_start = item_start
                run_end = body_end
                bodies = None
                continue
            if run_end >= 0:
                entries.append((run_start, run_end))
                run_start = run_end = -1
            if edits is None:
                if bodies is None:
                    bodies = array("q")
                    entries.append((bodies,))
                bodies.append(body_start)
                bodies.append(body_end)
                continue
            bodies = None
            changed = True
            entries.append((body_start, body_end, edits))
        if not changed:
            return None, pos, closed
        if noncanonical:
            raise _Unusual
        if run_end >= 0:
            entries.append((run_start, run_end))
        parts = []
        for entry in entries:
            if len(entry) == 2:
                parts.append(data[entry[0]:entry[1]])  # written back as they are
                continue
            if len(entry) == 1:
                run = bytearray()
                view = memoryview(data)
                spans = entry[0]
                for i in range(0, len(spans), 2):
                    run += pack_item(0xFFFE, 0xE000, spans[i + 1] - spans[i])
                    run += view[spans[i]:spans[i + 1]]
                parts.append(run)
                continue
            body_start, body_end, edits = entry
            pieces = []
            cursor = body_start
            for edit_start, edit_end, encoded in edits:
                pieces.append(data[cursor:edit_start])
                pieces.append(encoded)
                cursor = edit_end
            pieces.append(data[cursor:body_end])
            body = b"".join(pieces)
            parts.append(pack_item(0xFFFE, 0xE000, len(body)))
            parts.append(body)
        return b"".join(parts), pos, closed

    def _byte_undefined(self, data: bytes, pos: int, end: int, tag: int, ptags: tuple,
                        depth: int) -> tuple[bytes | None, int]:
        """A nested undefined-length sequence from ``pos`` (within ``end``): (new items or
        None, position of its delimiter).

        Memoized like defined-length ones: a walk that went from ``pos`` to a delimiter
        ``stop`` read nothing but those bytes and the delimiter, so identical bytes followed
        by the delimiter pattern, with the delimiter still within ``end``, give the same
        result. Candidates are found by the bytes up to the first delimiter pattern (the
        whole value for a sequence without nested undefined-length ones).
        """
        delimiter = self.delimiter
        first = data.find(delimiter, pos, end)
        memo_key = None
        if first >= 0:
            memo_key = (tag, ptags, depth, data[pos:first])
            for value, body, spent in self.undefined_memo.get(memo_key, ()):
                stop = pos + len(value)
                if stop + 8 <= end and data.startswith(value, pos) \
                        and data.startswith(delimiter, stop):
                    if spent:
                        self._spend_values(spent)  # its mapped values written again
                    return body, stop
        values_left = self.values_left
        body, stop, closed = self._byte_items(data, pos, end, ptags + (tag,), depth + 1)
        if not closed:
            raise _Unusual  # no sequence delimiter
        if memo_key is not None:
            candidates = self.undefined_memo.setdefault(memo_key, [])
            if len(candidates) < 16:
                candidates.append((data[pos:stop], body, values_left - self.values_left))
        return body, stop

    def _sequence_bytes(self, tag: int, body: bytes) -> bytes:
        """A changed nested sequence, as ``_encode_dataset`` writes one."""
        if self.implicit:
            return b"".join((self.headers[0](tag >> 16, tag & 0xFFFF, _UNDEFINED), body,
                             self.headers[0](0xFFFE, 0xE0DD, 0)))
        return self.headers[2](tag >> 16, tag & 0xFFFF, b"SQ", 0, len(body)) + body

    def _element_bytes(self, tag: int, vr: str | None, value: bytes) -> bytes:
        """Header and value of an element, as ``_header`` writes them."""
        implicit_pack, short_pack, long_pack = self.headers
        if self.implicit:
            return implicit_pack(tag >> 16, tag & 0xFFFF, len(value)) + value
        if vr in _LONG_VRS:
            return long_pack(tag >> 16, tag & 0xFFFF, vr.encode("ascii"), 0,  # type: ignore
                             len(value)) + value
        if len(value) > 0xFFFF:
            return long_pack(tag >> 16, tag & 0xFFFF, b"UN", 0, len(value)) + value  # as _header
        return short_pack(tag >> 16, tag & 0xFFFF, vr.encode("ascii"),  # type: ignore
                          len(value)) + value

    def _byte_changed(self, data: bytes, pos: int, end: int, tag: int, vr: str | None,
                      action: Any, ptags: tuple) -> bytes | None:
        """A cleared or mapped element's new bytes (b"": deleted; None: unchanged), as the
        object walk's ``_nested_cleared`` / ``_mapped_element`` and ``_encode_dataset``
        make them."""
        value = data[pos:end]
        implicit = bool(self.implicit)
        if action is not _CLEAR:
            if action is _REFERENCED:
                action = STUDY if ptags == _RT_STUDY_PARENTS else INSTANCE  # RT-STRUCT quirk
            if not value:
                return None
            if not _plain_ascii(value):
                raise _Unusual  # decoded with the item's character set by the object walk
            memo_key = (action, tag, vr, value)
            encoded = self.byte_memo.get(memo_key)
            if encoded is not None and b"\\" in value:
                self._spend_values(value.count(b"\\") + 1)  # written again: counted again
            if encoded is None:
                if b"\\" in value:
                    new = self._mapped_element(
                        tag, _raw(tag, vr, end - pos, value, pos, implicit, self.little),
                        None, action)  # type: ignore[arg-type]
                    if new is None:
                        return None
                    text = new.value
                    new_vr = new.VR
                else:
                    text = value.decode("ascii").strip(" \x00")
                    if not text:
                        return None
                    if action != PATIENT:
                        new_vr, text = "UI", self.map_uid(action, text)
                    elif tag == PATIENT_ID:
                        new_vr, text = "LO", self.key.patient_id(text)
                    else:
                        new_vr, text = "PN", self.key.patient_name(text)
                    text = text.encode("ascii")
                    if len(text) % 2:
                        text += b"\x00" if new_vr == "UI" else b" "
                    new_vr = None if implicit else _mapped_vr(vr, new_vr)  # as _ascii_element
                encoded = self._element_bytes(tag, new_vr, text)
                self.byte_memo[memo_key] = encoded
            return encoded
        new = _nested_cleared(tag, _raw(tag, vr, end - pos, value, pos, implicit, self.little))
        if new is None:
            return None
        if new is _DELETE:
            return b""
        if type(new) is not RawDataElement:
            raise _Unusual
        return self._element_bytes(tag, new.VR, new.value)

    def _byte_action(self, tag: int) -> Any:
        """The nested action for ``tag`` (as ``_walk_item`` decides it), cached per plan."""
        group = tag >> 16
        if (group in _NOT_NESTED_GROUPS and tag != _NESTED_TRANSFER_SYNTAX) or not tag & 0xFFFF:
            action = _DELETE  # as _walk_item
        elif group & 1:  # as _walk_item: private tags are deleted, or only what removals name
            if self.plan.remove_private_tags or self.nested_actions.get(tag) is _DELETE or (
                    self.range_lo <= group <= self.range_hi and self.in_range(tag)):
                action = _DELETE
            else:
                action = None
        else:
            action = self.nested_actions.get(tag)
            if action is None and self.range_lo <= group <= self.range_hi \
                    and self.in_range(tag):
                action = _DELETE
        if action is None:
            if tag in SQ_TAGS:
                action = _SEQ_TAG
            elif not group & 1 and _dict_vr(tag) is None:
                action = _UNKNOWN  # a public tag newer than the dictionary
            else:
                action = _PLAIN
        cache = self.byte_actions
        if len(cache) > 65536:
            cache.clear()
        cache[tag] = action
        return action

    def _nested_sequence(self, elem: Any, tag: int, parents: tuple,
                         holder: Dataset) -> DataElement | None:
        if type(elem) is RawDataElement:
            if not _may_hold_items(elem, tag):
                return None
        elif elem.VR != "SQ":
            return None
        return self._walk_sequence(elem, tag, parents, holder)


def _opaque_items(elem: RawDataElement, charset: Any, depth: int,
                  limit: int | None = None) -> list[Dataset] | None:
    """The items of a value pydicom reads as bytes (a defined-length UN, or an implicit-VR tag
    the dictionary does not know) when those bytes are exactly a run of implicit VR little
    endian items, as PS3.5 6.2.2 encodes a sequence of unknown VR; None for anything else
    (the value is opaque and stays as it is).

    Orthanc leaves such values alone, so a PatientName or a UID nested in an unknown or
    private sequence written as UN survived its anonymization; the nested rules apply to them
    like to any sequence (and the element is written back as SQ when something changed).
    """
    data = elem.value
    if type(data) is not bytes or not data.startswith(_LE_ITEM_START) or elem.length == _UNDEFINED:
        return None
    # An item of undefined length ends the count: its end is its delimiter, found by parsing
    # it (below); such an item used to make the whole value opaque, copied as it was, with a
    # PatientName nested in it.
    count = _items_tiling(data)
    if count is None:
        return None

    def too_many(count: int | None) -> InputError:
        held = f"{count} items (more than {_MAX_OPAQUE_ITEMS})" if count else f"more than {_MAX_OPAQUE_ITEMS} items"
        return InputError(f"({elem.tag >> 16:04X},{elem.tag & 0xFFFF:04X}): a value of unknown VR "
                          f"holding {held}, too many to de-identify", reason="too_large")

    if count > _MAX_OPAQUE_ITEMS:
        # Each item becomes a Dataset (~1 KB for an 8-byte empty item): a few megabytes of
        # them would take gigabytes. Real sequences of unknown VR hold a handful of items.
        raise too_many(count)
    _check_walked(count, limit)
    # Implicit VR as the standard says; explicit VR little endian as some writers leave it
    # (an explicit-VR sequence whose VR alone was lost).
    try:
        # (In an implicit VR file too: a writer that converted an explicit VR file copied the
        # bytes of a sequence it did not know, and a PatientName in them survived.)
        items = _le_items(data, (True, False), charset, depth, _MAX_OPAQUE_ITEMS)
    except InputError as exc:
        if exc.reason == "too_large":
            raise too_many(None) from None
        raise
    if items is None:
        return None  # not (only) items: opaque bytes, as pydicom reads them
    _check_walked(len(items), limit)
    return items


def _le_items(data: bytes, encodings: tuple[bool, ...], charset: Any, depth: int,
              limit: int | None) -> list[Dataset] | None:
    """The little-endian items a value of unknown VR holds, read in implicit VR (``True``
    in ``encodings``) and then explicit VR, or None when neither reads. Data hidden after a
    delimiter and too many items are errors, and so is a tag repeated in an item when no
    encoding reads; anything else only means "not this encoding"."""
    repeated = None
    for implicit in encodings:
        try:
            return _items(data, 0, len(data), implicit, True, charset, depth, limit)
        except _HiddenData:
            raise
        except _RepeatedTag as exc:  # refused unless the other encoding reads (a misparse)
            repeated = repeated or exc
        except InputError as exc:
            if exc.reason == "too_large":
                raise
        except (_Unusual, struct.error):
            pass
    if repeated is not None:
        raise repeated
    return None


def _cleared_vr(elem: RawDataElement, tag: int) -> str | None:
    """The VR an emptied raw element is written with: an explicit UN becomes the dictionary
    VR (as DCMTK writes it), anything else keeps its VR."""
    if elem.VR == "UN" and not elem.is_implicit_VR:
        vr = _dict_vr(tag)
        if vr and vr != "UN" and " or " not in vr:
            return vr
    return elem.VR


def _nested_cleared(tag: int, elem: Any) -> Any:
    """Nested clearing: string VRs emptied, other VRs deleted (as Orthanc does)."""
    vr = _vr_of(elem, tag)
    if vr not in _STRING_VRS:
        return _DELETE
    if type(elem) is RawDataElement:
        cleared_vr = _cleared_vr(elem, tag)
        if elem.length == 0 and cleared_vr == elem.VR:
            return None
        return RawDataElement(tag, cleared_vr, 0, b"", elem.value_tell, elem.is_implicit_VR,
                              elem.is_little_endian)
    if elem.value in ("", None):
        return None
    return DataElement(tag, vr, "")


# ---------------------------------------------------------------------- per-plan tables


class _Tables:
    """What each tag gets, derived once per plan (plans are immutable)."""

    def __init__(self, plan: Plan) -> None:
        uids = plan.uids if plan.is_anonymization else frozenset()
        top: dict[int, Any] = {}
        for tag in uids:
            top[tag] = PATIENT if tag == PATIENT_ID else INSTANCE
        for tag in plan.clearings:
            top[tag] = _CLEAR
        for tag in plan.removals:
            top[tag] = _DELETE
        for tag in plan.keep:
            top[tag] = _KEEP
        for tag in plan.replaced_tags:
            top[tag] = _SKIP
        if PATIENT_NAME in uids:
            top[PATIENT_NAME] = _PSEUDONYM  # step 5 writes the pseudonym
        self.top = top

        nested: dict[int, Any] = {}
        if plan.is_anonymization:
            # Nested PatientName/PatientID are pseudonymized unless the user keeps them.
            nested_uids = uids | ({PATIENT_ID, PATIENT_NAME} - plan.keep)
            for tag in nested_uids:
                nested[tag] = PATIENT if tag in (PATIENT_ID, PATIENT_NAME) else INSTANCE
            if _REFERENCED_SOP_INSTANCE_UID in nested_uids:
                nested[_REFERENCED_SOP_INSTANCE_UID] = _REFERENCED
            nested.update(_HIERARCHY)
            for tag in plan.clearings:
                nested[tag] = _CLEAR
            for tag in plan.removals:
                nested[tag] = _DELETE
        self.nested = nested
        prefix = "anonymize." if plan.is_anonymization else f"modify.{plan.fingerprint}."
        self.namespaces = {kind: prefix + kind for kind in (STUDY, SERIES, INSTANCE)}
        self.range_lo = min((r[0] for r in plan.removed_ranges), default=1)
        self.range_hi = max((r[1] for r in plan.removed_ranges), default=0)
        self.byte_actions: dict[int, Any] = {}  # nested action by tag, filled as tags are met
        for tag, code in _HIERARCHY_CODES.items():
            top.setdefault(tag, code)  # (Remove/Clear/Keep/Replace take precedence)
        self.top_codes = _TopCodes(top, plan)
        # Replacements: (value, key for the dataset, whether the nested pass walks it); their
        # raw elements by (index, implicit VR, little endian, encodings).
        self.replacements = tuple(
            (value, BaseTag(value.tag), plan.is_anonymization and value.vr == "SQ"
             and value != _BASIC_PROFILE_CODE) for value in plan.replacements)
        self.replacement_cache: dict[tuple, tuple[RawDataElement, bool]] = {}  # (raw, is a sequence)
        # Steps 9 and 10 of an anonymization that leaves PixelData to the profile.
        pixels_free = plan.is_anonymization and PIXEL_DATA not in plan.replaced_tags \
            and PIXEL_DATA not in plan.keep
        self.blank_codestream_text = pixels_free
        self.clear_embedded_overlays = pixels_free and plan.keep.isdisjoint(_OVERLAY_DATA_TAGS) and any(
            glo <= 0x6000 <= ghi and elo <= 0x3000 <= ehi for glo, ghi, elo, ehi, *_ in plan.removed_ranges)


class _TopCodes(dict):
    """Top-level action by int tag, filled as tags are met: None (none, but a sequence gets
    the nested pass), _SEQUENCE_TAG and _UNKNOWN_TAG (the same, for a sequence tag of the
    dictionary and a public tag it does not know, in an anonymization), _DELETE (also private tags and removed ranges), _CLEAR, PATIENT,
    INSTANCE, _KEEP, _SKIP, or _NOTHING (a kept private tag: not even the nested pass)."""

    def __init__(self, top: dict[int, Any], plan: Plan) -> None:
        super().__init__()
        self._top = top
        self._plan = plan

    def __missing__(self, tag: int) -> Any:
        plan = self._plan
        group, element = tag >> 16, tag & 0xFFFF
        if group & 1:
            if tag in plan.private_keep:
                code = _NOTHING
            else:  # what the request says of this private tag (Remove, Replace), else the default
                code = self._top.get(tag)
                if code is None:
                    code = _DELETE if plan.remove_private_tags else None
        else:
            code = self._top.get(tag)
        if code is None and not group & 1 and any(glo <= group <= ghi and elo <= element <= ehi
                                                  for glo, ghi, elo, ehi in plan.removed_ranges):
            # Every even group of the ranges (5000-50FF, 6000-60FF: the standard's repeating
            # groups 5000-501E / 6000-601E and the even groups above them, which Orthanc
            # removes only when nested): an odd group in those spans is private, kept by
            # KeepPrivateTags at top level as Orthanc keeps it.
            code = _DELETE
        if code is None and plan.is_anonymization and not group & 1:
            # (the VR of these is checked: _refuse_disguised_sequence)
            if tag in SQ_TAGS:
                code = _SEQUENCE_TAG
            elif _dict_vr(tag) is None:
                code = _UNKNOWN_TAG
        if len(self) > 65536:
            self.clear()
        self[tag] = code
        return code


_TABLES: dict[int, tuple[Any, _Tables]] = {}


def _tables(plan: Plan) -> _Tables:
    # Kept beside the plan (by identity), not in it: pickling a plan never carries them.
    cached = _TABLES.get(id(plan))
    if cached is not None and cached[0]() is plan:
        return cached[1]
    tables = _Tables(plan)
    if len(_TABLES) > 64:
        _TABLES.clear()
    _TABLES[id(plan)] = (weakref.ref(plan), tables)
    return tables


_BASIC_PROFILE_CODE = basic_profile_code()


# ---------------------------------------------------------------------- item scanning
#
# Sequences are walked far more often than they change. pydicom parses an item into a Dataset
# through ~20 attribute assignments and decodes every element header in Python objects; this
# scanner reads the headers with struct and leaves every value raw (bytes), which is all the
# nested pass needs. Anything unusual (explicit UN with undefined length, stray delimiters,
# unknown VRs) returns None and the caller lets pydicom parse the sequence.


class _HiddenData(InputError):
    """Bytes after a delimiter inside a value of defined length (see
    :func:`transforms.dicomio.hidden_data_error`): refused, never taken for opaque bytes."""

    def __init__(self, where: str) -> None:
        super().__init__(hidden_data_error(where).args[0], reason="not_dicom")


class _Unusual(Exception):
    """The item scanner met a layout it leaves to pydicom."""


_ITEM_TEMPLATE = dict(Dataset().__dict__)
_BYTE_STRUCTS = {
    little: (struct.Struct(order + "HHL").unpack_from, struct.Struct(order + "HH2sH").unpack_from,
             struct.Struct(order + "L").unpack_from, struct.Struct(order + "HHL").pack)
    for little, order in ((True, "<"), (False, ">"))
}


def parse_items(data: bytes | None, implicit: bool, little: bool, charset: Any,
                depth: int = 0, limit: int | None = None) -> list[Dataset] | None:
    """The items of a raw sequence value as Datasets of raw elements (None: use pydicom).

    Raises:
        InputError: ``truncated`` when a length runs past the value, ``too_deep`` beyond
            64 nested levels, ``too_large`` beyond ``limit`` items.
    """
    if data is None:
        return None
    try:
        return _items(data, 0, len(data), implicit, little, charset, depth, limit)
    except (_Unusual, struct.error):
        return None


def _check_walked(count: int, limit: int | None) -> None:
    if limit is not None and count > limit:
        raise paths.too_many_items()


def _items(data: bytes, pos: int, end: int, implicit: bool, little: bool, charset: Any,
           depth: int, limit: int | None = None) -> list[Dataset]:
    tag_len = _STRUCTS[little][0]
    items = []
    while pos < end:
        group, element, length = tag_len(data, pos)
        tag = group << 16 | element
        if tag == _SEQ_END:
            if pos + 8 < end:
                raise _HiddenData("a sequence of defined length")
            break
        if tag != _ITEM:
            raise _Unusual
        pos += 8
        if length == _UNDEFINED:
            elements, pos = _elements(data, pos, end, implicit, little, depth, True)
            if pos >= end:
                raise InputError("a sequence item has no end", reason="truncated")
            pos += 8  # the item delimiter
        else:
            if pos + length > end:
                raise InputError("a sequence item runs past the end of its sequence",
                                 reason="truncated")
            elements, stop = _elements(data, pos, pos + length, implicit, little, depth, True)
            if stop + 8 < pos + length:
                raise _HiddenData("a sequence item of defined length")
            pos += length
        item = object.__new__(Dataset)
        attrs = item.__dict__
        attrs.update(_ITEM_TEMPLATE)
        attrs["_dict"] = elements
        attrs["_private_blocks"] = {}
        attrs["_pixel_id"] = {}
        attrs["_pixel_array_opts"] = {"use_pdh": False}
        attrs["_parent_encoding"] = charset
        attrs["_read_charset"] = charset
        attrs["_read_implicit"] = implicit
        attrs["_read_little"] = little
        if "_is_implicit_VR" in attrs:
            attrs["_is_implicit_VR"] = implicit
            attrs["_is_little_endian"] = little
        attrs["is_undefined_length_sequence_item"] = length == _UNDEFINED
        items.append(item)
        if limit is not None and len(items) > limit:
            raise paths.too_many_items()
    return items


def _elements(data: bytes, pos: int, end: int, implicit: bool, little: bool, depth: int,
              collect: bool) -> tuple[dict, int]:
    """Raw elements from ``pos`` to ``end`` or to an item delimiter (whose position is
    returned)."""
    if depth > _MAX_DEPTH:
        raise InputError(f"sequences nested more than {_MAX_DEPTH} levels deep",
                         reason="too_deep")
    tag_len, tag_vr_short, long_len = _STRUCTS[little]
    elements: dict = {}
    while pos < end:
        if implicit:
            group, element, length = tag_len(data, pos)
            vr = None
            value_pos = pos + 8
        else:
            group, element, vr_bytes, length = tag_vr_short(data, pos)
            if group == 0xFFFE:
                length = tag_len(data, pos)[2]
                vr = None
                value_pos = pos + 8
            else:
                vr = vr_bytes.decode("latin-1")
                if vr not in _KNOWN_VRS:
                    raise _Unusual
                if vr in _LONG_VRS:
                    length = long_len(data, pos + 8)[0]
                    value_pos = pos + 12
                else:
                    value_pos = pos + 8
        tag = group << 16 | element
        if tag == _ITEM_END:
            return elements, pos
        if group == 0xFFFE:
            raise _Unusual
        if length == _UNDEFINED:
            if vr == "UN" or tag == PIXEL_DATA:
                raise _Unusual  # implicit-VR content inside UN, or encapsulated fragments
            stop = _sequence_end(data, value_pos, end, implicit, little, depth + 1)
            if collect:
                btag = BaseTag(tag)
                if btag in elements:
                    raise _repeated(tag)
                elements[btag] = RawDataElement(btag, "SQ", _UNDEFINED, data[value_pos:stop],
                                                value_pos, implicit, little)
            pos = stop + 8
        else:
            pos = value_pos + length
            if pos > end:
                raise InputError("an element runs past the end of its sequence item",
                                 reason="truncated")
            if collect:
                btag = BaseTag(tag)
                if btag in elements:
                    raise _repeated(tag)
                elements[btag] = RawDataElement(btag, vr, length, data[value_pos:pos],
                                                value_pos, implicit, little)
    return elements, pos


class _RepeatedTag(InputError):
    """A tag twice in one item (PS3.5 7.1 allows one): readers disagree on which copy counts
    (DCMTK keeps the first, pydicom the last), and the copy a reader of ours would not see was
    copied with the item, a PatientName in it. Refused, never taken for opaque bytes."""


def _repeated(tag: int) -> InputError:
    return _RepeatedTag(f"a sequence item holds element ({tag >> 16:04X},{tag & 0xFFFF:04X}) twice",
                        reason="invalid_value")


def _sequence_end(data: bytes, pos: int, end: int, implicit: bool, little: bool,
                  depth: int) -> int:
    """Position of the delimiter closing the undefined-length sequence starting at ``pos``."""
    if depth > _MAX_DEPTH:
        raise InputError(f"sequences nested more than {_MAX_DEPTH} levels deep",
                         reason="too_deep")
    tag_len = _STRUCTS[little][0]
    while True:
        if pos + 8 > end:
            raise InputError("a sequence runs past the end of its value", reason="truncated")
        group, element, length = tag_len(data, pos)
        tag = group << 16 | element
        if tag == _SEQ_END:
            return pos
        if tag != _ITEM:
            raise _Unusual
        pos += 8
        if length == _UNDEFINED:
            _, pos = _elements(data, pos, end, implicit, little, depth, False)
            pos += 8
        else:
            pos += length


# ---------------------------------------------------------------------- encoding

_SEQUENCE_DELIMITER = {True: b"\xfe\xff\xdd\xe0", False: b"\xff\xfe\xe0\xdd"}
_HEADER_PACKERS = {
    little: (struct.Struct(order + "HHL").pack, struct.Struct(order + "HH2sH").pack,
             struct.Struct(order + "HH2sHL").pack)
    for little, order in ((True, "<"), (False, ">"))
}


def _header(tag: int, vr: str | None, length: int, implicit: bool, little: bool) -> bytes:
    """An element's header. A value too long for its explicit VR's 16-bit length (a mapped
    multi-valued UID can be 20 times its original) is written as UN, as CP 1066 added to
    PS3.5 6.2.2 and as pydicom's writer does."""
    order = "<" if little else ">"
    group, element = tag >> 16, tag & 0xFFFF
    if implicit:
        return struct.pack(order + "HHL", group, element, length)
    if vr in _LONG_VRS:
        return struct.pack(order + "HH2sHL", group, element, vr.encode("ascii"), 0, length)  # type: ignore[union-attr]
    if length > 0xFFFF:
        return struct.pack(order + "HH2sHL", group, element, b"UN", 0, length)
    return struct.pack(order + "HH2sH", group, element, vr.encode("ascii"), length)  # type: ignore[union-attr]


def _encode_items(items: Any, implicit: bool, little: bool, encodings: list[str]) -> bytes:
    """Sequence items, each with a defined length (as DCMTK writes them)."""
    order = "<" if little else ">"
    item_tag = struct.pack(order + "HH", 0xFFFE, 0xE000)
    parts = []
    for item in items:
        body = _encode_dataset(item, implicit, little, encodings)
        parts.append(item_tag + struct.pack(order + "L", len(body)) + body)
    return b"".join(parts)


def _encode_dataset(ds: Dataset, implicit: bool, little: bool, encodings: list[str]) -> bytes:
    """One item's elements: raw ones copied with a new header, others through pydicom."""
    elements = ds._dict
    if SPECIFIC_CHARACTER_SET in elements:
        encodings = _python_encodings(ds)
    delimiter = struct.pack(("<" if little else ">") + "HHL", 0xFFFE, 0xE0DD, 0)
    parts = []
    shadow = None
    for tag in sorted(elements):
        if tag & 0xFFFF == 0:
            continue  # group lengths are not written (pydicom and DCMTK drop or recompute them)
        elem = elements[tag]
        if type(elem) is RawDataElement and elem.is_implicit_VR == implicit \
                and elem.is_little_endian == little and elem.value is not None \
                and (implicit or elem.VR is not None):
            if elem.length == _UNDEFINED:
                parts.append(_header(tag, elem.VR, _UNDEFINED, implicit, little))
                parts.append(elem.value)
                parts.append(delimiter)
            else:
                parts.append(_header(tag, elem.VR, len(elem.value), implicit, little))
                parts.append(elem.value)
        elif type(elem) is DataElement and elem.VR == "SQ":
            body = _encode_items(elem.value, implicit, little, encodings)
            if implicit:  # only an undefined length tells readers an unknown tag is a sequence
                parts.append(_header(tag, None, _UNDEFINED, True, little))
                parts.append(body)
                parts.append(delimiter)
            else:
                parts.append(_header(tag, "SQ", len(body), False, little))
                parts.append(body)
        else:
            if shadow is None:
                shadow = _shadow(ds)
            parts.append(_pydicom_element(shadow, elem, implicit, little, encodings))
    return b"".join(parts)


def _shadow(ds: Dataset) -> Dataset:
    """A data set sharing ``ds``'s elements in a dict of its own: pydicom's conversions look
    up private creators and PixelRepresentation through ``ds[tag]``, which converts a raw
    element in place; an unchanged input item re-encoded in another syntax was so modified."""
    shadow = object.__new__(Dataset)
    shadow.__dict__.update(ds.__dict__)
    shadow.__dict__["_dict"] = dict(ds._dict)
    shadow.__dict__["_private_blocks"] = {}
    return shadow


def _pydicom_element(ds: Dataset | None, elem: Any, implicit: bool, little: bool,
                     encodings: list[str]) -> bytes:
    if type(elem) is RawDataElement:
        try:
            elem = convert_raw_data_element(elem, encoding=encodings, ds=ds)
        except Exception:  # noqa: BLE001 - pydicom's messages quote the value: name the tag only
            tag = int(elem.tag)
            raise InputError(f"({tag >> 16:04X},{tag & 0xFFFF:04X}) cannot be re-encoded: its value "
                             "does not fit its VR", reason="invalid_value") from None
    if " or " in (elem.VR or "") and ds is not None:
        elem = correct_ambiguous_vr_element(elem, ds, little)
    fp = DicomBytesIO()
    fp.is_little_endian = little
    fp.is_implicit_VR = implicit
    write_data_element(fp, elem, encodings)
    return fp.getvalue()


def _raw_element(elem: DataElement, implicit: bool, little: bool,
                 encodings: list[str]) -> RawDataElement | None:
    """``elem`` encoded once by pydicom and kept as a raw element (None if not possible)."""
    if " or " in (elem.VR or ""):
        return None
    encoded = _pydicom_element(None, elem, implicit, little, encodings)
    if implicit:
        offset = 8
    else:
        vr = encoded[4:6].decode("ascii")
        offset = 12 if vr in _LONG_VRS else 8
        if vr != elem.VR:
            return None  # pydicom changed the VR (e.g. a too long value became UN)
    value = encoded[offset:]
    return RawDataElement(BaseTag(elem.tag), elem.VR, len(value), value, 0, implicit, little)
