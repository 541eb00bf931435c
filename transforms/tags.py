"""Tag names as Orthanc accepts them, and the VR a new element of a tag gets.

A tag is named by a pydicom keyword (``PatientName``), by hex (``0010,0010``, ``0010-0010``,
``00100010``; inside paths also ``(0010,0010)``), or by a name registered in a private
dictionary given in Orthanc's ``Dictionary`` configuration format::

    {"4321,1012": ["LO", "RadioButton3", 1, 1, "RadioLogic"]}

(VR, name, min multiplicity, max multiplicity, optional private creator). Tags are plain ints
(``0xGGGGEEEE``) everywhere in the core.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

from pydicom.datadict import (
    DicomDictionary,
    RepeatersDictionary,
    dictionary_VR,
    keyword_dict,
    private_dictionary_VR,
)

from transforms.errors import RequestError

PATIENT_ID = 0x00100020
PATIENT_NAME = 0x00100010
STUDY_INSTANCE_UID = 0x0020000D
SERIES_INSTANCE_UID = 0x0020000E
SOP_INSTANCE_UID = 0x00080018
SOP_CLASS_UID = 0x00080016
SPECIFIC_CHARACTER_SET = 0x00080005
PIXEL_DATA = 0x7FE00010

# Orthanc's "database keys": touching them at top level needs "Force": true.
DATABASE_KEYS = frozenset({PATIENT_ID, STUDY_INSTANCE_UID, SERIES_INSTANCE_UID, SOP_INSTANCE_UID})

# DCMTK spells (0010,1000) "RETIRED_OtherPatientIDs"; Orthanc keeps the old name as an alias.
_ALIASES = {"OtherPatientIDs": 0x00101000}

# Keywords of repeating groups name their first group, as in DCMTK (and so Orthanc):
# OverlayRows is (6000,0010), CurveData (5000,3000). Masks whose first element would be a
# group length (the retired 1000xxx0, 1010xxxx) are left out.
_REPEATER_KEYWORDS = {
    entry[4]: tag
    for mask, entry in RepeatersDictionary.items()
    if (tag := int(mask.replace("x", "0"), 16)) & 0xFFFF
}

_HEX9 = re.compile(r"^([0-9A-Fa-f]{4})[,-]([0-9A-Fa-f]{4})$")
_HEX8 = re.compile(r"^([0-9A-Fa-f]{4})([0-9A-Fa-f]{4})$")
_PAREN = re.compile(r"^\(\s*([0-9A-Fa-f]{4})\s*,\s*([0-9A-Fa-f]{4})\s*\)$")
_CONFIG_KEY = _HEX9  # Dictionary keys: "gggg,eeee" or "gggg-eeee", as Orthanc reads them

# Public tags whose dictionary VR is SQ: used to spot sequences in implicit-VR files without
# converting raw elements.
SQ_TAGS = frozenset(tag for tag, entry in DicomDictionary.items() if entry[0] == "SQ")

_VALID_VRS = frozenset(
    "AE AS AT CS DA DS DT FL FD IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL "
    "UN UR US UT UV".split()
)


#: Groups that never stand in a data set (PS3.5 7.1, 7.8.1): the command group, the reserved
#: odd groups 0001-0007 and FFFF. The writer drops them at top level; a request's nested path
#: or sequence item naming one is ignored, as Orthanc 1.10.1 drops it. (0002, the file meta
#: header, is refused instead: see transforms.request.)
NON_DATA_SET_GROUPS = frozenset({0x0000, 0x0001, 0x0003, 0x0005, 0x0007, 0xFFFF})
FILE_META_GROUP = 0x0002


def is_private(tag: int) -> bool:
    """True for tags of an odd group (private data elements and private creators)."""
    return bool((tag >> 16) & 1)


def describe_tag(tag: int, dictionary: PrivateDictionary | None = None) -> str:
    """Human label for messages: ``'Rows' (0028,0010)`` or ``(0009,1001)``."""
    name = keyword_of(tag, dictionary)
    hex_ = f"({tag >> 16:04X},{tag & 0xFFFF:04X})"
    return f"'{name}' {hex_}" if name else hex_


def keyword_of(tag: int, dictionary: PrivateDictionary | None = None) -> str:
    """The keyword of a tag (public or registered private), or ``''``."""
    if dictionary is not None:
        entry = dictionary.entries.get(tag)
        if entry:
            return entry[0].name
    entry_public = DicomDictionary.get(tag)
    return entry_public[4] if entry_public else ""


@dataclass(frozen=True)
class PrivateEntry:
    """One entry of Orthanc's ``Dictionary`` configuration."""

    tag: int
    vr: str
    name: str
    creator: str | None


@dataclass(frozen=True)
class PrivateDictionary:
    """Tags registered in the configuration (usually private ones, keyed by creator).

    Immutable and picklable; build it with :func:`parse_dictionary`.
    """

    entries: Mapping[int, tuple[PrivateEntry, ...]]
    names: Mapping[str, tuple[PrivateEntry, ...]]

    def find_name(self, name: str, private_creator: str | None) -> PrivateEntry | None:
        """The entry registered under ``name``, preferring the given private creator."""
        candidates = self.names.get(name, ())
        for entry in candidates:
            if entry.creator is None or entry.creator == private_creator:
                return entry
        return candidates[0] if candidates else None

    def vr_for(self, tag: int, private_creator: str | None) -> str | None:
        """The registered VR of ``tag`` for ``private_creator`` (creator-less entries match any)."""
        for entry in self.entries.get(tag, ()):
            if entry.creator is None or entry.creator == private_creator:
                return entry.vr
        return None


def _dictionary_from_entries(flat: tuple[PrivateEntry, ...]) -> PrivateDictionary:
    entries: dict[int, list[PrivateEntry]] = {}
    names: dict[str, list[PrivateEntry]] = {}
    for entry in flat:
        entries.setdefault(entry.tag, []).append(entry)
        names.setdefault(entry.name, []).append(entry)
    return PrivateDictionary(
        entries={k: tuple(v) for k, v in entries.items()},
        names={k: tuple(v) for k, v in names.items()},
    )


EMPTY_DICTIONARY = _dictionary_from_entries(())


def parse_dictionary(config: Mapping[str, object] | None) -> PrivateDictionary:
    """Parse Orthanc's ``Dictionary`` configuration.

    Args:
        config: ``{"gggg,eeee": [VR, name, min, max, creator?], ...}`` or None.

    Raises:
        RequestError: naming ``Dictionary`` and the bad entry.
    """
    if config is None:
        return EMPTY_DICTIONARY
    if not isinstance(config, Mapping):
        raise RequestError("Dictionary: expected an object mapping 'gggg,eeee' to "
                           "[VR, name, min, max, private creator]")
    flat = []
    for key, spec in config.items():
        match = _CONFIG_KEY.match(str(key).strip())
        if not match:
            raise RequestError(f"Dictionary: key {key!r} is not a tag of the form 'gggg,eeee'")
        tag = int(match.group(1) + match.group(2), 16)
        if (not isinstance(spec, list) or len(spec) < 2 or not isinstance(spec[0], str)
                or not isinstance(spec[1], str)):
            raise RequestError(f"Dictionary: entry {key!r} must be [VR, name, min, max, "
                               "private creator]")
        vr = spec[0].upper()
        if vr not in _VALID_VRS:
            raise RequestError(f"Dictionary: entry {key!r} has unknown VR {spec[0]!r}")
        creator = spec[4] if len(spec) > 4 else None
        if creator is not None and not isinstance(creator, str):
            raise RequestError(f"Dictionary: entry {key!r}: private creator must be a string")
        flat.append(PrivateEntry(tag, vr, spec[1], creator or None))
    return _dictionary_from_entries(tuple(flat))


def _hex_tag(text: str, *, allow_parentheses: bool) -> int | None:
    match = _HEX9.match(text) or _HEX8.match(text)
    if match is None and allow_parentheses:
        match = _PAREN.match(text)
    if match is None:
        return None
    return int(match.group(1) + match.group(2), 16)


def parse_tag(
    name: str,
    *,
    key: str,
    dictionary: PrivateDictionary | None = None,
    private_creator: str | None = None,
    allow_parentheses: bool = False,
) -> int:
    """Resolve a tag name to its int.

    Args:
        name: keyword, registered private name, or hex form.
        key: the request key being parsed (``Replace``, ``Keep``...), for error messages.
        dictionary: the configured private dictionary.
        private_creator: preferred creator when a private name is registered several times.
        allow_parentheses: also accept ``(gggg,eeee)`` (inside paths).

    Raises:
        RequestError: naming ``key`` and the unknown ``name``.
    """
    text = name.strip()
    if not text:
        raise RequestError(f"{key}: empty tag name")
    tag = _hex_tag(text, allow_parentheses=allow_parentheses)
    if tag is not None:
        if tag >> 16 == 0xFFFE:
            raise RequestError(f"{key}: {name!r} is an item or delimiter tag (group FFFE), not a data element")
        return tag
    if text in _ALIASES:
        return _ALIASES[text]
    # "RETIRED_" + keyword: DCMTK's (and so Orthanc's) spelling of retired tags
    bare = text[len("RETIRED_"):] if text.startswith("RETIRED_") else text
    found = keyword_dict.get(bare)
    if found is None:
        found = _REPEATER_KEYWORDS.get(bare)
    if found is not None:
        return found
    if dictionary is not None:
        entry = dictionary.find_name(text, private_creator)
        if entry is not None:
            return entry.tag
    hint = difflib.get_close_matches(text, _keywords(), n=1)
    did_you_mean = f"; did you mean '{hint[0]}'?" if hint else ""
    raise RequestError(
        f"{key}: unknown tag {name!r} (expected a DICOM keyword such as 'PatientName', a name "
        "from the configured Dictionary, or hex 'gggg,eeee', 'gggg-eeee', 'ggggeeee')"
        f"{did_you_mean}"
    )


@lru_cache(maxsize=1)
def _keywords() -> list[str]:
    return [*keyword_dict, *_REPEATER_KEYWORDS]


def vr_for_new_element(
    tag: int,
    *,
    dictionary: PrivateDictionary | None = None,
    private_creator: str | None = None,
) -> str:
    """The VR a newly created element of ``tag`` gets, as Orthanc decides it.

    Public tags use the DICOM dictionary (ambiguous VRs such as ``'US or SS'`` are returned
    as is; the value caster resolves them). Private creators are LO. Other private tags use the
    configured ``Dictionary`` (matched with ``private_creator``), then pydicom's private
    dictionary for that creator, else ``UN`` (Orthanc: unknown private VR -> binary).
    """
    if dictionary is not None:
        vr = dictionary.vr_for(tag, private_creator)
        if vr is not None:
            return vr
    if is_private(tag):
        element = tag & 0xFFFF
        if 0x0010 <= element <= 0x00FF:
            return "LO"
        if private_creator:
            try:
                # pydicom spells one private entry's VR 'OB_OW' (TOSHIBA_MEC_OT3 7019,xx80)
                return private_dictionary_VR(tag, private_creator).replace("_", " or ")
            except KeyError:
                pass
        return "UN"
    try:
        return dictionary_VR(tag)
    except KeyError:
        return "UN"
