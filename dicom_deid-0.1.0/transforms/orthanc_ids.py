"""Orthanc-style resource identifiers, so our outputs can be matched with Orthanc's.

Orthanc names a resource by the SHA-1 of its DICOM identifiers joined with ``|``, written as
five groups of eight hex digits (``DicomInstanceHasher``): patient = sha1(PatientID),
study = sha1(PatientID|StudyInstanceUID), series = ...|SeriesInstanceUID,
instance = ...|SOPInstanceUID. A missing PatientID counts as the empty string.
"""

from __future__ import annotations

import hashlib
import re

_ORTHANC_ID_RE = re.compile(r"^[0-9a-f]{8}(-[0-9a-f]{8}){4}$")


def _format(text: str) -> str:
    digest = hashlib.sha1(text.encode("utf-8")).hexdigest()
    return "-".join(digest[i : i + 8] for i in range(0, 40, 8))


def orthanc_ids(patient_id: str | None, study_uid: str, series_uid: str, sop_uid: str) -> dict[str, str]:
    """The Orthanc ids of the patient, study, series and instance of one file."""
    pid = (patient_id or "").rstrip(" \0")  # Orthanc (DCMTK) keeps leading spaces: checked on 1.10.1
    study, series, sop = (v.strip(" \0") for v in (study_uid, series_uid, sop_uid))
    return {
        "patient": _format(pid),
        "study": _format(f"{pid}|{study}"),
        "series": _format(f"{pid}|{study}|{series}"),
        "instance": _format(f"{pid}|{study}|{series}|{sop}"),
    }


def is_orthanc_id(text: str) -> bool:
    """True for a string shaped like an Orthanc id (``xxxxxxxx-xxxxxxxx-...``)."""
    return bool(_ORTHANC_ID_RE.match(text))
