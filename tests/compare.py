"""Tag-by-tag comparison of our output with Orthanc's, for the differential tests.

``compare_datasets(ours, reference, uids=...)`` walks both datasets (file meta included,
recursing into sequences) and returns a list of ``Difference``: each names the tag keyword, the
path of sequence items leading to it and both values, so a failing test prints exactly what
differs.

Regenerated identifiers cannot be equal (Orthanc draws random DCMTK UIDs and UUIDs, we derive
``2.25.<int>`` UIDs and pseudonyms from a key), so they are compared by *structure* instead:
``UidStructure`` maps every identifier Orthanc generated to ours and reports a difference when
the mapping stops being a bijection (Orthanc gave two elements the same new value and we gave
them different ones, or the reverse), when Orthanc kept an original identifier and we changed
it, or when Orthanc regenerated one and we kept the original. One ``UidStructure`` shared over
all instances of a study checks cross-instance references too (ReferencedSOPInstanceUID equal
to another instance's new SOPInstanceUID, a shared FrameOfReferenceUID, ...).

``judge(results, table)`` fails a test on any difference that is neither in the module's
table of deliberate differences nor in ``KNOWN_BUGS`` (our bugs, reported to their owner: the
test is then marked xfail, naming the bug); ``WRITER_DIFFERENCES`` are the deliberate ones
every module shares. ``read`` decodes a file for comparison (keeping VR UN as written);
``ours_for`` runs our engine on one file with the fixed test key; ``value_at`` and
``check_expectations`` pin a few exact values per case on both sides.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Iterable, Iterator
from io import BytesIO
from typing import Any

import pydicom
import pytest
from pydicom.dataelem import DataElement
from pydicom.datadict import keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag, Tag

BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN", "OB or OW", "US or OW"})
FILE_META_GROUP = 0x0002

# File-meta elements that name the writing software or depend on it: never compared.
SOFTWARE_META_TAGS = frozenset({
    0x00020000,  # FileMetaInformationGroupLength (depends on the version name length)
    0x00020012,  # ImplementationClassUID
    0x00020013,  # ImplementationVersionName
    0x00020016,  # SourceApplicationEntityTitle
})

# Identifier tags compared structurally even though their VR is not UI.
STRUCTURAL_NON_UI_TAGS = frozenset({
    0x00100020,  # PatientID: Orthanc draws a UUID, we derive a keyed pseudonym
})

Path = tuple[tuple[int, int], ...]  # ((sequence tag, item index), ...)


def tag_name(tag: int) -> str:
    """Keyword if the tag has one, else ``gggg,eeee``."""
    keyword = keyword_for_tag(tag)
    return keyword or f"{tag >> 16:04x},{tag & 0xFFFF:04x}"


def format_path(path: Path, tag: int) -> str:
    parts = [f"{tag_name(seq)}[{index}]" for seq, index in path]
    parts.append(tag_name(tag))
    return ".".join(parts) + f" ({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _short(value: Any, limit: int = 96) -> str:
    if isinstance(value, bytes):
        head = value[:24].hex()
        return f"<{len(value)} bytes {head}{'...' if len(value) > 24 else ''}>"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclasses.dataclass(frozen=True)
class Difference:
    """One difference between our dataset and Orthanc's (``reference``)."""

    path: Path
    tag: int
    kind: str  # 'missing' (absent in ours), 'extra' (absent in Orthanc's), 'vr', 'value',
    # 'items' (sequence lengths), 'uid-structure'
    ours: Any
    reference: Any
    detail: str = ""

    @property
    def keyword(self) -> str:
        return tag_name(self.tag)

    @property
    def nested(self) -> bool:
        return bool(self.path)

    def __str__(self) -> str:
        where = format_path(self.path, self.tag)
        text = f"{where}: {self.kind}: ours={_short(self.ours)} orthanc={_short(self.reference)}"
        return f"{text} [{self.detail}]" if self.detail else text


def element_value(elem: DataElement) -> Any:
    """A comparable, printable form of a non-sequence element's value."""
    value = elem.value
    if value is None:
        return ""
    if elem.VR in BINARY_VRS or isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, (list, MultiValue)):
        return tuple(_scalar(v) for v in value)
    return _scalar(value)


def _scalar(value: Any) -> Any:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        original = getattr(value, "original_string", None)  # DS/IS keep the text they came from
        return original.strip() if isinstance(original, str) else value
    if isinstance(value, bytes):
        return value
    return str(value).rstrip(" \x00")


def identifier_value(elem: DataElement) -> str | None:
    """The whole value of an identifier element as one string (how Orthanc maps it)."""
    if elem.VR == "SQ":
        return None
    value = element_value(elem)
    if isinstance(value, tuple):
        return "\\".join(str(v) for v in value)
    if isinstance(value, bytes):
        return value.decode("ascii", "replace").rstrip(" \x00")
    return str(value)


def is_identifier(elem: DataElement) -> bool:
    return elem.VR == "UI" or int(elem.tag) in STRUCTURAL_NON_UI_TAGS


class UidStructure:
    """A bijection between identifiers Orthanc generated and ours, built across datasets.

    ``originals``: every identifier value of the *input* datasets (see ``collect_identifiers``).
    A reference value in it was kept by Orthanc; any other reference value was generated (or
    given by the request) and must correspond to exactly one value of ours, and vice versa.
    """

    def __init__(self, originals: Iterable[str]) -> None:
        self.originals = frozenset(originals)
        self.forward: dict[str, str] = {}  # Orthanc's value -> ours
        self.backward: dict[str, str] = {}  # ours -> Orthanc's value
        self.first_seen: dict[str, str] = {}  # Orthanc's value -> where first mapped

    def check(self, path: Path, tag: int, ours: str, reference: str,
              where: str = "") -> Difference | None:
        location = (where + ": " if where else "") + format_path(path, tag)
        if reference != ours and "" in (reference, ours):
            return Difference(path, tag, "uid-structure", ours, reference,
                              "ours is empty, Orthanc's is not" if ours == ""
                              else "Orthanc's is empty, ours is not")
        if reference == ours:
            if reference in self.originals or reference == "":
                return None
            # A value given by the request (e.g. Replace StudyInstanceUID "1.2.3.4"): it still
            # takes part in the bijection.
        elif reference in self.originals:
            return Difference(path, tag, "uid-structure", ours, reference,
                              "Orthanc kept the original identifier, we changed it")
        elif ours in self.originals:
            return Difference(path, tag, "uid-structure", ours, reference,
                              "Orthanc generated a new identifier, we kept the original")
        mapped = self.forward.get(reference)
        if mapped is not None and mapped != ours:
            return Difference(
                path, tag, "uid-structure", ours, reference,
                f"Orthanc uses this new value also at {self.first_seen[reference]}, where ours "
                f"is {_short(mapped)}")
        previous = self.backward.get(ours)
        if previous is not None and previous != reference:
            return Difference(
                path, tag, "uid-structure", ours, reference,
                f"ours equals the value at {self.first_seen[previous]}, where Orthanc has "
                f"{_short(previous)}")
        if mapped is None:
            self.forward[reference] = ours
            self.backward[ours] = reference
            self.first_seen[reference] = location
        return None


def iter_identifiers(ds: Dataset, extra: frozenset[int] = frozenset()) -> Iterator[str]:
    """Every identifier value (UI elements, PatientID, ``extra`` tags) anywhere in ``ds``."""
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        yield from _identifiers_in(meta, extra)
    yield from _identifiers_in(ds, extra)


def _identifiers_in(ds: Dataset, extra: frozenset[int]) -> Iterator[str]:
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value or []:
                yield from _identifiers_in(item, extra)
        elif is_identifier(elem) or int(elem.tag) in extra:
            value = identifier_value(elem)
            if value:
                yield value


def collect_identifiers(datasets: Iterable[Dataset], extra_tags: Iterable[int] = ()) -> set[str]:
    """Identifier values of the input datasets: what ``UidStructure`` calls originals."""
    extra = frozenset(int(t) for t in extra_tags)
    found: set[str] = set()
    for ds in datasets:
        found.update(iter_identifiers(ds, extra))
    return found


PIXEL_DATA = 0x7FE00010


def compare_datasets(ours: Dataset, reference: Dataset, *, uids: UidStructure,
                     structural_tags: Iterable[int] = (), where: str = "",
                     anonymized: bool = False) -> list[Difference]:
    """Every difference between ``ours`` and Orthanc's ``reference``, file meta included.

    Identifier elements (VR UI, PatientID and ``structural_tags``) are checked through
    ``uids``; all other elements must be equal (VR and value). ``where`` labels the dataset
    in structural messages (e.g. the source file name). ``anonymized``: the deliberate
    difference of an anonymization's compressed pixel data is applied to Orthanc's (text in
    the codestream headers blanked, ``transforms/codestreams.py``), so that any other byte
    of it must still be equal.
    """
    if anonymized and PIXEL_DATA in reference:
        from transforms.codestreams import blanked_pixel_data

        value = reference[PIXEL_DATA].value
        blanked = blanked_pixel_data(value) if isinstance(value, bytes) else None
        if blanked is not None:
            reference = copy.deepcopy(reference)
            reference[PIXEL_DATA] = DataElement(PIXEL_DATA, reference[PIXEL_DATA].VR, blanked)
    extra = frozenset(int(t) for t in structural_tags)
    differences: list[Difference] = []
    ours_meta = getattr(ours, "file_meta", None) or Dataset()
    ref_meta = getattr(reference, "file_meta", None) or Dataset()
    _compare_level(ours_meta, ref_meta, (), uids, extra, where, differences,
                   skip=SOFTWARE_META_TAGS)
    _compare_level(ours, reference, (), uids, extra, where, differences,
                   skip=frozenset(), skip_group=FILE_META_GROUP)
    return differences


def _compare_level(ours: Dataset, reference: Dataset, path: Path, uids: UidStructure,
                   extra: frozenset[int], where: str, out: list[Difference],
                   skip: frozenset[int], skip_group: int | None = None) -> None:
    tags = sorted(set(ours.keys()) | set(reference.keys()))
    for raw_tag in tags:
        tag = int(raw_tag)
        if tag in skip:
            continue
        if tag >> 16 == skip_group:
            continue  # group 2 inside the dataset proper: compared through file_meta
        in_ours, in_ref = raw_tag in ours, raw_tag in reference
        if not in_ref:
            elem = ours[raw_tag]
            out.append(Difference(path, tag, "extra", _display(elem), None))
            continue
        if not in_ours:
            elem = reference[raw_tag]
            out.append(Difference(path, tag, "missing", None, _display(elem)))
            continue
        mine, theirs = ours[raw_tag], reference[raw_tag]
        if mine.VR != theirs.VR:
            out.append(Difference(path, tag, "vr", mine.VR, theirs.VR,
                                  f"values ours={_short(_display(mine))} "
                                  f"orthanc={_short(_display(theirs))}"))
            continue
        if mine.VR == "SQ":
            mine_items, their_items = list(mine.value or []), list(theirs.value or [])
            if len(mine_items) != len(their_items):
                out.append(Difference(path, tag, "items", len(mine_items), len(their_items)))
            for index, (a, b) in enumerate(zip(mine_items, their_items)):
                _compare_level(a, b, path + ((tag, index),), uids, extra, where, out,
                               skip=frozenset())
            continue
        if is_identifier(mine) or tag in extra:
            a, b = identifier_value(mine), identifier_value(theirs)
            assert a is not None and b is not None
            problem = uids.check(path, tag, a, b, where)
            if problem is not None:
                out.append(problem)
            continue
        a, b = element_value(mine), element_value(theirs)
        if a != b:
            out.append(Difference(path, tag, "value", a, b))


def _display(elem: DataElement) -> Any:
    if elem.VR == "SQ":
        return f"<sequence of {len(elem.value or [])} items>"
    try:
        return element_value(elem)
    except Exception as error:  # a value pydicom cannot decode: show why, keep comparing
        return f"<undecodable: {type(error).__name__}>"


@dataclasses.dataclass(frozen=True)
class Deliberate:
    """A known, deliberate difference with its reason.

    Matches a ``Difference`` whose ``tag & mask == value`` (a single tag, or a range such as
    overlay data 60xx,3000), whose kind is one of ``kinds`` (empty = any kind), at the depth
    ``where`` ('any', 'top' or 'nested').
    """

    name: str
    mask: int
    value: int
    kinds: frozenset[str]
    where: str
    reason: str
    detail: str = ""  # if set, the difference's detail must contain it
    ours: Any = None  # if set, the difference's value on our side must equal it
    reference: Any = None  # if set, Orthanc's value must equal it
    sample: str = ""  # if set, only for datasets whose label contains it

    def matches(self, difference: Difference, label: str = "") -> bool:
        if difference.tag & self.mask != self.value:
            return False
        if self.detail and self.detail not in difference.detail:
            return False
        if self.ours is not None and difference.ours != self.ours:
            return False
        if self.reference is not None and difference.reference != self.reference:
            return False
        if self.sample and self.sample not in label:
            return False
        if self.kinds and difference.kind not in self.kinds:
            return False
        if self.where == "top":
            return not difference.nested
        if self.where == "nested":
            return difference.nested
        return True


def deliberate(tag: str | int, kinds: Iterable[str] = (), where: str = "any", *,
               reason: str, mask: int = 0xFFFFFFFF, detail: str = "", ours: Any = None,
               reference: Any = None, sample: str = "") -> Deliberate:
    """A table entry: ``tag`` is a keyword or an int; ``mask`` selects a range of tags (0: any
    tag); ``detail``/``ours``/``reference``/``sample`` narrow it further."""
    value = int(Tag(tag)) if isinstance(tag, str) else int(BaseTag(tag))
    if where not in ("any", "top", "nested"):
        raise ValueError(f"where must be 'any', 'top' or 'nested', not {where!r}")
    name = tag if isinstance(tag, str) else f"{value >> 16:04x},{value & 0xFFFF:04x}"
    if mask != 0xFFFFFFFF:
        name = "".join(c if (mask >> (4 * (7 - i))) & 0xF else "x"
                       for i, c in enumerate(f"{value:08x}"))
        name = f"{name[:4]},{name[4:]}"
    if mask == 0:
        name = "any tag"
    return Deliberate(name, mask, value & mask, frozenset(kinds), where, reason, detail, ours,
                      reference, sample)


def split_deliberate(differences: Iterable[Difference], table: Iterable[Deliberate],
                     label: str = "") -> tuple[list[Difference], list[tuple[Difference, Deliberate]]]:
    """(unexpected differences, [(deliberate difference, its table entry)]) for the dataset
    named ``label``."""
    rules = list(table)
    unexpected: list[Difference] = []
    known: list[tuple[Difference, Deliberate]] = []
    for difference in differences:
        rule = next((r for r in rules if r.matches(difference, label)), None)
        if rule is None:
            unexpected.append(difference)
        else:
            known.append((difference, rule))
    return unexpected, known


#: Differences that come from how Orthanc's writer (DCMTK) serialises a file rather than from
#: the request: shared by every differential module's DELIBERATE_DIFFERENCES.
WRITER_DIFFERENCES: list[Deliberate] = [
    deliberate(0x00020000, ["extra"], "nested", mask=0xFFFF0000,
               reason="group-0002 elements misplaced inside sequence items (PrivateTags.dcm "
                      "6003,1010[*].TransferSyntaxUID) are copied like every element the "
                      "request does not touch; DCMTK's writer drops them"),
    deliberate(0x00000000, ["missing"], mask=0x0000FFFF,
               reason="group length elements (gggg,0000; retired, PS3.5 7.2) are dropped; "
                      "DCMTK recomputes and keeps those of the source"),
    *(deliberate("MediaStorageSOPClassUID", ["uid-structure"], "top",
                 detail="Orthanc generated a new identifier, we kept the original",
                 reference="1.2.276.0.7230010.3.1.0.1", sample=name,
                 reason="the file meta always carries the data set's SOPClassUID; when the "
                        "source stores it with explicit VR UN (2022-03-08-RicSmi.dcm, "
                        "pydicom's rtdose_rle*.dcm) DCMTK writes its placeholder class "
                        "1.2.276.0.7230010.3.1.0.1 instead")
      for name in ("2022-03-08-RicSmi.dcm", "rtdose_rle")),
    deliberate("MediaStorageSOPInstanceUID", ["uid-structure"], "top",
               detail="Orthanc generated a new identifier, we kept the original",
               sample="2022-03-08-RicSmi.dcm",
               reason="the same file with its SOPInstanceUID kept (Keep + Force): DCMTK also "
                      "writes a new MediaStorageSOPInstanceUID beside it; ours repeats the "
                      "data set's"),
    *(deliberate("MediaStorageSOPClassUID", ["uid-structure"], "top", reference=nested_class, sample=name,
                 reason="with SOPClassUID removed, DCMTK's meta takes the first SOPClassUID "
                        "inside a sequence item (a functional group's, a source image's: "
                        "another instance's class); we write the generic file class, as DCMTK "
                        "does when there is none")
      for name, nested_class in (("Issue22-NoPixelData.dcm", "1.2.840.10008.5.1.4.1.1.4"),
                                 ("ColorTestImageJ.dcm", "1.2.840.10008.5.1.4.1.1.7"))),
]

#: Differences that are our bugs, reported to the owner; a test that meets one (and nothing
#: unexpected) is marked xfail with the bug's description. Remove an entry once fixed.
KNOWN_BUGS: list[Deliberate] = []

#: Sample files on which our engine currently raises instead of producing a file (known bugs,
#: reported to the owner): the sweeps mark them xfail(raises=...). Remove once fixed.
KNOWN_CRASHES: dict[str, tuple[type[BaseException], str]] = {}


def judge(results: Iterable[tuple[str, list[Difference]]], table: Iterable[Deliberate],
          known_bugs: Iterable[Deliberate] = KNOWN_BUGS) -> None:
    """Fail on any difference neither deliberate nor a known bug; xfail on known bugs.

    ``results``: (label, differences) per compared dataset.
    """
    rules, bugs = list(table), list(known_bugs)
    unexpected_text: list[str] = []
    bug_hits: dict[str, list[str]] = {}
    for label, differences in results:
        unexpected, _known = split_deliberate(differences, rules, label)
        unexpected, buggy = split_deliberate(unexpected, bugs, label)
        if unexpected:
            unexpected_text.append(format_differences(unexpected, f"{label}:"))
        for difference, rule in buggy:
            bug_hits.setdefault(rule.reason, []).append(f"{label}: {difference}")
    if unexpected_text:
        pytest.fail("ours differs from Orthanc 1.10.1:\n" + "\n".join(unexpected_text),
                    pytrace=False)
    if bug_hits:
        pytest.xfail("known bug: " + "; ".join(
            f"{reason} (e.g. {hits[0]})" for reason, hits in bug_hits.items()))


def format_differences(differences: Iterable[Difference], header: str = "") -> str:
    lines = [str(d) for d in differences]
    return "\n".join(([header] if header else []) + ["  " + line for line in lines])


# --- Running our side -------------------------------------------------------------------

#: The key of our side in every differential test (one key per comparison = one Orthanc job).
KEY_BYTES = b"k" * 32


def engine_modules() -> tuple[Any, Any, Any, Any]:
    """(request, engine, identity, dicomio): our side of every comparison."""
    from transforms import dicomio, engine, identity, request

    return request, engine, identity, dicomio


def read(data: bytes) -> Dataset:
    """A file's dataset as written, fully decoded, for comparison.

    Elements stored with VR UN keep VR UN and their bytes (pydicom would otherwise give them
    their dictionary VR, hiding a UN-versus-known-VR difference between two files).
    """
    ds = pydicom.dcmread(BytesIO(data), force=True)
    previous = pydicom.config.replace_un_with_known_vr
    pydicom.config.replace_un_with_known_vr = False
    try:
        _decode_all(ds)
        meta = getattr(ds, "file_meta", None)
        if meta is not None:
            _decode_all(meta)
    finally:
        pydicom.config.replace_un_with_known_vr = previous
    return ds


def _decode_all(ds: Dataset) -> None:
    for elem in ds:  # iterating converts every raw element now, under the caller's config
        if elem.VR == "SQ":
            for item in elem.value or []:
                _decode_all(item)


def ours_for(plan: Any, data: bytes, key_bytes: bytes = KEY_BYTES) -> Dataset:
    """Our result for one file, written and read back (as downloaded from Orthanc)."""
    _, engine, identity, dicomio = engine_modules()
    key = identity.Key.from_bytes(key_bytes)
    out = engine.apply(plan, dicomio.read_dataset(data), key)
    return read(dicomio.write_dataset(out))


_STEP = re.compile(r"^(?:\((?P<tag>[0-9a-fA-F]{4},[0-9a-fA-F]{4})\)|(?P<kw>[A-Za-z0-9]+))"
                   r"(?:\[(?P<index>\d+)\])?$")


def value_at(ds: Dataset, path: str) -> Any:
    """The value at ``Seq[0].(gggg,eeee)[1].Keyword`` (None when any step is absent).

    Strings (DS/IS too) as text, numbers and AT as int, binary as bytes, multiple values as a
    tuple of text, a sequence as ``"<n> items"``.
    """
    current: Any = ds
    for step in path.split("."):
        match = _STEP.match(step)
        assert match, f"bad path step {step!r}"
        tag: Any = (int(match["tag"].replace(",", ""), 16) if match["tag"] else match["kw"])
        if tag not in current:
            return None
        elem = current[tag]
        if match["index"] is not None:
            items = elem.value or []
            index = int(match["index"])
            if index >= len(items):
                return None
            current = items[index]
        else:
            current = elem
    if current.VR == "SQ":
        return f"{len(current.value or [])} items"
    value = current.value
    if isinstance(value, (list, MultiValue)):
        return tuple(str(v) for v in value)
    if value is None:
        return ""
    if isinstance(value, bytes) or (isinstance(value, int) and current.VR not in ("IS", "DS")):
        return value  # binary, US/SS/UL/SL/AT
    return str(value)


def check_expectations(ds: Dataset, expect: dict[str, Any], side: str) -> list[str]:
    problems = []
    for path, wanted in expect.items():
        got = value_at(ds, path)
        if got != wanted:
            problems.append(f"{side}: {path} = {got!r}, expected {wanted!r}")
    return problems


def sweep_params() -> list[Any]:
    """orthanc_ref.SWEEP_FILES as pytest params, known crashes marked xfail (non-strict)."""
    from tests.orthanc_ref import SWEEP_FILES

    params = []
    for relative in SWEEP_FILES:
        crash = KNOWN_CRASHES.get(relative)
        marks = [pytest.mark.xfail(raises=crash[0], reason=f"known bug: {crash[1]}")] if crash else []
        params.append(pytest.param(relative, id=relative, marks=marks))
    return params
