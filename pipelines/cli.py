"""The ``dicom-deid`` command.

Usage::

    dicom-deid anonymize INPUT OUTPUT [--body JSON | --config FILE] [--key-file KEY]
                         [--audit AUDIT] [--crosswalk PATH] [--max-bytes N] [Beam options]
    dicom-deid modify    INPUT OUTPUT [--body JSON | --config FILE] [--level L] [same options]

INPUT is a file, a folder (recursive), a glob, or a ``gs://`` prefix or glob; OUTPUT a folder
or ``gs://`` prefix. When INPUT is one local file and OUTPUT ends in ``.dcm``, the file is
processed directly without Beam (like downloading ``/instances/{id}/modify``). Arguments that
are not ours go to Beam's ``PipelineOptions`` (``--runner``, ``--direct_num_workers``,
``--direct_running_mode``, Dataflow's options, ...); the runner defaults to the DirectRunner.

Exit status: 0 every input written (or skipped because ``Resources`` did not select it);
3 some inputs failed (see the audit and the summary's ``Reasons``); 2 refused request or
command line (one line on stderr, nothing processed); 1 internal error; 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
import warnings
from itertools import islice
from typing import Any, Iterator, NoReturn, Sequence

from pipelines import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE  # noqa: F401 - EXIT_* are this module's API too
from transforms.errors import SKIPPED_REASONS, DeidError, RequestError, json_type

PROG = "dicom-deid"
_SHOWN_POSITIONS = 20  # Resources positions named on the terminal
DEFAULT_MAX_BYTES = 2 << 30
_TTY_RESOURCES = 40
_SIZE_RE = re.compile(r"^\s*([0-9]+)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


_Raw = argparse.RawDescriptionHelpFormatter
_EPILOG = """\
Any other option goes to Beam: --runner (default DirectRunner), --direct_running_mode
in_memory|multi_threading|multi_processing, --direct_num_workers N (0 = all cores), and
Dataflow's --project --region --temp_location --setup_file ... When INPUT is one file and
OUTPUT ends in .dcm, the file is processed directly, without Beam.

Exit status: 0 every input written or skipped by Resources; 3 some inputs failed (summary
Reasons, audit rows); 2 refused request or command line; 1 internal error; 130 interrupted.
"""


class UsageError(RequestError):
    """A refused command line (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (no usage dump), status 2."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _size(text: str) -> int:
    m = _SIZE_RE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"expected a size such as 2GiB, 500MB or 1048576, not {text!r}")
    value = int(m.group(1)) * _SIZE_UNITS[(m.group(2) or "")[:1].lower()]
    if value <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("must be a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


#: ``--processes`` above this many per CPU (or above the floor) is refused: each process holds
#: the core and a file in hand, and thousands of them only fork for minutes (found by a review).
PROCESSES_PER_CPU, PROCESSES_FLOOR = 8, 64


def max_processes() -> int:
    return max(PROCESSES_FLOOR, PROCESSES_PER_CPU * (os.cpu_count() or 1))


def _processes(text: str) -> int:
    value = _count(text)
    limit = max_processes()
    if value > limit:
        raise argparse.ArgumentTypeError(
            f"at most {limit} on this machine ({PROCESSES_PER_CPU} per CPU, or {PROCESSES_FLOOR})")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("must be a number of seconds") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError("must be more than 0 seconds")
    return value


def _add_common(p: argparse.ArgumentParser, *, one_file: bool = True) -> None:
    p.add_argument("input", metavar="INPUT", help="file, folder (recursive), glob, or gs:// prefix or glob")
    p.add_argument("output", metavar="OUTPUT", help="output folder or gs:// prefix"
                   + (" (or a .dcm file for one INPUT file)" if one_file else ""))
    src = p.add_mutually_exclusive_group()
    src.add_argument("--body", metavar="JSON", help="the Orthanc request body, as JSON text")
    src.add_argument(
        "--config", metavar="FILE", help="a JSON file holding the Orthanc body (plus optionally `Dictionary`)"
    )
    p.add_argument(
        "--key-file",
        metavar="KEY",
        help="secret key file (local or gs://); default: $DICOM_DEID_KEY, else a random key (not reproducible)",
    )
    p.add_argument("--audit", metavar="AUDIT", help="audit folder or gs:// prefix (default: OUTPUT + '-audit')")
    p.add_argument(
        "--crosswalk",
        metavar="PATH",
        help="also write original -> new identifiers as Parquet here (keep it away from the audit and output)",
    )
    p.add_argument(
        "--max-bytes",
        type=_size,
        default=DEFAULT_MAX_BYTES,
        metavar="N",
        help="larger inputs fail with too_large without being read (default 2GiB)",
    )
    prog = p.add_mutually_exclusive_group()
    prog.add_argument("--progress", dest="progress", action="store_true", default=None, help="show progress on stderr")
    prog.add_argument("--no-progress", dest="progress", action="store_false", help="no progress line")
    p.add_argument("--quiet", action="store_true", help="do not print the summary on stdout")
    p.add_argument("--verbose", action="store_true", help="show Beam's log messages")


def version_text() -> str:
    """``dicom-deid 0.1.0 (pydicom 3.0.2, apache-beam 2.77.0, pyarrow 25.0.0)``: what a bug report
    needs, read from the installed distributions (importing Beam to ask it would take a second)."""
    from importlib import metadata

    from transforms import __version__

    def installed(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    libraries = ", ".join(f"{name} {installed(name)}" for name in ("pydicom", "apache-beam", "pyarrow"))
    return f"{PROG} {__version__} ({libraries})"


class _VersionAction(argparse.Action):
    """argparse's ``version`` action, with the text looked up only when asked for (~25 ms)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> NoReturn:
        print(version_text())  # stdout, as argparse's own version action
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Orthanc-compatible DICOM modification and de-identification, on Apache Beam.",
        epilog="Unrecognised options are Beam pipeline options (e.g. --runner DataflowRunner --project P ...).",
    )
    parser.add_argument("--version", action=_VersionAction, help="show the release and its libraries' versions, and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    anonymize = sub.add_parser(
        "anonymize", help="de-identify like /tools/bulk-anonymize", epilog=_EPILOG, formatter_class=_Raw
    )
    _add_common(anonymize)
    modify = sub.add_parser("modify", help="modify like /tools/bulk-modify", epilog=_EPILOG, formatter_class=_Raw)
    _add_common(modify)
    modify.add_argument("--level", metavar="L", help="Patient, Study, Series or Instance (default: detected)")
    for p in (anonymize, modify):
        p.add_argument(
            "--processes",
            type=_processes,
            metavar="N",
            help="local runs (DirectRunner in_memory or multi_threading): processes that de-identify the files, "
            "started before the pipeline (default: one per usable CPU, container quota included; none with "
            "one CPU; 0: in Beam's own process)",
        )
        p.add_argument(
            "--file-timeout",
            type=_seconds,
            metavar="S",
            default=None,
            help="with worker processes: seconds one file may take before its worker is stopped and the file "
            "fails with reason timeout (default: 900)",
        )
    for command, (summary, study_help, body_help) in _SPLIT_MERGE_HELP.items():
        p = sub.add_parser(command, help=summary, description=f"{summary}. {body_help}")
        _add_common(p, one_file=False)  # split and merge read a whole study: no one-file mode
        p.add_argument("--study", required=True, metavar="STUDY" if command == "split" else "TARGET", help=study_help)
        p.add_argument(
            "--copy-unselected",
            action="store_true",
            help="also copy every input the request does not move, unchanged, so OUTPUT is the whole new archive",
        )
        p.set_defaults(func=_run_split_merge)
    return parser


_SPLIT_MERGE_HELP = {
    "split": (
        "move series or instances of a study to a new study, like /studies/{id}/split",
        "the study to split: StudyInstanceUID or Orthanc study id",
        'JSON body: {"Series": [...], "Instances": [...], "Replace": {...}, "Remove": [...], "KeepSource": false}',
    ),
    "merge": (
        "move studies, series or instances into a target study, like /studies/{id}/merge",
        "the target study: StudyInstanceUID or Orthanc study id",
        'JSON body: {"Resources": [...], "KeepSource": false}',
    ),
}


def _run_split_merge(args: argparse.Namespace, beam_args: list[str]) -> int:
    from pipelines import splitmerge  # Beam: loaded only when a split or merge runs

    return splitmerge.run_command(args, beam_args)


# --------------------------------------------------------------------------- request


_MAX_SEQUENCE_DEPTH = 64  # as transforms.dicomio reads files
_MAX_BODY_NESTING = 2 * _MAX_SEQUENCE_DEPTH + 2  # a sequence level is a JSON array of objects


def _nesting(value: Any) -> int:
    """How deeply JSON arrays and objects nest in ``value`` (iterative: no recursion limit)."""
    deepest, pending = 0, [(value, 0)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, (dict, list)):
            depth += 1
            deepest = max(deepest, depth)
            if depth > _MAX_BODY_NESTING:
                return depth
            pending.extend((v, depth) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


_LENIENT_JSON_MAX_CHARS = 256 << 10  # json5 is pure Python (~20 us a character): bounded
_JSON5_POSITION = re.compile(r"^<string>:(\d+) (Unexpected end of input|Unexpected) .*at column (\d+)$")


def parse_json(text: str, where: str) -> Any:
    """A body as Orthanc's JsonCpp reads it: a leading BOM, ``//`` and ``/* */`` comments and
    trailing commas are accepted (JSON5 syntax, read with ``json5``); ``NaN``/``Infinity`` are
    refused as Orthanc does, and so is a key given twice in one object, which JsonCpp would let
    the last one win silently (a second ``Replace`` dropping the first is how PHI leaks).

    Errors name a line and column, never the text there (a body may hold the PHI it replaces).
    """
    duplicates: list[str] = []
    constants: list[str] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for key, value in items:
            if key in result and not duplicates:
                duplicates.append(key)
            result[key] = value
        return result

    def constant(name: str) -> float:
        constants.append(name)
        return 0.0

    text = text.removeprefix("\ufeff")
    try:
        try:
            parsed = json.loads(text, object_pairs_hook=pairs, parse_constant=constant)
        except json.JSONDecodeError as strict:
            if len(text) > _LENIENT_JSON_MAX_CHARS:
                raise UsageError(f"{where}: invalid JSON at line {strict.lineno} column {strict.colno}: {strict.msg} "
                                 f"(comments and trailing commas are read in bodies up to {_LENIENT_JSON_MAX_CHARS >> 10} KiB)") from None
            import json5  # comments, trailing commas: the rare body that strict JSON refuses

            try:
                parsed = json5.loads(text, object_pairs_hook=pairs, parse_constant=constant)
            except ValueError as lenient:
                raise UsageError(f"{where}: invalid JSON at {_error_position(strict, lenient)}") from None
        except ValueError:  # not a JSONDecodeError (above): Python's limit on integer digits
            raise UsageError(f"{where}: invalid JSON: a number with more digits than can be read "
                             f"(at most {sys.get_int_max_str_digits():,})") from None
    except RecursionError:
        raise UsageError(f"{where}: JSON nested too deeply") from None
    if constants:
        raise UsageError(f"{where}: invalid JSON: {constants[0]} is not a JSON number")
    if duplicates:
        raise RequestError(f"{where}: key {duplicates[0]!r} is given twice in one object (Orthanc would keep the last one silently); give it once")
    return parsed


def _error_position(strict: json.JSONDecodeError, lenient: ValueError) -> str:
    """Where the body is broken: json's message when json5 stops at the same place (it is the
    more precise), json5's place otherwise (json stopped at a comment or a trailing comma)."""
    found = _JSON5_POSITION.match(str(lenient))
    if found is None or (int(found[1]), int(found[3])) == (strict.lineno, strict.colno):
        return f"line {strict.lineno} column {strict.colno}: {strict.msg}"
    what = "unexpected end of input" if found[2].endswith("input") else "unexpected character"
    return f"line {found[1]} column {found[3]}: {what}"


#: Characters a --config file may hold (a body with large data: URIs stays far below).
_CONFIG_MAX_CHARS = 64 << 20


def load_request(body: str | None, config: str | None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The request body and its optional ``Dictionary`` (private tags), from --body or --config."""
    if config is not None:
        try:
            with open(config, encoding="utf-8") as f:
                text = f.read(_CONFIG_MAX_CHARS + 1)  # /dev/zero, a mistyped log file: bounded
        except OSError as exc:
            raise UsageError(f"--config {config!r}: cannot read ({exc.strerror or type(exc).__name__})") from None
        except UnicodeDecodeError:
            raise UsageError(f"--config {config!r}: not UTF-8 text") from None
        if len(text) > _CONFIG_MAX_CHARS:
            raise UsageError(f"--config {config!r}: larger than {_CONFIG_MAX_CHARS >> 20} MiB: not a request body")
        where = f"--config {config!r}"
    elif body is not None:
        text, where = body, "--body"
    else:
        return {}, None
    parsed = parse_json(text, where)
    if not isinstance(parsed, dict):
        raise RequestError(f"{where}: the request body must be a JSON object, not {json_type(parsed)}")
    for name, value in parsed.items():
        if _nesting(value) > _MAX_BODY_NESTING:
            raise RequestError(f"{name}: values nested more than {_MAX_SEQUENCE_DEPTH} sequence levels deep "
                               "(the most a DICOM file read here may hold)")
    request = dict(parsed)
    dictionary = request.pop("Dictionary", None)
    if dictionary is not None and not isinstance(dictionary, dict):
        raise RequestError(f"{where}: Dictionary must be a JSON object like {{\"4321,1012\": [\"LO\", \"Name\", 1, 1, \"Creator\"]}}")
    return request, dictionary


def parse_plan(command: str, request: dict[str, Any], dictionary: dict[str, Any] | None, level: str | None) -> Any:
    from transforms import request as req

    if command == "anonymize":
        return req.parse_anonymize(request, dictionary=dictionary)
    return req.parse_modify(request, dictionary=dictionary, level=level)


# --------------------------------------------------------------------------- locations


def _scheme(uri: str) -> str | None:
    """The URI scheme, case kept: Beam's filesystems match it exactly (``GS://`` is none)."""
    m = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://", uri)
    return m.group(1) if m else None


#: Where INPUT, OUTPUT, --audit and --crosswalk may be: local paths (or file://) and gs://.
_SCHEMES = (None, "file", "gs")


def normalize(uri: str) -> str:
    """Absolute local paths; remote URIs without trailing slash."""
    if _scheme(uri) in (None, "file"):
        if uri.startswith("file://"):
            uri = uri[len("file://") :]
        return os.path.abspath(os.path.expanduser(uri))
    return uri.rstrip("/")


def normalize_input(uri: str) -> str:
    """As :func:`normalize`, but a remote INPUT written with a trailing slash keeps it: it
    names a prefix even where an object of the same name exists (``gs://b/x/`` is what lies
    under ``x/``, not the object ``x``)."""
    normal = normalize(uri)
    if _scheme(normal) not in (None, "file") and uri.endswith("/") and "/" in normal.split("://", 1)[1]:
        normal += "/"
    return normal


def _glob_base(uri: str) -> str:
    """The part of a glob before its first wildcard, cut back to a folder."""
    cut = min((i for i, c in enumerate(uri) if c in "*?["), default=None)
    if cut is None:
        return uri
    head = uri[:cut]
    return head.rsplit("/", 1)[0] if "/" in head else head


def _inside(child: str, parent: str) -> bool:
    child, parent = child.rstrip("/"), parent.rstrip("/")
    return child == parent or child.startswith(parent + "/")


def refuse_empty_input(input_uri: str, shown: str, *, remote: bool = False) -> None:
    """Refuse an INPUT that matches no file before anything is started or written (the audit
    folder would otherwise get an empty shard and a summary replacing the last one's). Local
    INPUTs always; remote ones with ``remote`` (runs on this machine, which lists them anyway;
    a Dataflow launcher may have no access to the bucket), where a bucket or prefix that cannot
    be listed (missing, forbidden, unreachable) is one line, not a traceback from the run."""
    if _scheme(input_uri) is not None and not remote:
        return
    from transforms.files import expand_input  # (no Beam import for local paths)

    try:
        first = next(iter(expand_input(input_uri)), None)
    except Exception as exc:  # noqa: BLE001 - a storage error: named by type (messages may quote paths)
        if _scheme(input_uri) is None:
            raise
        raise UsageError(f"INPUT {shown!r} cannot be listed ({type(exc).__name__})") from None
    if first is None:
        raise UsageError(f"INPUT {shown!r} matched no files")


def probe_remote_locations(run_id: str, **locations: str | None) -> None:
    """Refuse (exit 2) a ``gs://`` OUTPUT, audit or crosswalk folder this machine cannot write
    in, before anything is written (runs on this machine only: a Dataflow launcher may lack the
    workers' access)."""
    from transforms.files import probe_gcs_writable

    for name, folder in locations.items():
        if folder is not None and folder.startswith("gs://"):
            problem = probe_gcs_writable(folder, run_id)
            if problem is not None:
                raise UsageError(f"{name} {folder!r}: cannot write there ({problem})")


def check_names(input_uri: str, output: str, audit: str | None, crosswalk: str | None) -> None:
    """Refuse a location that is not valid UTF-8 (the audit carries paths as UTF-8 text) or
    names a storage we don't write to (``s3://``, a mistyped ``gs:/``... scheme)."""
    from transforms.files import utf8_name  # (no Beam import)

    for name, location in (("INPUT", input_uri), ("OUTPUT", output), ("--audit", audit), ("--crosswalk", crosswalk)):
        if location is None:
            continue
        if not utf8_name(location):
            raise UsageError(f"{name}: the path is not valid UTF-8 (rename it): pipelines carry paths as UTF-8")
        if _scheme(location) not in _SCHEMES:
            raise UsageError(f"{name} {location!r}: unsupported storage {_scheme(location)}:// "
                             "(give a local path, file:// or gs://)")
        if _scheme(location) == "gs" and ("\n" in location or "\r" in location):
            # Cloud Storage names hold no line break; Beam's path parser fails on one after the
            # outputs are written (an emulator accepts them: found by a review)
            raise UsageError(f"{name} {location!r}: a gs:// name cannot hold a line break")


def check_locations(input_uri: str, output: str, audit: str, crosswalk: str | None) -> None:
    """Refuse overlapping locations (outputs are never read back as inputs, audit never in
    OUTPUT) and an OUTPUT, audit or crosswalk folder that is, or lies under, an existing file."""
    check_names(input_uri, output, audit, crosswalk)
    for name, folder in (("OUTPUT", output), ("--audit", audit), ("--crosswalk", crosswalk)):
        if folder is not None and any(c in folder for c in "*?["):
            raise UsageError(f"{name} {folder!r}: the path must not contain *, ? or [ (Beam's file sinks read "
                             "them as patterns; a relative path counts from the current folder, whose own path "
                             "may hold them)")
        if folder is not None and _scheme(folder) in (None, "file"):
            _refuse_file_in_the_way(name, folder)
    # Compared as real paths: a symbolic link must not hide OUTPUT inside INPUT (and by device
    # and inode, see _inside_local: nor a bind mount).
    existing = _scheme(input_uri) is None and os.path.exists(input_uri)
    base = _real(input_uri if existing else _glob_base(input_uri))
    literal = existing or _glob_base(input_uri) == input_uri
    output, audit = _real(output), _real(audit)
    crosswalk = _real(crosswalk) if crosswalk is not None else None
    if _inside_local(output, base) or _inside_local(base, output):
        if not literal and _inside_local(output, base):
            raise UsageError(f"OUTPUT and INPUT overlap: INPUT is a pattern, whose files may lie anywhere under "
                             f"{base!r} (its folder before the first *, ? or [), and OUTPUT is "
                             "there: choose an OUTPUT outside it")
        raise UsageError("OUTPUT and INPUT overlap: choose an OUTPUT outside INPUT (and not containing it)")
    if _inside_local(audit, output):
        raise UsageError("--audit is inside OUTPUT: the audit must live beside the output, not in it")
    if _inside_local(audit, base):
        raise UsageError("--audit is inside INPUT: it would be read as input by the next run")
    if _inside_local(output, audit):
        raise UsageError("OUTPUT is inside --audit: the audit folder must hold the audit only")
    if _inside_local(base, audit):
        raise UsageError("INPUT is inside --audit: the audit folder must hold the audit only (it is shared)")
    if crosswalk is not None:
        if _inside_local(crosswalk, output):
            raise UsageError("--crosswalk is inside OUTPUT: original identifiers must never sit with the output")
        if _inside_local(crosswalk, base):
            raise UsageError("--crosswalk is inside INPUT: it would be read as input by the next run")
        if _inside_local(crosswalk, audit):
            raise UsageError("--crosswalk is inside --audit: keep original identifiers apart from the audit")
        if _inside_local(output, crosswalk) or _inside_local(audit, crosswalk) or _inside_local(base, crosswalk):
            raise UsageError("OUTPUT, --audit or INPUT is inside --crosswalk: keep original identifiers apart")
    _refuse_earlier_runs_files(output, audit, crosswalk)


def _inside_local(child: str, parent: str) -> bool:
    """:func:`_inside`, and for local paths also where ``child`` reaches ``parent`` by another
    name (INPUT named by a bind mount, ``docker run -v /data:/in``, OUTPUT by the host's path
    ``/data/deid``): one of its existing ancestors is ``parent``'s very folder (same device and
    inode). Two bind mounts (``-v /data:/in -v /data/deid:/out``) hide the nesting from every
    path: the README asks for OUTPUT to be mounted outside INPUT."""
    if _inside(child, parent):
        return True
    if _scheme(child) is not None or _scheme(parent) is not None:
        return False
    try:
        target = os.stat(parent)
    except OSError:
        return False
    path = _existing_ancestor(child)
    while True:
        try:
            if os.path.samestat(os.stat(path), target):
                return True
        except OSError:
            return False
        up = os.path.dirname(path)
        if up == path:
            return False
        path = up


#: Entries looked at in an existing OUTPUT (study folders can number millions).
_EARLIER_RUN_SCAN = 10_000
#: Sub-folders not named like studies whose top is looked at too (a crosswalk given as
#: ``rel/cw`` by one run, ``rel`` as OUTPUT by the next: found by a review).
_EARLIER_RUN_SUBFOLDERS = 16
_UID_NAME = re.compile(r"[0-9]+(\.[0-9]+)+")


def _earlier_run_kind(name: str, is_folder: bool) -> str | None:
    """Which kind of output of this command an entry named ``name`` at the top of a folder is:
    ``output`` (``*.dcm``, a study folder named by its UID), ``audit`` (``audit-*.parquet``,
    ``summary*.json``), ``crosswalk`` (``crosswalk-*.parquet``); None for anything else."""
    if is_folder:
        return "output" if _UID_NAME.fullmatch(name) else None
    if name.endswith(".parquet") and name.startswith("crosswalk-"):
        return "crosswalk"
    if (name.endswith(".parquet") and name.startswith("audit-")) or (
            name.startswith("summary") and name.endswith(".json")):
        return "audit"
    return "output" if name.lower().endswith(".dcm") else None


def _earlier_run_files(folder: str | None, *, deeper: bool = True) -> set[str]:
    """The kinds (:func:`_earlier_run_kind`) of what an earlier run left at the top of the
    existing local ``folder``, and the audits and crosswalks in its first sub-folders that are
    not study folders (:data:`_EARLIER_RUN_SUBFOLDERS`; ``deeper``)."""
    found: set[str] = set()
    if folder is None or _scheme(folder) is not None or not os.path.isdir(folder):
        return found
    others: list[str] = []
    try:
        with os.scandir(folder) as entries:
            for entry in islice(entries, _EARLIER_RUN_SCAN):
                uid_named = _UID_NAME.fullmatch(entry.name) is not None
                kind = _earlier_run_kind(entry.name, uid_named and entry.is_dir())
                if kind is not None:
                    found.add(kind)
                elif deeper and not uid_named and len(others) < _EARLIER_RUN_SUBFOLDERS \
                        and entry.is_dir(follow_symlinks=False):
                    others.append(entry.path)
    except OSError:
        pass  # an unreadable folder is refused elsewhere (no permission to write in it)
    for other in others:
        found |= _earlier_run_files(other, deeper=False) & {"audit", "crosswalk"}
    return found


def _earlier_run_objects(folder: str | None, *, deeper: bool = True) -> set[str]:
    """:func:`_earlier_run_files` for a ``gs://`` folder: the first objects and "folders"
    directly under it (one listing with a delimiter), and one listing of each of its first
    "folders" that are not study folders."""
    from transforms.files import list_gcs_top

    found: set[str] = set()
    if folder is None or not folder.startswith("gs://"):
        return found
    others: list[str] = []
    try:
        for name, is_folder in list_gcs_top(folder, _EARLIER_RUN_SCAN):
            kind = _earlier_run_kind(name, is_folder)
            if kind is not None:
                found.add(kind)
            elif deeper and is_folder and name and len(others) < _EARLIER_RUN_SUBFOLDERS:
                others.append(f"{folder.rstrip('/')}/{name}")
    except Exception:  # noqa: BLE001 - a safeguard: write access without list access is allowed
        pass
    for other in others:
        found |= _earlier_run_objects(other, deeper=False) & {"audit", "crosswalk"}
    return found


def _refuse_earlier_runs_files(output: str, audit: str, crosswalk: str | None, *, remote: bool = False,
                               deeper: bool = True) -> None:
    """Refuse a folder that already holds another kind of output of an earlier run: the
    original identifiers of a crosswalk beside a release, an audit among the DICOM files (the
    audit's readers take every file there for Parquet), DICOM files in an audit folder. Local
    folders; ``gs://`` ones with ``remote`` (runs on this machine, which can list them; a
    Dataflow launcher may lack the workers' access). ``deeper``: sub-folders too (not for
    the folder of one-file mode's OUTPUT file, a work folder rather than a release)."""
    what = {"output": "de-identified DICOM files", "audit": "an audit", "crosswalk": "a crosswalk"}
    held_by = _earlier_run_objects if remote else _earlier_run_files
    for name, folder, allowed in (("OUTPUT", output, "output"), ("--audit", audit, "audit"),
                                  ("--crosswalk", crosswalk, "crosswalk")):
        other = sorted(held_by(folder, deeper=deeper) - {allowed})
        if other:
            held = " and ".join(what[kind] for kind in other)
            raise UsageError(f"{name} {folder!r} already holds {held} of an earlier run: give {name} a folder "
                             "of its own" + (" (keep original identifiers apart)"
                                             if "crosswalk" in other or allowed == "crosswalk" else ""))


def _real(uri: str) -> str:
    """A local path with its symbolic links resolved (as far as it exists); other URIs as given."""
    return os.path.realpath(uri) if _scheme(uri) is None else uri


def _refuse_file_in_the_way(name: str, folder: str) -> None:
    """Refuse the local ``folder`` option ``name`` when it is, or would lie under, a file."""
    blocker = _file_in_the_way(folder)
    if blocker == folder:
        raise UsageError(f"{name} {folder!r} exists and is not a folder")
    if blocker is not None:
        raise UsageError(f"{name} {folder!r} cannot be created: {blocker!r} is a file, not a folder")
    # Refused now rather than after the run: an audit that cannot be written would leave
    # de-identified files without their rows.
    existing = _existing_ancestor(folder)
    what = "write in it" if existing == folder else f"create it in {existing!r}"
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{name} {folder!r}: no permission to {what}")
    # access() answers for the permission bits only: root is let through where the filesystem
    # itself refuses (/sys, /proc; found by a review). A folder made and removed at once asks it.
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".dicom-deid-probe-", dir=existing))
    except OSError as exc:
        raise UsageError(f"{name} {folder!r}: cannot {what} ({exc.strerror or type(exc).__name__})") from None


def _existing_ancestor(folder: str) -> str:
    """``folder`` if it exists, else its nearest existing parent."""
    path = folder
    while not os.path.lexists(path):
        parent = os.path.dirname(path) or "."
        if parent == path:
            break
        path = parent
    return path


def _file_in_the_way(folder: str) -> str | None:
    """The nearest existing path at or above the local ``folder`` when it is not a folder."""
    path = folder
    while not os.path.lexists(path):
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent
    return None if os.path.isdir(path) else path


def _local_input_exists(uri: str) -> bool:
    if _scheme(uri) not in (None, "file"):
        return True  # checked at run time (no remote I/O before the pipeline runs)
    if os.path.exists(uri):
        return True  # taken literally, even with [, * or ? in its name
    if any(c in uri for c in "*?["):
        import glob

        return bool(glob.glob(uri, recursive=True)) or os.path.isdir(_glob_base(uri))
    return False


# --------------------------------------------------------------------------- key


def load_key(key_file: str | None) -> tuple[Any, str | None]:
    """(Key, remote key URI or None). A remote key file is read here (to check it and get its id)
    and again by each worker, so the key itself never travels in the pipeline description."""
    from transforms.identity import Key

    if key_file is not None and _scheme(key_file) == "file":
        key_file = normalize(key_file)  # file:///path, as INPUT and OUTPUT accept it
    if key_file is not None and _scheme(key_file) not in (None, "file"):
        from transforms.files import load_key_uri

        return load_key_uri(key_file), key_file
    return Key.load(key_file), None


# --------------------------------------------------------------------------- main


def _err(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr)


LOCAL_RUNNERS = ("DirectRunner", "SwitchingDirectRunner", "FnApiRunner", "BundleBasedDirectRunner")


def quiet_local_workers(options: Any, *, verbose: bool, beam_args: list[str]) -> bool:
    """Whether the runner is local (this machine's terminal and folders); if so, and unless
    ``--verbose`` or an explicit ``--default_sdk_harness_log_level``, the worker processes of
    ``multi_processing`` log only what ends them (their INFO chatter shares our terminal, and
    an error they log quotes the exception, which may quote data), and are stopped on Ctrl-C
    or SIGTERM (:func:`_on_terminate`)."""
    from apache_beam.options.pipeline_options import DirectOptions, WorkerOptions

    global _STOP_CHILDREN
    local = runner_name(options) in LOCAL_RUNNERS
    if local and not verbose and "--default_sdk_harness_log_level" not in " ".join(beam_args):
        options.view_as(WorkerOptions).default_sdk_harness_log_level = "CRITICAL"
    if local and options.view_as(DirectOptions).direct_running_mode == "multi_processing":
        # Beam's shutdown after Ctrl-C or SIGTERM waits for its worker processes, which may
        # never answer (measured: a hang in stop_worker): they are stopped first.
        _STOP_CHILDREN = True
        try:
            signal.signal(signal.SIGINT, _on_terminate)
        except ValueError:  # not the main thread
            pass
    return local


def runner_name(options: Any) -> str:
    """The ``--runner`` as a name, whether Beam holds a name or a runner object."""
    from apache_beam.options.pipeline_options import StandardOptions

    runner = options.view_as(StandardOptions).runner
    return runner if isinstance(runner, str) else type(runner).__name__


def key_may_travel(options: Any) -> bool:
    """Whether the runner keeps the job description on this machine (the local runners, and
    Prism, a local binary), so a key held in the DoFns' configuration never leaves it."""
    name = runner_name(options)
    return name in LOCAL_RUNNERS or name == "PrismRunner"


def remote_key_message(options: Any) -> str:
    """The refusal for a key that would travel inside the job description of a runner that is
    not this machine's (Dataflow stores the description, with every DoFn, in its staging
    location): such runs read the key from a file their workers can reach."""
    return (f"--runner {runner_name(options)} runs on other machines: give the key as --key-file gs://... (a file the "
            "workers can read); a key from a local file, DICOM_DEID_KEY or a random key would be "
            "written into the job description")


def local_processes(options: Any, requested: int | None, *, local: bool) -> int:
    """How many :class:`transforms.workers.LocalPool` processes the run starts: ``--processes``,
    else :func:`transforms.workers.default_processes` (one per usable CPU; none with one CPU or
    off Linux); none when the runner is not local or Beam runs the DoFns in processes of its own
    (``--direct_running_mode multi_processing``).

    Raises:
        UsageError: ``--processes N`` (N > 0) where no pool can be used.
    """
    from apache_beam.options.pipeline_options import DirectOptions

    if not local:
        if requested:
            raise UsageError("--processes: only for local runs (DirectRunner); give the runner's own worker options")
        return 0
    if (options.view_as(DirectOptions).direct_running_mode or "in_memory") == "multi_processing":
        if requested:
            raise UsageError("--processes: not with --direct_running_mode multi_processing (Beam's own processes)")
        return 0
    if requested is not None:
        return requested
    from transforms.workers import default_processes

    return default_processes()


class _DropNoise(logging.Filter):
    """Beam warns at import time that BigQuery's optional client is missing: not our concern.
    Ctrl-C in a bundle makes Beam log the KeyboardInterrupt with a traceback before it
    re-raises it: the command says "interrupted" instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith("apitools not found"):
            return False
        exc = record.exc_info[1] if record.exc_info else None
        return not (isinstance(exc, KeyboardInterrupt) or "KeyboardInterrupt" in record.getMessage()[:2000])


def _configure_logging(verbose: bool) -> None:
    root = logging.getLogger()
    if not any(getattr(h, "_dicom_deid", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        handler.addFilter(_DropNoise())
        handler._dicom_deid = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    if not verbose:
        # Beam and google-auth log warnings meant for developers (e.g. "No project ID could be
        # determined" against the emulator). Beam also logs an exception that ends a bundle,
        # with its traceback, before re-raising it: the command reports it in one line (and an
        # exception's text may quote data).
        logging.getLogger("apache_beam").setLevel(logging.CRITICAL)
        logging.getLogger("google").setLevel(logging.ERROR)


def _warn_random_key(key: Any) -> None:
    if not key.reproducible:
        _err(f"warning: no --key-file and no DICOM_DEID_KEY: random key {key.key_id}, pseudonyms cannot be reproduced")


HEAD_START_PER_PROCESS = 1024  # files; see _head_start
HEAD_START_MAX = 16384  # files: the answers wait in this process until claimed (~1.5 KB each)


def _head_start(input_uri: str, processes: int) -> list[tuple[str, int]]:
    """The first files of the folder's listing, for the workers to begin with while this
    process imports Beam and builds the pipeline (1.5-2 s, sharing the CPUs with them; a
    worker does ~700 files a second: 384 per worker ran out ~1 s before the first claim). The
    pipeline lists the folder again and claims them (``LocalPool.submit``)."""
    import itertools

    from transforms.files import expand_input

    try:
        return list(itertools.islice(expand_input(input_uri), min(HEAD_START_PER_PROCESS * processes, HEAD_START_MAX)))
    except OSError:
        return []  # the pipeline's own listing reports it


# --------------------------------------------------------------------------- a run's shared steps
# The steps anonymize/modify (run_deid) and split/merge (pipelines.splitmerge.run_command) share.


def new_run_id() -> str:
    """``20261127T101500Z-1a2b3c4d``: the UTC start time and a random suffix; names the run's
    audit, crosswalk, summary and temporary files."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:8]


@dataclasses.dataclass(frozen=True)
class RunLocations:
    """A pipeline run's normalised, checked locations (see :func:`prepare_locations`)."""

    input_uri: str
    output: str
    audit: str
    crosswalk: str | None

    def summary_extra(self) -> dict[str, str]:
        """The summary's ``Audit`` entry, and ``Crosswalk`` when there is one."""
        extra = {"Audit": self.audit}
        if self.crosswalk:
            extra["Crosswalk"] = self.crosswalk
        return extra


def prepare_locations(args: argparse.Namespace, input_uri: str, output: str) -> RunLocations:
    """The normalised INPUT and OUTPUT with the audit folder (``--audit``, default OUTPUT +
    ``-audit``) and the ``--crosswalk`` folder, refused (UsageError) before anything is read
    from a remote location or written: an INPUT that does not exist, locations that are not
    UTF-8, are neither local nor gs://, or overlap (:func:`check_locations`), a local INPUT
    that matches no file."""
    if not _local_input_exists(input_uri):
        raise UsageError(f"INPUT {args.input!r} does not exist")
    if not args.audit and _scheme(output) == "gs" and "/" not in output[len("gs://"):].strip("/"):
        # OUTPUT + "-audit" would name another bucket, perhaps someone else's (found by a review)
        raise UsageError(f"OUTPUT {output!r} is a whole bucket: give --audit (its default, "
                         f"{output.rstrip('/') + '-audit'!r}, would be another bucket; the audit must lie "
                         "outside OUTPUT: in a bucket of yours or a local folder)")
    audit = normalize(args.audit) if args.audit else output.rstrip("/") + "-audit"
    crosswalk = normalize(args.crosswalk) if args.crosswalk else None
    check_locations(input_uri, output, audit, crosswalk)
    refuse_empty_input(input_uri, args.input)
    return RunLocations(input_uri, output, audit, crosswalk)


def _last_run(locations: RunLocations) -> tuple[dict[str, Any], int] | None:
    """The summary of the last run recorded in the audit folder, when it wrote files into the
    same OUTPUT, and how many it wrote; None when there is none (or it is not ours)."""
    uri = (os.path.join(locations.audit, "summary.json") if _scheme(locations.audit) is None
           else f"{locations.audit.rstrip('/')}/summary.json")
    try:
        from transforms.files import read_bounded

        previous = json.loads(read_bounded(uri, 64 << 20))
        statuses = previous.get("Statuses") or {}
        written = sum(n for s, n in statuses.items() if s in ("written", "moved", "copied") and type(n) is int)
        same_output = previous.get("Output") == locations.output
    except Exception:  # noqa: BLE001 - no summary, or not ours: nothing to compare with
        return None
    return (previous, written) if same_output and written else None


def refuse_mixed_release(locations: RunLocations, anonymization: bool, command: str) -> Any:
    """Refuse (UsageError) to write into an OUTPUT whose last run (from its ``summary.json``)
    anonymized when this one keeps original identifiers (modify, split, merge), or the reverse:
    files with original identifiers would sit in a release (found by a newcomer's run of the
    README's examples, which put a split into the quick start's OUTPUT). Returns that last run
    for :func:`other_key_warning` (one read of the summary)."""
    last = _last_run(locations)
    if last is None:
        return None
    previous, written = last
    earlier_anonymized = previous.get("IsAnonymization") is True
    if earlier_anonymized == anonymization:
        return last
    earlier = str(previous.get("Description") or "dicom-deid").removeprefix("dicom-deid ") or "earlier"
    if anonymization:
        raise UsageError(f"OUTPUT {locations.output!r} holds {written} files of a {earlier} run "
                         f"({previous.get('RunId')}), which keeps original identifiers: de-identified files beside "
                         "them would make no release; give OUTPUT a folder of its own")
    raise UsageError(f"OUTPUT {locations.output!r} holds {written} de-identified files of an anonymize run "
                     f"({previous.get('RunId')}): the files of this {command} keep original identifiers and must not "
                     "sit beside them; give OUTPUT a folder of its own")


def other_key_warning(locations: RunLocations, key_id: str, last: Any = ...) -> list[str]:
    """The warning (printed now and again at the end) when the last run recorded in the audit
    folder wrote files into the same OUTPUT with another key: two sets of pseudonyms and UIDs
    would sit side by side there (a rerun with a new random key, a trial run, then the real one
    with the key file). Read from that run's ``summary.json`` (``last``: as
    :func:`refuse_mixed_release` read it); none when there is none."""
    if last is ...:
        last = _last_run(locations)
    if last is None:
        return []
    previous, written = last
    earlier, run = previous.get("KeyId"), previous.get("RunId")
    if not isinstance(earlier, str) or earlier == key_id:
        return []
    warning = (f"warning: OUTPUT already holds {written} files that run {run} wrote with key {earlier}; this "
               f"run's key is {key_id}, so its pseudonyms and UIDs differ and both sets will sit side by side "
               "in OUTPUT (give each key its own OUTPUT)")
    _err(warning)
    return [warning]


def prepare_runner(options: Any, args: argparse.Namespace, beam_args: list[str], locations: RunLocations,
                   run_id: str) -> bool:
    """Whether the runner is local (:func:`quiet_local_workers`, which this calls). A runner
    on other machines (not local, not Prism) is refused local locations (UsageError). A local run
    also lists a remote INPUT and probes ``gs://`` OUTPUT, audit and crosswalk folders now, so
    that they are refused (UsageError) before anything is written: workers on another machine
    could not report to this terminal, and may have access this machine lacks."""
    if not key_may_travel(options):
        # A remote runner's workers would walk a folder that is not on their machine (no file),
        # write outputs to their own disks (lost, though audited as written) and fail the
        # audit's finalisation after all the work was done.
        local = [name for name, uri in (("INPUT", locations.input_uri), ("OUTPUT", locations.output),
                                        ("--audit", locations.audit), ("--crosswalk", locations.crosswalk))
                 if uri is not None and _scheme(uri) in (None, "file")]
        if local:
            raise UsageError(
                f"--runner {runner_name(options)} runs on other machines, which cannot reach this machine's "
                f"files: give {', '.join(local)} as gs:// location{'s' if len(local) > 1 else ''}"
            )
    local_runner = quiet_local_workers(options, verbose=args.verbose, beam_args=beam_args)
    if local_runner:
        refuse_empty_input(locations.input_uri, args.input, remote=True)
        probe_remote_locations(
            run_id, OUTPUT=locations.output, **{"--audit": locations.audit, "--crosswalk": locations.crosswalk}
        )
        _refuse_earlier_runs_files(locations.output, locations.audit, locations.crosswalk, remote=True)
    return local_runner


def remote_progress(args: argparse.Namespace, local_runner: bool) -> Any:
    """stderr for the progress line of a job on other machines (polled from its counters), or
    None: a local runner (see :func:`progress_folder`), ``--no-progress``, or by default stderr
    not a terminal."""
    progress = args.progress if args.progress is not None else sys.stderr.isatty()
    return sys.stderr if progress and not local_runner else None


def progress_folder(args: argparse.Namespace, local_runner: bool) -> str | None:
    """A new local folder where the workers count files for the progress line (the caller
    removes it), or None: no line (``--no-progress``, by default stderr not a terminal, or a
    runner on other machines)."""
    progress = args.progress if args.progress is not None else (local_runner and sys.stderr.isatty())
    return tempfile.mkdtemp(prefix="dicom-deid-progress-") if progress and local_runner else None


@contextlib.contextmanager
def run_leftovers_removed(output: str, run_id: str, progress_dir: str | None) -> Iterator[None]:
    """However the run ends, remove what it made beside its results: its temporary folder
    under a local OUTPUT (``execute`` removes it too; this also covers a run that never
    started) and the progress folder."""
    try:
        yield
    finally:
        if _scheme(output) is None:
            from transforms.files import remove_local_tmp

            remove_local_tmp(output, run_id)
        if progress_dir:
            shutil.rmtree(progress_dir, ignore_errors=True)


def report(args: argparse.Namespace, summary: dict[str, Any], exit_code: int, audit: str, *,
           terse_on_tty: bool = False, warnings: Sequence[str] = ()) -> int:
    """The end of a run: the summary on stdout (unless ``--quiet``; with ``terse_on_tty`` a
    terminal gets a long ``Resources`` list as its count), then ``warnings`` and the failed
    files' line on stderr. Returns the exit status (EXIT_USAGE when INPUT matched no file)."""
    if summary["InputFiles"] == 0:
        _err(f"INPUT {args.input!r} matched no files")
        return EXIT_USAGE
    if not args.quiet:
        shown = summary
        if terse_on_tty and sys.stdout.isatty() and len(summary["Resources"]) > _TTY_RESOURCES:
            # A terminal gets the counts, not thousands of ids; summary.json has them all.
            shown = {**summary, "Resources": f"{len(summary['Resources'])} entries, see {audit}/summary.json"}
        try:
            print(json.dumps(shown, indent=2))
            sys.stdout.flush()
        except BrokenPipeError:
            # A reader that stopped early (`| head`): the run itself is complete (summary.json
            # holds the summary), so its status stands; later writes go nowhere.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    for warning in warnings:
        _err(warning)
    if exit_code:
        # (a skipped DICOMDIR is no failure: it gets a clause of its own; not_selected none)
        reasons = ", ".join(f"{k} {v}" for k, v in summary["Reasons"].items() if k not in SKIPPED_REASONS)
        media = summary["Reasons"].get("dicomdir")
        skipped = f"; {media} DICOMDIR{'s' if media > 1 else ''} skipped" if media else ""
        _err(f"{summary['FailedInstancesCount']} of {summary['InputFiles']} input files failed ({reasons})"
             f"{skipped}; see {audit}")
    return exit_code


def _resources_not_found(summary: dict[str, Any], plan: Any) -> list[str]:
    """The warning for ``Resources`` entries that matched no input (none when all matched)."""
    missing = summary.get("ResourcesNotFound")
    if not missing:
        return []
    positions = ", ".join(str(i) for i in missing[:_SHOWN_POSITIONS])
    if len(missing) > _SHOWN_POSITIONS:  # summary.json has them all
        positions += f" and {len(missing) - _SHOWN_POSITIONS} more"
    warning = (f"warning: {len(missing)} of {len(plan.resources)} Resources entries matched no input "
               f"(positions {positions}, counting from 0)")
    return [warning]


def run_deid(args: argparse.Namespace, beam_args: list[str]) -> int:
    if args.command == "anonymize" and any(a == "--level" or a.startswith("--level=") for a in beam_args):
        raise UsageError("--level is an option of modify: an anonymization replaces the identifiers of every "
                         "level (a Level in its body is ignored, as in Orthanc)")
    request, dictionary = load_request(args.body, args.config)
    plan = parse_plan(args.command, request, dictionary, getattr(args, "level", None))
    if request.get("KeepSource") is False:
        _err("note: KeepSource false is ignored: dicom-deid never deletes its inputs")
    for note in plan.notes:
        _err(f"note: {note}")
    key, key_uri = load_key(args.key_file)
    run_id = new_run_id()

    input_uri = normalize_input(args.input)
    output = normalize(args.output)
    local_in = _scheme(input_uri) is None
    # "out.dcm/" names a folder: the trailing separator is the user's word for it
    as_folder = args.output.endswith(("/", os.sep))
    single = (local_in and os.path.isfile(input_uri) and output.lower().endswith(".dcm") and _scheme(output) is None
              and not as_folder)
    if not single and output.lower().endswith(".dcm") and not as_folder:
        if local_in and not _local_input_exists(input_uri):
            raise UsageError(f"INPUT {args.input!r} does not exist")
        raise UsageError("OUTPUT ends in .dcm (one file) but INPUT is not one local file: give an OUTPUT folder")
    if single and os.path.isdir(output):
        raise UsageError(f"OUTPUT {output!r} is an existing folder: end it with / to write into it, or name a file")

    if single:  # (INPUT is an existing file; a pipeline's INPUT is checked in prepare_locations)
        check_names(input_uri, output, normalize(args.audit) if args.audit else None,
                   normalize(args.crosswalk) if args.crosswalk else None)
        if beam_args:
            raise UsageError(f"unknown option(s): {' '.join(beam_args)} (one-file mode takes no Beam options)")
        _warn_random_key(key)
        return _run_single(args, plan, key, run_id, input_uri, output)

    from transforms.files import RunConfig

    where = prepare_locations(args, input_uri, output)
    # Beam's defaults (the local DirectRunner, in memory: no Beam option but the runner's name,
    # as the README's command gives it) over a local folder: the workers can start before Beam
    # is even imported (see _head_start).
    early = (beam_args in ([], ["--runner", "DirectRunner"], ["--runner=DirectRunner"])
             and local_in and os.path.isdir(input_uri) and _scheme(output) is None)
    if early:
        options, local_runner = None, True
    else:
        from pipelines import run as pipeline_run  # Beam: loaded only for a pipeline run

        options = pipeline_run.pipeline_options(beam_args)
        if key_uri is None and not key_may_travel(options):  # (refused: a runner prepare_runner leaves alone)
            raise UsageError(remote_key_message(options))
        local_runner = prepare_runner(options, args, beam_args, where, run_id)
    if early:
        from transforms.workers import default_processes

        processes = args.processes if args.processes is not None else default_processes()
    else:
        processes = local_processes(options, args.processes, local=local_runner)  # may refuse
        pipeline_run.check_options(options)
    if args.file_timeout is not None and not processes:
        raise UsageError("--file-timeout: the deadline is kept by the worker processes of a local run, and this run "
                         "has none (--processes 0, one CPU, or another runner)")
    last = refuse_mixed_release(where, plan.is_anonymization, args.command)  # (reads gs:// too)
    _warn_random_key(key)
    mixed = other_key_warning(where, key.key_id, last)  # after every refusal
    progress_dir = progress_folder(args, local_runner)
    cfg = RunConfig(
        plan=plan,
        output_root=output,
        run_id=run_id,
        key_id=key.key_id,
        key=None if key_uri else key,
        key_uri=key_uri,
        max_bytes=args.max_bytes,
        crosswalk=where.crosswalk is not None,
        progress_dir=progress_dir,
    )
    pool = None
    with run_leftovers_removed(output, run_id, progress_dir):
        try:
            if _scheme(output) is None:
                from transforms.files import claim_local_tmp

                claim_local_tmp(output, run_id, sinks=(where.audit, where.crosswalk))  # also sweeps what killed runs left
            if processes:
                from transforms.workers import DEFAULT_FILE_TIMEOUT, STOPPED_RUN_GRACE, LocalPool

                try:
                    # Forked now: before Beam starts its threads (and, early, before it is imported).
                    pool = LocalPool(cfg, key, processes, head_start=_head_start(input_uri, processes) if early else None,
                                     file_timeout=args.file_timeout or DEFAULT_FILE_TIMEOUT)
                except OSError as exc:  # e.g. EAGAIN: a process limit
                    _err(f"warning: cannot start {processes} worker processes ({type(exc).__name__}): "
                         "the files are processed in Beam's own process")
            if early:
                from pipelines import run as pipeline_run

                options = pipeline_run.pipeline_options(beam_args)
                quiet_local_workers(options, verbose=args.verbose, beam_args=beam_args)
            outcome = pipeline_run.execute(
                options,
                input_uri,
                cfg,
                where.audit,
                where.crosswalk,
                reproducible=key.reproducible,
                extra_summary=where.summary_extra(),
                progress=bool(progress_dir),
                pool=pool,
                remote_progress=remote_progress(args, local_runner),
            )
        except BaseException:
            if pool is not None:  # stopped before the run's own close (Ctrl-C while Beam starts)
                pool.close(grace=STOPPED_RUN_GRACE)
            raise
        finally:
            if pool is not None:
                pool.close()  # (nothing left to wait for when the run closed it)
    return report(args, outcome.summary, outcome.exit_code, where.audit, terse_on_tty=True,
                  warnings=mixed + _resources_not_found(outcome.summary, plan))


def _check_single_locations(input_file: str, output: str, audit: str | None, crosswalk: str | None) -> None:
    """One-file mode: refused before anything is read or written, like the folder checks."""
    real_in, real_out = os.path.realpath(input_file), os.path.realpath(output)
    if real_in == real_out:
        raise UsageError("OUTPUT is the INPUT file: dicom-deid never overwrites its inputs")
    # The file's folder, like the folder options: refused now, not a write_error after the work.
    _refuse_file_in_the_way("OUTPUT's folder", os.path.dirname(output))
    for name, folder in (("--audit", audit), ("--crosswalk", crosswalk)):
        if folder is not None:
            _refuse_file_in_the_way(name, folder)
    real_audit = os.path.realpath(audit) if audit else None
    real_cw = os.path.realpath(crosswalk) if crosswalk else None
    if real_audit and (_inside(real_audit, real_out) or _inside(real_audit, real_in)):
        raise UsageError("--audit must not be the INPUT or OUTPUT file")
    if real_audit and (_inside(real_in, real_audit) or _inside(real_out, real_audit)):
        raise UsageError("--audit holds the INPUT or OUTPUT file: the audit folder must hold the audit only "
                         "(a folder run over it would read the audit as input)")
    if real_cw:
        if _inside(real_cw, real_out) or _inside(real_cw, real_in) or _inside(real_out, real_cw):
            raise UsageError("--crosswalk must not be, or hold, the INPUT or OUTPUT file")
        if real_audit and (_inside(real_cw, real_audit) or _inside(real_audit, real_cw)):
            raise UsageError("--crosswalk is inside --audit (or the reverse): keep original identifiers apart from the audit")
        # Original identifiers never sit with de-identified files: the OUTPUT file's folder is
        # a release folder unless the INPUT file (identifiers itself) lies in it too.
        out_folder = os.path.dirname(real_out)
        if _inside(real_cw, out_folder) and os.path.dirname(real_in) != out_folder:
            raise UsageError(f"--crosswalk is inside OUTPUT's folder {out_folder!r}: original identifiers must "
                             "never sit with de-identified files (give the crosswalk a folder outside it)")
    # As a folder run: a crosswalk (original identifiers) written into a release folder, or a
    # DICOM file into an audit folder (whose readers then fail on it), is refused.
    _refuse_earlier_runs_files(os.path.dirname(real_out), real_audit, real_cw, deeper=False)


def _run_single(args: argparse.Namespace, plan: Any, key: Any, run_id: str, input_uri: str, output: str) -> int:
    """One file, no Beam (not even imported): read, apply, write atomically (like
    /instances/{id}/modify|anonymize)."""
    from pipelines import summary as run_summary
    from transforms.files import RunConfig, process_file

    audit = normalize(args.audit) if args.audit else None
    crosswalk_dir = normalize(args.crosswalk) if args.crosswalk else None
    _check_single_locations(input_uri, output, audit, crosswalk_dir)
    cfg = RunConfig(
        plan=plan,
        output_root=os.path.dirname(output),
        run_id=run_id,
        key_id=key.key_id,
        key=key,
        max_bytes=args.max_bytes,
        crosswalk=args.crosswalk is not None,
    )
    row, crosswalk = process_file(input_uri, os.path.getsize(input_uri), cfg, key, target=output)
    if audit or crosswalk_dir:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from schemas.audit import AUDIT_SCHEMA, CROSSWALK_SCHEMA

        if audit:
            os.makedirs(audit, exist_ok=True)
            pq.write_table(pa.Table.from_pylist([row], schema=AUDIT_SCHEMA), os.path.join(audit, f"audit-{run_id}-00000-of-00001.parquet"))
            summary = run_summary.summarize([row], cfg=cfg, reproducible=key.reproducible, extra={"Audit": audit})
            run_summary.write_summary(audit, run_id, summary)
        if crosswalk is not None and crosswalk_dir:
            os.makedirs(crosswalk_dir, exist_ok=True)
            pq.write_table(
                pa.Table.from_pylist([crosswalk], schema=CROSSWALK_SCHEMA),
                os.path.join(crosswalk_dir, f"crosswalk-{run_id}-00000-of-00001.parquet"),
            )
    if row["status"] == "failed":
        _err(f"{args.input}: {row['reason']}: {row['detail']}")
        return EXIT_USAGE if row["reason"] == "refused_by_request" else EXIT_SOME_FAILED
    if row["status"] == "skipped":  # not selected by Resources, a DICOMDIR
        _err(f"{args.input}: {row['reason']}: {row['detail']}; nothing written")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dicom-deid`` console command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("DICOM_DEID_DEBUG") == "1"
    global _STOP_CHILDREN
    previous_term = _terminate_like_interrupt()
    previous_int = signal.getsignal(signal.SIGINT)
    try:
        _configure_logging("--verbose" in argv)
        # pydicom's warnings can quote values; the audit row records what went wrong.
        warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\.|$)")
        parser = build_parser()
        args, beam_args = parser.parse_known_args(argv)
        _refuse_empty_paths(args)
        if args.command in ("anonymize", "modify"):
            return run_deid(args, beam_args)
        handler = getattr(args, "func", None)
        if handler is None:
            raise UsageError(f"unknown command {args.command!r}")
        return int(handler(args, beam_args) or 0)
    except KeyboardInterrupt:
        _err("interrupted")
        return EXIT_INTERRUPTED
    except RequestError as exc:  # refused request or command line (UsageError, InvalidKey too)
        if debug:
            raise
        _err(str(exc))
        return EXIT_USAGE
    except DeidError as exc:
        if debug:
            raise
        _err(f"{exc.reason}: {exc}")
        return EXIT_SOME_FAILED
    except Exception as exc:  # noqa: BLE001 - never a traceback by default; messages may quote data
        if debug:
            raise
        if _interrupted(exc):  # Ctrl-C inside a bundle: Beam re-raises it wrapped
            _err("interrupted")
            return EXIT_INTERRUPTED
        storage = _storage_error(exc)
        if storage:  # input and output files' errors are rows: this is the run's own storage
            where = getattr(exc, "where", None)  # RunFolderError: OUTPUT, before any file
            if where:
                _err(f"the run stopped before any file on a storage error in {where}: {storage}")
            else:
                _err(f"the run stopped on a storage error outside the per-file work (the audit, crosswalk "
                     f"or summary folder, or a listing): {storage}; the audit may be incomplete")
            return EXIT_INTERNAL
        prism = _prism_failure(exc)
        if prism is not None:
            _err(f"--runner PrismRunner could not start Prism: {prism} (Beam downloads or builds its Prism "
                 "binary on first use: without a network, give --prism_location a local copy of it, or use "
                 "--runner DirectRunner)")
            return EXIT_INTERNAL
        _err(f"internal error ({type(exc).__name__}); rerun with DICOM_DEID_DEBUG=1 for a traceback")
        return EXIT_INTERNAL
    finally:
        for signum, handler in previous_term.items():
            signal.signal(signum, handler)
        if _STOP_CHILDREN:
            _STOP_CHILDREN = False
            signal.signal(signal.SIGINT, previous_int)


#: Path arguments, as named in messages.
_PATH_ARGUMENTS = (("input", "INPUT"), ("output", "OUTPUT"), ("audit", "--audit"), ("crosswalk", "--crosswalk"),
                   ("key_file", "--key-file"), ("config", "--config"))  # fmt: skip


def _refuse_empty_paths(args: argparse.Namespace) -> None:
    """An empty path (an unset ``"$OUT"`` in a script) is refused: taken as the current folder,
    it would de-identify or write into wherever the command runs."""
    for attribute, name in _PATH_ARGUMENTS:
        value = getattr(args, attribute, None)
        if not isinstance(value, str):
            continue
        if not value.strip():
            raise UsageError(f"{name} is empty: give a path (an unset shell variable?)")
        # "gs://$BUCKET" or "file://$OUT" with the variable unset: "gs:" would become a local
        # folder of that name, "file://" the current folder.
        typo = re.match(r"([a-zA-Z][a-zA-Z0-9+.-]+):/(?!/)", value)
        if typo:  # "gs:/bucket/out" would be a local folder named "gs:" in the current one
            raise UsageError(f"{name} {value!r}: one slash after {typo.group(1)}: (give {typo.group(1)}:// for a "
                             f"location there, or ./{value} for a local path)")
        scheme = _scheme(value)
        rest = value[len(scheme) + 3:] if scheme is not None else None
        if scheme is not None and scheme.lower() == "file" and not rest.strip():
            raise UsageError(f"{name} {value!r} names no path: give one after file:// (an unset shell variable?)")
        if scheme is not None and scheme.lower() != "file" and not rest.split("/", 1)[0].strip():
            raise UsageError(f"{name} {value!r} names no bucket: give one after {scheme}:// "
                             "(an unset shell variable?)")


#: Set for Beam's multi_processing mode: a signal stops the command's child processes first.
_STOP_CHILDREN = False
INTERRUPT_GRACE_SECONDS = 15.0


def _on_terminate(signum: int, frame: Any) -> NoReturn:
    if _STOP_CHILDREN:
        if os.environ.get("DICOM_DEID_DEBUG") != "1":
            threading.excepthook = _quiet_thread_error  # Beam's threads lose their workers now
        _stop_children()
        # The cleanup that KeyboardInterrupt unwinds through gets this long; then the process
        # ends anyway (a second signal does not wait).
        timer = threading.Timer(INTERRUPT_GRACE_SECONDS, _exit_interrupted)
        timer.daemon = True
        timer.start()
    raise KeyboardInterrupt


def _quiet_thread_error(args: Any) -> None:
    pass


def _exit_interrupted() -> None:
    _err("interrupted")
    os._exit(EXIT_INTERRUPTED)


def _stop_children(wait: float = 5.0) -> None:
    """SIGTERM the processes below this one that run Beam's SDK worker (multi_processing),
    and give them ``wait`` seconds to end.

    They are grandchildren (the DirectRunner starts each through ``/bin/sh -c``): stopping only
    the shells left the workers writing for a moment after the run had removed its temporary
    folder, which recreated it without its lock, for no later run to remove.
    """
    parents: dict[int, int] = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
            parents[int(name)] = int(stat[stat.rindex(b")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    below: list[int] = []
    frontier = [os.getpid()]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent]
        below.extend(children)
        frontier.extend(children)
    stopped = []
    for pid in below:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"sdk_worker_main" in f.read():
                    os.kill(pid, signal.SIGTERM)
                    stopped.append(pid)
        except OSError:
            continue
    deadline = time.monotonic() + wait
    while stopped and time.monotonic() < deadline:
        stopped = [pid for pid in stopped if _running(pid)]
        if stopped:
            time.sleep(0.02)


def _running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie (an ended process its parent has not reaped)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(b")") + 2:][:1] != b"Z"


def _terminate_like_interrupt() -> dict[int, Any]:
    """SIGTERM (``timeout``, schedulers, Kubernetes) and SIGHUP (a closed terminal or SSH
    session) unwind like Ctrl-C, so the same cleanup runs: split/merge's temporary index holds
    original identifiers and must not stay in OUTPUT. SIGHUP only where it would kill the
    process (under ``nohup`` it stays ignored). Returns the previous handlers to restore
    (none when not on the main thread)."""
    previous: dict[int, Any] = {}
    try:
        previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, _on_terminate)
        if signal.getsignal(signal.SIGHUP) == signal.SIG_DFL:
            previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, _on_terminate)
    except ValueError:  # not the main thread (e.g. called from a test runner thread)
        pass
    return previous


def _prism_failure(exc: BaseException) -> str | None:
    """The first line of an error raised while Beam prepared the Prism runner's binary (no
    network to download it, a --prism_location that is not one), else None. Its text names
    the binary's location, never data."""
    import traceback

    for frame, _ in traceback.walk_tb(exc.__traceback__):
        if frame.f_code.co_filename.endswith(os.path.join("portability", "prism_runner.py")):
            text = str(exc).strip()
            return (text.splitlines()[0][:300] if text else type(exc).__name__)
    return None


def _storage_error(exc: BaseException) -> str | None:
    """``"ENOSPC (No space left on device)"`` when ``exc`` is, or wraps, an operating-system
    error (Beam re-raises a bundle's exception inside its own, or as text from its worker
    processes). Only the error number is used: the message would name a path."""
    import errno as errno_names

    seen: set[int] = set()
    current: BaseException | None = exc
    number = None
    while current is not None and id(current) not in seen and number is None:
        seen.add(id(current))
        # Not a name lookup (socket.gaierror: negative EAI_* numbers, e.g. Beam's Prism runner
        # failing to download itself offline said "storage error: -2"; found by a review).
        if isinstance(current, OSError) and current.errno and current.errno > 0:
            number = current.errno
        current = current.__cause__ or current.__context__
    if number is None:
        found = re.search(r"(?:OSError|Error): \[Errno (\d+)\]", str(exc)[:20000])
        number = int(found.group(1)) if found else None
    if not number or number < 0:
        return None
    return f"{errno_names.errorcode.get(number, number)} ({os.strerror(number)})"


def _interrupted(exc: BaseException) -> bool:
    """True when ``exc`` is Beam's wrapping of a KeyboardInterrupt raised in a bundle."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, KeyboardInterrupt) or "KeyboardInterrupt" in str(current)[:2000]:
            return True
        current = current.__cause__ or current.__context__
    return False


def entry() -> NoReturn:
    """The ``dicom-deid`` console command: :func:`main`, then the process ends without the
    interpreter's teardown of every module and object (0.2-0.45 s after a pipeline run,
    measured 27 November 2026, for nothing: every output, audit and summary file is closed by
    then). Standard output, standard error and logging are flushed first."""
    code = main()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (``| head``) or stream
            pass
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    entry()
