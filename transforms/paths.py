"""dcmodify-style tag paths (``ReferencedImageSequence[*].ReferencedSOPInstanceUID``).

Grammar (Orthanc ``DicomPath``)::

    path   := { parent "." } final
    parent := tag "[" index "]"        index := non-negative integer | "*"
    final  := tag                      tag   := "(gggg,eeee)" | hex | keyword

Applying a path never creates items and a missing sequence or index is no error. Edits are
copy-on-write: :class:`Workspace` copies a sequence's items the first time an edit reaches
into them, so the input dataset is never modified.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from transforms.errors import InputError, RequestError
from transforms.tags import SPECIFIC_CHARACTER_SET as _SPECIFIC_CHARACTER_SET
from transforms.tags import PrivateDictionary, parse_tag

Parent = tuple[int, int | None]  # (sequence tag, item index or None for [*])


@dataclass(frozen=True)
class TagPath:
    """A parsed path: the chain of (sequence, index) parents and the final tag."""

    parents: tuple[Parent, ...]
    tag: int

    @property
    def is_top_level(self) -> bool:
        return not self.parents

    def __str__(self) -> str:
        """Orthanc's canonical form: ``(gggg,eeee)[i].(gggg,eeee)``, lower-case hex."""
        parts = [f"({t >> 16:04x},{t & 0xFFFF:04x})[{'*' if i is None else i}]"
                 for t, i in self.parents]
        parts.append(f"({self.tag >> 16:04x},{self.tag & 0xFFFF:04x})")
        return ".".join(parts)

    def touches_group_length(self) -> bool:
        """Orthanc ignores paths through or to a group-length element (gggg,0000)."""
        return self.tag & 0xFFFF == 0 or any(t & 0xFFFF == 0 for t, _ in self.parents)

    def matches(self, parents: tuple[tuple[int, int], ...], tag: int) -> bool:
        """Whether this (Keep) pattern covers the element ``tag`` found under ``parents``.

        The element matches when its parent chain starts with this pattern's parents (same
        tags, same indices unless ``[*]``) and it either is the pattern's final tag at the same
        depth or lies inside the subtree of that tag.
        """
        depth = len(self.parents)
        if len(parents) < depth:
            return False
        for (ptag, pindex), (etag, eindex) in zip(self.parents, parents):
            if ptag != etag or (pindex is not None and pindex != eindex):
                return False
        if len(parents) == depth:
            return tag == self.tag
        return parents[depth][0] == self.tag


def parse_path(
    text: str,
    *,
    key: str,
    dictionary: PrivateDictionary | None = None,
    private_creator: str | None = None,
) -> TagPath:
    """Parse a path as Orthanc does.

    Raises:
        RequestError: naming ``key`` and the path, for a malformed path or an unknown tag.
    """

    def fail(why: str) -> RequestError:
        return RequestError(f"{key}: bad path {text!r}: {why}")

    tokens = text.split(".")
    parents: list[Parent] = []
    for token in tokens[:-1]:
        token = token.strip()
        open_at = token.find("[")
        if open_at < 0:
            raise fail(f"parent {token!r} has no [index] (use [n] or [*])")
        if not token.endswith("]"):
            raise fail(f"parent {token!r} is missing ']'")
        name = token[:open_at].strip()
        index_text = token[open_at + 1:-1].strip()
        if not name:
            raise fail("empty tag name")
        if index_text == "*":
            index = None
        elif index_text.isascii() and index_text.isdigit() and len(index_text) <= 9:
            index = int(index_text)  # ASCII digits only (isdigit alone takes '²' and '٣')
        else:
            raise fail(f"index {index_text!r} must be a non-negative integer (at most 9 digits) or *")
        parents.append((parse_tag(name, key=key, dictionary=dictionary,
                                  private_creator=private_creator, allow_parentheses=True),
                        index))
    final = tokens[-1].strip()
    if not final:
        raise fail("empty tag name")
    if "[" in final or "]" in final:
        raise fail("the last element cannot have an index")
    return TagPath(tuple(parents), parse_tag(final, key=key, dictionary=dictionary,
                                             private_creator=private_creator,
                                             allow_parentheses=True))


def shallow_copy(ds: Dataset) -> Dataset:
    """A new dataset sharing the (immutable or replaced-on-write) elements of ``ds``.

    pydicom's ``copy.copy`` shares the element dict itself; this copies the dict, keeps the
    encoding attributes (so raw elements are written back as they are), gives the copy its own
    file meta and drops cached pixel arrays and private blocks.
    """
    new = object.__new__(type(ds))
    attrs = new.__dict__
    attrs.update(ds.__dict__)
    attrs["_dict"] = dict(ds._dict)
    attrs["_private_blocks"] = {}
    attrs["_pixel_array"] = None
    attrs["_pixel_id"] = {}
    meta = ds.__dict__.get("file_meta")
    if meta is not None:
        new_meta = object.__new__(type(meta))
        new_meta.__dict__.update(meta.__dict__)
        new_meta.__dict__["_dict"] = dict(meta._dict)
        new_meta.__dict__["_private_blocks"] = {}
        attrs["file_meta"] = new_meta
    return new


#: Sequence items one data set's de-identification may build as objects (the object walk of
#: the nested pass, the sequences that paths name). Each becomes a Dataset (about 1 KB even
#: when the item is 8 bytes), so a crafted file of a few megabytes of empty items would take
#: gigabytes; real files stay far below (an enhanced CT of 5,000 frames: ~50,000). Beyond it a
#: sequence may still build one item per ``BYTES_PER_ITEM`` bytes of its own value, so a large
#: real one (a slide's 300,000 per-frame items of ~200 bytes) is walked, in memory that grows
#: with the file, while millions of 8-byte items are not. The byte-level walk builds no objects
#: and has no such limit.
MAX_WALKED_ITEMS = 200_000
BYTES_PER_ITEM = 64
#: Values of multi-valued UIDs (and PatientIDs, PatientNames) one file may have mapped or
#: compared: each value becomes a string object, and a mapped one a UID of ~44 characters
#: however short it was, so 20 MB of one-digit values (ten million) took 1.4 GB and made a
#: 450 MB output. Real files have a handful (most identifiers have one value).
MAX_MAPPED_VALUES = 1_000_000

_ITEM_TAG_BYTES = {True: b"\xfe\xff\x00\xe0", False: b"\xff\xfe\xe0\x00"}  # by little endian


def item_allowance(value: object, items_left: int) -> int:
    """How many items decoding ``value``, a raw sequence's bytes, may build when the data set
    may still build ``items_left`` (see ``MAX_WALKED_ITEMS``)."""
    size = len(value) if isinstance(value, (bytes, bytearray, memoryview)) else 0
    return max(items_left, size // BYTES_PER_ITEM, 0)


def convert_sequence(raw: RawDataElement, tag: int, encodings: Any, ds: Dataset) -> DataElement:
    """pydicom's conversion of a raw element that should hold a sequence (``tag``'s, in ``ds``
    whose text is in ``encodings``): a value it cannot read as items is the file's
    ``not_dicom``. pydicom raises OSError or ValueError on one, or, retrying other VRs after a
    ValueError, returns it read as text under VR SQ (a damaged PerFrameFunctionalGroupsSequence
    came back as 438 strings); walked as items, that raised AttributeError (internal errors).
    An element pydicom converts to another VR is returned as it is.

    Raises:
        InputError: ``not_dicom``.
    """
    try:
        elem = convert_raw_data_element(raw, encoding=encodings, ds=ds)
    except (RecursionError, MemoryError):
        raise
    except Exception:  # noqa: BLE001 - pydicom's reader: OSError, ValueError, ...
        raise _unparsable(tag) from None
    if elem.VR == "SQ":
        sequence_items(elem, tag)
    return elem


def sequence_items(elem: DataElement, tag: int) -> list[Dataset]:
    """The items of a sequence element pydicom converted (see :func:`convert_sequence`).

    Raises:
        InputError: ``not_dicom``, for what pydicom returned as text under VR SQ.
    """
    value = elem.value
    if isinstance(value, Sequence) or (isinstance(value, list) and not value):
        return value
    raise _unparsable(tag)


def _unparsable(tag: int) -> InputError:
    return InputError(f"sequence ({tag >> 16:04X},{tag & 0xFFFF:04X}) cannot be parsed", reason="not_dicom")


def too_many_items() -> InputError:
    return InputError(f"too many sequence items to de-identify in one file (at most "
                      f"{MAX_WALKED_ITEMS}, or one per {BYTES_PER_ITEM} bytes of a sequence)",
                      reason="too_large")


def check_item_count(raw: RawDataElement, items_left: int) -> None:
    """Refuse a raw sequence with more items than it may build (:func:`item_allowance`)
    before pydicom decodes it (and builds every item).

    Raises:
        InputError: ``too_large``.
    """
    value = raw.value
    allowance = item_allowance(value, items_left)
    if type(value) is not bytes or value.count(_ITEM_TAG_BYTES[raw.is_little_endian]) <= allowance:
        return  # the item tag's bytes (nested items included) bound the count: the usual case
    from transforms import engine  # engine imports this module

    try:  # count the items for real, building at most allowance + 1 of them
        engine._items(value, 0, len(value), bool(raw.is_implicit_VR), raw.is_little_endian, None, 0,
                      allowance)
    except (engine._Unusual, struct.error):
        pass  # a layout only pydicom reads: left to it


class Workspace:
    """Copy-on-write bookkeeping for one output dataset.

    A dataset is *owned* when it belongs to the output only (a shallow copy, or freshly parsed
    from a raw element of an owned dataset); only owned datasets are edited.
    """

    def __init__(self, root: Dataset) -> None:
        self._owned: set[int] = {id(root)}
        self._owned_elements: set[int] = set()
        self._made: set[int] = set()
        self.items_left = MAX_WALKED_ITEMS

    def made(self, raw: RawDataElement) -> RawDataElement:
        """Record a raw element a replacement made (shared between outputs, never edited): a
        path below it reaches items only when it is a sequence. As Orthanc: a private element
        replaced by text is text, even where the file held a sequence there, and not the
        items pydicom's dictionary would read into its bytes."""
        self._made.add(id(raw))
        return raw

    def adopt_sequence(self, elem: DataElement) -> DataElement:
        """Mark a sequence element made for the output (and its items) as owned."""
        self._owned_elements.add(id(elem))
        self._owned.update(id(item) for item in elem.value)
        return elem

    def items(self, ds: Dataset, tag: int) -> list[Dataset] | None:
        """The items of the sequence ``tag`` of the owned ``ds``, themselves owned.

        Returns None when ``tag`` is absent or not a sequence.
        """
        current = ds._dict.get(tag)
        if current is None:
            return None
        if isinstance(current, RawDataElement):
            if current.VR != "SQ" and id(current) in self._made:
                return None  # a top-level Replace's value (text, bytes, null): not a sequence
            from transforms.dicomio import _character_set  # dicomio imports this module

            check_item_count(current, self.items_left)
            # Parsing a raw element yields new objects that nobody else sees. (Not ds[tag]:
            # pydicom's __getitem__ wraps what it converted in a Sequence, and raised TypeError
            # on bytes it could not parse as items.)
            elem = convert_sequence(current, tag, _character_set(ds), ds)
            if elem.VR != "SQ":
                return None
            self.items_left -= len(elem.value)
            ds[tag] = elem  # (pydicom passes the PixelRepresentation on to the items)
            return self.adopt_sequence(elem).value
        if current.VR != "SQ":
            return None
        if id(current) in self._owned_elements:
            return current.value
        copies = [shallow_copy(item) for item in current.value]
        elem = DataElement(tag, "SQ", Sequence(copies), current.file_tell,
                           current.is_undefined_length, already_converted=True)
        ds._dict[tag] = elem
        return self.adopt_sequence(elem).value

    def owned_element(self, elem: DataElement) -> DataElement:
        """Record a new element (e.g. a built replacement) as owned."""
        self._owned_elements.add(id(elem))
        if elem.VR == "SQ":
            for item in elem.value:
                self._owned.add(id(item))
                for sub in item._dict.values():
                    if isinstance(sub, DataElement):
                        self.owned_element(sub)
        return elem

    def targets(self, ds: Dataset, parents: tuple[Parent, ...],
                owner: Dataset | None = None) -> Iterator[tuple[Dataset, Dataset]]:
        """The owned item datasets a path's parent chain reaches from ``ds``, each with the
        data set whose SpecificCharacterSet applies to its text: the nearest one on the way
        that declares one (PS3.5 7.5.3), else ``ds``."""
        if owner is None or _SPECIFIC_CHARACTER_SET in ds._dict:
            owner = ds
        if not parents:
            yield ds, owner
            return
        tag, index = parents[0]
        items = self.items(ds, tag)
        if not items:
            return
        chosen = items if index is None else (items[index:index + 1])
        for item in chosen:
            yield from self.targets(item, parents[1:], owner)


def remove_at(ws: Workspace, ds: Dataset, path: TagPath) -> None:
    """Delete ``path``'s final tag in every item it reaches (missing: nothing happens)."""
    for target, _ in ws.targets(ds, path.parents):
        if path.tag in target._dict:
            del target[path.tag]


def replace_at(ws: Workspace, ds: Dataset, path: TagPath,
               make: Callable[[Dataset], DataElement]) -> None:
    """Set ``path``'s final tag (insert if absent) in every existing item it reaches.

    ``make`` gets the data set whose SpecificCharacterSet applies to the item's text
    (:meth:`Workspace.targets`)."""
    for target, charset_owner in ws.targets(ds, path.parents):
        target[path.tag] = ws.owned_element(make(charset_owner))
