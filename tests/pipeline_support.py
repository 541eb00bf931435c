"""Helpers shared by the pipeline, CLI, hostile-input and GCS tests (owned by the pipeline tests).

The oracle ``expected_row`` runs the pure core (read_dataset -> engine.apply -> write_dataset)
on one file, so the pipeline tests can assert that Beam produced exactly what the core
produces: same output name, same bytes (SHA-256), same Orthanc ids.
"""

from __future__ import annotations

import hashlib
import os
import signal
import struct
import warnings
from io import BytesIO
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pydicom

from transforms import dicomio, engine
from transforms.errors import DeidError
from transforms.identity import Key
from transforms.orthanc_ids import orthanc_ids

#: The tests' secret (32 bytes). Tests check it never appears in any output.
SECRET = b"pipeline-tests-secret-0123456789"
KEY = Key.from_bytes(SECRET)
#: Parquet readers must skip the summaries that live beside the audit shards.
IGNORE = ["summary", ".", "_", "beam-temp"]  # as the README reads the audit


def write_key(folder: Path) -> Path:
    path = folder / "deid.key"
    path.write_bytes(SECRET + b"\n")
    return path


def read_rows(folder: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every Parquet row under ``folder``, sorted by source_uri."""
    table = pq.read_table(str(folder), ignore_prefixes=IGNORE)
    return sorted(table.to_pylist(), key=lambda r: r["source_uri"])


def output_files(root: str | os.PathLike[str]) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``root`` (temporaries included)."""
    root = Path(root)
    found = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            found[path.relative_to(root).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def expected_row(path: Path, plan: Any, key: Key = KEY) -> dict[str, Any]:
    """What the core alone makes of ``path``: the audit fields the pipeline must reproduce."""
    data = path.read_bytes()
    try:
        ds = dicomio.read_dataset(data)
        new = engine.apply(plan, ds, key)
        if plan.transcode:
            from transforms.transcode import transcode_for_plan

            new = transcode_for_plan(plan, new, key).dataset
        out = dicomio.write_dataset(new)
    except DeidError as exc:
        return {"status": "failed", "reason": exc.reason}
    except RecursionError:
        return {"status": "failed", "reason": "too_deep"}
    except Exception:  # the pipeline's dead letter for anything unexpected
        return {"status": "failed", "reason": "internal_error"}
    uids = [str(new[k].value).strip(" \0") for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")]
    pid = str(new.get("PatientID", "") or "")
    ids = orthanc_ids(pid, *uids)
    return {
        "status": "written",
        "reason": None,
        "name": "/".join(uids) + ".dcm",
        "output_sha256": hashlib.sha256(out).hexdigest(),
        "bytes_in": len(data),
        "bytes_out": len(out),
        "study_instance_uid": uids[0],
        "series_instance_uid": uids[1],
        "sop_instance_uid": uids[2],
        "instance_orthanc_id": ids["instance"],
        "series_orthanc_id": ids["series"],
        "study_orthanc_id": ids["study"],
        "patient_orthanc_id": ids["patient"],
    }


def all_bytes_under(root: str | os.PathLike[str]) -> bytes:
    """Concatenated bytes of every file under ``root`` (to search for leaked values)."""
    return b"".join(p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file())


def pydicom_converts_all(data: bytes) -> bool:
    """pydicom reads ``data`` and converts every value at every depth."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            for elem in pydicom.dcmread(BytesIO(data), force=True).iterall():
                elem.value  # noqa: B018 - converting is the check
        except Exception:  # noqa: BLE001 - any failure means "no"
            return False
    return True


def explicit_item(body: bytes) -> bytes:
    """One item of defined length (little endian) holding ``body``."""
    return struct.pack("<HHI", 0xFFFE, 0xE000, len(body)) + body


def explicit_element(group: int, element: int, vr: bytes, value: bytes) -> bytes:
    """One explicit VR little endian element, padded to an even length."""
    if len(value) % 2:
        value += b"\0" if vr in (b"UI", b"OB") else b" "
    if vr in (b"OB", b"SQ", b"UT", b"UN", b"OW"):
        return struct.pack("<HH2sHI", group, element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, element, vr, len(value)) + value


def default_signals() -> None:
    """``preexec_fn`` for a command a test will interrupt: SIGINT and SIGHUP as a terminal's
    job has them. A script started in the background by a shell without job control (a CI
    runner's ``cmd &``) passes SIGINT on ignored, and Python then never raises
    KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
