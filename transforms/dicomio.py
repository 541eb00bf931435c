"""Reading and writing DICOM bytes: safe on hostile input, fast on the common path.

``read_dataset(data)`` parses lazily (pydicom keeps undecoded ``RawDataElement`` values) and
classifies bad input into the audit's reason codes. It remembers where each top-level element
lies in ``data``. ``write_dataset(ds)`` then emits every top-level element that is still the
very object read from the file as a slice of the original bytes, and encodes only what the
engine replaced. This is what keeps de-identification near plain-copy speed: pydicom's own
writer spends ~40 us per element even on raw ones, and the engine touches only a handful.

A fresh file meta group is always written (as Orthanc does): MediaStorageSOPClassUID and
MediaStorageSOPInstanceUID follow the data set's SOPClassUID and SOPInstanceUID (without a
SOPClassUID, ``GENERIC_FILE_SOP_CLASS``), the preamble
is zeroed, group-length elements are dropped, and the original meta-only fields (source AE
title, private meta elements) are not carried over.
"""

from __future__ import annotations

import logging
import os
import re
import struct
import uuid
import zlib
from array import array
from bisect import bisect_left
from io import BytesIO
from itertools import compress, islice
from operator import is_not, lt
from typing import Any

from pydicom import config as _pydicom_config
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.charset import convert_encodings, default_encoding as _DEFAULT_CHARSET
from pydicom.tag import BaseTag
from pydicom.errors import InvalidDicomError
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_partial
from pydicom.filewriter import correct_ambiguous_vr_element, write_data_element
from pydicom.filewriter import write_dataset as _pydicom_write_dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    UID,
)
from pydicom.valuerep import PersonName

from transforms import __version__
from transforms import values as _values  # noqa: F401 - its ISO_IR 13 encoder is pydicom's from now on
from transforms.errors import InputError
from transforms.paths import BYTES_PER_ITEM, MAX_WALKED_ITEMS, convert_sequence
from transforms.tags import SQ_TAGS  # how implicit VR sequences are known

# Raw VRs whose explicit-VR header carries a 4-byte length (PS3.5 7.1.2).
_LONG_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"})
_LONG_VR_BYTES = frozenset(vr.encode("ascii") for vr in _LONG_VRS)

#: Our implementation class UID: a UUID-derived UID under 2.25 (PS3.5 B.2), fixed forever.
IMPLEMENTATION_CLASS_UID = "2.25." + str(uuid.uuid5(uuid.NAMESPACE_URL, "https://dicom-deid/implementation").int)
IMPLEMENTATION_VERSION_NAME = ("DICOMDEID_" + __version__.replace(".", ""))[:16]

# \Z, not $: "$" also matches before a trailing newline (as _UID_LAX_BYTES_RE below).
_UID_RE = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*\Z")
_UID_LAX_RE = re.compile(r"[0-9]+(\.[0-9]+)*\Z")
#: The VRs whose values are text (what a UID, a name or a pseudonym can be stored as).
STRING_VRS = frozenset("AE AS CS DA DS DT IS LO LT PN SH ST TM UC UI UR UT".split())
#: The raw VRs a main UID is read from: text, UN, or none (implicit VR).
_UID_VRS = STRING_VRS | {"UN", None}
#: Identifiers every instance must carry (Orthanc refuses to store a file without them).
REQUIRED_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
_REQUIRED_UID_TAGS = tuple((k, tag_for_keyword(k)) for k in REQUIRED_UIDS)
_UID_LAX_BYTES_RE = re.compile(rb"^[0-9]+(\.[0-9]+)*\Z")

_SOURCE_ATTR = "_deid_source"

# pydicom's value-validation warnings quote element values (patient data) into warnings and
# its log: validation of values read from files is off, and its logger only reports errors
# without values. Values we create are validated by transforms.values with our own messages.
_pydicom_config.settings.reading_validation_mode = _pydicom_config.IGNORE
_pydicom_config.settings.writing_validation_mode = _pydicom_config.IGNORE
logging.getLogger("pydicom").setLevel(logging.CRITICAL)
_DICM_OFFSET = 128

#: The most bytes a deflated data set may inflate to (``--max-bytes``' default): deflate packs
#: zeros about 1,000 to 1; a 1.4 MB file held a 1.5 GB element.
MAX_INFLATED_BYTES = 2 << 30
#: The most top-level elements (repeats included) a data set may have. Each becomes an object of
#: ~200 bytes however short it is: 10 million 8-byte elements (an 80 MB file, or 117 KB deflated)
#: took 20 s and 600 MB, and the 2 GiB that --max-bytes lets through would have taken tens of
#: gigabytes. Real data sets have a few thousand (the standard's dictionary holds ~5,000 tags).
MAX_ELEMENTS = 1_000_000
_DEFLATED_UID_BYTES = b"1.2.840.10008.1.2.1.99"
#: Where a file meta header's TransferSyntaxUID is looked for when the scanner cannot walk it.
_META_SEARCH_BYTES = 4096


def is_valid_uid(value: str, *, strict: bool = False) -> bool:
    """A UID of digits and dots, at most 64 characters (strict: no leading zeros, PS3.5 9.1)."""
    if not value or len(value) > 64:
        return False
    return bool((_UID_RE if strict else _UID_LAX_RE).match(value))


class _Source:
    """Where each top-level element of a parsed data set lies in the original bytes.

    Two forms. From the fast scanner: the elements in file order (``keys``, ``elems``, the start
    offset of each and the end of the last; element ``i`` spans ``starts[i]`` to ``starts[i+1]``)
    and ``ordered`` when the tags ascend (the normal case), which lets the writer compare the
    output with the source in C-level loops. From pydicom's reader: a ``spans`` dict only.
    """

    __slots__ = ("data", "implicit", "little", "keys", "elems", "starts", "ordered", "_spans", "_key_set",
                 "_specials", "_ints")

    def __init__(self, data: memoryview, implicit: bool, little: bool, *,
                 spans: dict[int, tuple[Any, int, int]] | None = None,
                 keys: list | None = None, elems: list | None = None,
                 starts: list[int] | None = None, ordered: bool = False) -> None:
        self.data = data
        self.implicit = implicit
        self.little = little
        self.keys = keys
        self.elems = elems
        self.starts = starts  # len(keys) + 1 offsets: the last is the end of the last element
        self.ordered = ordered
        self._spans = spans
        self._key_set: frozenset | None = None
        self._specials: list[int] | None = None
        self._ints: list[int] | None = None

    @property
    def spans(self) -> dict[int, tuple[Any, int, int]]:
        """tag -> (element object as read, start, end)."""
        if self._spans is None:
            starts = self.starts
            self._spans = {int(k): (e, starts[i], starts[i + 1])
                           for i, (k, e) in enumerate(zip(self.keys, self.elems))}
        return self._spans

    @property
    def key_set(self) -> frozenset:
        if self._key_set is None:
            self._key_set = frozenset(self.keys)
        return self._key_set

    @property
    def ints(self) -> list[int]:
        """``keys`` as plain ints (ascending when ``ordered``)."""
        if self._ints is None:
            self._ints = array("L", self.keys).tolist()
        return self._ints

    @property
    def specials(self) -> list[int]:
        """Positions (ascending) the writer never copies verbatim: excluded tags (invalid groups
        such as 0000 and 0002, group lengths) and OW-labelled encapsulated pixel data. Found by
        bisection in the ascending tags rather than by visiting every element."""
        if self._specials is None:
            ints = self.ints
            found = set(range(bisect_left(ints, 0x00040000)))  # groups 0000-0003
            for group in (0x0005, 0x0007, 0xFFFF):
                found.update(range(bisect_left(ints, group << 16), bisect_left(ints, (group + 1) << 16)))
            present = set(ints)
            for group_length in set(map((0xFFFF0000).__and__, ints)) & present:
                found.add(bisect_left(ints, group_length))
            pixels = bisect_left(ints, 0x7FE00010)
            if pixels < len(ints) and ints[pixels] == 0x7FE00010 and _encapsulated_as_ow(self.elems[pixels], self):
                found.add(pixels)
            self._specials = sorted(found)
        return self._specials


def _encoding_of(ts: str) -> tuple[bool, bool, bool]:
    """(implicit VR, little endian, deflated) for a transfer syntax UID."""
    if ts == ImplicitVRLittleEndian:
        return True, True, False
    if ts == ExplicitVRBigEndian:
        return False, False, False
    if ts == DeflatedExplicitVRLittleEndian:
        return False, True, True
    return False, True, False  # every other syntax: explicit little endian (+ encapsulated)


def _syntax_for(implicit: bool, little: bool) -> str:
    if implicit:
        return ImplicitVRLittleEndian
    return ExplicitVRLittleEndian if little else ExplicitVRBigEndian


_BARE_FIRST_GROUPS = frozenset({0x0002, 0x0004, 0x0008, 0x0010, 0x0018, 0x0020})


def looks_like_bare_dataset(data: bytes) -> bool:
    """A file without preamble: accept it only if it starts like a data set (little endian,
    or explicit VR big endian)."""
    if len(data) < 8:
        return False
    vr = data[4:6]
    explicit = b"AA" <= vr <= b"ZZ" and vr.isalpha()
    if explicit and struct.unpack_from(">H", data, 0)[0] in _BARE_FIRST_GROUPS:
        return True  # explicit VR big endian
    group, element = struct.unpack_from("<HH", data, 0)
    if group not in _BARE_FIRST_GROUPS:
        return False
    if explicit:
        return True  # explicit VR
    (length,) = struct.unpack_from("<I", data, 4)
    return length <= len(data) - 8  # implicit VR with a plausible length


def read_dataset(data: bytes, *, check_uids: bool = True, max_inflated: int = MAX_INFLATED_BYTES) -> Dataset:
    """Parse DICOM bytes lazily. Raises :class:`InputError` with an audit reason code.

    Reasons: ``empty``, ``not_dicom``, ``truncated`` (including element lengths that run past
    the end of the file), ``too_deep`` (nesting that exhausts the parser), ``invalid_uid``
    (a missing or malformed Study/Series/SOP Instance or SOP Class UID, when ``check_uids``),
    ``too_large`` (a deflated data set that inflates to more than ``max_inflated`` bytes: a
    megabyte of deflated zeros is a gigabyte inflated; the pipeline passes ``--max-bytes``).
    Messages name the problem, never a value from the file.
    """
    if not data:
        raise InputError("empty file", reason="empty")
    has_marker = len(data) >= _DICM_OFFSET + 4 and data[_DICM_OFFSET : _DICM_OFFSET + 4] == b"DICM"
    if not has_marker and not looks_like_bare_dataset(data):
        raise InputError("not a DICOM file: no DICM marker and no recognisable data set", reason="not_dicom")
    if has_marker:
        fast = _fast_read(data, max_inflated)
        if fast is not None:
            _check_transfer_syntax(fast)
            _check_pixel_data(fast, fragments_checked=True)
            if check_uids:
                check_identifiers(fast)
            return fast
    if has_marker and names_deflated(data) and not _inflates_within(data, max_inflated):
        # pydicom inflates a deflated data set whole, without a bound: only one whose size
        # the scanner has seen goes to it.
        raise InputError("a deflated data set whose file meta header this reader cannot walk", reason="not_dicom")
    _check_pydicom_bounds(data)
    stream = BytesIO(data)
    try:
        ds = _pydicom_read(stream, force=not has_marker)
    except _TooManyElements:
        raise too_many_elements() from None
    except RecursionError:
        raise InputError("sequences nested too deeply to parse", reason="too_deep") from None
    except MemoryError:
        raise InputError("an element is too large to hold in memory", reason="too_large") from None
    except (EOFError, struct.error, OSError) as exc:
        # OSError: pydicom's "No tag to read at file position ..." when a sequence item or
        # delimiter would start past the end of the bytes (an in-memory stream never fails).
        raise InputError(f"file ends inside an element ({type(exc).__name__})", reason="truncated") from None
    except InvalidDicomError:
        raise InputError("not a DICOM file: the file meta header is invalid", reason="not_dicom") from None
    except Exception as exc:  # noqa: BLE001 - whatever pydicom raises on garbage is about the input
        # e.g. ValueError, NotImplementedError (unknown VR), BytesLengthException (a meta
        # element whose length does not fit its VR): the bytes are not a readable data set.
        raise InputError(f"unreadable DICOM structure ({type(exc).__name__})", reason="not_dicom") from None
    if not ds._dict:
        raise InputError("no data elements after the file meta header", reason="not_dicom")
    _check_read_to_the_end(data, stream.tell(), ds)
    _check_transfer_syntax(ds)
    _attach_source(ds, data)  # first: truncation explains missing identifiers
    scanned = _check_structure(ds, data, _DICM_OFFSET + 4 if has_marker else 0)
    if not scanned:
        _check_parsed(ds)  # a layout the scanner leaves to pydicom: check what pydicom made of it
    _check_pixel_data(ds, fragments_checked=scanned)
    if check_uids:
        check_identifiers(ds)
    return ds


class _TooManyElements(Exception):
    """Raised from pydicom's reader, past :data:`MAX_ELEMENTS` top-level elements."""


def _pydicom_read(stream: BytesIO, *, force: bool, before_pixels: bool = False,
                  at_pixels: list[bool] | None = None) -> Dataset:
    """``dcmread`` (``stop_before_pixels`` with ``before_pixels``; then ``at_pixels`` receives
    True if it stopped there), stopped (:class:`_TooManyElements`) past :data:`MAX_ELEMENTS`
    top-level elements, which the scanner counts on its own path."""
    count = 0

    def stop_when(tag: Any, vr: Any, length: int) -> bool:  # pydicom calls it per top-level element
        nonlocal count
        if before_pixels and tag in _PIXEL_TAGS:
            if at_pixels is not None:
                at_pixels.append(True)
            return True
        count += 1
        if count > MAX_ELEMENTS:
            raise _TooManyElements
        return False

    return read_partial(stream, stop_when, force=force)


def pydicom_header(data: bytes, *, force: bool) -> tuple[Dataset, bool]:
    """``dcmread(stop_before_pixels=True)`` of ``data`` with the bounds :func:`read_dataset` puts
    on pydicom's reader (sequence items, top-level elements), and whether it stopped at the
    pixel data (else it read to the end of ``data``, or gave up on it: for an element of
    undefined length that ``data`` ends inside, it warns and returns an empty data set). For
    the headers of files the scanner leaves to pydicom."""
    _check_pydicom_bounds(data)
    stream = BytesIO(data)
    at_pixels: list[bool] = []
    try:
        return _pydicom_read(stream, force=force, before_pixels=True, at_pixels=at_pixels), bool(at_pixels)
    except _TooManyElements:
        raise too_many_elements() from None


def _check_pydicom_bounds(data: bytes) -> None:
    """Refuse (``too_large``) bytes whose sequence items pydicom's reader would build beyond what
    de-identification may build (:data:`transforms.paths.MAX_WALKED_ITEMS`, or one per
    ``BYTES_PER_ITEM`` bytes): it parses every item of an undefined-length sequence into an
    object at once, so 8 MB of empty items took 23 s and 735 MB. Each item starts with the item
    tag's 4 bytes, whose count bounds theirs (either byte order)."""
    allowance = max(MAX_WALKED_ITEMS, len(data) // BYTES_PER_ITEM)
    if len(data) // 8 <= allowance:
        return  # an item takes 8 bytes at least
    for item_tag in (b"\xfe\xff\x00\xe0", b"\xff\xfe\xe0\x00"):
        if data.count(item_tag) > allowance:
            raise InputError(f"too many sequence items to read in one file (at most {MAX_WALKED_ITEMS}, "
                             f"or one per {BYTES_PER_ITEM} bytes)", reason="too_large")


def peek(ds: Dataset, keyword_or_tag: str | int) -> Any:
    """The value of a top-level element without converting it in place (None if absent).

    ``ds.get()`` stores the decoded element back into the data set, which would make
    :func:`write_dataset` re-encode it instead of copying its original bytes.
    """
    tag = keyword_or_tag if isinstance(keyword_or_tag, int) else tag_for_keyword(keyword_or_tag)
    elem = ds._dict.get(tag) if tag is not None else None
    if elem is None:
        return None
    if isinstance(elem, RawDataElement):
        elem = convert_raw_data_element(elem, encoding=_character_set(ds), ds=ds)
    return elem.value


def _check_transfer_syntax(ds: Dataset) -> None:
    """Refuse a file meta TransferSyntaxUID that is not a UID: the writer would copy it into
    the output's meta, describing an encoding the body is not in."""
    meta = ds.__dict__.get("file_meta")
    elem = meta._dict.get(0x00020010) if meta is not None else None
    if elem is None:
        return  # no meta syntax: pydicom guessed the encoding, the writer names it
    if elem.VR not in (None, "UI", "UN"):
        # e.g. US (one damaged byte): pydicom decodes it as numbers, and no encoding can be
        # taken from it (the writer would name a list of them as the output's syntax)
        shown = f"VR {elem.VR}" if elem.VR in _KNOWN_VRS else "an invalid VR"
        raise InputError(f"TransferSyntaxUID in the file meta has {shown}, not UI", reason="not_dicom")
    if type(elem) is RawDataElement and type(elem.value) is bytes:  # the usual case, without pydicom
        raw = elem.value.rstrip(b" \0")
        if len(raw) <= 64 and _UID_LAX_BYTES_RE.match(raw):
            return
    try:
        value = peek(meta, 0x00020010)
    except Exception:  # noqa: BLE001 - undecodable
        value = None
    if not isinstance(value, str) or not is_valid_uid(value.strip(" \0")):
        raise InputError("TransferSyntaxUID in the file meta is not a valid UID", reason="invalid_uid")


_NATIVE_SYNTAXES = frozenset({ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian,
                              DeflatedExplicitVRLittleEndian})


#: Standard transfer syntaxes with encapsulated pixel data that pydicom 3.0 does not know
#: (PS3.6 Table A-1, 2024-2025 editions): Encapsulated Uncompressed Explicit VR Little Endian,
#: JPEG XL Lossless, JPEG XL JPEG Recompression, JPEG XL, Deflated Image Frame Compression.
#: Their data sets are Explicit VR Little Endian, as pydicom reads an unknown syntax.
NEWER_ENCAPSULATED_SYNTAXES = frozenset({"1.2.840.10008.1.2.1.98", "1.2.840.10008.1.2.4.110", "1.2.840.10008.1.2.4.111",
                                         "1.2.840.10008.1.2.4.112", "1.2.840.10008.1.2.8.1"})


def _is_encapsulated_syntax(ts: str) -> bool:
    """A transfer syntax known as encapsulated (compressed); unknown ones: False."""
    if ts in NEWER_ENCAPSULATED_SYNTAXES:
        return True
    try:
        return bool(UID(ts).is_encapsulated)
    except ValueError:
        return False


def _check_pixel_data(ds: Dataset, *, fragments_checked: bool) -> None:
    """Encapsulated (undefined-length) PixelData must come with a compressed transfer syntax
    (a file whose meta was lost would be written as native with fragments inside) and be a
    run of items that fills the value exactly: pydicom's fallback reader finds the end of an
    undefined-length value by searching for the delimiter, so damaged fragments would pass
    into an output that does not read back. The fast scanner already walked the items."""
    elem = ds._dict.get(0x7FE00010)
    if type(elem) is not RawDataElement:
        return
    meta = ds.__dict__.get("file_meta")
    ts = None
    if meta is not None and 0x00020010 in meta._dict:
        # a valid UID (_check_transfer_syntax ran first): raw ASCII, or pydicom's value
        ts = _ascii_raw(meta, 0x00020010) or str(peek(meta, 0x00020010)).strip(" \0")
    if elem.length != 0xFFFFFFFF:
        if elem.length and ts is not None and ts not in _NATIVE_SYNTAXES and _is_encapsulated_syntax(ts):
            # Copied as is, the output would claim compressed pixels it does not hold.
            raise InputError("PixelData is not encapsulated but the transfer syntax is a compressed one",
                             reason="not_dicom")
        return
    if ts is None or ts in _NATIVE_SYNTAXES:
        raise InputError("PixelData is encapsulated but the transfer syntax is not a compressed one",
                         reason="not_dicom")
    if fragments_checked or not isinstance(elem.value, (bytes, memoryview)):
        return
    value, head = elem.value, _STRUCTS[elem.is_little_endian][0]
    pos, end = 0, len(value)
    while pos < end:
        if pos + 8 > end:
            raise InputError("file ends inside a pixel data fragment", reason="truncated")
        group, element, length = head(value, pos)
        if (group << 16 | element) != _ITEM or length == 0xFFFFFFFF:
            raise InputError("encapsulated PixelData holds something else than fragment items",
                             reason="not_dicom")
        pos += 8 + length
    if pos != end:
        raise InputError("file ends inside a pixel data fragment", reason="truncated")


#: Media Storage Directory Storage: a DICOMDIR's SOP class.
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"


def _is_media_directory(ds: Dataset) -> bool:
    """A DICOMDIR: directory records, or the Media Storage Directory class in the file meta
    (read without trusting it: a damaged meta element must not raise here)."""
    if 0x00041220 in ds._dict:
        return True
    meta = ds.__dict__.get("file_meta")
    raw = meta._dict.get(0x00020002) if meta is not None else None
    value = getattr(raw, "value", None)
    if isinstance(value, bytes):
        return value.rstrip(b"\0 ") == MEDIA_STORAGE_DIRECTORY.encode()
    return isinstance(value, str) and value.rstrip("\0 ") == MEDIA_STORAGE_DIRECTORY


def check_identifiers(ds: Dataset) -> None:
    """Refuse a data set whose main identifiers are missing or malformed, and a DICOMDIR
    (reason ``dicomdir``: a directory of the other files, not an instance)."""
    if _is_media_directory(ds):
        raise InputError("a media directory (DICOMDIR), not an instance: it lists the other files by their original "
                         "names and holds their patients' data; not copied (make a new one from OUTPUT if needed)",
                         reason="dicomdir")
    for keyword, tag in _REQUIRED_UID_TAGS:
        raw = ds._dict.get(tag)
        if type(raw) is RawDataElement:
            if raw.VR not in _UID_VRS:
                # (a damaged VR: numbers or bytes, which a change of byte order would swap)
                raise InputError(f"{keyword} has VR {raw.VR}, which cannot hold a UID", reason="invalid_uid")
            value = raw.value
            if type(value) is bytes and value:
                # Fast path on the raw bytes (UIDs are ASCII; padding is NUL or space).
                value = value.rstrip(b" \0")
                if _UID_LAX_BYTES_RE.match(value) and len(value) <= 64:
                    continue
        try:
            value = peek(ds, keyword)
        except Exception as exc:  # undecodable raw value
            raise InputError(f"{keyword} cannot be decoded ({type(exc).__name__})", reason="invalid_uid") from None
        if value is None or str(value).strip(" \0") == "":
            raise InputError(f"{keyword} is missing", reason="invalid_uid")
        if not isinstance(value, str) or not is_valid_uid(str(value).strip(" \0")):
            raise InputError(f"{keyword} is not a valid UID (digits and dots, at most 64 characters)", reason="invalid_uid")


def _attach_source(ds: Dataset, data: bytes) -> None:
    """Record element spans and check that the data set covers the file exactly.

    pydicom reads silently short values at the end of a truncated file; comparing the end of
    the last element with the file size is what detects truncation and absurd lengths.
    """
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    implicit, little = ds.original_encoding
    if implicit is None:
        implicit, little = True, True
    first_raw = next((e for e in ds._dict.values() if isinstance(e, RawDataElement)), None)
    if first_raw is not None and (first_raw.is_implicit_VR, first_raw.is_little_endian) != (implicit, little):
        # pydicom read the body in another encoding than the meta announced (it checks the
        # first element and says "Expected explicit VR, but found implicit VR"): the bytes are
        # in the encoding the elements were read with, whatever the data set says.
        implicit, little = first_raw.is_implicit_VR, first_raw.is_little_endian
        ds.set_original_encoding(implicit, little)
    deflated = ts == DeflatedExplicitVRLittleEndian
    starts: list[tuple[int, int, Any]] = []
    end_of_last = None
    for tag, elem in ds._dict.items():
        if isinstance(elem, RawDataElement):
            if elem.VR is None and not elem.is_implicit_VR and tag >> 16 != 0xFFFE:
                # Explicit VR bytes pydicom could not read (it then takes the length as if
                # implicit): garbage, typically a partial element at the end of a damaged file.
                # Copied verbatim it would make an unreadable output.
                raise InputError(f"{_unreadable_element(tag, elem)} has no valid VR in an explicit VR data set",
                                 reason="not_dicom")
            vr_long = elem.VR in _LONG_VRS if elem.VR else False
            header = 8 if elem.is_implicit_VR or not vr_long else 12
            start = elem.value_tell - header
            if elem.length != 0xFFFFFFFF:
                got = len(elem.value) if elem.value is not None else 0
                if got != elem.length:
                    raise InputError(
                        f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) declares more bytes than the file holds",
                        reason="truncated",
                    )
                end_of_last = elem.value_tell + elem.length
            else:
                end_of_last = None  # undefined length: its end is the next element's start
        else:
            tell = getattr(elem, "file_tell", None)
            if tell is None:
                starts = []
                break
            start = tell - (8 if implicit or elem.VR not in _LONG_VRS else 12)
            end_of_last = None
        starts.append((start, tag, elem))
    if deflated or not starts:
        return
    starts.sort(key=lambda s: s[0])
    size = len(data)
    if end_of_last is not None and starts[-1][2] is elem and end_of_last < size and any(data[end_of_last:]):
        # Bytes after the last complete element that pydicom could not read as an element:
        # a partial element header (a truncated file). Zero padding is tolerated.
        raise InputError("file ends inside an element header", reason="truncated")
    view = memoryview(data)
    spans: dict[int, tuple[Any, int, int]] = {}
    for i, (start, tag, elem) in enumerate(starts):
        end = starts[i + 1][0] if i + 1 < len(starts) else size
        if start < 0 or end <= start or not _tag_at(data, start, tag, little):
            return  # layout we do not understand: the writer uses the slow path
        if type(elem) is RawDataElement and elem.length != 0xFFFFFFFF:
            value_end = elem.value_tell + elem.length
        else:  # a value pydicom decoded (a character set, a sequence) or an undefined length
            value_end = _element_end(data, start, int(tag), implicit, little)
            if value_end is None:
                return
        if value_end != end and (i + 1 < len(starts) or any(data[value_end:end])):
            # Bytes between this element and the next one pydicom kept: elements it
            # dropped (a repeated tag keeps one). The span would copy them, unchanged by
            # the request (a second PatientName in the clear): slow path.
            return
        # (value_end, not end: the zero padding tolerated after the last element is not
        # copied. Eight zero bytes or more read as an element of no valid VR, which a file
        # gets past only where an earlier element has that tag (0000,0000) too.)
        spans[int(tag)] = (elem, start, value_end)
    object.__setattr__(ds, _SOURCE_ATTR, _Source(view, implicit, little, spans=spans))


def _element_end(data: bytes, start: int, tag: int, implicit: bool, little: bool) -> int | None:
    """Where the element ``tag`` whose header is at ``start`` ends, read from its header (and,
    for an undefined length, by walking its items or fragments to the delimiter); None when
    that walk fails."""
    try:
        if implicit:
            length = struct.unpack_from("<I" if little else ">I", data, start + 4)[0]
            header = 8
        elif bytes(data[start + 4 : start + 6]) in _LONG_VR_BYTES:
            length = struct.unpack_from("<I" if little else ">I", data, start + 8)[0]
            header = 12
        else:
            return start + 8 + struct.unpack_from("<H" if little else ">H", data, start + 6)[0]
        if length != 0xFFFFFFFF:
            return start + header + length
        return _skip_undefined(data, start + header, len(data), implicit, little, 1, items=tag != 0x7FE00010) + 8
    except (InputError, _GiveUp, struct.error, RecursionError):
        return None


def _check_read_to_the_end(data: bytes, stopped: int, ds: Dataset) -> None:
    """Refuse a file pydicom stopped reading before its end with data left (zero padding
    aside): a stray item delimiter among the top-level elements, after a sequence closed early
    by a damaged item, ends its reading there and everything after it (the pixel data, say)
    would be dropped silently, or copied as part of the last element's bytes into an output
    that does not read back (a mutated DicomSeg.dcm)."""
    rest = len(data) - stopped
    if rest <= 0 or data.count(0, stopped) == rest:
        return
    if stopped >= 8:
        little = ds.original_encoding[1] is not False
        group, element = struct.unpack_from("<HH" if little else ">HH", data, stopped - 8)
        if group == 0xFFFE:
            raise InputError(f"an item or delimiter tag ({group:04X},{element:04X}) stands where a data element "
                             "should be", reason="not_dicom")
    raise InputError(f"the data set ends {rest} bytes before the end of the file", reason="not_dicom")


def _unreadable_element(tag: int, elem: Any) -> str:
    """An element whose VR is not one, for a message: by its tag where the dictionary knows it
    (a damaged VR), else by where its value starts: the reader has lost its place in the bytes,
    and four bytes of a value taken for a tag (text, a name) are not shown."""
    try:
        dictionary_VR(tag)
    except KeyError:
        return f"an element at byte {getattr(elem, 'value_tell', '?')}"
    return f"element ({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _check_parsed(ds: Dataset) -> None:
    """For a data set pydicom read in a layout the scanner gives up on: refuse, at every depth,
    item tags where elements should be and explicit VR elements whose VR pydicom could not
    read (it keeps them with a made-up VR and copies them; the output would not read back).
    Nested sequences the scanner can walk are checked on their bytes; the others are parsed by
    pydicom, without changing ``ds``."""
    stack = [(ds, 0)]
    while stack:
        current, depth = stack.pop()
        for tag, elem in current._dict.items():
            vr = elem.VR
            explicit = not getattr(elem, "is_implicit_VR", True)
            if tag >> 16 == 0xFFFE:
                # An item or delimiter where a data element should be: a wrong item length, or
                # the remains of a sequence or of encapsulated pixel data whose header is gone.
                raise InputError(
                    f"an item or delimiter tag ({tag >> 16:04X},{tag & 0xFFFF:04X}) stands where a data element should be",
                    reason="not_dicom",
                )
            # (An implicit VR element, even inside an explicit VR file, has its VR from the
            # dictionary, e.g. "OB or OW": nothing in its bytes to be damaged.)
            if explicit and (vr is None or vr not in _KNOWN_VRS):
                raise InputError(f"{_unreadable_element(tag, elem)} has no valid VR in an explicit VR data set",
                                 reason="not_dicom")
            undefined = elem.length == 0xFFFFFFFF if type(elem) is RawDataElement else elem.is_undefined_length
            if undefined and vr not in ("SQ", "UN") and tag != 0x7FE00010 and (vr is not None or _not_a_sequence(tag)):
                raise InputError(f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) has VR {vr or dictionary_VR(tag)} "
                                 "and an undefined length", reason="not_dicom")
            if not (vr == "SQ" or (vr is None and tag in SQ_TAGS)) or elem.value is None:
                continue
            value = elem.value
            if type(elem) is RawDataElement and isinstance(value, (bytes, memoryview)):
                try:
                    _check_items(bytes(value), 0, len(value), not explicit, elem.is_little_endian, depth + 1)
                    continue
                except _GiveUp:
                    pass
                try:
                    value = convert_raw_data_element(elem, encoding=_DEFAULT_CHARSET, ds=current).value
                except RecursionError:
                    raise InputError("sequences nested too deeply to parse", reason="too_deep") from None
                except Exception as exc:  # noqa: BLE001 - pydicom cannot read the sequence
                    raise InputError(
                        f"sequence ({tag >> 16:04X},{tag & 0xFFFF:04X}) cannot be read ({type(exc).__name__})",
                        reason="not_dicom",
                    ) from None
            stack.extend((item, depth + 1) for item in value if isinstance(item, Dataset))


def _check_structure(ds: Dataset, data: bytes, pos: int) -> bool:
    """For a data set pydicom read (the fallback path): run the fast path's scanner over its
    bytes, which checks every element header at every depth (and pixel data fragments) and
    raises what the fast path would raise. pydicom is lenient where the scanner is strict (an
    item whose length runs past its sequence, for instance, it reads up to the delimiter), and
    elements we leave unchanged are copied byte for byte into an output that has a file meta,
    whose next read takes the fast path: it would refuse our own output.

    Returns False when the scanner leaves the layout to pydicom (unknown VR bytes and the like,
    a deflated body): :func:`_check_parsed` then checks what pydicom made of it."""
    meta = ds.__dict__.get("file_meta")
    if meta is not None and str(meta.get("TransferSyntaxUID", "")) == DeflatedExplicitVRLittleEndian:
        return False
    implicit, little = ds.original_encoding
    if implicit is None:
        return False
    size = len(data)
    if pos + 8 <= size and struct.unpack_from("<H", data, pos)[0] == 0x0002:
        end = _scan_meta(data, pos, size, {})  # explicit VR little endian whatever the body
        if end is None:
            return False
        pos = end
    try:
        _scan_elements(data, pos, size, implicit, little, 0, {})
    except (_GiveUp, struct.error):
        return False
    return True


def too_many_elements() -> InputError:
    return InputError(f"more than {MAX_ELEMENTS:,} elements in the data set, too many to hold (real data "
                      "sets have a few thousand)", reason="too_large")


def _tag_at(data: bytes, offset: int, tag: int, little: bool) -> bool:
    if offset + 4 > len(data):
        return False
    group, element = struct.unpack_from("<HH" if little else ">HH", data, offset)
    return (group << 16 | element) == tag


# --------------------------------------------------------------------------- fast reading
#
# pydicom's dcmread spends most of its time building Dataset objects for every item of every
# undefined-length sequence and reading the meta group through its general machinery. The
# scanner below only walks element headers: it yields the same RawDataElement objects pydicom
# would (undefined-length sequences stay raw bytes; pydicom decodes them on access with
# convert_SQ), and records each top-level element's byte span at the same time. Anything it
# does not recognise (unknown VR bytes, a misplaced item tag, deflate) makes it give up and
# the caller falls back to dcmread, so its only effect is speed.

_ITEM = 0xFFFEE000
_ITEM_END = 0xFFFEE00D
_SEQ_END = 0xFFFEE0DD
_MAX_DEPTH = 64
_KNOWN_VRS = frozenset(
    "AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV".split()
)


class _GiveUp(Exception):
    """The fast scanner met something it leaves to pydicom."""


def _skip_undefined(
    data: bytes, pos: int, end: int, implicit: bool, little: bool, depth: int, items: bool = False
) -> int:
    """Position of the sequence delimiter that closes the items starting at ``pos``.

    Iterative over items; recursion only for undefined-length items holding undefined-length
    elements, bounded by ``_MAX_DEPTH`` (deeper input is refused as ``too_deep``). With
    ``items`` (a sequence, not encapsulated pixel data), defined-length items are walked too.
    """
    if depth > _MAX_DEPTH:
        raise InputError(f"sequences nested more than {_MAX_DEPTH} levels deep", reason="too_deep")
    head = _STRUCTS[little][0]
    while True:
        if pos + 8 > end:
            raise InputError("file ends inside a sequence", reason="truncated")
        group, element, length = head(data, pos)
        tag = group << 16 | element
        if tag == _SEQ_END:
            return pos
        if tag != _ITEM:
            _refuse_stray_item_tag(group, element)
            raise _GiveUp
        pos += 8
        if length != 0xFFFFFFFF:
            if items:
                _check_item(data, pos, pos + length, end, implicit, little, depth)
            pos += length
            continue
        pos = _scan_elements(data, pos, end, implicit, little, depth, None)  # at the item delimiter
        pos += 8


def _check_items(data: bytes, pos: int, end: int, implicit: bool, little: bool, depth: int) -> None:
    """Walk the items of a defined-length sequence value ``data[pos:end]``: every element
    header in them must be readable (a known VR, a length inside its item, no item tag where
    an element should be), at every depth (in implicit VR, sequences are known by the
    dictionary). Unchanged sequences are copied byte for byte, so an element pydicom could not read
    (a damaged VR, typically) would otherwise pass into the output. Anything unusual gives up
    (pydicom then decides, and :func:`_check_parsed` refuses what it cannot read)."""
    if depth > _MAX_DEPTH:
        raise InputError(f"sequences nested more than {_MAX_DEPTH} levels deep", reason="too_deep")
    head = _STRUCTS[little][0]
    while pos < end:
        if pos + 8 > end:
            raise _GiveUp
        group, element, length = head(data, pos)
        if (group << 16 | element) != _ITEM:
            _refuse_stray_item_tag(group, element)
            if (group << 16 | element) == _SEQ_END and pos + 8 < end:
                raise hidden_data_error("a sequence of defined length")
            raise _GiveUp  # e.g. a sequence delimiter ending a defined length
        pos += 8
        if length == 0xFFFFFFFF:
            pos = _scan_elements(data, pos, end, implicit, little, depth, None) + 8
        else:
            _check_item(data, pos, pos + length, end, implicit, little, depth)
            pos += length
    if pos != end:
        raise _GiveUp


def _refuse_stray_item_tag(group: int, element: int) -> None:
    """Where a sequence's next item starts, a tag of the item group (FFFE) other than an item
    or a delimiter (a damaged item tag) is refused: pydicom warns and reads on, taking what
    follows for elements, and an output re-encoded from that does not read back."""
    if group == 0xFFFE and element not in (0xE000, 0xE00D, 0xE0DD):
        raise InputError(f"a sequence holds the tag (FFFE,{element:04X}) where an item should start", reason="not_dicom")


def _check_item(data: bytes, pos: int, item_end: int, end: int, implicit: bool, little: bool, depth: int) -> None:
    """The elements of one defined-length item fill it exactly."""
    if item_end > end:
        raise InputError("a sequence item runs past the end of its sequence", reason="truncated")
    try:
        stop = _scan_elements(data, pos, item_end, implicit, little, depth, None)
    except InputError as exc:
        if exc.reason != "truncated":
            raise
        raise InputError("an element runs past the end of its sequence item", reason="truncated") from None
    if stop != item_end:
        if stop + 8 < item_end:
            raise hidden_data_error("a sequence item of defined length")
        raise _GiveUp  # an item delimiter ending a defined-length item


def hidden_data_error(where: str) -> InputError:
    """Bytes after a delimiter inside a value of defined length: readers stop at the
    delimiter and never see them (a PatientName hidden there would pass every de-identification
    check and still be in the file), so such a file is refused."""
    return InputError(f"{where} goes on after its delimiter (data that readers skip)", reason="not_dicom")


#: Nesting the fast sequence check walks itself; deeper input goes to the recursive checks.
_FAST_MAX_DEPTH = 32


def _clean_sequence(data: bytes, pos: int, end: int, little: bool, undefined: bool) -> int | None:
    """The explicit-VR sequence value at ``pos`` walked in one loop with an explicit stack,
    for the common case where every header is well formed: its end (``end`` for a defined
    length, the position of the sequence delimiter otherwise), or None at the first thing that
    is not plainly regular, and the caller runs the recursive checks (``_check_items``,
    ``_skip_undefined``), which decide and word the error. So this accepts a subset of what
    they accept; it costs a fraction of their per-item function calls on files with thousands
    of nested items (enhanced multi-frame functional groups, segmentations).
    """
    head = _STRUCTS[little][0]
    tag_vr_short, long_len = _STRUCTS[little][1], _STRUCTS[little][2]
    vr_table = _VR_TABLE
    # The current frame is (kind, limit): 0 defined sequence, 1 undefined sequence, 2 defined
    # item, 3 undefined item; ``limit`` bounds what it may read. Enclosing frames are stacked.
    kind, limit = (1 if undefined else 0), end
    stack: list[tuple[int, int]] = []
    while True:
        if kind < 2:  # a sequence: an item, or the delimiter of an undefined length
            if kind == 0 and pos == limit:
                if not stack:
                    return pos
                kind, limit = stack.pop()
                continue
            if pos + 8 > limit:
                return None
            group, element, length = head(data, pos)
            if group != 0xFFFE:
                return None
            if element == 0xE0DD and kind == 1:
                if not stack:
                    return pos
                pos += 8
                kind, limit = stack.pop()
                continue
            if element != 0xE000:
                return None
            pos += 8
            stack.append((kind, limit))
            if length == 0xFFFFFFFF:
                kind = 3
            elif pos + length > limit:
                return None
            else:
                kind, limit = 2, pos + length
            continue
        # An item: its elements, in a tight loop until the item ends or a sequence starts.
        while True:
            if pos == limit and kind == 2:  # the elements filled the item exactly
                kind, limit = stack.pop()
                break
            if limit - pos < 8:
                return None
            group, element, vr_bytes, length = tag_vr_short(data, pos)
            if group == 0xFFFE:
                if kind == 3 and element == 0xE00D:  # item delimiter
                    pos += 8
                    kind, limit = stack.pop()
                    break
                return None
            info = vr_table.get(vr_bytes)
            if info is None:
                return None
            if info[1]:  # a 4-byte length
                if pos + 12 > limit:
                    return None
                length = long_len(data, pos + 8)[0]
                pos += 12
            else:
                pos += 8
            if length == 0xFFFFFFFF:
                if info[0] != "SQ" or len(stack) >= _FAST_MAX_DEPTH:
                    return None
                stack.append((kind, limit))
                kind = 1  # same limit
                break
            stop = pos + length
            if stop > limit:
                return None
            if length and info[0] == "SQ":
                if len(stack) >= _FAST_MAX_DEPTH:
                    return None
                stack.append((kind, limit))
                kind, limit = 0, stop
                break
            pos = stop


_STRUCTS = {
    little: (
        struct.Struct(order + "HHL").unpack_from,
        struct.Struct(order + "HH2sH").unpack_from,
        struct.Struct(order + "L").unpack_from,
    )
    for little, order in ((True, "<"), (False, ">"))
}
#: VR bytes -> (VR, has a 4-byte length); unknown VR bytes make the scanner give up.
_VR_TABLE = {vr.encode("ascii"): (vr, vr in _LONG_VRS) for vr in _KNOWN_VRS}


def _not_a_sequence(tag: int) -> bool:
    """An implicit VR element with an undefined length that the dictionary knows as something
    else than a sequence (pydicom reads its value up to the next sequence delimiter and keeps
    the undefined length, which an explicit VR short header cannot hold: ``InstanceNumber``
    written as IS with length 0xFFFF). Private and unknown tags are sequences, as in pydicom."""
    if tag in SQ_TAGS or (tag >> 16) & 1:
        return False
    try:
        return dictionary_VR(tag) not in ("SQ", "UN")
    except KeyError:
        return False


def _scan_elements(
    data: bytes, pos: int, end: int, implicit: bool, little: bool, depth: int, out: dict | None
) -> int:
    """Walk elements from ``pos``; at top level (``out`` given) collect RawDataElements.

    Returns the position where it stopped: ``end``, or an item delimiter inside an item.
    """
    tag_len, tag_vr_short, long_len = _STRUCTS[little]
    vr_table = _VR_TABLE
    starts: list[int] | None = [] if out is not None else None
    append = starts.append if starts is not None else None
    counted = out is not None and end - pos > 8 * MAX_ELEMENTS  # as _scan_explicit_top
    while pos < end:
        if end - pos < 8:
            if out is not None and not any(data[pos:end]):
                break  # zero padding after the last element
            raise InputError("file ends inside an element header", reason="truncated")
        if counted and len(starts) >= MAX_ELEMENTS:
            raise too_many_elements()
        start = pos
        if implicit:
            group, element, length = tag_len(data, pos)
            vr = None
            pos += 8
        else:
            group, element, vr_bytes, length = tag_vr_short(data, pos)
            if group == 0xFFFE:  # item / delimiters carry no VR
                length = tag_len(data, pos)[2]
                vr = None
                pos += 8
            else:
                info = vr_table.get(vr_bytes)
                if info is None:
                    raise _GiveUp
                vr, is_long = info
                if is_long:
                    if pos + 12 > end:
                        raise InputError("file ends inside an element header", reason="truncated")
                    length = long_len(data, pos + 8)[0]
                    pos += 12
                else:
                    pos += 8
        if group == 0xFFFE:
            if (group << 16 | element) == _ITEM_END and out is None:
                return start
            if out is not None and depth == 0 and any(data[start + 8:end]):
                # An item or delimiter tag among the top-level elements with data after it:
                # pydicom stops reading there and drops the rest silently (a pixel data, the
                # identifiers), and the element before would be copied with it as its span.
                raise InputError(f"an item or delimiter tag ({group:04X},{element:04X}) stands where a data "
                                 "element should be", reason="not_dicom")
            raise _GiveUp
        value_tell = pos
        if length == 0xFFFFFFFF:
            tag = group << 16 | element
            if tag != 0x7FE00010 and (vr != "SQ" and vr != "UN" if vr is not None else _not_a_sequence(tag)):
                # PS3.5 7.1: only sequences (SQ, or UN holding one) and encapsulated pixel data
                # have an undefined length; DCMTK refuses anything else, so would a reader of ours.
                raise InputError(f"element ({group:04X},{element:04X}) has VR {vr or dictionary_VR(tag)} "
                                 "and an undefined length", reason="not_dicom")
            stop = _skip_undefined(data, pos, end, implicit, little, depth + 1,
                                   vr == "SQ" or (vr is None and tag != 0x7FE00010))
            value = data[pos:stop] if out is not None else None
            pos = stop + 8
            if tag != 0x7FE00010 and vr in (None, "UN", "SQ"):
                vr = "SQ"  # as pydicom: undefined length UN (PS3.5 6.2.2) or implicit SQ
        else:
            if pos + length > end:
                raise InputError(
                    f"element ({group:04X},{element:04X}) declares more bytes than the file holds",
                    reason="truncated",
                )
            if length and (vr == "SQ" or (vr is None and (group << 16 | element) in SQ_TAGS)):
                _check_items(data, pos, pos + length, implicit, little, depth + 1)
            if out is None:
                pos += length
                continue
            if length >= _VIEW_MIN and _binary_value(group << 16 | element, vr):
                value = memoryview(data)[pos : pos + length]  # as _scan_explicit_top: a view
            else:
                value = data[pos : pos + length]
            pos += length
        if out is not None:
            tag = BaseTag(group << 16 | element)
            raw = _tuple_new(RawDataElement, (tag, vr, length, value, value_tell, implicit, little, True, False))
            out[tag] = raw
            append(start)
    if out is not None:
        starts.append(pos)  # the end of the last element
        out["__starts__"] = starts
    return pos


_tuple_new = tuple.__new__


#: BaseTag objects of the tags met so far (public tags repeat in every file; creating a BaseTag
#: costs ~4x a lookup). Bounded: private and odd tags from hostile files do not grow it forever.
_TAGS: dict[int, BaseTag] = {}
_TAGS_MAX = 1 << 16


def _base_tag(value: int) -> BaseTag:
    tag = BaseTag(value)
    if len(_TAGS) < _TAGS_MAX:
        _TAGS[value] = tag
    return tag


#: Large binary values (pixel data, mostly) are kept as views of the file's bytes, not copies:
#: pydicom decodes these VRs without touching the value (``convert_OBvalue``), and the writer
#: copies them from the original bytes anyway. Copying would cost a memcpy and a fresh
#: allocation (page faults) of most of the file for every file.
_VIEW_VRS = frozenset({"OB", "OW", "OF", "OD", "OL", "OV"})
_VIEW_MIN = 1 << 16


def _binary_value(tag: int, vr: str | None) -> bool:
    """Whether a large top-level value is kept as a view (:data:`_VIEW_VRS`); in an implicit VR
    file (``vr`` None) the dictionary's VR decides (pixel data held twice doubled the memory
    of every implicit VR file, the default transfer syntax). A binary VR on a tag the
    dictionary gives only text VRs (a damaged FrameOfReferenceUID of VR OB) is not viewed: the
    code that reads such tags as text expects bytes."""
    if vr is None:
        if tag == 0x7FE00010:
            return True
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            return False
        return vr in _VIEW_VRS or vr == "OB or OW"
    if vr not in _VIEW_VRS:
        return False
    if tag == 0x7FE00010:
        return True
    try:
        known = dictionary_VR(tag)
    except KeyError:
        return True  # a private or unknown tag: as its VR says
    return any(v in _VIEW_VRS for v in known.split(" or "))


def _scan_explicit_top(data: bytes, pos: int, end: int, little: bool, out: dict) -> None:
    """``_scan_elements`` at top level for explicit VR, the common case, with the per-element
    work cut to the minimum (this loop runs for every element of every file). Anything
    unusual (an item tag, an unknown VR, an undefined length, a short tail) is handed to
    ``_scan_elements`` from that element on, so both give the same result."""
    tag_vr_short, long_len = _STRUCTS[little][1], _STRUCTS[little][2]
    vr_table = _VR_TABLE
    starts: list[int] = []
    append = starts.append
    new, raw_type, base_tag, tags = _tuple_new, RawDataElement, BaseTag, _TAGS
    view = memoryview(data)
    limit = end - 12  # room for the longest header: no bounds check per header below
    counted = end - pos > 8 * MAX_ELEMENTS  # else too short to hold that many (8 bytes or more each)
    while pos <= limit:
        group, element, vr_bytes, length = tag_vr_short(data, pos)
        info = vr_table.get(vr_bytes)
        if info is None or group == 0xFFFE:
            break
        if counted and len(starts) >= MAX_ELEMENTS:
            raise too_many_elements()
        vr, is_long = info
        if is_long:
            length = long_len(data, pos + 8)[0]
            value_tell = pos + 12
            if length == 0xFFFFFFFF:  # as _scan_elements: items up to the sequence delimiter
                if vr != "SQ" and vr != "UN" and (group << 16 | element) != 0x7FE00010:
                    raise InputError(f"element ({group:04X},{element:04X}) has VR {vr} and an undefined length",
                                     reason="not_dicom")  # as _scan_elements
                stop = _clean_sequence(data, value_tell, end, little, True) if vr == "SQ" else None
                if stop is None:
                    stop = _skip_undefined(data, value_tell, end, False, little, 1, vr == "SQ")
                append(pos)
                pos = stop + 8
                tag = base_tag(group << 16 | element)
                if vr in ("UN", "SQ") and tag != 0x7FE00010:
                    vr = "SQ"
                # Encapsulated pixel data (megabytes of fragments) stays a view, like _VIEW_VRS;
                # under a VR of text (a damaged file) bytes, as the code reading text expects.
                value = view[value_tell:stop] if tag == 0x7FE00010 and vr in _VIEW_VRS else data[value_tell:stop]
                out[tag] = new(raw_type, (tag, vr, length, value, value_tell, False, little, True, False))
                continue
        else:
            value_tell = pos + 8
        stop = value_tell + length
        if stop > end:
            break  # the general scanner raises the truncation error
        if vr == "SQ" and length:
            if _clean_sequence(data, value_tell, stop, little, False) is None:
                _check_items(data, value_tell, stop, False, little, 1)
        append(pos)
        pos = stop
        tag = tags.get(group << 16 | element)
        if tag is None:
            tag = _base_tag(group << 16 | element)
        if length < _VIEW_MIN or vr not in _VIEW_VRS or (group != 0x7FE0 and not _binary_value(tag, vr)):
            value = data[value_tell:stop]
        else:
            value = view[value_tell:stop]  # a view of the file: see _VIEW_VRS
        out[tag] = new(raw_type, (tag, vr, length, value, value_tell, False, little, True, False))
    if pos < end:
        rest: dict = {}
        _scan_elements(data, pos, end, False, little, 0, rest)
        starts.extend(rest.pop("__starts__"))
        if len(starts) > MAX_ELEMENTS + 1:  # each scan counted its own (the last start is an end)
            raise too_many_elements()
        out.update(rest)  # a tag repeated across the two scans keeps its first position
    else:
        starts.append(pos)
    out["__starts__"] = starts


_META_HEADER = struct.Struct("<HH2sH").unpack_from
_META_LONG = struct.Struct("<L").unpack_from


def _scan_meta(data: bytes, pos: int, size: int, out: dict) -> int | None:
    """Raw elements of the group 0002 elements from ``pos`` into ``out``; returns where the
    group ends, or None for a layout left to pydicom (an item tag, an unknown VR, an
    undefined length, an element running past the end)."""
    new, raw_type, base_tag = _tuple_new, RawDataElement, BaseTag
    vr_table = _VR_TABLE
    while pos + 8 <= size:
        group, element, vr_bytes, length = _META_HEADER(data, pos)
        if group != 0x0002:
            break
        info = vr_table.get(vr_bytes)
        if info is None:
            return None
        vr, is_long = info
        if is_long:
            if pos + 12 > size:
                return None
            length = _META_LONG(data, pos + 8)[0]
            value_tell = pos + 12
        else:
            value_tell = pos + 8
        pos = value_tell + length
        if length == 0xFFFFFFFF or pos > size:
            return None
        tag = base_tag(0x00020000 | element)
        out[tag] = new(raw_type, (tag, vr, length, data[value_tell:pos], value_tell, False, True, True, False))
    return pos


#: The instance attributes pydicom's constructors set (``Dataset()`` costs ~7 us, mostly in its
#: ``__setattr__``); dict values are per-instance state and are copied for each new data set.
_TEMPLATES = {cls: dict(cls().__dict__) for cls in (Dataset, FileMetaDataset)}
_MUTABLE = {cls: [k for k, v in t.items() if isinstance(v, dict)] for cls, t in _TEMPLATES.items()}


def _new_dataset(cls: type, elements: dict) -> Any:
    """``cls(elements)`` for a ``Dataset`` or ``FileMetaDataset``, without the constructor."""
    obj = object.__new__(cls)
    attrs = obj.__dict__
    attrs.update(_TEMPLATES[cls])
    for name in _MUTABLE[cls]:
        attrs[name] = dict(attrs[name])
    attrs["_dict"] = elements
    return obj


def _inflate(deflated: bytes, max_inflated: int) -> bytes:
    """A raw deflate stream inflated, refusing (``too_large``) more than ``max_inflated`` bytes."""
    try:
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        data = inflater.decompress(deflated, max_inflated + 1)
        if len(data) <= max_inflated and not inflater.unconsumed_tail:
            data += inflater.flush()
        if len(data) > max_inflated or inflater.unconsumed_tail:
            raise InputError(f"the deflated data set inflates to more than {max_inflated} bytes (--max-bytes)",
                             reason="too_large")
        return data
    except zlib.error:
        raise InputError("the deflated data set cannot be inflated", reason="truncated") from None


def names_deflated(head: bytes) -> bool:
    """Whether the file meta header in a Part 10 file's first bytes may name the deflated
    transfer syntax (its UID within the first bytes after the preamble): pydicom's reader,
    which inflates without a bound, must not be given such a file (:func:`read_dataset` is)."""
    return _DEFLATED_UID_BYTES in head[_DICM_OFFSET : _DICM_OFFSET + _META_SEARCH_BYTES]


def inflated_size(ds: Dataset) -> int:
    """The bytes a deflated input's data set took once inflated (0 for any other input): what
    it holds in memory beyond the file's own bytes."""
    if transfer_syntax_of(ds) != DeflatedExplicitVRLittleEndian:
        return 0
    source = getattr(ds, _SOURCE_ATTR, None)
    return len(source.data) if source is not None else 0


def _inflates_within(data: bytes, max_inflated: int) -> bool:
    """Whether a file naming the deflated syntax in its meta header was inflated by the scanner
    (its meta header walked, its size checked): only then may pydicom read it."""
    meta: dict = {}
    try:
        meta_end = _scan_meta(data, _DICM_OFFSET + 4, len(data), meta)
    except struct.error:
        return False
    ts_raw = meta.get(0x00020010)
    if meta_end is None or ts_raw is None:
        return False
    if ts_raw.value.decode("ascii", "replace").strip(" \0") != DeflatedExplicitVRLittleEndian:
        return True  # the UID stood elsewhere in the meta header: not a deflated file
    _inflate(data[meta_end:], max_inflated)  # (raises when it is too large)
    return True


def _fast_read(data: bytes, max_inflated: int = 0) -> Dataset | None:
    """The data set of a Part 10 file (with ``DICM``), or None to let pydicom read it; a
    deflated data set is inflated up to ``max_inflated`` bytes (default
    :data:`MAX_INFLATED_BYTES`)."""
    size = len(data)
    pos = _DICM_OFFSET + 4
    meta: dict = {}
    try:
        # Group 0002: explicit VR little endian, up to the first element of another group.
        meta_end = _scan_meta(data, pos, size, meta)
        if meta_end is None:
            return None
        ts_raw = meta.get(0x00020010)
        if ts_raw is None or not ts_raw.value:
            return None
        ts = ts_raw.value.decode("ascii", "replace").strip(" \0")
        implicit, little, deflated = _encoding_of(ts)
        if deflated:
            # The data set is a raw deflate stream: scan (and later copy from) its inflation.
            data = _inflate(data[meta_end:], max_inflated or MAX_INFLATED_BYTES)
            meta_end, size = 0, len(data)
        elements: dict = {}
        if implicit:
            _scan_elements(data, meta_end, size, implicit, little, 0, elements)
        else:
            _scan_explicit_top(data, meta_end, size, little, elements)
    except _GiveUp:
        return None
    except struct.error:
        return None
    starts = elements.pop("__starts__")
    if not elements:
        raise InputError("no data elements after the file meta header", reason="not_dicom")
    ds = _new_dataset(Dataset, elements)
    ds.__dict__["file_meta"] = _new_dataset(FileMetaDataset, meta)  # what the validating setter stores
    charset = _DEFAULT_CHARSET
    raw_charset = elements.get(0x00080005)
    if raw_charset is not None:
        try:
            text = raw_charset.value.decode("ascii")  # CS: ASCII, else pydicom decides below
            values = [v.strip(" \0") for v in text.split("\\")]
            charset = convert_encodings(values[0] if len(values) == 1 else values)
        except Exception:
            try:
                charset = convert_encodings(convert_raw_data_element(raw_charset).value)
            except Exception:
                charset = _DEFAULT_CHARSET
    ds.set_original_encoding(implicit, little, charset)
    keys = list(elements)
    ints = array("L", keys).tolist()
    # Ascending tags, each once (a repeated tag would leave fewer keys than starts).
    ordered = len(keys) + 1 == len(starts) and all(map(lt, ints, islice(ints, 1, None)))
    source = _Source(memoryview(data), implicit, little, keys=keys, elems=list(elements.values()),
                     starts=starts, ordered=ordered)
    source._ints = ints
    if not ordered:
        source.keys = source.elems = None
        source._spans = {}
        if len(keys) + 1 == len(starts):
            source._spans = {i: (e, starts[n], starts[n + 1])
                             for n, (i, e) in enumerate(zip(ints, elements.values()))}
        else:  # a repeated tag: spans of the elements kept in the dict are unknown
            source = None
    if source is not None:
        object.__setattr__(ds, _SOURCE_ATTR, source)
    return ds


#: The tags pydicom's ``stop_before_pixels`` stops at (float, double float and plain pixel data).
_PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})

#: :func:`header_end`'s answer when the bytes end before the pixel data: read more.
NEED_MORE = -1


def header_end(head: bytes, *, complete: bool) -> int | None:
    """Where the header of a Part 10 file ends in its first bytes ``head``: the offset of its
    pixel data element (or of the end, for a ``complete`` file without one). :data:`NEED_MORE`
    when ``head`` ends first; None for a file the caller leaves to pydicom (no ``DICM``
    marker, a deflated data set, an item tag or an element whose end cannot be read).

    The walk reads only element headers (and the items of undefined-length sequences), so a
    header is found without parsing a value.
    """
    size = len(head)
    if size < _DICM_OFFSET + 4:
        return NEED_MORE if not complete else None
    if head[_DICM_OFFSET : _DICM_OFFSET + 4] != b"DICM":
        return None
    meta: dict = {}
    try:
        pos = _scan_meta(head, _DICM_OFFSET + 4, size, meta)
    except struct.error:
        pos = None
    ts_raw = meta.get(0x00020010)
    if pos is None or pos + 8 > size or ts_raw is None or not ts_raw.value:
        # Cut inside the meta group (or no data set after it): more bytes may help.
        return NEED_MORE if not complete else None
    implicit, little, deflated = _encoding_of(ts_raw.value.decode("ascii", "replace").strip(" \0"))
    if deflated:
        return None
    tag_at = struct.Struct("<HH" if little else ">HH").unpack_from
    while pos + 8 <= size:
        group, element = tag_at(head, pos)
        tag = group << 16 | element
        if tag in _PIXEL_TAGS:
            return pos
        if group == 0xFFFE:
            return None
        end = _element_end(head, pos, tag, implicit, little)
        if end is None or end > size:
            return NEED_MORE if not complete else None
        pos = end
    if complete and not any(head[pos:]):
        return pos  # no pixel data (a structured report, a presentation state)
    return NEED_MORE if not complete else None


def read_header_bytes(head: bytes, *, complete: bool) -> Dataset | int | None:
    """The data set of a Part 10 file up to its pixel data, read by the project's scanner from
    the file's first bytes: what ``dcmread(stop_before_pixels=True)`` gives, in less than half
    its time (split/merge reads the header of every file of an archive). :data:`NEED_MORE`
    when ``head`` ends before the pixel data; None for a layout left to pydicom (see
    :func:`header_end`) or bytes the scanner refuses (pydicom decides what they are). The
    identifiers are not checked.
    """
    end = header_end(head, complete=complete)
    if end is None or end == NEED_MORE:
        return end
    try:
        return _fast_read(bytes(head[:end]))
    except Exception:  # noqa: BLE001 - whatever the scanner refuses, pydicom's reader decides
        return None


def shallow_copy(ds: Dataset) -> Dataset:
    """A new Dataset sharing the (immutable) element objects of ``ds``.

    Replacing or deleting elements of the copy leaves ``ds`` untouched; unchanged elements
    remain the very objects read from the file, so :func:`write_dataset` copies their bytes.
    Elements that are mutable (decoded sequences) must be copied before being changed.
    """
    # What ``Dataset(dict(ds._dict))``, the ``file_meta`` setter and ``set_original_encoding``
    # would store, without their Python-level attribute hooks (~21 us -> ~6 us per file).
    new = _new_dataset(Dataset, dict(ds._dict))
    attrs = new.__dict__
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        attrs["file_meta"] = _new_dataset(FileMetaDataset, dict(meta._dict))
    implicit, little = ds.original_encoding
    if implicit is not None:
        attrs["_read_implicit"] = implicit
        attrs["_read_little"] = little
        charset = ds.original_character_set
        if charset is not None:
            attrs["_read_charset"] = charset
    source = getattr(ds, _SOURCE_ATTR, None)
    if source is not None:
        attrs[_SOURCE_ATTR] = source
    return new


def transfer_syntax_of(ds: Dataset) -> str:
    """The transfer syntax the data set is encoded in (implicit VR LE for files without meta)."""
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if ts:
        return str(ts)
    implicit, little = ds.original_encoding
    if implicit is None:
        return ImplicitVRLittleEndian
    return _syntax_for(bool(implicit), bool(little))


# --------------------------------------------------------------------------- writing


def _meta_element(group_element: int, vr: bytes, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\0" if vr in (b"UI", b"OB") else b" "
    g, e = group_element >> 16, group_element & 0xFFFF
    if vr == b"OB":
        return struct.pack("<HH2sHI", g, e, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", g, e, vr, len(value)) + value


def encode_file_meta(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> bytes:
    """Preamble, ``DICM`` and a fresh group 0002 (explicit VR little endian)."""
    body = b"".join(
        (
            _meta_element(0x00020001, b"OB", b"\x00\x01"),
            _meta_element(0x00020002, b"UI", sop_class_uid.encode("ascii", "replace")),
            _meta_element(0x00020003, b"UI", sop_instance_uid.encode("ascii", "replace")),
            _meta_element(0x00020010, b"UI", transfer_syntax.encode("ascii")),
            _meta_element(0x00020012, b"UI", IMPLEMENTATION_CLASS_UID.encode("ascii")),
            _meta_element(0x00020013, b"SH", IMPLEMENTATION_VERSION_NAME.encode("ascii")),
        )
    )
    length = struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(body))
    return b"\0" * _DICM_OFFSET + b"DICM" + length + body


def _ascii_raw(ds: Any, tag: int) -> str | None:
    """A raw ASCII top-level value read without pydicom (None: ask pydicom)."""
    elem = ds._dict.get(tag) if ds is not None else None
    if type(elem) is RawDataElement and type(elem.value) is bytes and elem.value.isascii():
        return elem.value.decode("ascii").strip(" \0")
    return None


def _uid_value(ds: Dataset, keyword: str, fallback: Any) -> str:
    tag = {"SOPClassUID": 0x00080016, "SOPInstanceUID": 0x00080018}[keyword]
    value = _ascii_raw(ds, tag)
    if value is None:
        value = peek(ds, keyword)
    if value:
        return str(value).strip(" \0")
    return fallback() if callable(fallback) else fallback


#: MediaStorageSOPClassUID (type 1) of a data set without SOPClassUID (``Remove:
#: ["SOPClassUID"]``): DCMTK's private generic file class, which Orthanc 1.10.1 writes there
#: too, whatever the source meta said (checked on Knee, DummyCT and a bare implicit VR file).
#: DCMTK takes a SOPClassUID found inside a sequence item first (Issue22-NoPixelData.dcm:
#: a functional group's); we don't, it is not the file's class.
GENERIC_FILE_SOP_CLASS = "1.2.276.0.7230010.3.1.0.1"

#: Groups never written in a data set (DCMTK's removeInvalidGroups, hence Orthanc's files): the
#: command group 0000 (a DIMSE message's, e.g. MoveOriginatorApplicationEntityTitle or an
#: ErrorComment's free text), the file meta group 0002, and the groups no element may have.
_INVALID_GROUPS = frozenset({0x0000, 0x0001, 0x0002, 0x0003, 0x0005, 0x0007, 0xFFFF})


def _excluded(tag: int) -> bool:
    """Invalid groups inside the data set (``_INVALID_GROUPS``), and group lengths (retired;
    recomputing is pointless)."""
    return (tag >> 16) in _INVALID_GROUPS or (tag & 0xFFFF) == 0x0000


def write_dataset(ds: Dataset, transfer_syntax: str | None = None) -> bytes:
    """Serialise ``ds`` as a DICOM Part 10 file.

    ``transfer_syntax`` defaults to the syntax the data set is in. Only the encoding changes
    here (implicit/explicit VR, endianness, deflate); changing pixel compression is
    ``transforms.transcode``'s job, which returns a data set already in its target syntax.
    """
    parts = write_parts(ds, transfer_syntax)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def write_parts(ds: Dataset, transfer_syntax: str | None = None) -> list[Any]:
    """:func:`write_dataset` as a list of byte strings and memoryviews whose concatenation is
    the file: unchanged stretches stay views of the original bytes, so a caller that hashes
    and writes the parts (``hashlib`` ``update``, ``writelines``, ``os.writev``) never copies
    them into one new buffer."""
    meta = ds.__dict__.get("file_meta")
    ts = str(transfer_syntax) if transfer_syntax else (_ascii_raw(meta, 0x00020010) or transfer_syntax_of(ds))
    sop_class = _uid_value(ds, "SOPClassUID", GENERIC_FILE_SOP_CLASS)
    sop_instance = _uid_value(ds, "SOPInstanceUID", lambda: str(getattr(meta, "MediaStorageSOPInstanceUID", "") or ""))
    implicit, little, deflated = _encoding_of(ts)
    if transfer_syntax and ts in _NATIVE_SYNTAXES:
        pixel = ds._dict.get(0x7FE00010)
        if pixel is not None and (pixel.length == 0xFFFFFFFF if type(pixel) is RawDataElement
                                  else getattr(pixel, "is_undefined_length", False)):
            # The reader refuses such a file; never write one (decompress first: transcode).
            raise ValueError("encapsulated PixelData cannot be written in a native transfer syntax")
    source: _Source | None = getattr(ds, _SOURCE_ATTR, None)
    head = encode_file_meta(sop_class, sop_instance, ts)
    if source is not None and source.implicit == implicit and source.little == little:
        parts = _ordered_body(ds, source) if source.ordered else _fast_body(ds, source)
        if not deflated:
            parts.insert(0, head)
            return parts
        body = b"".join(parts)
    elif implicit and little:
        try:
            body = _implicit_body(ds)  # explicit VR little endian elements: new headers only
        except _NotPlain:
            body = _slow_body(ds, implicit, little)
    else:
        body = _slow_body(ds, implicit, little)
    if deflated:
        # Level 1: ~5x faster than the default on pixel data for a few percent more bytes.
        compressor = zlib.compressobj(1, zlib.DEFLATED, -zlib.MAX_WBITS)
        body = compressor.compress(body) + compressor.flush()
    if source is None or source.implicit != implicit or source.little != little:
        _check_reads_back(head + body, values=implicit and (source is None or not source.implicit))
    return [head, body]


def _check_reads_back(data: bytes, *, values: bool = False) -> None:
    """Read what pydicom's writer made (an encoding change, a data set without a source) as
    the output's reader will: pydicom writes what a damaged input gave it, such as an element
    whose VR disagrees with the dictionary (SS on a sequence's tag), which implicit VR turns
    into a sequence that does not parse. (The copying paths keep what the reader checked.)
    With ``values`` (implicit VR made from explicit VR, where each VR becomes the dictionary's),
    :func:`_check_values_convert` too: two bytes read as CS in the source cannot be an FL."""
    try:
        ds = read_dataset(data, check_uids=False)
    except InputError as exc:
        raise InputError(f"written in the output's transfer syntax, the data set would not read back: {exc}",
                         reason="invalid_value") from None
    if values:
        _check_values_convert(ds)


#: Bytes per value of the VRs whose values pydicom converts to numbers: a length that is not
#: a multiple cannot be read (the other VRs read from any bytes).
_VALUE_SIZES = {"US": 2, "SS": 2, "UL": 4, "SL": 4, "FL": 4, "AT": 4, "FD": 8, "SV": 8, "UV": 8}


def _check_values_convert(ds: Dataset) -> None:
    """Check, at every depth, that each public element reads with the dictionary's VR, as a
    reader of implicit VR takes it: a numeric VR needs a length that is a multiple of its
    value size (two bytes of CS on an FL tag are not a float); failing that, ``invalid_value``
    names the element without its value. Checked on the raw lengths, not by converting every
    value (that cost ~3 ms per file). Private elements (their VR comes from whichever private
    dictionary a reader has; pydicom's ELSCINT1 entries disagree with real files) are left to
    the reader; the ambiguous VRs (US or SS, ...) must resolve as a reader resolves them, from
    PixelRepresentation and the like, which a damaged file may lack (explicit VR said which)."""
    for tag, elem in list(ds._dict.items()):
        if tag >> 16 & 1:
            continue
        try:
            # Any group length is UL to a reader (pydicom's, DCMTK's), listed or not: (0006,0000)
            # in an item is in no dictionary.
            vr = "UL" if tag & 0xFFFF == 0 else dictionary_VR(tag)
        except KeyError:
            continue
        if vr == "SQ":
            try:
                items = ds[tag].value
            except (RecursionError, MemoryError):
                raise
            except Exception:  # noqa: BLE001 - read_dataset checked the structure; be safe
                items = None
            if items is None or isinstance(items, (bytes, bytearray)):
                raise InputError(
                    f"written in implicit VR, sequence ({tag >> 16:04X},{tag & 0xFFFF:04X}) would not read back",
                    reason="invalid_value",
                )
            for item in items:
                _check_values_convert(item)
            continue
        if " or " in vr:
            try:
                ds[tag]  # pydicom resolves it here, from PixelRepresentation and the like
            except (RecursionError, MemoryError):
                raise
            except Exception:  # noqa: BLE001 - AttributeError: nothing to resolve it from
                raise InputError(
                    f"written in implicit VR, element ({tag >> 16:04X},{tag & 0xFFFF:04X}) would read back as "
                    f"{vr} with nothing to tell which (no PixelRepresentation, say): readers fail on it",
                    reason="invalid_value",
                ) from None
            continue
        size = _VALUE_SIZES.get(vr)
        if size is None:
            continue
        value = elem.value
        length = len(value) if isinstance(value, (bytes, bytearray, memoryview)) else None
        if length is not None and length % size:
            raise InputError(
                f"written in implicit VR, element ({tag >> 16:04X},{tag & 0xFFFF:04X}) would read back with the "
                f"dictionary's VR {vr}, which its value does not fit",
                reason="invalid_value",
            )


_IOV_MAX = 512  # below every platform's IOV_MAX (1024 on Linux)


def write_all(fd: int, parts: list[Any]) -> None:
    """Write the buffers of :func:`write_parts` to the file descriptor ``fd``: one ``writev``
    call for the usual file instead of a concatenated copy; a partial write continues where
    the kernel stopped."""
    pending = [memoryview(part).cast("B") for part in parts if len(part)]
    while pending:
        written = os.writev(fd, pending[:_IOV_MAX])
        while written:
            first = pending[0]
            if written >= len(first):
                written -= len(first)
                pending.pop(0)
            else:
                pending[0] = first[written:]
                written = 0


def _ordered_body(ds: Dataset, source: _Source) -> list[Any]:
    """``_fast_body`` for a source whose tags ascend (nearly every file).

    Which source elements are still the very objects read is found with C-level ``map``
    calls over the whole data set; the Python loop below only visits the elements the engine
    changed, removed or added (a few dozen), not all of them.
    """
    d = ds._dict
    keys, elems, starts = source.keys, source.elems, source.starts
    count = len(keys)
    current = list(map(d.get, keys))  # the source's own key objects: identity hits
    changed = list(compress(range(count), map(is_not, current, elems)))
    specials = source.specials
    if specials:
        changed = sorted(set(changed).union(specials))
    events: list[tuple[int, int, Any]] = [(i, 1, None) for i in changed]
    if len(d) != count - current.count(None):  # tags the source does not have
        ints = source.ints
        for key in d.keys() - source.key_set:
            tag = int(key)
            if not _excluded(tag):
                events.append((bisect_left(ints, tag), 0, (tag, key)))
        events.sort()
    data = source.data
    ints_all = source.ints
    parts: list[Any] = []
    append = parts.append
    encodings = None
    implicit, little = source.implicit, source.little
    run = 0  # first source position not yet emitted
    for position, kind, added in events:
        if position > run:
            append(data[starts[run] : starts[position]])
        if kind == 0:  # a new element, before source position ``position``
            elem = d[added[1]]
            run = position
        else:
            run = position + 1
            elem = current[position]
            if elem is None or _excluded(ints_all[position]):
                continue
            if elem is elems[position]:  # unchanged but special: OW-labelled encapsulated pixels
                start, end = starts[position], starts[position + 1]
                append(data[start : start + 4])
                append(b"OB")
                append(data[start + 6 : end])
                continue
        if encodings is None:
            encodings = _character_set(ds)
        append(_encode_element(ds, elem, implicit, little, encodings))
    if run < count:
        append(data[starts[run] : starts[count]])
    return parts


def _fast_body(ds: Dataset, source: _Source) -> list[Any]:
    """The encoded elements as a list of byte strings and slices of the original file."""
    parts: list[Any] = []
    run_start = run_end = -1  # the current run of contiguous original bytes
    spans = source.spans
    encodings = None
    # Plain int keys: BaseTag's Python-level __eq__/__lt__ would dominate this loop.
    elements = {int(tag): elem for tag, elem in ds._dict.items()}
    for tag in sorted(elements):
        if (tag >> 16) in _INVALID_GROUPS or (tag & 0xFFFF) == 0:  # see _excluded
            continue
        elem = elements[tag]
        span = spans.get(tag)
        if span is not None and span[0] is elem:
            if tag == 0x7FE00010 and _encapsulated_as_ow(elem, source):
                # PS3.5 A.4: encapsulated pixel data is OB. Some writers say OW; DCMTK (and
                # so Orthanc) write OB. Copy the element with its VR bytes corrected.
                if run_end > run_start >= 0:
                    parts.append(source.data[run_start:run_end])
                run_start = run_end = -1
                start, end = span[1], span[2]
                parts.append(source.data[start : start + 4])
                parts.append(b"OB")
                parts.append(source.data[start + 6 : end])
                continue
            if span[1] == run_end:
                run_end = span[2]
            else:
                if run_end > run_start >= 0:
                    parts.append(source.data[run_start:run_end])
                run_start, run_end = span[1], span[2]
            continue
        if run_end > run_start >= 0:
            parts.append(source.data[run_start:run_end])
        run_start = run_end = -1
        if encodings is None:
            encodings = _character_set(ds)
        parts.append(_encode_element(ds, elem, source.implicit, source.little, encodings))
    if run_end > run_start >= 0:
        parts.append(source.data[run_start:run_end])
    return parts


def _encapsulated_as_ow(elem: Any, source: _Source) -> bool:
    return (
        not source.implicit
        and isinstance(elem, RawDataElement)
        and elem.VR == "OW"
        and elem.length == 0xFFFFFFFF
    )


def _character_set(ds: Dataset) -> Any:
    """``ds._character_set`` without its side effect: pydicom's property stores the decoded
    SpecificCharacterSet back into the data set, which would make every later write re-encode
    it (and would change a caller's data set)."""
    elem = ds._dict.get(0x00080005)
    try:
        if type(elem) is RawDataElement:  # CS is ASCII: no character set needed to decode it
            elem = convert_raw_data_element(elem, encoding=_DEFAULT_CHARSET, ds=ds)
        value = elem.value if elem is not None else None
        return convert_encodings(value) if value else ds._parent_encoding
    except Exception:  # an undecodable SpecificCharacterSet: fall back to the default
        return _DEFAULT_CHARSET


def _raw_element_bytes(elem: RawDataElement, implicit: bool, little: bool) -> bytes | None:
    """(Added by the ENGINE helper.) Header + value of a raw element already in the target
    encoding, without pydicom's per-element writer (~15 us -> ~1 us; the engine emits its mapped
    UIDs, pseudonyms, emptied values and changed sequences as such raw elements).
    None when pydicom's writer is needed (undefined length, unknown VR, oversized short VR)."""
    value = elem.value
    vr = elem.VR
    if value is None or elem.length == 0xFFFFFFFF or (not implicit and vr is None):
        return None
    implicit_header, long_header, short_header = _HEADER_PACK[little]
    tag = elem.tag
    if implicit:
        return implicit_header(tag >> 16, tag & 0xFFFF, len(value)) + value
    vr_info = _VR_HEADER.get(vr)
    if vr_info is None:
        return None
    vr_bytes, is_long = vr_info
    if is_long:
        return long_header(tag >> 16, tag & 0xFFFF, vr_bytes, 0, len(value)) + value
    if len(value) > 0xFFFF:
        return None
    return short_header(tag >> 16, tag & 0xFFFF, vr_bytes, len(value)) + value


_HEADER_PACK = {
    little: (struct.Struct(order + "HHL").pack, struct.Struct(order + "HH2sHL").pack,
             struct.Struct(order + "HH2sH").pack)
    for little, order in ((True, "<"), (False, ">"))
}
_VR_HEADER = {vr: (vr.encode("ascii"), vr in _LONG_VRS) for vr in _KNOWN_VRS}


def _as_bytes(elem: Any) -> Any:
    """``elem`` with a value pydicom's writer can handle: the reader keeps large binary values as
    memoryviews of the file, and the writer calls ``bytes`` methods on some of them."""
    value = getattr(elem, "value", None)
    if type(value) is not memoryview:
        return elem
    if type(elem) is RawDataElement:
        return elem._replace(value=bytes(value))
    new = DataElement(elem.tag, elem.VR, bytes(value), is_undefined_length=elem.is_undefined_length)
    return new


def _encode_element(ds: Dataset, elem: Any, implicit: bool, little: bool, encodings: Any) -> bytes:
    """One changed element's bytes; a value pydicom cannot encode in its VR (a DS holding a
    character outside ASCII, a number out of its VR's range) is the file's ``invalid_value``."""
    if type(elem) is RawDataElement and elem.is_implicit_VR == implicit \
            and elem.is_little_endian == little:
        encoded = _raw_element_bytes(elem, implicit, little)
        if encoded is not None:
            return encoded
    try:
        return _pydicom_element(ds, elem, implicit, little, encodings)
    except (RecursionError, MemoryError):
        raise  # (reasons of their own: too_deep, too_large)
    except Exception:  # noqa: BLE001 - ValueError, struct.error, OverflowError (UnicodeEncodeError is a
        # ValueError), and what pydicom's writer raises on a damaged element, e.g. AttributeError
        # for a (7FE0,0010) of VR SQ and undefined length in an item: its check of the
        # encapsulation calls bytes methods on the sequence
        tag = int(elem.tag)  # pydicom's messages quote the value: name the element only
        raise InputError(f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) cannot be encoded: its value does not "
                         "fit its VR", reason="invalid_value") from None


def _pydicom_element(ds: Dataset, elem: Any, implicit: bool, little: bool, encodings: Any) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian = little
    fp.is_implicit_VR = implicit
    elem = _as_bytes(elem)
    if isinstance(elem, RawDataElement):
        if elem.is_implicit_VR == implicit and elem.is_little_endian == little:
            write_data_element(fp, elem, encodings)
            return fp.getvalue()
        elem = convert_raw_data_element(elem, encoding=encodings, ds=ds)
    elem = correct_ambiguous_vr_element(elem, ds, little, ancestors=[ds, UNSIGNED_WITHOUT_PIXEL_REPRESENTATION])
    write_data_element(fp, elem, encodings)
    return fp.getvalue()


def _unsigned_default() -> Dataset:
    default = Dataset()
    default._pixel_rep = 0  # what pydicom's ambiguous-VR resolution takes from a data set read with PixelRepresentation 0
    return default


#: The last "ancestor" for pydicom's ``correct_ambiguous_vr_element``: a ``US or SS`` element
#: (SmallestImagePixelValue...) of a data set that has PixelData but no PixelRepresentation
#: (a damaged file) is US, as DCMTK writes it (its "xs" VR; Orthanc 1.10.1 checked), where
#: pydicom raises AttributeError. With PixelRepresentation anywhere above, that decides.
UNSIGNED_WITHOUT_PIXEL_REPRESENTATION = _unsigned_default()


def unsigned_without_pixel_representation(ds: Dataset) -> None:
    """For a data set we built and hand to pydicom's whole-data-set writer (which resolves
    ambiguous VRs itself, without ancestors): see ``UNSIGNED_WITHOUT_PIXEL_REPRESENTATION``."""
    if 0x00280103 not in ds._dict and not hasattr(ds, "_pixel_rep"):
        ds._pixel_rep = 0


#: The VRs whose bytes depend on SpecificCharacterSet (PS3.5 6.1.2.3). Text has no byte order,
#: so a value read fits every transfer syntax as it is.
CHARSET_VRS = frozenset({"SH", "LO", "ST", "LT", "UC", "UT", "PN"})


def raw_vr(tag: int, elem: RawDataElement) -> str | None:
    """The VR pydicom gives a raw element when it converts it: the one read, else (implicit VR,
    or a public tag stored as UN) the dictionary's; None for a private or unknown tag without
    one (its bytes stay as they are)."""
    vr = elem.VR
    if vr is None or vr == "UN":
        try:
            return dictionary_VR(tag)
        except KeyError:
            return None
    return vr


def _text_as_read(elements: dict, encodings: Any, ds: Dataset) -> dict:
    """The elements of ``elements`` (a data set's ``_dict``) to write instead, so that every text
    value that is not plain ASCII keeps the bytes read, at any depth.

    pydicom's writer, when the encoding changes, decodes each text value and encodes it again:
    bytes that are invalid in the declared character set (a damaged file, a UTF-8 file holding
    Latin-1) come back as replacement characters, "?" in the output, and ISO 2022 escapes may
    be chosen differently. The character set never changes here, so the bytes read are right.
    Items of sequences are copied before being changed: they may be the input's.
    """
    patch: dict = {}
    for tag, elem in elements.items():
        if type(elem) is RawDataElement:
            vr = raw_vr(tag, elem)
            if vr in CHARSET_VRS:
                value = elem.value
                if value and not bytes(value).isascii():
                    # (pydicom writes a PersonName's bytes as read when its encodings are the
                    # data set's; bytes given to a PN element alone are decoded and re-encoded)
                    value = PersonName(bytes(value), encodings) if vr == "PN" else bytes(value)
                    patch[tag] = DataElement(tag, vr, value)
                continue
            if vr != "SQ" or not elem.value:
                continue
            elem = convert_sequence(elem, tag, encodings, ds)  # new items
            if elem.VR != "SQ":
                continue
            _pass_pixel_representation(ds, elem.value)
        elif elem.VR != "SQ" or not elem.value:
            continue
        items = elem.value
        new_items = None
        for index, item in enumerate(items):
            own = item._dict.get(0x00080005)
            inner = _text_as_read(item._dict, _character_set(item) if own is not None else encodings, item)
            if inner:
                if new_items is None:
                    new_items = list(items)
                copy = shallow_copy(item)
                copy._dict.update(inner)
                for name in ("_parent_encoding", "_pixel_rep"):  # how pydicom resolves the rest
                    if name in item.__dict__:
                        copy.__dict__[name] = item.__dict__[name]
                new_items[index] = copy
        if new_items is not None:
            patch[tag] = DataElement(tag, "SQ", Sequence(new_items), is_undefined_length=elem.is_undefined_length)
    return patch


def _pass_pixel_representation(ds: Dataset, items: Any) -> None:
    """What pydicom does for the items of a sequence it converts (``Dataset.__getitem__``):
    each item without a PixelRepresentation of its own takes the nearest one above, with which
    pydicom's writer resolves "US or SS" elements read in implicit VR."""
    rep = ds._dict.get(0x00280103)
    if rep is not None:
        value = rep.value
        rep = int(b"\x01" in value) if isinstance(value, (bytes, memoryview)) else value
    else:
        rep = ds.__dict__.get("_pixel_rep")
    if rep is None:
        return
    for item in items:
        if 0x00280103 not in item._dict:
            item._pixel_rep = rep


def keep_text_as_read(ds: Dataset) -> None:
    """Make every text value of ``ds`` that is not plain ASCII an element holding the bytes
    read (see ``_text_as_read``), before code that converts all elements (the byte swap of
    ``transforms.transcode``). Changes ``ds``: for a data set the caller owns."""
    ds._dict.update(_text_as_read(ds._dict, _character_set(ds), ds))


def _slow_body(ds: Dataset, implicit: bool, little: bool) -> bytes:
    """pydicom's own writer, for encoding changes (e.g. implicit to explicit VR)."""
    body = Dataset({tag: _as_bytes(elem) for tag, elem in ds._dict.items() if not _excluded(tag)})
    body._dict.update(_text_as_read(body._dict, _character_set(ds), ds))
    unsigned_without_pixel_representation(body)
    src_implicit, src_little = ds.original_encoding
    if src_implicit is not None:
        body.set_original_encoding(src_implicit, src_little, ds.original_character_set)
    try:
        encoded = _pydicom_body(body, implicit, little)
    except (RecursionError, MemoryError):
        raise  # (reasons of their own: too_deep, too_large)
    except Exception:  # noqa: BLE001 - pydicom's messages quote values: name the element only
        # e.g. an IS whose bytes decode to characters outside Latin-1 (a damaged file in a
        # multi-byte character set): pydicom raises while re-encoding, then fails to add the
        # tag to its own message (TypeError)
        raise InputError(f"{_unwritable(body, implicit, little)} cannot be re-encoded in the output's "
                         "transfer syntax: its value does not fit its VR", reason="invalid_value") from None
    return encoded


class _NotPlain(Exception):
    """Left to pydicom's writer by :func:`_implicit_body`."""


_IMPLICIT_HEADER = struct.Struct("<HHI")
_TAG_LE = struct.Struct("<HH")
_U16_LE = struct.Struct("<H")
_U32_LE = struct.Struct("<I")
_IMPLICIT_ITEM_END = _IMPLICIT_HEADER.pack(0xFFFE, 0xE00D, 0)
_IMPLICIT_SEQUENCE_END = _IMPLICIT_HEADER.pack(0xFFFE, 0xE0DD, 0)


def _implicit_body(ds: Dataset) -> bytes:
    """``ds`` encoded in implicit VR little endian when its elements were read in explicit VR
    little endian: each element keeps the bytes of its value and gets an implicit header, at
    every depth (sequence and item lengths recomputed), so a transcode between the two costs
    about what copying costs. Changed elements (not raw) are encoded by pydicom, one by one.
    What pydicom's writer would do otherwise than keep the bytes raises :class:`_NotPlain` and
    the caller uses :func:`_slow_body`: elements read in another encoding, an odd length (which
    pydicom pads), an undefined length other than a sequence's, unsorted or repeated tags
    inside an item, nesting beyond ``_MAX_DEPTH``. Kept bytes include text padding as read
    (pydicom's writer rewrites NUL padding as spaces, as the unchanged-syntax path does not)."""
    return b"".join(_implicit_elements(ds, _character_set(ds), 0))


def _implicit_elements(ds: Dataset, encodings: Any, depth: int) -> list[Any]:
    parts: list[Any] = []
    pack = _IMPLICIT_HEADER.pack
    for tag in sorted(int(t) for t in ds._dict):
        if _excluded(tag) if depth == 0 else (tag & 0xFFFF) == 0 and (tag >> 16) > 6:
            continue  # (in items, pydicom's writer drops group lengths only)
        elem = ds._dict[tag]
        if type(elem) is RawDataElement:
            if elem.is_implicit_VR is not False or not elem.is_little_endian:
                raise _NotPlain
            value = elem.value
            if elem.VR == "SQ":
                data = value if value is not None else b""  # (without its delimiter)
                items, _ = _implicit_items(data, 0, len(data), depth + 1, undefined=False)
                if elem.length == 0xFFFFFFFF:
                    parts += (pack(tag >> 16, tag & 0xFFFF, 0xFFFFFFFF), items, _IMPLICIT_SEQUENCE_END)
                else:
                    parts += (pack(tag >> 16, tag & 0xFFFF, len(items)), items)
                continue
            if value is None or elem.length == 0xFFFFFFFF or len(value) & 1:
                raise _NotPlain
            parts += (pack(tag >> 16, tag & 0xFFFF, len(value)), value)
        elif elem.VR == "SQ" and type(elem.value) is Sequence:
            items = []
            for item in elem.value:
                own = item._dict.get(0x00080005)
                if depth + 1 > _MAX_DEPTH:
                    raise _NotPlain
                body = b"".join(_implicit_elements(item, _character_set(item) if own is not None else encodings,
                                                   depth + 1))  # fmt: skip
                if getattr(item, "is_undefined_length_sequence_item", False):
                    items += (pack(0xFFFE, 0xE000, 0xFFFFFFFF), body, _IMPLICIT_ITEM_END)
                else:
                    items += (pack(0xFFFE, 0xE000, len(body)), body)
            joined = b"".join(items)
            if elem.is_undefined_length:
                parts += (pack(tag >> 16, tag & 0xFFFF, 0xFFFFFFFF), joined, _IMPLICIT_SEQUENCE_END)
            else:
                parts += (pack(tag >> 16, tag & 0xFFFF, len(joined)), joined)
        else:
            parts.append(_encode_element(ds, elem, True, True, encodings))
    return parts


def _implicit_items(data: Any, pos: int, end: int, depth: int, *, undefined: bool) -> tuple[bytes, int]:
    """The items of an explicit VR little endian sequence from ``pos``, in implicit VR, and
    where they end: at ``end`` (a defined length), or past the sequence delimiter
    (``undefined``; ``end`` then bounds the search)."""
    if depth > _MAX_DEPTH:
        raise _NotPlain
    items: list[Any] = []
    while True:
        if not undefined and pos >= end:
            return b"".join(items), pos
        if end - pos < 8:
            raise _NotPlain
        group, element = _TAG_LE.unpack_from(data, pos)
        length = _U32_LE.unpack_from(data, pos + 4)[0]
        tag = group << 16 | element
        if undefined and tag == _SEQ_END:
            return b"".join(items), pos + 8
        if tag != _ITEM:
            raise _NotPlain
        pos += 8
        if length == 0xFFFFFFFF:
            body, pos = _implicit_item(data, pos, end, depth, undefined=True)
            items += (_IMPLICIT_HEADER.pack(0xFFFE, 0xE000, 0xFFFFFFFF), body, _IMPLICIT_ITEM_END)
        else:
            if pos + length > end:
                raise _NotPlain
            body, _ = _implicit_item(data, pos, pos + length, depth, undefined=False)
            pos += length
            items += (_IMPLICIT_HEADER.pack(0xFFFE, 0xE000, len(body)), body)


def _implicit_item(data: Any, pos: int, end: int, depth: int, *, undefined: bool) -> tuple[bytes, int]:
    """One item's elements from ``pos``: their implicit VR bytes and where the item ends."""
    parts: list[Any] = []
    pack = _IMPLICIT_HEADER.pack
    last = -1
    while pos < end:
        if end - pos < 8:
            raise _NotPlain
        group, element = _TAG_LE.unpack_from(data, pos)
        tag = group << 16 | element
        if tag == _ITEM_END:
            if not undefined:
                raise _NotPlain
            return b"".join(parts), pos + 8
        if tag <= last:
            raise _NotPlain  # pydicom sorts the elements of an item and keeps one of a repeated tag
        last = tag
        vr = bytes(data[pos + 4 : pos + 6])
        if vr in _LONG_VR_BYTES:
            if end - pos < 12:
                raise _NotPlain
            length = _U32_LE.unpack_from(data, pos + 8)[0]
            pos += 12
        elif vr.isalpha() and vr.isupper():
            length = _U16_LE.unpack_from(data, pos + 6)[0]
            pos += 8
        else:
            raise _NotPlain
        dropped = element == 0 and group > 6  # a group length: pydicom's writer drops it
        if length == 0xFFFFFFFF:
            if vr != b"SQ":
                raise _NotPlain
            items, pos = _implicit_items(data, pos, end, depth + 1, undefined=True)
            if not dropped:
                parts += (pack(group, element, 0xFFFFFFFF), items, _IMPLICIT_SEQUENCE_END)
            continue
        if pos + length > end or length & 1:
            raise _NotPlain
        if not dropped:
            if vr == b"SQ":
                items, _ = _implicit_items(data, pos, pos + length, depth + 1, undefined=False)
                parts += (pack(group, element, len(items)), items)
            else:
                parts += (pack(group, element, length), data[pos : pos + length])
        pos += length
    if undefined:
        raise _NotPlain
    return b"".join(parts), pos


def _pydicom_body(body: Dataset, implicit: bool, little: bool) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian = little
    fp.is_implicit_VR = implicit
    _pydicom_write_dataset(fp, body)
    return fp.getvalue()


def _unwritable(body: Dataset, implicit: bool, little: bool) -> str:
    """The first top-level element pydicom's writer fails on, written alone (with the
    character set), for a message; only after the whole data set failed."""
    charset = body._dict.get(0x00080005)
    for tag in sorted(body._dict):
        alone = Dataset({tag: body._dict[tag], **({BaseTag(0x00080005): charset} if charset is not None else {})})
        unsigned_without_pixel_representation(alone)
        try:
            if body.original_encoding[0] is not None:
                alone.set_original_encoding(*body.original_encoding, body.original_character_set)
            _pydicom_body(alone, implicit, little)
        except (RecursionError, MemoryError):
            raise
        except Exception:  # noqa: BLE001
            return f"element ({tag >> 16:04X},{tag & 0xFFFF:04X})"
    return "an element"


__all__ = [
    "CHARSET_VRS",
    "IMPLEMENTATION_CLASS_UID",
    "REQUIRED_UIDS",
    "UID",
    "DataElement",
    "check_identifiers",
    "encode_file_meta",
    "is_valid_uid",
    "keep_text_as_read",
    "peek",
    "raw_vr",
    "read_dataset",
    "shallow_copy",
    "transfer_syntax_of",
    "write_all",
    "write_dataset",
    "write_parts",
]
