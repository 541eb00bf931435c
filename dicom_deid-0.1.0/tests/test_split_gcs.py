"""``dicom-deid split`` bucket to bucket against gcp-storage-emulator on 127.0.0.1.

Reuses the emulator fixtures of ``tests/test_gcs.py`` (started on a free loopback port, stopped
by PID, with Beam's credential lookup made anonymous in every process).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pydicom

from tests.test_gcs import _dicom_deid, _objects, _read_audit, _upload_folder, emulator, gcs  # noqa: F401 - fixtures
from tests.test_split_synthetic import CT_SERIES, RT_SERIES, STUDY_A, write_reference_studies


def test_split_bucket_to_bucket_and_refusal(tmp_path: Path, emulator, gcs) -> None:  # noqa: F811 - fixtures
    _, env = emulator
    gcs.create_bucket("sm-in")
    gcs.create_bucket("sm-out")
    uploaded = _upload_folder(gcs, "sm-in", "archive", write_reference_studies(tmp_path / "in")["A/sr.dcm"].parents[1])
    key = tmp_path / "key"
    key.write_bytes(b"split-merge-gcs-test-key-0123456")
    body = json.dumps({"Series": [CT_SERIES, RT_SERIES]})
    done = _dicom_deid(env, "split", "gs://sm-in/archive", "gs://sm-out/new", "--study", STUDY_A, "--body", body,
                       "--key-file", str(key), "--audit", "gs://sm-out/audit", "--copy-unselected", "--quiet")  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = _read_audit(gcs, "sm-out", "audit/")
    assert sorted(r["source_uri"] for r in rows) == sorted(uploaded)
    by_name = {r["source_uri"].split("/archive/", 1)[1]: r for r in rows}
    assert {n: r["status"] for n, r in by_name.items()} == {
        "A/ct1.dcm": "moved", "A/ct2.dcm": "moved", "A/ct3.dcm": "moved", "A/rtstruct.dcm": "moved",
        "A/mr1.dcm": "copied", "A/mr2.dcm": "copied", "A/sr.dcm": "copied", "B/ct1.dcm": "copied", "B/ct2.dcm": "copied",
    }  # fmt: skip
    objects = _objects(gcs, "sm-out", "new/")
    assert sorted(objects) == sorted(r["output_uri"] for r in rows)
    assert not [name for name in objects if ".dicom-deid-tmp" in name]
    rt = pydicom.dcmread(io.BytesIO(objects[by_name["A/rtstruct.dcm"]["output_uri"]]))
    ct_sops = {pydicom.dcmread(io.BytesIO(objects[by_name[f"A/ct{i}.dcm"]["output_uri"]])).SOPInstanceUID for i in (1, 2, 3)}
    study_item = rt.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0]
    assert {i.ReferencedSOPInstanceUID for i in study_item.RTReferencedSeriesSequence[0].ContourImageSequence} == ct_sops
    assert objects[by_name["A/sr.dcm"]["output_uri"]] == Path(uploaded[by_name["A/sr.dcm"]["source_uri"]]).read_bytes()
    refused = _dicom_deid(env, "split", "gs://sm-in/archive", "gs://sm-out/refused", "--study", "1.2.3", "--body", body,
                          "--key-file", str(key), "--audit", "gs://sm-out/refused-audit")  # fmt: skip
    assert refused.returncode == 2
    assert refused.stderr.strip().endswith("split: --study: no instance of this study in INPUT (cannot split an unknown study)")
    assert _objects(gcs, "sm-out", "refused") == {}
