"""JSON values of ``Replace`` cast to DICOM elements, following Orthanc's rules.

Casting happens once, when the request is parsed (:func:`prepare_value`), so a bad value is
refused before any data is touched. The result is an immutable, picklable :class:`Value`
tree; :func:`build_element` turns it into a fresh pydicom ``DataElement`` for each dataset.

Rules (Orthanc ``FromDcmtkBridge``/``ParsedDicomFile``):

* string -> cast to the tag's VR; a *top-level* ``""`` is an empty element of any VR;
* ``null`` (and ``""`` inside paths or sequence items) -> the cast of ``""``: empty for text and
  binary VRs, refused for numbers and sequences;
* array -> sequence (the tag's VR must be SQ); items are objects of tag names -> values, or
  ``[]`` for an empty item;
* ``data:application/octet-stream;base64,...`` -> the decoded bytes;
* numbers, booleans and objects are refused.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
import struct
from collections.abc import Mapping
from collections.abc import Sequence as Sequence_
from dataclasses import dataclass
from typing import Any

from pydicom import charset as _pydicom_charset
from pydicom import filewriter as _pydicom_filewriter
from pydicom import config
from pydicom.charset import convert_encodings, encode_string
from pydicom.datadict import dictionary_VM
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from transforms.errors import RequestError
from transforms.tags import (
    FILE_META_GROUP,
    NON_DATA_SET_GROUPS,
    SPECIFIC_CHARACTER_SET,
    PrivateDictionary,
    describe_tag,
    parse_tag,
    vr_for_new_element,
)

DATA_URI_PREFIX = "data:application/octet-stream;base64,"

TEXT_VRS = frozenset("AE AS CS DA DT LO LT PN SH ST TM UC UI UR UT".split())
BINARY_VRS = frozenset({"OB", "OW", "UN", "OB or OW"})
_INT_RANGES = {
    "US": (0, 0xFFFF),
    "SS": (-0x8000, 0x7FFF),
    "UL": (0, 0xFFFFFFFF),
    "SL": (-0x80000000, 0x7FFFFFFF),
    "UV": (0, 0xFFFFFFFFFFFFFFFF),
    "SV": (-0x8000000000000000, 0x7FFFFFFFFFFFFFFF),
    "OL": (0, 0xFFFFFFFF),
    "OV": (0, 0xFFFFFFFFFFFFFFFF),
}
_FLOAT_VRS = frozenset({"FL", "FD", "OF", "OD"})
# PixelData and EncapsulatedDocument: Orthanc embeds image and PDF data URIs there.
_EMBEDDED_CONTENT = frozenset({0x7FE00010, 0x00420011})
# Multi-valued "O*" VRs are stored as packed bytes by pydicom.
_PACKED = {"OL": "L", "OV": "Q", "OF": "f", "OD": "d"}
_IS_RE = re.compile(r"^\s*[+-]?\d+\s*$", re.ASCII)
_DS_RE = re.compile(r"^\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*$", re.ASCII)

# Values are built without pydicom's validation: Orthanc stores text values as given
# (e.g. a UID "instance"), and warnings from thousands of datasets are noise.
_NO_VALIDATION = config.IGNORE


@dataclass(frozen=True)
class Value:
    """A cast replacement value for one tag.

    ``value`` is None (empty element), a str (text VRs, backslash = multiple values; binary
    VRs given non-ASCII text, encoded in the data set's character set when built),
    bytes (binary VRs), a tuple of ints/floats (numbers, AT, OL/OV/OF/OD), or, for SQ, a
    tuple of items, each item a tuple of :class:`Value`.
    """

    tag: int
    vr: str
    value: Any


@dataclass(frozen=True)
class _Context:
    key: str
    dictionary: PrivateDictionary | None
    private_creator: str | None


def _label(tag: int, vr: str, ctx: _Context) -> str:
    return f"{ctx.key}: tag {describe_tag(tag, ctx.dictionary)} ({vr})"


def prepare_value(
    tag: int,
    json_value: object,
    *,
    key: str,
    dictionary: PrivateDictionary | None = None,
    private_creator: str | None = None,
    top_level: bool = True,
) -> Value:
    """Cast a JSON value of ``Replace`` for ``tag``.

    Args:
        tag: the target tag.
        json_value: the value from the request body.
        key: the request key (e.g. ``Replace`` or ``Replace: DimensionIndexSequence[1].X``), used
            in error messages.
        dictionary: the configured private dictionary.
        private_creator: the request's ``PrivateCreator`` (private tags' VR lookup).
        top_level: True for a top-level ``Replace`` entry (``""`` then empties any VR).

    Raises:
        RequestError: naming the key, the tag and its VR.
    """
    ctx = _Context(key, dictionary, private_creator)
    vr = vr_for_new_element(tag, dictionary=dictionary, private_creator=private_creator)
    return _prepare(tag, vr, json_value, ctx, top_level=top_level)


def _prepare(tag: int, vr: str, json_value: object, ctx: _Context, *, top_level: bool) -> Value:
    if isinstance(json_value, list):
        if vr != "SQ":
            raise RequestError(f"{_label(tag, vr, ctx)}: an array is only allowed for a "
                               "sequence (SQ)")
        return Value(tag, "SQ", tuple(_prepare_item(item, tag, i, ctx)
                                      for i, item in enumerate(json_value)))
    if json_value is None:
        text = ""
    elif isinstance(json_value, str):
        text = json_value
        if text == "" and top_level:
            return Value(tag, "SQ" if vr == "SQ" else _resolve_ambiguous(tag, vr, ""), None)
    else:
        kind = {bool: "a boolean", int: "a number", float: "a number", dict: "an object"}.get(
            type(json_value), type(json_value).__name__)
        raise RequestError(f"{_label(tag, vr, ctx)}: expected a string, null or (for a "
                           f"sequence) an array of objects, got {kind}")
    return _cast_string(tag, vr, text, ctx)


def _prepare_item(item: object, seq_tag: int, index: int, ctx: _Context) -> tuple[Value, ...]:
    if isinstance(item, list) and not item:
        return ()
    if not isinstance(item, Mapping):
        raise RequestError(f"{_label(seq_tag, 'SQ', ctx)}: item {index} must be an object "
                           "of tag names to values (or [] for an empty item)")
    values: dict[int, Value] = {}
    for name in sorted(item):
        if not isinstance(name, str):
            raise RequestError(f"{ctx.key}: item {index} has a non-string tag name")
        tag = parse_tag(name, key=ctx.key, dictionary=ctx.dictionary,
                        private_creator=ctx.private_creator)
        if tag & 0xFFFF == 0 or tag >> 16 in NON_DATA_SET_GROUPS:
            continue  # group lengths and groups no data set holds are never written from requests
        if tag >> 16 == FILE_META_GROUP:
            raise RequestError(f"{_label(seq_tag, 'SQ', ctx)}: item {index} names {describe_tag(tag, ctx.dictionary)}, an element "
                               "of the file meta header, which never stands inside a sequence item")
        vr = vr_for_new_element(tag, dictionary=ctx.dictionary,
                                private_creator=ctx.private_creator)
        value = _prepare(tag, vr, item[name], ctx, top_level=False)
        # Two spellings of one tag: Orthanc casts both and keeps the first in name order.
        values.setdefault(tag, value)
    return tuple(values[t] for t in sorted(values))


def _check_number_string(tag: int, vr: str, part: str, ctx: _Context) -> None:
    """One IS or DS value as PS3.5 Table 6.2-1 allows it: the syntax, at most 12 (IS) or 16
    (DS) bytes, an IS within -2^31..2^31-1, a DS within a double's range."""
    if vr == "IS":
        if not _IS_RE.match(part):
            raise RequestError(f"{_label(tag, vr, ctx)}: {part!r} is not an integer string like '12'")
        if len(part) > 12 or not -(1 << 31) <= int(part) < 1 << 31:
            raise RequestError(f"{_label(tag, vr, ctx)}: {part!r} is not an IS value (at most 12 "
                               "characters, within -2147483648..2147483647)")
        return
    if not _DS_RE.match(part):
        raise RequestError(f"{_label(tag, vr, ctx)}: {part!r} is not a decimal string like '1.5' or '-2e3'")
    if len(part) > 16 or not math.isfinite(float(part)):
        raise RequestError(f"{_label(tag, vr, ctx)}: {part!r} is not a DS value (at most 16 "
                           "characters, within a double's range)")


def _single_valued(tag: int) -> bool:
    """True when the public dictionary allows exactly one value (VM "1")."""
    try:
        return dictionary_VM(tag) == "1"
    except KeyError:
        return False


def _resolve_ambiguous(tag: int, vr: str, text: str) -> str:
    if vr in ("US or SS", "US or SS or OW"):
        return "SS" if "-" in text else "US"
    if vr == "US or OW":
        return "US"
    if vr == "OB or OW":
        # DCMTK (and so Orthanc 1.10.1) makes new PixelData and OverlayData elements OW, any
        # other (WaveformData, AirCounts, CurveData, ...) OB: checked against it.
        return "OW" if tag == 0x7FE00010 or tag & 0xFF00FFFF == 0x60003000 else "OB"
    return vr


def _cast_string(tag: int, vr: str, text: str, ctx: _Context) -> Value:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # JSON's "\ud800": a lone surrogate is no character at all
        raise RequestError(f"{_label(tag, vr, ctx)}: the value holds an unpaired surrogate "
                           "(\\ud800-\\udfff), which is not valid Unicode") from None
    payload: bytes | None = None
    if text.startswith(DATA_URI_PREFIX):
        encoded = text[len(DATA_URI_PREFIX):]
        encoded += "=" * (-len(encoded) % 4 if len(encoded) % 4 != 1 else 0)  # unpadded, as Orthanc takes it
        try:
            payload = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(f"{_label(tag, vr, ctx)}: malformed base64 in the "
                               "'data:application/octet-stream;base64,' value") from None
    elif tag in _EMBEDDED_CONTENT and text.startswith("data:"):
        # Orthanc decodes an image into PixelData (and sets Rows, Columns, ...) or embeds a PDF;
        # we would store the URI's text as the pixels or the document: refuse instead.
        raise RequestError(f"{_label(tag, vr, ctx)}: only 'data:application/octet-stream;base64,...' "
                           "values are supported here (no image or PDF embedding)")
    vr = _resolve_ambiguous(tag, vr, text if payload is None else "")

    if vr == "SQ":
        raise RequestError(f"{_label(tag, vr, ctx)}: a sequence takes an array of objects "
                           "(or \"\" at top level to empty it), not a string or null")
    if vr in BINARY_VRS:
        if payload is not None:
            data = payload
        elif text.isascii():
            data = text.encode("ascii")
        elif vr == "OW":
            raise RequestError(f"{_label(tag, vr, ctx)}: text for an OW value must be ASCII; give "
                               "binary values as 'data:application/octet-stream;base64,...'")
        else:  # converted to the file's character set when written, as Orthanc does
            return Value(tag, vr, text)
        if vr == "OW" and len(data) % 2:
            raise RequestError(f"{_label(tag, vr, ctx)}: OW needs an even number of bytes, "
                               f"got {len(data)}")
        if len(data) % 2:
            data += b"\x00"  # DICOM values have even length (pydicom does not pad UN)
        return Value(tag, vr, data or None)

    if payload is not None and vr in _PACKED:
        raise RequestError(f"{_label(tag, vr, ctx)}: give {vr} values as backslash-separated numbers "
                           "('1.5\\\\2'), not as a data: URI (Orthanc refuses it too)")
    if payload is not None:
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError(f"{_label(tag, vr, ctx)}: the data URI does not hold UTF-8 text, "
                               "which this VR needs") from None

    if "\0" in text:
        # Orthanc cuts a text value at its first NUL. Trailing NULs are padding (a UID's);
        # one inside the value would silently drop what follows it: refused.
        text = text.rstrip("\0")
        if "\0" in text:
            raise RequestError(f"{_label(tag, vr, ctx)}: the value holds a NUL character, "
                               f"which {vr} values cannot contain")
    if vr not in CHARSET_VRS and not text.isascii():
        # AE, AS, CS, DA, DT, TM, UI, UR, numbers: no character set applies (PS3.5 6.2); a
        # non-ASCII character would make the writer fail on every file (Orthanc drops it).
        raise RequestError(f"{_label(tag, vr, ctx)}: {vr} values are ASCII only (this VR has no "
                           "character set)")
    if vr in TEXT_VRS:
        return Value(tag, vr, text or None)
    if vr in ("IS", "DS"):
        if text.strip(" ") == "":
            return Value(tag, vr, None)  # spaces are padding (PS3.5 6.2): an empty value
        parts = text.split("\\")
        if len(parts) > 1 and _single_valued(tag):
            raise RequestError(f"{_label(tag, vr, ctx)}: takes a single value (VM 1), got "
                               f"{len(parts)} backslash-separated values")
        for part in parts:
            if part.strip(" ") == "" and len(parts) > 1:
                continue  # an empty value inside a list (PS3.5 6.4), as Orthanc stores it
            _check_number_string(tag, vr, part, ctx)
        return Value(tag, vr, text)
    # (OF/OD/OL/OV hold one packed stream: VM 1 whatever the number of values.)
    if (vr in _INT_RANGES or vr in _FLOAT_VRS or vr == "AT") and vr not in _PACKED \
            and "\\" in text and _single_valued(tag):
        raise RequestError(f"{_label(tag, vr, ctx)}: takes a single value (VM 1), got "
                           f"{text.count(chr(92)) + 1} backslash-separated values")
    if vr in _INT_RANGES:
        low, high = _INT_RANGES[vr]
        numbers = []
        for part in text.split("\\"):
            try:  # plain ASCII digits only: Python's int() also takes " 5", "1_0" and other scripts' digits
                number = int(part) if _strict_number(part) else None
            except ValueError:
                number = None
            if number is None or not low <= number <= high:
                raise RequestError(f"{_label(tag, vr, ctx)}: {part!r} is not an integer in "
                                   f"{low}..{high}")
            numbers.append(number)
        return Value(tag, vr, tuple(numbers))
    if vr in _FLOAT_VRS:
        floats = []
        for part in text.split("\\"):
            try:
                number = float(part) if _strict_number(part) else None
            except ValueError:
                number = None
            if number is None or not math.isfinite(number) or (
                    vr in ("FL", "OF") and abs(number) > 3.4028234663852886e38):
                raise RequestError(f"{_label(tag, vr, ctx)}: {part!r} is not a "
                                   f"{'32' if vr in ('FL', 'OF') else '64'}-bit float")
            floats.append(number)
        return Value(tag, vr, tuple(floats))
    if vr == "AT":
        if text == "":
            raise RequestError(f"{_label(tag, vr, ctx)}: an attribute tag value is required")
        return Value(tag, vr, tuple(parse_tag(part, key=ctx.key, dictionary=ctx.dictionary,
                                              private_creator=ctx.private_creator)
                                    for part in text.split("\\")))
    raise RequestError(f"{_label(tag, vr, ctx)}: this VR cannot be set from a request")


def _swapped_words(data: bytes) -> bytes:
    swapped = bytearray(data)
    swapped[0::2], swapped[1::2] = data[1::2], data[0::2]
    return bytes(swapped)


def _strict_number(part: str) -> bool:
    return part.isascii() and "_" not in part and part == part.strip()


# Text VRs whose bytes depend on the SpecificCharacterSet (the others are ASCII only).
CHARSET_VRS = frozenset({"LO", "LT", "PN", "SH", "ST", "UC", "UT"})


def fit_text(text: str, encodings: Sequence_[str]) -> str:
    """``text`` without the characters none of the Python ``encodings`` can represent.

    Orthanc converts a replacement to the file's SpecificCharacterSet and drops what does
    not fit; pydicom would write ``?`` instead.
    """
    if text.isascii():
        return text
    kept = []
    for char in text:
        for encoding in encodings:
            try:
                encoded = char.encode(encoding)
            except (UnicodeEncodeError, LookupError):
                continue
            if encoding in _SINGLE_BYTE_ONLY and len(encoded) != 1:
                continue
            kept.append(char)
            break
    return "".join(kept)


def dataset_encodings(ds: Dataset) -> list[str]:
    """The Python codecs pydicom will encode ``ds``'s text with (its current
    SpecificCharacterSet, else the parent's, else the default)."""
    elem = ds._dict.get(SPECIFIC_CHARACTER_SET)
    if elem is None:
        parent = ds.__dict__.get("_parent_encoding") or "iso8859"
        return [parent] if isinstance(parent, str) else list(parent)
    try:
        if type(elem) is RawDataElement:
            terms = [t.strip(" \x00") for t in (elem.value or b"").decode("ascii").split("\\")]
        else:
            value = elem.value
            terms = [str(v) for v in value] if isinstance(value, (list, tuple)) or \
                type(value).__name__ == "MultiValue" else [str(value or "")]
        return list(convert_encodings(terms if any(terms) else ["ISO_IR 6"]))
    except Exception:  # an undecodable or unknown SpecificCharacterSet: pydicom's default
        return ["iso8859"]


def fitting_encodings(ds: Dataset, encodings: list[str]) -> list[str]:
    """The codecs a replacement text must fit (:func:`fit_text`): those of
    the data set, except that a SpecificCharacterSet naming the default repertoire (ISO_IR 6,
    or an empty first term) means ASCII, which pydicom calls "iso8859" and writes as Latin-1.
    Without a SpecificCharacterSet, Latin-1 is accepted, as Orthanc does (its default)."""
    if "iso8859" in encodings and SPECIFIC_CHARACTER_SET in ds._dict:
        return ["ascii" if e == "iso8859" else e for e in encodings]
    return encodings


#: ISO_IR 13 (JIS X 0201) is single-byte: pydicom's "shift_jis" codec would accept kanji and
#: its writer then emits "?" for them.
_SINGLE_BYTE_ONLY = frozenset({"shift_jis"})


def _encode_jis_x_0201(value: str, errors: str = "strict") -> bytes:
    """ISO_IR 13 text as PS3.3 Table C.12-2 defines the character set: JIS X 0201 romaji (G0)
    and half-width katakana (G1), one byte each, mixed freely within a value.

    pydicom 3.0's encoder takes one half per value and writes ``?`` for every character of the
    other ("Aﾈ" -> ``A?``; Orthanc writes ``A\xc8``); it is replaced in pydicom's table of
    custom encoders below. ``errors`` other than "strict" write ``?`` for a character outside
    JIS X 0201, as pydicom's does.
    """
    encoded = bytearray()
    for index, char in enumerate(value):
        try:
            byte = char.encode("shift_jis")
        except UnicodeEncodeError:
            byte = b""
        if len(byte) != 1:
            if errors == "strict":
                raise UnicodeEncodeError("shift_jis", value, index, index + 1, "not a JIS X 0201 character")
            byte = b"?"
        encoded += byte
    return bytes(encoded)


_pydicom_charset.custom_encoders["shift_jis"] = _encode_jis_x_0201


def _encode_string(value: str, encodings: Sequence_[str]) -> bytes:
    """pydicom's ``encode_string`` for its writer, except that an empty value is no bytes in
    every character set: under a SpecificCharacterSet whose first value is ISO 2022 IR 87 or
    IR 159, pydicom 3.0's encoder read the empty value's first character (IndexError, an
    internal error for the file; 'a\\\\b' in JSON is such a list, and 'A^^B' a person name
    with an empty component, both of which Orthanc writes), and its escape back to the first
    set would have run into the next value's delimiter. Characters none of ``encodings`` holds
    are dropped (:func:`fit_text`) where pydicom would write "?": text is fitted to its data
    set's character set when it is built, but a SpecificCharacterSet replaced later in the
    same body can still take some away."""
    if not value.isascii():
        value = fit_text(value, encodings)  # (may leave nothing: mutation seed 103)
    if value == "":
        return b""
    return _pydicom_encode_string(value, encodings)


_pydicom_encode_string = _pydicom_charset.encode_string
# The writer holds its own name for it; person names look it up in pydicom.charset.
_pydicom_filewriter.encode_string = _pydicom_charset.encode_string = _encode_string


def build_element(value: Value, *, little_endian: bool = True,
                  encodings: Sequence_[str] | None = None) -> DataElement:
    """A new ``DataElement`` (and, for SQ, new item datasets) for a prepared value.

    Args:
        value: from :func:`prepare_value`.
        little_endian: byte order for packed OF/OD/OL/OV values.
        encodings: Python codecs of the target dataset's character set; text that they
            cannot represent is dropped (see :func:`fit_text`). A new sequence item that
            declares a SpecificCharacterSet fits its text (and its items') to that one.
    """
    vr = value.vr
    raw = value.value
    if vr == "SQ":
        items = []
        for item_values in raw or ():
            item = Dataset()
            item_encodings = encodings
            for v in item_values:
                if v.tag == SPECIFIC_CHARACTER_SET:  # the item's own (PS3.5 7.5.3)
                    item[v.tag] = build_element(v, little_endian=little_endian)
                    item_encodings = fitting_encodings(item, dataset_encodings(item))
            for v in item_values:
                if v.tag != SPECIFIC_CHARACTER_SET:
                    item[v.tag] = build_element(v, little_endian=little_endian, encodings=item_encodings)
            items.append(item)
        return DataElement(value.tag, "SQ", Sequence(items), validation_mode=_NO_VALIDATION)
    if raw is None:
        return DataElement(value.tag, vr, None, validation_mode=_NO_VALIDATION)
    if vr in BINARY_VRS:
        if isinstance(raw, str):  # non-ASCII text, in the data set's character set
            codecs = encodings or ["iso8859"]
            raw = encode_string(fit_text(raw, codecs), codecs)
            raw += b"\x00" * (len(raw) % 2)
        elif vr == "OW" and not little_endian:
            raw = _swapped_words(raw)  # request bytes are little-endian words, as in Orthanc
        return DataElement(value.tag, vr, raw or None, validation_mode=_NO_VALIDATION)
    if vr in _PACKED:
        fmt = ("<" if little_endian else ">") + _PACKED[vr] * len(raw)
        return DataElement(value.tag, vr, struct.pack(fmt, *raw),
                           validation_mode=_NO_VALIDATION)
    if isinstance(raw, tuple):
        return DataElement(value.tag, vr, raw[0] if len(raw) == 1 else list(raw),
                           validation_mode=_NO_VALIDATION)
    if encodings is not None and vr in CHARSET_VRS and isinstance(raw, str):
        raw = fit_text(raw, encodings)
    return DataElement(value.tag, vr, raw, validation_mode=_NO_VALIDATION)

