"""``dicom-deid merge`` end to end on the DirectRunner, including a multi_processing run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pydicom
import pytest

from pipelines import cli
from tests.test_split_pipeline import PROGRESS_LINE, audit_rows, statuses
from tests.test_split_synthetic import MR_SERIES, MR_SOPS, SR_SOP, STUDY_A, STUDY_B, write_reference_studies
from transforms import splitmerge as sm
from transforms.orthanc_ids import orthanc_ids

BRAINIX_STUDY_UID = "2.16.840.1.113669.632.20.1211.10000357775"


def test_merge_comunix_pet_into_brainix_multi_processing(
    samples: Path, tmp_path: Path, key_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "in"
    shutil.copytree(samples / "Comunix", src / "Comunix")
    shutil.copytree(samples / "Brainix" / "Flair", src / "Brainix" / "Flair")
    pet_series = str(pydicom.dcmread(src / "Comunix" / "Pet" / "IM-0001-0001.dcm", stop_before_pixels=True).SeriesInstanceUID)
    out, audit = tmp_path / "out", tmp_path / "audit"
    code = cli.main([
        "merge", str(src), str(out), "--study", BRAINIX_STUDY_UID, "--body", json.dumps({"Resources": [pet_series]}),
        "--key-file", str(key_file), "--audit", str(audit), "--copy-unselected", "--quiet",
        "--direct_running_mode=multi_processing", "--direct_num_workers=2", "--progress",
    ])  # fmt: skip
    assert code == 0
    rows = audit_rows(audit)
    assert statuses(rows) == {"moved": 2, "copied": 24}
    # worker processes counted into the progress folder
    assert PROGRESS_LINE.findall(capsys.readouterr().err)[-1] == ("26", "0", "0", "0", "24", "2")
    moved = [r for r in rows if r["status"] == "moved"]
    assert all("/Comunix/Pet/" in r["source_uri"] for r in moved)
    flair = sorted((src / "Brainix" / "Flair").glob("*.dcm"))
    brainix_study_id = orthanc_ids("5Yp0E", BRAINIX_STUDY_UID, "", "")["study"]
    first = min(flair, key=lambda p: sm.index_entry(str(p), pydicom.dcmread(p, stop_before_pixels=True)).instance)
    target = pydicom.dcmread(first, stop_before_pixels=True)
    for row in moved:
        ds = pydicom.dcmread(row["output_uri"])
        assert (row["study_instance_uid"], row["study_orthanc_id"]) == (BRAINIX_STUDY_UID, brainix_study_id)
        for tag in sm.MODULE_TAGS:
            elem = target.get(tag)
            if elem is None or elem.VR == "SQ":
                assert tag not in ds
            else:
                assert ds[tag].value == elem.value
        assert ds.Modality == "PT"
    # CT stays in its study (copied), Brainix is copied unchanged too: OUTPUT is the new archive.
    copied = [r for r in rows if r["status"] == "copied"]
    assert sum("/Comunix/Ct/" in r["source_uri"] for r in copied) == 2
    assert all(Path(r["output_uri"]).read_bytes() == Path(r["source_uri"]).read_bytes() for r in copied)
    summary = json.loads((audit / "summary.json").read_text())
    assert summary["TargetStudy"] == brainix_study_id and summary["TargetStudyUID"] == BRAINIX_STUDY_UID
    assert summary["InstancesCount"] == 2
    series = {r["series_instance_uid"] for r in moved}
    studies_out = {p.relative_to(out).parts[0] for p in out.rglob("*.dcm")}
    assert len(series) == 1 and BRAINIX_STUDY_UID in studies_out


def test_merge_generated_study_keeps_references(tmp_path: Path, key_file: Path) -> None:
    write_reference_studies(tmp_path / "in")
    out, audit = tmp_path / "out", tmp_path / "audit"
    body = json.dumps({"Resources": [MR_SERIES, SR_SOP]})
    assert cli.main(["merge", str(tmp_path / "in"), str(out), "--study", STUDY_B, "--body", body,
                     "--key-file", str(key_file), "--audit", str(audit), "--quiet"]) == 0  # fmt: skip
    rows = audit_rows(audit)
    assert statuses(rows) == {"moved": 3, "skipped": 6}
    moved = {Path(r["source_uri"]).name: pydicom.dcmread(r["output_uri"]) for r in rows if r["status"] == "moved"}
    sr = moved["sr.dcm"]
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == STUDY_B == sr.StudyInstanceUID
    assert evidence.ReferencedSeriesSequence[0].SeriesInstanceUID == moved["mr1.dcm"].SeriesInstanceUID
    assert [i.ReferencedSOPInstanceUID for i in evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence] == [
        moved["mr1.dcm"].SOPInstanceUID, moved["mr2.dcm"].SOPInstanceUID]  # fmt: skip
    assert {ds.PatientID for ds in moved.values()} == {"PAT-B"}
    assert len({ds.SeriesInstanceUID for ds in moved.values()}) == 2  # MR and SR: one new series each
    assert not {ds.SOPInstanceUID for ds in moved.values()} & {*MR_SOPS, SR_SOP}


@pytest.mark.parametrize(
    ("target", "resources", "message"),
    [
        ("1.2.3", [STUDY_A], "merge: --study: no instance of this target study in INPUT (cannot merge into an unknown or empty study)"),
        (STUDY_B, [STUDY_B], "merge: Resources[0]: this study is already in the target study (a study cannot be merged into itself)"),
        (STUDY_B, ["9.9.9"], "merge: Resources[0]: no study, series or instance in INPUT has this identifier"),
    ],
)
def test_refusals_write_nothing(
    tmp_path: Path, key_file: Path, capsys: pytest.CaptureFixture[str], target: str, resources: list, message: str
) -> None:
    write_reference_studies(tmp_path / "in")
    out, audit = tmp_path / "out", tmp_path / "audit"
    code = cli.main(["merge", str(tmp_path / "in"), str(out), "--study", target, "--body",
                     json.dumps({"Resources": resources}), "--key-file", str(key_file), "--audit", str(audit)])  # fmt: skip
    assert code == cli.EXIT_USAGE
    assert capsys.readouterr().err == f"dicom-deid: {message}\n"
    assert not out.exists() and not audit.exists()
