"""Study split and merge (Orthanc's ``/studies/{id}/split`` and ``/merge``) as pure planning.

A batch split or merge runs in two passes over the input:

1. every readable file gives a small :class:`IndexEntry` (:func:`index_entry`, headers only);
   :func:`plan_split` / :func:`plan_merge` validate the request against the whole index and
   return an immutable, picklable :class:`Plan`, or raise :class:`RequestError` before
   anything is written;
2. :func:`apply_plan` turns each selected instance into its new, re-parented dataset; every
   other input is, by :meth:`Plan.disposition`, copied unchanged or skipped.

Behaviour (``orthanc-behavior.md`` §11, §12), and where we deliberately differ:

- Split: the chosen series / instances move to one new study: one new StudyInstanceUID for
  the operation, one new SeriesInstanceUID per *source* series, one new SOPInstanceUID per
  instance. ``Replace`` / ``Remove`` may name only Patient and General Study module tags
  (minus StudyInstanceUID); removals, then replacements, then the three UIDs; nothing else
  changes (InstanceNumber kept).
- Merge: the chosen studies / series / instances join the target study. StudyInstanceUID and
  every Patient / General Study module tag are copied from the target's *first instance*
  (smallest Orthanc instance id, so the choice does not depend on file names or read order);
  a tag the first instance lacks, holds as a sequence, or holds longer than 256 bytes is
  removed from the merged instances (Orthanc's rule). New SeriesInstanceUID per source
  series, new SOPInstanceUID per instance.
- New UIDs derive from the key and the operation (:class:`transforms.identity.Key`), never
  from a random draw: the same key and input give the same output.
- Difference from Orthanc, which changes only the three top-level UIDs: references among the
  moved instances follow them (:func:`apply_plan`), so an RTSTRUCT moved with its CT, or an SR
  moved with its evidence, still resolves.
- Difference from Orthanc, which writes any string: ``Replace`` values must fit the tag's VR.
- Text that the instance's character set cannot encode (a Greek name copied into a Latin-1
  file) switches that instance to UTF-8 (``ISO_IR 192``), re-encoding its text, rather than
  writing replacement characters.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from pydicom import config as pydicom_config
from pydicom.charset import convert_encodings
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import validate_value

from transforms import paths
from transforms.dicomio import CHARSET_VRS, peek, raw_vr, shallow_copy
from transforms.errors import InputError, RequestError, json_type
from transforms.identity import Key
from transforms.orthanc_ids import is_orthanc_id, orthanc_ids
from transforms.tags import describe_tag as _label
from transforms.tags import parse_tag

SPLIT = "split"
MERGE = "merge"

# Patient Module and General Study Module, as Orthanc lists them (DicomTag.cpp:195-244, from
# DICOM 2011 Tables C.7-1 and C.7-3). Order kept for readable messages.
PATIENT_MODULE_TAGS: tuple[int, ...] = (
    0x00100010, 0x00100020, 0x00100030, 0x00100040, 0x00081120, 0x00100032, 0x00101000,
    0x00101002, 0x00101001, 0x00102160, 0x00104000, 0x00102201, 0x00102202, 0x00102292,
    0x00102293, 0x00102294, 0x00102297, 0x00102298, 0x00102299, 0x00120062, 0x00120063,
    0x00120064, 0x00100021, 0x00100024,
)  # fmt: skip
GENERAL_STUDY_MODULE_TAGS: tuple[int, ...] = (
    0x0020000D, 0x00080020, 0x00080030, 0x00080090, 0x00080096, 0x00200010, 0x00080050,
    0x00080051, 0x00081030, 0x00081048, 0x00081049, 0x00081060, 0x00081062, 0x00321034,
    0x00081110, 0x00081032, 0x00401012,
)  # fmt: skip
MODULE_TAGS: tuple[int, ...] = PATIENT_MODULE_TAGS + GENERAL_STUDY_MODULE_TAGS

_STUDY_UID = 0x0020000D
_SERIES_UID = 0x0020000E
_SOP_UID = 0x00080018
_CHARSET = 0x00080005
_HIERARCHY = frozenset({_STUDY_UID, _SERIES_UID, _SOP_UID})
_REFERENCED_SOP_UID = 0x00081155
#: Which map a UID reference is looked up in, by its tag (as Orthanc's relationships visitor
#: chooses, orthanc-behavior.md 4.4): a nested StudyInstanceUID names a study, never a series
#: or an instance whose UID happens to be equal (an SR's evidence in a file whose study and
#: series UIDs are one value); a SOP reference an instance. Other UIDs (an SR content item's
#: UID, 0040,A124) are looked up in every map.
_MAP_OF_TAG = {_STUDY_UID: "study", _SERIES_UID: "series", _SOP_UID: "sop", _REFERENCED_SOP_UID: "sop",
               0x00041511: "sop"}  # (ReferencedSOPInstanceUIDInFile)
#: Sequences whose ReferencedSOPInstanceUID names a study (the Study "SOP instance"):
#: ReferencedStudySequence, RTReferencedStudySequence (Orthanc's RT-STRUCT rule).
_STUDY_REFERENCE_SEQUENCES = frozenset({0x00081110, 0x30060012})
#: UIDs that are never references to the hierarchy, whatever their value: frames of reference
#: (a modification keeps them, as Orthanc's does; some files reuse the StudyInstanceUID as
#: FrameOfReferenceUID) and classes.
_NOT_REMAPPED = frozenset({
    0x00200052, 0x00200200, 0x30060024, 0x300600C2,  # FrameOfReferenceUID and its references
    0x00080016, 0x00081150,  # SOPClassUID, ReferencedSOPClassUID
})
#: Sequences whose SOP references name no instance of a study: the performed procedure step.
_NOT_HIERARCHY_SEQUENCES = frozenset({0x00081111})  # ReferencedPerformedProcedureStepSequence
#: Tags a split's Replace/Remove may name (StudyInstanceUID is the split's own business).
SPLIT_MODIFIABLE_TAGS = frozenset(MODULE_TAGS) - {_STUDY_UID, _SERIES_UID}
#: Orthanc's ORTHANC_MAXIMUM_TAG_LENGTH: longer values are not "plain strings" for merge.
MAX_COPIED_LENGTH = 256
_UTF8 = "ISO_IR 192"

# Keys a body may carry that only steer Orthanc's job engine: accepted and ignored.
_JOB_KEYS = frozenset({"Asynchronous", "Synchronous", "Priority", "Permissive", "KeepLabels"})
_SPLIT_KEYS = frozenset({"Series", "Instances", "Replace", "Remove", "KeepSource"}) | _JOB_KEYS
_MERGE_KEYS = frozenset({"Resources", "KeepSource"}) | _JOB_KEYS


# --------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class SplitRequest:
    """A validated split body. Identifiers are still the caller's strings (UIDs or Orthanc ids)."""

    study: str
    series: tuple[str, ...] = ()
    instances: tuple[str, ...] = ()
    replace: tuple[tuple[int, str], ...] = ()  # (tag, value), sorted by tag
    remove: tuple[int, ...] = ()  # sorted
    keep_source: bool = False


@dataclass(frozen=True)
class MergeRequest:
    """A validated merge body."""

    target: str
    resources: tuple[str, ...]
    keep_source: bool = False


class NotInInput(RequestError):
    """A study, series or instance the request names that the index of INPUT does not hold."""


def _check_keys(body: Any, allowed: frozenset[str], what: str) -> Mapping[str, Any]:
    if not isinstance(body, Mapping):
        raise RequestError(f"{what}: the body must be a JSON object")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise RequestError(
            f"{what}: unknown key(s) {', '.join(map(repr, unknown))}; allowed: "
            f"{', '.join(sorted(allowed - _JOB_KEYS))} (and Orthanc's job keys, ignored)"
        )
    return body


def _keep_source(body: Mapping[str, Any], what: str) -> bool:
    value = body.get("KeepSource", False)
    if not isinstance(value, bool):
        raise RequestError(f"{what}: KeepSource must be true or false, got {json_type(value)}")
    return value


def _identifier(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise RequestError(f"{where}: expected a DICOM UID or an Orthanc id (a non-empty string)")
    return value.strip()


def _identifiers(body: Mapping[str, Any], name: str, what: str) -> tuple[str, ...]:
    value = body.get(name, [])
    if not isinstance(value, list):
        raise RequestError(f"{what}: {name} must be an array of identifiers")
    return tuple(_identifier(item, f"{what}: {name}[{i}]") for i, item in enumerate(value))


def _cast_split_value(tag: int, value: Any) -> str:
    """Check a split ``Replace`` value: a string that fits the tag's VR."""
    vr = dictionary_VR(tag)
    if vr == "SQ":
        raise RequestError(
            f"split: Replace: tag {_label(tag)} is a sequence; a split can only replace it "
            "with a string, which DICOM forbids (use Remove to drop it)"
        )
    if not isinstance(value, str):
        raise RequestError(f"split: Replace: the value of tag {_label(tag)} must be a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # JSON's "\ud800" (Orthanc answers 400)
        raise RequestError(f"split: Replace: the value of tag {_label(tag)} holds an unpaired surrogate "
                           "(\\ud800-\\udfff), which is not valid Unicode") from None
    # Orthanc cuts the value at its first NUL; trailing NULs are padding, one inside the value
    # would silently drop what follows it: refused, as modify does.
    value = value.rstrip("\0")
    if "\0" in value:
        raise RequestError(f"split: Replace: the value of tag {_label(tag)} holds a NUL character")
    for part in value.split("\\") if vr not in ("LT", "ST", "UT") else (value,):
        try:
            validate_value(vr, part, pydicom_config.RAISE)
        except (ValueError, TypeError):
            raise RequestError(
                f"split: Replace: the value of tag {_label(tag)} does not fit its VR {vr} "
                "(PS3.5 Table 6.2-1 gives the allowed characters and lengths)"
            ) from None
    return value


def _module_tag(name: Any, where: str) -> int:
    if not isinstance(name, str):
        raise RequestError(f"{where}: expected a tag name (string)")
    tag = parse_tag(name, key=where)
    if tag not in SPLIT_MODIFIABLE_TAGS:
        why = (
            "the split generates it"
            if tag in (_STUDY_UID, _SERIES_UID, _SOP_UID)
            else "not in the patient/study modules"
        )
        raise RequestError(f"{where}: cannot modify tag {_label(tag)} while splitting a study ({why})")
    return tag


def parse_split(study: str, body: Any) -> SplitRequest:
    """Validate a split body (Orthanc's, verbatim). Raises RequestError naming the key."""
    what = "split"
    body = _check_keys(body, _SPLIT_KEYS, what)
    series = _identifiers(body, "Series", what)
    instances = _identifiers(body, "Instances", what)
    if not series and not instances:
        raise RequestError(
            'split: both the "Series" and the "Instances" fields are missing or empty: nothing to split'
        )
    replace_body = body.get("Replace", {})
    if not isinstance(replace_body, Mapping):
        raise RequestError("split: Replace must be an object mapping tag names to strings")
    replace: dict[int, str] = {}
    for name, value in sorted(replace_body.items()):  # one tag under two names: the later name
        tag = _module_tag(name, "split: Replace")       # in sorted order wins, as in Orthanc (jsoncpp)
        replace[tag] = _cast_split_value(tag, value)
    remove_body = body.get("Remove", [])
    if not isinstance(remove_body, list):
        raise RequestError("split: Remove must be an array of tag names")
    # Orthanc removes, then replaces: a tag in both ends up with the replacement.
    remove = {_module_tag(name, "split: Remove") for name in remove_body} - set(replace)
    return SplitRequest(
        study=_identifier(study, "--study"),
        series=series,
        instances=instances,
        replace=tuple(sorted(replace.items())),
        remove=tuple(sorted(remove)),
        keep_source=_keep_source(body, what),
    )


def parse_merge(target: str, body: Any) -> MergeRequest:
    """Validate a merge body (Orthanc's, verbatim). Raises RequestError naming the key."""
    what = "merge"
    body = _check_keys(body, _MERGE_KEYS, what)
    if "Resources" not in body:
        raise RequestError("merge: Resources is mandatory (an array of study, series or instance ids)")
    resources = _identifiers(body, "Resources", what)
    if not resources:
        raise RequestError("merge: Resources is empty: nothing to merge")
    return MergeRequest(
        target=_identifier(target, "--study"),
        resources=resources,
        keep_source=_keep_source(body, what),
    )


# --------------------------------------------------------------------------- index


class IndexEntry(NamedTuple):
    """What the planner needs to know of one readable input file (headers only).

    ``study_tags`` is set only for instances of the study named by ``study_tags_for`` (the
    merge target): ``((tag, value or None), ...)`` over :data:`MODULE_TAGS`, None meaning
    "remove".
    """

    source: str
    patient_id: str
    study_uid: str
    series_uid: str
    sop_uid: str
    patient: str  # Orthanc ids
    study: str
    series: str
    instance: str
    study_tags: tuple[tuple[int, str | None], ...] | None = None


#: The index's identifiers: (tag, the VR a raw element may be read with without pydicom).
_INDEX_TAGS = {"PatientID": (0x00100020, "LO"), "StudyInstanceUID": (_STUDY_UID, "UI"),
               "SeriesInstanceUID": (_SERIES_UID, "UI"), "SOPInstanceUID": (_SOP_UID, "UI")}

#: Printable ASCII without a backslash, then NUL padding: bytes every DICOM character set
#: decodes as ASCII, into one value (the text pydicom would give, up to its padding).
_PLAIN_ASCII = re.compile(rb"[\x20-\x5b\x5d-\x7e]*\x00*\Z")


def _text(ds: Dataset, keyword: str) -> str:
    tag, vr = _INDEX_TAGS[keyword]
    raw = ds._dict.get(tag)
    plain = type(raw) is RawDataElement and raw.VR in (vr, None) and type(raw.value) is bytes
    if plain and _PLAIN_ASCII.match(raw.value):
        # Without pydicom's conversion (which derives the character set for every value):
        # the index reads four values of every file of an archive.
        value = raw.value.decode("ascii")
    else:
        try:
            value = peek(ds, keyword)
        except Exception:  # noqa: BLE001 - a damaged VR (a PatientID of VR US, 3 bytes): its bytes
            # as text, as the audit's identity columns read them (transforms.files.safe_str).
            value = raw.value.decode("ascii", "replace") if isinstance(getattr(raw, "value", None), bytes) else ""
    if isinstance(value, (MultiValue, list, tuple)):
        value = "\\".join(str(v) for v in value)  # as stored: Orthanc hashes the text
    # A PatientID keeps its leading spaces, as Orthanc's ids do (DCMTK strips trailing only).
    return str(value or "").rstrip(" \0") if keyword == "PatientID" else str(value or "").strip(" \0")


def index_entry(source: str, ds: Dataset, *, study_tags_for: str | None = None) -> IndexEntry:
    """The index record of one dataset (headers are enough: ``stop_before_pixels``).

    Args:
        source: the input's URI, the record's key.
        ds: the parsed dataset; it is not modified.
        study_tags_for: the merge target (StudyInstanceUID or Orthanc study id): instances of
            that study also record the module tags a merge copies.
    """
    patient_id = _text(ds, "PatientID")
    study_uid, series_uid, sop_uid = (_text(ds, k) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"))
    ids = orthanc_ids(patient_id, study_uid, series_uid, sop_uid)
    tags = None
    if study_tags_for is not None and study_tags_for.strip() in (study_uid, ids["study"]):
        tags = copied_study_tags(ds)
    return IndexEntry(source, patient_id, study_uid, series_uid, sop_uid,
                      ids["patient"], ids["study"], ids["series"], ids["instance"], tags)  # fmt: skip


def _plain_string(ds: Dataset, tag: int) -> str | None:
    """Orthanc's "plain string" of an element (DicomValue::IsString), or None."""
    raw = ds.get_item(tag)
    if raw is None:
        return None
    if (isinstance(raw, RawDataElement) and raw.length != 0xFFFFFFFF and raw.length > MAX_COPIED_LENGTH
            and raw.value and raw.value[-1:] not in (b" ", b"\0")
            and b"\0" not in raw.value[: MAX_COPIED_LENGTH + 1]):
        # Too long, without decoding it. Not when it ends in padding, which the limit does not
        # count (Orthanc copies "Allergic to contrast" padded to 320 bytes), nor with a NUL,
        # which cuts it short: see below.
        return None
    try:
        elem = ds[tag]
    except Exception:  # noqa: BLE001 - undecodable (a damaged VR or length): not a plain string
        return None
    if elem.VR == "SQ" or elem.VR in ("OB", "OW", "UN", "OD", "OF", "OL", "OV"):
        return None
    value = elem.value
    if value is None:
        return ""
    if isinstance(value, (MultiValue, list, tuple)):
        text = "\\".join(str(v) for v in value)
    else:
        text = str(value)
    text = text.split("\0", 1)[0]  # Orthanc reads the value as a C string
    if len(text.encode("utf-8")) > MAX_COPIED_LENGTH:
        return None
    return text


def copied_study_tags(ds: Dataset) -> tuple[tuple[int, str | None], ...]:
    """The module tags a merge copies from its target's first instance (None: remove)."""
    return tuple((tag, _plain_string(ds, tag)) for tag in MODULE_TAGS)


# --------------------------------------------------------------------------- plan

MOVE = "move"
UNSELECTED = "unselected"


@dataclass(frozen=True)
class Plan:
    """Everything the per-instance pass needs; immutable by convention, picklable.

    ``moves`` maps a moved input's URI to its (new SeriesInstanceUID, new SOPInstanceUID).
    Inputs sharing a SOPInstanceUID (``duplicates`` lists all but the first, ``duplicate_of``
    maps each to the first) get the same new UIDs: identical files give identical outputs; a
    differing one fails as a duplicate, whatever the order the workers reach them in.
    ``sop_map`` / ``series_map`` / ``study_map`` map old UIDs to new ones for references;
    ``partial`` holds the old series UIDs and ``partial_studies`` the old study UIDs from
    which only some instances move (apart: one UID may be both a study's and a series'), and
    ``staying`` the SOPInstanceUIDs left behind in them.
    """

    operation: str
    keep_source: bool
    study_uid: str  # the StudyInstanceUID every moved instance gets
    study_id: str  # its Orthanc id (with the resulting PatientID)
    moves: Mapping[str, tuple[str, str]]
    duplicates: frozenset[str]
    sop_map: Mapping[str, str]
    series_map: Mapping[str, str]
    study_map: Mapping[str, str]
    partial: frozenset[str]
    staying: frozenset[str]
    set_tags: tuple[tuple[int, str], ...] = ()
    remove_tags: tuple[int, ...] = ()
    source_studies: tuple[str, ...] = field(default=())  # Orthanc ids, sorted
    duplicate_of: Mapping[str, str] = field(default_factory=dict)  # duplicate source -> defining one
    partial_studies: frozenset[str] = frozenset()

    def disposition(self, source: str) -> str:
        """``move`` or ``unselected``."""
        return MOVE if source in self.moves else UNSELECTED

    def describe(self) -> str:
        """Short text for the audit's ``request`` column (no identifiers, no values)."""
        parts = [f"{self.operation}: {len(self.moves)} instance(s) in {len(self.series_map)} series"]
        if self.operation == SPLIT:
            if self.set_tags:
                parts.append("Replace " + ",".join(keyword_for_tag(t) or f"{t:08x}" for t, _ in self.set_tags))
            if self.remove_tags:
                parts.append("Remove " + ",".join(keyword_for_tag(t) or f"{t:08x}" for t in self.remove_tags))
        parts.append(f"KeepSource {'true' if self.keep_source else 'false'}")
        return "; ".join(parts)


def _digest(parts: Iterable[str]) -> str:
    """A stable name for an operation's inputs (the key is applied on top of it)."""
    h = hashlib.sha256()
    for part in parts:
        data = part.encode("utf-8")
        h.update(len(data).to_bytes(8, "big"))
        h.update(data)
    return h.hexdigest()


class _Index:
    """Lookups over the index entries, for resolving the caller's identifiers."""

    def __init__(self, entries: Iterable[IndexEntry]) -> None:
        self.entries = sorted(entries, key=lambda e: (e.instance, e.source))
        self.by_study: dict[str, list[IndexEntry]] = {}
        self.study_ids_by_uid: dict[str, set[str]] = {}
        self.series_ids_by_uid: dict[str, set[str]] = {}
        self.instance_ids_by_uid: dict[str, set[str]] = {}
        self.series_ids: set[str] = set()
        self.instance_ids: set[str] = set()
        self.patient_ids: set[str] = set()
        self.study_of: dict[str, str] = {}  # series/instance Orthanc id -> study Orthanc id
        self.by_member: dict[str, list[IndexEntry]] = {}  # series or instance Orthanc id -> entries
        for e in self.entries:
            self.by_study.setdefault(e.study, []).append(e)
            self.by_member.setdefault(e.series, []).append(e)
            self.by_member.setdefault(e.instance, []).append(e)
            self.study_ids_by_uid.setdefault(e.study_uid, set()).add(e.study)
            self.series_ids_by_uid.setdefault(e.series_uid, set()).add(e.series)
            self.instance_ids_by_uid.setdefault(e.sop_uid, set()).add(e.instance)
            self.series_ids.add(e.series)
            self.instance_ids.add(e.instance)
            self.patient_ids.add(e.patient)
            self.study_of[e.series] = e.study
            self.study_of[e.instance] = e.study

    def study(self, spec: str, where: str, missing: str) -> str:
        if is_orthanc_id(spec):
            if spec in self.by_study:
                return spec
            raise NotInInput(f"{where}: {missing}")
        found = self.study_ids_by_uid.get(spec, set())
        if not found:
            raise NotInInput(f"{where}: {missing}")
        if len(found) > 1:
            raise RequestError(
                f"{where}: this StudyInstanceUID names {len(found)} studies in INPUT (different "
                "PatientIDs); give the Orthanc id of the one you mean (the README's listing of "
                "studies shows them)"
            )
        return next(iter(found))


def _resolve_members(entries: Sequence[IndexEntry], specs: Sequence[str], level: str, name: str) -> list[IndexEntry]:
    """The entries of one study selected by series or instance identifiers (looked up in a
    table built once: a selection of 100,000 instances used to scan the study for each)."""
    by_name: dict[str, list[IndexEntry]] = {}
    for e in entries:
        names = (e.series, e.series_uid) if level == "series" else (e.instance, e.sop_uid)
        for n in dict.fromkeys(names):
            by_name.setdefault(n, []).append(e)
    chosen: list[IndexEntry] = []
    for i, spec in enumerate(specs):
        hits = by_name.get(spec, [])
        if not hits:
            raise NotInInput(
                f"split: {name}[{i}]: this {level} does not belong to the study to be split "
                f"(give a {'SeriesInstanceUID' if level == 'series' else 'SOPInstanceUID'} or "
                f"an Orthanc {level} id of that study)"
            )
        chosen.extend(hits)
    return chosen


def _dedupe(moved: Iterable[IndexEntry]) -> tuple[list[IndexEntry], dict[str, str]]:
    """One input per instance defines the new UIDs (the first URI). An instance is what Orthanc
    calls one: its id hashes PatientID and the Study, Series and SOP Instance UIDs, so one
    SOPInstanceUID filed in two series (or under two patients) is two instances, as there.

    Returns the defining entries and ``{duplicate source: defining source}`` for the others.
    """
    winners: dict[str, IndexEntry] = {}
    losers: dict[str, str] = {}
    for e in sorted(set(moved), key=lambda e: (e.instance, e.source)):
        if e.instance in winners:
            losers[e.source] = winners[e.instance].source
        else:
            winners[e.instance] = e
    return sorted(winners.values(), key=lambda e: (e.instance, e.source)), losers


def _build(
    operation: str,
    index: _Index,
    moved: list[IndexEntry],
    duplicates: dict[str, str],
    key: Key,
    *,
    study_uid: str,
    study_id: str,
    seed: str,
    study_map_to: str,
    keep_source: bool,
    set_tags: tuple[tuple[int, str], ...] = (),
    remove_tags: tuple[int, ...] = (),
) -> Plan:
    moved_sources = {e.source for e in moved}
    moved_sops = {e.sop_uid for e in moved}
    series_map: dict[str, str] = {}  # old UID -> new, for references (the first if shared)
    moves: dict[str, tuple[str, str]] = {}
    sop_map: dict[str, str] = {}
    # New UIDs derive from the old UID; only a UID that Orthanc would see as several series or
    # instances (the same UID under another patient, study or series) adds the Orthanc id, so
    # ordinary inputs keep the UIDs earlier releases gave them.
    series_ids: dict[str, set[str]] = {}
    instance_ids: dict[str, set[str]] = {}
    for e in moved:
        series_ids.setdefault(e.series_uid, set()).add(e.series)
        instance_ids.setdefault(e.sop_uid, set()).add(e.instance)
    new_series_by_id: dict[str, str] = {}
    for e in moved:
        new_series = new_series_by_id.get(e.series)
        if new_series is None:
            shared = f"|{e.series}" if len(series_ids[e.series_uid]) > 1 else ""
            new_series = new_series_by_id[e.series] = key.uid(f"{operation}-series", f"{seed}|{e.series_uid}{shared}")
            series_map.setdefault(e.series_uid, new_series)
        shared = f"|{e.instance}" if len(instance_ids[e.sop_uid]) > 1 else ""
        new_sop = key.uid(f"{operation}-instance", f"{seed}|{e.sop_uid}{shared}")
        moves[e.source] = (new_series, new_sop)
        sop_map.setdefault(e.sop_uid, new_sop)
    for loser, winner in sorted(duplicates.items()):
        moves[loser] = moves[winner]
    source_studies = sorted({e.study for e in moved})
    study_uids = {e.study_uid for e in moved}
    # Containers some of whose instances stay behind: references to them follow the move only
    # where the referring item points at moved instances alone (see apply_plan).
    partial: set[str] = set()
    partial_studies: set[str] = set()
    staying: set[str] = set()
    for e in index.entries:
        if e.source in moved_sources or e.source in duplicates:
            continue
        if e.series_uid in series_map and e.sop_uid not in moved_sops:
            partial.add(e.series_uid)
            staying.add(e.sop_uid)
        if e.study_uid in study_uids and e.study in source_studies and e.sop_uid not in moved_sops:
            partial_studies.add(e.study_uid)
            staying.add(e.sop_uid)
    return Plan(
        operation=operation,
        keep_source=keep_source,
        study_uid=study_uid,
        study_id=study_id,
        moves=moves,
        duplicates=frozenset(duplicates),
        duplicate_of=dict(duplicates),
        sop_map=sop_map,
        series_map=series_map,
        study_map={uid: study_map_to for uid in sorted(study_uids) if uid != study_map_to},
        partial=frozenset(partial),
        partial_studies=frozenset(partial_studies),
        staying=frozenset(staying),
        set_tags=set_tags,
        remove_tags=remove_tags,
        source_studies=tuple(source_studies),
    )


def plan_split(entries: Iterable[IndexEntry], request: SplitRequest, key: Key) -> Plan:
    """Validate a split against the index and compute its new identifiers.

    The new StudyInstanceUID is ``key.uid('split-study', digest)`` where the digest covers the
    source study, the moved instances and the requested tag changes: a rerun with the same
    key and input gives the same UIDs. New Series / SOP Instance UIDs derive from it and the
    original UID.

    Raises:
        RequestError: unknown study, a series or instance not in it, nothing selected.
    """
    index = _Index(entries)
    study = index.study(request.study, "split: --study", "no instance of this study in INPUT (cannot split an unknown study)")
    members = index.by_study[study]
    chosen = _resolve_members(members, request.series, "series", "Series")
    chosen += _resolve_members(members, request.instances, "instance", "Instances")
    moved, duplicates = _dedupe(chosen)
    seed = _digest(
        ["split", study]
        + [e.instance for e in moved]
        + [json.dumps([list(request.replace), list(request.remove)])]
    )
    new_study = key.uid("split-study", seed)
    replaced = dict(request.replace)
    patient_id = members[0].patient_id
    if 0x00100020 in replaced:
        patient_id = replaced[0x00100020]
    elif 0x00100020 in request.remove:
        patient_id = ""
    return _build(
        SPLIT, index, moved, duplicates, key,
        study_uid=new_study,
        study_id=orthanc_ids(patient_id, new_study, "", "")["study"],
        seed=new_study,
        study_map_to=new_study,
        keep_source=request.keep_source,
        set_tags=request.replace,
        remove_tags=request.remove,
    )  # fmt: skip


def plan_merge(entries: Iterable[IndexEntry], request: MergeRequest, key: Key) -> Plan:
    """Validate a merge against the index and compute its new identifiers.

    The index must have been built with ``study_tags_for=request.target`` so the target's
    instances carry their module tags. The first instance of the target is the one with the
    smallest Orthanc instance id.

    Raises:
        RequestError: unknown or empty target, unknown resource, a patient, the target itself
            or something already in it.
    """
    index = _Index(entries)
    target = index.study(
        request.target,
        "merge: --study",
        "no instance of this target study in INPUT (cannot merge into an unknown or empty study)",
    )
    first = index.by_study[target][0]
    if first.study_tags is None:
        raise ValueError("plan_merge: the index lacks the target's study tags; build it with study_tags_for=<target>")
    chosen: list[IndexEntry] = []
    for i, spec in enumerate(request.resources):
        where = f"merge: Resources[{i}]"
        if is_orthanc_id(spec):
            if spec in index.patient_ids and spec not in index.by_study and spec not in index.study_of:
                raise RequestError(f"{where}: this is a patient, neither a study, nor a series, nor an instance")
            matches = [(spec, "study")] if spec in index.by_study else []
            matches += [(spec, "series")] if spec in index.series_ids else []
            matches += [(spec, "instance")] if spec in index.instance_ids else []
        else:
            matches = [(s, "study") for s in sorted(index.study_ids_by_uid.get(spec, ()))]
            matches += [(s, "series") for s in sorted(index.series_ids_by_uid.get(spec, ()))]
            matches += [(s, "instance") for s in sorted(index.instance_ids_by_uid.get(spec, ()))]
        if not matches:
            raise NotInInput(f"{where}: no study, series or instance in INPUT has this identifier")
        if len(matches) > 1:
            raise RequestError(
                f"{where}: this identifier names {len(matches)} resources in INPUT (a UID shared "
                "by several patients or levels); give the Orthanc id of the one you mean (the "
                "README's listing of studies shows them)"
            )
        resource, level = matches[0]
        if resource == target or index.study_of.get(resource) == target:
            raise RequestError(
                f"{where}: this {level} is already in the target study (a study cannot be merged into itself)"
            )
        if level == "study":
            chosen.extend(index.by_study[resource])
        else:
            chosen.extend(index.by_member[resource])
    moved, duplicates = _dedupe(chosen)
    copied = dict(first.study_tags)
    target_uid = first.study_uid
    seed = key.uid("merge-operation", _digest(["merge", target] + [e.instance for e in moved]))
    return _build(
        MERGE, index, moved, duplicates, key,
        study_uid=target_uid,
        study_id=target,
        seed=seed,
        study_map_to=target_uid,
        keep_source=request.keep_source,
        set_tags=tuple((t, v) for t, v in sorted(copied.items()) if v is not None and t != _STUDY_UID),
        remove_tags=tuple(sorted(t for t, v in copied.items() if v is None and t != _STUDY_UID)),
    )  # fmt: skip


# --------------------------------------------------------------------------- apply


def _vr_of(tag: int, elem: Any) -> str | None:
    if isinstance(elem, RawDataElement):
        if elem.VR:
            return str(elem.VR)
        if elem.length == 0xFFFFFFFF:
            return "SQ"  # undefined length in implicit VR: a sequence
        try:
            return str(dictionary_VR(tag))
        except KeyError:
            return None
    return str(elem.VR)


def _uids(elem: Any) -> list[str]:
    if isinstance(elem, RawDataElement):
        raw = elem.value or b""
        return [v.decode("ascii", "replace").strip(" \0") for v in raw.split(b"\\")] if raw else []
    value = elem.value
    if value is None:
        return []
    values = value if isinstance(value, (MultiValue, list, tuple)) else [value]
    return [str(v).strip(" \0") for v in values]


class _Remapper:
    """Rewrites UID references of one moved instance; see :func:`apply_plan`."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.items_left = paths.MAX_WALKED_ITEMS  # items decoding may still build (paths.py)
        self.values_left = paths.MAX_MAPPED_VALUES  # values of multi-valued UIDs to compare

    def _values(self, elem: Any) -> list[str]:
        """:func:`_uids`, counted against :data:`transforms.paths.MAX_MAPPED_VALUES` before a
        raw value is split (``rewrite`` splits again what ``flags`` counted).

        Raises:
            InputError: ``too_large``.
        """
        raw = elem.value if isinstance(elem, RawDataElement) else None
        counted = raw.count(b"\\") + 1 if isinstance(raw, bytes) and b"\\" in raw else 0
        self._spend(counted)
        values = _uids(elem)
        if not counted and len(values) > 1:  # decoded already
            self._spend(len(values))
        return values

    def _spend(self, count: int) -> None:
        self.values_left -= count
        if self.values_left < 0:
            raise InputError(f"too many values of multi-valued UIDs to compare in one file (at most "
                             f"{paths.MAX_MAPPED_VALUES:,})", reason="too_large")

    def _items(self, item: Dataset, tag: int, elem: Any) -> Sequence[Dataset]:
        if isinstance(elem, RawDataElement):
            paths.check_item_count(elem, self.items_left)
            elem = paths.convert_sequence(elem, tag, _encodings(item), item)
            if elem.VR != "SQ":
                return ()
            item._dict[tag] = elem  # ``item`` belongs to a private copy (see apply)
            self.items_left -= len(elem.value or ())
        return elem.value or ()

    def flags(self, item: Dataset, memo: dict[int, tuple[bool, bool]]) -> tuple[bool, bool]:
        """(references a moved instance, references a staying one), over the item's subtree."""
        cached = memo.get(id(item))
        if cached is not None:
            return cached
        moved = staying = False
        for tag, elem in list(item._dict.items()):
            vr = _vr_of(tag, elem)
            if vr == "UI":
                for uid in self._values(elem):
                    moved |= uid in self.plan.sop_map
                    staying |= uid in self.plan.staying
            elif vr == "SQ":
                for sub in self._items(item, tag, elem):
                    m, s = self.flags(sub, memo)
                    moved |= m
                    staying |= s
        memo[id(item)] = (moved, staying)
        return moved, staying

    def new_value(self, uid: str, context: tuple[bool, bool], kind: str = "any") -> str | None:
        """The new UID of the reference ``uid`` in the map ``kind`` (``sop``, ``series``,
        ``study``; ``any``: the SOP map first, then series, then study)."""
        plan = self.plan
        if kind == "sop" or kind == "any":
            found = plan.sop_map.get(uid)
            if found is not None or kind == "sop":
                return found
        for level in ("series", "study") if kind == "any" else (kind,):
            found = (plan.series_map if level == "series" else plan.study_map).get(uid)
            if found is None:
                continue
            if uid not in (plan.partial if level == "series" else plan.partial_studies):
                return found
            moved, staying = context
            return found if moved and not staying else None
        return None

    def rewrite(self, item: Dataset, memo: dict[int, tuple[bool, bool]], *, top: bool,
                within: int | None = None) -> set[int]:
        """Rewrite ``item`` in place (it is private to us); returns the tags that changed.
        ``within``: the tag of the sequence ``item`` belongs to."""
        changed: set[int] = set()
        context = self.flags(item, memo)
        for tag, elem in list(item._dict.items()):
            if (top and tag in _HIERARCHY) or tag in _NOT_REMAPPED:
                continue
            vr = _vr_of(tag, elem)
            if vr == "UI":
                kind = _MAP_OF_TAG.get(tag, "any")
                if tag == _REFERENCED_SOP_UID and within in _STUDY_REFERENCE_SEQUENCES:
                    kind = "study"
                elif within in _NOT_HIERARCHY_SEQUENCES and kind == "sop":
                    continue
                old = _uids(elem)
                new = [self.new_value(uid, context, kind) or uid for uid in old]
                if new != old:
                    item._dict[tag] = DataElement(tag, "UI", new[0] if len(new) == 1 else new)
                    changed.add(tag)
            elif vr == "SQ":
                for sub in self._items(item, tag, elem):
                    if self.rewrite(sub, memo, top=False, within=tag):
                        changed.add(tag)
        return changed


# UID-shaped runs of bytes. Inside a raw sequence a UID may be followed by one digit that is
# the low byte of the next element's group (0x0030-0x0039), and in big endian preceded by one
# that is the low byte of its own 2-byte length (48-57), hence the trimmed lookups below.
_UID_TOKEN = re.compile(rb"[0-9][0-9.]{1,65}")
_LISTED_TOKENS_UP_TO = 1 << 20  # bytes of a value whose tokens are listed at once (<= ~15 MB)


def _tokens(elem: Any) -> Iterator[str]:
    """UID candidates in an element, read-only: raw bytes are scanned, never converted."""
    if isinstance(elem, RawDataElement):
        value = elem.value or b""
        # A large value is scanned as a stream: findall's list of every token for a crafted
        # value of short numbers (18 MB of "11\\") took 320 MB where the caller's set keeps
        # three. Others as a list: finditer's match objects cost 17% more instructions (the
        # scan of the samples' references: 44.1 million instructions, now 46.4).
        found = (_UID_TOKEN.findall(value) if len(value) <= _LISTED_TOKENS_UP_TO
                 else (match.group() for match in _UID_TOKEN.finditer(value)))
        for token in found:
            text = token.decode("ascii")
            yield text
            yield text[:-1]
            yield text[1:]
            yield text[1:-1]
        return
    if elem.VR == "SQ":
        for item in elem.value or ():
            for sub in item._dict.values():
                yield from _tokens(sub)
    elif elem.VR == "UI" and elem.value:
        values = elem.value if isinstance(elem.value, (MultiValue, list, tuple)) else [elem.value]
        for value in values:
            yield str(value).strip(" \0")


def _remap_references(new: Dataset, plan: Plan) -> None:
    """Rewrite the references of ``new``, a shallow copy whose elements the input shares.

    A read-only scan finds the sequences that mention a moved UID; only those are converted
    (raw) or deep-copied (already decoded) into a scratch data set, rewritten there, and put
    in ``new`` if something changed. Everything else keeps its original bytes on writing.
    """
    sops, series, studies = plan.sop_map, plan.series_map, plan.study_map
    if not (sops or series or studies):
        return
    candidates: list[int] = []
    moved = staying = False
    for tag, elem in new._dict.items():
        if tag in _HIERARCHY or _vr_of(tag, elem) not in ("SQ", "UI"):
            continue
        # Lookups per token: a set operation with a dict's keys (or their union, rebuilt per
        # file) walks every moved UID, which made a merge of 20k instances quadratic.
        tokens = set(_tokens(elem))
        moved |= any(t in sops for t in tokens)
        staying |= not tokens.isdisjoint(plan.staying)
        if any(t in sops or t in series or t in studies for t in tokens):
            candidates.append(tag)
    if not candidates:
        return
    scratch = Dataset()
    scratch._parent_encoding = _encodings(new)
    for tag in candidates:
        elem = new._dict[tag]
        scratch._dict[tag] = elem if isinstance(elem, RawDataElement) else copy.deepcopy(elem)
    memo = {id(scratch): (moved, staying)}  # the whole data set is the context of top-level UIDs
    for tag in _Remapper(plan).rewrite(scratch, memo, top=True):
        new._dict[tag] = scratch._dict[tag]


def _encodable(ds: Dataset, texts: Iterable[str]) -> bool:
    """Whether ``ds``'s SpecificCharacterSet holds every character of ``texts``, judged as the
    modification engine judges a replacement (:func:`transforms.values.fit_text`): ISO_IR 13
    is single-byte (Python's shift_jis codec would take kanji, pydicom then writes "?"), and a
    SpecificCharacterSet naming the default repertoire (ISO_IR 6, an empty first term) is
    ASCII (pydicom would write Latin-1 bytes it does not declare)."""
    from transforms.values import dataset_encodings, fit_text, fitting_encodings

    encodings = fitting_encodings(ds, dataset_encodings(ds))
    return all(text.isascii() or fit_text(text, encodings) == text for text in texts)


def _to_utf8(ds: Dataset) -> None:
    """Decode every text element of ``ds`` (a private copy), at any depth, and declare UTF-8.

    Only the character-set dependent VRs (``dicomio.CHARSET_VRS``) are decoded (pydicom's ``Dataset.decode`` converts
    every element: a damaged DS holding a byte ISO_IR 13 reads as katakana could then not be
    written back, an internal error found by a mutation run)."""
    _decode_texts(ds, _encodings(ds))
    ds._dict[_CHARSET] = DataElement(_CHARSET, "CS", _UTF8)


def _encodings(ds: Dataset) -> list[str]:
    """The codecs of ``ds``'s own SpecificCharacterSet, read from its bytes as the modification
    engine reads them (:func:`transforms.values.dataset_encodings`): a damaged one (VR US, which
    pydicom decodes as numbers and then cannot look up: an internal error found by a mutation
    run) reads as written, or else as the default repertoire."""
    from transforms.values import dataset_encodings

    return dataset_encodings(ds)


def _decode_texts(ds: Dataset, encodings: list[str]) -> None:
    for tag, elem in list(ds._dict.items()):
        if isinstance(elem, RawDataElement):
            vr = raw_vr(tag, elem)
            if vr not in CHARSET_VRS and vr != "SQ":
                continue
            if vr == "SQ":
                elem = paths.convert_sequence(elem, tag, encodings, ds)  # (new items)
            else:
                elem = convert_raw_data_element(elem, encoding=encodings, ds=ds)
        else:
            elem = copy.deepcopy(elem)  # (decoded elements may be the input's)
        if elem.VR == "SQ":
            for item in paths.sequence_items(elem, tag):
                own = item._dict.get(_CHARSET)
                _decode_texts(item, _encodings(item) if own is not None else encodings)
                if own is not None:  # what is left raw there holds no text: read it as UTF-8 too
                    item._dict[_CHARSET] = DataElement(_CHARSET, "CS", _UTF8)
                    implicit, little = item.original_encoding
                    if implicit is not None:
                        item.set_original_encoding(implicit, little, convert_encodings(_UTF8))
        ds._dict[tag] = elem


def check_left_alone(plan: Plan, ds: Dataset) -> None:
    """Raise when ``ds``, an input the plan does not move, is an instance of what it moves: a
    file the first pass could not index (unreadable then, or changed since) must not be left
    behind as "not selected", with its series split between two studies and the run green.

    Raises:
        InputError: ``read_error``.
    """
    sop, series = _text(ds, "SOPInstanceUID"), _text(ds, "SeriesInstanceUID")
    # A series that moves whole, or a moved instance of it (the same SOPInstanceUID in a series
    # that stays is another instance to Orthanc: found by the mutation run).
    if series not in plan.series_map or (series in plan.partial and sop not in plan.sop_map):
        return
    study = orthanc_ids(_text(ds, "PatientID"), _text(ds, "StudyInstanceUID"), "", "")["study"]
    if study in plan.source_studies:
        raise InputError(f"this instance belongs to what the {plan.operation} moves, but the first pass could "
                         "not index it (unreadable then, or changed since): rerun to move it", reason="read_error")


def apply_plan(plan: Plan, ds: Dataset, source: str) -> Dataset:
    """The new, re-parented dataset of the moved input ``source``; ``ds`` is not modified.

    In order: removals and replacements of module tags (split: the request's; merge: the
    target's), the three UIDs, then references: every UI value at any depth (outside the
    top-level Study/Series/SOP Instance UIDs) that names a moved instance takes its new
    SOPInstanceUID; one naming a source series or study takes the new series / study UID when
    all of that series / study moved, or else when the sequence item holding it refers only to
    moved instances (an SR's evidence item, an RTSTRUCT's referenced study item).

    Raises:
        KeyError: ``source`` is not moved by this plan.
    """
    new_series, new_sop = plan.moves[source]
    new = shallow_copy(ds)
    _remap_references(new, plan)
    for tag in plan.remove_tags:
        new._dict.pop(tag, None)
    if plan.set_tags and not _encodable(new, (v for _, v in plan.set_tags)):
        _to_utf8(new)  # before the new values exist: decoding would encode them in the old set
    for tag, value in plan.set_tags:
        new._dict[tag] = DataElement(tag, dictionary_VR(tag), value)
    new._dict[_STUDY_UID] = DataElement(_STUDY_UID, "UI", plan.study_uid)
    new._dict[_SERIES_UID] = DataElement(_SERIES_UID, "UI", new_series)
    new._dict[_SOP_UID] = DataElement(_SOP_UID, "UI", new_sop)
    meta = getattr(new, "file_meta", None)
    if meta is not None and "MediaStorageSOPInstanceUID" in meta:
        meta._dict[0x00020003] = DataElement(0x00020003, "UI", new_sop)
    return new


__all__ = [
    "GENERAL_STUDY_MODULE_TAGS",
    "MERGE",
    "MODULE_TAGS",
    "MOVE",
    "PATIENT_MODULE_TAGS",
    "SPLIT",
    "SPLIT_MODIFIABLE_TAGS",
    "UNSELECTED",
    "IndexEntry",
    "MergeRequest",
    "Plan",
    "SplitRequest",
    "apply_plan",
    "copied_study_tags",
    "index_entry",
    "parse_merge",
    "parse_split",
    "plan_merge",
    "plan_split",
]
