"""The run's summary: counts per status and reason and the new resources, shaped like
Orthanc's bulk answer. No Beam import (the one-file command uses it too); Beam's filesystems
are loaded only to write a summary to a non-local location."""

from __future__ import annotations

import collections
import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

import pyarrow as pa

from pipelines import EXIT_OK, EXIT_SOME_FAILED
from schemas.audit import FAILED, SKIPPED, WRITTEN
from transforms.files import RunConfig, get_scheme, replace_local

_RESOURCE_LEVELS = (
    ("Instance", "instances", "instance_orthanc_id"),
    ("Series", "series", "series_orthanc_id"),
    ("Study", "studies", "study_orthanc_id"),
    ("Patient", "patients", "patient_orthanc_id"),
)
SUMMARY_COLUMNS = ("status", "reason", *(column for _, _, column in _RESOURCE_LEVELS))

#: ``Resources`` in a summary lists at most this many ids per level (the smallest, sorted): a
#: laptop run lists everything, a 50-million-instance run does not hold or print every id
#: (the audit table has them all).
SUMMARY_MAX_RESOURCES = 10_000


class AuditTally:
    """Counts per status and reason, and the new resources' ids per level, gathered from audit
    rows or Arrow tables with memory bounded by ``max_resources`` ids per level.

    ``resource_statuses``: the rows whose ids count as new resources (``written`` here,
    ``moved`` for split and merge). Per level, the smallest ``max_resources`` distinct ids are
    kept; :meth:`resources` also names the levels that had more.
    """

    def __init__(self, resource_statuses: tuple[str, ...] = (WRITTEN,), max_resources: int | None = None) -> None:
        if max_resources is None:
            max_resources = SUMMARY_MAX_RESOURCES
        if max_resources < 1:
            raise ValueError("AuditTally: max_resources must be at least 1")
        self.statuses: collections.Counter[str] = collections.Counter()
        self.reasons: collections.Counter[str] = collections.Counter()
        self._resource_statuses = tuple(resource_statuses)
        self._max = max_resources
        self._ids: dict[str, set[str]] = {level: set() for level, _, _ in _RESOURCE_LEVELS}
        self._truncated: set[str] = set()

    def add_rows(self, rows: Iterable[Mapping[str, Any]]) -> AuditTally:
        for row in rows:
            self.statuses[row["status"]] += 1
            if row["reason"]:
                self.reasons[row["reason"]] += 1
            if row["status"] in self._resource_statuses:
                for level, _, column in _RESOURCE_LEVELS:
                    if row[column]:
                        self._add_ids(level, (row[column],))
        return self

    def add_table(self, table: pa.Table) -> AuditTally:
        """Vectorised :meth:`add_rows` for a table holding at least :data:`SUMMARY_COLUMNS`."""
        import pyarrow.compute as pc

        for column, counter in (("status", self.statuses), ("reason", self.reasons)):
            for entry in pc.value_counts(table[column].drop_null()).to_pylist():
                if entry["values"]:
                    counter[entry["values"]] += entry["counts"]
        selected = table.filter(pc.is_in(table["status"], value_set=pa.array(self._resource_statuses, pa.string())))
        for level, _, column in _RESOURCE_LEVELS:
            ids = pc.unique(selected[column].drop_null())
            if len(ids) > self._max:
                self._truncated.add(level)
                ids = ids.take(pc.sort_indices(ids)[: self._max])
            self._add_ids(level, (i for i in ids.to_pylist() if i))
        return self

    def _add_ids(self, level: str, ids: Iterable[str]) -> None:
        kept = self._ids[level]
        kept.update(ids)
        if len(kept) > 2 * self._max:  # the smallest ``max`` of a superset stay the smallest
            self._prune(level)

    def _prune(self, level: str) -> list[str]:
        """The level's kept ids, sorted, cut to the smallest ``max``."""
        kept = sorted(self._ids[level])
        if len(kept) > self._max:
            self._truncated.add(level)
            kept = kept[: self._max]
            self._ids[level] = set(kept)
        return kept

    def resources(self) -> tuple[list[dict[str, str]], list[str]]:
        """Orthanc's ``Resources`` (instances, series, studies, patients, each sorted by ID),
        and the levels that had more than ``max_resources`` ids."""
        listed = [
            {"ID": rid, "Path": f"/{path}/{rid}", "Type": level}
            for level, path, _ in _RESOURCE_LEVELS
            for rid in self._prune(level)
        ]
        return listed, [level for level, _, _ in _RESOURCE_LEVELS if level in self._truncated]


def summarize(
    rows: Iterable[Mapping[str, Any]] | AuditTally,
    *,
    cfg: RunConfig,
    reproducible: bool,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The run's answer, shaped like Orthanc's bulk job content (behaviour §10.3).

    ``InstancesCount`` counts the selected inputs (written + failed), ``FailedInstancesCount``
    the failed ones; ``Resources`` lists the new instances, then series, studies, patients,
    each group sorted by ``ID`` (at most :data:`SUMMARY_MAX_RESOURCES` per level;
    ``ResourcesTruncated`` names the levels that had more). ``Statuses`` and ``Reasons`` count
    every input file.
    """
    tally = rows if isinstance(rows, AuditTally) else AuditTally().add_rows(rows)
    statuses, reasons = tally.statuses, tally.reasons
    resources, truncated = tally.resources()
    plan = cfg.plan
    summary: dict[str, Any] = {
        "Description": f"dicom-deid {getattr(plan, 'operation', None) or ('anonymize' if plan.is_anonymization else 'modify')}",
        "InstancesCount": statuses[WRITTEN] + statuses[FAILED],
        "FailedInstancesCount": statuses[FAILED],
        "IsAnonymization": bool(plan.is_anonymization),
        "Resources": resources,
        "ResourcesTruncated": truncated,
        "InputFiles": sum(statuses.values()),
        "Statuses": {s: statuses[s] for s in (WRITTEN, FAILED, SKIPPED)},
        "Reasons": dict(sorted(reasons.items())),
        "KeyId": cfg.key_id,
        "Reproducible": bool(reproducible),
        "RunId": cfg.run_id,
        "Output": cfg.output_root,
    }
    if plan.is_anonymization:
        summary["Profile"] = getattr(plan, "profile_version", None)
    else:
        summary["Level"] = getattr(plan, "level", None)
    if getattr(plan, "transcode", None):
        summary["Transcode"] = plan.transcode
    if not reproducible:
        summary["Warning"] = (
            "no --key-file and no DICOM_DEID_KEY: a random key was used, "
            "so these pseudonyms and UIDs cannot be reproduced by a later run"
        )
    if extra:
        summary.update(extra)
    return summary


def exit_code(summary: Mapping[str, Any]) -> int:
    """0 when every input was written or skipped by request, 3 when any failed."""
    return EXIT_SOME_FAILED if summary["FailedInstancesCount"] else EXIT_OK


def write_text(uri: str, text: str) -> None:
    write_whole(uri, text.encode("utf-8"), "application/json")


def write_whole(uri: str, data: bytes, mime_type: str = "application/octet-stream") -> None:
    """Write ``data`` at ``uri`` whole or not at all: a local file through a hidden temporary
    file in the same folder and a rename (a full disk leaves the previous file as it was, not
    a truncated one); an object store publishes an object only once its upload completed."""
    if get_scheme(uri) is None:
        replace_local(data, uri)
        return
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.create(uri, mime_type=mime_type, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        f.write(data)


def write_summary(audit_root: str, run_id: str, summary: Mapping[str, Any]) -> None:
    text = json.dumps(summary, indent=2, sort_keys=False) + "\n"
    for name in (f"summary-{run_id}.json", "summary.json"):
        write_text(os.path.join(audit_root, name) if get_scheme(audit_root) is None else f"{audit_root.rstrip('/')}/{name}", text)


