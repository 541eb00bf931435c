"""Orthanc ``/modify`` and ``/anonymize`` bodies parsed once into an immutable :class:`Plan`.

Every check happens here, before any data is touched: unknown keys, wrong types, unknown tag
names, malformed paths, values that do not fit their VR, the ``Force`` guard on the four
database keys, refused removals, unknown ``DicomVersion`` or ``Transcode``. Errors are
:class:`~transforms.errors.RequestError` whose message names the key.

Parsing follows Orthanc's ``DicomModification::ParseModifyRequest`` / ``ParseAnonymizationRequest``:
``Remove``, then ``Replace`` (names in sorted order), then ``Keep``, each entry moving its tag
between the plan's sets, hence **Keep beats Replace beats Remove**.

Deliberate differences from Orthanc 1.12 (user-friendly refusals, all before any work):

* unknown top-level keys are refused, listing the allowed keys (Orthanc ignores them);
* a patient-level modification without ``Force`` must replace ``PatientID`` (documented by
  Orthanc, not enforced by it);
* removing PatientID/Study/Series/SOPInstanceUID with ``Force`` is refused at parse time
  (Orthanc fails each instance at apply time);
* DS/IS values must be numbers (Orthanc stores ``"abc"`` verbatim); numeric and AT values
  accept backslash-separated lists where the tag's VM allows several values and are refused
  for single-valued tags (Orthanc refuses every list for US/SS/SL/FL/FD and silently keeps the
  first AT); replacing a file-meta (0002,xxxx) tag is refused (the meta header is regenerated
  on write, so the value would be silently lost);
* modification UIDs are derived from the key under the plan's fingerprint: reruns of the same
  body give the same new UIDs, different bodies never share one (Orthanc: random per request).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from transforms import PRODUCT, __version__
from transforms.errors import RequestError, json_type
from transforms.paths import TagPath, parse_path
from transforms.tags import (
    DATABASE_KEYS,
    EMPTY_DICTIONARY,
    FILE_META_GROUP,
    NON_DATA_SET_GROUPS,
    PATIENT_ID,
    PATIENT_NAME,
    SERIES_INSTANCE_UID,
    SOP_CLASS_UID,
    SOP_INSTANCE_UID,
    STUDY_INSTANCE_UID,
    PrivateDictionary,
    describe_tag,
    is_private,
    parse_dictionary,
)
from transforms.values import Value, prepare_value

LEVELS = ("Patient", "Study", "Series", "Instance")
_LEVEL_ALIASES = {
    "patient": "Patient", "patients": "Patient",
    "study": "Study", "studies": "Study",
    "series": "Series",
    "instance": "Instance", "instances": "Instance", "image": "Instance", "images": "Instance",
}

PATIENT_IDENTITY_REMOVED = 0x00120062
DEIDENTIFICATION_METHOD = 0x00120063
DEIDENTIFICATION_METHOD_CODE_SEQUENCE = 0x00120064
_CODE_VALUE, _CODING_SCHEME, _CODE_MEANING = 0x00080100, 0x00080102, 0x00080104

_COMMON_KEYS = (
    "Replace", "Remove", "Keep", "Force", "PrivateCreator", "Transcode", "Level", "Resources",
    "KeepSource", "KeepLabels", "Permissive", "Synchronous", "Asynchronous", "Priority",
    "Dictionary",
)
MODIFY_KEYS = _COMMON_KEYS + ("RemovePrivateTags",)
ANONYMIZE_KEYS = _COMMON_KEYS + ("DicomVersion", "KeepPrivateTags")

def supported_transfer_syntaxes() -> Mapping[str, str]:
    """What ``Transcode`` accepts: ``transforms.transcode.SUPPORTED`` (imported on use: numpy)."""
    from transforms.transcode import SUPPORTED

    return SUPPORTED


@dataclass(frozen=True)
class Plan:
    """One parsed request, applied by :func:`transforms.engine.apply` to many datasets.

    Immutable and picklable (tags are ints, values are :class:`~transforms.values.Value`
    trees). Top-level sets hold the tags *after* the user's Keep/Replace/Remove have been
    applied to the profile's sets, exactly like Orthanc's ``DicomModification``.
    """

    operation: str  # "modify" | "anonymize"
    level: str  # "Patient" | "Study" | "Series" | "Instance"
    force: bool = False
    remove_private_tags: bool = False
    private_creator: str | None = None
    removals: frozenset[int] = frozenset()
    clearings: frozenset[int] = frozenset()
    uids: frozenset[int] = frozenset()  # mapped identifiers (incl. PatientID/PatientName)
    keep: frozenset[int] = frozenset()
    private_keep: frozenset[int] = frozenset()
    replacements: tuple[Value, ...] = ()  # top level, sorted by tag
    keep_paths: tuple[TagPath, ...] = ()
    remove_paths: tuple[TagPath, ...] = ()  # nested only
    replace_paths: tuple[tuple[TagPath, Value], ...] = ()  # nested only
    removed_ranges: tuple[tuple[int, int, int, int], ...] = ()  # (group lo, hi, element lo, hi)
    profile_version: str | None = None
    customised: bool = False
    transcode: str | None = None
    resources: tuple[str, ...] = ()
    keep_source: bool | None = None
    forced_uids: frozenset[int] = field(default=frozenset())  # hierarchy UIDs replaced by the user
    #: What the command tells the user about the body without refusing it (no values).
    notes: tuple[str, ...] = field(default=(), compare=False)

    @property
    def is_anonymization(self) -> bool:
        return self.operation == "anonymize"

    @property
    def replaced_tags(self) -> frozenset[int]:
        return frozenset(v.tag for v in self.replacements)

    @property
    def fingerprint(self) -> str:
        """16 hex characters identifying what the plan does to a dataset (not where it runs).

        Modification UIDs are derived under this fingerprint, so the same key and body give the
        same new UIDs on every rerun, and two different bodies never share a new SOPInstanceUID.
        """
        content = repr((
            self.operation, self.level, self.remove_private_tags, self.private_creator,
            sorted(self.removals), sorted(self.clearings), sorted(self.uids), sorted(self.keep),
            sorted(self.private_keep), self.replacements, self.keep_paths, self.remove_paths,
            self.replace_paths, self.removed_ranges, self.profile_version, self.customised,
        ))
        return hashlib.sha256(content.encode("utf-8")).hexdigest()[:16]

    def describe(self) -> str:
        """A short, value-free summary for the audit table."""
        parts = [self.operation]
        if self.is_anonymization:
            parts.append(f"DicomVersion {self.profile_version}")
        parts.append(f"level {self.level}")
        if self.replacements or self.replace_paths:
            parts.append(f"Replace {len(self.replacements)}+{len(self.replace_paths)} paths")
        if self.remove_paths or (not self.is_anonymization and self.removals):
            count = len(self.removals) if not self.is_anonymization else 0
            parts.append(f"Remove {count}+{len(self.remove_paths)} paths")
        if self.keep_paths:
            parts.append(f"Keep {len(self.keep_paths)}")
        parts.append("private tags removed" if self.remove_private_tags else "private tags kept")
        if self.transcode:
            parts.append(f"Transcode {self.transcode}")
        return "; ".join(parts)


class _Builder:
    """Mutable state while parsing; mirrors the sets of Orthanc's DicomModification."""

    def __init__(self, dictionary: PrivateDictionary, private_creator: str | None,
                 force: bool) -> None:
        self.dictionary = dictionary
        self.private_creator = private_creator
        self.force = force
        self.removals: set[int] = set()
        self.clearings: set[int] = set()
        self.uids: set[int] = set()
        self.keep: set[int] = set()
        self.private_keep: set[int] = set()
        self.replacements: dict[int, Value] = {}
        # Top-level Replace values as given, cast only once Keep and later spellings are
        # known: Orthanc casts the values that survive, so an overridden one is never checked.
        self.pending: dict[int, object] = {}
        self.keep_paths: list[TagPath] = []
        self.remove_paths: list[TagPath] = []
        self.replace_paths: list[tuple[TagPath, Value]] = []
        self.customised = False
        self.replace_names: dict[int, str] = {}  # top-level Replace tag -> the name that set it
        self.notes: list[str] = []

    def _path(self, text: str, key: str) -> TagPath:
        return parse_path(text, key=key, dictionary=self.dictionary,
                          private_creator=self.private_creator)

    def _guard(self, path: TagPath, key: str, action: str) -> None:
        if path.is_top_level and path.tag in DATABASE_KEYS and not self.force:
            raise RequestError(
                f"{key}: marking tag {describe_tag(path.tag)} as to be {action} requires the "
                "\"Force\" option to be set to true (it identifies a patient, study, series or "
                "instance)")

    def remove(self, text: str) -> None:
        key = "Remove"
        path = self._path(text, key)
        self._guard(path, key, "removed")
        self.customised = True
        if not path.is_top_level:
            if not path.touches_group_length():
                self.remove_paths.append(path)
            return
        tag = path.tag
        # A main identifier may be named here if Replace or Keep takes it back (they win over
        # Remove, as in Orthanc); one that is still removed at the end is refused then.
        self.removals.add(tag)
        self.clearings.discard(tag)
        self.uids.discard(tag)
        self.replacements.pop(tag, None)
        self.pending.pop(tag, None)
        self.private_keep.discard(tag)

    def replace(self, name: str, json_value: object) -> None:
        key = "Replace"
        path = self._path(name, key)
        self._guard(path, key, "replaced")
        self.customised = True
        if path.touches_group_length():
            return  # Orthanc silently ignores group lengths
        if path.tag >> 16 == FILE_META_GROUP:
            if not path.is_top_level:
                raise RequestError(f"Replace {name!r}: {describe_tag(path.tag)} belongs to the file meta "
                                   "header, which never stands inside a sequence item")
            raise RequestError(
                f"Replace: {describe_tag(path.tag)} belongs to the file meta header, which is "
                "rebuilt from the data set on write (replace SOPInstanceUID/SOPClassUID instead)")
        if not path.is_top_level:
            if path.tag >> 16 in NON_DATA_SET_GROUPS:
                return  # never written, as at top level (Orthanc drops it too)
            label = f"Replace {name!r}"  # (a nested SOP UID may be null: Orthanc reads only
            # the top-level ones as strings)
            value = prepare_value(path.tag, json_value, key=label, dictionary=self.dictionary,
                                  private_creator=self.private_creator, top_level=False)
            self.replace_paths.append((path, value))
            return
        tag = path.tag
        earlier = self.replace_names.get(tag)
        if earlier is not None:
            # Orthanc visits the names in sorted order and keeps the last value: so do we
            # (bodies are accepted verbatim), but not silently.
            self.notes.append(f"Replace names {describe_tag(tag)} twice ({earlier!r} and {name!r}): the value "
                              f"of {name!r}, the later in name order, is used, as in Orthanc")
        self.replace_names[tag] = name
        self.removals.discard(tag)
        self.clearings.discard(tag)
        self.uids.discard(tag)
        self.replacements.pop(tag, None)
        self.pending[tag] = json_value
        self.private_keep.discard(tag)

    @staticmethod
    def _check_string(tag: int, json_value: object, label: str, tags: frozenset[int]) -> None:
        if tag in tags and not isinstance(json_value, str):
            raise RequestError(f"{label}: {describe_tag(tag)} must be given as a string, got "
                               f"{json_type(json_value)}")

    def cast_replacements(self, string_only: frozenset[int]) -> None:
        """Cast the top-level Replace values that survived Keep, Remove and later spellings, in
        tag order; ``string_only`` tags refuse non-strings."""
        for tag, json_value in sorted(self.pending.items()):
            self._check_string(tag, json_value, "Replace", string_only)
            self.replacements[tag] = prepare_value(
                tag, json_value, key="Replace", dictionary=self.dictionary,
                private_creator=self.private_creator, top_level=True)
        self.pending.clear()

    def keep_entry(self, text: str) -> None:
        key = "Keep"
        path = self._path(text, key)
        self._guard(path, key, "kept")
        self.customised = True
        self.keep_paths.append(path)
        if not path.is_top_level:
            return
        tag = path.tag
        self.removals.discard(tag)
        self.clearings.discard(tag)
        self.uids.discard(tag)
        self.replacements.pop(tag, None)
        self.pending.pop(tag, None)
        self.keep.add(tag)
        if is_private(tag):
            self.private_keep.add(tag)

    def plan(self, common: Mapping[str, Any], **specific: Any) -> Plan:
        """The finished :class:`Plan`: the builder's sets, ``_common``'s keys, and the
        route's own fields (``operation``, ``level``, ...)."""
        return Plan(
            force=self.force,
            private_creator=self.private_creator,
            removals=frozenset(self.removals),
            clearings=frozenset(self.clearings),
            keep=frozenset(self.keep),
            private_keep=frozenset(self.private_keep),
            replacements=tuple(self.replacements[t] for t in sorted(self.replacements)),
            keep_paths=tuple(self.keep_paths),
            remove_paths=tuple(self.remove_paths),
            replace_paths=tuple(self.replace_paths),
            customised=self.customised,
            transcode=common["transcode"],
            resources=common["resources"],
            keep_source=common["keep_source"],
            forced_uids=frozenset(self.replacements) & _HIERARCHY_UIDS,
            notes=tuple(self.notes),
            **specific,
        )


def _check_keys(body: object, allowed: tuple[str, ...], route: str) -> dict[str, Any]:
    if not isinstance(body, Mapping):
        raise RequestError(f"the {route} request body must be a JSON object, got "
                           f"{json_type(body)}")
    unknown = sorted(k for k in body if k not in allowed)
    if unknown:
        raise RequestError(
            f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(repr(k) for k in unknown)} "
            f"in the {route} request; allowed keys: {', '.join(sorted(allowed))}")
    return dict(body)


def _bool(body: Mapping[str, Any], key: str, default: bool | None) -> bool | None:
    """``body[key]``, ``default`` when absent. ``null`` is refused like any other non-boolean,
    as Orthanc does: leaving a key out is how a body asks for the default."""
    if key not in body:
        return default
    value = body[key]
    if not isinstance(value, bool):
        raise RequestError(f"{key}: expected true or false, got {json_type(value)}")
    return value


def _string_list(body: Mapping[str, Any], key: str) -> list[str]:
    value = body.get(key, [])
    if not isinstance(value, list):
        raise RequestError(f"{key}: expected an array of tag names or paths, got "
                           f"{json_type(value)}")
    for entry in value:
        if not isinstance(entry, str):
            raise RequestError(f"{key}: every entry must be a string (a tag name or path), got "
                               f"{json_type(entry)}")
    return value


def _replace_map(body: Mapping[str, Any]) -> Mapping[str, Any]:
    value = body.get("Replace", {})
    if not isinstance(value, Mapping):
        raise RequestError(f"Replace: expected an object mapping tag names or paths to values, "
                           f"got {json_type(value)}")
    return value


def parse_level(value: object, key: str = "Level") -> str:
    """``Patient(s)``, ``Study/Studies``, ``Series``, ``Instance(s)/Image(s)`` (any case)."""
    if not isinstance(value, str) or value.strip().lower() not in _LEVEL_ALIASES:
        got = f"{value!r:.40}" if isinstance(value, str) else json_type(value)
        raise RequestError(f"{key}: expected one of {', '.join(LEVELS)} (got {got})")
    return _LEVEL_ALIASES[value.strip().lower()]


def _common(body: Mapping[str, Any], dictionary: Mapping[str, Any] | PrivateDictionary | None
            ) -> dict[str, Any]:
    """Keys shared by both routes, in Orthanc's parse order up to the tag lists."""
    if dictionary is None:
        dictionary = body.get("Dictionary")
        if dictionary is None and "Dictionary" in body:
            raise RequestError("Dictionary: expected an object mapping private tags to "
                               "[VR, name, min, max, private creator], got null")
    if not isinstance(dictionary, PrivateDictionary):
        dictionary = parse_dictionary(dictionary) if dictionary is not None else EMPTY_DICTIONARY
    creator = body.get("PrivateCreator", "")
    if not isinstance(creator, str):
        raise RequestError(f"PrivateCreator: expected a string, got {json_type(creator)}")
    force = _bool(body, "Force", False)
    for key in ("KeepLabels", "Permissive", "Synchronous", "Asynchronous"):
        _bool(body, key, None)  # Orthanc's job options: checked, no effect on files
    priority = body.get("Priority", 0)
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise RequestError(f"Priority: expected an integer, got {json_type(priority)}")
    transcode = body.get("Transcode")
    if "Transcode" in body:
        allowed = supported_transfer_syntaxes()
        if not isinstance(transcode, str):
            raise RequestError(f"Transcode: expected a transfer syntax UID (a string), got {json_type(transcode)}; "
                               f"allowed: {', '.join(sorted(allowed))}")
        if transcode.strip() not in allowed:
            raise RequestError(
                f"Transcode: {transcode!r:.70} is not a supported transfer syntax UID; allowed: "
                f"{', '.join(sorted(allowed))}")
        transcode = transcode.strip()
    resources = body.get("Resources", [])
    if not isinstance(resources, list) or not all(isinstance(r, str) and r for r in resources):
        raise RequestError("Resources: expected an array of non-empty strings (Orthanc "
                           "identifiers or DICOM UIDs)")
    return {
        "dictionary": dictionary,
        "private_creator": creator or None,
        "force": bool(force),
        "transcode": transcode,
        "resources": tuple(resources),
        "keep_source": _bool(body, "KeepSource", None),
    }


def _apply_entries(builder: _Builder, body: Mapping[str, Any],
                   string_only: frozenset[int]) -> None:
    removes = _string_list(body, "Remove")
    replaces = _replace_map(body)
    keeps = _string_list(body, "Keep")
    for entry in removes:
        builder.remove(entry)
    for name in sorted(replaces):
        if not isinstance(name, str):
            raise RequestError("Replace: tag names must be strings")
        builder.replace(name, replaces[name])
    for entry in keeps:
        builder.keep_entry(entry)
    builder.cast_replacements(string_only)
    still_removed = sorted(DATABASE_KEYS & builder.removals)
    if still_removed:
        raise RequestError(
            f"Remove: removing {describe_tag(still_removed[0])} is forbidden even with \"Force\": it is "
            "one of the main DICOM identifiers (use Replace or Keep instead)")


def parse_modify(
    body: Mapping[str, Any],
    *,
    dictionary: Mapping[str, Any] | PrivateDictionary | None = None,
    level: str | None = None,
) -> Plan:
    """Parse a ``/modify`` (or ``/tools/bulk-modify``) body.

    Args:
        body: the JSON body, verbatim.
        dictionary: Orthanc ``Dictionary`` configuration (else the body's ``Dictionary``).
        level: overrides the body's ``Level`` and the detected level.

    Raises:
        RequestError: naming the offending key.
    """
    body = _check_keys(body, MODIFY_KEYS, "modify")
    common = _common(body, dictionary)
    remove_private = _bool(body, "RemovePrivateTags", False)
    builder = _Builder(common["dictionary"], common["private_creator"], common["force"])
    _apply_entries(builder, body, _STRING_ONLY)

    replaced = builder.replacements
    if level is not None:
        chosen = parse_level(level, "level")
    elif "Level" in body:
        chosen = parse_level(body["Level"])
    elif PATIENT_ID in replaced:
        chosen = "Patient"
    elif STUDY_INSTANCE_UID in replaced:
        chosen = "Study"
    elif SERIES_INSTANCE_UID in replaced:
        chosen = "Series"
    else:
        chosen = "Instance"
    if chosen == "Patient" and PATIENT_ID not in replaced and not builder.force:
        raise RequestError(
            "Replace: modifying at the Patient level requires PatientID in Replace (with "
            "\"Force\": true), so that the modified data are not merged with the original "
            "patient; set \"Force\": true to modify the patient's other tags in place")

    return builder.plan(common, operation="modify", level=chosen,
                        remove_private_tags=bool(remove_private))


_HIERARCHY_UIDS = frozenset({STUDY_INSTANCE_UID, SERIES_INSTANCE_UID, SOP_INSTANCE_UID})
#: Replace values Orthanc reads as strings (a null or an array is refused with 400).
_STRING_ONLY = frozenset({SOP_CLASS_UID, SOP_INSTANCE_UID})


def parse_anonymize(
    body: Mapping[str, Any],
    *,
    dictionary: Mapping[str, Any] | PrivateDictionary | None = None,
) -> Plan:
    """Parse an ``/anonymize`` (or ``/tools/bulk-anonymize``) body.

    ``Level`` is checked (one of Patient, Study, Series, Instance: a typo is refused, where
    Orthanc accepts any value) and then ignored, as Orthanc does: anonymization always works at
    the Patient level (new PatientID, Study, Series and SOP Instance UIDs).

    Raises:
        RequestError: naming the offending key (e.g. ``DicomVersion`` with the allowed list).
    """
    from transforms.profiles import (DEFAULT_VERSION, EXTRA_REFERENCE_UIDS, EXTRA_REMOVALS_2024B, VERSIONS,
                                     get_profile)

    body = _check_keys(body, ANONYMIZE_KEYS, "anonymize")
    common = _common(body, dictionary)
    if "DicomVersion" in body and body["DicomVersion"] is None:
        allowed = ", ".join(f'"{v}"' for v in VERSIONS)
        raise RequestError(f"DicomVersion: expected a string, got null; allowed: {allowed} "
                           f"(leave it out for {DEFAULT_VERSION})")
    profile = get_profile(body.get("DicomVersion"))
    if "Level" in body:
        parse_level(body["Level"])
    builder = _Builder(common["dictionary"], common["private_creator"], common["force"])
    builder.removals = set(profile.removals)
    builder.clearings = set(profile.clearings)
    builder.uids = set(profile.uids) | {PATIENT_ID, PATIENT_NAME}
    if profile.version != "2008":
        builder.uids |= EXTRA_REFERENCE_UIDS  # what the table misses (see transforms.profiles)
        builder.removals |= EXTRA_REMOVALS_2024B  # (none is in any table: removal, clearing or UID)
    pending_method = Value(DEIDENTIFICATION_METHOD, "LO", None)  # text decided below
    pending_code = basic_profile_code()
    builder.replacements = {
        PATIENT_IDENTITY_REMOVED: Value(PATIENT_IDENTITY_REMOVED, "CS", "YES"),
        DEIDENTIFICATION_METHOD: pending_method,
        DEIDENTIFICATION_METHOD_CODE_SEQUENCE: pending_code,
    }
    for tag in (PATIENT_IDENTITY_REMOVED, DEIDENTIFICATION_METHOD,
                DEIDENTIFICATION_METHOD_CODE_SEQUENCE):
        builder.removals.discard(tag)
        builder.clearings.discard(tag)
    keep_private = _bool(body, "KeepPrivateTags", False)
    if keep_private:
        builder.customised = True
    # Orthanc's anonymization reads the replaced Study/Series UIDs as strings too.
    _apply_entries(builder, body, _STRING_ONLY | {STUDY_INSTANCE_UID, SERIES_INSTANCE_UID})
    if PATIENT_ID in builder.keep:
        raise RequestError(
            "Keep: PatientID cannot be kept in an anonymization, even with \"Force\": it is "
            "replaced by a keyed pseudonym (Replace it to choose the value; Orthanc refuses it too)")

    replacements = builder.replacements
    if replacements.get(DEIDENTIFICATION_METHOD) is pending_method:
        # Orthanc >= 1.12.7: a customised request only names the product, since the result
        # is no longer the plain profile.
        method = (f"{PRODUCT} {__version__}" if builder.customised
                  else profile.deidentification_method(__version__))
        replacements[DEIDENTIFICATION_METHOD] = Value(DEIDENTIFICATION_METHOD, "LO", method)
    code = replacements.get(DEIDENTIFICATION_METHOD_CODE_SEQUENCE)
    if builder.customised and code is pending_code:
        # The code claims the plain Basic Profile: only true for an uncustomised request.
        del replacements[DEIDENTIFICATION_METHOD_CODE_SEQUENCE]

    return builder.plan(
        common, operation="anonymize", level="Patient", remove_private_tags=not keep_private,
        uids=frozenset(builder.uids), profile_version=profile.version,
        removed_ranges=tuple((r.group_lo, r.group_hi, r.element_lo, r.element_hi)
                             for r in profile.removed_ranges))


def basic_profile_code() -> Value:
    from transforms.profiles import BASIC_PROFILE_CODE

    code_value, scheme, meaning = BASIC_PROFILE_CODE
    item = (Value(_CODE_VALUE, "SH", code_value), Value(_CODING_SCHEME, "SH", scheme),
            Value(_CODE_MEANING, "LO", meaning))
    return Value(DEIDENTIFICATION_METHOD_CODE_SEQUENCE, "SQ", (item,))
