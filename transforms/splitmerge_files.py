"""Per-file work of ``dicom-deid split`` / ``merge`` without Beam: index one file, apply the plan to one file.

:mod:`transforms.splitmerge` plans; this module does the file I/O around the plan, and
:mod:`pipelines.splitmerge` wraps these functions in DoFns and wires the two passes:

- pass 1: :func:`index_file` reads a file's header (:func:`read_header`) into an
  :class:`~transforms.splitmerge.IndexEntry` when the :class:`IndexSelector` needs it; the
  entries travel to the driver as JSON lines (:func:`encode_entry` / :func:`decode_entry`);
- the driver writes the plan (:func:`write_plan`), which each worker reads once (:func:`load_plan`);
- pass 2: :func:`process_instance` moves, copies or skips one input file as the plan says and
  returns its audit row (and crosswalk row).

Files are read and written through :mod:`transforms.files` (Beam's filesystems, imported on
first use): the per-file helpers and the atomic publishing are the de-identification's own.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pickle
from typing import Any

from schemas.audit import (
    COPIED,
    FAILED,
    MOVED,
    NEW_IDENTITY_COLUMNS,
    OUTPUT_COLUMNS,
    SKIPPED,
    audit_row,
    crosswalk_row,
    utc_now,
)
from transforms import dicomio
from transforms import splitmerge as sm
from transforms.errors import SKIPPED_REASONS
from transforms.files import (
    CompressionTypes,
    FileSystems,
    crosswalk_fields,
    describe_input,
    duplicate_instance_error,
    failure_reason,
    identifiers_of,
    identity_columns,
    output_name,
    publish,
    read_bounded,
    read_header,
    read_input,
    safe_str,
    safe_transfer_syntax,
    short_detail,
)


# --------------------------------------------------------------------------- pass 1: the index


@dataclasses.dataclass(frozen=True)
class IndexSelector:
    """Which index entries the planner needs, and whether that takes a group-by-study.

    ``studies`` are the identifiers naming the study to split or the merge target;
    ``resources`` the merge's ``Resources``. An entry *matches* when one of its identifiers
    (UIDs or Orthanc ids) is among them.
    """

    operation: str
    studies: frozenset[str]
    resources: frozenset[str] = frozenset()
    study_tags_for: str | None = None

    @classmethod
    def for_split(cls, request: sm.SplitRequest) -> IndexSelector:
        return cls(sm.SPLIT, frozenset({request.study}))

    @classmethod
    def for_merge(cls, request: sm.MergeRequest) -> IndexSelector:
        return cls(sm.MERGE, frozenset({request.target}), frozenset(request.resources), request.target)

    @property
    def grouped(self) -> bool:
        """Merge resources may be series or instances: their whole study is needed."""
        return self.operation == sm.MERGE

    def matches(self, e: sm.IndexEntry) -> bool:
        if e.study_uid in self.studies or e.study in self.studies:
            return True
        ids = (e.study_uid, e.study, e.series_uid, e.series, e.sop_uid, e.instance, e.patient)
        return any(i in self.resources for i in ids)


def index_file(path: str, size: int, selector: IndexSelector, max_bytes: int) -> sm.IndexEntry | None:
    """The index entry of one input file, or None (unreadable, or not needed for a split)."""
    ds = read_header(path, size, max_bytes)
    if ds is None:
        return None
    try:
        entry = sm.index_entry(path, ds, study_tags_for=selector.study_tags_for)
    except Exception:  # noqa: BLE001 - an undecodable value: if it is an instance the plan moves,
        return None  # pass 2 fails it (splitmerge.check_left_alone), else it is left alone
    if not selector.grouped and not selector.matches(entry):
        return None
    return entry


def encode_entry(e: sm.IndexEntry) -> str:
    """One JSON line per entry (the index travels from the workers to the driver as text)."""
    return json.dumps(list(e), separators=(",", ":"), ensure_ascii=True)


def decode_entry(line: str) -> sm.IndexEntry:
    fields = json.loads(line)
    tags = fields[-1]
    return sm.IndexEntry(*fields[:-1], tuple((int(t), v) for t, v in tags) if tags is not None else None)


# --------------------------------------------------------------------------- the plan


@dataclasses.dataclass(frozen=True)
class ApplyConfig:
    """What a pass-2 worker needs besides the plan (which it reads from ``plan_uri``)."""

    plan_uri: str
    output_root: str
    run_id: str
    key_id: str
    max_bytes: int = 2 << 30
    copy_unselected: bool = False
    crosswalk: bool = False
    progress_dir: str | None = None  # local folder for the CLI's progress line (local runners only)
    memory_budget: int | None = None  # input bytes in flight per process (transforms.files.MemoryBudget)


_PLAN_CACHE: dict[str, sm.Plan] = {}


def load_plan(uri: str) -> sm.Plan:
    """The pickled plan at ``uri``, read once per worker process."""
    plan = _PLAN_CACHE.get(uri)
    if plan is None:
        with FileSystems.open(uri, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            plan = pickle.loads(f.read())
        if not isinstance(plan, sm.Plan):
            raise TypeError(f"{uri}: not a split/merge plan")
        _PLAN_CACHE.clear()
        _PLAN_CACHE[uri] = plan
    return plan


def write_plan(uri: str, plan: sm.Plan) -> None:
    with FileSystems.create(uri, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        f.write(pickle.dumps(plan, protocol=pickle.HIGHEST_PROTOCOL))


# --------------------------------------------------------------------------- pass 2: apply


def _publish_named(data: bytes, ds: Any, cfg: ApplyConfig) -> tuple[str, str]:
    """Publish ``data`` at ``<OUTPUT>/<study>/<series>/<sop>.dcm`` from ``ds``'s UIDs."""
    name = output_name(*(safe_str(ds, k) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")))
    final = FileSystems.join(cfg.output_root, *name.split("/"))
    sha = hashlib.sha256(data).hexdigest()
    publish(data, sha, final, cfg.output_root, cfg.run_id)
    return final, sha


def process_instance(
    path: str, size: int, plan: sm.Plan, cfg: ApplyConfig
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Move, copy or skip one input file as the plan says. Never raises for a bad file.

    The identity columns of a ``moved`` or ``copied`` row always hold valid UIDs: the file
    was published under them (:func:`transforms.files.output_name` refuses any other).

    Returns:
        ``(audit_row, crosswalk_row or None)``.
    """
    started = utc_now()
    row: dict[str, Any] = {
        "source_uri": path,
        "operation": plan.operation,
        "level": "Study",
        "request": short_detail(plan.describe()),
        "key_id": cfg.key_id,
        "run_id": cfg.run_id,
        "bytes_in": int(size),
        "started_at": started,
    }
    new = None
    kept = False  # whether KeepSource wrote the original
    stage = "read"
    try:
        unselected = plan.disposition(path) == sm.UNSELECTED
        if unselected and not cfg.copy_unselected:
            # Left alone: its header (as pass 1 read it) describes it; the whole file is read
            # only when the header does not parse, to say why it fails.
            header = read_header(path, size, cfg.max_bytes)
            if header is not None:
                describe_input(header, row)
                stage = "select"
                sm.check_left_alone(plan, header)
                row.update(status=SKIPPED, reason="not_selected", detail=f"not selected by the {plan.operation}")
                return audit_row(**row, finished_at=utc_now()), None
        data = read_input(path, size, cfg.max_bytes, row)
        stage = "parse"
        ds = dicomio.read_dataset(data, max_inflated=cfg.max_bytes)
        describe_input(ds, row)
        if unselected:
            stage = "select"
            sm.check_left_alone(plan, ds)
            if not cfg.copy_unselected:
                row.update(status=SKIPPED, reason="not_selected", detail=f"not selected by the {plan.operation}")
                return audit_row(**row, finished_at=utc_now()), None
            stage = "write"
            final, sha = _publish_named(data, ds, cfg)
            row.update(
                identity_columns(identifiers_of(ds)),
                status=COPIED,
                output_uri=final,
                transfer_syntax_out=row["transfer_syntax_in"],
                bytes_out=len(data),
                output_sha256=sha,
            )
            return audit_row(**row, finished_at=utc_now()), None
        defining = plan.duplicate_of.get(path)
        if defining is not None and not _same_bytes(defining, data, cfg.max_bytes) and _moves(defining, plan, cfg):
            # Decided by the plan, not by which worker publishes first: a rerun moves the same
            # file. Only where the defining input moves itself: a copy of the instance cut short
            # (the plan reads headers only) must not take the good copy down with it.
            stage = "write"
            new = sm.apply_plan(plan, ds, path)
            raise duplicate_instance_error()
        stage = "apply"
        new = sm.apply_plan(plan, ds, path)
        stage = "encode"
        out = dicomio.write_dataset(new)
        if plan.keep_source:
            # The original first: when it cannot be kept (another input with other content
            # under the same UIDs), nothing of this input is written and its row says so.
            stage = "keep source"
            _publish_named(data, ds, cfg)
            kept = True
        stage = "write"
        final, sha = _publish_named(out, new, cfg)
        new_ids = identifiers_of(new)
        row.update(
            identity_columns(new_ids),
            status=MOVED,
            output_uri=final,
            transfer_syntax_out=safe_transfer_syntax(new),
            bytes_out=len(out),
            output_sha256=sha,
        )
        if plan.keep_source:
            row["detail"] = "KeepSource: the original was also written unchanged under its own UIDs"
        crosswalk = None
        if cfg.crosswalk:
            fields = crosswalk_fields(path, cfg.run_id, cfg.key_id, identifiers_of(ds), new_ids, absent="")
            crosswalk = crosswalk_row(**fields, output_uri=final)
        return audit_row(**row, finished_at=utc_now()), crosswalk
    except Exception as exc:  # noqa: BLE001 - dead letter: every failure becomes an audit row
        reason, detail = failure_reason(exc, stage, ("write", "keep source"))
    if stage == "keep source" and reason == "duplicate_instance":
        detail = ("KeepSource: another file with different content already lies under this instance's "
                  "own UIDs, so the original could not be kept (and the re-parented instance was not written)")
    elif kept:
        detail = f"KeepSource: the original was written unchanged under its own UIDs; then {detail}"
    for column in OUTPUT_COLUMNS:
        row.pop(column, None)
    if reason == "duplicate_instance" and new is not None and stage == "write":
        row.update(identity_columns(identifiers_of(new)))  # the identity it collided on (the plan's UIDs)
    else:
        for column in NEW_IDENTITY_COLUMNS:
            row.pop(column, None)
    status = SKIPPED if reason in SKIPPED_REASONS else FAILED  # a DICOMDIR
    row.update(status=status, reason=reason, detail=short_detail(detail))
    return audit_row(**row, finished_at=utc_now()), None


def _moves(path: str, plan: sm.Plan, cfg: ApplyConfig) -> bool:
    """Whether the input at ``path`` (a duplicate's defining input) reads, re-parents and
    encodes: what its own pass 2 does before publishing."""
    try:
        ds = dicomio.read_dataset(read_bounded(path, cfg.max_bytes), max_inflated=cfg.max_bytes)
        dicomio.write_dataset(sm.apply_plan(plan, ds, path))
    except Exception:  # noqa: BLE001 - it fails in its own row; the duplicate takes its place
        return False
    return True


def _same_bytes(path: str, data: bytes, max_bytes: int) -> bool:
    """Whether the input at ``path`` holds exactly ``data``; an unreadable one counts as the
    same (the duplicate then goes on, and the writer still refuses differing content)."""
    try:
        return read_bounded(path, max_bytes) == data
    except Exception:  # noqa: BLE001 - see above
        return True


__all__ = [
    "ApplyConfig",
    "IndexSelector",
    "decode_entry",
    "encode_entry",
    "index_file",
    "load_plan",
    "process_instance",
    "read_header",
    "write_plan",
]
