"""The run summary's tally: counts per status and reason, and a bounded Resources list.

A 50-million-instance run must not hold or print every id: ``Resources`` keeps the smallest
``SUMMARY_MAX_RESOURCES`` ids per level (the audit table has them all). The rows come from real
runs over generated studies and a bundled file that is not DICOM.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pytest
from pydicom.data import get_testdata_file

from pipelines import cli
from pipelines import run as pipeline_run
from pipelines import summary as run_summary
from pipelines.run import AuditTally, read_audit
from tests.pipeline_support import write_key
from tests.synthetic import make_study, write_study

LEVELS = (
    ("Instance", "instances", "instance_orthanc_id"),
    ("Series", "series", "series_orthanc_id"),
    ("Study", "studies", "study_orthanc_id"),
    ("Patient", "patients", "patient_orthanc_id"),
)


def _corpus(folder: Path) -> None:
    write_study(make_study(seed=21, n_ct=9), folder / "a")  # 11 instances, 3 series
    write_study(make_study(seed=22, n_ct=4, patient_id="PID-22"), folder / "b")  # 6 instances, 3 series
    shutil.copy(get_testdata_file("README.txt", read=False) or "", folder / "notes.dcm")  # not DICOM


@pytest.fixture(scope="module")
def audited(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pa.Table]:
    root = tmp_path_factory.mktemp("summary")
    _corpus(root / "in")
    code = cli.main(["anonymize", str(root / "in"), str(root / "out"), "--key-file", str(write_key(root)), "--quiet"])
    assert code == pipeline_run.EXIT_SOME_FAILED
    summary = json.loads((root / "out-audit" / "summary.json").read_text())
    return root, read_audit(str(root / "out-audit"), summary["RunId"])


def _expected(table: pa.Table, cap: int) -> tuple[list[dict[str, str]], list[str]]:
    rows = [r for r in table.to_pylist() if r["status"] == "written"]
    listed, truncated = [], []
    for level, path, column in LEVELS:
        ids = sorted({r[column] for r in rows})
        if len(ids) > cap:
            truncated.append(level)
        listed += [{"ID": i, "Path": f"/{path}/{i}", "Type": level} for i in ids[:cap]]
    return listed, truncated


def test_the_corpus_gives_the_expected_counts(audited: tuple[Path, pa.Table]):
    _, table = audited
    tally = AuditTally().add_table(table)
    assert dict(tally.statuses) == {"written": 17, "failed": 1}
    assert dict(tally.reasons) == {"not_dicom": 1}
    listed, truncated = tally.resources()
    assert [r["Type"] for r in listed] == ["Instance"] * 17 + ["Series"] * 6 + ["Study"] * 2 + ["Patient"] * 2
    assert truncated == []
    assert (listed, truncated) == _expected(table, 10_000)


@pytest.mark.parametrize("cap", [1, 2, 3, 5, 16, 17])
def test_rows_tables_and_shards_agree_on_the_smallest_ids(audited: tuple[Path, pa.Table], cap: int):
    _, table = audited
    expected = _expected(table, cap)
    by_rows = AuditTally(max_resources=cap).add_rows(table.to_pylist())
    by_table = AuditTally(max_resources=cap).add_table(table)
    by_shards = AuditTally(max_resources=cap)
    for start in range(0, table.num_rows, 4):  # shards of 4 rows: pruning across shards
        by_shards.add_table(table.slice(start, 4))
    for tally in (by_rows, by_table, by_shards):
        assert tally.resources() == expected
        assert dict(tally.statuses) == {"written": 17, "failed": 1}
    assert expected[1] == [level for level, n in (("Instance", 17), ("Series", 6), ("Study", 2), ("Patient", 2)) if n > cap]


def test_a_cap_below_one_is_refused():
    with pytest.raises(ValueError, match="max_resources"):
        AuditTally(max_resources=0)


def test_a_large_run_lists_the_smallest_ids_and_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    _corpus(tmp_path / "in")
    monkeypatch.setattr(run_summary, "SUMMARY_MAX_RESOURCES", 5)
    code = cli.main(["anonymize", str(tmp_path / "in"), str(tmp_path / "out"), "--key-file", str(write_key(tmp_path)), "--quiet"])
    assert code == pipeline_run.EXIT_SOME_FAILED
    summary = json.loads((tmp_path / "out-audit" / "summary.json").read_text())
    table = read_audit(str(tmp_path / "out-audit"), summary["RunId"])
    assert (summary["Resources"], summary["ResourcesTruncated"]) == _expected(table, 5)
    assert summary["ResourcesTruncated"] == ["Instance", "Series"]
    assert [r["Type"] for r in summary["Resources"]] == ["Instance"] * 5 + ["Series"] * 5 + ["Study"] * 2 + ["Patient"] * 2
    # The counts are whole: only the id list is cut.
    assert (summary["InstancesCount"], summary["FailedInstancesCount"]) == (18, 1)
    assert summary["Statuses"] == {"written": 17, "failed": 1, "skipped": 0}


def test_summary_files_are_replaced_whole_or_not_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A full disk while the summary is written used to leave summary.json truncated (the
    previous run's replaced by invalid JSON): now the old file stays and no temporary remains."""
    import errno
    import os

    target = tmp_path / "summary.json"
    run_summary.write_text(str(target), '{"Description": "first"}\n')
    assert json.loads(target.read_text()) == {"Description": "first"}

    def full(src: str, dst: str) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OSError):
        run_summary.write_text(str(target), '{"Description": "second"}\n')
    assert json.loads(target.read_text()) == {"Description": "first"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_storage_errors_are_named_by_their_error_number_only():
    import errno

    wrapped = RuntimeError("OSError: [Errno 28] No space left on device [while running 'WriteAudit/Write']")
    assert cli._storage_error(wrapped) == "ENOSPC (No space left on device)"
    try:
        try:
            raise OSError(errno.EACCES, "Permission denied", "/audit/of/patient-Jane-Doe")
        except OSError as exc:
            raise RuntimeError("a bundle failed") from exc
    except RuntimeError as chained:
        assert cli._storage_error(chained) == "EACCES (Permission denied)"
    assert cli._storage_error(ValueError("no error number here")) is None
    # A failed name lookup (offline, a runner downloading itself) is no storage error.
    import socket

    try:
        try:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        except OSError as exc:
            raise RuntimeError("could not fetch the runner") from exc
    except RuntimeError as lookup:
        assert cli._storage_error(lookup) is None


def test_a_full_audit_disk_is_one_line_naming_the_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]):
    """A storage error outside the per-file work (here the summary's disk is full) used to end as
    "internal error (OSError)": it is named by its error number, never by the path or message."""
    import errno

    write_study(make_study(seed=3, n_ct=2, rtstruct=False, sr=False), tmp_path / "in")

    def full(uri: str, data: bytes, mime_type: str = "") -> None:
        raise OSError(errno.ENOSPC, "No space left on device", uri)

    monkeypatch.setattr(run_summary, "write_whole", full)
    code = cli.main(["anonymize", str(tmp_path / "in"), str(tmp_path / "out"), "--key-file",
                     str(write_key(tmp_path)), "--quiet", "--processes", "0"])
    assert code == cli.EXIT_INTERNAL
    assert capsys.readouterr().err == (
        "dicom-deid: the run stopped on a storage error outside the per-file work (the audit, crosswalk "
        "or summary folder, or a listing): ENOSPC (No space left on device); the audit may be incomplete\n")
