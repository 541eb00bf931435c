"""The audit and crosswalk tables: explicit pyarrow schemas and the only row builders.

Every input file gets exactly one audit row, whatever happened to it. The audit never holds an
original identifier (PatientID, names, dates, original UIDs): only the *new* identifiers of what
was written, so the table can be shared with whoever runs the pipeline. The mapping from
original to new identifiers goes, only when asked (``--crosswalk``), to a separate table that a
data custodian keeps elsewhere.

Audit columns (``AUDIT_SCHEMA``), one row per input file:

=====================  ===========  ====================================================================
column                 type         meaning
=====================  ===========  ====================================================================
source_uri             string       the input file (local path or ``gs://`` URI), never null
output_uri             string       the file written, ``<OUTPUT>/<study>/<series>/<sop>.dcm``;
                                    null when nothing was written (failed, skipped)
status                 string       ``written`` (output exists with this row's content), ``failed``
                                    (see ``reason``), ``skipped`` (not selected by ``Resources``, or
                                    a DICOMDIR);
                                    split/merge add ``moved`` (re-parented, new UIDs) and ``copied``
                                    (written unchanged: --copy-unselected)
reason                 string       null when written; else a code of ``transforms.errors.REASONS``:
                                    ``not_dicom``, ``empty``, ``truncated``, ``too_deep``,
                                    ``too_large``, ``invalid_uid``, ``invalid_value``,
                                    ``refused_by_request``, ``duplicate_instance``,
                                    ``cannot_transcode``, ``not_selected``, ``read_error``,
                                    ``write_error``, ``internal_error``, ``dicomdir`` (skipped),
                                    ``timeout`` (a worker process spent more than
                                    ``--file-timeout`` on the file)
detail                 string       short explanation for people (names the stage, tag keyword or
                                    exception type; never a value from the file); null when written
operation              string       ``modify``, ``anonymize``, ``split`` or ``merge``
profile                string       anonymization profile (``DicomVersion``, e.g. ``2023b``); null for
                                    modify
level                  string       ``Patient``, ``Study``, ``Series`` or ``Instance`` (split/merge: ``Study``)
request                string       the plan's short description (``Plan.describe()``)
key_id                 string       12 hex characters naming the key (not the key)
run_id                 string       identifies the run; every row of one run shares it
study_instance_uid     string       new StudyInstanceUID of the output (null if nothing written, except
                                    on a ``duplicate_instance`` row: the UIDs and ids of the output
                                    it collided with, which holds the other file's content)
series_instance_uid    string       new SeriesInstanceUID of the output
sop_instance_uid       string       new SOPInstanceUID of the output
patient_orthanc_id     string       Orthanc-style id of the new patient (SHA-1 of the new PatientID)
study_orthanc_id       string       Orthanc-style id of the new study
series_orthanc_id      string       Orthanc-style id of the new series
instance_orthanc_id    string       Orthanc-style id of the new instance
sop_class_uid          string       SOPClassUID (never changed by de-identification); null if the file
                                    could not be read
modality               string       Modality of the input (a code such as ``CT``; null if absent)
transfer_syntax_in     string       transfer syntax UID of the input
transfer_syntax_out    string       transfer syntax UID of the output (null if nothing written)
bytes_in               int64        size of the input file
bytes_out              int64        size of the output file (null if nothing written)
output_sha256          string       hex SHA-256 of the output file (null if nothing written)
started_at             timestamp    when processing of this file started (UTC, microseconds)
finished_at            timestamp    when it ended (UTC, microseconds)
=====================  ===========  ====================================================================

Crosswalk columns (``CROSSWALK_SCHEMA``), one row per *written* file: ``source_uri``,
``output_uri``, ``run_id``, ``key_id``, then ``original_patient_id``, ``original_study_instance_uid``,
``original_series_instance_uid``, ``original_sop_instance_uid`` and the matching ``new_*`` columns,
plus the Orthanc-style ids of the original and new instance (``original_instance_orthanc_id``,
``new_instance_orthanc_id``). It holds identifying data: store it like the originals.
"""

from __future__ import annotations

import datetime as _dt
from typing import Any

import pyarrow as pa

from transforms.errors import REASONS

WRITTEN = "written"
FAILED = "failed"
SKIPPED = "skipped"
# Added by the split/merge stage (pipelines/splitmerge.py): ``moved`` = re-parented into
# another study and written under new UIDs; ``copied`` = written unchanged (--copy-unselected,
# KeepSource). Both carry an output_uri and no reason, like ``written``.
MOVED = "moved"
COPIED = "copied"
STATUSES = (WRITTEN, FAILED, SKIPPED, MOVED, COPIED)
#: Statuses whose row names an output file (and has no reason code).
OUTPUT_STATUSES = (WRITTEN, MOVED, COPIED)

_TS = pa.timestamp("us", tz="UTC")

AUDIT_SCHEMA = pa.schema(
    [
        pa.field("source_uri", pa.string(), nullable=False),
        pa.field("output_uri", pa.string()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("reason", pa.string()),
        pa.field("detail", pa.string()),
        pa.field("operation", pa.string(), nullable=False),
        pa.field("profile", pa.string()),
        pa.field("level", pa.string()),
        pa.field("request", pa.string()),
        pa.field("key_id", pa.string(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("study_instance_uid", pa.string()),
        pa.field("series_instance_uid", pa.string()),
        pa.field("sop_instance_uid", pa.string()),
        pa.field("patient_orthanc_id", pa.string()),
        pa.field("study_orthanc_id", pa.string()),
        pa.field("series_orthanc_id", pa.string()),
        pa.field("instance_orthanc_id", pa.string()),
        pa.field("sop_class_uid", pa.string()),
        pa.field("modality", pa.string()),
        pa.field("transfer_syntax_in", pa.string()),
        pa.field("transfer_syntax_out", pa.string()),
        pa.field("bytes_in", pa.int64()),
        pa.field("bytes_out", pa.int64()),
        pa.field("output_sha256", pa.string()),
        pa.field("started_at", _TS, nullable=False),
        pa.field("finished_at", _TS, nullable=False),
    ]
)

CROSSWALK_SCHEMA = pa.schema(
    [
        pa.field("source_uri", pa.string(), nullable=False),
        pa.field("output_uri", pa.string(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("key_id", pa.string(), nullable=False),
        pa.field("original_patient_id", pa.string()),
        pa.field("original_study_instance_uid", pa.string()),
        pa.field("original_series_instance_uid", pa.string()),
        pa.field("original_sop_instance_uid", pa.string()),
        pa.field("new_patient_id", pa.string()),
        pa.field("new_study_instance_uid", pa.string()),
        pa.field("new_series_instance_uid", pa.string()),
        pa.field("new_sop_instance_uid", pa.string()),
        pa.field("original_instance_orthanc_id", pa.string()),
        pa.field("new_instance_orthanc_id", pa.string()),
    ]
)

AUDIT_COLUMNS = tuple(AUDIT_SCHEMA.names)
#: The columns naming the new instance (its UIDs and Orthanc-style ids): set when something was
#: written, and on a ``duplicate_instance`` failure (the identity it collided on).
NEW_IDENTITY_COLUMNS = (
    "study_instance_uid",
    "series_instance_uid",
    "sop_instance_uid",
    "patient_orthanc_id",
    "study_orthanc_id",
    "series_orthanc_id",
    "instance_orthanc_id",
)
#: The columns describing the output file: null unless a file was written.
OUTPUT_COLUMNS = ("output_uri", "transfer_syntax_out", "bytes_out", "output_sha256")
CROSSWALK_COLUMNS = tuple(CROSSWALK_SCHEMA.names)
_AUDIT_NON_NULL = tuple(f.name for f in AUDIT_SCHEMA if not f.nullable)
_CROSSWALK_NON_NULL = tuple(f.name for f in CROSSWALK_SCHEMA if not f.nullable)


def utc_now() -> _dt.datetime:
    """The current time as an aware UTC datetime (the audit's timestamp type)."""
    return _dt.datetime.now(_dt.timezone.utc)


def audit_row(**fields: Any) -> dict[str, Any]:
    """Build one audit row: every column present (missing ones null), values checked.

    ``pa.Table.from_pylist`` and ``WriteToParquet`` silently accept a missing non-nullable key
    and only fail at the final write, so the checks happen here, where a unit test sees them.

    Raises:
        ValueError: unknown column, missing required column, unknown status or reason code.
    """
    unknown = set(fields) - set(AUDIT_COLUMNS)
    if unknown:
        raise ValueError(f"audit_row: unknown column(s) {sorted(unknown)}; allowed: {', '.join(AUDIT_COLUMNS)}")
    row = {name: fields.get(name) for name in AUDIT_COLUMNS}
    missing = [name for name in _AUDIT_NON_NULL if row[name] is None]
    if missing:
        raise ValueError(f"audit_row: required column(s) {missing} are null")
    if row["status"] not in STATUSES:
        raise ValueError(f"audit_row: status {row['status']!r} not in {STATUSES}")
    if row["reason"] is not None and row["reason"] not in REASONS:
        raise ValueError(f"audit_row: reason {row['reason']!r} not in transforms.errors.REASONS")
    if (row["status"] in OUTPUT_STATUSES) != (row["reason"] is None):
        raise ValueError(f"audit_row: a reason is required exactly when status is not one of {OUTPUT_STATUSES}")
    if (row["status"] in OUTPUT_STATUSES) != (row["output_uri"] is not None):
        raise ValueError(f"audit_row: output_uri is set exactly when status is one of {OUTPUT_STATUSES}")
    return row


def crosswalk_row(**fields: Any) -> dict[str, Any]:
    """Build one crosswalk row: every column present (missing ones null).

    Raises:
        ValueError: unknown column or missing required column.
    """
    unknown = set(fields) - set(CROSSWALK_COLUMNS)
    if unknown:
        raise ValueError(f"crosswalk_row: unknown column(s) {sorted(unknown)}")
    row = {name: fields.get(name) for name in CROSSWALK_COLUMNS}
    missing = [name for name in _CROSSWALK_NON_NULL if row[name] is None]
    if missing:
        raise ValueError(f"crosswalk_row: required column(s) {missing} are null")
    return row
