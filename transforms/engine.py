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
by the plan or selected by the profile are decoded; sequences are parsed only to be walked,
and a walked sequence in which nothing changed is left raw. Pixel data is never decoded.

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
  PS3.15 requires (Orthanc removes them only inside sequences);
* DeidentificationMethodCodeSequence (0012,0064) gets the Basic Profile code (113100, DCM) for
  an uncustomised anonymization; a customised one writes DeidentificationMethod
  ``dicom-deid <version>`` (Orthanc >= 1.12.7 style) and no code;
* multi-valued UIDs are mapped value by value (Orthanc maps the whole string to one UID), and
  empty UIDs inside the data stay empty (only the three hierarchy UIDs are always written);
* a forced (``Replace`` + ``Force``) Study/Series/SOP Instance UID replaces nested references
  to the original value of the same instance; references to other instances' originals are
  mapped with the key (Orthanc depends on which instance its job processed first).
"""

from __future__ import annotations

from typing import Any

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag

from transforms.errors import InputError
from transforms.identity import INSTANCE, PATIENT, SERIES, STUDY
from transforms.paths import Workspace, remove_at, replace_at, shallow_copy
from transforms.request import Plan
from transforms.tags import (
    PATIENT_ID,
    PATIENT_NAME,
    SERIES_INSTANCE_UID,
    SOP_CLASS_UID,
    SOP_INSTANCE_UID,
    SPECIFIC_CHARACTER_SET,
    SQ_TAGS,
    STUDY_INSTANCE_UID,
)
from transforms.values import build_element

_UNDEFINED = 0xFFFFFFFF
_STRING_VRS = frozenset("AE AS CS DA DS DT IS LO LT PN SH ST TM UC UI UR UT".split())
_HIERARCHY = {STUDY_INSTANCE_UID: STUDY, SERIES_INSTANCE_UID: SERIES, SOP_INSTANCE_UID: INSTANCE}
_MEDIA_STORAGE = {SOP_CLASS_UID: 0x00020002, SOP_INSTANCE_UID: 0x00020003}
_REFERENCED_SOP_INSTANCE_UID = 0x00081155
_RT_STUDY_PARENTS = (0x30060010, 0x30060012)  # ReferencedFrameOfReference > RTReferencedStudy
_LEVEL_RANK = {"Patient": 0, "Study": 1, "Series": 2, "Instance": 3}


def apply(plan: Plan, ds: Dataset, key: Any) -> Dataset:
    """Return ``ds`` modified or anonymized by ``plan``; ``ds`` itself is untouched.

    Args:
        plan: from :func:`transforms.request.parse_modify` / ``parse_anonymize``.
        ds: a dataset, typically from :func:`transforms.dicomio.read_dataset`.
        key: a :class:`transforms.identity.Key` deriving every new identifier.

    Raises:
        InputError: a sequence of the input cannot be parsed (``too_deep`` for runaway
            nesting, ``read_error`` otherwise).
    """
    try:
        return _Run(plan, ds, key).result
    except RecursionError:
        raise InputError("sequences nested too deeply to process", reason="too_deep") from None


def _character_set(ds: Dataset) -> Any:
    try:
        return ds.original_character_set or ds._character_set
    except Exception:  # undecodable SpecificCharacterSet
        return "iso8859"


def _python_encodings(ds: Dataset) -> list[str]:
    """The Python codecs pydicom will encode ``ds``'s text with."""
    try:
        encodings = ds._character_set
    except Exception:
        return ["iso8859"]
    return [encodings] if isinstance(encodings, str) else list(encodings)


def _dict_vr(tag: int) -> str | None:
    try:
        return dictionary_VR(tag)
    except KeyError:
        return None


def _vr_of(elem: Any, tag: int) -> str | None:
    return elem.VR or _dict_vr(tag)


def _maybe_sequence(elem: Any, tag: int) -> bool:
    """Whether ``elem`` may hold a sequence, judged without decoding it."""
    if type(elem) is RawDataElement:
        vr = elem.VR
        if vr == "SQ":
            return True
        if vr is None or vr == "UN":
            return elem.length == _UNDEFINED or tag in SQ_TAGS
        return False
    return elem.VR == "SQ"


def _text_of(elem: Any, ds: Dataset) -> list[str] | None:
    """The values of a text element as strings (None if empty or undecodable)."""
    if type(elem) is RawDataElement:
        if elem.value is None or elem.length == 0:
            return None
        vr = elem.VR
        if vr is None or vr == "UN":
            vr = _dict_vr(elem.tag)
        if vr == "UI":
            text = elem.value.decode("ascii", "replace")
            parts = [p.strip(" \x00") for p in text.split("\\")]
            return parts if any(parts) else None
        elem = convert_raw_data_element(elem, encoding=_character_set(ds), ds=ds)
    value = elem.value
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [str(v).strip(" \x00") for v in value]
    if isinstance(value, bytes):
        return [value.decode("ascii", "replace").strip(" \x00")]
    return [str(value).strip(" \x00")]


class _Run:
    """State for one ``apply`` call."""

    def __init__(self, plan: Plan, ds: Dataset, key: Any) -> None:
        self.plan = plan
        self.key = key
        self.source = ds
        out = shallow_copy(ds)
        self.out = out
        self.ws = Workspace(out)
        implicit, little = ds.original_encoding
        self.implicit = implicit
        self.little = True if little is None else bool(little)
        if plan.is_anonymization:
            prefix = "anonymize."
        else:
            prefix = f"modify.{plan.fingerprint}."
        self.ns = {kind: prefix + kind for kind in (STUDY, SERIES, INSTANCE)}
        self.anonymize = plan.is_anonymization
        ranges = plan.removed_ranges
        self.ranges = ranges
        self.range_lo = min((r[0] for r in ranges), default=1)
        self.range_hi = max((r[1] for r in ranges), default=0)
        self.forced: dict[tuple[str, str], str] = {}
        self.result = self._run()

    # ------------------------------------------------------------------ identifiers

    def map_uid(self, kind: str, value: str) -> str:
        forced = self.forced.get((kind, value))
        if forced is not None:
            return forced
        return self.key.uid(self.ns[kind], value)

    def in_range(self, tag: int) -> bool:
        group = tag >> 16
        if not self.range_lo <= group <= self.range_hi:
            return False
        element = tag & 0xFFFF
        return any(glo <= group <= ghi and elo <= element <= ehi
                   for glo, ghi, elo, ehi in self.ranges)

    def _mapped_element(self, tag: int, elem: Any, ds: Dataset, kind: str) -> Any | None:
        """``elem`` with every value mapped in ``kind``'s namespace (None: leave as is)."""
        values = _text_of(elem, ds)
        if values is None:
            return None
        if kind == PATIENT:
            mapped = [self.key.patient_id(v) if tag == PATIENT_ID else self.key.patient_name(v)
                      for v in values]
            vr = "LO" if tag == PATIENT_ID else "PN"
            return DataElement(tag, vr, "\\".join(mapped))
        mapped = [self.map_uid(kind, v) if v else "" for v in values]
        return self._uid_element(tag, elem, "\\".join(mapped))

    def _uid_element(self, tag: int, old: Any, text: str) -> Any:
        """A UI element holding ``text``, raw when ``old`` was raw (the writer copies it)."""
        tag = BaseTag(tag)  # pydicom's hooks need BaseTag on raw elements
        if type(old) is RawDataElement:
            data = text.encode("ascii")
            if len(data) % 2:
                data += b"\x00"
            vr = "UI" if old.VR == "UN" else old.VR  # an explicit UN UID is written as UI
            return RawDataElement(tag, vr, len(data), data, old.value_tell,
                                  old.is_implicit_VR, old.is_little_endian)
        if self.implicit is not None:
            data = text.encode("ascii")
            if len(data) % 2:
                data += b"\x00"
            return RawDataElement(tag, None if self.implicit else "UI", len(data), data, 0,
                                  bool(self.implicit), self.little)
        return DataElement(tag, "UI", text)

    # ------------------------------------------------------------------ steps

    def _run(self) -> Dataset:
        plan = self.plan
        out = self.out
        d = out._dict
        replaced = plan.replaced_tags

        # 1. Forced hierarchy UIDs: nested references to the original follow the new value.
        if self.anonymize and plan.forced_uids:
            for value in plan.replacements:
                kind = _HIERARCHY.get(value.tag)
                if kind is None or not isinstance(value.value, str):
                    continue
                elem = d.get(value.tag)
                original = _text_of(elem, out) if elem is not None else None
                if original:
                    self.forced.setdefault((kind, "\\".join(original)), value.value)

        # 2-4 (and the top-level half of 7) in one pass over the top-level tags.
        remove_private = plan.remove_private_tags
        private_keep = plan.private_keep
        removals = plan.removals
        clearings = plan.clearings
        keep = plan.keep
        uids = plan.uids if self.anonymize else frozenset()
        sequences: list[int] = []
        for tag in list(d):
            if tag in keep:
                continue
            if tag >> 16 & 1:
                if remove_private and tag not in private_keep:
                    del d[tag]
                    continue
            elif tag in clearings:
                d[tag] = self._cleared_top(tag, d[tag])
                continue
            elif tag in removals or (self.ranges and self.in_range(tag)):
                del d[tag]
                continue
            elif tag in uids and tag not in replaced:
                if tag == PATIENT_NAME:
                    continue  # step 5 writes the pseudonym
                new = self._mapped_element(tag, d[tag], out,
                                           PATIENT if tag == PATIENT_ID else INSTANCE)
                if new is not None:
                    d[tag] = new
                continue
            if self.anonymize and tag not in replaced and _maybe_sequence(d[tag], tag):
                sequences.append(tag)

        # 5. Replacements, then (anonymization) the PatientName pseudonym.
        encodings = _python_encodings(out)
        for value in plan.replacements:
            elem = self.ws.owned_element(build_element(value, little_endian=self.little,
                                                       encodings=encodings))
            d[BaseTag(value.tag)] = elem  # pydicom's writer needs BaseTag keys
            if value.tag == SPECIFIC_CHARACTER_SET:
                encodings = _python_encodings(out)
            self._sync_meta(value.tag, elem)
            if self.anonymize and value.vr == "SQ":
                sequences.append(value.tag)
        if self.anonymize and PATIENT_NAME in uids:
            elem = self.source._dict.get(PATIENT_NAME)
            names = _text_of(elem, self.source) if elem is not None else None
            pseudonym = "\\".join(self.key.patient_name(n) for n in names) if names else ""
            d[BaseTag(PATIENT_NAME)] = DataElement(PATIENT_NAME, "PN", pseudonym)

        # 6. Hierarchy UIDs by level, unless replaced or kept.
        rank = _LEVEL_RANK[plan.level]
        for tag, kind, needed in ((STUDY_INSTANCE_UID, STUDY, 1), (SERIES_INSTANCE_UID, SERIES, 2),
                                  (SOP_INSTANCE_UID, INSTANCE, 3)):
            if rank > needed or tag in replaced or tag in keep:
                continue
            elem = d.get(tag)
            original = _text_of(elem, out) if elem is not None else None
            new_uid = self.map_uid(kind, "\\".join(original) if original else "")
            new_elem = self._uid_element(tag, elem, new_uid) if elem is not None else \
                DataElement(tag, "UI", new_uid)
            d[BaseTag(tag)] = new_elem
            self._sync_meta(tag, new_elem)

        # 7. Nested pass over every top-level sequence (anonymization only).
        if self.anonymize:
            self.nested_uids = uids | ({PATIENT_ID, PATIENT_NAME} - keep)
            keep_paths = plan.keep_paths
            for tag in sequences:
                if keep_paths and any(p.matches((), tag) for p in keep_paths):
                    continue
                if tag in d:
                    self._descend(out, tag, ())

        # 8. Nested path edits: removals, then replacements, in request order.
        for path in plan.remove_paths:
            remove_at(self.ws, out, path)
        encodings = _python_encodings(out)
        for path, value in plan.replace_paths:
            replace_at(self.ws, out, path,
                       lambda value=value: build_element(value, little_endian=self.little,
                                                         encodings=encodings))
        return out

    def _cleared_top(self, tag: int, elem: Any) -> Any:
        """Top-level clearing: a zero-length element of the same VR (SQ: empty sequence)."""
        if type(elem) is RawDataElement and elem.length != _UNDEFINED:
            return RawDataElement(tag, elem.VR, 0, b"", elem.value_tell, elem.is_implicit_VR,
                                  elem.is_little_endian)
        vr = _vr_of(elem, tag) or "UN"
        if vr == "SQ" or (type(elem) is RawDataElement and elem.length == _UNDEFINED):
            return DataElement(tag, "SQ", Sequence())
        if " or " in vr:
            vr = vr.split(" or ")[0]
        return DataElement(tag, vr, None)

    def _sync_meta(self, tag: int, elem: Any) -> None:
        meta_tag = _MEDIA_STORAGE.get(tag)
        meta = self.out.__dict__.get("file_meta")
        if meta_tag is None or meta is None:
            return
        values = _text_of(elem, self.out)
        meta._dict[BaseTag(meta_tag)] = DataElement(meta_tag, "UI", values[0] if values else "")

    # ------------------------------------------------------------------ nested pass

    def _descend(self, parent: Dataset, tag: int, parents: tuple) -> bool:
        """Walk the sequence ``tag`` of the owned ``parent``; True if anything changed.

        A raw sequence is parsed into new objects and stored back only if it changed; a decoded
        sequence shared with the input is walked on copies of its items.
        """
        dd = parent._dict
        elem = dd[tag]
        ws = self.ws
        if type(elem) is RawDataElement:
            try:
                parsed = convert_raw_data_element(elem, encoding=_character_set(parent), ds=parent)
            except RecursionError:
                raise
            except Exception:
                raise InputError(
                    f"sequence ({tag >> 16:04X},{tag & 0xFFFF:04X}) cannot be parsed",
                    reason="read_error") from None
            if parsed.VR != "SQ":
                return False
            items = parsed.value
            changed = False
            for index, item in enumerate(items):
                changed |= self._walk(item, parents + ((tag, index),))
            if changed:
                dd[tag] = ws.adopt_sequence(parsed)
            return changed
        if elem.VR != "SQ":
            return False
        if ws.owns_element(elem):
            changed = False
            for index, item in enumerate(elem.value):
                changed |= self._walk(item, parents + ((tag, index),))
            return changed
        copies = [shallow_copy(item) for item in elem.value]
        changed = False
        for index, item in enumerate(copies):
            changed |= self._walk(item, parents + ((tag, index),))
        if changed:
            new = DataElement(tag, "SQ", Sequence(copies), elem.file_tell,
                              elem.is_undefined_length, already_converted=True)
            dd[tag] = ws.adopt_sequence(new)
        return changed

    def _walk(self, item: Dataset, parents: tuple) -> bool:
        """Orthanc's nested rules on one (owned) item; True if anything changed."""
        plan = self.plan
        dd = item._dict
        keep_paths = plan.keep_paths
        remove_private = plan.remove_private_tags
        removals = plan.removals
        clearings = plan.clearings
        nested_uids = self.nested_uids
        changed = False
        for tag in list(dd):
            if keep_paths and any(p.matches(parents, tag) for p in keep_paths):
                continue
            elem = dd[tag]
            if tag >> 16 & 1 and remove_private:
                del dd[tag]
                changed = True
                continue
            if tag in removals or (self.ranges and self.in_range(tag)):
                del dd[tag]
                changed = True
                continue
            if tag in clearings:
                vr = _vr_of(elem, tag)
                if vr in _STRING_VRS:
                    if type(elem) is RawDataElement:
                        dd[tag] = RawDataElement(tag, elem.VR, 0, b"", elem.value_tell,
                                                 elem.is_implicit_VR, elem.is_little_endian)
                    else:
                        dd[tag] = DataElement(tag, vr, "")
                else:
                    del dd[tag]  # Orthanc deletes non-string values it should clear
                changed = True
                continue
            kind = _HIERARCHY.get(tag)
            if kind is None and tag in nested_uids:
                if tag == PATIENT_ID or tag == PATIENT_NAME:
                    kind = PATIENT
                elif (tag == _REFERENCED_SOP_INSTANCE_UID and len(parents) == 2
                      and (parents[0][0], parents[1][0]) == _RT_STUDY_PARENTS):
                    kind = STUDY  # RT-STRUCT: this reference names the study
                else:
                    kind = INSTANCE
            if kind is not None:
                new = self._mapped_element(tag, elem, item, kind)
                if new is not None:
                    dd[tag] = new
                    changed = True
                continue
            if _maybe_sequence(elem, tag):
                changed |= self._descend(item, tag, parents)
        return changed
