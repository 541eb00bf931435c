"""Per-file work without Beam: read, de-identify, encode, hash, publish; one audit row per file.

Beam's filesystems (``gs://`` and other schemes, glob matching) are imported on first use
only, so the one-file command never loads Beam. :mod:`transforms.beam` wraps these functions
in DoFns.

Outputs are written atomically to ``<OUTPUT>/<StudyUID>/<SeriesUID>/<SOPUID>.dcm`` (the *new*
UIDs, each checked against ``^[0-9]+(\\.[0-9]+)*$`` and 64 characters before it becomes a path
component):

- Local disk: the bytes go to a temporary file under ``<OUTPUT>/.dicom-deid-tmp/<run_id>/``,
  then ``os.link(temp, final)`` publishes only if ``final`` does not exist (atomic
  create-if-absent), so two workers racing for one name cannot both win. A loser compares
  SHA-256: identical bytes are an idempotent rerun or retried bundle (``written``), different
  bytes are ``failed``/``duplicate_instance`` and the first file stays.
- ``gs://``: one upload with the generation precondition ``if_generation_match=0`` (create
  if absent; GCS makes an object visible only once its upload is complete), through the
  storage client of Beam's own GCS filesystem. A refused precondition means the name exists:
  its SHA-256 is compared as on local disk. One request per file instead of five, and no race.
- Other object stores: Beam's filesystems offer no create-if-absent, so the order is
  exists-check, temp upload, ``FileSystems.rename`` (copy + delete), then a checksum check of
  the published object against the temp object. Two workers producing the *same name from
  different content* at the same moment can both pass the exists-check; the checksum check
  then turns the overwritten one into ``duplicate_instance``, but if both checks run before the
  second copy lands, both rows say ``written`` and the object holds the later bytes. This
  window needs two different inputs that map to one SOPInstanceUID processed in the same
  instant.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import re
import stat
import struct
import threading
import time
import uuid
import warnings
from typing import Any, Iterable, Iterator, NamedTuple

from schemas.audit import (
    FAILED,
    NEW_IDENTITY_COLUMNS,
    SKIPPED,
    WRITTEN,
    audit_row,
    crosswalk_row,
    utc_now,
)
from transforms.errors import SKIPPED_REASONS, DeidError, InputError, is_work_failure


class _Lazy:
    """A Beam class, imported on first attribute access (Beam takes ~0.75 s to import)."""

    def __init__(self, module: str, name: str) -> None:
        self._where = (module, name)

    def __getattr__(self, attr: str) -> Any:
        import importlib

        module, name = self._where
        return getattr(getattr(importlib.import_module(module), name), attr)


FileSystems: Any = _Lazy("apache_beam.io.filesystems", "FileSystems")
CompressionTypes: Any = _Lazy("apache_beam.io.filesystem", "CompressionTypes")

TMP_DIR_NAME = ".dicom-deid-tmp"
# \Z, not $: "$" also matches before a trailing newline ("1.2\n" would name a file).
# Same rule as transforms.dicomio.is_valid_uid, kept here so this module does not import pydicom.
_UID_PATH_RE = re.compile(r"[0-9]+(\.[0-9]+)*\Z")
_MODALITY_RE = re.compile(r"[A-Z0-9_]{1,16}\Z")
_GLOB_CHARS = frozenset("*?[")
_SCHEME_RE = re.compile(r"(?P<scheme>[a-zA-Z][-a-zA-Z0-9+.]*)://.*")  # = FileSystems.URI_SCHEMA_PATTERN
_READ_CHUNK = 8 << 20
# Linux returns at most 0x7ffff000 bytes per read(2): asking for that much reads a file below
# 2 GiB (the default --max-bytes) in one piece (a 1.2 GiB file in 1 GiB pieces was held twice
# while they were joined: peak 2.0x its size, now 1.0x, measured 27 November 2026).
_MAX_READ = 0x7FFFF000
# Remote reads ask for up to this much at once (see read_bounded); larger objects come in pieces.
_REMOTE_READ = 1 << 30
_DETAIL_MAX = 300


def _is_uid(value: str | None) -> bool:
    """A UID usable as a path component: digits and dots, at most 64 characters."""
    return bool(value) and len(value) <= 64 and _UID_PATH_RE.match(value) is not None


def get_scheme(uri: str) -> str | None:
    """``FileSystems.get_scheme`` without importing Beam."""
    found = _SCHEME_RE.match(uri.strip())
    return found.group("scheme") if found else None

# --------------------------------------------------------------------------- configuration


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything a worker needs, validated once by the CLI; picklable.

    Attributes:
        plan: the parsed request (``transforms.request.Plan``).
        output_root: OUTPUT as an absolute local path or a ``scheme://`` prefix, no trailing slash.
        run_id: identifies the run in every audit row and names the temporary folder.
        key_id: the key's id; a worker loading ``key_uri`` checks it got the same key.
        key: the key itself, shipped with the DoFn (local runs, env or random keys).
        key_uri: a key file on a remote filesystem (``gs://...``), read by each worker in
            ``setup()`` so the key never travels inside the pipeline description.
        max_bytes: inputs larger than this are ``too_large`` without being read.
        crosswalk: emit crosswalk rows (original -> new identifiers) for written files.
        progress_dir: local folder where workers drop their counters for the CLI's progress
            line (DirectRunner only); None disables it.
        memory_budget: bytes of input files that the DeidentifyFns of one worker process may
            hold at once (:class:`MemoryBudget`); None: :func:`default_memory_budget` of the
            worker's own machine.
    """

    plan: Any
    output_root: str
    run_id: str
    key_id: str
    key: Any = None
    key_uri: str | None = None
    max_bytes: int = 2 << 30
    crosswalk: bool = False
    progress_dir: str | None = None
    memory_budget: int | None = None

    def __post_init__(self) -> None:
        if (self.key is None) == (self.key_uri is None):
            raise ValueError("RunConfig: exactly one of key and key_uri must be given")
        if self.max_bytes <= 0:
            raise ValueError("RunConfig: max_bytes must be positive")
        if self.memory_budget is not None and self.memory_budget <= 0:
            raise ValueError("RunConfig: memory_budget must be positive")

    def __repr__(self) -> str:  # never show the key, even by accident
        return f"RunConfig(output_root={self.output_root!r}, run_id={self.run_id!r}, key_id={self.key_id!r})"


def load_key_uri(uri: str) -> Any:
    """Read a key file through Beam's filesystems (``gs://`` included), as ``Key.from_file`` does."""
    from transforms.identity import MAX_KEY_FILE_BYTES, InvalidKey, Key

    try:
        with FileSystems.open(uri, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            data = f.read(MAX_KEY_FILE_BYTES + 1)
    except Exception as exc:  # noqa: BLE001 - any filesystem failure means "cannot read"
        raise InvalidKey(f"--key-file {uri!r}: cannot read ({type(exc).__name__})") from None
    return Key.from_file_bytes(data, name=uri)


_DICM_OFFSET = 128  # the DICM marker's place in a Part 10 file


_SELECTION_INDEX: dict[int, tuple[Any, dict[str, tuple[int, ...]]]] = {}
#: How many plans' selection indexes a process keeps. Each DoFn instance unpickles its own plan
#: (Dataflow runs several bundles at once per process, each with its instance): with one slot,
#: two instances taking turns rebuilt the index for every file (measured: 94 ms per file with
#: 50,000 entries instead of 0.5 us).
_SELECTION_INDEXES_KEPT = 64
_SELECTION_LOCK = threading.Lock()


def _selection(plan: Any) -> dict[str, tuple[int, ...]]:
    """The request's ``Resources`` as normalised entry -> positions (Orthanc ids are
    case-insensitive hex), built once per plan: a bulk selection of 100,000 UIDs must not be
    normalised and scanned again for every file."""
    resources = getattr(plan, "resources", None) or ()
    cached = _SELECTION_INDEX.get(id(resources))
    if cached is None or cached[0] is not resources:
        index: dict[str, list[int]] = {}
        for position, entry in enumerate(resources):
            index.setdefault(str(entry).strip().lower(), []).append(position)
        cached = (resources, {entry: tuple(positions) for entry, positions in index.items()})
        with _SELECTION_LOCK:  # (bundles run in threads)
            while len(_SELECTION_INDEX) >= _SELECTION_INDEXES_KEPT:  # the oldest first (dicts keep order)
                _SELECTION_INDEX.pop(next(iter(_SELECTION_INDEX)))
            _SELECTION_INDEX[id(resources)] = cached  # (holding resources: its id cannot be reused)
    return cached[1]


def quiet_pydicom_warnings() -> None:
    """Silence pydicom's UserWarnings in this process: some quote element values (patient data)
    and they would flood the console of a run over thousands of files; the audit row is the
    record of what went wrong."""
    warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\.|$)")


# --------------------------------------------------------------------------- input expansion


def is_local(uri: str) -> bool:
    """True for a plain path (Beam's local filesystem)."""
    return get_scheme(uri) in (None, "file")


def has_glob(uri: str) -> bool:
    return any(c in _GLOB_CHARS for c in uri)


def expand_input(uri: str) -> Iterator[tuple[str, int]]:
    """Yield ``(path, size)`` for every file INPUT names.

    An existing local file or folder is taken literally, even when its name holds ``[``, ``*``
    or ``?`` (``scan[1]/`` is that folder, not a pattern matching ``scan1``); otherwise a glob is
    matched as is (``**`` crosses folders, Beam's pattern syntax); an existing file or object is
    itself; anything else is a folder or prefix, matched recursively. Our own temporary folder
    is never input. The listing streams (see :func:`_match_streaming`): a bucket of 50 million
    objects is never one list in a worker's memory.
    A ``gs://`` INPUT holding those characters is taken literally in the same way when it
    names an existing object, or a prefix with objects under it.
    """
    if is_local(uri) and os.path.isdir(uri):
        yield from (_shown(path, size) for path, size in _walk_local(uri.rstrip("/") or "/") if _is_input(path, size))
        return
    pattern = _input_pattern(uri)
    if pattern is None:
        # The object's own metadata: ``match`` would read ``[``, ``*`` or ``?`` in its name as a
        # pattern (no object, or another one's size).
        yield uri, os.path.getsize(uri) if is_local(uri) else int(
            FileSystems.get_filesystem(uri).metadata(uri).size_in_bytes)
        return
    for path, size in _match_streaming(pattern):
        if _is_input(path, size):
            yield path, size


def _input_pattern(uri: str) -> str | None:
    """The glob that INPUT stands for; None when it is one existing file or object."""
    if is_local(uri) and os.path.isfile(uri):
        return None  # literally, whatever characters its name holds
    if has_glob(uri):
        return uri if is_local(uri) else _remote_glob(uri)
    if not is_local(uri):
        if uri.endswith("/") or re.fullmatch(r"[a-z0-9]+://[^/]+", uri):
            return uri.rstrip("/") + "/**"  # a prefix as written ("x/"), or a whole bucket
        if FileSystems.exists(uri):
            return None
    return uri.rstrip("/") + "/**"


def _escape_glob(text: str) -> str:
    """``text`` as a pattern matching only itself (``[`` as ``[[]``: Beam's pattern syntax, like
    fnmatch's, has no other way to quote)."""
    return re.sub(r"([\[*?])", r"[\1]", text)


_BEAM_STAR = "[^/\\\\]*"  # what FileSystem.translate_pattern writes for "*"


def pattern_matcher(pattern: str) -> Any:
    """``re.match`` of Beam's pattern syntax (``FileSystem.translate_pattern``), where a set of
    one ``[``, ``*`` or ``?`` (``[[]``, as :func:`_escape_glob` writes) is translated as that
    character: Beam would write ``[[]`` into the regular expression, which Python warns may
    become a nested set one day, and ``*`` stops at ``/`` only. Sets are delimited as Beam (and
    fnmatch) delimit them."""
    from apache_beam.io.filesystem import FileSystem

    def translated(chunk: str) -> str:
        if not chunk:
            return ""
        # Beam's "*" also stops at a backslash (a Windows separator): a name such as
        # "ser\\1.dcm" would vanish from the run without an audit row (found by a review).
        return FileSystem.translate_pattern(chunk)[len("(?ms)"):-len("\\Z")].replace(_BEAM_STAR, "[^/]*")

    parts, start, i, n = [], 0, 0, len(pattern)
    while i < n:
        if pattern[i] != "[":
            i += 1
            continue
        j = i + 1
        if j < n and pattern[j] == "!":
            j += 1
        if j < n and pattern[j] == "]":
            j += 1
        while j < n and pattern[j] != "]":
            j += 1
        if j >= n:  # no closing bracket: a literal "[" (Beam's reading too)
            i += 1
            continue
        if pattern[i + 1:j] in ("[", "*", "?"):
            parts += [translated(pattern[start:i]), re.escape(pattern[i + 1])]
            start = j + 1
        i = j + 1
    parts.append(translated(pattern[start:]))
    return re.compile("(?ms)" + "".join(parts) + r"\Z").match


def listing_prefix(pattern: str) -> str:
    """The literal start of a pattern (up to its first glob character; ``[[]``, ``[*]``, ``[?]``
    as written by :func:`_escape_glob` are that character), which a listing can ask for."""
    return re.sub(r"\[([\[*?])\]", r"\1", re.match(r"(?:\[[\[*?]\]|[^\[*?])*", pattern).group(0))


def _remote_glob(uri: str) -> str | None:
    """The pattern of a remote INPUT holding glob characters: none for an existing object of
    that name, every object under it for a prefix of that name that has objects
    (``gs://b/scan[1]/`` is that "folder", not a pattern matching ``scan1/``, as a local folder
    is), the glob itself otherwise."""
    if not uri.endswith("/") and FileSystems.exists(uri):
        return None
    folder = uri.rstrip("/") + "/"
    if folder.startswith("gs://") and (client := _gcs_client(folder)) is not None:
        from apache_beam.io.gcp.gcsio import parse_gcs_path

        bucket, name_prefix = parse_gcs_path(folder, object_optional=True)
        if next(iter(client.list_blobs(bucket, prefix=name_prefix, max_results=1)), None) is not None:
            return _escape_glob(folder) + "**"
    return uri


def _is_input(path: str, size: int) -> bool:
    """Not our temporaries, not a "folder" placeholder object of an object store (an empty
    object whose name ends in ``/``; one that holds data is input like any other)."""
    return f"/{TMP_DIR_NAME}/" not in path and not (size == 0 and path.endswith("/"))


def _match_streaming(pattern: str) -> Iterator[tuple[str, int]]:
    """``FileSystems.match([pattern])`` as a stream of ``(path, size)``: the same pattern
    syntax (``FileSystem.translate_pattern``) over a listing that is never held whole.

    Beam's ``match`` returns one list, and its GCS listing also keeps a set of every name it has
    seen: ~15 GB for 50 million objects, in the one worker that expands INPUT. Local folders
    are walked with ``os.scandir`` (regular files, symlinks to files; symlinked folders are not
    entered, as ``os.walk``; broken symlinks and special files (FIFOs, sockets, devices) are
    listed too, with size 0, so that each gets its ``read_error`` audit row instead of
    vanishing); ``gs://`` is listed page by page with the storage client of Beam's own GCS
    filesystem; any other scheme falls back to ``FileSystems.match``.
    """
    matches = pattern_matcher(pattern)
    prefix = listing_prefix(pattern)
    if is_local(pattern):
        holds = _folder_matcher(pattern)
        for p, n in _walk_local(os.path.dirname(prefix) or ".", descend=holds):
            # A folder that cannot be listed is reported where files of the pattern may lie in
            # it (its name is not one the pattern matches: in/**/*.dcm, in/a/locked).
            if matches(p) or (n == UNLISTABLE_FOLDER and holds(p)):
                yield _shown(p, n)
    elif pattern.startswith("gs://") and (client := _gcs_client(pattern)) is not None:
        for p, n in gcs_first_level(client, pattern):
            if n is None:
                yield from gcs_under(client, pattern, p)
            else:
                yield p, n
    else:
        for result in FileSystems.match([pattern]):
            for meta in result.metadata_list:
                yield meta.path, int(meta.size_in_bytes)


def _may_cross_folders(part: str) -> bool:
    """Whether a component of a pattern can match across a ``/``: in Beam's syntax
    (``FileSystem.translate_pattern``) ``**`` and ``?`` match any character, and so does a
    negated set (``[!a]``); only ``*`` stops at ``/``. (Escaped characters, ``[?]``, are
    themselves.)"""
    rest = re.sub(r"\[[\[*?]\]", "", part)
    return "**" in rest or "?" in rest or "[!" in rest or "[^" in rest


def _folder_matcher(pattern: str) -> Any:
    """Whether files under a folder may match the ``pattern``: the folder's names match the
    pattern's first components one by one, and a component is left for the file's name; a
    component that can match across folders (:func:`_may_cross_folders`: ``**``, ``?``, a
    negated set) matches any depth from there on."""
    parts = pattern.split("/")
    component = [None if _may_cross_folders(part) else pattern_matcher(part) for part in parts]

    def holds(folder: str) -> bool:
        for i, name in enumerate(folder.split("/")):
            if component[i] is None:
                return True
            if i == len(parts) - 1 or not component[i](name):
                return False
        return True

    return holds


def gcs_first_level(client: Any, pattern: str) -> Iterator[tuple[str, int | None]]:
    """One listing with a delimiter from the literal start of the ``gs://`` ``pattern``:
    ``(path, size)`` of each object there that the pattern matches, then ``(folder, None)`` of
    each deeper "folder" (``gs://b/x/``) under which objects of the pattern may lie
    (:func:`_folder_matcher`: ``*`` never crosses a ``/``, so ``gs://b/*.dcm`` never descends
    into ``gs://b/archive/``)."""
    from apache_beam.io.gcp.gcsio import parse_gcs_path

    matches, holds = pattern_matcher(pattern), _folder_matcher(pattern)
    bucket, name_prefix = parse_gcs_path(listing_prefix(pattern), object_optional=True)
    listing = client.list_blobs(bucket, prefix=name_prefix, delimiter="/")
    for blob in listing:
        path = f"gs://{bucket}/{blob.name}"
        if matches(path):
            yield path, int(blob.size or 0)
    for prefix in sorted(listing.prefixes):  # complete once every page was read
        folder = f"gs://{bucket}/{prefix}"
        if holds(folder[:-1]):  # (one "/" off: "a//" is the folder "a/" holds)
            yield folder, None


def gcs_under(client: Any, pattern: str, folder: str) -> Iterator[tuple[str, int]]:
    """``(path, size)`` of the objects under the ``gs://`` ``folder`` (one
    :func:`gcs_first_level` gave) that the pattern matches, page by page: only the objects
    directly in it when the pattern's files lie there (``gs://b/*/*.dcm`` under
    ``gs://b/s1/``: what lies deeper is never listed), else every object under it."""
    from apache_beam.io.gcp.gcsio import parse_gcs_path

    matches = pattern_matcher(pattern)
    parts = pattern.split("/")
    if any(map(_may_cross_folders, parts)) or len(folder[:-1].split("/")) != len(parts) - 1:
        yield from ((p, n) for p, n in list_gcs(client, folder) if matches(p))
        return
    bucket, name_prefix = parse_gcs_path(folder, object_optional=True)
    for blob in client.list_blobs(bucket, prefix=name_prefix, delimiter="/"):
        path = f"gs://{bucket}/{blob.name}"
        if matches(path):
            yield path, int(blob.size or 0)


def list_gcs(client: Any, prefix: str) -> Iterator[tuple[str, int]]:
    """``(path, size)`` of every object whose name starts with the ``gs://`` ``prefix`` (taken
    literally), page by page (1,000 names per request)."""
    from apache_beam.io.gcp.gcsio import parse_gcs_path

    bucket, name_prefix = parse_gcs_path(prefix, object_optional=True)
    for blob in client.list_blobs(bucket, prefix=name_prefix):
        yield f"gs://{bucket}/{blob.name}", int(blob.size or 0)


def list_gcs_top(folder: str, limit: int) -> Iterator[tuple[str, bool]]:
    """``(name, is_folder)`` of up to ``limit`` objects and "folders" (prefixes ending at the
    next ``/``) directly under the ``gs://`` ``folder``, names relative to it (pages of 1,000,
    as GCS lists them, until ``limit`` is reached). Nothing when this Beam lends no storage
    client; a listing error is the caller's."""
    from apache_beam.io.gcp.gcsio import parse_gcs_path

    client = _gcs_client(folder)
    if client is None:
        return
    bucket, name_prefix = parse_gcs_path(folder.rstrip("/") + "/", object_optional=True)
    seen = 0
    for page in client.list_blobs(bucket, prefix=name_prefix, delimiter="/").pages:
        for blob in page:
            yield blob.name[len(name_prefix):], False
        for prefix in page.prefixes:
            yield prefix[len(name_prefix):].rstrip("/"), True
        seen += page.num_items + len(page.prefixes)
        if seen >= limit:
            return


#: The size listed for a file whose name is not valid UTF-8 (Latin-1 names from old archives):
#: Beam carries paths as UTF-8 strings, so such a file is listed under a printable form of its
#: name (undecodable bytes as ``\xNN``) and gets a ``read_error`` row asking for a rename.
UNREADABLE_NAME = -1
#: The size listed for a folder that cannot be listed (no permission, an I/O error): the folder
#: itself gets a ``read_error`` row, since the files in it cannot even be named.
UNLISTABLE_FOLDER = -2


def utf8_name(path: str) -> bool:
    """False for a path holding bytes that are not UTF-8 (kept as surrogates by ``os.fsdecode``)."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes of the name, kept as surrogates by os.fsdecode
        return False
    return True


def _display_name(path: str) -> str:
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _shown(path: str, size: int) -> tuple[str, int]:
    """A listed ``(path, size)`` as it travels on: a name that is not UTF-8 in printable form,
    with the size ``UNREADABLE_NAME`` (its ``read_error`` row asks for a rename), whatever made
    it listed: a file, a symlink loop, an entry that cannot be examined; a folder that cannot
    be listed keeps ``UNLISTABLE_FOLDER``. Beam carries paths as UTF-8: a raw name would stop
    the run in its coder."""
    if size == UNREADABLE_NAME or not utf8_name(path):
        return _display_name(path), UNLISTABLE_FOLDER if size == UNLISTABLE_FOLDER else UNREADABLE_NAME
    return path, size


def _walk_local(root: str, descend: Any = None) -> Iterator[tuple[str, int]]:
    """``(path, size)`` of every file under ``root``, one open folder at a time; with
    ``descend``, only in the sub-folders for which it is true."""
    folders = [root]
    while folders:
        folder = folders.pop()
        entries: list[tuple[str, int]] = []
        try:
            with os.scandir(folder) as it:
                for entry in it:
                    try:
                        if entry.is_dir():
                            if not entry.is_symlink() and (descend is None or descend(entry.path)):
                                folders.append(entry.path)
                        elif not utf8_name(entry.path):  # matched on the real name, then shown
                            entries.append((entry.path, UNREADABLE_NAME))
                        elif entry.is_file():  # follows a symlink, as os.path.isfile
                            entries.append((entry.path, entry.stat().st_size))
                        else:  # a broken symlink, a FIFO, a socket, a device: reported, not read
                            entries.append((entry.path, 0))
                    except FileNotFoundError:
                        continue  # vanished while listed
                    except OSError:  # a symlink loop (ELOOP), a folder that cannot be searched (EACCES)
                        entries.append((entry.path, 0))  # reading it gives the read_error row
                    if len(entries) >= 1024:
                        yield from entries
                        entries = []
        except (FileNotFoundError, NotADirectoryError):
            continue  # vanished, or replaced by a file, since it was listed
        except OSError:  # no permission to list it, an I/O error
            entries.append((folder, UNLISTABLE_FOLDER))
        yield from entries


# --------------------------------------------------------------------------- per-file work


_ASCII_KEYWORDS = {
    "SOPClassUID": 0x00080016,
    "SOPInstanceUID": 0x00080018,
    "Modality": 0x00080060,
    "StudyInstanceUID": 0x0020000D,
    "SeriesInstanceUID": 0x0020000E,
}


def safe_str(ds: Any, keyword: str) -> str | None:
    """A top-level string value, or None when absent or undecodable (hostile files)."""
    from pydicom.dataelem import RawDataElement
    from pydicom.multival import MultiValue

    from transforms.dicomio import peek

    tag = _ASCII_KEYWORDS.get(keyword)
    if tag is not None:
        # UI and CS values are ASCII whatever the character set: decode the raw bytes directly
        # (a pydicom conversion per identifier was ~5% of the per-file time).
        elem = ds._dict.get(tag)
        if elem is None:
            return None
        if isinstance(elem, RawDataElement) and isinstance(elem.value, (bytes, bytearray)):
            return bytes(elem.value).decode("ascii", "replace").strip(" \0")
    tag = _LO_KEYWORDS.get(keyword)
    if tag is not None:
        # LO depends on the character set, but every DICOM character set reads bytes 0x00-0x7F
        # as ASCII except ISO 2022's escape sequences; a backslash makes several values (not a
        # str). Plain ASCII single values are decoded here: pydicom's conversion was ~30 us.
        elem = ds._dict.get(tag)
        if elem is None:
            return None
        value = elem.value
        if (
            type(elem) is RawDataElement
            and type(value) is bytes
            and elem.VR in ("LO", None)
            and elem.length != 0xFFFFFFFF
            and value.isascii()
            and b"\\" not in value
            and b"\x1b" not in value
        ):
            return value.decode("ascii").rstrip(" \0")  # leading spaces count in Orthanc ids
    try:
        # peek, not ds.get: get() converts the raw element in place, which would make the
        # writer re-encode it instead of copying its bytes.
        value = peek(ds, keyword)
    except Exception:  # noqa: BLE001 - fall back to the raw bytes (identifiers are ASCII)
        value = _raw_text(ds, keyword)
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if keyword == "PatientID" and isinstance(value, MultiValue):
        value = "\\".join(str(v) for v in value)  # "A1\\B2" (invalid VM, real): Orthanc hashes the text
    if not isinstance(value, str):
        return None
    # A PatientID's leading spaces are part of its Orthanc ids (DCMTK keeps them); UIDs and
    # codes have none that count.
    return value.rstrip(" \0") if keyword == "PatientID" else value.strip(" \0")


def _raw_text(ds: Any, keyword: str) -> str | None:
    from pydicom.datadict import tag_for_keyword

    tag = tag_for_keyword(keyword)
    elem = ds._dict.get(tag) if tag is not None else None
    raw = getattr(elem, "value", None)
    if isinstance(raw, (bytes, bytearray)):
        return bytes(raw).decode("ascii", "replace")
    return raw if isinstance(raw, str) else None


_LO_KEYWORDS = {"PatientID": 0x00100020}


def _safe_uid(ds: Any, keyword: str) -> str | None:
    value = safe_str(ds, keyword)
    return value if _is_uid(value) else None


def _safe_modality(ds: Any) -> str | None:
    value = safe_str(ds, "Modality")
    return value if value and _MODALITY_RE.match(value) else None


def safe_transfer_syntax(ds: Any) -> str | None:
    from pydicom.dataelem import RawDataElement

    from transforms.dicomio import transfer_syntax_of

    meta = getattr(ds, "file_meta", None)
    raw = meta._dict.get(0x00020010) if meta is not None else None
    if type(raw) is RawDataElement and raw.VR == "UI" and type(raw.value) is bytes and raw.value.isascii():
        # The raw (0002,0010) as read: what pydicom would decode, without converting it in place
        # (~35 us per file). An empty value means "derive it from the encoding": pydicom's way.
        value = raw.value.decode("ascii").strip(" \0")
        if value:
            return value if _is_uid(value) else None
    try:
        value = str(transfer_syntax_of(ds)).strip(" \0")
    except Exception:  # noqa: BLE001
        return None
    return value if _is_uid(value) else None


def output_name(study: str | None, series: str | None, sop: str | None) -> str:
    """``<study>/<series>/<sop>.dcm`` from new UIDs; refuses anything that is not a plain UID.

    Raises:
        InputError (invalid_uid): a missing, too long or non-numeric component, so that a value
        such as ``../../x`` never becomes a path.
    """
    parts = []
    for keyword, value in (("StudyInstanceUID", study), ("SeriesInstanceUID", series), ("SOPInstanceUID", sop)):
        if not value:
            raise InputError(f"new {keyword} is missing: no output name", reason="invalid_uid")
        if not _is_uid(value):
            raise InputError(
                f"new {keyword} is not a valid UID (digits and dots, at most 64 characters): no output name",
                reason="invalid_uid",
            )
        parts.append(value)
    return f"{parts[0]}/{parts[1]}/{parts[2]}.dcm"


class Identifiers(NamedTuple):
    """The identifiers of one data set as read (None: absent or undecodable; not validated)
    and their Orthanc-style ids (``transforms.orthanc_ids.orthanc_ids``, absent ones hashed
    as "")."""

    patient_id: str | None
    study: str | None
    series: str | None
    sop: str | None
    orthanc: dict[str, str]  # patient, study, series, instance


def identifiers_of(ds: Any) -> Identifiers:
    """PatientID and the three UIDs of ``ds`` (:func:`safe_str`), with their Orthanc-style ids."""
    from transforms.orthanc_ids import orthanc_ids

    study, series, sop = (safe_str(ds, k) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"))
    patient_id = safe_str(ds, "PatientID")
    ids = orthanc_ids(patient_id or "", study or "", series or "", sop or "")
    return Identifiers(patient_id, study, series, sop, ids)


def identity_columns(ids: Identifiers) -> dict[str, Any]:
    """The audit columns naming the file a data set becomes (``NEW_IDENTITY_COLUMNS``): its
    UIDs (null unless usable as a path component) and Orthanc-style ids."""
    return {
        "study_instance_uid": ids.study if _is_uid(ids.study) else None,
        "series_instance_uid": ids.series if _is_uid(ids.series) else None,
        "sop_instance_uid": ids.sop if _is_uid(ids.sop) else None,
        "patient_orthanc_id": ids.orthanc["patient"],
        "study_orthanc_id": ids.orthanc["study"],
        "series_orthanc_id": ids.orthanc["series"],
        "instance_orthanc_id": ids.orthanc["instance"],
    }


def crosswalk_fields(
    source_uri: str, run_id: str, key_id: str, original: Identifiers, new: Identifiers, *, absent: str | None = None
) -> dict[str, Any]:
    """The crosswalk row of one written file, but its ``output_uri`` (give both to
    ``schemas.audit.crosswalk_row``).

    ``absent`` is what an identifier the data set lacks is recorded as, except the original
    PatientID (always ""): None for anonymize/modify, "" for split/merge.
    """

    def shown(value: str | None) -> str | None:
        return absent if value is None else value

    return {
        "source_uri": source_uri,
        "run_id": run_id,
        "key_id": key_id,
        "original_patient_id": original.patient_id or "",
        "original_study_instance_uid": shown(original.study),
        "original_series_instance_uid": shown(original.series),
        "original_sop_instance_uid": shown(original.sop),
        "new_patient_id": shown(new.patient_id),
        "new_study_instance_uid": shown(new.study),
        "new_series_instance_uid": shown(new.series),
        "new_sop_instance_uid": shown(new.sop),
        "original_instance_orthanc_id": original.orthanc["instance"],
        "new_instance_orthanc_id": new.orthanc["instance"],
    }


def _is_plain_path(uri: str) -> bool:
    """A local path without a scheme: plain ``os`` calls are what Beam's local filesystem does."""
    return get_scheme(uri) is None


def read_bounded(path: str, max_bytes: int) -> bytes:
    """The file's bytes, refusing (``too_large``) to hold more than ``max_bytes``."""
    if _is_plain_path(path):
        return _read_local(path, max_bytes)
    chunks = []
    total = 0
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        while True:
            # The whole object (and one byte more) in one read: GCS's reader then fetches it in
            # one request, and the bytes are not held twice while pieces are joined (measured on
            # the emulator, 100 MiB: peak 2.00x -> 1.09x its size, 1.17 s -> 0.69 s).
            chunk = f.read(min(_REMOTE_READ, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > max_bytes:
                raise InputError(f"file is larger than --max-bytes ({max_bytes} bytes)", reason="too_large")
    return b"".join(chunks)


def _read_local(path: str, max_bytes: int) -> bytes:
    """``read_bounded`` for a plain local path: one buffer sized from ``fstat`` (a buffered
    ``read(8 MiB)`` allocated and shrank 8 MiB per file), same errors as ``open`` + ``read``.
    Only regular files are read: ``O_NONBLOCK`` keeps ``open`` from waiting for the writer of a
    FIFO (it changes nothing for a regular file), and anything else is refused."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))  # as read() says it
        if not stat.S_ISREG(info.st_mode):
            raise InputError("not a regular file (a FIFO, socket or device)", reason="read_error")
        expected = info.st_size
        if expected > max_bytes:
            raise InputError(f"file is larger than --max-bytes ({max_bytes} bytes)", reason="too_large")
        chunks = []
        total = 0
        while True:
            # First read: the whole file and one byte more (a file that grew is noticed); later
            # reads (a growing file, or an OS that returns less) go on until EOF, bounded.
            want = max(expected + 1 - total, 1 << 16)
            chunk = os.read(fd, min(want, max_bytes + 1 - total, _MAX_READ))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > max_bytes:
                raise InputError(f"file is larger than --max-bytes ({max_bytes} bytes)", reason="too_large")
    finally:
        os.close(fd)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


_META_TAG_VR_LEN = struct.Struct("<HH2sH").unpack_from
_META_LONG_LEN = struct.Struct("<I").unpack_from


def meta_transfer_syntax(data: bytes) -> str | None:
    """(0002,0010) of a Part 10 file's meta group (explicit VR little endian), without pydicom."""
    if data[128:132] != b"DICM":
        return None
    pos, end = 132, len(data)
    while pos + 8 <= end:
        group, element, vr, length = _META_TAG_VR_LEN(data, pos)
        if group != 0x0002:
            return None
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
            (length,) = _META_LONG_LEN(data, pos + 8)
            value_at = pos + 12
        else:
            value_at = pos + 8
        if element == 0x0010:
            value = data[value_at : value_at + length].decode("ascii", "replace").strip(" \0")
            return value if _is_uid(value) else None
        pos = value_at + length
    return None


def _sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        while True:
            chunk = f.read(_READ_CHUNK)
            if not chunk:
                break
            digest.update(chunk)
    return digest.hexdigest()


class DuplicateInstanceError(DeidError):
    reason = "duplicate_instance"


def duplicate_instance_error() -> DuplicateInstanceError:
    return DuplicateInstanceError(
        "this output name (same new SOPInstanceUID) already holds a file with different content: another "
        "input of this run, or an earlier run's file (another body or key, or a damaged file)",
        reason="duplicate_instance",
    )


def run_tmp_dir(output_root: str, run_id: str) -> str:
    return FileSystems.join(output_root, TMP_DIR_NAME, run_id)


class RunFolderError(OSError):
    """A folder of the run itself (not one file's output) failed; ``where`` names it, e.g.
    ``OUTPUT 'out/'`` (the folder the user gave, never a file's name)."""

    def __init__(self, number: int | None, strerror: str | None, where: str) -> None:
        super().__init__(number, strerror)
        self.where = where


#: Open lock files of the runs this process claimed, by (OUTPUT, run id).
_CLAIMS: dict[tuple[str, str], int] = {}


def claim_local_tmp(output_root: str, run_id: str, sinks: Iterable[str | None] = ()) -> None:
    """Mark this run's temporary folder in a local OUTPUT as in use, and remove those of earlier
    runs into the same OUTPUT whose processes are gone.

    The mark is an ``flock`` on ``<run_id>.lock`` beside the folder, held until
    :func:`remove_local_tmp` or until the process and its forks end (``kill -9`` included, which
    leaves the folder behind: partial outputs). A lock that can be taken belongs to a run that
    is over: its folder goes, and so do the temporary folders its Parquet sinks left in the
    local audit and crosswalk folders (``sinks``, recorded in the lock file: a reader of the
    audit folder would count their rows). Folders without a lock file (a run on another machine
    sharing the folder, or an older release) are left alone.
    """
    import fcntl
    import shutil

    tmp_root = os.path.join(output_root, TMP_DIR_NAME)
    own = run_id + ".lock"
    fd = None
    try:
        os.makedirs(tmp_root, exist_ok=True)
        fd = os.open(os.path.join(tmp_root, own), os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        local_sinks = [os.path.abspath(root) for root in sinks if root is not None and is_local(root)]
        os.write(fd, "".join(f"sink {root}\n" for root in local_sinks).encode("utf-8", "surrogateescape"))
    except OSError as exc:  # e.g. ENOSPC, EACCES, EROFS: say which folder, not "the audit"
        if fd is not None:
            os.close(fd)
        raise RunFolderError(exc.errno, exc.strerror, f"OUTPUT {_display_name(output_root)!r}") from None
    _CLAIMS[(output_root, run_id)] = fd
    for name in os.listdir(tmp_root):
        if not name.endswith(".lock") or name == own:
            continue
        lock = os.path.join(tmp_root, name)
        lines = _abandoned(lock)
        if lines is None:
            continue  # a live run, or removed meanwhile by its run
        dead_run = name[: -len(".lock")]
        for line in lines:
            kind, _, root = line.partition(" ")
            if kind == "sink":
                remove_sink_temporaries(root, dead_run)
        shutil.rmtree(os.path.join(tmp_root, dead_run), ignore_errors=True)
        try:
            os.unlink(lock)
        except OSError:
            pass


def _abandoned(lock: str) -> list[str] | None:
    """The lines of ``lock`` when no process holds its ``flock`` (its run is over), else None."""
    import fcntl

    try:
        fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read(1 << 20).decode("utf-8", "surrogateescape").splitlines()
    except OSError:
        return None
    finally:
        os.close(fd)


def remove_sink_temporaries(root: str | None, run_id: str) -> None:
    """Remove the ``beam-temp-*<run_id>*`` folders Beam's Parquet sinks left in a local audit or
    crosswalk folder when the run did not finish (Ctrl-C, an error, ``kill -9``): Beam removes
    them only when it finalises the writes."""
    import shutil

    if root is None or not is_local(root) or not os.path.isdir(root):
        return
    for entry in os.scandir(root):
        if entry.name.startswith("beam-temp-") and run_id in entry.name and entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)


WORK_FOLDER_PREFIX = "dicom-deid-"
_WORK_LOCKS: dict[str, int] = {}


def make_local_work_folder(run_id: str) -> str:
    """A private folder in the system's temporary directory for a run's intermediate files
    (split/merge's study index and plan, which hold original identifiers).

    It is marked in use by an ``flock`` on its ``.lock``, held until
    :func:`remove_local_work_folder` or until the process ends (``kill -9`` included); the
    folders of earlier runs whose lock can be taken are removed first, so a killed run's
    identifiers do not stay in the temporary directory.
    """
    import fcntl
    import shutil
    import tempfile

    base = tempfile.gettempdir()
    try:
        names = [name for name in os.listdir(base) if name.startswith(WORK_FOLDER_PREFIX)]
    except OSError:
        names = []
    for name in names:
        folder = os.path.join(base, name)
        if _abandoned(os.path.join(folder, ".lock")) is not None:
            shutil.rmtree(folder, ignore_errors=True)
    # Locked before it gets its name, so that no sweep sees it unlocked.
    staging = tempfile.mkdtemp(prefix=f".{WORK_FOLDER_PREFIX}new-")
    fd = os.open(os.path.join(staging, ".lock"), os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    folder = os.path.join(base, f"{WORK_FOLDER_PREFIX}{run_id}-{os.path.basename(staging).rsplit('-', 1)[-1]}")
    os.rename(staging, folder)
    _WORK_LOCKS[folder] = fd
    return folder


def remove_local_work_folder(folder: str) -> None:
    """Remove :func:`make_local_work_folder`'s folder and release its lock."""
    import shutil

    shutil.rmtree(folder, ignore_errors=True)
    fd = _WORK_LOCKS.pop(folder, None)
    if fd is not None:
        os.close(fd)


def remove_local_tmp(output_root: str, run_id: str) -> None:
    """Remove a local OUTPUT's temporary folder of this run (leftovers of killed workers
    included) and its lock (:func:`claim_local_tmp`), and the parent ``TMP_DIR_NAME`` folder
    when no other run has one."""
    import shutil

    tmp_root = os.path.join(output_root, TMP_DIR_NAME)
    shutil.rmtree(os.path.join(tmp_root, run_id), ignore_errors=True)
    fd = _CLAIMS.pop((output_root, run_id), None)
    if fd is not None:
        try:
            os.unlink(os.path.join(tmp_root, run_id + ".lock"))
        except OSError:
            pass
        os.close(fd)
    try:
        os.rmdir(tmp_root)
    except OSError:
        pass  # other runs' leftovers, or never created


def _as_parts(data: Any) -> list[Any]:
    """``data`` as a list of buffers: bytes, or the parts of ``dicomio.write_parts``."""
    return data if isinstance(data, list) else [data]


def publish(data: Any, sha256: str, final: str, output_root: str, run_id: str) -> None:
    """Write ``data`` (bytes, or a list of buffers to concatenate) to ``final`` atomically;
    never overwrite different content.

    Returns normally when ``final`` holds exactly ``data`` (newly written or already there).

    Raises:
        DuplicateInstanceError: ``final`` holds different bytes.
        OSError / BeamIOError: the filesystem failed.
    """
    if is_local(final):
        _publish_local(data, sha256, final, output_root, run_id)
    else:
        _publish_remote(data, sha256, final, output_root, run_id)


def _make_parents(path: str) -> None:
    """``os.makedirs(os.path.dirname(path), exist_ok=True)`` for the usual case of one or two
    missing levels, without makedirs' Python-level existence checks on every level."""
    folder = os.path.dirname(path)
    try:
        os.mkdir(folder)
    except (FileNotFoundError, FileExistsError):
        # A missing parent, another worker's folder, or a file in the way: makedirs' own
        # answer (and error) for these rare cases.
        os.makedirs(folder, exist_ok=True)


def _write_all(fd: int, data: Any) -> None:
    from transforms.dicomio import write_all

    write_all(fd, _as_parts(data))


def _publish_local(data: Any, sha256: str, final: str, output_root: str, run_id: str) -> None:
    # No exists-check and no makedirs up front: os.link itself says "exists" or "no folder",
    # which saves three system calls per file on the common path.
    if _is_plain_path(output_root):
        tmp_dir = os.path.join(output_root, TMP_DIR_NAME, run_id)  # = run_tmp_dir, without the lookup
    else:
        tmp_dir = run_tmp_dir(output_root, run_id)
    tmp = os.path.join(tmp_dir, uuid.uuid4().hex + ".tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    try:
        try:
            fd = os.open(tmp, flags, 0o666)
        except FileNotFoundError:
            os.makedirs(tmp_dir, exist_ok=True)
            fd = os.open(tmp, flags, 0o666)
    except OSError:
        if _already_published(final, sha256):
            return
        raise
    try:
        try:
            try:
                _write_all(fd, data)
            finally:
                os.close(fd)
        except OSError:
            # A full disk (ENOSPC, EDQUOT) does not fail a file a previous run already wrote
            # there: a rerun over a full OUTPUT still ends with every such row `written`.
            if _already_published(final, sha256):
                return
            raise
        try:
            try:
                os.link(tmp, final)  # atomic create-if-absent
            except FileNotFoundError:
                _make_parents(final)
                os.link(tmp, final)
        except FileExistsError:
            if _sha256_of(final) != sha256:
                raise duplicate_instance_error() from None
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
                raise
            # A filesystem without hard links: rename is still atomic but may replace a file
            # that appeared since the exists-check below (documented race).
            if os.path.exists(final):
                if _sha256_of(final) != sha256:
                    raise duplicate_instance_error() from None
            else:
                os.replace(tmp, final)
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass


#: The longest file name (bytes) of the usual local filesystems (ext4, xfs, btrfs, tmpfs).
_NAME_MAX = 255


def _already_published(final: str, sha256: str) -> bool:
    """Whether ``final`` holds exactly the bytes of ``sha256`` (checked only after the
    temporary copy could not be written). Different bytes are a duplicate, as ever."""
    try:
        existing = _sha256_of(final)
    except OSError:
        return False
    if existing != sha256:
        raise duplicate_instance_error() from None
    return True


def replace_local(data: Any, target: str) -> None:
    """Write ``target`` atomically (temporary file in the same folder, then ``os.replace``)."""
    folder = os.path.dirname(os.path.abspath(target))
    os.makedirs(folder, exist_ok=True)
    name = os.path.basename(target)
    # ".<name>.<12 hex>.tmp" when that fits in a name (255 bytes), else without <name>.
    shown = f".{name}" if len(os.fsencode(name)) <= _NAME_MAX - 18 else ""
    tmp = os.path.join(folder, f"{shown}.{uuid.uuid4().hex[:12]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        try:
            _write_all(fd, data)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


_GCS_CLIENTS = threading.local()


def forget_clients() -> None:
    """Drop the storage clients this thread holds (in a forked child: the parent's, whose
    connections the parent keeps using; each process needs its own)."""
    global _GCS_CLIENTS
    _GCS_CLIENTS = threading.local()


def _gcs_client(final: str) -> Any:
    """The storage client Beam's GCS filesystem would use (its credentials and options), one
    per thread; None when this Beam has no such client to lend."""
    client = getattr(_GCS_CLIENTS, "client", None)
    if client is None:
        make = getattr(FileSystems.get_filesystem(final), "_gcsIO", None)
        if make is None:
            return None
        client = _GCS_CLIENTS.client = make().client
    return client


def probe_gcs_writable(folder: str, run_id: str) -> str | None:
    """Write and delete an empty object under the ``gs://`` ``folder``: None if both work,
    else the error's type name (a missing bucket, no permission, an unreachable endpoint). Run
    before a run writes anything, so that an audit that cannot be written is found before its
    outputs exist. The probe's name starts with a dot, which the audit's readers ignore."""
    client = _gcs_client(folder)
    if client is None:
        return None
    bucket, _, prefix = folder[len("gs://"):].partition("/")
    name = (prefix.rstrip("/") + "/" if prefix else "") + f".dicom-deid-probe-{run_id}"
    try:
        blob = client.bucket(bucket).blob(name)
        blob.upload_from_string(b"")
    except Exception as exc:  # noqa: BLE001 - named by type: messages may quote paths
        return type(exc).__name__
    try:
        blob.delete()
    except Exception as exc:  # noqa: BLE001 - named by type, as above
        # Create but not delete (a retention policy, no delete permission): Beam's file sinks
        # delete their temporary shards, so the audit would fail after every output is
        # written (found by a review). The empty probe stays.
        return f"{type(exc).__name__} when deleting what it wrote: a retention policy or no delete permission"
    return None


def _publish_gcs(data: bytes, sha256: str, final: str, client: Any) -> None:
    from apache_beam.io.gcp.gcsio import parse_gcs_path
    from google.api_core.exceptions import PreconditionFailed

    bucket, name = parse_gcs_path(final)
    try:
        client.bucket(bucket).blob(name).upload_from_string(
            data, content_type="application/dicom", if_generation_match=0, checksum="crc32c"
        )
    except PreconditionFailed:  # the name exists: a rerun, a retried bundle, or a duplicate
        if not _same_as_stored(client.bucket(bucket).get_blob(name), data, final, sha256):
            raise duplicate_instance_error() from None


def _same_as_stored(blob: Any, data: bytes, final: str, sha256: str) -> bool:
    """Whether the object at ``final`` holds ``data``: from its metadata (size, then the MD5
    the storage computed) where it has them, one small request instead of downloading the
    object again for every output of a rerun; else (a composite object has no MD5) from its
    SHA-256."""
    if blob is not None and blob.size is not None:
        if int(blob.size) != len(data):
            return False
        if blob.md5_hash:
            return blob.md5_hash == base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()
    return _sha256_of(final) == sha256


def _publish_remote(data: Any, sha256: str, final: str, output_root: str, run_id: str) -> None:
    data = b"".join(_as_parts(data))
    if final.startswith("gs://"):
        client = _gcs_client(final)
        if client is not None:
            _publish_gcs(data, sha256, final, client)
            return
    if FileSystems.exists(final):
        if _sha256_of(final) != sha256:
            raise duplicate_instance_error()
        return
    tmp = FileSystems.join(run_tmp_dir(output_root, run_id), uuid.uuid4().hex + ".tmp")
    with FileSystems.create(tmp, mime_type="application/dicom", compression_type=CompressionTypes.UNCOMPRESSED) as f:
        f.write(data)
    expected = _gcs_crc32c(data) if final.startswith("gs://") else None
    if expected is None:
        expected = FileSystems.checksum(tmp)
    FileSystems.rename([tmp], [final])
    if FileSystems.checksum(final) != expected and _sha256_of(final) != sha256:
        raise duplicate_instance_error()


def _gcs_crc32c(data: bytes) -> str | None:
    """GCS's object checksum (base64 of the big-endian CRC32C), computed locally: one request
    less per file than asking for the temporary object's checksum."""
    try:
        import base64

        import google_crc32c
    except ImportError:
        return None
    return base64.b64encode(google_crc32c.value(data).to_bytes(4, "big")).decode("ascii")


def short_detail(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _DETAIL_MAX else text[: _DETAIL_MAX - 3] + "..."


def _matching_resources(ids: Identifiers, selection: dict[str, tuple[int, ...]]) -> list[int]:
    """Positions of the ``Resources`` entries that name this instance (by DICOM UID of its
    study, series or instance, or by the Orthanc id of its patient, study, series or instance),
    ascending; ``ids`` the input's (:func:`identifiers_of`), ``selection`` as :func:`_selection`
    gives it."""
    names = {ids.study, ids.series, ids.sop, *ids.orthanc.values()} - {None, ""}
    return sorted(position for name in names for position in selection.get(name, ()))


def lost_file_matches(path: str, size: int, cfg: RunConfig) -> list[int]:
    """The ``Resources`` positions that name a file whose worker process died on it (its
    matches died with the worker), or that failed to read or parse before its identifiers were
    known: read again from the file's header, so that ``ResourcesNotFound`` does not list an
    entry whose file was there and failed. Empty when the request selects nothing or the
    header does not read."""
    selection = _selection(cfg.plan)
    if not selection:
        return []
    try:
        header = read_header(path, size, cfg.max_bytes)
        return [] if header is None else _matching_resources(identifiers_of(header), selection)
    except Exception:  # noqa: BLE001 - a file that ended its worker: no matches, never a new failure
        return []


#: Where pydicom's BytesLengthException names the element ("... while trying to parse (0028,0103)").
_PARSED_TAG = re.compile(r"(?<=parse )\([0-9A-F]{4},[0-9A-F]{4}\)")


def failure_reason(exc: Exception, stage: str, write_stages: tuple[str, ...] = ("write",)) -> tuple[str, str]:
    """(reason code, detail) of the audit row for a file whose processing raised ``exc``.

    Our own errors carry their reason and a value-free message; anything else is named by its
    type only (and errno code; pydicom's wrong-length value: its tag), because library messages
    may quote data from the file.
    """
    if isinstance(exc, DeidError):
        return exc.reason, f"{stage}: {exc}"
    if isinstance(exc, RecursionError):
        return "too_deep", f"{stage}: nesting too deep (RecursionError)"
    if isinstance(exc, MemoryError):
        return "too_large", f"{stage}: out of memory (MemoryError)"
    if type(exc).__module__ == "pydicom.errors" and type(exc).__name__ == "BytesLengthException":
        # pydicom's (named, not imported: this module does not load pydicom for the launcher),
        # converting a value of the file: every value we make has its VR's length, the file's
        # damaged ones (5 bytes of US) are converted wherever pydicom wants them, e.g. the
        # PixelRepresentation it passes to the items of any sequence set or edited in a data
        # set. Its message quotes the value: the tag only.
        where = _PARSED_TAG.search(str(exc))
        element = f"element {where.group(0)}" if where else "an element"
        return "invalid_value", f"{stage}: {element} holds a value whose length does not fit its VR"
    reason = "write_error" if stage in write_stages else ("read_error" if stage == "read" else "internal_error")
    if isinstance(exc, OSError) and isinstance(exc.errno, int):
        code = errno.errorcode.get(exc.errno, "")
        return reason, f"{stage}: {type(exc).__name__}{' ' + code if code else ''}"
    return reason, f"{stage}: {type(exc).__name__}"

def process_file(
    path: str,
    size: int,
    cfg: RunConfig,
    key: Any,
    *,
    target: str | None = None,
    matched: list[int] | None = None,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """De-identify one input file. Never raises for a bad file: returns its audit row.

    The output goes to ``<output_root>/<study>/<series>/<sop>.dcm`` (never overwriting other
    content), or, with ``target`` (single-file mode), exactly to that local path, replacing it
    atomically as a download would. With ``Resources`` in the plan, the positions of the
    entries naming this file are appended to ``matched`` (if given).

    This is :func:`prepare_file` (read, parse, apply, encode: CPU work under the GIL) followed
    by :func:`finish_file` (hash and publish: hashlib and file I/O release the GIL, so the DoFn
    runs it on a thread while the next file is prepared).

    Returns:
        ``(audit_row, crosswalk_row or None)``.
    """
    prepared = prepare_file(path, size, cfg, key, target=target, matched=matched)
    if isinstance(prepared, tuple):
        return prepared
    return finish_file(prepared)


@dataclasses.dataclass
class Prepared:
    """A file encoded and named, not yet hashed or written (see :func:`finish_file`)."""

    row: dict[str, Any]
    parts: list[Any]  # the output file: bytes and views of the input (dicomio.write_parts)
    final: str
    target: str | None
    output_root: str
    run_id: str
    crosswalk: dict[str, Any] | None  # crosswalk_row fields known before writing

    @property
    def size(self) -> int:
        return sum(map(len, self.parts))


def _failed(row: dict[str, Any], exc: Exception, stage: str) -> tuple[dict[str, Any], None]:
    reason, detail = failure_reason(exc, stage)
    status = SKIPPED if reason in SKIPPED_REASONS else FAILED  # a DICOMDIR
    row.update(status=status, reason=reason, detail=short_detail(detail), output_uri=None)
    if reason != "duplicate_instance":
        for k in NEW_IDENTITY_COLUMNS:
            row.pop(k, None)
    return audit_row(**row, finished_at=utc_now()), None


def read_header(path: str, size: int, max_bytes: int) -> Any:
    """The data set up to its pixel data, with the identifiers checked, or None when the file
    is not usable DICOM: the caller reads it whole to say why. For split/merge's index and the
    files a request leaves alone (``Resources``, split/merge's unselected): a header instead of
    the whole file. Read by the project's scanner as a whole file is
    (:func:`transforms.dicomio.read_header_bytes`), else by pydicom's reader with
    ``stop_before_pixels`` (:func:`transforms.dicomio.pydicom_header`).
    """
    from transforms import dicomio

    if size > max_bytes or size <= 0:  # empty, not a regular file, or a name not in UTF-8
        return None
    try:
        if get_scheme(path) not in (None, "file"):
            with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
                ds = _remote_header(f, size, max_bytes)
        else:
            with open(path[len("file://"):] if path.startswith("file://") else path, "rb") as f:
                head = f.read(min(size, _LOCAL_HEAD_BYTES))
                ds = _scanned_header(f, head, size)
                if ds is None and dicomio.names_deflated(head):
                    # Read whole: pydicom's reader would inflate it without a bound.
                    ds = dicomio.read_dataset(read_bounded(path, max_bytes), check_uids=False,
                                              max_inflated=max_bytes)
                elif ds is None:
                    marker = head[_DICM_OFFSET:_DICM_OFFSET + 4] == b"DICM"
                    if not marker and not dicomio.looks_like_bare_dataset(head):
                        return None
                    f.seek(0)
                    ds = _pydicom_header(f, f.read(min(size, _LOCAL_HEAD_BYTES)), size, marker)
        if ds is None:
            return None
        dicomio.check_identifiers(ds)
    except Exception:  # noqa: BLE001 - any failure (RecursionError included): the whole read says why
        return None
    return ds


#: What the first read of a local file asks for: most headers fit (a CT's is 2 to 10 kB); a
#: longer one (an enhanced multi-frame's functional groups) is read on in growing steps.
_LOCAL_HEAD_BYTES = 16 << 10

#: The longest header the project's scanner reads (beyond: pydicom's reader, as for a layout
#: the scanner leaves to pydicom).
_SCANNED_HEADER_MAX = 64 << 20


def _scanned_header(f: Any, head: bytes, size: int) -> Any:
    """The header (:func:`transforms.dicomio.read_header_bytes`) of the file open as ``f``
    whose first bytes are ``head``, reading on while the pixel data is not reached; None to
    leave the file to pydicom's reader (``f`` is then anywhere: seek back)."""
    from transforms import dicomio

    limit = min(size, _SCANNED_HEADER_MAX)
    while True:
        ds = dicomio.read_header_bytes(head, complete=len(head) >= size)
        if not isinstance(ds, int):
            return ds
        if len(head) >= limit:
            return None
        more = f.read(min(3 * len(head), limit - len(head)))
        if not more:
            return None  # shorter than listed: pydicom's reader says what is there
        head += more


def _pydicom_header(f: Any, head: bytes, size: int, marker: bool) -> Any:
    """The header of the file open as ``f``, whose first bytes ``head`` were read, by pydicom's
    reader with its bounds (:func:`transforms.dicomio.pydicom_header`): reading on, four times
    as much each time (as :func:`_scanned_header` grows, never seeking back), while the reader
    did not stop at pixel data inside what was read, up to the whole file."""
    from transforms import dicomio

    while True:
        complete = len(head) >= size
        try:
            ds, at_pixels = dicomio.pydicom_header(head, force=not marker)
            if complete or at_pixels:
                return ds
        except Exception:  # noqa: BLE001 - cut inside the header: read on (the whole file says why)
            if complete:
                raise
        more = f.read(min(3 * len(head), size - len(head)))
        if not more:  # shorter than listed: what is there
            return dicomio.pydicom_header(head, force=not marker)[0]
        head += more


#: What the first read of a remote file asks for: the storage client fetches this much anyway
#: (Beam's GCS reader buffers 16 MiB), and a seek back to the start would fetch it again.
_REMOTE_HEAD_BYTES = 16 << 20


def _remote_header(f: Any, size: int, max_bytes: int) -> Any:
    """:func:`read_header` on a remote handle: parsed (by the project's scanner, else pydicom's
    reader) from one read of the first ``_REMOTE_HEAD_BYTES`` (the whole object, usually),
    never seeking back; a header longer than that (a file of hundreds of thousands of
    per-frame items) reads on (:func:`_pydicom_header`)."""
    from transforms import dicomio

    head = f.read(min(size, _REMOTE_HEAD_BYTES))
    scanned = dicomio.read_header_bytes(head, complete=len(head) >= size)
    if scanned is not None and not isinstance(scanned, int):
        return scanned
    if dicomio.names_deflated(head):  # (pydicom's reader would inflate it without a bound)
        return dicomio.read_dataset(head + f.read() if len(head) < size else head, check_uids=False,
                                    max_inflated=max_bytes)
    marker = head[_DICM_OFFSET:_DICM_OFFSET + 4] == b"DICM"
    if not marker and not dicomio.looks_like_bare_dataset(head):
        return None
    return _pydicom_header(f, head, size, marker)


def read_input(path: str, size: int, max_bytes: int, row: dict[str, Any]) -> bytes:
    """The bytes of one input file (``bytes_in`` of its audit row set); a file over
    ``--max-bytes`` is refused unread.

    Raises:
        InputError: ``too_large``; OSError / BeamIOError: the file cannot be read.
    """
    if size == UNREADABLE_NAME:
        row["bytes_in"] = None
        raise InputError("the file name is not valid UTF-8 (shown with \\x escapes): rename the file",
                         reason="read_error")
    if size == UNLISTABLE_FOLDER:
        row["bytes_in"] = None
        raise InputError("this folder cannot be listed (no permission or an I/O error): the files in it "
                         "were not processed", reason="read_error")
    if size > max_bytes:
        raise InputError(f"file is larger than --max-bytes ({max_bytes} bytes)", reason="too_large")
    data = read_bounded(path, max_bytes)
    row["bytes_in"] = len(data)
    return data


def describe_input(ds: Any, row: dict[str, Any]) -> None:
    """The audit columns that describe the input: SOP class, modality, transfer syntax in
    (validated shapes only: no free text from the file)."""
    row["sop_class_uid"] = _safe_uid(ds, "SOPClassUID")
    row["modality"] = _safe_modality(ds)
    row["transfer_syntax_in"] = safe_transfer_syntax(ds)


def _base_row(path: str, size: int, cfg: RunConfig) -> dict[str, Any]:
    plan = cfg.plan
    return {
        "source_uri": path,
        "operation": getattr(plan, "operation", None) or ("anonymize" if plan.is_anonymization else "modify"),
        "profile": getattr(plan, "profile_version", None) if plan.is_anonymization else None,
        "level": getattr(plan, "level", None),
        "request": _plan_description(plan),
        "key_id": cfg.key_id,
        "run_id": cfg.run_id,
        "bytes_in": int(size),
        "started_at": utc_now(),
    }


def failed_row(path: str, size: int, cfg: RunConfig, exc: Exception, stage: str) -> dict[str, Any]:
    """The audit row of a file whose processing ended with ``exc`` outside :func:`process_file`
    (e.g. the worker process running it died: :class:`transforms.workers.WorkerLost`)."""
    row = _base_row(path, size, cfg)
    if size < 0:  # UNREADABLE_NAME, UNLISTABLE_FOLDER: not a size
        row["bytes_in"] = None
    return _failed(row, exc, stage)[0]


def prepare_file(
    path: str,
    size: int,
    cfg: RunConfig,
    key: Any,
    *,
    target: str | None = None,
    matched: list[int] | None = None,
) -> Prepared | tuple[dict[str, Any], dict[str, Any] | None]:
    """The first half of :func:`process_file`: a :class:`Prepared` file, or the final
    ``(audit_row, None)`` of a file that failed or was not selected. Never raises for a bad
    file."""
    from transforms import dicomio, engine

    plan = cfg.plan
    row = _base_row(path, size, cfg)
    stage = "read"
    ds = new = None
    try:
        selection = _selection(plan)
        if selection and get_scheme(path) in (None, "file"):
            # A local file a bulk selection may leave alone: its header decides (selecting 1%
            # of an archive read all of it); one whose header does not read is read whole,
            # which says why it fails. (On gs:// the header's read fetches the object anyway.)
            header = read_header(path, size, cfg.max_bytes)
            if header is not None and not _matching_resources(identifiers_of(header), selection):
                describe_input(header, row)
                row.update(status=SKIPPED, reason="not_selected", detail="not selected by Resources")
                return audit_row(**row, finished_at=utc_now()), None
        data = read_input(path, size, cfg.max_bytes, row)
        stage = "parse"
        ds = dicomio.read_dataset(data, max_inflated=cfg.max_bytes)
        inflated = dicomio.inflated_size(ds)
        hold = getattr(_HOLD, "current", None)
        if inflated and hold is not None:  # (a budgeted DoFn: a deflated input's inflation counts)
            hold.grow_to(hold.base + inflated)
        describe_input(ds, row)
        original = None  # the input's identifiers, for Resources and the crosswalk
        if selection:
            stage = "select"
            original = identifiers_of(ds)
            hits = _matching_resources(original, selection)
            if matched is not None:
                matched.extend(hits)
            if not hits:
                row.update(status=SKIPPED, reason="not_selected", detail="not selected by Resources")
                return audit_row(**row, finished_at=utc_now()), None
        stage = "apply"
        new = engine.apply(plan, ds, key)
        if getattr(plan, "transcode", None):
            stage = "transcode"
            from transforms.transcode import decoded_size, transcode_for_plan

            hold = getattr(_HOLD, "current", None)
            if hold is not None:  # (a budgeted DoFn: the decoded pixels count while they exist)
                hold.grow_to(hold.base + BudgetHold.TRANSCODE_FACTOR * (decoded_size(new) or 0))
            try:
                new = transcode_for_plan(plan, new, key).dataset  # lossy: new SOPInstanceUID
            finally:
                if hold is not None:
                    hold.shrink_to(hold.base)
        stage = "name"
        ids = identifiers_of(new)
        row.update(identity_columns(ids))  # _failed drops them again if output_name refuses a UID
        # The UIDs name the output folder tree; one-file mode writes where it was told, so a
        # UID the request itself set (Replace + Force: "abc", "", 1.2\\1.3) is Orthanc's business.
        name = output_name(ids.study, ids.series, ids.sop) if target is None else None
        stage = "encode"
        parts = dicomio.write_parts(new)
        if target is not None:
            final = target
        elif _is_plain_path(cfg.output_root):
            final = os.path.join(cfg.output_root, *name.split("/"))  # = LocalFileSystem.join
        else:
            final = FileSystems.join(cfg.output_root, *name.split("/"))  # type: ignore[union-attr]
        crosswalk = None
        if cfg.crosswalk:
            crosswalk = crosswalk_fields(path, cfg.run_id, cfg.key_id, original or identifiers_of(ds), ids)
        return Prepared(row, parts, final, target, cfg.output_root, cfg.run_id, crosswalk)
    except BaseException as exc:  # noqa: BLE001 - dead letter: every failure becomes an audit row
        if not is_work_failure(exc):  # Exceptions and codec panics; not KeyboardInterrupt
            raise
        failure = exc, stage
        if matched is not None and stage in ("read", "parse"):
            # Failed before its identifiers were read (pixel data cut short behind a header that
            # matched): the header still says which entries named it, as for a lost worker.
            matched.extend(lost_file_matches(path, size, cfg))
    finally:
        ds = new = None  # drop large data sets before building the row
    return _failed(row, *failure)


def finish_file(prepared: Prepared) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The second half of :func:`process_file`: hash the output, publish it, complete the
    rows. Never raises for a file that cannot be written (its row says ``failed``)."""
    row = prepared.row
    stage = "encode"
    try:
        parts = prepared.parts
        digest = hashlib.sha256()
        for part in parts:
            digest.update(part)
        sha = digest.hexdigest()
        stage = "write"
        if prepared.target is None:
            publish(parts, sha, prepared.final, prepared.output_root, prepared.run_id)
        else:
            replace_local(parts, prepared.target)
        row.update(
            status=WRITTEN,
            output_uri=prepared.final,
            transfer_syntax_out=meta_transfer_syntax(parts[0]),
            bytes_out=prepared.size,
            output_sha256=sha,
        )
        crosswalk = None
        if prepared.crosswalk is not None:
            crosswalk = crosswalk_row(**prepared.crosswalk, output_uri=prepared.final)
        return audit_row(**row, finished_at=utc_now()), crosswalk
    except BaseException as exc:  # noqa: BLE001 - dead letter: every failure becomes an audit row
        if not is_work_failure(exc):  # Exceptions and codec panics; not KeyboardInterrupt
            raise
        failure = exc, stage
    finally:
        prepared.parts = []  # release the output (and the input it views) before the row
    return _failed(row, *failure)


def _plan_description(plan: Any) -> str | None:
    describe = getattr(plan, "describe", None)
    if describe is None:
        return None
    try:
        return short_detail(str(describe()))
    except Exception:  # noqa: BLE001
        return None


# --------------------------------------------------------------------------- progress


class ProgressFile:
    """Counters a worker drops into a local folder; the CLI sums them for its progress line."""

    def __init__(self, folder: str) -> None:
        self._path = os.path.join(folder, f"{os.getpid()}-{uuid.uuid4().hex[:8]}.json")
        self.counts = {WRITTEN: 0, FAILED: 0, SKIPPED: 0}
        self._last = 0.0

    def add(self, status: str) -> None:
        self.counts[status] = self.counts.get(status, 0) + 1
        now = time.monotonic()
        if now - self._last >= 0.5:
            self.flush(now)

    def flush(self, now: float | None = None) -> None:
        self._last = time.monotonic() if now is None else now
        tmp = self._path + ".tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(self.counts, f)
            os.replace(tmp, self._path)
        except OSError:
            pass  # progress is cosmetic; never fail a file for it


def read_progress(folder: str) -> dict[str, int]:
    """Sum the counters every worker left in ``folder``: written, failed and skipped always,
    any other status (split/merge's moved and copied) as found."""
    total = {WRITTEN: 0, FAILED: 0, SKIPPED: 0}
    try:
        names = os.listdir(folder)
    except OSError:
        return total
    for name in names:
        if not name.endswith(".json"):
            continue
        try:
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                counts = json.load(f)
        except (OSError, ValueError):
            continue
        for k, v in counts.items():
            if isinstance(k, str) and isinstance(v, int):
                total[k] = total.get(k, 0) + v
    return total


# --------------------------------------------------------------------------- memory


class MemoryBudget:
    """Bytes of input files held in memory by the DoFns of one process that read and rewrite
    files (``DeidentifyFn``, split/merge's ``_ApplyFn``).

    A runner may run many DoFn instances in one process (Dataflow: 12 threads per SDK process
    by default), each holding the file it prepares plus the ones waiting for its writer; with
    multi-gigabyte inputs that multiplies into an out-of-memory kill of the worker. Each file
    holds its size from before it is read until its output is on storage (or it failed). A
    file larger than the whole budget waits until nothing else is held, then runs alone.
    Requests are served in arrival order, so a large file is not starved by a stream of small
    ones that would each fit. Transcoding decodes pixels beyond the input's size: while it runs,
    the file's :class:`BudgetHold` grows to count them.
    """

    def __init__(self, limit: int) -> None:
        if limit <= 0:
            raise ValueError("MemoryBudget: limit must be positive")
        self.limit = limit
        self.used = 0
        self.peak = 0
        self._cond = threading.Condition()
        self._next_ticket = 0  # arrival order of acquire() calls
        self._serving = 0  # the ticket whose turn it is

    def acquire(self, n: int) -> None:
        with self._cond:
            ticket = self._next_ticket
            self._next_ticket += 1
            while ticket != self._serving or (self.used and self.used + n > self.limit):
                self._cond.wait()
            self._serving += 1
            self.used += n
            self.peak = max(self.peak, self.used)
            self._cond.notify_all()  # the next ticket may fit too

    def release(self, n: int) -> None:
        with self._cond:
            self.used -= n
            self._cond.notify_all()


class BudgetHold:
    """One file's share of a :class:`MemoryBudget`: its input bytes from before the read until
    its output is on storage, grown for the time a Transcode decodes its pixels (the decoded
    image, the encoded result and the verifying decode: measured ~4x the input for RLE)."""

    #: Bytes held per decoded byte while a transcode runs, beside the input's.
    TRANSCODE_FACTOR = 3

    def __init__(self, budget: MemoryBudget, n: int) -> None:
        self.budget, self.n, self.base = budget, 0, n
        if n:
            budget.acquire(n)
            self.n = n

    def grow_to(self, total: int) -> None:
        """Hold ``total`` bytes. Released first, then asked for whole in arrival order: a
        thread waiting for more never holds a part, so growing never deadlocks."""
        if total <= self.n:
            return
        self.budget.release(self.n)
        self.n = 0
        self.budget.acquire(total)
        self.n = total

    def shrink_to(self, total: int) -> None:
        if total < self.n:
            self.budget.release(self.n - total)
            self.n = total

    def release(self) -> None:
        """Release everything held (the writer's callback; again is harmless)."""
        held, self.n = self.n, 0
        if held:
            self.budget.release(held)


_HOLD = threading.local()  # the BudgetHold of the file this thread prepares, if budgeted


@contextlib.contextmanager
def budget_hold(budget: MemoryBudget, n: int) -> Iterator[BudgetHold]:
    """A :class:`BudgetHold` of ``n`` bytes, which :func:`prepare_file` grows while a Transcode
    decodes; the caller releases it (here only when the block raises)."""
    hold = BudgetHold(budget, n)
    previous = getattr(_HOLD, "current", None)
    _HOLD.current = hold
    try:
        yield hold
    except BaseException:
        hold.release()
        raise
    finally:
        _HOLD.current = previous


_BUDGETS: dict[int | None, MemoryBudget] = {}
_BUDGETS_LOCK = threading.Lock()


def process_budget(limit: int | None = None) -> MemoryBudget:
    """The process's budget for ``limit`` bytes (None: :func:`default_memory_budget`); every
    DoFn of a run in this process shares it."""
    with _BUDGETS_LOCK:
        budget = _BUDGETS.get(limit)
        if budget is None:
            budget = _BUDGETS[limit] = MemoryBudget(limit if limit is not None else default_memory_budget())
        return budget


def default_memory_budget() -> int:
    """Half the memory this process may use (the machine's, or its cgroup's limit if lower),
    shared with one worker process per usable CPU (DirectRunner multi_processing, Dataflow's one
    SDK process per vCPU; a container's CPU quota counts, not the host's cores); at least
    256 MiB."""
    from transforms.workers import usable_cpus

    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 4 << 30
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path, encoding="ascii") as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return max(256 << 20, total // 2 // usable_cpus())
